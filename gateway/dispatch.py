"""The one dispatcher behind every transport (Unix socket, TCP, HTTP, later MQTT).

``await Dispatcher.handle(unverified)`` takes one decoded request and always returns one
reply dict — ``{"id", "ok": true, ...}`` or ``{"id", "ok": false, "error": {...}}`` — and
never raises: bad input is answered and changes nothing, unexpected errors are logged and
answered ``INTERNAL_ERROR``. Transports only frame bytes; meaning lives here.

Operations (docs/protocol.md): ``sign``, ``cancel``, ``correction``, ``reprint``,
``close`` (closings: gateway.closings), ``batch`` (seed BigLedger semantics:
continueOnError, validateOnly, rollbackOnError, async), ``job`` and ``status``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from gateway.closings import requested_entries
from gateway.core.documents import (
    cancellation_payload,
    claim_key,
    correction_payload,
    duplicate_payload,
)
from gateway.core.errors import (
    Conflict,
    GatewayError,
    NotFound,
    UnknownTill,
    ValidationError,
)
from gateway.core.ops import (
    BatchOperation,
    BatchRequest,
    CancelRequest,
    CorrectionRequest,
    ReprintRequest,
    op_of,
    validate_batch,
    validate_cancel,
    validate_close,
    validate_correction,
    validate_job,
    validate_reprint,
    validate_status,
)
from gateway.core.record import Record, format_time, hash_b64
from gateway.core.request import Rules, request_fingerprint, validate_sale
from gateway.jobs import Job, JobRegistry
from gateway.ledger import Entry, Ledger, Outcome, Signed, Skipped, WriterView

if TYPE_CHECKING:
    from gateway.core.offline_budget import Budget

log = logging.getLogger("gateway.dispatch")

#: Async batches are processed in chunks this size so progress can be reported.
ASYNC_CHUNK = 50

HTTP_STATUS = {
    "VALIDATION_ERROR": 400,
    "PROTOCOL_ERROR": 400,
    "LINE_TOO_LONG": 413,
    "UNKNOWN_TILL": 403,
    "NOT_FOUND": 404,
    "IDEMPOTENCY_MISMATCH": 409,
    "CONFLICT": 409,
    "SIGNING_HALTED": 503,
    "STORAGE_ERROR": 503,
    "INTEGRITY_ERROR": 503,
    "INTERNAL_ERROR": 500,
    "OFFLINE_LIMIT_REACHED": 503,
}

SHORT_TYPES = {
    "TRANSACTION::RECEIPT": "R",
    "TRANSACTION::INVOICE": "F",
    "TRANSACTION::CANCELLATION": "A",
    "TRANSACTION::CORRECTION": "C",
    "INTENTION::DUPLICATE": "D",
    "CLOSING::DAILY": "ZD",
    "CLOSING::MONTHLY": "ZM",
    "CLOSING::YEARLY": "ZY",
}


def receipt_data(record: Record) -> dict[str, Any]:
    """What the POS prints: document number and the QR payload (docs/protocol.md)."""
    short = SHORT_TYPES.get(record.type, "X")
    number = f"{record.chain}-{short}-{record.number:08d}"
    total = record.payload.get("total", 0)
    currency = record.payload.get("currency", "")
    qr = "|".join(
        [
            "FG1",
            record.chain,
            str(record.seq),
            short,
            str(record.number),
            record.time,
            str(total),
            currency,
            record.key_id,
            hash_b64(record.hash),
            record.sig,
        ]
    )
    return {"number": number, "qr": qr, "signature_extract": record.sig[:8]}


def error_reply(request_id: Any, exc: GatewayError) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": exc.to_json()}


def record_reply(request_id: Any, signed: Signed) -> dict[str, Any]:
    return {
        "id": request_id,
        "ok": True,
        "record": signed.record.to_json(),
        "replayed": signed.replayed,
        "receipt": receipt_data(signed.record),
    }


def _request_id_of(unverified: Any) -> Any:
    if isinstance(unverified, dict):
        rid = unverified.get("id")
        if isinstance(rid, str) and len(rid) <= 64:
            return rid
    return None


def _prepare_cancel(req: CancelRequest, view: WriterView) -> dict[str, Any]:
    orig = view.record(req.ref.chain, req.ref.seq)
    return cancellation_payload(
        orig.body() if orig else None, orig.hash if orig else "", req.reason
    )


def _prepare_correction(req: CorrectionRequest, view: WriterView) -> dict[str, Any]:
    orig = view.record(req.ref.chain, req.ref.seq)
    return correction_payload(
        orig.body() if orig else None,
        orig.hash if orig else "",
        req.reason,
        req.corrected.payload(),
    )


def _prepare_reprint(req: ReprintRequest, view: WriterView) -> dict[str, Any]:
    orig = view.record(req.ref.chain, req.ref.seq)
    prefix = f"duplicate:{req.ref.chain}:{req.ref.seq}:"
    (n,) = view.query(
        "SELECT count(*) FROM claims WHERE key >= ? AND key < ?", (prefix, prefix + "~")
    )[0]
    copy = int(n) + 1
    payload = duplicate_payload(
        orig.body() if orig else None, orig.hash if orig else "", copy, req.reason
    )
    view.claim(f"{prefix}{copy:08d}")
    return payload


class OfflineHooks(Protocol):
    """What the sync engine adds to signing (gateway.sync.SyncEngine; docs/sync.md)."""

    def guard(self, entry: Entry) -> Entry:
        """The entry, refused in the writer when its chain's offline budget is spent."""

    def signed(self, records: list[Record]) -> None:
        """Records were signed: wake the uplinks."""

    async def budget(self, chain: str) -> Budget | None:
        """The chain's offline budget now (None: no cloud uplink configured)."""


