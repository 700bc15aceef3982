"""The local web server: POS requests over HTTP, status and health JSON.

``POST /v1/pos/requests`` takes the same JSON request as the socket (one per POST) and
answers the same reply, with an HTTP status that mirrors the error code (docs/protocol.md).
``GET /v1/status`` is the ``status`` op; ``GET /v1/health`` answers 200 while signing works
and 503 when it is halted. Binds to loopback unless configured otherwise (gateway.config).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from gateway.core.errors import LineTooLong, ProtocolError
from gateway.core.framing import decode_request
from gateway.dispatch import HTTP_STATUS, Dispatcher, error_reply
from gateway.ledger import Ledger

log = logging.getLogger("gateway.web")

DISPATCHER = web.AppKey("dispatcher", Dispatcher)
LEDGER = web.AppKey("ledger", Ledger)


def _status_of(reply: dict[str, Any]) -> int:
    if reply.get("ok"):
        return 200
    return HTTP_STATUS.get(reply.get("error", {}).get("code", ""), 400)


async def pos_request(request: web.Request) -> web.Response:
    dispatcher = request.app[DISPATCHER]
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        reply = error_reply(None, LineTooLong("request body exceeds the configured limit"))
        return web.json_response(reply, status=413)
    try:
        unverified = decode_request(body)
    except ProtocolError as exc:
        return web.json_response(error_reply(None, exc), status=400)
    reply = await dispatcher.handle(unverified)
    return web.json_response(reply, status=_status_of(reply))


async def status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[DISPATCHER].status())


async def health(request: web.Request) -> web.Response:
    ledger = request.app[LEDGER]
    if ledger.halted:
        return web.json_response({"ok": False, "reason": ledger.halted}, status=503)
    return web.json_response({"ok": True})


def make_app(dispatcher: Dispatcher, ledger: Ledger, *, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    app[DISPATCHER] = dispatcher
    app[LEDGER] = ledger
    app.router.add_post("/v1/pos/requests", pos_request)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/health", health)
    return app
