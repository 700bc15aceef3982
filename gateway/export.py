"""Auditor exports: write a self-contained, signed copy of (part of) the journal, and check one.

Layout (docs/export-format.md)::

    DIR/records.jsonl     one stored record per line: {"body":<canonical body>,"hash":..,"sig":..}
    DIR/keys/<key_id>.pem every public key that signed an exported record or the manifest
    DIR/manifest.json     {"body":<canonical manifest>,"hash":..,"sig":..}

Every line is itself RFC 8785 JSON, so the exact signed bytes are the text between
``{"body":`` and the final ``,"hash":"`` — a third party needs ``sed``, ``base64`` and
``openssl`` and nothing of ours. Files are written tmp → fsync → rename → fsync(dir).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from drivers.signers.software import KeyRing
from gateway.core.canonical import canonical_bytes, parse_canonical
from gateway.core.chain import ChainHead
from gateway.core.errors import GatewayError, StorageError
from gateway.core.record import format_time, parse_time
from gateway.core.verify import ChainVerifier, StoredRecord, VerifyFailure
from gateway.ledger import Signer
from gateway.store import Reader

EXPORT_FORMAT = "fiscal-gateway-export/1"
_LINE_RE = re.compile(rb'^\{"body":(.*),"hash":"([0-9a-f]{64})","sig":"([A-Za-z0-9+/=]+)"\}$')


def stored_line(rec: StoredRecord) -> bytes:
    """The export line of a stored record (canonical JSON itself; body bytes verbatim)."""
    return (
        b'{"body":'
        + rec.body
        + b',"hash":"'
        + rec.hash.encode()
        + b'","sig":"'
        + rec.sig.encode()
        + b'"}'
    )


def parse_line(line: bytes) -> StoredRecord:
    m = _LINE_RE.match(line.rstrip(b"\n"))
    if m is None:
        raise ValueError('line is not {"body":...,"hash":...,"sig":...}')
    return StoredRecord(m.group(1), m.group(2).decode(), m.group(3).decode())


class _AtomicFile:
    """Write to ``path.tmp``, then fsync, rename over ``path`` and fsync the directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.f: IO[bytes] = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.bytes += len(data)

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> str:
    f = _AtomicFile(path)
    try:
        f.write(data)
        f.commit()
    except BaseException:
        f.abort()
        raise
    return f.sha.hexdigest()


def _start_state(reader: Reader, chain: str, first: int) -> dict[str, Any]:
    if first == 1:
        h = ChainHead(chain)
    else:
        prev = reader.record(chain, first - 1)
        if prev is None:
            raise StorageError(f"chain {chain!r} has no record {first - 1}")
        h = ChainHead.from_body(parse_canonical(prev.body), prev.hash)
    return {
        "seq": h.seq,
        "hash": h.hash,
        "time": format_time(h.time_ms) if h.seq else None,
        "key_id": h.key_id,
        "counters": h.counters,
        "totals": h.totals,
    }


@dataclass(frozen=True, slots=True)
class ExportSummary:
    out_dir: Path
    records: int
    chains: int
    seconds: float


