"""The admin API on the local web server: the sync engine's (seed 000, docs/sync.md) and
archives (docs/operations.md, "Archives while the daemon runs").

- ``POST /v1/admin/process-pending``: run every registered processor now; **200** with
  ``results[]`` when every run succeeded, **207** when any failed (an item failed or was
  rejected, or the cloud could not be reached). Fields exactly as the seed.
- ``GET /v1/admin/batch-stats``: ``stats[]``, per processor the sums of its runs over the
  last 24 hours, with ``since`` (the start of that window).
- ``POST /v1/admin/sync/resume`` ``{"processor", "chain"}``: resume a chain whose uplink was
  stopped by a permanent rejection (the rejected record stays set aside).
- ``GET /v1/admin/sync/review``: ``{"review": [{"processor", "chain", "seq", "error",
  "since"}]}``, the items the batch processors set aside (needs review), never dropped.
- ``POST /v1/admin/sync/review/retry`` ``{"processor", "chain", "seq"}``: send a reviewed
  item again (after its cause was corrected); 404 when it is not in review.
- ``POST /v1/admin/sync/review/mark-reviewed`` ``{"processor", "chain", "seq", "note"?}``:
  close an item in review without sending it (dealt with outside the gateway); it stays in
  the outbox as ``reviewed`` with its error and the note; 404 when it is not in review.

- ``POST /v1/admin/archive`` ``{"period": "MONTHLY"|"YEARLY", "chain"?}``: archive every
  closing of that type (of that chain, or of every chain) that has no archive yet, through
  the daemon's ledger writer (gateway.archive, docs/export-format.md "Archives"): **200**
  with ``archives[]`` (and ``skipped[]``: closings over 366 days, never one archive);
  **409** ``CONFLICT`` when there is nothing to archive (details ``PERIOD_TOO_LONG`` when
  all that waits is such a closing); **400**
  ``VALIDATION_ERROR`` / **404** ``NOT_FOUND`` (no such chain) with ``details[]`` naming the
  field; **500** (**207** if some were made) with ``failed[]`` when an archive could not be
  written. A refused request changes nothing and records nothing.

Every state-changing call (process-pending, resume, retry, archive) leaves an ``ADMIN_ACTION``
technical event (``who`` = ``admin-api``, ``action``, ``input``, ``outcome``) through the
``record_event`` callable the composition root passes in (the event journal).

Every request needs ``Authorization: Bearer <token>``, the token read once at start-up from
``http.admin_token_file`` and compared in constant time (``hmac.compare_digest``). A wrong or
missing token — or no token configured — gets 401 before anything is looked at, so nothing
changes.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.core.errors import (
    ConfigError,
    Conflict,
    Detail,
    GatewayError,
    NotFound,
    ValidationError,
)
from gateway.sync import SyncEngine

log = logging.getLogger("gateway.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def read_token(path: Path) -> str:
    """The admin token from its file (whitespace around it ignored); ConfigError if unusable."""
    try:
        token = path.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"http.admin_token_file: cannot read {path}: {exc}") from None
    if len(token) < 16:
        raise ConfigError(f"http.admin_token_file: {path} holds fewer than 16 characters")
    return token


RecordEvent = Callable[..., None]
#: ``archive(period, chain)`` → gateway.archive.ArchiveRun (FiscalJournal.archive)
ArchiveFn = Callable[[str, str | None], Awaitable[Any]]
ARCHIVE_PERIODS = ("MONTHLY", "YEARLY")


def archive_request(unverified: Any) -> tuple[str, str | None]:
    """``(period, chain)`` of a ``POST /v1/admin/archive`` body, or ValidationError."""
    if not isinstance(unverified, dict):
        raise ValidationError(
            "the body must be a JSON object", [Detail("$", "must be an object", "TYPE")]
        )
    details = []
    period = unverified.get("period")
    if period is None:
        details.append(Detail("period", "is required", "REQUIRED"))
    elif period not in ARCHIVE_PERIODS:
        details.append(Detail("period", "must be one of MONTHLY, YEARLY", "NOT_ALLOWED"))
    chain = unverified.get("chain")
    if chain is not None and (not isinstance(chain, str) or not chain):
        details.append(Detail("chain", "must be a non-empty string", "TYPE"))
    for key in unverified:
        if key not in ("period", "chain"):
            details.append(Detail(str(key)[:64], "is not a known field", "UNKNOWN_FIELD"))
    if details:
        raise ValidationError("the archive request is not valid", details)
    assert isinstance(period, str)
    return period, chain


class AdminApi:
    def __init__(
        self,
        engine: SyncEngine,
        token: str | None,
        record_event: RecordEvent | None = None,
        *,
        archive: ArchiveFn | None = None,
        chains: Callable[[], Any] | None = None,
    ) -> None:
        self.engine = engine
        self._token = token.encode("utf-8") if token else None
        self._record_event = record_event
        self._archive = archive
        self._chains = chains

    def _action(self, action: str, outcome: str, **fields: Any) -> None:
        """Record who did what through the admin API (an ADMIN_ACTION event)."""
        if self._record_event is not None:
            self._record_event(
                "ADMIN_ACTION", who="admin-api", action=action, input=fields, outcome=outcome
            )

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/admin/process-pending", self._auth(self.process_pending))
        app.router.add_get("/v1/admin/batch-stats", self._auth(self.batch_stats))
        app.router.add_post("/v1/admin/sync/resume", self._auth(self.resume))
        app.router.add_get("/v1/admin/sync/review", self._auth(self.review))
        app.router.add_post("/v1/admin/sync/review/retry", self._auth(self.retry))
        app.router.add_post("/v1/admin/sync/review/mark-reviewed", self._auth(self.mark_reviewed))
        if self._archive is not None:
            app.router.add_post("/v1/admin/archive", self._auth(self.archive))

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if self._token is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode("utf-8"), self._token)

    def _auth(self, handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if not self._authorized(request):
                log.warning(
                    "admin request refused: bad or missing token", extra={"path": request.path}
                )
                return web.json_response(
                    {
                        "error": {
                            "code": "UNAUTHORIZED",
                            "message": "a valid admin bearer token is required",
                        }
                    },
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="fiscal-gateway admin"'},
                )
            return await handler(request)

        return checked

    async def process_pending(self, request: web.Request) -> web.Response:
        runs = await self.engine.process_pending()
        status = 200 if all(r.succeeded for r in runs) else 207
        self._action("process-pending", "ok" if status == 200 else "partial")
        return web.json_response({"results": [r.result_json() for r in runs]}, status=status)

    async def batch_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"stats": await self.engine.batch_stats()})

    async def resume(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            processor, chain = body["processor"], body["chain"]
            if not isinstance(processor, str) or not isinstance(chain, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {"error": {"code": "VALIDATION_ERROR", "message": 'body: {"processor", "chain"}'}},
                status=400,
            )
        try:
            uplink = await self.engine.resume(processor, chain)
        except KeyError:
            self._action("sync-resume", "refused", processor=processor, chain=chain)
            return web.json_response(
                {"error": {"code": "NOT_FOUND", "message": f"no processor {processor}"}},
                status=404,
            )
        self._action("sync-resume", "ok", processor=processor, chain=chain)
        return web.json_response({"processor": processor, "chain": chain, "uplink": uplink.state})

    async def review(self, request: web.Request) -> web.Response:
        items = []
        for pid, bp in sorted(self.engine.batch_processors.items()):
            items += [{"processor": pid, **item} for item in await bp.review(limit=1000)]
        return web.json_response({"review": items})

    async def retry(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            processor, chain, seq = body["processor"], body["chain"], body["seq"]
            if not isinstance(processor, str) or not isinstance(chain, str) or type(seq) is not int:
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {
                    "error": {
                        "code": "VALIDATION_ERROR",
                        "message": 'body: {"processor", "chain", "seq"}',
                    }
                },
                status=400,
            )
        bp = self.engine.batch_processors.get(processor)
        if bp is None or not await bp.retry(chain, seq):
            self._action("review-retry", "refused", processor=processor, chain=chain, seq=seq)
            return web.json_response(
                {"error": {"code": "NOT_FOUND", "message": "no such item in review"}}, status=404
            )
        self._action("review-retry", "ok", processor=processor, chain=chain, seq=seq)
        return web.json_response({"processor": processor, "chain": chain, "seq": seq})

    async def mark_reviewed(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            processor, chain, seq = body["processor"], body["chain"], body["seq"]
            note = body.get("note", "")
            if (
                not isinstance(processor, str)
                or not isinstance(chain, str)
                or type(seq) is not int
                or not isinstance(note, str)
            ):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return web.json_response(
                {
                    "error": {
                        "code": "VALIDATION_ERROR",
                        "message": 'body: {"processor", "chain", "seq", "note"?}',
                    }
                },
                status=400,
            )
        note = note[:500]
        bp = self.engine.batch_processors.get(processor)
        if bp is None or not await bp.mark_reviewed(chain, seq, note):
            self._action("mark-reviewed", "refused", processor=processor, chain=chain, seq=seq)
            return web.json_response(
                {"error": {"code": "NOT_FOUND", "message": "no such item in review"}}, status=404
            )
        self._action("mark-reviewed", "ok", processor=processor, chain=chain, seq=seq, note=note)
        return web.json_response(
            {"processor": processor, "chain": chain, "seq": seq, "state": "reviewed"}
        )

    async def archive(self, request: web.Request) -> web.Response:
        assert self._archive is not None
        try:
            try:
                unverified = json.loads(await request.read())
            except ValueError:
                raise ValidationError(
                    "the body is not JSON", [Detail("$", "must be a JSON object", "TYPE")]
                ) from None
            period, chain = archive_request(unverified)
            if chain is not None and self._chains is not None and chain not in self._chains():
                raise NotFound(
                    f"no chain {chain!r} in the journal",
                    [Detail("chain", "is not a chain of the journal", "NOT_FOUND")],
                )
            run = await self._archive(period, chain)
        except GatewayError as exc:
            status = {
                "VALIDATION_ERROR": 400,
                "NOT_FOUND": 404,
                "CONFLICT": 409,
                "SIGNING_HALTED": 503,
            }.get(exc.code, 500)
            return web.json_response({"error": exc.to_json()}, status=status)
        skipped = [
            {"chain": t.chain, "closing": t.closing(), "reason": why} for t, why in run.skipped
        ]
        if not run.made and not run.failed:
            where = f"of {chain}" if chain is not None else "of any chain"
            if skipped:
                message = (
                    f"nothing archived: {len(skipped)} {period} closing(s) {where} span more "
                    f"than 366 days and cannot be one archive: {skipped[0]['reason']}"
                )
                details = [Detail("period", s["reason"], "PERIOD_TOO_LONG") for s in skipped]
            else:
                message = f"nothing to archive: no {period} closing {where} is without its archive"
                details = [
                    Detail("period", f"no {period} closing waits for an archive", "NOTHING_TO_DO")
                ]
            refused: dict[str, Any] = {"error": Conflict(message, details).to_json()}
            if skipped:
                refused["skipped"] = skipped
            return web.json_response(refused, status=409)
        archives = [
            {
                "chain": r.chain,
                "archive": r.payload["archive"],
                "path": str(run.root / r.payload["archive"]),
                "closing": r.payload["closing"],
                "period": r.payload["period"],
                "records": r.payload["records"],
                "manifest_hash": r.payload["manifest_hash"],
                "recorded_seq": r.seq,
            }
            for r in run.made
        ]
        failed = [{"chain": t.chain, "closing": t.closing(), "error": why} for t, why in run.failed]
        outcome = "ok" if not failed else "partial" if archives else "failed"
        self._action(
            "archive",
            outcome,
            period=period,
            chain=chain,
            archives=[a["archive"] for a in archives],
        )
        body: dict[str, Any] = {"period": period, "archives": archives}
        if skipped:
            body["skipped"] = skipped
        if failed:
            body["failed"] = failed
            body["error"] = {
                "code": "STORAGE_ERROR",
                "message": f"{len(failed)} archive(s) could not be made: {failed[0]['error']}",
            }
        status = 200 if not failed else 207 if archives else 500
        return web.json_response(body, status=status)