class Dispatcher:
    def __init__(
        self,
        ledger: Ledger,
        *,
        rules: Rules,
        allowed_tills: tuple[str, ...] = (),
        max_batch_operations: int = 500,
        print_documents: bool = True,
        status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        spawn: Callable[[Coroutine[Any, Any, None]], Any] | None = None,
        lookup: Callable[[str, int], Awaitable[tuple[str, bool] | None]] | None = None,
        offline: OfflineHooks | None = None,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.ledger = ledger
        self.rules = rules
        self.allowed_tills = frozenset(allowed_tills)
        self.max_batch_operations = max_batch_operations
        self.print_documents = print_documents
        self._status = status
        self._spawn = spawn
        self._lookup = lookup
        self.offline = offline
        self.clock_ms = clock_ms
        self.jobs = JobRegistry()

    # ------------------------------------------------------------------ entry point

    async def handle(self, unverified: Any) -> dict[str, Any]:
        rid = _request_id_of(unverified)
        try:
            op = op_of(unverified)
            if op == "status":
                validate_status(unverified)
                return {"id": rid, "ok": True, "status": await self.status()}
            if op == "job":
                job = self.jobs.get(validate_job(unverified))
                return {"id": rid, "ok": True, "job": job.to_json()}
            if op == "batch":
                return await self._batch(unverified)
            if op == "close":
                return await self._close(unverified)
            entry = self.entry(op, unverified)
            signed = await self.ledger.submit(entry)
            # debug: the journal itself is the record of every sale; at info level this line
            # would cost a JSON log write per sale. Refusals and errors stay at info.
            log.debug(
                "%s %s",
                op,
                "replayed" if signed.replayed else "signed",
                extra={
                    "request_id": entry.request_id,
                    "till": entry.client,
                    "chain": signed.record.chain,
                    "seq": signed.record.seq,
                },
            )
            reply = record_reply(rid, signed)
            if self.offline is not None:
                self.offline.signed([signed.record])
                budget = await self.offline.budget(signed.record.chain)
                if budget is not None:
                    reply["offline_budget"] = budget.to_json()
            return reply
        except GatewayError as exc:
            log.info("request refused: %s", exc.code, extra={"request_id": rid, "code": exc.code})
            return error_reply(rid, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("internal error handling a request", extra={"request_id": rid})
            return error_reply(rid, GatewayError("internal error; nothing was signed"))

    async def status(self) -> dict[str, Any]:
        if self._status is None:
            return {}
        return await self._status()

    # ------------------------------------------------------------------ single operations

    def _check_till(self, till: str) -> None:
        if self.allowed_tills and till not in self.allowed_tills:
            raise UnknownTill(f"till {till!r} is not configured on this gateway")

    def entry(self, op: str, req: dict[str, Any], *, request_id: str | None = None) -> Entry:
        """Validate one sign/cancel/correction/reprint request into a ledger Entry."""
        prepare: Callable[[WriterView], dict[str, Any]] | None = None
        payload: dict[str, Any] | None = None
        claims: tuple[str, ...] = ()
        if op == "sign":
            sale = validate_sale(req, self.rules)
            till, rid, rtype, payload = sale.till, sale.request_id, sale.record_type, sale.payload()
        elif op == "cancel":
            c = validate_cancel(req)
            till, rid, rtype = c.till, c.request_id, "TRANSACTION::CANCELLATION"
            prepare = partial(_prepare_cancel, c)
            claims = (claim_key(c.ref.chain, c.ref.seq),)
        elif op == "correction":
            k = validate_correction(req, self.rules)
            till, rid, rtype = k.till, k.request_id, "TRANSACTION::CORRECTION"
            prepare = partial(_prepare_correction, k)
            claims = (claim_key(k.ref.chain, k.ref.seq),)
        elif op == "reprint":
            r = validate_reprint(req)
            till, rid, rtype = r.till, r.request_id, "INTENTION::DUPLICATE"
            prepare = partial(_prepare_reprint, r)
        else:
            raise ValidationError(f"op {op!r} is not a record operation")
        self._check_till(till)
        rid = request_id or rid
        fingerprint = request_fingerprint({**req, "id": rid})
        entry = Entry(
            till,
            till,
            rid,
            fingerprint,
            rtype,
            payload,
            prepare,
            print_job=self.print_documents,
            claims=claims,
        )
        return entry if self.offline is None else self.offline.guard(entry)

    # ------------------------------------------------------------------ closings

    async def _close(self, unverified: Any) -> dict[str, Any]:
        """``close``: the closing asked for, after the lower ones it needs (one atomic write);
        the reply is the usual record reply plus ``closings`` (every closing made, lower
        first)."""
        req = validate_close(unverified)
        self._check_till(req.till)
        entries = requested_entries(req, print_job=self.print_documents)
        if self.offline is not None:
            entries = [self.offline.guard(e) for e in entries]
        outcomes = await self.ledger.submit_many(entries, atomic=True)
        signed = []
        for o in outcomes:
            if isinstance(o, GatewayError):
                raise o
            signed.append(o)
        last = signed[-1]
        log.info(
            "close %s",
            "replayed" if last.replayed else "signed",
            extra={"request_id": req.request_id, "till": req.till, "seq": last.record.seq},
        )
        if self.offline is not None:
            self.offline.signed([s.record for s in signed if not s.replayed])
        reply = record_reply(req.request_id, last)
        reply["closings"] = [s.record.to_json() for s in signed]
        return reply

    # ------------------------------------------------------------------ batch

    async def _batch(self, unverified: Any) -> dict[str, Any]:
        batch = validate_batch(unverified, max_operations=self.max_batch_operations)
        self._check_till(batch.till)
        if batch.run_async and not batch.validate_only:
            key = (batch.till, batch.request_id)
            job = self.jobs.find(key)
            if job is None:
                job = self.jobs.create(key, len(batch.operations))
                if self._spawn is None:
                    raise GatewayError("async batches are not available")
                self._spawn(self._run_job(job, batch))
            return {
                "id": batch.request_id,
                "ok": True,
                "job": {**job.to_json(), "progressOp": {"op": "job", "jobId": job.job_id}},
            }
        result = await self.run_batch(batch)
        self._batch_signed(result)
        return {"id": batch.request_id, "ok": True, "batch": result}

    async def _run_job(self, job: Job, batch: BatchRequest) -> None:
        job.status = "processing"
        job.started_at = format_time(self.clock_ms())
        try:
            job.batch = await self.run_batch(batch, job=job)
            self._batch_signed(job.batch)
            job.status = "completed"
        except asyncio.CancelledError:
            job.status = "failed"
            job.error = {
                "code": "SHUTDOWN",
                "message": "gateway stopped; resend the batch "
                "with the same id to finish it (nothing is signed twice)",
            }
            raise
        except GatewayError as exc:
            job.status = "failed"
            job.error = exc.to_json()
        except Exception as exc:
            log.exception("async batch failed", extra={"request_id": batch.request_id})
            job.status = "failed"
            job.error = {"code": "INTERNAL_ERROR", "message": str(exc)}
        finally:
            job.completed_at = format_time(self.clock_ms())

    def _sub_entry(self, batch: BatchRequest, op: BatchOperation) -> Entry:
        sub = {**op.data, "id": "batch-op", "op": op.operation, "till": batch.till}
        derived = f"{batch.request_id}#{op.reference_id or op.index}"
        try:
            return self.entry(op.operation, sub, request_id=derived)
        except ValidationError as exc:
            prefix = f"operations[{op.index}].data."
            raise ValidationError(
                exc.message.replace("batch-op", derived),
                [type(d)(prefix + d.field, d.message, d.code) for d in exc.details],
            ) from None

    async def run_batch(self, batch: BatchRequest, *, job: Job | None = None) -> dict[str, Any]:
        started = self.clock_ms()
        t0 = time.perf_counter()
        n = len(batch.operations)
        outcomes: list[Outcome | None] = [None] * n
        entries: list[tuple[int, Entry]] = []
        first_invalid: int | None = None
        for i, op in enumerate(batch.operations):
            try:
                entries.append((i, self._sub_entry(batch, op)))
            except GatewayError as exc:
                outcomes[i] = exc
                if first_invalid is None:
                    first_invalid = i
        status = "completed"
        if batch.validate_only:
            await self._check_references(batch, outcomes)
            status = "validated"
        elif batch.rollback_on_error:
            if first_invalid is not None:
                cause = outcomes[first_invalid]
                assert isinstance(cause, GatewayError)
                for i in range(n):
                    if outcomes[i] is None:
                        outcomes[i] = Skipped(f"rolled back: operation {first_invalid} failed")
                status = "rolled_back"
            else:
                done = await self.ledger.submit_many([e for _, e in entries], atomic=True)
                for (i, _), o in zip(entries, done, strict=True):
                    outcomes[i] = o
                if any(isinstance(o, GatewayError) for o in done):
                    status = "rolled_back"
            if job is not None:
                job.processed = n
        else:
            stop = not batch.continue_on_error
            todo = [
                (i, e) for i, e in entries if first_invalid is None or not stop or i < first_invalid
            ]
            chunk = ASYNC_CHUNK if job is not None else max(1, len(todo))
            failed = False
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]
                if failed:
                    results: list[Outcome] = [
                        Skipped("not tried: an earlier operation failed") for _ in part
                    ]
                else:
                    results = await self.ledger.submit_many(
                        [e for _, e in part], atomic=False, stop_on_error=stop
                    )
                for (i, _), o in zip(part, results, strict=True):
                    outcomes[i] = o
                    failed = failed or (stop and isinstance(o, GatewayError))
                if job is not None:
                    self._progress(job, outcomes)
            if stop and first_invalid is not None:
                for i in range(first_invalid + 1, n):
                    if outcomes[i] is None:
                        outcomes[i] = Skipped("not tried: an earlier operation failed")
        if job is not None:
            self._progress(job, outcomes)
        return self._batch_result(batch, outcomes, status, started, t0)

    async def _check_references(self, batch: BatchRequest, outcomes: list[Outcome | None]) -> None:
        """validateOnly: also check what a request refers to (exists, not yet superseded)."""
        if self._lookup is None:
            return
        for i, op in enumerate(batch.operations):
            if outcomes[i] is not None or op.operation == "sign":
                continue
            ref = op.data.get("ref", {})
            found = await self._lookup(ref["chain"], ref["seq"])
            if found is None:
                outcomes[i] = NotFound(
                    f"operations[{i}]: {ref['chain']} seq {ref['seq']} does not exist"
                )
            elif op.operation != "reprint" and found[1]:
                outcomes[i] = Conflict(
                    f"operations[{i}]: {ref['chain']} seq {ref['seq']} is "
                    "already cancelled or corrected"
                )

    def _batch_signed(self, result: dict[str, Any]) -> None:
        if self.offline is None:
            return
        records = [
            Record.from_body(r["record"], r["record"]["hash"], r["record"]["sig"])
            for r in result.get("results", [])
            if r.get("success") and "record" in r and not r.get("replayed")
        ]
        self.offline.signed(records)

    @staticmethod
    def _progress(job: Job, outcomes: list[Outcome | None]) -> None:
        job.processed = sum(1 for o in outcomes if o is not None)
        job.successful = sum(1 for o in outcomes if isinstance(o, Signed))
        job.failed = job.processed - job.successful

    def _batch_result(
        self,
        batch: BatchRequest,
        outcomes: list[Outcome | None],
        status: str,
        started: int,
        t0: float,
    ) -> dict[str, Any]:
        results = []
        ok = failed = skipped = 0
        for op, o in zip(batch.operations, outcomes, strict=True):
            item: dict[str, Any] = {"referenceId": op.reference_id, "operation": op.operation}
            if isinstance(o, Signed):
                ok += 1
                item.update(
                    success=True,
                    record=o.record.to_json(),
                    replayed=o.replayed,
                    receipt=receipt_data(o.record),
                )
            elif o is None:  # validateOnly: valid
                ok += 1
                item.update(success=True)
            else:
                if isinstance(o, Skipped):
                    skipped += 1
                    item["skipped"] = True
                else:
                    failed += 1
                item.update(success=False, error=o.to_json())
            results.append(item)
        if status == "rolled_back":
            ok = 0
        elif status == "completed" and (failed or skipped):
            status = "completed_with_errors"
        return {
            "batchId": batch.request_id,
            "status": status,
            "success": failed == 0 and skipped == 0,
            "totalRecords": len(outcomes),
            "processedRecords": len(outcomes) - skipped,
            "successfulRecords": ok,
            "failedRecords": failed,
            "skippedRecords": skipped,
            "results": results,
            "executionTimeMs": round((time.perf_counter() - t0) * 1000, 3),
            "startedAt": format_time(started),
            "completedAt": format_time(self.clock_ms()),
        }