def export(
    db: Path,
    out_dir: Path,
    signer: Signer,
    *,
    chain: str | None = None,
    from_seq: int | None = None,
    to_seq: int | None = None,
    now_ms: int | None = None,
) -> ExportSummary:
    """Export records (all chains, or one chain and a seq range) to ``out_dir``."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (out_dir / "keys").mkdir(exist_ok=True, mode=0o700)
    if (out_dir / "manifest.json").exists():
        raise StorageError(f"{out_dir} already holds an export; choose an empty directory")
    with Reader(db) as reader:
        heads = {h.chain: h for h in reader.heads()}
        chains = [chain] if chain is not None else sorted(heads)
        if chain is not None and chain not in heads:
            raise StorageError(f"no chain {chain!r} in {db}")
        keys = reader.public_keys()
        used_keys = {signer.key_id}
        records_file = _AtomicFile(out_dir / "records.jsonl")
        chain_entries = []
        total = 0
        try:
            for c in chains:
                head = heads[c]
                first = max(1, from_seq or 1)
                last = min(head.seq, to_seq or head.seq)
                if first > last:
                    continue
                start = _start_state(reader, c, first)
                count = 0
                last_hash = start["hash"]
                for rec in reader.iter_records(c, first, last):
                    body = json.loads(rec.body)
                    used_keys.add(body["key_id"])
                    records_file.write(stored_line(rec) + b"\n")
                    last_hash = rec.hash
                    count += 1
                if count != last - first + 1:
                    raise StorageError(
                        f"chain {c!r}: expected {last - first + 1} records "
                        f"in {first}..{last}, found {count}"
                    )
                chain_entries.append(
                    {
                        "chain": c,
                        "first_seq": first,
                        "last_seq": last,
                        "records": count,
                        "head_hash": last_hash,
                        "start": start,
                    }
                )
                total += count
            records_file.commit()
        except BaseException:
            records_file.abort()
            raise
    files = {"records.jsonl": {"sha256": records_file.sha.hexdigest(), "bytes": records_file.bytes}}
    keys[signer.key_id] = signer.public_pem
    for kid in sorted(used_keys):
        if kid not in keys:
            raise StorageError(f"public key {kid} is not in the database")
        data = keys[kid].encode("ascii")
        files[f"keys/{kid}.pem"] = {
            "sha256": write_atomic(out_dir / "keys" / f"{kid}.pem", data),
            "bytes": len(data),
        }
    manifest = {
        "format": EXPORT_FORMAT,
        "exported_at": format_time(now_ms if now_ms is not None else time.time_ns() // 10**6),
        "key_id": signer.key_id,
        "chains": chain_entries,
        "records": total,
        "files": files,
    }
    body = canonical_bytes(manifest)
    line = stored_line(StoredRecord(body, hashlib.sha256(body).hexdigest(), signer.sign(body)))
    write_atomic(out_dir / "manifest.json", line + b"\n")
    return ExportSummary(out_dir, total, len(chain_entries), time.perf_counter() - t0)


@dataclass(frozen=True, slots=True)
class ExportCheck:
    records: int
    chains: int
    key_ids: list[str]
    seconds: float


class ExportInvalid(GatewayError):
    code = "EXPORT_INVALID"


def verify_export(out_dir: Path) -> ExportCheck:
    """Check an export with nothing but its own files; raise ExportInvalid on any problem."""
    t0 = time.perf_counter()
    try:
        m_line = (out_dir / "manifest.json").read_bytes()
        m_rec = parse_line(m_line)
        manifest = parse_canonical(m_rec.body)
    except (OSError, ValueError, GatewayError) as exc:
        raise ExportInvalid(f"manifest.json unreadable: {exc}") from exc
    if manifest.get("format") != EXPORT_FORMAT:
        raise ExportInvalid(f"unknown export format {manifest.get('format')!r}")
    ring = KeyRing()
    for path in sorted((out_dir / "keys").glob("*.pem")):
        try:
            kid = ring.add_pem(path.read_text())
        except (OSError, ValueError, GatewayError) as exc:
            raise ExportInvalid(f"keys/{path.name} is not a readable public key: {exc}") from exc
        if path.stem != kid:
            raise ExportInvalid(f"{path.name} holds key {kid}, not {path.stem}")
    if hashlib.sha256(m_rec.body).hexdigest() != m_rec.hash:
        raise ExportInvalid("manifest hash does not match its body")
    try:
        ok = ring.check_sig(manifest["key_id"], m_rec.body, m_rec.sig)
    except KeyError:
        raise ExportInvalid(f"manifest signed by unknown key {manifest.get('key_id')}") from None
    if not ok:
        raise ExportInvalid("manifest signature does not verify")
    for name, meta in manifest["files"].items():
        path = out_dir / name
        if not path.is_file():
            raise ExportInvalid(f"{name} is missing")
        if _sha256_file(path) != meta["sha256"]:
            raise ExportInvalid(f"{name} does not match its hash in the manifest")
    expected = {c["chain"]: c for c in manifest["chains"]}
    verifiers: dict[str, ChainVerifier] = {}
    for c, entry in expected.items():
        s = entry["start"]
        start = ChainHead(
            c,
            s["seq"],
            s["hash"],
            parse_time(s["time"]) if s["time"] else 0,
            s["key_id"],
            s["counters"],
            s["totals"],
        )
        verifiers[c] = ChainVerifier(c, ring.check_sig, start)
    count = 0
    try:
        for lineno, line in enumerate(_lines(out_dir / "records.jsonl"), 1):
            try:
                rec = parse_line(line)
                chain = json.loads(rec.body)["chain"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ExportInvalid(f"records.jsonl line {lineno}: {exc}") from exc
            if chain not in verifiers:
                raise ExportInvalid(f"records.jsonl line {lineno}: chain {chain!r} not in manifest")
            verifiers[chain].feed(rec)
            count += 1
        for c, entry in expected.items():
            verifiers[c].finish(entry["last_seq"], entry["head_hash"])
    except VerifyFailure as exc:
        raise ExportInvalid(str(exc)) from exc
    if count != manifest["records"]:
        raise ExportInvalid(f"manifest says {manifest['records']} records, found {count}")
    return ExportCheck(count, len(expected), ring.ids(), time.perf_counter() - t0)


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from f


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
