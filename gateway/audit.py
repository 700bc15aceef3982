"""Whole-database verification (``fiscal-gateway verify --db``).

Walks every chain from seq 1 with the core verifier, using the public keys stored in the
database, and checks each chain ends exactly at its committed head (so deleted tail records
are found too). The journal rules (closings, references: gateway.core.journal_rules) are
checked on the same walk, from the bodies the verifier accepted. Read-only: it opens its own
read-only connection and changes nothing.

Every signature is checked, but on a large database not in this process: the ECDSA checks
(about two thirds of the work) go, in chunks and in order, to worker processes on the other
cores while this process parses and checks the chain rules (docs/performance.md). The
report is the one a sequential walk gives, because of one property: when the walk stops at
a record, the signature checks it has handed out are exactly those a sequential walk would
have made before stopping there. So the first bad signature among them, if any, comes
first; otherwise the walk's own failure stands.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from drivers.signers.software import KeyRing
from gateway.core.journal_rules import JournalChecker, JournalState
from gateway.core.verify import ChainVerifier, CheckSig, VerifyFailure
from gateway.store import Head, Reader


@dataclass(slots=True)
class ChainReport:
    chain: str
    records: int
    head_seq: int
    failure: VerifyFailure | None = None
    closings: int = 0


@dataclass(slots=True)
class DbReport:
    chains: list[ChainReport] = field(default_factory=list)
    records: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.failure is None for c in self.chains)

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


log = logging.getLogger("gateway.audit")

#: Below this many records the worker processes cost more to start than they save.
PARALLEL_MIN_RECORDS = 20_000
#: Signatures per task handed to a worker.
CHUNK = 1000


def verify_db(path: Path, *, workers: int | None = None) -> DbReport:
    """Verify every chain of the database at ``path``.

    ``workers``: processes that check signatures; ``None`` picks one per CPU when the
    database is large enough (PARALLEL_MIN_RECORDS) and there is more than one CPU, ``0``
    checks them in this process.
    """
    t0 = time.perf_counter()
    report = DbReport()
    with Reader(path) as reader:
        # One read transaction for the whole walk: the daemon may be signing meanwhile, and
        # heads, keys and records must all come from the same committed state (WAL snapshot).
        reader.conn.execute("BEGIN")
        try:
            _verify_all(reader, workers, report)
        finally:
            reader.conn.execute("ROLLBACK")
    report.seconds = time.perf_counter() - t0
    return report


def _verify_all(reader: Reader, workers: int | None, report: DbReport) -> None:
    pems = list(reader.public_keys().values())
    ring = KeyRing(pems)
    heads = {h.chain: h for h in reader.heads()}
    if workers is None:
        cpus = os.cpu_count() or 1
        large = sum(h.seq for h in heads.values()) >= PARALLEL_MIN_RECORDS
        workers = cpus if cpus > 1 and large else 0
    pool: Executor | None = None
    if workers > 0:
        # spawn, not fork: the caller may be a threaded daemon
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(pems,),
        )
    journal = JournalState()  # references may cross chains
    try:
        for chain in reader.chains():
            head = heads.get(chain)
            cr = ChainReport(chain, 0, head.seq if head else 0)
            if pool is not None:
                try:
                    _walk_parallel(reader, chain, head, ring, pool, 2 * workers, cr, journal)
                except (BrokenProcessPool, OSError) as exc:
                    # no worker processes here (sandbox, limits): check in this process
                    log.warning("signature workers failed (%s); verifying in-process", exc)
                    pool.shutdown(cancel_futures=True)
                    pool = None
                    cr = ChainReport(chain, 0, head.seq if head else 0)
            if pool is None:
                _walk(reader, chain, head, ring.check_sig, cr, journal)
            report.records += cr.records
            report.chains.append(cr)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _lookup(reader: Reader) -> Callable[[str, int], bytes | None]:
    def lookup(chain: str, seq: int) -> bytes | None:
        rec = reader.record(chain, seq)
        return rec.body if rec is not None else None

    return lookup


def _walk(
    reader: Reader,
    chain: str,
    head: Head | None,
    check_sig: CheckSig,
    cr: ChainReport,
    journal: JournalState,
) -> None:
    v = ChainVerifier(chain, check_sig)
    j = JournalChecker(chain, _lookup(reader), state=journal)
    try:
        for rec in reader.iter_records(chain):
            j.feed(v.feed(rec), rec.hash, v.head.time_ms)
        if head is None:
            raise VerifyFailure(chain, 1, "TRUNCATED", "chain has no committed head")
        v.finish(head.seq, head.hash)
    except VerifyFailure as exc:
        cr.failure = exc
    cr.records = v.count
    cr.closings = j.closings


def _walk_parallel(
    reader: Reader,
    chain: str,
    head: Head | None,
    ring: KeyRing,
    pool: Executor,
    max_in_flight: int,
    cr: ChainReport,
    journal: JournalState,
) -> None:
    sigs = _DeferredSignatures(ring, pool, max_in_flight)
    try:
        _walk(reader, chain, head, sigs.check_sig, cr, journal)
    except _BadSignatureSeen:
        pass  # reported below
    bad = sigs.first_bad()
    if bad is not None:
        # the k-th check handed out belongs to seq k+1 (the walk starts at seq 1 and a
        # record reaches its signature check only once its seq is the expected one)
        cr.failure = VerifyFailure(chain, bad + 1, "BAD_SIGNATURE", "signature does not verify")
        cr.records = bad


class _BadSignatureSeen(Exception):
    """A worker found a bad signature: the rest of the walk cannot change the report."""


class _DeferredSignatures:
    """A ``check_sig`` that answers True at once and has the check done by the pool.

    An unknown key is still refused at once (UNKNOWN_KEY, from the walk itself).
    """

    def __init__(self, ring: KeyRing, pool: Executor, max_in_flight: int) -> None:
        self.ring = ring
        self.pool = pool
        self.max_in_flight = max_in_flight
        self.pending: list[tuple[str, bytes, str]] = []
        self.in_flight: deque[tuple[int, Future[int | None]]] = deque()
        self.handed_out = 0  # index of the first pending check
        self.bad: int | None = None

    def check_sig(self, key_id: str, data: bytes, sig_b64: str) -> bool:
        if key_id not in self.ring:
            raise KeyError(key_id)
        if self.bad is not None:
            raise _BadSignatureSeen
        self.pending.append((key_id, data, sig_b64))
        if len(self.pending) >= CHUNK:
            self._hand_out()
            while len(self.in_flight) > self.max_in_flight:
                self._collect_oldest()
        return True

    def first_bad(self) -> int | None:
        """Index of the first check that failed (after waiting for all of them)."""
        self._hand_out()
        while self.in_flight and self.bad is None:
            self._collect_oldest()
        return self.bad

    def _hand_out(self) -> None:
        if self.pending:
            fut = self.pool.submit(_first_bad, self.pending)
            self.in_flight.append((self.handed_out, fut))
            self.handed_out += len(self.pending)
            self.pending = []

    def _collect_oldest(self) -> None:
        base, fut = self.in_flight.popleft()
        bad = fut.result()
        if bad is not None and self.bad is None:
            self.bad = base + bad


_worker_ring: KeyRing | None = None


def _init_worker(pems: list[str]) -> None:
    global _worker_ring
    _worker_ring = KeyRing(pems)


def _first_bad(items: list[tuple[str, bytes, str]]) -> int | None:
    """In a worker: index of the first signature that does not verify, or None."""
    assert _worker_ring is not None
    check = _worker_ring.check_sig
    for i, (key_id, data, sig_b64) in enumerate(items):
        if not check(key_id, data, sig_b64):
            return i
    return None
