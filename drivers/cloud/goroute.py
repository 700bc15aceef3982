"""The ``peppol/goroute`` batch uplink: signed invoices as UBL documents through GoRoute's
batch API (seed 001, docs/sync.md "peppol/goroute").

- ``POST {base_url}/api/v1/send/batch`` (``?async=true`` in async mode) with
  ``X-API-Key`` and ``{"documents": [{"id", "xml"}]}``. Sync mode answers the seed's
  ``results[]`` at once; async mode answers ``{"batch_id", "status": "processing"}``.
- ``GET {base_url}/api/v1/batches/{batch_id}``: the seed shows its counts
  (``pending_count``...); we assume it also carries ``results[]`` shaped like the send
  answer's, with ``"status": "pending"`` for items not done yet (the simulator does).
- Which records: ``TRANSACTION::INVOICE`` only (everything else is ``skipped``). A document's
  ``id`` is ``<chain>:<seq>``: fixed by the record, the same after any retry or restart.
- A ``rejected`` item with code ``DUPLICATE_DOCUMENT`` (GoRoute already has a document with
  that invoice number; seed 001 names no such code, it is our assumption) is a duplicate: the
  engine reconciles it as accepted when an earlier batch of ours may have carried it
  (gateway.core.batch_policy.resolve_duplicate), keeping the ``transaction_id`` it names.
- An invoice whose buyer has no ``endpoint_id`` or ``country`` cannot be a Peppol invoice and
  is refused locally (needs review), as is one over the size limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from drivers.cloud.batch_http import HttpBatchUplink, reading
from gateway.batch_sync import Document, DocumentRefused, ItemResult, Submission
from gateway.core.batch_policy import PENDING, Limits, classify_goroute
from gateway.core.errors import CloudUnavailable
from gateway.core.record import Record
from gateway.core.ubl import NotAnInvoice, Party, render_invoice

PROCESSOR_ID = "peppol/goroute"
INVOICE = "TRANSACTION::INVOICE"


@dataclass(frozen=True, slots=True)
class GoRouteSettings:
    base_url: str
    api_key: str
    seller: Party
    async_mode: bool = False
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 60.0
    limits: Limits = field(default_factory=Limits)


def doc_id(record: Record) -> str:
    return f"{record.chain}:{record.seq}"


def item_result(item: dict[str, Any]) -> ItemResult:
    err = item.get("error") or {}
    code = err.get("code") if isinstance(err, dict) else None
    state = classify_goroute(str(item.get("status", "")), code)
    error = f"{code}: {err.get('message', '')}" if code else None
    return ItemResult(state, item.get("transaction_id"), error)


class GoRouteUplink(HttpBatchUplink):
    processor_id = PROCESSOR_ID

    def __init__(self, settings: GoRouteSettings) -> None:
        super().__init__(settings)
        self.settings = settings

    def document(self, record: Record) -> Document | None:
        if record.type != INVOICE:
            return None
        try:
            xml = render_invoice(
                chain=record.chain,
                number=record.number,
                time=record.time,
                request_id=record.request_id,
                payload=record.payload,
                seller=self.settings.seller,
            )
        except NotAnInvoice as exc:
            raise DocumentRefused(str(exc)) from None
        text = xml.decode("utf-8")
        body = {"id": doc_id(record), "xml": text}
        # the limit is on the document; what it costs in the batch is its JSON entry
        if len(xml) > self.limits.max_doc_bytes:
            size = len(xml)
        else:
            size = len(json.dumps(body).encode("utf-8")) + 1
        return Document(doc_id(record), body, size)

    def _headers(self) -> dict[str, str]:
        return {"X-API-Key": self.settings.api_key, "Content-Type": "application/json"}

    async def submit(self, docs: list[Document]) -> Submission:
        url = f"{self.settings.base_url}/api/v1/send/batch"
        if self.settings.async_mode:
            url += "?async=true"
        body = json.dumps({"documents": [d.body for d in docs]}).encode("utf-8")
        _, answer = await self.http.call("POST", url, self._headers(), body)
        batch_id = answer.get("batch_id") if isinstance(answer, dict) else None
        if not isinstance(batch_id, str) or not batch_id:
            raise CloudUnavailable(f"batch answer without batch_id: {str(answer)[:200]}")
        with reading(f"POST {url}"):
            results = {
                str(item["id"]): item_result(item)
                for item in answer.get("results") or []
                if isinstance(item, dict) and "id" in item
            }
        return Submission(batch_id, results)

    async def poll(self, batch_id: str, doc_ids: list[str]) -> dict[str, ItemResult]:
        url = f"{self.settings.base_url}/api/v1/batches/{batch_id}"
        _, answer = await self.http.call("GET", url, {"X-API-Key": self.settings.api_key})
        out = {}
        with reading(f"GET {url}"):
            for item in answer.get("results", []) if isinstance(answer, dict) else []:
                if isinstance(item, dict) and "id" in item:
                    r = item_result(item)
                    if r.state != PENDING:
                        out[str(item["id"])] = r
        return out
