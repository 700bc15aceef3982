"""Auditor exports: write a self-contained, signed copy of (part of) the journal, and check one.

Layout (docs/export-format.md)::

    DIR/records.jsonl     one stored record per line: {"body":<canonical body>,"hash":..,"sig":..}
    DIR/references.jsonl  (if any) records outside the export that exported ones refer to
    DIR/keys/<key_id>.pem every public key that signed an exported record or the manifest
    DIR/manifest.json     {"body":<canonical manifest>,"hash":..,"sig":..}

Every line is itself RFC 8785 JSON, so the exact signed bytes are the text between
``{"body":`` and the final ``,"hash":"`` — a third party needs ``sed``, ``base64`` and
``openssl`` and nothing of ours. Files are written tmp → fsync → rename → fsync(dir).

:func:`verify_export` checks an export with its own files only: the manifest, every record's
hash, signature and chain rules, the journal rules (closings and references:
gateway.core.journal_rules) and, for an archive (gateway.archive), that it holds exactly the
closed period it names. A changed byte is reported with the record it falls in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from drivers.signers.software import KeyRing
from gateway.core.canonical import canonical_bytes, parse_canonical
from gateway.core.chain import ChainHead
from gateway.core.errors import GatewayError, StorageError
from gateway.core.journal_rules import JournalChecker, JournalState
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
    manifest_hash: str = ""
    references: int = 0


def export(
    db: Path,
    out_dir: Path,
    signer: Signer,
    *,
    chain: str | None = None,
    from_seq: int | None = None,
    to_seq: int | None = None,
    now_ms: int | None = None,
    archive: dict[str, Any] | None = None,
) -> ExportSummary:
    """Export records (all chains, or one chain and a seq range) to ``out_dir``.

    Records outside the export that an exported one refers to (the sale a cancellation
    cancels, the previous closing of a closing, …) go to ``references.jsonl``; ``archive``
    (gateway.archive) is added to the manifest as it is."""
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
        wanted: set[tuple[str, int]] = set()
        ranges: dict[str, tuple[int, int]] = {}
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
                ranges[c] = (first, last)
                for rec in reader.iter_records(c, first, last):
                    body = json.loads(rec.body)
                    used_keys.add(body["key_id"])
                    wanted.update(referred_to(body))
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
        outside = sorted(
            (c, n) for c, n in wanted if not (c in ranges and ranges[c][0] <= n <= ranges[c][1])
        )
        refs = [r for r in (reader.record(c, n) for c, n in outside) if r is not None]
        for r in refs:
            used_keys.add(json.loads(r.body)["key_id"])
    files = {"records.jsonl": {"sha256": records_file.sha.hexdigest(), "bytes": records_file.bytes}}
    if refs:
        data = b"".join(stored_line(r) + b"\n" for r in refs)
        files["references.jsonl"] = {
            "sha256": write_atomic(out_dir / "references.jsonl", data),
            "bytes": len(data),
        }
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
    if refs:
        manifest["references"] = len(refs)
    if archive is not None:
        manifest["archive"] = archive
    body = canonical_bytes(manifest)
    line = stored_line(StoredRecord(body, hashlib.sha256(body).hexdigest(), signer.sign(body)))
    write_atomic(out_dir / "manifest.json", line + b"\n")
    return ExportSummary(
        out_dir,
        total,
        len(chain_entries),
        time.perf_counter() - t0,
        hashlib.sha256(body).hexdigest(),
        len(refs),
    )


def referred_to(body: dict[str, Any]) -> list[tuple[str, int]]:
    """The records a record refers to (and the journal rules read): a cancelled, corrected
    or copied record, a closing's previous closing, an archive's closing."""
    p = body.get("payload")
    if not isinstance(p, dict):
        return []
    out = []
    ref = p.get("ref")
    if isinstance(ref, dict) and isinstance(ref.get("chain"), str) and type(ref.get("seq")) is int:
        out.append((ref["chain"], ref["seq"]))
    if body["type"].startswith(("CLOSING::", "EXPORT::")):
        for key in ("previous", "closing"):
            v = p.get(key)
            if isinstance(v, dict) and type(v.get("seq")) is int:
                out.append((body["chain"], v["seq"]))
    return out


@dataclass(frozen=True, slots=True)
class ExportCheck:
    records: int
    chains: int
    key_ids: list[str]
    seconds: float
    closings: int = 0
    #: closings a partial export cannot show whole (chain, seq, why); none in an archive
    unchecked: tuple[tuple[str, int, str], ...] = ()
    manifest_hash: str = ""
    archive: dict[str, Any] | None = None


class ExportInvalid(GatewayError):
    code = "EXPORT_INVALID"


#: chain and seq of a record line, without parsing it: the body is canonical JSON, so its
#: first key is "chain" and its top-level "seq" follows "request_id" (a string without quotes)
_CHAIN_RE = re.compile(rb'^\{"body":\{"chain":"([A-Za-z0-9._-]{1,32})"')
_SEQ_RE = re.compile(rb'"request_id":"[^"\\]*","seq":([0-9]{1,16}),"time":')


def _where(line: bytes) -> tuple[str, int] | None:
    c, n = _CHAIN_RE.match(line), _SEQ_RE.search(line)
    if c is None or n is None:
        return None
    return c.group(1).decode(), int(n.group(1))


class _ExportLookup:
    """Records of an export by chain and seq: records.jsonl (by offset) and references.

    One 8-byte offset per record: each chain's lines are contiguous in seq from the
    manifest's ``first_seq``, so the offsets are an array indexed by ``seq − first_seq``.
    A line out of that order is not indexed (the walk reports it)."""

    def __init__(
        self, path: Path, references: dict[tuple[str, int], bytes], first: dict[str, int]
    ) -> None:
        self.references = references
        self.first = first
        self.offsets: dict[str, array[int]] = {c: array("q") for c in first}
        self.f = open(path, "rb")  # noqa: SIM115 - closed in close()
        offset = 0
        for line in self.f:
            where = _where(line)
            if where is not None and where[0] in self.offsets:
                index = self.offsets[where[0]]
                if where[1] == first[where[0]] + len(index):
                    index.append(offset)
            offset += len(line)

    def __call__(self, chain: str, seq: int) -> bytes | None:
        index = self.offsets.get(chain)
        i = seq - self.first.get(chain, 0)
        if index is None or not 0 <= i < len(index):
            return self.references.get((chain, seq))
        self.f.seek(index[i])
        try:
            return parse_line(self.f.readline()).body
        except ValueError:
            return None

    def close(self) -> None:
        self.f.close()


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
    records_changed = False
    for name, meta in manifest["files"].items():
        path = out_dir / name
        if not path.is_file():
            raise ExportInvalid(f"{name} is missing")
        if _sha256_file(path) != meta["sha256"]:
            if name != "records.jsonl":
                raise ExportInvalid(f"{name} does not match its hash in the manifest")
            records_changed = True  # the walk below names the first record that changed
    references = _references(out_dir, manifest, ring)
    try:
        first = {c["chain"]: int(c["first_seq"]) for c in manifest["chains"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportInvalid(f"manifest chains are malformed: {exc!r}") from exc
    lookup = _ExportLookup(out_dir / "records.jsonl", references, first)
    archive = manifest.get("archive")
    try:
        try:
            count, closings, unchecked = _walk_export(out_dir, manifest, ring, lookup)
        except ExportInvalid as exc:
            if records_changed:
                raise ExportInvalid(
                    f"records.jsonl does not match its hash in the manifest; first bad record: "
                    f"{exc.message}"
                ) from exc
            raise
        if records_changed:
            raise ExportInvalid("records.jsonl does not match its hash in the manifest")
        if count != manifest["records"]:
            raise ExportInvalid(f"manifest says {manifest['records']} records, found {count}")
        if archive is not None:
            _check_archive(manifest, archive, lookup, unchecked)
    finally:
        lookup.close()
    return ExportCheck(
        count,
        len(manifest["chains"]),
        ring.ids(),
        time.perf_counter() - t0,
        closings,
        tuple(unchecked),
        m_rec.hash,
        archive,
    )


def _references(out_dir: Path, manifest: dict[str, Any], ring: KeyRing) -> dict[Any, bytes]:
    """references.jsonl by (chain, seq), each line's hash and signature checked."""
    out: dict[tuple[str, int], bytes] = {}
    if "references.jsonl" not in manifest["files"]:
        return out
    for lineno, line in enumerate(_lines(out_dir / "references.jsonl"), 1):
        try:
            rec = parse_line(line)
            body = parse_canonical(rec.body)
            ok = hashlib.sha256(rec.body).hexdigest() == rec.hash and ring.check_sig(
                body["key_id"], rec.body, rec.sig
            )
        except (ValueError, KeyError, TypeError, GatewayError) as exc:
            raise ExportInvalid(f"references.jsonl line {lineno}: {exc}") from exc
        if not ok:
            raise ExportInvalid(f"references.jsonl line {lineno}: hash or signature is wrong")
        out[(body["chain"], body["seq"])] = rec.body
    return out


