"""Auditor exports checked from outside: ``sed``, ``base64`` and ``openssl`` only.

An export line is ``{"body":<BODY>,"hash":"<hex>","sig":"<b64>"}`` where BODY is exactly the
signed canonical bytes (gateway/export.py). The shell pipeline below is what an auditor would
type; it shares no code with the gateway. The journal used has three chains and a key
rotation in the middle, so the export holds records signed by two keys.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from drivers.signers.software import SoftwareSigner, generate_key
from gateway.core.record import Record
from gateway.ledger import Ledger

SignSales = Callable[..., Awaitable[list[Record]]]
RunCli = Callable[..., subprocess.CompletedProcess[str]]

CHAINS = ("till-1", "till-2", "till-3")
BEFORE_ROTATION = 60  # records (20 per chain), then one KEY_ROTATED per chain
AFTER_ROTATION = 90  # 30 more per chain, signed by the new key
TOTAL = BEFORE_ROTATION + len(CHAINS) + AFTER_ROTATION

# The auditor's recipe from docs/export-format.md, for lines "$@" of $file: BODY is the text
# between '{"body":' and the final ',"hash":"'. The signer is the body's top-level "key_id":
# the first match in a record, the last in a manifest ($pick: head or tail), whose nested
# chains[].start.key_id sort before it.
OPENSSL_CHECK = r"""
set -euo pipefail
file=$1; keys=$2; work=$3; pick=$4; shift 4
for n in "$@"; do
    line=$(sed -n "${n}p" "$file")
    printf '%s' "$line" \
        | sed -E 's/^\{"body":(.*),"hash":"[0-9a-f]{64}","sig":"[A-Za-z0-9+\/=]+"\}$/\1/' \
        | tr -d '\n' > "$work/canonical.bin"
    printf '%s' "$line" | sed -E 's/.*,"sig":"([A-Za-z0-9+\/=]+)"\}$/\1/' \
        | base64 -d > "$work/sig.der"
    hash=$(printf '%s' "$line" | sed -E 's/.*,"hash":"([0-9a-f]{64})","sig":"[^"]*"\}$/\1/')
    key=$(grep -o '"key_id":"[0-9a-f]\{16\}"' "$work/canonical.bin" | "$pick" -1 \
        | cut -d'"' -f4)
    verdict=$(openssl dgst -sha256 -verify "$keys/$key.pem" -signature "$work/sig.der" \
        "$work/canonical.bin" || true)
    digest=$(openssl dgst -sha256 -r "$work/canonical.bin" | cut -d' ' -f1)
    echo "$n|$key|$hash|$digest|$verdict"
