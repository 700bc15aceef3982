"""The composition root: wires config, signer, ledger, transports and workers; lifecycle.

``fiscal-gateway run`` → :func:`cmd_run` → :class:`App`. Start-up order: config (exit 78 if
bad), state directory (0700), signing key (generated 0600 on first start when allowed;
a group/world-readable key exits 78), ledger (integrity checks; a failure keeps the daemon
up with signing halted and health 503 so a technician can see why), then listeners, then
``READY=1``. ``SIGTERM``/``SIGINT``: ``STOPPING=1``, stop accepting, let in-flight requests
finish and reply (up to ``gateway.stop_timeout_s``), let the writer commit what is queued,
checkpoint, close, exit 0. ``SIGHUP``: reopen the log file and reload what is safe to reload
(log level, allowed tills, the MQTT till ACL); everything else needs a restart and is logged
as such.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from drivers.cloud.fiskaly import FiskalyClient, FiskalySettings, FiskalyUplink
from drivers.cloud.goroute import GoRouteSettings, GoRouteUplink
from drivers.cloud.sifen import SifenSettings, SifenUplink
from drivers.printers.device import EscposPrinter
from drivers.printers.escpos import PROFILES, Layout, Profile, encode_test_page
from drivers.printers.transport import (
    FileTransport,
    SerialTransport,
    SocketTransport,
    Transport,
)
from drivers.printers.virtual import VirtualPrinter
from drivers.signers.software import generate_key, load_signer
from gateway import __version__
from gateway.admin import AdminApi, read_token
from gateway.batch_sync import BatchProcessor, BatchSettings
from gateway.config import Config, PrinterSection, load_config, parse_listen
from gateway.core.batch_policy import Limits
from gateway.core.cdc import CdcError, Issuer
from gateway.core.errors import ConfigError, GatewayError, KeyError_
from gateway.core.offline_budget import BudgetLimits
from gateway.core.record import format_time
from gateway.core.request import Rules
from gateway.core.ubl import Party
from gateway.dispatch import Dispatcher
from gateway.journal import FiscalJournal
from gateway.ledger import Ledger
from gateway.logs import setup_logging
from gateway.metrics import Metrics
from gateway.mqtt import MqttTransport
from gateway.pos_socket import PosServer
from gateway.printing import PrintWorker, reprinter
from gateway.reads import ReadPool
from gateway.sdnotify import Notifier
from gateway.status_page import Maintenance, StatusPage
from gateway.store import Reader
from gateway.sync import EngineSettings, ProcessorSettings, SyncEngine
from gateway.technician import technician_status
from gateway.web import make_app

log = logging.getLogger("gateway.app")

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_CONFIG = 78

#: GIL switch interval for the daemon (see cmd_run).
SWITCH_INTERVAL_S = 0.0005


class App:
    def __init__(
        self,
        cfg: Config,
        *,
        config_path: Path | None = None,
        cli_state_dir: Path | None = None,
        cli_http: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.cli_state_dir = cli_state_dir
        self.cli_http = cli_http
        self.notifier = Notifier()
        self.started_mono = time.monotonic()
        self.started_at = format_time(time.time_ns() // 1_000_000)
        self.stop_event = asyncio.Event()
        self._started = False
        self._reload_pending = False
        self.ledger: Ledger | None = None
        self.reads: ReadPool | None = None
        self.pos: PosServer | None = None
        self.printer: PrintWorker | None = None
        self.http_runner: web.AppRunner | None = None
        self.http_address: str | None = None
        self.mqtt: MqttTransport | None = None
        self.sync = SyncEngine(EngineSettings())
        self.admin_token: str | None = None
        self.journal: FiscalJournal | None = None
        self.key_generated: str | None = None
        self.metrics = Metrics()

    # ------------------------------------------------------------------ start-up

    def _load_key(self) -> Any:
        path = self.cfg.key_path
        if (
            not path.exists()
            and self.cfg.signing.generate_if_missing
            and not self.cfg.signing.key_file.startswith("credential:")
        ):
            signer = generate_key(path)
            log.warning(
                "generated a new signing key %s at %s (mode 0600); back it up", signer.key_id, path
            )
            self.key_generated = signer.key_id
            return signer
        return load_signer(path)

    async def run(self) -> int:
        cfg = self.cfg
        state = cfg.gateway.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        signer = self._load_key()
        self.sync = sync = sync_engine(cfg)
        if cfg.http.admin_token_file:
            self.admin_token = read_token(cfg.path(cfg.http.admin_token_file))
        # clock, events, closings, archives (its clock is the ledger's: CLOCK_JUMP events)
        self.journal = journal = FiscalJournal(cfg, key_generated=self.key_generated)
        # uplink transitions and budget levels go to the event journal as they happen
        # (UPLINK_OFFLINE, UPLINK_ONLINE, OFFLINE_WARNING, OFFLINE_LIMIT); it only queues
        sync.on_event = journal.events.record
        self.ledger = ledger = await Ledger.open(
            cfg.db_path,
            signer,
            clock_ms=journal.clock.now_ms,
            max_group=cfg.ledger.max_group,
            tail_verify=cfg.ledger.tail_verify,
            processors=sync.processor_ids(),
            is_offline=sync.is_offline,
        )
        if ledger.halted:
            log.error("SIGNING HALTED: %s", ledger.halted)
        self.reads = ReadPool(cfg.db_path)
        try:
            async with asyncio.TaskGroup() as tg:
                # Handlers first: a signal that arrives while listeners start must not take
                # the default action (SIGHUP would kill the daemon); a reload asked for
                # before the daemon is up is done once it is.
                self._install_signals()
                await self._start(tg)
                self._started = True
                self.notifier.notify("READY=1", f"STATUS={self._status_line()}")
                if self._reload_pending:
                    self._reload()
                log.info(
                    "ready: key %s, %d chain(s), socket %s, http %s",
                    signer.key_id,
                    len(ledger.heads()),
                    cfg.socket_path,
                    self.http_address or "off",
                )
                await self.stop_event.wait()
                self.notifier.notify("STOPPING=1", "STATUS=stopping")
                log.info("stopping")
                await self._stop_listeners()
                await journal.stop()
                raise _Stop
        except* _Stop:
            pass
        finally:
            await self._close()
        log.info("stopped cleanly")
        return EXIT_OK

    async def _start(self, tg: asyncio.TaskGroup) -> None:
        cfg = self.cfg
        ledger = self.ledger
        assert ledger is not None and self.reads is not None
        await self.sync.start(ledger, self.reads)
        journal = self.journal
        assert journal is not None
        # start-up records and the closings missed while the box was off, before the POS
        await journal.start(
            ledger,
            self.reads,
            guard=self.sync.guard if self.sync.processors else None,
            on_signed=self.sync.signed,
        )
        self.printer = None
        if cfg.printer.kind == "virtual":
            self.printer = PrintWorker(
                ledger,
                self.reads,
                VirtualPrinter(
                    cfg.gateway.state_dir / "printer" / "virtual-printer.txt",
                    escpos=escpos_format(cfg.printer),
                ),
                header=cfg.gateway.id,
                on_event=journal.printer_event,
            )
        elif cfg.printer.kind in ("serial", "network", "file"):
            self.printer = PrintWorker(
                ledger,
                self.reads,
                escpos_printer(cfg.printer),
                poll_s=cfg.printer.poll_s,
                confirm_timeout_s=cfg.printer.confirm_timeout_s,
                retry_max_s=cfg.printer.retry_max_s,
                on_event=journal.printer_event,
            )
        dispatcher = Dispatcher(
            ledger,
            rules=Rules(cfg.ledger.vat_rates, cfg.ledger.currencies),
            allowed_tills=cfg.tills.allowed,
            max_batch_operations=cfg.pos.max_batch_operations,
            print_documents=self.printer is not None and cfg.printer.print_receipts,
            status=self.status,
            spawn=lambda coro: tg.create_task(coro),
            lookup=self._lookup,
            # batch processors too: a signed record wakes them (guard/budget are no-ops)
            offline=self.sync if self.sync.processor_ids() else None,
            clock_ms=journal.clock.now_ms,
        )
        self.dispatcher = dispatcher
        if self.printer is not None:
            printer = self.printer
            printer.reprint = reprinter(dispatcher)
            original = dispatcher.handle

            async def handle_and_wake(unverified: Any) -> dict[str, Any]:
                reply = await original(unverified)
                if reply.get("ok") and ("record" in reply or "batch" in reply):
                    printer.wake.set()
                return reply

            dispatcher.handle = handle_and_wake  # type: ignore[method-assign]
            tg.create_task(printer.run())
        untimed = dispatcher.handle

        async def handle_timed(unverified: Any) -> dict[str, Any]:
            # the sign latency histogram of /metrics: every transport goes through here;
            # the sync engine's replay steps aside while a request that signs is in flight
            # (not for a status: a till polling it must not hold a replay up)
            t0 = time.perf_counter()
            op = unverified.get("op") if isinstance(unverified, dict) else None
            if not (isinstance(op, str) and op in SIGNING_OPS):  # bad input: no TypeError
                reply = await untimed(unverified)
                self.metrics.observe_sign(op, time.perf_counter() - t0)
                return reply
            self.sync.pos_begin()
            try:
                reply = await untimed(unverified)
            finally:
                self.sync.pos_end()
            self.metrics.observe_sign(op, time.perf_counter() - t0)
            return reply

        dispatcher.handle = handle_timed  # type: ignore[method-assign]
        self.pos = PosServer(
            dispatcher,
            max_line_bytes=cfg.pos.max_line_bytes,
            max_inflight=cfg.pos.max_inflight_per_connection,
            max_connections=cfg.pos.max_connections,
            write_timeout_s=cfg.pos.write_timeout_s,
        )
        await self.pos.start_unix(cfg.socket_path, cfg.pos.socket_mode)
        if cfg.pos.tcp:
            host, port = parse_listen(cfg.pos.tcp)
            await self.pos.start_tcp(host, port)
        if cfg.http.listen:
            host, port = parse_listen(cfg.http.listen)
            http_app = make_app(dispatcher, ledger, max_body_bytes=cfg.http.max_body_bytes)
            AdminApi(
                self.sync,
                self.admin_token,
                record_event=journal.events.record,
                archive=journal.archive,
                chains=ledger.heads,
            ).add_routes(http_app)
            StatusPage(
                self.status,
                Maintenance(
                    sync=self.sync,
                    dispatcher=dispatcher,
                    printer=self.printer,
                    ledger=ledger,
                    db_path=cfg.db_path,
                    record_event=journal.events.record,
                    archive=journal.archive,
                ),
                self.metrics,
                token=self.admin_token,
                remote_read=cfg.http.status_page_remote,
            ).add_routes(http_app)
            runner = web.AppRunner(http_app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, host, port)
            await site.start()
            self.http_runner = runner
            self.http_address = f"{host}:{port}"
            log.info("HTTP listening on http://%s:%d/", host, port)
        if cfg.mqtt.enabled:
            self.mqtt = MqttTransport(
                cfg.mqtt,
                gateway_id=cfg.gateway.id,
                dispatcher=dispatcher,
                # every status_check_s: not the page's lists (a scan of the records table each)
                status=functools.partial(self.status, lists=False),
                resolve_path=cfg.path,
            )
            tg.create_task(self.mqtt.run())
        tg.create_task(self.sync.run())
        tg.create_task(self._watchdog())
        journal.tasks(tg)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_event.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)

    # ------------------------------------------------------------------ running

    async def _lookup(self, chain: str, seq: int) -> tuple[str, bool] | None:
        assert self.reads is not None

        def q(r: Reader) -> tuple[str, bool] | None:
            row = r.conn.execute(
                "SELECT type FROM records WHERE chain = ? AND seq = ?", (chain, seq)
            ).fetchone()
            if row is None:
                return None
            taken = r.conn.execute(
                "SELECT 1 FROM claims WHERE key = ?", (f"supersede:{chain}:{seq}",)
            ).fetchone()
            return row[0], taken is not None

        return await self.reads.run(q)

    def _status_line(self) -> str:
        ledger = self.ledger
        if ledger is None:
            return "starting"
        if ledger.halted:
            return f"SIGNING HALTED: {ledger.halted}"
        return (
            f"signing; {ledger.stats.records} records since start, {len(ledger.heads())} chain(s)"
        )

    async def status(self, *, lists: bool = True) -> dict[str, Any]:
        """The status JSON (docs/operations.md); ``lists=False`` without the status page's
        record lists (gateway.technician: each scans the records table)."""
        ledger = self.ledger
        assert ledger is not None and self.reads is not None

        def q(r: Reader) -> tuple[dict[str, int], int]:
            return r.outbox_depth(), r.print_queue_depth()

        outbox, print_queue = await self.reads.run(q)
        chains = []
        for chain, h in sorted(ledger.heads().items()):
            chains.append(
                {
                    "chain": chain,
                    "seq": h.seq,
                    "hash": h.hash,
                    "time": format_time(h.time_ms),
                    "counters": h.counters,
                    "totals": h.totals,
                }
            )
        s = ledger.stats
        return {
            "gateway": {
                "id": self.cfg.gateway.id,
                "version": __version__,
                "started_at": self.started_at,
                "uptime_s": round(time.monotonic() - self.started_mono, 1),
            },
            "signing": {
                "ok": ledger.halted is None,
                "halted_reason": ledger.halted,
                "key_id": ledger.signer.key_id,
            },
            "chains": chains,
            "outbox": outbox,
            **(await self.sync.status()),
            "printer": {
                "kind": self.cfg.printer.kind,
                "queue": print_queue,
                "printed_since_start": self.printer.printed if self.printer else 0,
                "last_error": self.printer.last_error if self.printer else None,
                **(self.printer.snapshot() if self.printer else {}),
                "jobs": await self.printer.job_counts() if self.printer else {},
            },
            "pos": {
                "connections": self.pos.connections if self.pos else 0,
                "inflight": self.pos.inflight if self.pos else 0,
            },
            "writer": {
                "groups": s.groups,
                "records": s.records,
                "replays": s.replays,
                "avg_group": round(s.avg_group, 2),
                "max_group": s.max_group,
            },
            "jobs": {"active": self.dispatcher.jobs.active()},
            "mqtt": self.mqtt.state() if self.mqtt else {"enabled": False},
            "journal": self.journal.status() if self.journal else {},
            **(
                await technician_status(
                    self.reads, ledger.signer.public_pem, self.cfg.gateway.state_dir, lists=lists
                )
            ),
        }

    async def _watchdog(self) -> None:
        """WATCHDOG=1 only while the writer thread makes progress and the loop runs."""
        interval = (self.notifier.watchdog_s or 10.0) / 2
        ledger = self.ledger
        assert ledger is not None
        while True:
            await asyncio.sleep(interval)
            stalled_s = time.monotonic() - ledger.last_progress
            writer_ok = ledger.writer_alive and stalled_s < max(5.0, interval * 2)
            if writer_ok:
                self.notifier.notify("WATCHDOG=1", f"STATUS={self._status_line()}")
            else:
                log.error(
                    "ledger writer made no progress for %.1f s; withholding watchdog", stalled_s
                )

    def _reload(self) -> None:
        if not self._started:
            self._reload_pending = True
            return
        self._reload_pending = False
        log.info("SIGHUP: reloading")
        # systemd shows the unit "reloading" until the next READY=1 (sd_notify(3)).
        self.notifier.notify(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )
        try:
            self._apply_reload()
        finally:
            self.notifier.notify("READY=1", f"STATUS={self._status_line()}")

    def _apply_reload(self) -> None:
        try:
            new = load_config(self.config_path, state_dir=self.cli_state_dir, http=self.cli_http)
            setup_logging(new.logging.level, new.logging.format, new.log_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc.message)
            return
        except OSError as exc:
            log.error("reload refused: cannot open the log file: %s", exc)
            return
        if new.tills != self.cfg.tills:
            self.dispatcher.allowed_tills = frozenset(new.tills.allowed)
            log.info("allowed tills reloaded: %s", ", ".join(new.tills.allowed) or "any")
        # [mqtt.acl] applies live when MQTT runs (the rest of [mqtt] needs a restart)
        mqtt = self.cfg.mqtt
        if self.mqtt is not None and new.mqtt.acl != mqtt.acl:
            acl = self.mqtt.reload_acl(new.mqtt.acl)
            mqtt = dataclasses.replace(mqtt, acl=new.mqtt.acl)
            log.info(
                "mqtt.acl reloaded: %s",
                f"{len(acl.entries)} account(s), {len(acl.tills)} till(s)"
                if acl.configured
                else "none (any till the broker lets through)",
            )
        # Only [tills], [logging] and [mqtt.acl] apply live; every other section (including
        # ones added later) keeps its running value until a restart.
        for f in dataclasses.fields(Config):
            running = mqtt if f.name == "mqtt" else getattr(self.cfg, f.name)
            if (
                f.name not in ("tills", "logging", "source_sha256")
                and getattr(new, f.name) != running
            ):
                log.warning("config section [%s] changed; restart to apply it", f.name)
        if self.journal is not None:
            self.journal.config_reloaded(self.cfg.source_sha256, new.source_sha256)
        self.cfg = dataclasses.replace(
            self.cfg,
            tills=new.tills,
            logging=new.logging,
            mqtt=mqtt,
            source_sha256=new.source_sha256,
        )

    # ------------------------------------------------------------------ stopping

    async def _stop_listeners(self) -> None:
        grace = self.cfg.gateway.stop_timeout_s
        if self.pos is not None:
            await self.pos.stop(grace)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
            self.http_runner = None
        if self.mqtt is not None:
            await self.mqtt.stop(grace)

    async def _close(self) -> None:
        if self.http_runner is not None:
            with contextlib.suppress(Exception):
                await self.http_runner.cleanup()
        with contextlib.suppress(Exception):
            await self.sync.close()
        if self.ledger is not None:
            await self.ledger.close()
        if self.reads is not None:
            self.reads.close()


#: POS operations that sign records (gateway.dispatch): the replay yields to them.
SIGNING_OPS = frozenset({"sign", "cancel", "correction", "reprint", "batch", "close"})


def sync_engine(cfg: Config) -> SyncEngine:
    """The sync engine with the processors ``cfg`` enables (docs/sync.md)."""
    s = cfg.sync
    engine = SyncEngine(
        EngineSettings(
            limits=BudgetLimits(
                max_records=s.max_pending_records,
                warn_records=s.warn_pending_records,
                max_age_s=s.max_offline_age_s,
                warn_age_s=s.warn_offline_age_s,
                policy=s.offline_policy,
            ),
            alert_failure_rate=s.alert_failure_rate,
            flush_interval_s=s.flush_interval_s,
        )
    )
    f = cfg.fiskaly
    if f.enabled:
        try:
            key = cfg.path(f.api_key_file).read_text("utf-8").strip()
            secret = cfg.path(f.api_secret_file).read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"fiskaly: cannot read the API key or secret file: {exc}") from None
        client = FiskalyClient(
            FiskalySettings(
                base_url=f.base_url,
                api_key=key,
                api_secret=secret,
                system_id=f.system_id,
                api_version=f.api_version,
                connect_timeout_s=f.connect_timeout_s,
                read_timeout_s=f.read_timeout_s,
                total_timeout_s=f.total_timeout_s,
                token_refresh_margin_s=f.token_refresh_margin_s,
                retry_attempts=f.retry_attempts,
                retry_min_s=f.retry_min_s,
                retry_max_s=f.retry_max_s,
                busy_max_wait_s=f.busy_max_wait_s,
            )
        )
        engine.register(
            FiskalyUplink(client),
            ProcessorSettings(
                interval_s=f.interval_s,
                probe_min_s=f.probe_min_s,
                probe_max_s=f.probe_max_s,
                idle_probe_s=f.idle_probe_s,
            ),
        )
    register_batch_uplinks(cfg, engine)
    return engine


def _secret(cfg: Config, key: str, value: str) -> str:
    try:
        return cfg.path(value).read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {value}: {exc}") from None


def register_batch_uplinks(cfg: Config, engine: SyncEngine) -> None:
    """The batch processors ``[peppol]`` and ``[sifen]`` enable (docs/sync.md)."""
    p = cfg.peppol
    if p.enabled:
        seller = Party(
            name=p.seller_name,
            endpoint_id=p.seller_endpoint_id,
            country=p.seller_country,
            vat_id=p.seller_vat_id,
            address=p.seller_address,
        )
        goroute = GoRouteUplink(
            GoRouteSettings(
                base_url=p.base_url,
                api_key=_secret(cfg, "peppol.api_key_file", p.api_key_file),
                seller=seller,
                async_mode=p.async_mode,
                connect_timeout_s=p.connect_timeout_s,
                total_timeout_s=p.total_timeout_s,
                limits=Limits(p.max_docs, p.max_batch_bytes, p.max_doc_bytes),
            )
        )
        settings = BatchSettings(
            interval_s=p.interval_s,
            poll_interval_s=p.poll_interval_s,
            poll_timeout_s=p.poll_timeout_s,
            rate_limit=p.batches_per_minute,
            retry_after_max_s=p.retry_after_max_s,
        )
        engine.register_batch(BatchProcessor(engine, goroute, settings))
    s = cfg.sifen
    if s.enabled:
        issuer = Issuer(
            ruc=s.ruc,
            establishment=s.establishment,
            expedition_point=s.expedition_point,
            expedition_points=tuple(
                (till, point) for till, _, point in (x.partition("=") for x in s.expedition_points)
            ),
            taxpayer_type=s.taxpayer_type,
        )
        try:
            issuer.validate()
        except CdcError as exc:
            raise ConfigError(f"sifen: {exc}") from None
        sifen = SifenUplink(
            SifenSettings(
                base_url=s.base_url,
                token=_secret(cfg, "sifen.token_file", s.token_file),
                issuer=issuer,
                connect_timeout_s=s.connect_timeout_s,
                total_timeout_s=s.total_timeout_s,
                limits=Limits(s.max_docs, s.max_lote_bytes, s.max_lote_bytes),
            )
        )
        settings = BatchSettings(
            interval_s=s.interval_s,
            poll_interval_s=s.poll_interval_s,
            poll_timeout_s=s.poll_timeout_s,
            rate_limit=s.lotes_per_minute,
            retry_after_max_s=s.retry_after_max_s,
        )
        engine.register_batch(BatchProcessor(engine, sifen, settings))


def escpos_format(p: PrinterSection) -> tuple[Profile, Layout]:
    """The ESC/POS profile and page layout that ``[printer]`` describes."""
    profile = PROFILES[p.profile]
    if p.code_page:
        profile = replace(profile, code_page=p.code_page)
    layout = Layout(
        paper_width_mm=p.paper_width_mm,
        merchant=p.merchant,
        address=p.address,
        vat_id=p.vat_id,
        header=p.header,
        footer=p.footer,
        qr_module_dots=p.qr_module_dots,
        feed_lines=p.feed_lines,
        cut=p.cut,
        drawer_kick=p.drawer_kick,
        status_back=p.status_back,
    )
    return profile, layout


def escpos_printer(p: PrinterSection) -> EscposPrinter:
    """The ESC/POS printer that ``[printer]`` describes (kind serial, network or file)."""
    transport: Transport
    wire_bytes_per_s: float | None = None
    if p.kind == "serial":
        transport = SerialTransport(
            p.device, baud=p.baud, parity=p.parity, flow_control=p.flow_control
        )
        # start bit + 8 data bits (+ parity) + stop bit per byte
        wire_bytes_per_s = p.baud / (10 if p.parity == "none" else 11)
    elif p.kind == "network":
        transport = SocketTransport(p.device, connect_timeout_s=p.write_timeout_s)
    else:
        transport = FileTransport(p.device)
    profile, layout = escpos_format(p)
    return EscposPrinter(
        transport,
        profile,
        layout,
        status_queries=p.status_queries,
        status_timeout_s=p.status_timeout_s,
        write_timeout_s=p.write_timeout_s,
        wire_bytes_per_s=wire_bytes_per_s,
    )


class _Stop(Exception):
    """Raised inside the TaskGroup to cancel the workers once listeners are stopped."""


def add_run_parser(sub: Any) -> None:
    r = sub.add_parser("run", help="run the gateway daemon")
    r.add_argument(
        "--config", type=Path, default=None, help="TOML config (default: embedded defaults)"
    )
    r.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the database, keys, socket and virtual printer live",
    )
    r.add_argument(
        "--http",
        default=None,
        metavar="HOST:PORT",
        help="status/HTTP API address (default 127.0.0.1:8480; '' disables)",
    )
    r.set_defaults(func=cmd_run)


def add_print_test_parser(sub: Any) -> None:
    t = sub.add_parser(
        "print-test",
        help="print a test page on the configured printer (stop the daemon first: "
        "it holds a serial port exclusively)",
    )
    t.add_argument("--config", type=Path, default=None, help="TOML config")
    t.set_defaults(func=cmd_print_test)


def cmd_print_test(args: argparse.Namespace) -> int:
    """Status, then a test page (code page, columns, QR code), then the confirmation."""
    cfg = load_config(args.config)
    if cfg.printer.kind not in ("serial", "network", "file"):
        print(f"printer.kind is {cfg.printer.kind!r}: no ESC/POS printer to test")
        return EXIT_OK
    printer = escpos_printer(cfg.printer)
    pid = "9999"
    try:
        status = printer.status()
        if status is not None:
            print(f"status: {status.problem or 'ready'} {status.to_json()}")
            if not status.ready:
                return EXIT_FAIL
        printer.send(
            encode_test_page(printer.profile, printer.layout), pid if printer.confirms else None
        )
        if not printer.confirms:
            print(f"test page sent to {printer.name} (this printer cannot confirm printing)")
            return EXIT_OK
        if printer.wait_confirmation(pid, cfg.printer.confirm_timeout_s):
            print(f"test page printed on {printer.name} (confirmed)")
            return EXIT_OK
        print(f"test page sent to {printer.name}, but no confirmation arrived (check the profile)")
        return EXIT_FAIL
    except GatewayError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        printer.disconnect()


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, state_dir=args.state_dir, http=args.http)
    # Everything the daemon creates is private to it (as with the unit's UMask=0077); the POS
    # socket is the one exception and PosServer chmods it to pos.socket_mode explicitly.
    os.umask(0o077)
    # The event loop and the ledger writer thread share the GIL. With CPython's default 5 ms
    # switch interval a request parsed on the loop can wait a whole interval for the writer to
    # let go (and the reverse), which made group commits take ~5 ms each under load; 0.5 ms
    # keeps both sides moving (docs/performance.md, "POS socket").
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        cfg.gateway.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        setup_logging(cfg.logging.level, cfg.logging.format, cfg.log_path)
    except OSError as exc:
        print(f"error: CONFIG_ERROR: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    app = App(cfg, config_path=args.config, cli_state_dir=args.state_dir, cli_http=args.http)
    try:
        return asyncio.run(app.run())
    except KeyError_ as exc:
        log.error("signing key problem: %s", exc.message)
        return EXIT_CONFIG
    except ConfigError as exc:  # e.g. credential:NAME outside systemd
        log.error("bad configuration: %s", exc.message)
        return EXIT_CONFIG
    except GatewayError as exc:
        log.error("cannot start: %s: %s", exc.code, exc.message)
        return EXIT_FAIL
