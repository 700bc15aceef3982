"""A strict loopback simulator of SIFEN lotes (seed 002 and the submit call we assume,
drivers/cloud/sifen.py), for tests and demo.

- Both calls need the ``token`` header (one of ``tokens``; else 500 "Error interno:
  autenticación", as the seed says authentication failures are answered) and ``Emisor``
  equal to ``emisor`` (else 500).
- ``POST /recibe/lote``: ``{"documentos": [{"cdc", "de"}]}``, 1 to ``max_docs`` documents
  (else 400), a body of at most ``max_lote_bytes`` (else 413), each ``cdc`` 44 digits with a
  valid modulo-11 check digit (else 400); more than ``rate_limit`` lotes per
  ``rate_window_s`` → 429 with ``Retry-After``. Every such refusal is a violation, and so is
  any request that comes before a 429's ``Retry-After`` has passed
  (:mod:`drivers.cloud.loopback`).
- Each document's verdict is decided when its lote is received (SIFEN processes a lote
  whether or not anyone polls): ``Rechazado`` with the ``codigoError``/``mensajeError`` of
  ``rejections[cdc]``; ``Rechazado`` 1001 "CDC duplicado" for a CDC an earlier lote already
  carried to approval (SIFEN never approves a CDC twice; counted in ``duplicates``); else
  ``Aprobado``. Polls show it: ``En Cola`` for the first poll, ``Procesando`` for the next
  ``processing_polls`` polls, then the verdict. ``stuck`` lotes never show it.
  ``poll_errors``: that many next polls answer 500 ("Error interno: ...").
- Faults on the submit call: :class:`drivers.cloud.loopback.LoopbackServer`.
"""

from __future__ import annotations

import json
from typing import Any, Unpack

from aiohttp import web

from drivers.cloud.loopback import LoopbackOptions, LoopbackServer, serve
from gateway.core.batch_policy import SIFEN_DUPLICATE_CDC
from gateway.core.cdc import valid_cdc

TOO_MANY = {"mensaje": "demasiados lotes"}


class SifenSim(LoopbackServer):
    def __init__(
        self,
        *,
        tokens: set[str],
        emisor: str,
        max_docs: int = 50,
        max_lote_bytes: int = 1_000_000,
        processing_polls: int = 1,
        **common: Unpack[LoopbackOptions],
    ) -> None:
        super().__init__(**common)
        self.tokens = tokens
        self.emisor = emisor
        self.max_docs = max_docs
        self.max_lote_bytes = max_lote_bytes
        self.processing_polls = processing_polls
        self.rejections: dict[str, tuple[int, str]] = {}
        self.stuck = False
        self.poll_errors = 0
        self.lotes: dict[str, dict[str, Any]] = {}
        self.approved: set[str] = set()
        self.duplicates = 0
        self.polls = 0
        self.estados_seen: set[str] = set()
        self._n = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/recibe/lote", self._submit)
        app.router.add_post("/consulta/lote", self._query)

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if request.headers.get("token", "") not in self.tokens:
            self.statuses[500] += 1
            return web.Response(status=500, text="Error interno: autenticación fallida")
        if request.headers.get("Emisor") != self.emisor:
            self.statuses[500] += 1
            return web.Response(status=500, text="Error interno: emisor desconocido")
        return None

    async def _submit(self, request: web.Request) -> web.Response:
        err = self._auth_error(request) or self.early(request.headers["token"], TOO_MANY)
        if err is not None:
            return err
        raw = await request.read()
        if len(raw) > self.max_lote_bytes:
            return self.answer(413, {"mensaje": "lote demasiado grande"}, violation="lote bytes")
        try:
            docs = json.loads(raw)["documentos"]
            cdcs = [d["cdc"] for d in docs]
            if not all(
                isinstance(c, str) and isinstance(d.get("de"), dict)
                for c, d in zip(cdcs, docs, strict=True)
            ):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return self.answer(400, {"mensaje": "cuerpo inválido"}, violation="bad body")
        if not 1 <= len(docs) <= self.max_docs:
            return self.answer(400, {"mensaje": "cantidad de DE"}, violation=f"{len(docs)} DE")
        bad = [c for c in cdcs if not valid_cdc(c)]
        if bad:
            return self.answer(400, {"mensaje": f"CDC inválido {bad[0]}"}, violation="bad cdc")
        throttled = self.over_rate(request.headers["token"], TOO_MANY)
        if throttled is not None:
            return throttled
        now = self.now()

        async def process() -> web.Response:
            self.sent_times.append(now)
            self._n += 1
            lote = f"2026{self._n:014d}"
            verdicts = {c: self._verdict(c) for c in cdcs}
            self.lotes[lote] = {"cdcs": cdcs, "polls": 0, "stuck": self.stuck, "v": verdicts}
            return self.answer(
                200,
                {
                    "lote": lote,
                    "codigoRespuesta": "0300",
                    "mensajeRespuesta": "Lote recibido con éxito",
                },
            )

        return await self.with_faults(request, request.headers["token"], process)

    def _verdict(self, cdc: str) -> tuple[int, str] | None:
        """A document's verdict when its lote comes in: None (Aprobado) or a rejection."""
        if cdc in self.rejections:
            return self.rejections[cdc]
        if cdc in self.approved:
            self.duplicates += 1
            return (SIFEN_DUPLICATE_CDC, "CDC duplicado")
        self.approved.add(cdc)
        return None

    async def _query(self, request: web.Request) -> web.Response:
        err = self._auth_error(request) or self.early(request.headers["token"], TOO_MANY)
        if err is not None:
            return err
        self.polls += 1
        if self.poll_errors > 0:
            self.poll_errors -= 1
            self.statuses[500] += 1
            return web.Response(status=500, text="Error interno: servicio no disponible")
        try:
            lote_id = json.loads(await request.read())["lote"]
        except (ValueError, KeyError, TypeError):
            return self.answer(400, {"mensaje": "cuerpo inválido"}, violation="bad query")
        lote = self.lotes.get(lote_id)
        if lote is None:
            self.statuses[500] += 1
            return web.Response(status=500, text=f"Error interno: lote {lote_id} no encontrado")
        lote["polls"] += 1
        n = lote["polls"]
        results = []
        final = not lote["stuck"] and n > 1 + self.processing_polls
        for cdc in lote["cdcs"]:
            if not final:
                estado = "En Cola" if n == 1 else "Procesando"
                results.append(
                    {"cdc": cdc, "estado": estado, "codigoError": None, "mensajeError": None}
                )
            elif lote["v"][cdc] is not None:
                code, message = lote["v"][cdc]
                results.append(
                    {
                        "cdc": cdc,
                        "estado": "Rechazado",
                        "codigoError": code,
                        "mensajeError": message,
                    }
                )
            else:
                results.append(
                    {"cdc": cdc, "estado": "Aprobado", "codigoError": None, "mensajeError": None}
                )
            self.estados_seen.add(results[-1]["estado"])
        return self.answer(
            200,
            {
                "codigoLote": "0" if final else "1",
                "mensajeLote": "Lote procesado correctamente" if final else "Lote en proceso",
                "resultados": results,
            },
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m drivers.cloud.sifen_sim --port 8720`` (token ``sim-token``)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8720)
    parser.add_argument("--token", default="sim-token")
    parser.add_argument("--emisor", default="80069563-1")
    parser.add_argument("--processing-polls", type=int, default=1)
    args = parser.parse_args(argv)

    sim = SifenSim(tokens={args.token}, emisor=args.emisor, processing_polls=args.processing_polls)
    return serve(sim, args.port, "sifen simulator")


if __name__ == "__main__":
    raise SystemExit(main())
