"""Configuration: TOML → validated, frozen dataclasses.

Parsing collects *every* problem with its field path (``pos.max_line_bytes``) and raises one
:class:`ConfigError` listing them; the CLI exits 78 (EX_CONFIG) so systemd does not
restart-loop on a bad file. No configuration at all is valid: every key has an embedded
default (SQLite and key in ``./state``, virtual printer, no cloud, MQTT off, status web server
on 127.0.0.1). Secrets are never values in the file, only paths to files holding them.
Relative paths are relative to ``gateway.state_dir``. A path may be written
``credential:NAME`` to mean ``$CREDENTIALS_DIRECTORY/NAME`` (systemd ``LoadCredential=``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from drivers.printers.escpos import (
    CODE_PAGES,
    CUTS,
    MAX_MODULE_DOTS,
    MIN_MODULE_DOTS,
    PAPER,
    PROFILES,
)
from drivers.printers.transport import BAUD_RATES, FLOW_CONTROLS, PARITIES, parse_socket_url
from gateway.core.closing import parse_closing_time, parse_year_end
from gateway.core.errors import ConfigError, Detail
from gateway.core.money import DEFAULT_VAT_RATES, RATE_RE
from gateway.core.request import CURRENCY_RE, TILL_RE

_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class GatewaySection:
    id: str = "gw-1"
    state_dir: Path = Path("state")
    stop_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class SigningSection:
    key_file: str = "keys/signing.pem"
    generate_if_missing: bool = True


@dataclass(frozen=True, slots=True)
class LedgerSection:
    database: str = "gateway.db"
    max_group: int = 512
    tail_verify: int = 1000
    vat_rates: tuple[str, ...] = DEFAULT_VAT_RATES
    currencies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PosSection:
    socket: str = "pos.sock"
    socket_mode: int = 0o660
    tcp: str = ""
    max_line_bytes: int = 1 << 20
    max_inflight_per_connection: int = 64
    max_connections: int = 1024
    write_timeout_s: float = 10.0
    max_batch_operations: int = 500


@dataclass(frozen=True, slots=True)
class HttpSection:
    listen: str = "127.0.0.1:8480"
    allow_non_loopback: bool = False
    admin_token_file: str = ""
    status_page_remote: bool = False
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True, slots=True)
class TillsSection:
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PrinterSection:
    """The receipt printer (docs/printers.md)."""

    kind: str = "virtual"
    print_receipts: bool = True
    device: str = ""
    baud: int = 19200
    parity: str = "none"
    flow_control: str = "rtscts"
    paper_width_mm: int = 80
    profile: str = "epson-tm"
    code_page: str = ""
    qr_module_dots: int = 6
    merchant: str = ""
    address: tuple[str, ...] = ()
    vat_id: str = ""
    header: tuple[str, ...] = ()
    footer: tuple[str, ...] = ()
    cut: str = "partial"
    feed_lines: int = 3
    drawer_kick: bool = False
    status_queries: bool = True
    status_back: bool = False
    status_timeout_s: float = 2.0
    write_timeout_s: float = 10.0
    confirm_timeout_s: float = 30.0
    poll_s: float = 2.0
    retry_max_s: float = 30.0


@dataclass(frozen=True, slots=True)
class LoggingSection:
    level: str = "info"
    format: str = "json"
    file: str = ""


@dataclass(frozen=True, slots=True)
class MqttSection:
    """Tills through a broker (docs/mqtt.md). Topics use ``gateway.id``."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 1883
    socket: str = ""
    protocol: str = "5"
    client_id: str = ""
    prefix: str = "fiscal"
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    session_expiry_s: int = 7 * 24 * 3600
    receive_maximum: int = 256
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password_file: str = ""
    max_payload_bytes: int = 1 << 20
    max_inflight_per_till: int = 8
    max_queued_per_till: int = 64
    publish_timeout_s: float = 10.0
    status_interval_s: float = 60.0
    status_check_s: float = 1.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    #: ``[mqtt.acl]``: broker user name → the till ids that account may send requests for
    #: (gateway.core.mqtt_acl). Empty: the gateway serves any till (the broker decides).
    acl: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class SyncSection:
    """The sync engine and the offline budget of every chain (docs/sync.md)."""

    max_pending_records: int = 9999
    warn_pending_records: int = 5000
    max_offline_age_s: float = 172800.0
    warn_offline_age_s: float = 86400.0
    offline_policy: str = "warn"
    alert_failure_rate: float = 0.1
    flush_interval_s: float = 0.2


