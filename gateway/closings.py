"""Closings in the daemon: made in the writer, on request (``close``), on schedule, at start-up.

A closing's period and sums are computed by its entry's ``prepare`` hook, inside the ledger
writer's transaction (:class:`gateway.ledger.WriterView`), so they are exactly the journal at
the moment the closing is signed — no record can slip between the sums and the signature.
The arithmetic is :mod:`gateway.core.closing`; this module reads what it needs:

- a closing's previous closing of its type, and the closings a monthly/yearly one sums, by
  the claim ``closing:<chain>:<type>:<number>`` every closing takes (unique, and an index);
- a daily period's records (``from_seq..to_seq``) and, for a correction, the record it
  corrects.

Period ends: a **requested** closing (``close`` op) closes the open period at its own time;
``MONTHLY`` first makes the ``DAILY`` closing, ``YEARLY`` the ``DAILY`` and ``MONTHLY`` ones,
all in one atomic write. A **scheduled** closing ends its period at a boundary of
:class:`gateway.core.closing.Schedule` (records at or before it are in). :class:`Scheduler`
makes them when due, and at start-up makes those a stopped box missed, each with its true
period (:meth:`Scheduler.catch_up`, before the POS is served). A scheduled closing whose
boundary a requested one already covered is refused (``CONFLICT``) and skipped.

What this module leaves to others: validating the request (gateway.core.ops), replying
(gateway.dispatch), archives (gateway.archive).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from gateway.core.chain import record_time_ms, zero_totals
from gateway.core.closing import (
    CORRECTION,
    DAILY,
    KINDS,
    LOWER,
    MONTHLY,
    YEARLY,
    Due,
    Period,
    PeriodSums,
    Schedule,
    claim_key,
    closing_payload,
    contribution,
    due_closings,
    previous_ref,
    summed_closing,
)
from gateway.core.errors import Conflict, GatewayError, IntegrityError
from gateway.core.ops import CloseRequest
from gateway.core.record import Record, format_time, parse_time
from gateway.core.request import request_fingerprint
from gateway.ledger import Entry, Ledger, Signed, WriterView
from gateway.reads import ReadPool
from gateway.store import Reader
from gateway.wakeups import wait_event

log = logging.getLogger("gateway.closings")

CLIENT = "gateway"
#: Scheduled closings written per ledger call (a long catch-up goes in several).
CHUNK = 200
#: Longest sleep of the schedule loop: a clock that jumps is noticed within this.
MAX_SLEEP_S = 30.0


# ---------------------------------------------------------------------- in the writer


def _last(view: WriterView, chain: str, kind: str) -> Record | None:
    """The chain's last closing of ``kind`` (uncommitted ones of this group included)."""
    prefix = f"closing:{chain}:{kind}:"
    rows = view.query(
        "SELECT seq FROM claims WHERE key > ? AND key < ? ORDER BY key DESC LIMIT 1",
        (prefix, prefix + "~"),
    )
    if not rows:
        return None
    rec = view.record(chain, int(rows[0][0]))
    if rec is None or rec.type != kind:
        raise IntegrityError(f"claim of {kind} in {chain} points at no such closing")
    return rec


def prepare_closing(
    kind: str, chain: str, boundary_ms: int | None, view: WriterView
) -> dict[str, Any]:
    """The payload of the next ``kind`` closing of ``chain``: its period ends at
    ``boundary_ms`` (scheduled) or now (None: requested). CONFLICT if that period is closed."""
    head = view.head(chain)
    prev = _last(view, chain, kind)
    previous = previous_ref(prev.seq, prev.hash) if prev is not None else None
    if kind == DAILY:
        payload = _daily(chain, boundary_ms, view, prev, previous)
    else:
        payload = _summing(kind, chain, boundary_ms, view, prev, previous)
    view.claim(claim_key(chain, kind, head.counters.get(kind, 0) + 1))
    return payload


