"""Archives: a signed, self-contained copy of one closed period, recorded in its own chain.

An archive is the export of one chain (docs/export-format.md) from the first record of a
monthly or yearly closing's period up to that closing, so it holds the period's records and
every closing that covers them, plus ``references.jsonl`` (the previous closings and any sale
a record of the period refers to outside it) and an ``archive`` section in the signed
manifest naming the closing. :func:`gateway.export.verify_export` checks all of it, every
closing total included. A period spans at most 366 days: a longer closing (a first fiscal
year of more than twelve months, a yearly closing made after the box was off for over a year)
is not archived as one — it is reported as skipped, and the monthly archives cover its records.

Once written and checked, the archive is recorded in the chain by an ``EXPORT::RECORDS``
record holding the manifest's hash — the manifest lists the SHA-256 of every file — so a
later change to any archive file, or a replaced archive, shows against the journal
(``fiscal-gateway verify-export DIR --db DB``). The record claims
``archive:<chain>:<type>:<number>``: each closing is archived once. Archives go to
``<root>/<chain>/<TYPE>-<number>/``; a half-written one (a crash) is made again.

The daemon archives each closed period of ``journal.archive_period`` right after its closing
(:class:`Archiver`); ``POST /v1/admin/archive`` asks the running daemon for the archives of
either period type (gateway.admin), and ``fiscal-gateway archive`` does the same by hand —
itself with the daemon stopped, through that endpoint while it runs. Every archive run of a
daemon shares one lock, so two runs never write the same directory at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.closing import KINDS, MONTHLY, YEARLY
from gateway.core.errors import Conflict, Detail, GatewayError, StorageError
from gateway.core.record import Record, parse_time
from gateway.export import ExportInvalid, export, verify_export
from gateway.ledger import Entry, Ledger, Signed, Signer
from gateway.reads import ReadPool
from gateway.store import Reader

log = logging.getLogger("gateway.archive")

EXPORT = "EXPORT::RECORDS"
CLIENT = "gateway"
PERIODS = {"MONTHLY": MONTHLY, "YEARLY": YEARLY}
MAX_SPAN_MS = 366 * 86_400_000


def archive_claim(chain: str, kind: str, number: int) -> str:
    return f"archive:{chain}:{kind}:{number:010d}"


@dataclass(frozen=True, slots=True)
class Target:
    """A closing to archive."""

    chain: str
    kind: str
    number: int
    seq: int
    hash: str
    period: dict[str, Any]

    @property
    def name(self) -> str:
        """The archive's directory, relative to the archive root."""
        return f"{self.chain}/{self.kind.split('::')[1]}-{self.number:06d}"

    def closing(self) -> dict[str, Any]:
        return {"type": self.kind, "number": self.number, "seq": self.seq, "hash": self.hash}

    def too_long(self) -> str | None:
        """Why this closing cannot be archived as one (its period is over 366 days), or None."""
        span = parse_time(self.period["to_time"]) - parse_time(self.period["from_time"])
        if span <= MAX_SPAN_MS:
            return None
        return (
            f"{self.chain} {self.kind} {self.number} spans {span // 86_400_000} days; an archive "
            "holds at most 366: the MONTHLY archives cover its records "
            "(fiscal-gateway archive --period MONTHLY)"
        )


def pending(r: Reader, kind: str, chain: str | None = None) -> list[Target]:
    """Closings of ``kind`` not archived yet (by chain, then number)."""
    if kind not in KINDS:
        raise ValueError(f"not a closing type: {kind}")
    chains = [chain] if chain is not None else [h.chain for h in r.heads()]
    out = []
    for c in chains:
        prefix = f"closing:{c}:{kind}:"
        done = {
            key.rsplit(":", 1)[1]
            for (key,) in r.conn.execute(
                "SELECT key FROM claims WHERE key > ? AND key < ?",
                (f"archive:{c}:{kind}:", f"archive:{c}:{kind}:~"),
            )
        }
        for key, seq in r.conn.execute(
            "SELECT key, seq FROM claims WHERE key > ? AND key < ? ORDER BY key",
            (prefix, prefix + "~"),
        ).fetchall():
            number = key.rsplit(":", 1)[1]
            if number in done:
                continue
            stored = r.record(c, seq)
            if stored is None:
                raise StorageError(f"{c}: closing claim {key} points at no record")
            body = json.loads(stored.body)
            out.append(Target(c, kind, int(number), seq, stored.hash, body["payload"]["period"]))
    return out