def _walk_export(
    out_dir: Path, manifest: dict[str, Any], ring: KeyRing, lookup: _ExportLookup
) -> tuple[int, int, list[tuple[str, int, str]]]:
    """Every record line through the chain verifier and the journal rules."""
    expected = {c["chain"]: c for c in manifest["chains"]}
    verifiers: dict[str, ChainVerifier] = {}
    checkers: dict[str, JournalChecker] = {}
    state = JournalState()
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
        checkers[c] = JournalChecker(
            c, lookup, state=state, start_seq=s["seq"], start_totals=s["totals"]
        )
    count = 0
    try:
        for lineno, line in enumerate(_lines(out_dir / "records.jsonl"), 1):
            try:
                rec = parse_line(line)
                chain = json.loads(rec.body)["chain"]
            except (ValueError, KeyError, TypeError) as exc:
                where = _where(line)
                at = f" (chain {where[0]!r} seq {where[1]})" if where else ""
                raise ExportInvalid(f"records.jsonl line {lineno}{at}: {exc}") from exc
            if chain not in verifiers:
                raise ExportInvalid(f"records.jsonl line {lineno}: chain {chain!r} not in manifest")
            v = verifiers[chain]
            checkers[chain].feed(v.feed(rec), rec.hash, v.head.time_ms)
            count += 1
        for c, entry in expected.items():
            verifiers[c].finish(entry["last_seq"], entry["head_hash"])
    except VerifyFailure as exc:
        raise ExportInvalid(str(exc)) from exc
    unchecked = [(c, seq, why) for c, j in checkers.items() for seq, why in j.unchecked]
    return count, sum(j.closings for j in checkers.values()), unchecked


