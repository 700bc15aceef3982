"""Whole-database verification (``fiscal-gateway verify --db``).

Walks every chain from seq 1 with the core verifier, using the public keys stored in the
database, and checks each chain ends exactly at its committed head (so deleted tail records
are found too). Read-only: it opens its own read-only connection and changes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from drivers.signers.software import KeyRing
from gateway.core.verify import ChainVerifier, VerifyFailure
from gateway.store import Reader


@dataclass(slots=True)
class ChainReport:
    chain: str
    records: int
    head_seq: int
    failure: VerifyFailure | None = None


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


def verify_db(path: Path) -> DbReport:
    t0 = time.perf_counter()
    report = DbReport()
    with Reader(path) as reader:
        ring = KeyRing(reader.public_keys().values())
        heads = {h.chain: h for h in reader.heads()}
        for chain in reader.chains():
            v = ChainVerifier(chain, ring.check_sig)
            head = heads.get(chain)
            cr = ChainReport(chain, 0, head.seq if head else 0)
            try:
                for rec in reader.iter_records(chain):
                    v.feed(rec)
                if head is None:
                    raise VerifyFailure(chain, 1, "TRUNCATED", "chain has no committed head")
                v.finish(head.seq, head.hash)
            except VerifyFailure as exc:
                cr.failure = exc
            cr.records = v.count
            report.records += v.count
            report.chains.append(cr)
    report.seconds = time.perf_counter() - t0
    return report
