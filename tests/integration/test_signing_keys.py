"""Signing keys: keygen, key file modes, rotation (CLI subprocesses, checked with openssl).

The key id is checked independently of our code: ``openssl pkey -pubin -outform DER`` gives
the SubjectPublicKeyInfo DER, ``sha256sum`` its digest, and the id is its first 16 hex digits.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, closing
from pathlib import Path

import pytest

from drivers.signers.software import SoftwareSigner, generate_key, load_signer
from gateway.audit import verify_db
from gateway.core.errors import KeyError_
from gateway.core.record import Record
from gateway.ledger import Entry, Ledger

EntryFactory = Callable[..., Entry]
SignSales = Callable[..., Awaitable[list[Record]]]
RunCli = Callable[..., subprocess.CompletedProcess[str]]
HoldWriter = Callable[[Ledger], AbstractAsyncContextManager[None]]


def openssl_key_id(public_pem: Path) -> str:
    out = subprocess.run(
        f"openssl pkey -pubin -in {shlex.quote(str(public_pem))} -outform DER | sha256sum",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()[0][:16]


def mode_of(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_keygen_new_path_writes_private_0600_and_prints_openssl_key_id(
    tmp_path: Path, cli_command: list[str]
) -> None:
    out = tmp_path / "state" / "keys" / "signing.pem"
    # umask 000: the key must be 0600 because we ask for it, not because the umask helps
    r = subprocess.run(
        ["sh", "-c", 'umask 000; exec "$@"', "sh", *cli_command, "keygen", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert r.returncode == 0, r.stderr
    pub = out.with_suffix(".pub.pem")
    assert mode_of(out) == 0o600
    assert mode_of(out.parent) & 0o077 == 0
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    key_id = openssl_key_id(pub)
    assert f"key id {key_id}\n" in r.stdout
    derived = subprocess.run(
        ["openssl", "pkey", "-in", str(out), "-pubout"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert derived == pub.read_text(), "the public PEM is not the private key's"
    text = subprocess.run(
        ["openssl", "pkey", "-in", str(out), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "prime256v1" in text
    assert load_signer(out).key_id == key_id


def test_keygen_existing_key_refuses_to_overwrite(tmp_path: Path, run_cli: RunCli) -> None:
    out = tmp_path / "keys" / "signing.pem"
    assert run_cli("keygen", "--out", out).returncode == 0
    private_before = out.read_bytes()
    public_before = out.with_suffix(".pub.pem").read_bytes()

    r = run_cli("keygen", "--out", out)

    assert r.returncode == 1
    assert "KEY_ERROR" in r.stderr and "refusing to overwrite" in r.stderr
    assert out.read_bytes() == private_before
    assert out.with_suffix(".pub.pem").read_bytes() == public_before


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o602])
def test_load_signer_key_readable_by_others_raises_key_error(
    signer: SoftwareSigner, key_path: Path, mode: int
) -> None:
    key_path.chmod(mode)

    with pytest.raises(KeyError_) as err:
        load_signer(key_path)

    assert err.value.code == "KEY_ERROR"
    assert f"mode {mode:04o}" in err.value.message
    assert f"chmod 600 {key_path}" in err.value.message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_signer_key_private_to_owner_loads(
    signer: SoftwareSigner, key_path: Path, mode: int
) -> None:
    key_path.chmod(mode)

    assert load_signer(key_path).key_id == signer.key_id


def test_load_signer_missing_key_names_keygen(tmp_path: Path) -> None:
    with pytest.raises(KeyError_, match="fiscal-gateway keygen"):
        load_signer(tmp_path / "nowhere.pem")


async def test_export_with_world_readable_key_exits_1_with_key_error(
    db_path: Path,
    signer: SoftwareSigner,
    key_path: Path,
    tmp_path: Path,
    sign_sales: SignSales,
    run_cli: RunCli,
) -> None:
    led = await Ledger.open(db_path, signer)
    try:
        await sign_sales(led, 3)
    finally:
        await led.close()
    key_path.chmod(0o644)  # noqa: ASYNC240 - arranging the test, no loop work pending

    r = run_cli("export", "--db", db_path, "--out", tmp_path / "exp", "--key", key_path)

    assert r.returncode == 1
    assert "error: KEY_ERROR:" in r.stderr and "mode 0644" in r.stderr
    assert not (tmp_path / "exp" / "manifest.json").exists()


async def test_rotate_key_cli_announces_new_key_in_every_chain_and_db_verifies(
    db_path: Path,
    signer: SoftwareSigner,
    key_path: Path,
    sign_sales: SignSales,
    make_entry: EntryFactory,
    run_cli: RunCli,
) -> None:
    chains = ("till-1", "till-2", "till-3")
    led = await Ledger.open(db_path, signer)
    try:
        await sign_sales(led, 12, chains=chains)
    finally:
        await led.close()

    r = run_cli("rotate-key", "--db", db_path, "--key", key_path)

    assert r.returncode == 0, r.stdout + r.stderr
    new = load_signer(key_path)
    assert new.key_id != signer.key_id
    assert mode_of(key_path) == 0o600
    retired = key_path.with_name(f"signing.pem.retired-{signer.key_id}")
    assert load_signer(retired).key_id == signer.key_id and mode_of(retired) == 0o600
    assert openssl_key_id(key_path.with_suffix(".pub.pem")) == new.key_id
    for chain in chains:
        assert f"chain {chain}: seq 5 announces key {new.key_id}" in r.stdout
    with closing(sqlite3.connect(db_path)) as conn:
        rows = conn.execute(
            "SELECT chain, seq, type, key_id, body FROM records WHERE seq = 5 ORDER BY chain"
        ).fetchall()
        stored_keys = {k for (k,) in conn.execute("SELECT key_id FROM keys")}
    assert [(c, s, t, k) for c, s, t, k, _ in rows] == [
        (c, 5, "INTENTION::EVENT", signer.key_id) for c in chains
    ]
    for *_, body in rows:
        payload = json.loads(body)["payload"]
        assert payload["event"] == "KEY_ROTATED"
        assert payload["old_key_id"] == signer.key_id
        assert payload["new_key_id"] == new.key_id
        assert payload["new_public_key"] == new.public_pem
    assert stored_keys == {signer.key_id, new.key_id}

    led = await Ledger.open(db_path, new)
    try:
        assert led.halted is None
        after = [(await led.submit(make_entry(f"after-{c}", till=c))).record for c in chains]
    finally:
        await led.close()
    assert all(rec.key_id == new.key_id and rec.seq == 6 for rec in after)

    v = run_cli("verify", "--db", db_path)
    assert v.returncode == 0, v.stdout
    assert "verified 18 records" in v.stdout

    stale = await Ledger.open(db_path, signer)  # the retired key may no longer sign
    try:
        assert stale.halted is not None and "rotate-key" in stale.halted
    finally:
        await stale.close()


async def test_rotate_key_cli_twice_chains_both_rotations(
    db_path: Path,
    signer: SoftwareSigner,
    key_path: Path,
    sign_sales: SignSales,
    run_cli: RunCli,
) -> None:
    led = await Ledger.open(db_path, signer)
    try:
        await sign_sales(led, 4, chains=("till-1", "till-2"))
    finally:
        await led.close()

    first = run_cli("rotate-key", "--db", db_path, "--key", key_path)
    middle = load_signer(key_path)
    second = run_cli("rotate-key", "--db", db_path, "--key", key_path)
    last = load_signer(key_path)

    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert len({signer.key_id, middle.key_id, last.key_id}) == 3
    assert key_path.with_name(f"signing.pem.retired-{middle.key_id}").exists()
    v = run_cli("verify", "--db", db_path)
    assert v.returncode == 0, v.stdout
    assert "chain till-1: OK, 4 records, head seq 4" in v.stdout


async def test_rotate_key_with_concurrent_submits_signs_every_request(
    ledger: Ledger,
    db_path: Path,
    tmp_path: Path,
    signer: SoftwareSigner,
    make_entry: EntryFactory,
    sign_sales: SignSales,
    hold_writer: HoldWriter,
) -> None:
    await sign_sales(ledger, 4, chains=("till-1", "till-2"))
    new = generate_key(tmp_path / "new" / "signing.pem")

    async with hold_writer(ledger):
        before = [
            asyncio.create_task(ledger.submit(make_entry(f"pre-{i}", till=f"till-{i % 2 + 1}")))
            for i in range(10)
        ]
        rotation = asyncio.create_task(ledger.rotate_key(new))
        after = [
            asyncio.create_task(ledger.submit(make_entry(f"post-{i}", till=f"till-{i % 2 + 1}")))
            for i in range(10)
        ]
    signed_before = await asyncio.gather(*before)
    announced = await rotation
    signed_after = await asyncio.gather(*after)

    assert {r.record.key_id for r in signed_before} == {signer.key_id}
    assert {r.record.key_id for r in signed_after} == {new.key_id}
    assert [r.chain for r in announced] == ["till-1", "till-2"]
    assert all(r.seq == 8 for r in announced)  # 2 + 5 before it, in each chain
    assert ledger.halted is None
    report = verify_db(db_path)
    assert report.ok and report.records == 4 + 10 + 2 + 10


async def test_rotate_key_queued_behind_first_record_of_new_chain_announces_it(
    ledger: Ledger,
    tmp_path: Path,
    make_entry: EntryFactory,
    sign_sales: SignSales,
    hold_writer: HoldWriter,
) -> None:
    await sign_sales(ledger, 1, chains=("till-1",))
    new = generate_key(tmp_path / "new" / "signing.pem")

    async with hold_writer(ledger):
        first = asyncio.create_task(ledger.submit(make_entry("n-1", till="till-new")))
        rotation = asyncio.create_task(ledger.rotate_key(new))
    await first
    announced = await rotation

    assert [r.chain for r in announced] == ["till-1", "till-new"]
    nxt = await ledger.submit(make_entry("n-2", till="till-new"))
    assert nxt.record.key_id == new.key_id and nxt.record.seq == 3


async def test_rotate_key_cli_rerun_after_crash_before_key_switch_completes_it(
    db_path: Path,
    signer: SoftwareSigner,
    key_path: Path,
    sign_sales: SignSales,
    run_cli: RunCli,
) -> None:
    """The journal committed the rotation, then the process died before moving key files."""
    new_path = key_path.with_name("signing.pem.new")
    new = generate_key(new_path)
    led = await Ledger.open(db_path, signer)
    try:
        await sign_sales(led, 4, chains=("till-1", "till-2"))
        await led.rotate_key(new)
    finally:
        await led.close()

    r = run_cli("rotate-key", "--db", db_path, "--key", key_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert f"already announces key {new.key_id}" in r.stdout
    assert load_signer(key_path).key_id == new.key_id
    assert not new_path.exists()
    with closing(sqlite3.connect(db_path)) as conn:
        (rotations,) = conn.execute(
            "SELECT count(*) FROM records WHERE type = 'INTENTION::EVENT'"
        ).fetchone()
    assert rotations == 2  # one per chain: the rerun signed nothing
    led = await Ledger.open(db_path, load_signer(key_path))
    try:
        assert led.halted is None
    finally:
        await led.close()
    assert run_cli("verify", "--db", db_path).returncode == 0


async def test_rotate_key_cli_halted_journal_refuses_and_keeps_key_files(
    db_path: Path,
    signer: SoftwareSigner,
    key_path: Path,
    sign_sales: SignSales,
    run_cli: RunCli,
) -> None:
    led = await Ledger.open(db_path, signer)
    try:
        await sign_sales(led, 4)
    finally:
        await led.close()
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("DELETE FROM records WHERE seq = 4")
        conn.commit()
    first = run_cli("rotate-key", "--db", db_path, "--key", key_path)
    again = run_cli("rotate-key", "--db", db_path, "--key", key_path)  # now with a .new key

    for r in (first, again):
        assert r.returncode == 1
        assert "error: signing is halted" in r.stderr and "records lost" in r.stderr
    assert load_signer(key_path).key_id == signer.key_id


async def test_rotate_key_cli_before_any_chain_holds_key_generated_for_the_first(
    db_path: Path,
    signer: SoftwareSigner,
    key_path: Path,
    make_entry: EntryFactory,
    run_cli: RunCli,
) -> None:
    """A box rotated before its first sale: the old key signed nothing, so there is no chain
    to announce in. The new key becomes the journal's key and the first chain opens with a
    KEY_GENERATED event naming the key it replaced; everything is signed by the new key."""
    led = await Ledger.open(db_path, signer)
    await led.close()

    r = run_cli("rotate-key", "--db", db_path, "--key", key_path)

    assert r.returncode == 0, r.stdout + r.stderr
    new = load_signer(key_path)
    assert new.key_id != signer.key_id
    assert f"no chain yet: key {new.key_id} replaces {signer.key_id}" in r.stdout
    with closing(sqlite3.connect(db_path)) as conn:
        held = [json.loads(p) for (p,) in conn.execute("SELECT payload FROM held_events")]
        stored_keys = {k for (k,) in conn.execute("SELECT key_id FROM keys")}
        assert conn.execute("SELECT count(*) FROM records").fetchone() == (0,)
    assert held == [
        {
            "event": "KEY_GENERATED",
            "key_id": new.key_id,
            "replaces_key_id": signer.key_id,
            "by": "rotate-key",
        }
    ]
    assert new.key_id in stored_keys

    led = await Ledger.open(db_path, new)
    try:
        assert led.halted is None
        sale = (await led.submit(make_entry("first", till="till-1"))).record
    finally:
        await led.close()
    assert sale.seq == 2 and sale.key_id == new.key_id
    with closing(sqlite3.connect(db_path)) as conn:
        (first,) = conn.execute("SELECT key_id, body FROM records WHERE seq = 1").fetchall()
    assert first[0] == new.key_id
    assert json.loads(first[1])["payload"]["replaces_key_id"] == signer.key_id
    v = run_cli("verify", "--db", db_path)
    assert v.returncode == 0, v.stdout
    assert "verified 2 records" in v.stdout


async def test_rotate_key_cli_before_any_chain_cut_short_run_again_finishes_it(
    db_path: Path,
    signer: SoftwareSigner,
    key_path: Path,
    make_entry: EntryFactory,
    run_cli: RunCli,
) -> None:
    """The rotation committed (new key registered, KEY_GENERATED held) but the process died
    before switching the key files: the old key no longer opens the journal (the first chain
    would say one key and be signed by another), and running rotate-key again switches the
    files and holds the event once."""
    new_path = key_path.with_name(key_path.name + ".new")
    new = generate_key(new_path)
    led = await Ledger.open(db_path, signer)
    try:
        assert await led.rotate_key(new) == []
    finally:
        await led.close()
    stale = await Ledger.open(db_path, signer)
    try:
        assert stale.halted is not None and new.key_id in stale.halted
    finally:
        await stale.close()

    r = run_cli("rotate-key", "--db", db_path, "--key", key_path)

    assert r.returncode == 0, r.stdout + r.stderr
    assert f"already announces key {new.key_id}" in r.stdout
    assert load_signer(key_path).key_id == new.key_id and not new_path.exists()
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT count(*) FROM held_events").fetchone() == (1,)
    led = await Ledger.open(db_path, load_signer(key_path))
    try:
        assert led.halted is None
        assert (await led.submit(make_entry("first", till="till-1"))).record.seq == 2
    finally:
        await led.close()