done
"""


@dataclass(frozen=True)
class Journal:
    db: Path
    old: SoftwareSigner
    new: SoftwareSigner
    new_key: Path


@pytest.fixture
async def journal(
    tmp_path: Path, db_path: Path, signer: SoftwareSigner, sign_sales: SignSales
) -> Journal:
    new_key = tmp_path / "keys2" / "signing.pem"
    new = generate_key(new_key)
    led = await Ledger.open(db_path, signer)
    try:
        await sign_sales(led, BEFORE_ROTATION, chains=CHAINS, prefix="a")
        await led.rotate_key(new)
        await sign_sales(led, AFTER_ROTATION, chains=CHAINS, prefix="b")
    finally:
        await led.close()
    return Journal(db_path, signer, new, new_key)


@pytest.fixture
def exported(journal: Journal, tmp_path: Path, run_cli: RunCli) -> Path:
    out = tmp_path / "export"
    r = run_cli("export", "--db", journal.db, "--out", out, "--key", journal.new_key)
    assert r.returncode == 0, r.stderr
    assert f"exported {TOTAL} records of 3 chain(s)" in r.stdout
    return out


def openssl_check(file: Path, keys: Path, work: Path, lines: list[int]) -> list[list[str]]:
    work.mkdir(exist_ok=True)
    pick = "tail" if file.name == "manifest.json" else "head"
    r = subprocess.run(
        ["bash", "-c", OPENSSL_CHECK, "openssl-check", str(file), str(keys), str(work), pick]
        + [str(n) for n in lines],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return [row.split("|") for row in r.stdout.splitlines()]


def spread(count: int, total: int) -> list[int]:
    """``count`` line numbers from 1..total, evenly spread (first and last included)."""
    return sorted({1 + round(i * (total - 1) / (count - 1)) for i in range(count)})


def test_export_sample_records_verify_with_openssl_alone(
    exported: Path, journal: Journal, tmp_path: Path
) -> None:
    lines = (exported / "records.jsonl").read_bytes().splitlines()
    assert len(lines) == TOTAL
    rotations = [i + 1 for i, ln in enumerate(lines) if b'"event":"KEY_ROTATED"' in ln]
    sample = sorted(set(spread(27, TOTAL)) | set(rotations))
    assert len(sample) >= 30

    rows = openssl_check(exported / "records.jsonl", exported / "keys", tmp_path / "w", sample)

    assert len(rows) == len(sample)
    chains_seen = set()
    for n, kid, hash_hex, digest, verdict in rows:
        stored = json.loads(lines[int(n) - 1])
        assert verdict == "Verified OK", f"line {n}: {verdict}"
        assert digest == hash_hex == stored["hash"], f"line {n}"
        assert kid == stored["body"]["key_id"]
        chains_seen.add(stored["body"]["chain"])
    assert chains_seen == set(CHAINS)
    assert {row[1] for row in rows} == {journal.old.key_id, journal.new.key_id}
    for n in rotations:  # announced by the old key, naming the new one
        (row,) = [r for r in rows if r[0] == str(n)]
        assert row[1] == journal.old.key_id


def test_export_pipeline_tampered_body_fails_openssl(exported: Path, tmp_path: Path) -> None:
    """The outside check is not vacuous: one changed byte and openssl says no."""
    records = exported / "records.jsonl"
    forged = tmp_path / "forged.jsonl"
    first = records.read_bytes().splitlines()[0]
    forged.write_bytes(first.replace(b'"CARD"', b'"CASH"', 1) + b"\n")

    ((_, _, hash_hex, digest, verdict),) = openssl_check(
        forged, exported / "keys", tmp_path / "w", [1]
    )

    assert verdict == "Verification failure"
    assert digest != hash_hex


def test_export_manifest_verifies_with_openssl_and_sha256sum(
    exported: Path, journal: Journal, tmp_path: Path
) -> None:
    ((_, kid, hash_hex, digest, verdict),) = openssl_check(
        exported / "manifest.json", exported / "keys", tmp_path / "w", [1]
    )

    assert verdict == "Verified OK"
    assert kid == journal.new.key_id
    assert digest == hash_hex
    manifest = json.loads((exported / "manifest.json").read_bytes())["body"]
    assert manifest["records"] == TOTAL
    assert sorted(manifest["files"]) == sorted(
        ["records.jsonl", f"keys/{journal.old.key_id}.pem", f"keys/{journal.new.key_id}.pem"]
    )
    sums = subprocess.run(
        ["sha256sum", *manifest["files"]],
        cwd=exported,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for row in sums.splitlines():
        digest_hex, name = row.split()
        assert manifest["files"][name]["sha256"] == digest_hex, name


def test_verify_export_untouched_export_exits_zero(
    exported: Path, journal: Journal, run_cli: RunCli
) -> None:
    r = run_cli("verify-export", exported)

    assert r.returncode == 0, r.stdout + r.stderr
    assert f"export OK: {TOTAL} records in 3 chain(s)" in r.stdout
    assert journal.old.key_id in r.stdout and journal.new.key_id in r.stdout
    assert "records/s" in r.stdout


def flip_record_byte(out: Path, j: Journal) -> None:
    path = out / "records.jsonl"
    data = bytearray(path.read_bytes())
    i = data.index(b'"total":', len(data) // 2) + len(b'"total":')
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def drop_record_line(out: Path, j: Journal) -> None:
    path = out / "records.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:50] + lines[51:]))


def flip_key_byte(out: Path, j: Journal) -> None:
    path = out / "keys" / f"{j.old.key_id}.pem"
    text = path.read_text().splitlines(keepends=True)
    line = text[1]
    text[1] = line[:10] + ("A" if line[10] != "A" else "B") + line[11:]
    path.write_text("".join(text))


def swap_key_file(out: Path, j: Journal) -> None:
    other = generate_key(out.parent / "intruder" / "k.pem")
    (out / "keys" / f"{j.old.key_id}.pem").write_text(other.public_pem)


def remove_key_file(out: Path, j: Journal) -> None:
    (out / "keys" / f"{j.old.key_id}.pem").unlink()


def flip_manifest_byte(out: Path, j: Journal) -> None:
    path = out / "manifest.json"
    data = path.read_bytes()
    i = data.index(b'"exported_at":"') + len(b'"exported_at":"') + 3  # a year digit
    path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])


def rehash_manifest(out: Path, j: Journal) -> None:
    """Change the manifest and fix its hash: only the signature can tell."""
    path = out / "manifest.json"
    line = path.read_bytes().rstrip(b"\n")
    body = line[len(b'{"body":') : line.rindex(b',"hash":"')]
    forged = body.replace(f'"records":{TOTAL}'.encode(), f'"records":{TOTAL - 1}'.encode())
    assert forged != body
    sig = line[line.rindex(b',"sig":"') :]
    new_hash = hashlib.sha256(forged).hexdigest().encode()
    path.write_bytes(b'{"body":' + forged + b',"hash":"' + new_hash + b'"' + sig + b"\n")


def manifest_signed_by_other_key(out: Path, j: Journal) -> None:
    """Re-sign the manifest with the retired key: valid signature, wrong signer."""
    path = out / "manifest.json"
    line = path.read_bytes().rstrip(b"\n")
    body = line[len(b'{"body":') : line.rindex(b',"hash":"')]
    sig = j.old.sign(body).encode()
    path.write_bytes(line[: line.rindex(b',"sig":"')] + b',"sig":"' + sig + b'"}\n')


def remove_manifest(out: Path, j: Journal) -> None:
    (out / "manifest.json").unlink()


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (flip_record_byte, "records.jsonl does not match its hash"),
        (drop_record_line, "records.jsonl does not match its hash"),
        (flip_key_byte, "is not a readable public key"),
        (swap_key_file, "holds key"),
        (remove_key_file, ".pem is missing"),
        (flip_manifest_byte, "manifest hash does not match"),
        (rehash_manifest, "manifest signature does not verify"),
        (manifest_signed_by_other_key, "manifest signature does not verify"),
        (remove_manifest, "manifest.json unreadable"),
    ],
)
def test_verify_export_tampered_file_exits_1(
    exported: Path,
    journal: Journal,
    run_cli: RunCli,
    tamper: Callable[[Path, Journal], None],
    why: str,
) -> None:
    tamper(exported, journal)

    r = run_cli("verify-export", exported)

    assert r.returncode == 1, r.stdout
    assert r.stdout.startswith("export INVALID: "), r.stdout + r.stderr
    assert why in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("chain", "first", "last"),
    [("till-2", 5, 18), ("till-3", 15, 30), ("till-1", 1, 3), ("till-1", 22, 51)],
)
def test_export_partial_range_verifies_with_cli_and_openssl(
    journal: Journal,
    tmp_path: Path,
    run_cli: RunCli,
    chain: str,
    first: int,
    last: int,
) -> None:
    out = tmp_path / f"part-{chain}-{first}"
    r = run_cli(
        "export",
        "--db",
        journal.db,
        "--out",
        out,
        "--key",
        journal.new_key,
        "--chain",
        chain,
        "--from",
        str(first),
        "--to",
        str(last),
    )
    assert r.returncode == 0, r.stderr
    expected = min(last, 51) - first + 1  # each chain holds 20 + 1 + 30 = 51 records

    v = run_cli("verify-export", out)

    assert v.returncode == 0, v.stdout
    assert f"export OK: {expected} records in 1 chain(s)" in v.stdout
    lines = (out / "records.jsonl").read_bytes().splitlines()
    bodies = [json.loads(ln)["body"] for ln in lines]
    assert [b["seq"] for b in bodies] == list(range(first, first + expected))
    assert {b["chain"] for b in bodies} == {chain}
    (entry,) = json.loads((out / "manifest.json").read_bytes())["body"]["chains"]
    assert entry["start"]["seq"] == first - 1
    assert bodies[0]["prev_hash"] == entry["start"]["hash"]
    rows = openssl_check(out / "records.jsonl", out / "keys", tmp_path / "w", [1, len(lines)])
    assert [row[4] for row in rows] == ["Verified OK", "Verified OK"]
    rows = openssl_check(out / "manifest.json", out / "keys", tmp_path / "w", [1])
    assert rows[0][4] == "Verified OK"
    assert rows[0][1] == journal.new.key_id