def _check_archive(
    manifest: dict[str, Any],
    archive: dict[str, Any],
    lookup: _ExportLookup,
    unchecked: list[tuple[str, int, str]],
) -> None:
    """An archive holds exactly its closed period and the closings that cover it, all of
    them checked whole (docs/export-format.md, "Archives")."""
    try:
        chain = archive["chain"]
        closing = archive["closing"]
        (entry,) = manifest["chains"]
        data = lookup(chain, closing["seq"])
        body = parse_canonical(data) if data is not None else None
    except (KeyError, TypeError, ValueError, GatewayError) as exc:
        raise ExportInvalid(f"archive section of the manifest is malformed: {exc!r}") from exc
    if entry["chain"] != chain or body is None:
        raise ExportInvalid(f"the archive does not hold {chain} seq {closing['seq']}")
    if (
        hashlib.sha256(data or b"").hexdigest() != closing["hash"]
        or body["type"] != closing["type"]
        or body["number"] != closing["number"]
    ):
        raise ExportInvalid(f"{chain} seq {closing['seq']} is not the archived closing")
    period = body["payload"]["period"]
    if archive.get("period") != period:
        raise ExportInvalid("the archive's period is not its closing's")
    if (entry["first_seq"], entry["last_seq"]) != (period["from_seq"], closing["seq"]):
        raise ExportInvalid(
            f"an archive holds seq {period['from_seq']}..{closing['seq']}, this one "
            f"{entry['first_seq']}..{entry['last_seq']}"
        )
    if unchecked:
        c, seq, why = unchecked[0]
        raise ExportInvalid(f"closing {c} seq {seq} of the archive cannot be checked: {why}")


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from f


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