@dataclass(frozen=True, slots=True)
class FiskalySection:
    """The ``france/fiskaly`` real-time uplink to fiskaly SIGN FR (docs/sync.md)."""

    enabled: bool = False
    base_url: str = ""
    api_key_file: str = ""
    api_secret_file: str = ""
    api_version: str = "2026-02-03"
    system_id: str = ""
    interval_s: float = 60.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    total_timeout_s: float = 30.0
    token_refresh_margin_s: float = 60.0
    retry_attempts: int = 3
    retry_min_s: float = 0.2
    retry_max_s: float = 5.0
    busy_max_wait_s: float = 60.0
    probe_min_s: float = 1.0
    probe_max_s: float = 300.0
    idle_probe_s: float = 30.0


@dataclass(frozen=True, slots=True)
class PeppolSection:
    """The ``peppol/goroute`` batch uplink: invoices as UBL through GoRoute (docs/sync.md)."""

    enabled: bool = False
    base_url: str = ""
    api_key_file: str = ""
    async_mode: bool = False
    seller_name: str = ""
    seller_endpoint_id: str = ""
    seller_country: str = ""
    seller_vat_id: str = ""
    seller_address: str = ""
    interval_s: float = 60.0
    poll_interval_s: float = 5.0
    poll_timeout_s: float = 300.0
    max_docs: int = 100
    max_batch_bytes: int = 50 * 1024 * 1024
    max_doc_bytes: int = 15 * 1024 * 1024
    batches_per_minute: int = 10
    retry_after_max_s: float = 300.0
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class SifenSection:
    """The ``paraguay/sifen`` batch uplink: documents in lotes to SIFEN (docs/sync.md)."""

    enabled: bool = False
    base_url: str = ""
    token_file: str = ""
    ruc: str = ""
    establishment: str = "001"
    expedition_point: str = "001"
    expedition_points: tuple[str, ...] = ()
    taxpayer_type: int = 2
    interval_s: float = 60.0
    poll_interval_s: float = 30.0
    poll_timeout_s: float = 300.0
    max_docs: int = 50
    max_lote_bytes: int = 1_000_000
    lotes_per_minute: int = 10
    retry_after_max_s: float = 300.0
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class JournalSection:
    """The fiscal journal: closings, technical events, clock, archives (docs/events.md,
    docs/record-format.md "Closings", docs/export-format.md "Archives")."""

    time_zone: str = "UTC"
    closing_time: str = "04:00"
    monthly_closing: bool = True
    yearly_closing: bool = True
    fiscal_year_end: str = "12-31"
    clock_jump_threshold_s: float = 300.0
    event_window_s: float = 60.0
    archive_period: str = "MONTHLY"
    archive_dir: str = "archives"


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewaySection = field(default_factory=GatewaySection)
    signing: SigningSection = field(default_factory=SigningSection)
    ledger: LedgerSection = field(default_factory=LedgerSection)
    pos: PosSection = field(default_factory=PosSection)
    http: HttpSection = field(default_factory=HttpSection)
    tills: TillsSection = field(default_factory=TillsSection)
    printer: PrinterSection = field(default_factory=PrinterSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    sync: SyncSection = field(default_factory=SyncSection)
    fiskaly: FiskalySection = field(default_factory=FiskalySection)
    peppol: PeppolSection = field(default_factory=PeppolSection)
    sifen: SifenSection = field(default_factory=SifenSection)
    journal: JournalSection = field(default_factory=JournalSection)
    source_sha256: str = ""

    def path(self, value: str) -> Path:
        """Resolve a configured path (relative → under state_dir; credential:NAME)."""
        if value.startswith("credential:"):
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            if not creds:
                raise ConfigError(
                    f"{value}: $CREDENTIALS_DIRECTORY is not set "
                    "(only under systemd with LoadCredential=)"
                )
            return Path(creds) / value.removeprefix("credential:")
        p = Path(value)
        return p if p.is_absolute() else self.gateway.state_dir / p

    @property
    def db_path(self) -> Path:
        return self.path(self.ledger.database)

    @property
    def key_path(self) -> Path:
        return self.path(self.signing.key_file)

    @property
    def socket_path(self) -> Path:
        return self.path(self.pos.socket)

    @property
    def log_path(self) -> Path | None:
        """``logging.file`` resolved like every other path; None means stderr (journald)."""
        return self.path(self.logging.file) if self.logging.file else None


class _Collector:
    def __init__(self) -> None:
        self.details: list[Detail] = []

    def err(self, path: str, message: str, code: str = "INVALID") -> None:
        self.details.append(Detail(path, message, code))


def _section_types() -> dict[str, type]:
    return {
        "gateway": GatewaySection,
        "signing": SigningSection,
        "ledger": LedgerSection,
        "pos": PosSection,
        "http": HttpSection,
        "tills": TillsSection,
        "printer": PrinterSection,
        "logging": LoggingSection,
        "mqtt": MqttSection,
        "sync": SyncSection,
        "fiskaly": FiskalySection,
        "peppol": PeppolSection,
        "sifen": SifenSection,
        "journal": JournalSection,
    }


def _convert(c: _Collector, path: str, raw: Any, default: Any) -> Any:
    """Convert a TOML value to the type of the default, or record an error."""
    if isinstance(default, bool):
        if type(raw) is not bool:
            c.err(path, "must be true or false", "TYPE")
            return default
        return raw
    if isinstance(default, int) and not isinstance(default, bool):
        if path.endswith("socket_mode"):
            if isinstance(raw, str) and re.fullmatch(r"0?[0-7]{3}", raw):
                return int(raw, 8)
            c.err(path, 'must be an octal string such as "0660"', "TYPE")
            return default
        if type(raw) is not int:
            c.err(path, "must be an integer", "TYPE")
            return default
        return raw
    if isinstance(default, float):
        if type(raw) not in (int, float):
            c.err(path, "must be a number (seconds)", "TYPE")
            return default
        return float(raw)
    if isinstance(default, Path):
        if not isinstance(raw, str) or not raw:
            c.err(path, "must be a non-empty path string", "TYPE")
            return default
        return Path(raw)
    if path == "mqtt.acl":
        return _convert_mqtt_acl(c, raw)
    if isinstance(default, tuple):
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            c.err(path, "must be a list of strings", "TYPE")
            return default
        return tuple(raw)
    if isinstance(default, str):
        if not isinstance(raw, str):
            c.err(path, "must be a string", "TYPE")
            return default
        return raw
    raise AssertionError(f"unsupported default for {path}")


def _convert_mqtt_acl(c: _Collector, raw: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``[mqtt.acl]``: a table of user name = list of till ids (checked in _validate_mqtt_acl)."""
    if not isinstance(raw, dict):
        c.err("mqtt.acl", 'must be a table: user = ["till-1", ...]', "TYPE")
        return ()
    out = []
    for user, tills in raw.items():
        if not isinstance(tills, list) or not all(isinstance(t, str) for t in tills):
            c.err(f"mqtt.acl.{user}", "must be a list of till ids", "TYPE")
            continue
        out.append((user, tuple(tills)))
    return tuple(out)


def parse_config(data: dict[str, Any], *, source_sha256: str = "") -> Config:
    c = _Collector()
    sections: dict[str, Any] = {}
    types = _section_types()
    for name in data:
        if name not in types:
            c.err(name, "is not a known section", "UNKNOWN_FIELD")
    for name, cls in types.items():
        raw = data.get(name, {})
        default = cls()
        if not isinstance(raw, dict):
            c.err(name, "must be a table", "TYPE")
            sections[name] = default
            continue
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                c.err(f"{name}.{key}", "is not a known key", "UNKNOWN_FIELD")
        values = {}
        for key in known & raw.keys():
            values[key] = _convert(c, f"{name}.{key}", raw[key], getattr(default, key))
        sections[name] = replace(default, **values)
    cfg = Config(**sections, source_sha256=source_sha256)
    # A value with the wrong type was replaced by its (valid) default above, so the range and
    # format checks can run too and every problem is reported at once.
    _validate(c, cfg)
    if c.details:
        first = c.details[0]
        lines = "\n".join(f"  {d.field}: {d.message}" for d in c.details)
        raise ConfigError(
            f"invalid configuration ({len(c.details)} problem(s)); first: "
            f"{first.field}: {first.message}\n{lines}",
            c.details,
        )
    return cfg


def _positive(c: _Collector, path: str, value: float, hi: float | None = None) -> None:
    if value <= 0 or (hi is not None and value > hi):
        c.err(path, f"must be > 0{f' and <= {hi}' if hi is not None else ''}", "RANGE")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8480")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: ``sun_path`` holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

#: The MQTT secrets and TLS files (optional; may be systemd credentials).
_MQTT_FILE_KEYS = ("mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file", "mqtt.password_file")

#: The keys that may name a systemd credential: secrets, read-only. A database or a socket
#: there could not be written.
_CREDENTIAL_KEYS = (
    "signing.key_file",
    "http.admin_token_file",
    "mqtt.ca_file",
    "mqtt.cert_file",
    "mqtt.key_file",
    "mqtt.password_file",
    "fiskaly.api_key_file",
    "fiskaly.api_secret_file",
    "peppol.api_key_file",
    "sifen.token_file",
)


def _check_paths(c: _Collector, cfg: Config) -> None:
    optional = (
        "http.admin_token_file",
        "logging.file",
        *_MQTT_FILE_KEYS,
        "fiskaly.api_key_file",
        "fiskaly.api_secret_file",
        "peppol.api_key_file",
        "sifen.token_file",
    )
    for key in ("signing.key_file", "ledger.database", "pos.socket", *optional):
        section, _, name = key.partition(".")
        value: str = getattr(getattr(cfg, section), name)
        if value.startswith("credential:"):
            if key not in _CREDENTIAL_KEYS:
                c.err(key, "cannot be a systemd credential (those are read-only)", "RANGE")
            elif not re.fullmatch(r"credential:[A-Za-z0-9][A-Za-z0-9._-]*", value):
                c.err(key, "must be credential:NAME with a credential name", "FORMAT")
        elif not value and key not in optional:
            c.err(key, "must be a non-empty path", "RANGE")
    if cfg.pos.socket and not cfg.pos.socket.startswith("credential:"):
        size = len(os.fsencode(cfg.socket_path))
        if size > MAX_SOCKET_PATH_BYTES:
            c.err(
                "pos.socket",
                f"resolves to {cfg.socket_path} ({size} bytes); a Unix socket path must be at "
                f"most {MAX_SOCKET_PATH_BYTES} bytes",
                "RANGE",
            )


def _validate(c: _Collector, cfg: Config) -> None:
    _check_paths(c, cfg)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", cfg.gateway.id):
        c.err("gateway.id", "must be 1-32 characters of A-Z a-z 0-9 . _ -", "FORMAT")
    _positive(c, "gateway.stop_timeout_s", cfg.gateway.stop_timeout_s, 300)
    _positive(c, "ledger.max_group", cfg.ledger.max_group, 10_000)
    _positive(c, "ledger.tail_verify", cfg.ledger.tail_verify, 10_000_000)
    if not cfg.ledger.vat_rates:
        c.err("ledger.vat_rates", "must list at least one rate", "RANGE")
    for i, rate in enumerate(cfg.ledger.vat_rates):
        if not RATE_RE.match(rate):
            c.err(f"ledger.vat_rates[{i}]", 'must be a decimal string such as "20.00"', "FORMAT")
    for i, cur in enumerate(cfg.ledger.currencies):
        if not CURRENCY_RE.match(cur):
            c.err(f"ledger.currencies[{i}]", "must be an ISO 4217 code", "FORMAT")
    _positive(c, "pos.max_line_bytes", cfg.pos.max_line_bytes, 64 << 20)
    _positive(c, "pos.max_inflight_per_connection", cfg.pos.max_inflight_per_connection, 10_000)
    _positive(c, "pos.max_connections", cfg.pos.max_connections, 100_000)
    _positive(c, "pos.write_timeout_s", cfg.pos.write_timeout_s, 3600)
    _positive(c, "pos.max_batch_operations", cfg.pos.max_batch_operations, 100_000)
    if cfg.pos.socket_mode & 0o007:
        c.err("pos.socket_mode", "must not give access to others (e.g. 0660)", "RANGE")
    if cfg.pos.tcp:
        try:
            host, _ = parse_listen(cfg.pos.tcp)
            if not is_loopback(host):
                c.err("pos.tcp", "the POS TCP listener binds to loopback only", "RANGE")
        except ValueError as exc:
            c.err("pos.tcp", str(exc), "FORMAT")
    if cfg.http.listen:
        try:
            host, _ = parse_listen(cfg.http.listen)
            if not is_loopback(host) and not cfg.http.allow_non_loopback:
                c.err(
                    "http.listen",
                    "binds beyond loopback; set http.allow_non_loopback = true to allow it",
                    "RANGE",
                )
        except ValueError as exc:
            c.err("http.listen", str(exc), "FORMAT")
    _positive(c, "http.max_body_bytes", cfg.http.max_body_bytes, 64 << 20)
    for i, till in enumerate(cfg.tills.allowed):
        if not TILL_RE.match(till):
            c.err(f"tills.allowed[{i}]", "is not a valid till id", "FORMAT")
    _validate_printer(c, cfg.printer)
    if cfg.logging.level not in _LOG_LEVELS:
        c.err("logging.level", f"must be one of {', '.join(_LOG_LEVELS)}", "RANGE")
    if cfg.logging.format not in ("json", "text"):
        c.err("logging.format", 'must be "json" or "text"', "RANGE")
    _validate_mqtt(c, cfg.mqtt)
    _validate_mqtt_acl(c, cfg)
    _validate_sync(c, cfg.sync)
    _validate_fiskaly(c, cfg.fiskaly)
    _validate_batch_uplinks(c, cfg.peppol, cfg.sifen)
    _validate_journal(c, cfg.journal)


PRINTER_KINDS = ("virtual", "none", "serial", "network", "file")


def _validate_printer(c: _Collector, p: PrinterSection) -> None:
    if p.kind not in PRINTER_KINDS:
        c.err("printer.kind", f"must be one of {', '.join(PRINTER_KINDS)}", "RANGE")
    if p.kind in ("serial", "file") and not p.device.startswith("/"):
        c.err("printer.device", "must be an absolute path, e.g. /dev/serial/by-id/...", "RANGE")
    if p.kind == "network":
        try:
            parse_socket_url(p.device)
        except ValueError as exc:
            c.err("printer.device", str(exc), "FORMAT")
    if p.baud not in BAUD_RATES:
        c.err("printer.baud", f"must be one of {', '.join(map(str, BAUD_RATES))}", "RANGE")
    if p.parity not in PARITIES:
        c.err("printer.parity", f"must be one of {', '.join(PARITIES)}", "RANGE")
    if p.flow_control not in FLOW_CONTROLS:
        why = " (Linux has no DSR/DTR output flow control)" if p.flow_control == "dsrdtr" else ""
        c.err("printer.flow_control", f"must be one of {', '.join(FLOW_CONTROLS)}{why}", "RANGE")
    if p.paper_width_mm not in PAPER:
        c.err("printer.paper_width_mm", f"must be one of {', '.join(map(str, PAPER))}", "RANGE")
    if p.profile not in PROFILES:
        c.err("printer.profile", f"must be one of {', '.join(PROFILES)}", "RANGE")
    if p.code_page and p.code_page not in CODE_PAGES:
        c.err("printer.code_page", f"must be empty or one of {', '.join(CODE_PAGES)}", "RANGE")
    if not MIN_MODULE_DOTS <= p.qr_module_dots <= MAX_MODULE_DOTS:
        c.err("printer.qr_module_dots", f"must be {MIN_MODULE_DOTS}-{MAX_MODULE_DOTS}", "RANGE")
    if p.cut not in CUTS:
        c.err("printer.cut", f"must be one of {', '.join(CUTS)}", "RANGE")
    if not 0 <= p.feed_lines <= 20:
        c.err("printer.feed_lines", "must be 0-20", "RANGE")
    _positive(c, "printer.status_timeout_s", p.status_timeout_s, 60)
    _positive(c, "printer.write_timeout_s", p.write_timeout_s, 600)
    _positive(c, "printer.confirm_timeout_s", p.confirm_timeout_s, 600)
    _positive(c, "printer.poll_s", p.poll_s, 3600)
    _positive(c, "printer.retry_max_s", p.retry_max_s, 3600)


#: MQTT topic levels built from the prefix: no wildcards, no empty level, no ``$`` start.
_MQTT_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_MQTT_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _validate_mqtt(c: _Collector, m: MqttSection) -> None:
    if m.protocol not in ("5", "3.1.1"):
        c.err("mqtt.protocol", 'must be "5" or "3.1.1"', "RANGE")
    if not 0 < m.port < 65536:
        c.err("mqtt.port", "must be 1-65535", "RANGE")
    if not m.socket and not m.host:
        c.err("mqtt.host", "must name the broker (or set mqtt.socket)", "RANGE")
    if m.socket and m.tls:
        c.err("mqtt.tls", "is for TCP; a Unix socket broker connection is local", "RANGE")
    if m.client_id and not _MQTT_CLIENT_ID_RE.fullmatch(m.client_id):
        c.err("mqtt.client_id", "must be 1-64 characters of A-Z a-z 0-9 . _ -", "FORMAT")
    if not _MQTT_PREFIX_RE.fullmatch(m.prefix):
        c.err("mqtt.prefix", "must be topic levels of A-Z a-z 0-9 . _ - joined by /", "FORMAT")
    _positive(c, "mqtt.keepalive_s", m.keepalive_s, 65535)
    _positive(c, "mqtt.connect_timeout_s", m.connect_timeout_s, 600)
    if not 0 <= m.session_expiry_s <= 0xFFFFFFFF:
        c.err("mqtt.session_expiry_s", "must be 0-4294967295", "RANGE")
    _positive(c, "mqtt.receive_maximum", m.receive_maximum, 65535)
    for key in ("ca_file", "cert_file", "key_file"):
        if getattr(m, key) and not m.tls:
            c.err(f"mqtt.{key}", "is only used with mqtt.tls = true", "RANGE")
    if bool(m.cert_file) != bool(m.key_file):
        c.err("mqtt.cert_file", "a client certificate needs both cert_file and key_file", "RANGE")
    if m.password_file and not m.username:
        c.err("mqtt.password_file", "needs mqtt.username", "RANGE")
    _positive(c, "mqtt.max_payload_bytes", m.max_payload_bytes, 64 << 20)
    _positive(c, "mqtt.max_inflight_per_till", m.max_inflight_per_till, 10_000)
    if m.max_queued_per_till < 0 or m.max_queued_per_till > 100_000:
        c.err("mqtt.max_queued_per_till", "must be 0-100000", "RANGE")
    _positive(c, "mqtt.publish_timeout_s", m.publish_timeout_s, 3600)
    _positive(c, "mqtt.status_interval_s", m.status_interval_s, 86400)
    _positive(c, "mqtt.status_check_s", m.status_check_s, 3600)
    _positive(c, "mqtt.reconnect_min_s", m.reconnect_min_s, 3600)
    _positive(c, "mqtt.reconnect_max_s", m.reconnect_max_s, 3600)
    if m.reconnect_min_s > m.reconnect_max_s:
        c.err("mqtt.reconnect_min_s", "must not exceed mqtt.reconnect_max_s", "RANGE")


#: Broker user names in [mqtt.acl]: what a Mosquitto acl_file ``user`` line can carry safely.
_MQTT_USER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def _validate_mqtt_acl(c: _Collector, cfg: Config) -> None:
    m = cfg.mqtt
    for user, tills in m.acl:
        key = f"mqtt.acl.{user}"
        if not _MQTT_USER_RE.fullmatch(user):
            c.err(key, "user name must be 1-64 characters of A-Z a-z 0-9 . _ @ -", "FORMAT")
        elif m.username and user == m.username:
            c.err(key, "is the gateway's own account (mqtt.username), not a till account", "RANGE")
        if not tills:
            c.err(key, "must list at least one till id", "RANGE")
        for i, till in enumerate(tills):
            if not TILL_RE.match(till):
                c.err(f"{key}[{i}]", "is not a valid till id", "FORMAT")
            elif till in tills[:i]:
                c.err(f"{key}[{i}]", f"{till!r} is listed twice", "RANGE")
            elif cfg.tills.allowed and till not in cfg.tills.allowed:
                c.err(f"{key}[{i}]", f"{till!r} is not in tills.allowed", "RANGE")


def _validate_sync(c: _Collector, s: SyncSection) -> None:
    if not 1 <= s.max_pending_records <= 9999:
        c.err(
            "sync.max_pending_records",
            "must be 1-9999 (X-Replay-Remaining has 4 digits)",
            "RANGE",
        )
    if not 1 <= s.warn_pending_records <= max(1, s.max_pending_records):
        c.err("sync.warn_pending_records", "must be 1-sync.max_pending_records", "RANGE")
    _positive(c, "sync.max_offline_age_s", s.max_offline_age_s, 366 * 86400)
    _positive(c, "sync.warn_offline_age_s", s.warn_offline_age_s, 366 * 86400)
    if s.warn_offline_age_s > s.max_offline_age_s:
        c.err("sync.warn_offline_age_s", "must not exceed sync.max_offline_age_s", "RANGE")
    if s.offline_policy not in ("warn", "block"):
        c.err("sync.offline_policy", 'must be "warn" or "block"', "RANGE")
    _positive(c, "sync.alert_failure_rate", s.alert_failure_rate, 1.0)
    _positive(c, "sync.flush_interval_s", s.flush_interval_s, 60)


_UUID7_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_API_VERSION_RE = re.compile(r"[0-9]{4}-(0[1-9]|1[012])-(0[1-9]|[12][0-9]|3[01])")


def _validate_fiskaly(c: _Collector, f: FiskalySection) -> None:
    if f.enabled:
        for key in ("api_key_file", "api_secret_file"):
            if not getattr(f, key):
                c.err(f"fiskaly.{key}", "is required when fiskaly.enabled = true", "REQUIRED")
        if not _UUID7_RE.fullmatch(f.system_id):
            c.err("fiskaly.system_id", "must be the System's id, a lowercase UUID v7", "FORMAT")
    if f.enabled or f.base_url:
        m = re.fullmatch(r"(https?)://([^/:]+|\[[0-9a-fA-F:]+\])(:\d{1,5})?(/[^\s]*)?", f.base_url)
        if m is None:
            c.err("fiskaly.base_url", "must be an http(s)://host[:port][/path] URL", "FORMAT")
        elif m.group(1) == "http" and not is_loopback(m.group(2).strip("[]")):
            c.err(
                "fiskaly.base_url",
                "must be https (plain http only to a loopback simulator)",
                "RANGE",
            )
    if not _API_VERSION_RE.fullmatch(f.api_version):
        c.err("fiskaly.api_version", "must be a date YYYY-MM-DD", "FORMAT")
    _positive(c, "fiskaly.interval_s", f.interval_s, 86400)
    _positive(c, "fiskaly.connect_timeout_s", f.connect_timeout_s, 600)
    _positive(c, "fiskaly.read_timeout_s", f.read_timeout_s, 600)
    _positive(c, "fiskaly.total_timeout_s", f.total_timeout_s, 600)
    if f.total_timeout_s < max(f.connect_timeout_s, f.read_timeout_s):
        c.err(
            "fiskaly.total_timeout_s",
            "must be at least connect_timeout_s and read_timeout_s",
            "RANGE",
        )
    if not 0 <= f.token_refresh_margin_s <= 3600:
        c.err("fiskaly.token_refresh_margin_s", "must be 0-3600", "RANGE")
    if not 1 <= f.retry_attempts <= 20:
        c.err("fiskaly.retry_attempts", "must be 1-20", "RANGE")
    _positive(c, "fiskaly.retry_min_s", f.retry_min_s, 600)
    _positive(c, "fiskaly.retry_max_s", f.retry_max_s, 3600)
    if f.retry_min_s > f.retry_max_s:
        c.err("fiskaly.retry_min_s", "must not exceed fiskaly.retry_max_s", "RANGE")
    _positive(c, "fiskaly.busy_max_wait_s", f.busy_max_wait_s, 3600)
    _positive(c, "fiskaly.probe_min_s", f.probe_min_s, 3600)
    _positive(c, "fiskaly.probe_max_s", f.probe_max_s, 86400)
    if f.probe_min_s > f.probe_max_s:
        c.err("fiskaly.probe_min_s", "must not exceed fiskaly.probe_max_s", "RANGE")
    _positive(c, "fiskaly.idle_probe_s", f.idle_probe_s, 3600)


def _validate_base_url(c: _Collector, key: str, url: str) -> None:
    m = re.fullmatch(r"(https?)://([^/:]+|\[[0-9a-fA-F:]+\])(:\d{1,5})?(/[^\s]*)?", url)
    if m is None:
        c.err(key, "must be an http(s)://host[:port][/path] URL", "FORMAT")
    elif m.group(1) == "http" and not is_loopback(m.group(2).strip("[]")):
        c.err(key, "must be https (plain http only to a loopback simulator)", "RANGE")


def _validate_batch_uplinks(c: _Collector, p: PeppolSection, s: SifenSection) -> None:
    if p.enabled:
        for key in ("api_key_file", "seller_name", "seller_endpoint_id", "seller_country"):
            if not getattr(p, key):
                c.err(f"peppol.{key}", "is required when peppol.enabled = true", "REQUIRED")
        if p.seller_endpoint_id and not re.fullmatch(r"[0-9]{4}:\S+", p.seller_endpoint_id):
            c.err("peppol.seller_endpoint_id", "must be <scheme>:<id>, e.g. 0009:123", "FORMAT")
        if p.seller_country and not re.fullmatch(r"[A-Z]{2}", p.seller_country):
            c.err("peppol.seller_country", "must be an ISO 3166 alpha-2 code", "FORMAT")
    if p.enabled or p.base_url:
        _validate_base_url(c, "peppol.base_url", p.base_url)
    if s.enabled:
        for key in ("token_file", "ruc"):
            if not getattr(s, key):
                c.err(f"sifen.{key}", "is required when sifen.enabled = true", "REQUIRED")
        if s.ruc and not re.fullmatch(r"[0-9]{1,8}-[0-9]", s.ruc):
            c.err("sifen.ruc", "must be <1-8 digits>-<check digit>", "FORMAT")
    if s.enabled or s.base_url:
        _validate_base_url(c, "sifen.base_url", s.base_url)
        # SIFEN asks for 30-60 s between queries of a lote: faster only against a simulator
        host = re.match(r"https?://(\[[0-9a-fA-F:]+\]|[^/:]+)", s.base_url)
        if s.poll_interval_s < 30 and not (host and is_loopback(host.group(1).strip("[]"))):
            c.err(
                "sifen.poll_interval_s",
                "must be >= 30 (SIFEN asks for 30-60 s); shorter only to a loopback simulator",
                "RANGE",
            )
    for key in ("establishment", "expedition_point"):
        if not re.fullmatch(r"[0-9]{3}", getattr(s, key)):
            c.err(f"sifen.{key}", "must be 3 digits", "FORMAT")
    for i, item in enumerate(s.expedition_points):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}=[0-9]{3}", item):
            c.err(f"sifen.expedition_points[{i}]", 'must be "<till>=<3 digits>"', "FORMAT")
    if s.taxpayer_type not in (1, 2):
        c.err("sifen.taxpayer_type", "must be 1 (natural person) or 2 (legal entity)", "RANGE")
    for name, sec in (("peppol", p), ("sifen", s)):
        _positive(c, f"{name}.interval_s", sec.interval_s, 86400)
        _positive(c, f"{name}.poll_interval_s", sec.poll_interval_s, 3600)
        _positive(c, f"{name}.poll_timeout_s", sec.poll_timeout_s, 86400)
        _positive(c, f"{name}.connect_timeout_s", sec.connect_timeout_s, 600)
        _positive(c, f"{name}.total_timeout_s", sec.total_timeout_s, 600)
        _positive(c, f"{name}.retry_after_max_s", sec.retry_after_max_s, 86400)
    if not 1 <= p.max_docs <= 100:
        c.err("peppol.max_docs", "must be 1-100 (GoRoute's limit)", "RANGE")
    if not 1024 <= p.max_batch_bytes <= 50 * 1024 * 1024:
        c.err("peppol.max_batch_bytes", "must be 1024 - 52428800 (50 MB)", "RANGE")
    if not 1024 <= p.max_doc_bytes <= min(p.max_batch_bytes, 15 * 1024 * 1024):
        c.err("peppol.max_doc_bytes", "must be 1024 - min(max_batch_bytes, 15 MB)", "RANGE")
    if not 1 <= p.batches_per_minute <= 10:
        c.err("peppol.batches_per_minute", "must be 1-10 (GoRoute's limit)", "RANGE")
    if not 1 <= s.max_docs <= 50:
        c.err("sifen.max_docs", "must be 1-50 (SIFEN's lote)", "RANGE")
    if not 1024 <= s.max_lote_bytes <= 10_000_000:
        c.err("sifen.max_lote_bytes", "must be 1024 - 10000000", "RANGE")
    if not 1 <= s.lotes_per_minute <= 600:
        c.err("sifen.lotes_per_minute", "must be 1-600", "RANGE")


ARCHIVE_PERIODS = ("MONTHLY", "YEARLY", "")


def _validate_journal(c: _Collector, j: JournalSection) -> None:
    try:
        ZoneInfo(j.time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        c.err("journal.time_zone", "must be an IANA time zone such as Europe/Paris", "RANGE")
    if j.closing_time:
        try:
            parse_closing_time(j.closing_time)
        except ValueError as exc:
            c.err("journal.closing_time", f"{exc} (or empty: no scheduled closings)", "FORMAT")
    try:
        parse_year_end(j.fiscal_year_end)
    except ValueError as exc:
        c.err("journal.fiscal_year_end", f"{exc}, a day every year has", "FORMAT")
    _positive(c, "journal.clock_jump_threshold_s", j.clock_jump_threshold_s, 366 * 86400)
    _positive(c, "journal.event_window_s", j.event_window_s, 86400)
    if j.archive_period not in ARCHIVE_PERIODS:
        c.err("journal.archive_period", 'must be "MONTHLY", "YEARLY" or "" (off)', "RANGE")
    if j.archive_period and not j.archive_dir:
        c.err("journal.archive_dir", "must be a directory when archives are made", "RANGE")


def load_config(
    path: Path | None, *, state_dir: Path | None = None, http: str | None = None
) -> Config:
    """Read and validate a config file (None: embedded defaults), then CLI overrides."""
    if path is None:
        data: dict[str, Any] = {}
        digest = hashlib.sha256(b"").hexdigest()
    else:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        digest = hashlib.sha256(raw).hexdigest()
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if state_dir is not None:
        data.setdefault("gateway", {})
        if isinstance(data["gateway"], dict):
            data["gateway"]["state_dir"] = str(state_dir)
    if http is not None:
        data.setdefault("http", {})
        if isinstance(data["http"], dict):
            data["http"]["listen"] = http
    return parse_config(data, source_sha256=digest)
