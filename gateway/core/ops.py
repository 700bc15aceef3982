"""Validation of the POS operations other than ``sign`` (see docs/protocol.md).

``cancel``, ``correction``, ``reprint``, ``close``, ``status``, ``job`` and the ``batch``
envelope.
Like :mod:`gateway.core.request`, every function takes decoded JSON and returns a frozen
value or raises ValidationError listing each problem with its field path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.core.errors import ValidationError
from gateway.core.request import (
    REQUEST_ID_RE,
    TILL_RE,
    Checker,
    Rules,
    SaleRequest,
    validate_envelope,
    validate_sale,
)

OPS = ("sign", "cancel", "correction", "reprint", "close", "batch", "job", "status")
BATCH_OPS = ("sign", "cancel", "correction", "reprint")
JOB_ID_RE = re.compile(r"^job_[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class Ref:
    chain: str
    seq: int


@dataclass(frozen=True, slots=True)
class CancelRequest:
    request_id: str
    till: str
    ref: Ref
    reason: str


@dataclass(frozen=True, slots=True)
class CorrectionRequest:
    request_id: str
    till: str
    ref: Ref
    reason: str
    corrected: SaleRequest


@dataclass(frozen=True, slots=True)
class ReprintRequest:
    request_id: str
    till: str
    ref: Ref
    reason: str


#: ``close`` op ``period`` → closing record type (gateway.core.closing.PERIODS)
CLOSE_PERIODS = {
    "DAILY": "CLOSING::DAILY",
    "MONTHLY": "CLOSING::MONTHLY",
    "YEARLY": "CLOSING::YEARLY",
}


@dataclass(frozen=True, slots=True)
class CloseRequest:
    request_id: str
    till: str
    period: str  # DAILY, MONTHLY or YEARLY

    @property
    def kind(self) -> str:
        """The closing record type asked for."""
        return CLOSE_PERIODS[self.period]


@dataclass(frozen=True, slots=True)
class BatchOperation:
    index: int
    operation: str
    reference_id: str | None
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BatchRequest:
    request_id: str
    till: str
    operations: tuple[BatchOperation, ...]
    continue_on_error: bool
    validate_only: bool
    rollback_on_error: bool
    run_async: bool


def op_of(unverified: Any) -> str:
    """The ``op`` of a request, or ValidationError naming the problem."""
    if not isinstance(unverified, dict) or "op" not in unverified:
        raise ValidationError("request has no op", [_detail("op", "is required", "REQUIRED")])
    op = unverified["op"]
    if op not in OPS:
        raise ValidationError(
            f"unknown op {str(op)[:32]!r}",
            [_detail("op", f"must be one of {', '.join(OPS)}", "NOT_ALLOWED")],
        )
    return str(op)


def _detail(field: str, message: str, code: str) -> Any:
    from gateway.core.errors import Detail

    return Detail(field, message, code)


def _ref(c: Checker, value: Any) -> Ref | None:
    obj = c.obj(value, "ref", {"chain", "seq"}, set())
    if obj is None:
        return None
    chain = (
        c.string(
            obj.get("chain"), "ref.chain", max_chars=32, pattern=TILL_RE, what="a chain (till) id"
        )
        if "chain" in obj
        else None
    )
    seq = c.integer(obj["seq"], "ref.seq", lo=1, hi=2**53 - 1) if "seq" in obj else None
    if chain is None or seq is None:
        return None
    return Ref(chain, seq)


def _reason(c: Checker, req: dict[str, Any]) -> str:
    if "reason" not in req:
        return ""
    return c.string(req["reason"], "reason") or ""


def _referring(unverified: Any, op: str) -> tuple[Checker, dict[str, Any], str, str, Ref, str]:
    c = Checker()
    req = c.obj(unverified, "", {"id", "op", "till", "ref"}, {"reason"})
    if req is None:
        c.raise_if_any(f"invalid {op} request")
        raise AssertionError("unreachable")
    rid, till = validate_envelope(req, c)
    ref = _ref(c, req["ref"]) if "ref" in req else None
    reason = _reason(c, req)
    c.raise_if_any(f"invalid {op} request")
    assert rid is not None and till is not None and ref is not None
    return c, req, rid, till, ref, reason


def validate_cancel(unverified: Any) -> CancelRequest:
    _, _, rid, till, ref, reason = _referring(unverified, "cancel")
    return CancelRequest(rid, till, ref, reason)


def validate_reprint(unverified: Any) -> ReprintRequest:
    _, _, rid, till, ref, reason = _referring(unverified, "reprint")
    return ReprintRequest(rid, till, ref, reason)


def validate_close(unverified: Any) -> CloseRequest:
    """``{"id", "op": "close", "till", "period": "DAILY" | "MONTHLY" | "YEARLY"}``."""
    c = Checker()
    req = c.obj(unverified, "", {"id", "op", "till", "period"}, set())
    if req is None:
        c.raise_if_any("invalid close request")
        raise AssertionError("unreachable")
    rid, till = validate_envelope(req, c)
    period = req.get("period")
    if "period" in req and not (isinstance(period, str) and period in CLOSE_PERIODS):
        c.add("period", f"must be one of {', '.join(CLOSE_PERIODS)}", "NOT_ALLOWED")
    c.raise_if_any("invalid close request")
    assert rid is not None and till is not None and isinstance(period, str)
    return CloseRequest(rid, till, period)


def validate_correction(unverified: Any, rules: Rules | None = None) -> CorrectionRequest:
    c = Checker()
    sale_keys = {"currency", "lines", "payments", "total"}
    req = c.obj(
        unverified,
        "",
        {"id", "op", "till", "ref", *sale_keys},
        {"reason", "prices_include_vat", "customer"},
    )
    if req is None:
        c.raise_if_any("invalid correction request")
        raise AssertionError("unreachable")
    ref = _ref(c, req["ref"]) if "ref" in req else None
    reason = _reason(c, req)
    sale_req = {k: v for k, v in req.items() if k not in ("ref", "reason")}
    sale_req["op"] = "sign"
    sale_req["type"] = "INVOICE" if "customer" in req else "RECEIPT"
    sale: SaleRequest | None = None
    try:
        sale = validate_sale(sale_req, rules or Rules())
    except ValidationError as exc:
        c.details.extend(d for d in exc.details if d.field not in ("op", "type"))
    c.raise_if_any("invalid correction request")
    assert ref is not None and sale is not None
    return CorrectionRequest(sale.request_id, sale.till, ref, reason, sale)


def validate_status(unverified: Any) -> str | None:
    """A status request; returns its id (``id`` and ``till`` are optional here)."""
    c = Checker()
    req = c.obj(unverified, "", {"op"}, {"id", "till"})
    if req is not None:
        validate_envelope(req, c)
    c.raise_if_any("invalid status request")
    assert req is not None
    rid = req.get("id")
    return rid if isinstance(rid, str) else None


def validate_job(unverified: Any) -> str:
    c = Checker()
    req = c.obj(unverified, "", {"op", "jobId"}, {"id", "till"})
    job_id = None
    if req is not None:
        validate_envelope(req, c)
        if "jobId" in req:
            job_id = c.string(
                req["jobId"],
                "jobId",
                max_chars=40,
                pattern=JOB_ID_RE,
                what="a job id returned by an async batch",
            )
    c.raise_if_any("invalid job request")
    assert job_id is not None
    return job_id


def validate_batch(unverified: Any, *, max_operations: int) -> BatchRequest:
    """The batch envelope; each operation's ``data`` is validated by its own op later."""
    c = Checker()
    req = c.obj(unverified, "", {"id", "op", "till", "operations"}, {"options"})
    if req is None:
        c.raise_if_any("invalid batch request")
        raise AssertionError("unreachable")
    rid, till = validate_envelope(req, c)
    options = {
        "continueOnError": False,
        "validateOnly": False,
        "rollbackOnError": False,
        "async": False,
    }
    if "options" in req:
        opts = c.obj(req["options"], "options", set(), set(options))
        if opts is not None:
            for key in options.keys() & opts.keys():
                if type(opts[key]) is not bool:
                    c.add(f"options.{key}", "must be true or false", "TYPE")
                else:
                    options[key] = opts[key]
    if options["rollbackOnError"] and options["continueOnError"]:
        c.add("options", "rollbackOnError and continueOnError exclude each other", "NOT_ALLOWED")
    operations: list[BatchOperation] = []
    items = (
        c.array(req.get("operations"), "operations", lo=1, hi=max_operations)
        if "operations" in req
        else None
    )
    seen: set[str] = set()
    for i, item in enumerate(items or []):
        p = f"operations[{i}]"
        obj = c.obj(item, p, {"operation", "data"}, {"referenceId"})
        if obj is None:
            continue
        op = obj.get("operation")
        if "operation" in obj and op not in BATCH_OPS:
            c.add(f"{p}.operation", f"must be one of {', '.join(BATCH_OPS)}", "NOT_ALLOWED")
            op = None
        ref_id = None
        if "referenceId" in obj:
            ref_id = c.string(
                obj["referenceId"],
                f"{p}.referenceId",
                max_chars=64,
                pattern=REQUEST_ID_RE,
                what="1-64 of A-Z a-z 0-9 . _ : @ -",
            )
            if ref_id is not None and ref_id in seen:
                c.add(f"{p}.referenceId", "is used twice in this batch", "DUPLICATE")
            if ref_id is not None:
                seen.add(ref_id)
        data = obj.get("data")
        if "data" in obj and not isinstance(data, dict):
            c.add(f"{p}.data", "must be an object", "TYPE")
            data = None
        if isinstance(data, dict):
            for key in ("id", "op", "till"):
                if key in data:
                    c.add(f"{p}.data.{key}", "is set by the batch; leave it out", "NOT_ALLOWED")
        if op is not None and isinstance(data, dict):
            operations.append(BatchOperation(i, str(op), ref_id, data))
    c.raise_if_any("invalid batch request")
    assert rid is not None and till is not None
    return BatchRequest(
        rid,
        till,
        tuple(operations),
        options["continueOnError"],
        options["validateOnly"],
        options["rollbackOnError"],
        options["async"],
    )
