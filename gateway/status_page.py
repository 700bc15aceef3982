"""The technician's status page, its maintenance actions and ``/metrics`` (docs/operations.md).

Routes (on the local web server, gateway.web):

- ``GET /``: the page, rendered on the server by Jinja2 with autoescaping (every till id,
  item text or error message is escaped); ``GET /fragment`` is its live part, which
  ``/static/page.js`` fetches every few seconds and swaps in (no full reload). No external
  assets: the page works with no internet; a strict Content-Security-Policy allows only
  this origin's script and style.
- ``GET /metrics``: Prometheus text (gateway.metrics).
- ``POST /login`` / ``POST /logout``: a form login with the admin token; it sets a session
  cookie (HttpOnly, SameSite=Strict, Path=/) whose session holds a CSRF token that every
  form carries. Failed logins are rate-limited per client address.
- ``POST /admin/<action>``: the maintenance actions, with the session cookie **and** the
  form's CSRF token, or with ``Authorization: Bearer <admin token>`` (no cookie, so no CSRF).
  Each action leaves an ``ADMIN_ACTION`` technical event (who, what, outcome).
  ``GET /admin/public-key`` downloads the public key (PEM).

Access: without the token, the read-only page, fragment and metrics answer only clients on
loopback unless ``http.status_page_remote`` is true; admin routes answer 401 without
credentials and 403 with a session but a missing or wrong CSRF token.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import shutil
import tarfile
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from gateway.core.errors import GatewayError
from gateway.core.health import assess_health
from gateway.core.record import format_time
from gateway.export import export
from gateway.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("gateway.status_page")

COOKIE = "fg_session"
SESSION_TTL_S = 8 * 3600
#: failed logins allowed per client address within LOGIN_WINDOW_S before 429
LOGIN_FAILURES = 5
LOGIN_WINDOW_S = 60.0
REFRESH_S = 3
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

StatusFn = Callable[[], Awaitable[dict[str, Any]]]
EventFn = Callable[..., None]


@dataclass
class Session:
    csrf: str
    expires_mono: float
    remote: str
    flash: list[str] = field(default_factory=list)


@dataclass
class Maintenance:
    """What the actions act on; the composition root fills it in (None: not available)."""

    sync: Any = None  # gateway.sync.SyncEngine
    dispatcher: Any = None  # gateway.dispatch.Dispatcher
    printer: Any = None  # gateway.printing.PrintWorker
    ledger: Any = None  # gateway.ledger.Ledger
    db_path: Path | None = None
    record_event: EventFn | None = None
    #: ``archive(period, chain)`` → gateway.archive.ArchiveRun (FiscalJournal.archive)
    archive: Callable[[str, str | None], Awaitable[Any]] | None = None


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("gateway", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def _static(name: str) -> bytes:
    return resources.files("gateway").joinpath("templates", name).read_bytes()


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


def money(amount_minor: int) -> str:
    sign = "-" if amount_minor < 0 else ""
    return f"{sign}{abs(amount_minor) // 100}.{abs(amount_minor) % 100:02d}"


def mib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1024 * 1024):,.0f} MiB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h}h {m}m" if d else f"{h}h {m}m {s}s" if h else f"{m}m {s}s"


class StatusPage:
    def __init__(
        self,
        status: StatusFn,
        maintenance: Maintenance,
        metrics: Metrics,
        *,
        token: str | None,
        remote_read: bool = False,
    ) -> None:
        self.status = status
        self.m = maintenance
        self.metrics = metrics
        self._token = token.encode("utf-8") if token else None
        self.remote_read = remote_read
        self.sessions: dict[str, Session] = {}
        self.failures: dict[str, deque[float]] = {}
        self.env = _environment()
        self.env.filters["money"] = money
        self.env.filters["mib"] = mib
        self.env.filters["duration"] = duration

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/fragment", self.fragment)
        app.router.add_get("/metrics", self.metrics_route)
        app.router.add_get("/static/page.js", self.asset)
        app.router.add_get("/static/page.css", self.asset)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/admin/public-key", self._admin(self.public_key, csrf=False))
        for name, handler in self.actions().items():
            app.router.add_post(f"/admin/{name}", self._admin(handler, csrf=True))

    def actions(self) -> dict[str, Callable[[web.Request, dict[str, str], str], Awaitable[Any]]]:
        return {
            "process-pending": self.process_pending,
            "retry": self.retry,
            "mark-reviewed": self.mark_reviewed,
            "test-page": self.test_page,
            "reprint": self.reprint,
            "close-day": self.close_day,
            "export": self.export,
            "archive": self.archive,
        }

    # ------------------------------------------------------------------ access

    def _bearer_ok(self, request: web.Request) -> bool:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if self._token is None or scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode("utf-8"), self._token)

    def _session(self, request: web.Request) -> tuple[str, Session] | None:
        sid = request.cookies.get(COOKIE)
        if not sid:
            return None
        s = self.sessions.get(sid)
        if s is None:
            return None
        if s.expires_mono < time.monotonic():
            del self.sessions[sid]
            return None
        return sid, s

    def _may_read(self, request: web.Request) -> bool:
        return (
            self.remote_read
            or _is_loopback(request.remote)
            or self._bearer_ok(request)
            or self._session(request) is not None
        )

    def _admin(self, handler: Any, *, csrf: bool) -> Any:
        async def checked(request: web.Request) -> web.StreamResponse:
            if self._bearer_ok(request):
                form = dict(await request.post()) if request.method == "POST" else {}
                return await self._run(request, handler, form, "admin token", json_reply=True)
            found = self._session(request)
            if found is None:
                return web.json_response(
                    {"error": {"code": "UNAUTHORIZED", "message": "log in or send the token"}},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="fiscal-gateway admin"'},
                )
            _, session = found
            form = dict(await request.post()) if request.method == "POST" else {}
            if csrf and not hmac.compare_digest(
                str(form.get("csrf", "")).encode("utf-8"), session.csrf.encode("utf-8")
            ):
                log.warning("admin form refused: bad CSRF token", extra={"path": request.path})
                return web.json_response(
                    {"error": {"code": "FORBIDDEN", "message": "missing or wrong CSRF token"}},
                    status=403,
                )
            who = f"technician session from {request.remote}"
            return await self._run(request, handler, form, who, json_reply=False)

        return checked

    async def _run(
        self,
        request: web.Request,
        handler: Any,
        form: dict[str, Any],
        who: str,
        *,
        json_reply: bool,
    ) -> web.StreamResponse:
        fields = {k: str(v) for k, v in form.items() if k != "csrf" and isinstance(v, str)}
        action = request.path.rsplit("/", 1)[-1]
        try:
            result = await handler(request, fields, who)
            outcome, message = "ok", None
        except ActionRefused as exc:
            result, outcome, message = None, "refused", str(exc)
        except GatewayError as exc:
            result, outcome, message = None, "refused", f"{exc.code}: {exc.message}"
        if self.m.record_event is not None and action != "public-key":
            self.m.record_event(
                "ADMIN_ACTION", who=who, action=action, input=fields, outcome=outcome,
                error=message,
            )  # fmt: skip
        log.info("admin action %s by %s: %s", action, who, outcome)
        if isinstance(result, web.StreamResponse):
            return result
        text = message if message is not None else str(result)
        if json_reply:
            return web.json_response(
                {"action": action, "outcome": outcome, "message": text},
                status=200 if outcome == "ok" else 409,
            )
        found = self._session(request)
        if found is not None:
            found[1].flash.append(f"{action}: {outcome} — {text}")
        raise web.HTTPSeeOther("/")

    # ------------------------------------------------------------------ pages

    async def _full_status(self) -> dict[str, Any]:
        status = await self.status()
        status["health"] = assess_health(status)
        return status

    def _headers(self) -> dict[str, str]:
        return {
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        }

    def _forbidden(self) -> web.Response:
        return web.json_response(
            {
                "error": {
                    "code": "FORBIDDEN",
                    "message": "the status page answers only on localhost without the token",
                }
            },
            status=403,
        )

    def _render(self, name: str, request: web.Request, **extra: Any) -> str:
        found = self._session(request)
        session = found[1] if found else None
        return self.env.get_template(name).render(
            csrf=session.csrf if session else None,
            logged_in=session is not None,
            refresh_s=REFRESH_S,
            **extra,
        )

    async def page(self, request: web.Request) -> web.Response:
        if not self._may_read(request):
            return self._forbidden()
        status = await self._full_status()
        found = self._session(request)
        flash: list[str] = []
        if found is not None:
            flash, found[1].flash = found[1].flash, []
        html = self._render(
            "status.html",
            request,
            s=status,
            flash=flash,
            has_close=self.m.dispatcher is not None,
            today=date.today().isoformat(),
        )
        return web.Response(text=html, content_type="text/html", headers=self._headers())

    async def fragment(self, request: web.Request) -> web.Response:
        if not self._may_read(request):
            return self._forbidden()
        status = await self._full_status()
        html = self._render("live.html", request, s=status)
        return web.Response(text=html, content_type="text/html", headers=self._headers())

    async def asset(self, request: web.Request) -> web.Response:
        name = request.path.rsplit("/", 1)[-1]
        ctype = "application/javascript" if name.endswith(".js") else "text/css"
        return web.Response(body=_static(name), content_type=ctype, headers=self._headers())

    async def metrics_route(self, request: web.Request) -> web.Response:
        if not self._may_read(request):
            return self._forbidden()
        status = await self.status()
        stats = await self.m.sync.batch_stats() if self.m.sync is not None else []
        body = self.metrics.render(status, stats)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    # ------------------------------------------------------------------ login

    async def login(self, request: web.Request) -> web.Response:
        remote = request.remote or "?"
        now = time.monotonic()
        recent = self.failures.setdefault(remote, deque())
        while recent and recent[0] < now - LOGIN_WINDOW_S:
            recent.popleft()
        if len(recent) >= LOGIN_FAILURES:
            log.warning("login refused: too many failures", extra={"remote": remote})
            return web.Response(
                text="too many failed logins; wait a minute",
                status=429,
                headers={"Retry-After": str(int(LOGIN_WINDOW_S))},
            )
        form = await request.post()
        presented = str(form.get("token", "")).strip().encode("utf-8")
        if self._token is None or not hmac.compare_digest(presented, self._token):
            recent.append(now)
            log.warning("login failed", extra={"remote": remote})
            return web.Response(text="wrong token", status=401)
        for sid, s in list(self.sessions.items()):
            if s.expires_mono < now:
                del self.sessions[sid]
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(secrets.token_urlsafe(32), now + SESSION_TTL_S, remote)
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE, sid, httponly=True, samesite="Strict", path="/", max_age=SESSION_TTL_S
        )
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        found = self._session(request)
        form = await request.post()
        if found is not None and hmac.compare_digest(
            str(form.get("csrf", "")).encode("utf-8"), found[1].csrf.encode("utf-8")
        ):
            del self.sessions[found[0]]
        response = web.HTTPSeeOther("/")
        response.del_cookie(COOKIE, path="/")
        raise response

    # ------------------------------------------------------------------ actions

    async def process_pending(self, request: web.Request, form: dict[str, str], who: str) -> str:
        if self.m.sync is None or not self.m.sync.processors:
            raise ActionRefused("no sync processor is configured")
        runs = await self.m.sync.process_pending()
        return "; ".join(
            f"{r.result_json().get('processor', '?')}: {'ok' if r.succeeded else 'failed'}"
            for r in runs
        )

    async def retry(self, request: web.Request, form: dict[str, str], who: str) -> str:
        """A batch item in review (``seq`` given): send it again; a real-time chain stopped
        by a rejection: resume its uplink (the rejected record stays set aside)."""
        if self.m.sync is None:
            raise ActionRefused("no sync processor is configured")
        processor, chain = form.get("processor", ""), form.get("chain", "")
        batch = getattr(self.m.sync, "batch_processors", {}).get(processor)
        if batch is not None:
            try:
                seq = int(form.get("seq", ""))
            except ValueError:
                raise ActionRefused("seq must be a number") from None
            if not await batch.retry(chain, seq):
                raise ActionRefused(f"{processor} {chain} #{seq} is not in review")
            return f"{processor} {chain} #{seq} goes into the next batch"
        try:
            uplink = await self.m.sync.resume(processor, chain)
        except KeyError:
            raise ActionRefused(f"no processor {processor!r}") from None
        return f"{processor} {chain}: uplink {uplink.state}"

    async def mark_reviewed(self, request: web.Request, form: dict[str, str], who: str) -> str:
        """Close a batch item in review without sending it (dealt with outside the gateway)."""
        if self.m.sync is None:
            raise ActionRefused("no sync processor is configured")
        processor, chain = form.get("processor", ""), form.get("chain", "")
        batch = getattr(self.m.sync, "batch_processors", {}).get(processor)
        if batch is None:
            raise ActionRefused(f"{processor!r} has no review list")
        try:
            seq = int(form.get("seq", ""))
        except ValueError:
            raise ActionRefused("seq must be a number") from None
        note = (form.get("note") or f"marked reviewed by {who}")[:500]
        if not await batch.mark_reviewed(chain, seq, note):
            raise ActionRefused(f"{processor} {chain} #{seq} is not in review")
        return f"{processor} {chain} #{seq} marked reviewed; it will not be sent"

    async def test_page(self, request: web.Request, form: dict[str, str], who: str) -> str:
        if self.m.printer is None:
            raise ActionRefused("no printer is configured")
        try:
            where = await self.m.printer.print_test_page()
        except Exception as exc:
            raise ActionRefused(f"the printer refused the test page: {exc}") from None
        return f"test page sent to {where}"

    async def _pos(self, request_: dict[str, Any]) -> dict[str, Any]:
        if self.m.dispatcher is None:
            raise ActionRefused("the dispatcher is not running")
        reply: dict[str, Any] = await self.m.dispatcher.handle(request_)
        if not reply.get("ok"):
            err = reply.get("error", {})
            raise ActionRefused(f"{err.get('code')}: {err.get('message')}")
        return reply

    async def reprint(self, request: web.Request, form: dict[str, str], who: str) -> str:
        chain = form.get("chain", "")
        try:
            seq = int(form.get("seq", ""))
        except ValueError:
            raise ActionRefused("seq must be a number") from None
        reply = await self._pos(
            {
                "id": f"admin-{uuid.uuid4().hex}",
                "op": "reprint",
                "till": chain,
                "ref": {"chain": chain, "seq": seq},
                "reason": f"reprint from the status page ({who})"[:200],
            }
        )
        rec = reply["record"]
        return f"duplicate of {chain} #{seq} signed as seq {rec['seq']}"

    async def close_day(self, request: web.Request, form: dict[str, str], who: str) -> str:
        chain = form.get("chain", "")
        reply = await self._pos(
            {"id": f"admin-{uuid.uuid4().hex}", "op": "close", "till": chain, "period": "DAILY"}
        )
        rec = reply["record"]
        return f"{rec['type']} for {chain} signed as seq {rec['seq']}"

    async def export(self, request: web.Request, form: dict[str, str], who: str) -> web.Response:
        if self.m.ledger is None or self.m.db_path is None:
            raise ActionRefused("the ledger is not open")
        chain = form.get("chain", "")
        try:
            first = date.fromisoformat(form.get("from", ""))
            last = date.fromisoformat(form.get("to", ""))
        except ValueError:
            raise ActionRefused("from and to must be dates (YYYY-MM-DD)") from None
        if last < first:
            raise ActionRefused("to is before from")
        start = datetime.combine(first, datetime.min.time(), UTC)
        end = datetime.combine(last + timedelta(days=1), datetime.min.time(), UTC)
        body = await asyncio.to_thread(
            _export_tar,
            self.m.db_path,
            self.m.ledger.signer,
            chain,
            format_time(int(start.timestamp() * 1000)),
            format_time(int(end.timestamp() * 1000)),
        )
        name = f"export-{chain}-{first.isoformat()}-{last.isoformat()}.tar.gz"
        return web.Response(
            body=body,
            headers={
                "Content-Type": "application/gzip",
                "Content-Disposition": f'attachment; filename="{name}"',
            },
        )

    async def archive(self, request: web.Request, form: dict[str, str], who: str) -> str:
        """The closings of a period type without an archive yet, archived now (as
        ``POST /v1/admin/archive``)."""
        if self.m.archive is None:
            raise ActionRefused("archives are not available")
        period = form.get("period", "MONTHLY")
        if period not in ("MONTHLY", "YEARLY"):
            raise ActionRefused("period must be MONTHLY or YEARLY")
        chain = form.get("chain") or None
        run = await self.m.archive(period, chain)
        if run.failed:
            t, why = run.failed[0]
            raise ActionRefused(f"{len(run.failed)} archive(s) failed: {t.chain}: {why}")
        skipped = [f"skipped: {why}" for _, why in run.skipped]
        if not run.made:
            if skipped:
                raise ActionRefused("nothing archived; " + "; ".join(skipped))
            raise ActionRefused(f"nothing to archive: every {period} closing has its archive")
        made = [f"{r.payload['archive']} recorded as seq {r.seq}" for r in run.made]
        return "; ".join(made + skipped)

    async def public_key(self, request: web.Request, form: dict[str, str], who: str) -> Any:
        signer = self.m.ledger.signer
        return web.Response(
            text=signer.public_pem,
            headers={
                "Content-Type": "application/x-pem-file",
                "Content-Disposition": f'attachment; filename="{signer.key_id}.pem"',
            },
        )


class ActionRefused(Exception):
    """A maintenance action that could not be done (shown to the technician, logged)."""


def _export_tar(db: Path, signer: Any, chain: str, start: str, end: str) -> bytes:
    """gateway.export of ``chain``'s records with ``start <= time < end``, as a .tar.gz."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT min(seq), max(seq) FROM records WHERE chain = ? AND time >= ? AND time < ?",
            (chain, start, end),
        ).fetchone()
    finally:
        conn.close()
    if row is None or row[0] is None:
        raise ActionRefused(f"no records of {chain!r} between {start} and {end}")
    with tempfile.TemporaryDirectory(prefix="fg-export-") as tmp:
        out = Path(tmp) / "export"
        export(db, out, signer, chain=chain, from_seq=row[0], to_seq=row[1])
        tar_path = Path(tmp) / "export.tar.gz"
        with tarfile.open(tar_path, "w:gz") as tar:
            tar.add(out, arcname="export")
        data = tar_path.read_bytes()
        shutil.rmtree(out, ignore_errors=True)
        return data
