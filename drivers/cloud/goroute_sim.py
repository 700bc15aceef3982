"""A strict loopback simulator of GoRoute's Peppol batch API (seed 001), for tests and demo.

- ``POST /api/v1/send/batch[?async=true]``: ``X-API-Key`` one of ``api_keys`` (else 401);
  ``Content-Type: application/json``; ``{"documents": [{"id", "xml"}]}`` (else 400). Limits
  (seed's table): more than ``max_docs`` documents → 400; a body over ``max_batch_bytes`` →
  413; one ``xml`` over ``max_doc_bytes`` → 413; more than ``rate_limit`` batches in any
  ``rate_window_s`` on the simulator's clock → 429 with ``Retry-After``. Every such refusal
  is also a *violation* (the gateway must never cause one), and so is any request (a submit
  or a status poll) that comes before a 429's ``Retry-After`` has passed (see
  :mod:`drivers.cloud.loopback`).
- Per item: the XML must parse and carry every element of
  :data:`gateway.core.ubl.MANDATORY_PATHS` (else ``rejected`` ``VALIDATION_ERROR``
  "Missing required element: ..."); ``outcomes[id]`` forces an item's answer
  (``("rejected", code, message)`` or ``("failed", code, message)``; a ``failed`` outcome
  is used once, then the item is accepted); otherwise ``accepted`` with a transaction id.
  Like an access point, it never takes an invoice twice: a document whose invoice number
  (``cbc:ID``) was accepted before is ``rejected`` with ``DUPLICATE_DOCUMENT`` and the first
  one's ``transaction_id`` (our assumption; the seed names no code), counted in
  ``duplicates``.
- ``?async=true``: ``{"batch_id", "status": "processing"}`` at once; ``GET
  /api/v1/batches/{id}`` answers ``processing`` with the items ``pending`` for
  ``async_polls`` polls, then ``completed`` with every result and the counts.
- Faults on the submit call: :class:`drivers.cloud.loopback.LoopbackServer`.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any, Unpack

from aiohttp import web

from drivers.cloud.loopback import LoopbackOptions, LoopbackServer, serve
from gateway.core.batch_policy import GOROUTE_DUPLICATE
from gateway.core.ubl import NS, missing_elements

RATE_LIMITED = {"error": {"code": "RATE_LIMITED", "message": "Too many requests"}}


class GoRouteSim(LoopbackServer):
    def __init__(
        self,
        *,
        api_keys: set[str],
        max_docs: int = 100,
        max_batch_bytes: int = 50 * 1024 * 1024,
        max_doc_bytes: int = 15 * 1024 * 1024,
        async_polls: int = 2,
        **common: Unpack[LoopbackOptions],
    ) -> None:
        super().__init__(**common)
        self.api_keys = api_keys
        self.max_docs = max_docs
        self.max_batch_bytes = max_batch_bytes
        self.max_doc_bytes = max_doc_bytes
        self.async_polls = async_polls
        self.outcomes: dict[str, tuple[str, str, str]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.accepted: dict[str, str] = {}  # doc id → transaction id
        self.invoices: dict[str, str] = {}  # invoice number (cbc:ID) → transaction id
        self.documents: dict[str, bytes] = {}  # doc id → last xml received
        self.duplicates = 0
        self.polls = 0
        self._n = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v1/send/batch", self._send)
        app.router.add_get("/api/v1/batches/{batch_id}", self._status)

    def _auth(self, request: web.Request) -> bool:
        return request.headers.get("X-API-Key", "") in self.api_keys

    async def _send(self, request: web.Request) -> web.Response:
        if not self._auth(request):
            return self.answer(401, {"error": {"code": "UNAUTHORIZED", "message": "bad key"}})
        key = request.headers["X-API-Key"]
        early = self.early(key, RATE_LIMITED)
        if early is not None:
            return early
        raw = await request.read()
        if len(raw) > self.max_batch_bytes:
            return self.answer(
                413, {"error": {"code": "PAYLOAD_TOO_LARGE"}}, violation="batch over bytes"
            )
        if request.content_type != "application/json":
            return self.answer(400, {"error": {"code": "BAD_REQUEST"}}, violation="content type")
        try:
            body = json.loads(raw)
            docs = body["documents"]
            if not isinstance(docs, list) or not all(
                isinstance(d, dict)
                and isinstance(d.get("id"), str)
                and isinstance(d.get("xml"), str)
                for d in docs
            ):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return self.answer(400, {"error": {"code": "BAD_REQUEST"}}, violation="bad body")
        if not docs or len(docs) > self.max_docs:
            return self.answer(
                400, {"error": {"code": "TOO_MANY_DOCUMENTS"}}, violation=f"{len(docs)} documents"
            )
        for d in docs:
            if len(d["xml"].encode("utf-8")) > self.max_doc_bytes:
                return self.answer(
                    413, {"error": {"code": "DOCUMENT_TOO_LARGE"}}, violation="document over bytes"
                )
        throttled = self.over_rate(key, RATE_LIMITED)
        if throttled is not None:
            return throttled
        now = self.now()
        is_async = request.query.get("async") == "true"

        async def process() -> web.Response:
            self.sent_times.append(now)
            self._n += 1
            batch_id = f"batch_{self._n:06d}"
            results = [self._item(d) for d in docs]
            self.batches[batch_id] = {"results": results, "polls": 0, "async": is_async}
            if is_async:
                return self.answer(
                    200,
                    {
                        "batch_id": batch_id,
                        "status": "processing",
                        "message": "Batch queued for processing",
                    },
                )
            return self.answer(200, self._summary(batch_id, results))

        return await self.with_faults(request, key, process)

    def _item(self, d: dict[str, Any]) -> dict[str, Any]:
        doc_id, xml = d["id"], d["xml"].encode("utf-8")
        self.documents[doc_id] = xml
        number = None
        try:
            missing = missing_elements(xml)
            root = ET.fromstring(xml)  # noqa: S314 (a loopback test peer, not the internet)
            number = root.findtext("cbc:ID", namespaces=NS)
        except ET.ParseError as exc:
            missing = [f"well-formed XML ({exc})"]
        if missing:
            return {
                "id": doc_id,
                "status": "rejected",
                "error": {
                    "code": "VALIDATION_ERROR",
                    "message": f"Missing required element: {missing[0]}",
                },
            }
        first = self.invoices.get(number or "")
        if first is not None:
            self.duplicates += 1
            return {
                "id": doc_id,
                "status": "rejected",
                "transaction_id": first,
                "error": {
                    "code": GOROUTE_DUPLICATE,
                    "message": f"Invoice {number} was already accepted as {first}",
                },
            }
        forced = self.outcomes.get(doc_id)
        if forced is not None:
            status, code, message = forced
            if status == "failed":
                del self.outcomes[doc_id]
            return {"id": doc_id, "status": status, "error": {"code": code, "message": message}}
        txn = f"txn_{len(self.invoices) + 1:08d}"
        self.accepted[doc_id] = txn
        if number:
            self.invoices[number] = txn
        return {"id": doc_id, "status": "accepted", "transaction_id": txn}

    def _summary(self, batch_id: str, results: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "batch_id": batch_id,
            "total_count": len(results),
            "accepted_count": sum(1 for r in results if r["status"] == "accepted"),
            "rejected_count": sum(1 for r in results if r["status"] == "rejected"),
            "results": results,
        }

    async def _status(self, request: web.Request) -> web.Response:
        if not self._auth(request):
            return self.answer(401, {"error": {"code": "UNAUTHORIZED", "message": "bad key"}})
        early = self.early(request.headers["X-API-Key"], RATE_LIMITED)
        if early is not None:
            return early
        self.polls += 1
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return self.answer(404, {"error": {"code": "NOT_FOUND"}})
        batch["polls"] += 1
        results = batch["results"]
        done = not batch["async"] or batch["polls"] > self.async_polls
        shown = results if done else [{"id": r["id"], "status": "pending"} for r in results]
        return self.answer(
            200,
            {
                "batch_id": request.match_info["batch_id"],
                "status": "completed" if done else "processing",
                "delivered_count": sum(1 for r in shown if r["status"] == "accepted"),
                "pending_count": sum(1 for r in shown if r["status"] == "pending"),
                "failed_count": sum(1 for r in shown if r["status"] in ("failed", "rejected")),
                "results": shown,
            },
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m drivers.cloud.goroute_sim --port 8710`` (API key ``sim-key``)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8710)
    parser.add_argument("--api-key", default="sim-key")
    parser.add_argument("--async-polls", type=int, default=2)
    args = parser.parse_args(argv)

    sim = GoRouteSim(api_keys={args.api_key}, async_polls=args.async_polls)
    return serve(sim, args.port, "goroute simulator")


if __name__ == "__main__":
    raise SystemExit(main())
