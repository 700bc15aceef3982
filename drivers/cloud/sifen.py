"""The ``paraguay/sifen`` batch uplink: signed sales as SIFEN documents in a *lote*, then the
lote polled until every document is final (seed 002, docs/sync.md "paraguay/sifen").

- Submit (assumed; the seed documents only the query): ``POST {base_url}/recibe/lote`` with
  the headers ``token`` and ``Emisor`` and ``{"documentos": [{"cdc", "de"}]}`` — ``de`` the
  signed record as JSON — answered ``{"lote": "<id>", "codigoRespuesta": "0300",
  "mensajeRespuesta": "Lote recibido con éxito"}``. At most 50 documents per lote (SIFEN's
  rule for a lote).
- Query (seed 002): ``POST {base_url}/consulta/lote`` with ``token``, ``Emisor`` and
  ``{"lote"}``; ``resultados[]`` per ``cdc`` with ``estado`` (``Aprobado``, ``Rechazado``
  with ``codigoError``/``mensajeError``, ``Procesando``, ``En Cola``). HTTP 500 with a
  message is a failed poll (CloudUnavailable), never a verdict. ``Rechazado`` 1001 ("CDC
  duplicado") is a duplicate: the engine reconciles it as accepted when an earlier lote of
  ours may have carried that CDC (gateway.core.batch_policy.resolve_duplicate).
- Which records: ``TRANSACTION::RECEIPT`` and ``TRANSACTION::INVOICE`` (factura
  electrónica, ``iTiDE`` 01); the rest is ``skipped``. Each document is named by its CDC
  (gateway.core.cdc): fixed by configuration and the record, so a resend names the same one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from drivers.cloud.batch_http import HttpBatchUplink, reading
from gateway.batch_sync import Document, DocumentRefused, ItemResult, Submission
from gateway.core.batch_policy import DUPLICATE, PENDING, REVIEW, Limits, classify_sifen
from gateway.core.cdc import CdcError, Issuer, derive_cdc
from gateway.core.errors import CloudUnavailable
from gateway.core.record import Record

PROCESSOR_ID = "paraguay/sifen"
TYPES = frozenset({"TRANSACTION::RECEIPT", "TRANSACTION::INVOICE"})
SIFEN_LIMITS = Limits(max_docs=50, max_batch_bytes=1_000_000, max_doc_bytes=1_000_000)


@dataclass(frozen=True, slots=True)
class SifenSettings:
    base_url: str
    token: str
    issuer: Issuer
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 60.0
    limits: Limits = SIFEN_LIMITS

    @property
    def emisor(self) -> str:
        return self.issuer.ruc


def cdc_of(issuer: Issuer, record: Record) -> str:
    return derive_cdc(
        issuer,
        chain=record.chain,
        number=record.number,
        time=record.time,
        offline=record.offline,
        record_hash=record.hash,
    )


def item_result(item: dict[str, Any]) -> ItemResult:
    state = classify_sifen(str(item.get("estado", "")), item.get("codigoError"))
    error = None
    if state in (REVIEW, DUPLICATE):
        error = f"{item.get('codigoError')}: {item.get('mensajeError')}"
    return ItemResult(state, str(item.get("cdc")), error)


class SifenUplink(HttpBatchUplink):
    processor_id = PROCESSOR_ID

    def __init__(self, settings: SifenSettings) -> None:
        settings.issuer.validate()
        super().__init__(settings)
        self.settings = settings

    def document(self, record: Record) -> Document | None:
        if record.type not in TYPES:
            return None
        try:
            cdc = cdc_of(self.settings.issuer, record)
        except CdcError as exc:
            raise DocumentRefused(str(exc)) from None
        body = {"cdc": cdc, "de": record.to_json()}
        return Document(cdc, body, len(json.dumps(body).encode("utf-8")) + 1)

    def _headers(self) -> dict[str, str]:
        return {
            "token": self.settings.token,
            "Emisor": self.settings.emisor,
            "Content-Type": "application/json",
        }

    async def submit(self, docs: list[Document]) -> Submission:
        body = json.dumps({"documentos": [d.body for d in docs]}).encode("utf-8")
        url = f"{self.settings.base_url}/recibe/lote"
        _, answer = await self.http.call("POST", url, self._headers(), body)
        lote = answer.get("lote") if isinstance(answer, dict) else None
        if not isinstance(lote, str) or not lote:
            raise CloudUnavailable(f"lote answer without lote: {str(answer)[:200]}")
        return Submission(lote)

    async def poll(self, batch_id: str, doc_ids: list[str]) -> dict[str, ItemResult]:
        url = f"{self.settings.base_url}/consulta/lote"
        body = json.dumps({"lote": batch_id}).encode("utf-8")
        _, answer = await self.http.call("POST", url, self._headers(), body)
        out = {}
        with reading(f"POST {url}"):
            for item in answer.get("resultados", []) if isinstance(answer, dict) else []:
                if isinstance(item, dict) and "cdc" in item:
                    r = item_result(item)
                    if r.state != PENDING:
                        out[str(item["cdc"])] = r
        return out