def _daily(
    chain: str,
    boundary_ms: int | None,
    view: WriterView,
    prev: Record | None,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    head = view.head(chain)
    now_ms = record_time_ms(head, view.now_ms)
    if prev is not None:
        from_seq = prev.payload["period"]["to_seq"] + 1
        from_ms = parse_time(prev.payload["period"]["to_time"])
    else:
        first = view.record(chain, 1) if head.seq else None
        from_seq, from_ms = 1, parse_time(first.time) if first is not None else now_ms
    if boundary_ms is None:
        to_seq, to_ms = head.seq, now_ms
    else:
        if boundary_ms <= from_ms:
            raise Conflict(f"{chain}: the daily period up to {format_time(boundary_ms)} is closed")
        rows = view.query(
            "SELECT max(seq) FROM records WHERE chain = ? AND seq >= ? AND time <= ?",
            (chain, from_seq, format_time(boundary_ms)),
        )
        found = rows[0][0] if rows else None
        to_seq, to_ms = (int(found) if found is not None else from_seq - 1), boundary_ms
    sums = PeriodSums()
    if to_seq >= from_seq:
        for (data,) in view.query(
            "SELECT body FROM records WHERE chain = ? AND seq >= ? AND seq <= ? ORDER BY seq",
            (chain, from_seq, to_seq),
        ):
            body = json.loads(bytes(data))
            original = None
            if body["type"] == CORRECTION:
                ref = body["payload"]["ref"]
                orig = view.record(ref["chain"], ref["seq"])
                if orig is None:
                    raise IntegrityError(f"{chain} seq {body['seq']} corrects a missing record")
                original = orig.body()
            sums.add(contribution(body, original))
    if to_seq >= 1:
        last = view.record(chain, to_seq)
        if last is None:
            raise IntegrityError(f"{chain}: record {to_seq} is missing")
        grand_total: dict[str, Any] = last.totals
    else:
        grand_total = zero_totals()
    return closing_payload(
        DAILY,
        period=Period(from_seq, to_seq, from_ms, to_ms),
        sums=sums,
        grand_total=grand_total,
        previous=previous,
    )


def _summing(
    kind: str,
    chain: str,
    boundary_ms: int | None,
    view: WriterView,
    prev: Record | None,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    lower = LOWER[kind]
    closed_ms = parse_time(prev.payload["period"]["to_time"]) if prev is not None else None
    if boundary_ms is not None and closed_ms is not None and closed_ms >= boundary_ms:
        raise Conflict(f"{chain}: the {kind} period up to {format_time(boundary_ms)} is closed")
    first = prev.payload["closings"]["to_number"] + 1 if prev is not None else 1
    last = view.head(chain).counters.get(lower, 0)
    if last < first:
        raise Conflict(f"{chain}: no {lower} closing since the last {kind}")
    rows = view.query(
        "SELECT seq FROM claims WHERE key >= ? AND key <= ? ORDER BY key",
        (claim_key(chain, lower, first), claim_key(chain, lower, last)),
    )
    payloads = []
    for (seq,) in rows:
        rec = view.record(chain, int(seq))
        if rec is None or rec.type != lower:
            raise IntegrityError(f"claim of {lower} in {chain} points at no such closing")
        payloads.append(rec.payload)
    if len(payloads) != last - first + 1:
        raise IntegrityError(f"{chain}: {lower} closings {first}..{last} are not all claimed")
    if boundary_ms is not None and parse_time(payloads[-1]["period"]["to_time"]) < boundary_ms:
        raise Conflict(f"{chain}: the {lower} closing at {format_time(boundary_ms)} is missing")
    return summed_closing(kind, payloads, first_number=first, previous=previous)


# ---------------------------------------------------------------------- entries


def requested_entries(req: CloseRequest, *, print_job: bool) -> list[Entry]:
    """The closings one ``close`` request makes (lower ones first), to submit atomically."""
    kinds = KINDS[: KINDS.index(req.kind) + 1]
    fingerprint = request_fingerprint(
        {"id": req.request_id, "op": "close", "till": req.till, "period": req.period}
    )
    out = []
    for kind in kinds:
        own = kind == req.kind
        rid = req.request_id if own else f"{req.request_id}#{kind.split('::')[1].lower()}"
        out.append(
            Entry(
                req.till,
                req.till,
                rid,
                fingerprint,
                kind,
                prepare=partial(prepare_closing, kind, req.till, None),
                print_job=print_job and own,
            )
        )
    return out


def scheduled_entry(chain: str, due: Due) -> Entry:
    """The entry of a scheduled closing (its request id makes it once per boundary)."""
    rid = f"closing:{chain}:{due.kind}:{format_time(due.boundary_ms)}"
    return Entry(
        chain,
        CLIENT,
        rid,
        rid,
        due.kind,
        prepare=partial(prepare_closing, due.kind, chain, due.boundary_ms),
    )


# ---------------------------------------------------------------------- the schedule


def _chain_ends(r: Reader, chain: str) -> tuple[int | None, dict[str, int | None]]:
    """The chain's first record time and each closing type's last period end."""
    row = r.conn.execute(
        "SELECT time FROM records WHERE chain = ? AND seq = 1", (chain,)
    ).fetchone()
    start = parse_time(row[0]) if row is not None else None
    ends: dict[str, int | None] = {}
    for kind in KINDS:
        prefix = f"closing:{chain}:{kind}:"
        found = r.conn.execute(
            "SELECT seq FROM claims WHERE key > ? AND key < ? ORDER BY key DESC LIMIT 1",
            (prefix, prefix + "~"),
        ).fetchone()
        ends[kind] = None
        if found is not None:
            stored = r.record(chain, int(found[0]))
            if stored is not None:
                body = json.loads(stored.body)
                ends[kind] = parse_time(body["payload"]["period"]["to_time"])
    return start, ends


class Scheduler:
    """Makes the scheduled closings of every chain when they are due."""

    def __init__(
        self,
        ledger: Ledger,
        reads: ReadPool,
        schedule: Schedule,
        *,
        clock_ms: Callable[[], int],
        guard: Callable[[Entry], Entry] | None = None,
        on_closed: Callable[[list[Record]], Awaitable[None]] | None = None,
    ) -> None:
        self.ledger = ledger
        self.reads = reads
        self.schedule = schedule
        self.clock_ms = clock_ms
        self.guard = guard
        self.on_closed = on_closed
        self.made = 0
        self.wake = asyncio.Event()

    async def due(self) -> dict[str, list[Due]]:
        """Per chain, the scheduled closings due now."""
        now = self.clock_ms()
        chains = sorted(self.ledger.heads())
        out: dict[str, list[Due]] = {}
        for chain in chains:
            start, ends = await self.reads.run(partial(_chain_ends, chain=chain))
            if start is None:
                continue
            found = due_closings(self.schedule, now_ms=now, chain_start_ms=start, last_end_ms=ends)
            if found:
                out[chain] = found
        return out

    async def run_due(self) -> list[Record]:
        """Make every closing that is due now; return the records made."""
        if self.schedule.closing_time is None or self.ledger.halted is not None:
            return []
        made: list[Record] = []
        for chain, dues in (await self.due()).items():
            entries = [scheduled_entry(chain, d) for d in dues]
            if self.guard is not None:
                entries = [self.guard(e) for e in entries]
            for i in range(0, len(entries), CHUNK):
                made += await self._submit(entries[i : i + CHUNK])
        self.made += len(made)
        if made and self.on_closed is not None:
            await self.on_closed(made)
        return made

    async def _submit(self, entries: Sequence[Entry]) -> list[Record]:
        try:
            outcomes = await self.ledger.submit_many(entries, atomic=False)
        except GatewayError as exc:
            log.error("scheduled closings not made: %s", exc.message)
            return []
        made = []
        for e, o in zip(entries, outcomes, strict=True):
            if isinstance(o, Signed):
                if not o.replayed:
                    made.append(o.record)
                    log.info(
                        "%s closing of %s made (seq %d)",
                        e.record_type,
                        e.chain,
                        o.record.seq,
                        extra={"chain": e.chain, "seq": o.record.seq},
                    )
            elif isinstance(o, Conflict):
                log.info("scheduled %s of %s skipped: %s", e.record_type, e.chain, o.message)
            else:
                log.error("scheduled %s of %s failed: %s", e.record_type, e.chain, o.message)
        return made

    async def catch_up(self) -> list[Record]:
        """At start-up: the closings missed while the gateway was off, with their true
        periods (several rounds if a very long stop left more than one round's worth)."""
        made: list[Record] = []
        for _ in range(100):
            got = await self.run_due()
            made += got
            if not got:
                break
        return made

    async def run(self) -> None:
        """Until cancelled: sleep until the next boundary (or a wake-up), make what is due."""
        while True:
            now = self.clock_ms()
            nxt = self.schedule.next_boundary_ms(now)
            sleep_s = MAX_SLEEP_S if nxt is None else min(MAX_SLEEP_S, (nxt - now) / 1000 + 0.05)
            await wait_event(self.wake, max(0.05, sleep_s))
            self.wake.clear()
            try:
                await self.run_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("closing schedule run failed")


__all__ = [
    "MONTHLY",
    "YEARLY",
    "Scheduler",
    "prepare_closing",
    "requested_entries",
    "scheduled_entry",
]
