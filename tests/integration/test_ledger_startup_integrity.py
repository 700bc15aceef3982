"""Start-up integrity (DESIGN.md §3.8): a database that is not what we wrote halts signing.

Each test builds a real journal (two chains of 30 records), closes it, tampers with the file
through a separate ``sqlite3`` connection the way an intruder or a broken disk would, then
reopens the ledger and runs ``fiscal-gateway verify`` as a subprocess.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path

import pytest

from drivers.signers.software import SoftwareSigner, generate_key
from gateway.core.canonical import parse_canonical
from gateway.core.chain import ChainHead, draft
from gateway.core.errors import SigningHalted, StorageError
from gateway.core.record import Record
from gateway.ledger import Entry, Ledger

EntryFactory = Callable[..., Entry]
SignSales = Callable[..., Awaitable[list[Record]]]
RunCli = Callable[..., subprocess.CompletedProcess[str]]

PER_CHAIN = 30
CHAINS = ("till-1", "till-2")


@pytest.fixture
async def journal(db_path: Path, signer: SoftwareSigner, sign_sales: SignSales) -> Path:
    """A closed journal: till-1 and till-2 with 30 records each."""
    led = await Ledger.open(db_path, signer)
    try:
        await sign_sales(led, PER_CHAIN * len(CHAINS), chains=CHAINS)
    finally:
        await led.close()
    return db_path


def record_row(conn: sqlite3.Connection, chain: str, seq: int) -> tuple[bytes, str, str]:
    body, h, sig = conn.execute(
        "SELECT body, hash, sig FROM records WHERE chain = ? AND seq = ?", (chain, seq)
    ).fetchone()
    return bytes(body), h, sig


def flip_body_byte(conn: sqlite3.Connection, signer: SoftwareSigner) -> None:
    body, _, _ = record_row(conn, "till-1", 28)
    i = body.index(b'"total":') + len(b'"total":')  # first digit of the sale total
    forged = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
    conn.execute("UPDATE records SET body = ? WHERE chain = 'till-1' AND seq = 28", (forged,))


def delete_last(conn: sqlite3.Connection, signer: SoftwareSigner) -> None:
    conn.execute("DELETE FROM records WHERE chain = 'till-1' AND seq = 30")


def delete_middle(conn: sqlite3.Connection, signer: SoftwareSigner) -> None:
    conn.execute("DELETE FROM records WHERE chain = 'till-1' AND seq = 15")


def insert_beyond_head(conn: sqlite3.Connection, signer: SoftwareSigner) -> None:
    """A perfectly chained and signed record 31 that the writer never committed a head for."""
    body, h, _ = record_row(conn, "till-1", 30)
    last = parse_canonical(body)
    d = draft(
        ChainHead.from_body(last, h),
        record_type="TRANSACTION::RECEIPT",
        client="till-1",
        request_id="forged-31",
        payload=last["payload"],
        now_ms=4_000_000_000_000,
        key_id=signer.key_id,
    )
    b = d.body
    conn.execute(
        "INSERT INTO records (chain, seq, type, number, time, client, request_id, key_id, "
        "hash, sig, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            b["chain"],
            b["seq"],
            b["type"],
            b["number"],
            b["time"],
            b["client"],
            b["request_id"],
            b["key_id"],
            d.hash,
            signer.sign(d.body_bytes),
            d.body_bytes,
        ),
    )


def swap_signature(conn: sqlite3.Connection, signer: SoftwareSigner) -> None:
    _, _, sig28 = record_row(conn, "till-1", 28)
    conn.execute("UPDATE records SET sig = ? WHERE chain = 'till-1' AND seq = 29", (sig28,))


def head_back_one(conn: sqlite3.Connection, signer: SoftwareSigner) -> None:
    _, h29, _ = record_row(conn, "till-1", 29)
    conn.execute("UPDATE heads SET seq = 29, hash = ? WHERE chain = 'till-1'", (h29,))


def head_ahead_one(conn: sqlite3.Connection, signer: SoftwareSigner) -> None:
    conn.execute("UPDATE heads SET seq = 31 WHERE chain = 'till-1'")


def head_other_hash(conn: sqlite3.Connection, signer: SoftwareSigner) -> None:
    conn.execute("UPDATE heads SET hash = ? WHERE chain = 'till-1'", ("ab" * 32,))


def head_deleted(conn: sqlite3.Connection, signer: SoftwareSigner) -> None:
    conn.execute("DELETE FROM heads WHERE chain = 'till-1'")


# (tamper, words the halt reason must contain, seq `verify` must name, its reason codes)
TAMPERING = [
    pytest.param(
        flip_body_byte,
        ["'till-1' seq 28"],
        28,
        {"HASH_MISMATCH", "NOT_CANONICAL"},
        id="body-byte",
    ),
    pytest.param(delete_last, ["'till-1'", "records lost"], 30, {"TRUNCATED"}, id="delete-last"),
    pytest.param(delete_middle, ["'till-1' seq 15", "SEQ_GAP"], 15, {"SEQ_GAP"}, id="delete-mid"),
    pytest.param(
        insert_beyond_head, ["'till-1'", "beyond the committed head"], 31, {"SEQ_GAP"}, id="insert"
    ),
    pytest.param(
        swap_signature, ["'till-1' seq 29", "BAD_SIGNATURE"], 29, {"BAD_SIGNATURE"}, id="sig"
    ),
    pytest.param(
        head_back_one, ["'till-1'", "beyond the committed head"], 30, {"SEQ_GAP"}, id="head-back"
    ),
    pytest.param(head_ahead_one, ["'till-1'", "records lost"], 31, {"TRUNCATED"}, id="head-ahead"),
    pytest.param(
        head_other_hash, ["'till-1' seq 30", "HASH_MISMATCH"], 30, {"HASH_MISMATCH"}, id="head-hash"
    ),
    pytest.param(head_deleted, ["'till-1'", "no committed head"], 1, {"TRUNCATED"}, id="head-gone"),
]


@pytest.mark.parametrize(("tamper", "halt_words", "bad_seq", "reasons"), TAMPERING)
async def test_ledger_open_tampered_db_halts_and_verify_names_first_bad_seq(
    journal: Path,
    signer: SoftwareSigner,
    make_entry: EntryFactory,
    run_cli: RunCli,
    tamper: Callable[[sqlite3.Connection, SoftwareSigner], None],
    halt_words: list[str],
    bad_seq: int,
    reasons: set[str],
) -> None:
    with closing(sqlite3.connect(journal)) as conn:
        tamper(conn, signer)
        conn.commit()

    led = await Ledger.open(journal, signer)
    try:
        assert led.halted is not None, "tampering went unnoticed at start-up"
        for word in halt_words:
            assert word in led.halted, led.halted
        with pytest.raises(SigningHalted, match="signing is halted"):
            await led.submit(make_entry("after-tamper"))
        with pytest.raises(SigningHalted):
            await led.submit(make_entry("other-chain", till="till-2"))
    finally:
        await led.close()

    r = run_cli("verify", "--db", journal, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"chain till-1: FAILED at seq {bad_seq}:" in r.stdout
    assert f"chain till-2: OK, {PER_CHAIN} records" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["ok"] is False
    (failure,) = summary["failures"]
    assert failure["chain"] == "till-1" and failure["seq"] == bad_seq
    assert failure["reason"] in reasons
    with closing(sqlite3.connect(journal)) as conn:
        assert conn.execute(
            "SELECT count(*) FROM records WHERE request_id = 'after-tamper'"
        ).fetchone() == (0,)


async def test_verify_untampered_db_exits_zero_and_prints_rate(
    journal: Path, run_cli: RunCli
) -> None:
    r = run_cli("verify", "--db", journal)

    assert r.returncode == 0, r.stdout + r.stderr
    for chain in CHAINS:
        assert f"chain {chain}: OK, {PER_CHAIN} records, head seq {PER_CHAIN}" in r.stdout
    assert f"verified {PER_CHAIN * len(CHAINS)} records" in r.stdout
    assert "records/s" in r.stdout and r.stdout.rstrip().endswith("OK")


async def test_verify_tamper_outside_tail_window_is_found_by_full_verify(
    journal: Path, run_cli: RunCli
) -> None:
    with closing(sqlite3.connect(journal)) as conn:
        flip = record_row(conn, "till-2", 3)[0].replace(b'"CARD"', b'"CASH"')
        conn.execute("UPDATE records SET body = ? WHERE chain = 'till-2' AND seq = 3", (flip,))
        conn.commit()

    r = run_cli("verify", "--db", journal)

    assert r.returncode == 1
    assert "chain till-2: FAILED at seq 3: HASH_MISMATCH" in r.stdout


async def test_ledger_open_untampered_db_is_not_halted(
    journal: Path, signer: SoftwareSigner, make_entry: EntryFactory
) -> None:
    led = await Ledger.open(journal, signer, tail_verify=5)
    try:
        assert led.halted is None
        rec = (await led.submit(make_entry("next"))).record
    finally:
        await led.close()
    assert rec.seq == PER_CHAIN + 1


async def test_ledger_open_with_other_key_halts_with_rotate_key_hint(
    journal: Path, tmp_path: Path, make_entry: EntryFactory, run_cli: RunCli
) -> None:
    other = generate_key(tmp_path / "other" / "signing.pem")

    led = await Ledger.open(journal, other)
    try:
        assert led.halted is not None
        assert "rotate-key" in led.halted and other.key_id in led.halted
        with pytest.raises(SigningHalted):
            await led.submit(make_entry("with-other-key"))
    finally:
        await led.close()

    # the chain itself is intact: only the configuration is wrong
    assert run_cli("verify", "--db", journal).returncode == 0


async def test_ledger_open_second_instance_same_db_is_refused(
    journal: Path, signer: SoftwareSigner, key_path: Path, run_cli: RunCli
) -> None:
    led = await Ledger.open(journal, signer)
    try:
        with pytest.raises(StorageError, match="in use by another gateway process"):
            await Ledger.open(journal, signer)
        # another process: rotate-key must open the ledger for writing, and cannot
        r = run_cli("rotate-key", "--db", journal, "--key", key_path)
        assert r.returncode == 1
        assert "STORAGE_ERROR" in r.stderr and "in use by another gateway process" in r.stderr
        assert led.halted is None
    finally:
        await led.close()

    reopened = await Ledger.open(journal, signer)  # the lock went with the first ledger
    await reopened.close()


def smash_records_root_page(db: Path) -> None:
    """Overwrite the header of the records table's root page, as a failing disk would."""
    with closing(sqlite3.connect(db)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'records'").fetchone()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as f:
        f.seek((root[0] - 1) * page_size)
        f.write(b"\xff" * 64)


async def test_ledger_open_damaged_file_halts_and_verify_reports_it(
    journal: Path, signer: SoftwareSigner, make_entry: EntryFactory, run_cli: RunCli
) -> None:
    smash_records_root_page(journal)

    led = await Ledger.open(journal, signer)
    try:
        assert led.halted is not None
        assert "damaged" in led.halted or "quick_check" in led.halted, led.halted
        with pytest.raises(SigningHalted):
            await led.submit(make_entry("on-a-damaged-file"))
    finally:
        await led.close()

    r = run_cli("verify", "--db", journal)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "malformed" in r.stdout + r.stderr


async def test_ledger_open_damaged_file_without_quick_check_halts_and_unlocks(
    journal: Path, signer: SoftwareSigner
) -> None:
    smash_records_root_page(journal)

    led = await Ledger.open(journal, signer, run_quick_check=False)
    try:
        assert led.halted is not None and "damaged" in led.halted
    finally:
        await led.close()
    again = await Ledger.open(journal, signer, run_quick_check=False)  # lock was released
    await again.close()


async def test_ledger_open_mangled_public_key_row_halts(
    journal: Path, signer: SoftwareSigner, make_entry: EntryFactory
) -> None:
    with closing(sqlite3.connect(journal)) as conn:
        conn.execute("UPDATE keys SET public_pem = 'not a key'")
        conn.commit()

    led = await Ledger.open(journal, signer)
    try:
        assert led.halted is not None and "unreadable" in led.halted, led.halted
        with pytest.raises(SigningHalted):
            await led.submit(make_entry("after-key-mangling"))
    finally:
        await led.close()