@dataclass(frozen=True, slots=True)
class ArchiveRun:
    """What one archive run did: the ``EXPORT::RECORDS`` records made, the closings whose
    archive failed (with why; a retry may work), and those skipped because their period is too
    long for one archive (with why; :meth:`Target.too_long`, never made)."""

    root: Path
    made: list[Record]
    failed: list[tuple[Target, str]]
    skipped: list[tuple[Target, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Written:
    target: Target
    path: Path
    manifest_hash: str
    records: int
    references: int


def write_archive(db: Path, root: Path, signer: Signer, target: Target, now_ms: int) -> Written:
    """Write and check the archive of ``target`` (blocking: run it in a thread)."""
    why = target.too_long()
    if why is not None:
        raise Conflict(why, [Detail("period", why, "PERIOD_TOO_LONG")])
    out = root / target.name
    if (out / "manifest.json").exists():
        try:
            check = verify_export(out)
            if check.archive is not None and check.archive.get("closing") == target.closing():
                return Written(target, out, check.manifest_hash, check.records, 0)
        except ExportInvalid as exc:
            log.warning("archive %s is not valid (%s); making it again", out, exc.message)
    if out.exists():
        aside = out.with_name(f"{out.name}.replaced-{now_ms}")
        shutil.move(out, aside)
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    summary = export(
        db,
        out,
        signer,
        chain=target.chain,
        from_seq=target.period["from_seq"],
        to_seq=target.seq,
        now_ms=now_ms,
        archive={"chain": target.chain, "closing": target.closing(), "period": target.period},
    )
    check = verify_export(out)  # what an auditor will run: it must pass before we record it
    return Written(target, out, check.manifest_hash, summary.records, summary.references)


def export_entry(w: Written) -> Entry:
    """The ``EXPORT::RECORDS`` record of an archive (claims the closing's archive key)."""
    t = w.target
    claim = archive_claim(t.chain, t.kind, t.number)
    payload = {
        "archive": t.name,
        "manifest_hash": w.manifest_hash,
        "closing": t.closing(),
        "period": t.period,
        "records": w.records,
    }
    return Entry(t.chain, CLIENT, claim, claim, EXPORT, payload, claims=(claim,))


class Archiver:
    """Archives every closing of one type that has no archive yet."""

    def __init__(
        self,
        ledger: Ledger,
        reads: ReadPool,
        root: Path,
        kind: str,
        *,
        clock_ms: Callable[[], int],
        guard: Callable[[Entry], Entry] | None = None,
        lock: asyncio.Lock | None = None,
    ) -> None:
        self.ledger = ledger
        self.reads = reads
        self.root = root
        self.kind = kind
        self.clock_ms = clock_ms
        self.guard = guard
        self.lock = lock if lock is not None else asyncio.Lock()

    async def run_due(self, chain: str | None = None) -> list[Record]:
        """Archive every closing not archived yet; the records made (failures are logged)."""
        return (await self.run(chain)).made

    async def run(self, chain: str | None = None) -> ArchiveRun:
        """Archive every closing of ``chain`` (None: of every chain) not archived yet."""
        async with self.lock:
            return await self._run(chain)

    async def _run(self, chain: str | None) -> ArchiveRun:
        if self.ledger.halted is not None:
            return ArchiveRun(self.root, [], [])
        targets = await self.reads.run(lambda r: pending(r, self.kind, chain))
        made: list[Record] = []
        failed: list[tuple[Target, str]] = []
        skipped: list[tuple[Target, str]] = []
        for t in targets:
            why = t.too_long()
            if why is not None:
                log.warning("archive of %s %s %d skipped: %s", t.chain, t.kind, t.number, why)
                skipped.append((t, why))
                continue
            try:
                w = await asyncio.to_thread(
                    write_archive,
                    self.ledger.path,
                    self.root,
                    self.ledger.signer,
                    t,
                    self.clock_ms(),
                )
            except (GatewayError, OSError) as exc:
                msg = exc.message if isinstance(exc, GatewayError) else str(exc)
                log.error("archive of %s %s %d failed: %s", t.chain, t.kind, t.number, msg)
                failed.append((t, msg))
                continue
            entry = export_entry(w)
            try:
                signed: Signed = await self.ledger.submit(
                    self.guard(entry) if self.guard is not None else entry
                )
            except GatewayError as exc:
                log.error("archive %s made but not recorded: %s", w.path, exc.message)
                failed.append((t, f"made but not recorded: {exc.message}"))
                continue
            log.info(
                "archive %s: %d records, manifest %s, recorded as %s seq %d",
                w.path,
                w.records,
                w.manifest_hash[:16],
                signed.record.chain,
                signed.record.seq,
            )
            made.append(signed.record)
        return ArchiveRun(self.root, made, failed, skipped)


def find_recorded(r: Reader, chain: str, manifest_hash: str) -> dict[str, Any] | None:
    """The ``EXPORT::RECORDS`` body of ``chain`` that records ``manifest_hash`` (or None)."""
    rows = r.conn.execute(
        "SELECT seq FROM claims WHERE key > ? AND key < ?",
        (f"archive:{chain}:", f"archive:{chain}:~"),
    ).fetchall()
    for (seq,) in rows:
        stored = r.record(chain, seq)
        if stored is None:
            continue
        body: dict[str, Any] = json.loads(stored.body)
        if body["payload"].get("manifest_hash") == manifest_hash:
            return body
    return None


__all__ = ["ArchiveRun", "Archiver", "find_recorded", "pending", "write_archive"]
