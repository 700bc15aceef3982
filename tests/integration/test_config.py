"""Configuration: the example file, validation with field paths, exit 78, SIGHUP reload.

The example (config/fiscal-gateway.toml) is the documentation of every key, so it must parse,
hold every key, give each one a comment naming its default, and equal the embedded defaults
(the example intentionally differs from them nowhere: it *is* the default configuration,
written out; production changes are a comment block in it). The daemon tests run
``fiscal-gateway run`` as a subprocess; state directories are short temp dirs because the
POS socket path must fit in 107 bytes.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gateway_process import (
    GatewayProcess,
    free_port,
    held_events,
    pos_request,
    sale,
    short_tempdir,
)

from drivers.signers.software import generate_key
from gateway.config import Config, load_config, parse_config
from gateway.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "fiscal-gateway.toml"
EXIT_CONFIG = 78

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_tempdir() as path:
        yield path


def problems(text: str) -> dict[str, str]:
    """field path → code of every problem the config text has (empty if it is valid)."""
    try:
        parse_config(tomllib.loads(text))
    except ConfigError as exc:
        assert exc.details, exc.message
        assert all(d.field in exc.message for d in exc.details), exc.message
        return {d.field: d.code for d in exc.details}
    return {}


# ---------------------------------------------------------------------- the example file


def test_config_example_parses() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.source_sha256 and cfg.gateway.state_dir == Path("state")


def test_config_example_every_key_present() -> None:
    data = tomllib.loads(EXAMPLE.read_text("utf-8"))
    expected = {
        f.name: {k.name for k in dataclasses.fields(f.default_factory())}
        for f in dataclasses.fields(Config)
        if f.name != "source_sha256"
    }
    assert {section: set(keys) for section, keys in data.items()} == expected


def test_config_example_equals_embedded_defaults() -> None:
    """Docs and defaults agree: every value of the example is the built-in default."""
    example = load_config(EXAMPLE)
    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.name == "source_sha256":
            continue
        assert getattr(example, f.name) == getattr(defaults, f.name), f.name


def test_config_example_every_key_comment_names_its_default() -> None:
    """Each ``key = value`` line is preceded by a comment block that states the default."""
    comment: list[str] = []
    seen = 0
    for line in EXAMPLE.read_text("utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
        elif re.match(r"^[a-z_]+ = ", stripped):
            assert any("Default" in c for c in comment), f"{stripped}: no 'Default' comment"
            comment = []
            seen += 1
        else:
            comment = []
    assert seen == sum(len(v) for v in tomllib.loads(EXAMPLE.read_text("utf-8")).values())


def test_config_example_production_block_names_the_keys_to_change() -> None:
    text = EXAMPLE.read_text("utf-8")
    for needle in (
        'state_dir = "/var/lib/fiscal-gateway"',
        'socket    = "/run/fiscal-gateway/pos.sock"',
        'key_file  = "credential:signing-key"',
        "allowed   = [",
    ):
        assert needle in text, needle


def test_config_example_production_values_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """The production values of the comment block, applied to the example, are accepted."""
    data = tomllib.loads(EXAMPLE.read_text("utf-8"))
    data["gateway"].update(id="shop1-box1", state_dir="/var/lib/fiscal-gateway")
    data["signing"].update(key_file="credential:signing-key", generate_if_missing=False)
    data["pos"]["socket"] = "/run/fiscal-gateway/pos.sock"
    data["tills"]["allowed"] = ["till-1", "till-2"]
    data["ledger"]["currencies"] = ["EUR"]
    cfg = parse_config(data)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/fiscal-gateway.service")
    assert cfg.key_path == Path("/run/credentials/fiscal-gateway.service/signing-key")
    assert cfg.socket_path == Path("/run/fiscal-gateway/pos.sock")
    assert cfg.db_path == Path("/var/lib/fiscal-gateway/gateway.db")


# ---------------------------------------------------------------------- validation

INVALID = [
    # (id, TOML, field path, code)
    ("unknown-section", '[gatewy]\nid = "x"', "gatewy", "UNKNOWN_FIELD"),
    ("unknown-key", '[pos]\nsocket_path = "x"', "pos.socket_path", "UNKNOWN_FIELD"),
    ("section-not-table", 'tills = ["till-1"]', "tills", "TYPE"),
    ("int-as-string", '[pos]\nmax_line_bytes = "1MiB"', "pos.max_line_bytes", "TYPE"),
    ("int-as-bool", "[pos]\nmax_connections = true", "pos.max_connections", "TYPE"),
    ("int-as-float", "[ledger]\nmax_group = 1.5", "ledger.max_group", "TYPE"),
    (
        "bool-as-string",
        '[signing]\ngenerate_if_missing = "yes"',
        "signing.generate_if_missing",
        "TYPE",
    ),
    ("seconds-as-string", '[gateway]\nstop_timeout_s = "10s"', "gateway.stop_timeout_s", "TYPE"),
    ("string-as-int", "[logging]\nlevel = 3", "logging.level", "TYPE"),
    ("list-as-string", '[tills]\nallowed = "till-1"', "tills.allowed", "TYPE"),
    ("list-of-ints", "[ledger]\nvat_rates = [20]", "ledger.vat_rates", "TYPE"),
    ("empty-state-dir", '[gateway]\nstate_dir = ""', "gateway.state_dir", "TYPE"),
    ("zero", "[pos]\nmax_line_bytes = 0", "pos.max_line_bytes", "RANGE"),
    ("negative", "[pos]\nwrite_timeout_s = -1", "pos.write_timeout_s", "RANGE"),
    ("above-max", "[gateway]\nstop_timeout_s = 301", "gateway.stop_timeout_s", "RANGE"),
    ("group-too-big", "[ledger]\nmax_group = 10001", "ledger.max_group", "RANGE"),
    ("vat-rate-percent", '[ledger]\nvat_rates = ["20.00", "20%"]', "ledger.vat_rates[1]", "FORMAT"),
    ("vat-rate-one-decimal", '[ledger]\nvat_rates = ["5.5"]', "ledger.vat_rates[0]", "FORMAT"),
    ("no-vat-rates", "[ledger]\nvat_rates = []", "ledger.vat_rates", "RANGE"),
    ("currency-lowercase", '[ledger]\ncurrencies = ["eur"]', "ledger.currencies[0]", "FORMAT"),
    ("socket-mode-others", '[pos]\nsocket_mode = "0666"', "pos.socket_mode", "RANGE"),
    ("socket-mode-toml-int", "[pos]\nsocket_mode = 0o660", "pos.socket_mode", "TYPE"),
    ("socket-mode-not-octal", '[pos]\nsocket_mode = "0690"', "pos.socket_mode", "TYPE"),
    ("socket-path-too-long", f'[pos]\nsocket = "/run/{"s" * 110}.sock"', "pos.socket", "RANGE"),
    ("socket-empty", '[pos]\nsocket = ""', "pos.socket", "RANGE"),
    ("pos-tcp-public", '[pos]\ntcp = "0.0.0.0:9000"', "pos.tcp", "RANGE"),
    ("http-public", '[http]\nlisten = "0.0.0.0:8480"', "http.listen", "RANGE"),
    ("http-public-v6", '[http]\nlisten = "[::]:8480"', "http.listen", "RANGE"),
    ("http-no-port", '[http]\nlisten = "127.0.0.1"', "http.listen", "FORMAT"),
    ("http-port-range", '[http]\nlisten = "127.0.0.1:70000"', "http.listen", "FORMAT"),
    ("till-space", '[tills]\nallowed = ["till-1", "till 2"]', "tills.allowed[1]", "FORMAT"),
    ("till-leading-dash", '[tills]\nallowed = ["-till"]', "tills.allowed[0]", "FORMAT"),
    ("till-too-long", f'[tills]\nallowed = ["{"t" * 33}"]', "tills.allowed[0]", "FORMAT"),
    ("gateway-id", '[gateway]\nid = "gw 1"', "gateway.id", "FORMAT"),
    ("printer-kind", '[printer]\nkind = "thermal"', "printer.kind", "RANGE"),
    ("log-level", '[logging]\nlevel = "verbose"', "logging.level", "RANGE"),
    ("log-format", '[logging]\nformat = "xml"', "logging.format", "RANGE"),
    ("key-file-empty", '[signing]\nkey_file = ""', "signing.key_file", "RANGE"),
    ("credential-no-name", '[signing]\nkey_file = "credential:"', "signing.key_file", "FORMAT"),
    ("database-credential", '[ledger]\ndatabase = "credential:db"', "ledger.database", "RANGE"),
]


@pytest.mark.parametrize(
    ("text", "field", "code"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_config_invalid_value_reports_field_path(text: str, field: str, code: str) -> None:
    assert problems(text) == {field: code}


def test_config_many_problems_all_reported_at_once() -> None:
    text = """
[gatewy]
[gateway]
id = "gw 1"
stop_timeout_s = "ten"
[pos]
max_line_bytes = 0
socket_mode = "0777"
colour = "blue"
[ledger]
vat_rates = ["20.00", "7"]
[http]
listen = "192.0.2.1:80"
[tills]
allowed = ["till 1"]
"""
    assert problems(text) == {
        "gatewy": "UNKNOWN_FIELD",
        "gateway.id": "FORMAT",
        "gateway.stop_timeout_s": "TYPE",
        "pos.max_line_bytes": "RANGE",
        "pos.socket_mode": "RANGE",
        "pos.colour": "UNKNOWN_FIELD",
        "ledger.vat_rates[1]": "FORMAT",
        "http.listen": "RANGE",
        "tills.allowed[0]": "FORMAT",
    }


def test_config_non_loopback_http_allowed_when_opted_in() -> None:
    text = '[http]\nlisten = "0.0.0.0:8480"\nallow_non_loopback = true'
    assert problems(text) == {}


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:8480", "localhost:8480", "[::1]:8480", "127.0.0.2:1", ""]
)
def test_config_loopback_or_empty_http_listen_accepted(listen: str) -> None:
    assert problems(f'[http]\nlisten = "{listen}"') == {}


def test_config_not_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pos\nsocket = ", "utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_config(bad)


def test_config_cli_overrides_state_dir_and_http(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE, state_dir=tmp_path / "s", http="127.0.0.1:1234")
    assert cfg.db_path == tmp_path / "s" / "gateway.db"
    assert cfg.http.listen == "127.0.0.1:1234"


def test_config_credential_path_without_systemd_is_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = parse_config({"signing": {"key_file": "credential:signing-key"}})
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        _ = cfg.key_path


# ---------------------------------------------------------------------- `run` refuses to start


def test_config_run_bad_config_exits_78_with_field_paths(tmp_path: Path, run_cli: RunCli) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[pos]\nmax_line_bytes = "big"\n[tills]\nallowed = ["till 1"]\n', "utf-8")
    r = run_cli("run", "--config", bad, "--state-dir", tmp_path / "s")
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "pos.max_line_bytes: must be an integer" in r.stderr
    assert "tills.allowed[0]: is not a valid till id" in r.stderr
    assert not (tmp_path / "s").exists()  # refused before touching anything


def test_config_run_missing_config_file_exits_78(tmp_path: Path, run_cli: RunCli) -> None:
    r = run_cli("run", "--config", tmp_path / "nope.toml")
    assert r.returncode == EXIT_CONFIG
    assert "nope.toml" in r.stderr


def test_config_run_group_readable_key_exits_78(short_dir: Path, run_cli: RunCli) -> None:
    key = short_dir / "keys" / "signing.pem"
    generate_key(key)
    key.chmod(0o640)
    config = short_dir / "gw.toml"
    config.write_text(f'[signing]\nkey_file = "{key}"\n', "utf-8")
    r = run_cli("run", "--config", config, "--state-dir", short_dir / "s", "--http", "")
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert f"signing key {key} has mode 0640" in r.stderr
    assert f"chmod 600 {key}" in r.stderr
    assert not (short_dir / "s" / "pos.sock").exists()


def test_config_run_credential_key_outside_systemd_exits_78(
    short_dir: Path, run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = short_dir / "gw.toml"
    config.write_text('[signing]\nkey_file = "credential:signing-key"\n', "utf-8")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    r = run_cli("run", "--config", config, "--state-dir", short_dir / "s", "--http", "")
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "CREDENTIALS_DIRECTORY" in r.stderr


def test_config_run_credential_key_from_credentials_directory_signs(
    short_dir: Path, tmp_path: Path
) -> None:
    """What LoadCredential=signing-key:... gives the daemon: a 0400 copy in a private dir."""
    creds = short_dir / "creds"
    signer = generate_key(creds / "signing-key", creds / "signing-key.pub.pem")
    (creds / "signing-key").chmod(0o400)
    config = short_dir / "gw.toml"
    config.write_text(
        '[signing]\nkey_file = "credential:signing-key"\ngenerate_if_missing = false\n', "utf-8"
    )
    state = short_dir / "s"
    with GatewayProcess(
        tmp_path / "daemon.log",
        config=config,
        state_dir=state,
        http="",
        env={"CREDENTIALS_DIRECTORY": str(creds)},
    ) as gw:
        gw.wait_socket(state / "pos.sock")
        reply = pos_request(state / "pos.sock", sale("cred-1"))
        assert reply["ok"], reply
        assert reply["record"]["key_id"] == signer.key_id
        assert gw.stop() == 0, gw.log_text()
    assert not (state / "keys").exists()  # nothing generated next to the state


# ---------------------------------------------------------------------- the example runs


def test_config_example_starts_daemon_signs_and_stops_0(short_dir: Path, tmp_path: Path) -> None:
    state = short_dir / "state"
    port = free_port()
    with GatewayProcess(
        tmp_path / "daemon.log",
        config=EXAMPLE,
        state_dir=state,
        http=f"127.0.0.1:{port}",
        cwd=tmp_path,
    ) as gw:
        gw.wait_socket(state / "pos.sock")
        first = held_events(state / "gateway.db") + 1  # after the held START, KEY_GENERATED
        reply = pos_request(state / "pos.sock", sale("ex-1"))
        assert reply["ok"], reply
        assert reply["record"]["chain"] == "till-1" and reply["record"]["seq"] == first
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=10) as resp:
            assert resp.status == 200
        printed = state / "printer" / "virtual-printer.txt"
        deadline = time.monotonic() + 30
        while not (printed.exists() and "Café" in printed.read_text("utf-8")):
            assert time.monotonic() < deadline, "the receipt was not printed"
            time.sleep(0.05)
        assert (state / "keys" / "signing.pem").exists()  # generate_if_missing = true
        assert gw.stop() == 0, gw.log_text()
    assert not (tmp_path / "state").exists()  # --state-dir wins over the relative default
    assert not (state / "pos.sock").exists()  # removed on a clean stop


# ---------------------------------------------------------------------- SIGHUP


def write_config(path: Path, tills: list[str], level: str, extra: str = "") -> None:
    allowed = ", ".join(f'"{t}"' for t in tills)
    path.write_text(f'[tills]\nallowed = [{allowed}]\n[logging]\nlevel = "{level}"\n{extra}')


def msgs(gw: GatewayProcess) -> list[str]:
    return [str(r.get("msg")) for r in gw.log_records()]


@pytest.fixture
def reloadable(short_dir: Path, tmp_path: Path) -> Iterator[tuple[GatewayProcess, Path, Path]]:
    """A daemon on a config file the test rewrites: (process, config path, POS socket)."""
    config = tmp_path / "gw.toml"
    write_config(config, ["till-1", "till-2"], "warning")
    state = short_dir / "state"
    with GatewayProcess(
        tmp_path / "daemon.log", config=config, state_dir=state, http=f"127.0.0.1:{free_port()}"
    ) as gw:
        gw.wait_socket(state / "pos.sock")
        yield gw, config, state / "pos.sock"


def test_config_sighup_applies_allowed_tills_and_log_level(
    reloadable: tuple[GatewayProcess, Path, Path],
) -> None:
    gw, config, sock = reloadable
    assert pos_request(sock, sale("a-1", "till-2"))["ok"]
    assert not any(m.startswith("ready") for m in msgs(gw))  # info is below "warning"

    write_config(config, ["till-1"], "info", extra='[gateway]\nid = "gw-renamed"\n')
    gw.send_signal(signal.SIGHUP)
    gw.wait_for_log(lambda r: r.get("msg") == "allowed tills reloaded: till-1")

    refused = pos_request(sock, sale("a-2", "till-2"))
    assert not refused["ok"] and refused["error"]["code"] == "UNKNOWN_TILL", refused
    assert pos_request(sock, sale("a-3", "till-1"))["ok"]
    # info lines now reach the log, with their request context
    gw.wait_for_log(lambda r: r.get("code") == "UNKNOWN_TILL" and r.get("request_id") == "a-2")
    # a section that needs a restart is reported, not applied; CLI overrides are not "changes"
    changed = [m for m in msgs(gw) if "restart to apply" in m]
    assert changed == ["config section [gateway] changed; restart to apply it"], changed
    assert gw.stop() == 0, gw.log_text()


@pytest.mark.parametrize(
    "bad",
    ["[tills\nallowed = ", '[tills]\nallowed = ["till 9"]\n', "[pos]\nnope = 1\n"],
    ids=["not-toml", "bad-till", "unknown-key"],
)
def test_config_sighup_invalid_config_keeps_running_one(
    reloadable: tuple[GatewayProcess, Path, Path], bad: str
) -> None:
    gw, config, sock = reloadable
    config.write_text(bad, "utf-8")
    gw.send_signal(signal.SIGHUP)
    refusal = gw.wait_for_log(lambda r: str(r.get("msg", "")).startswith("reload refused"))
    assert refusal["level"] == "error"
    assert gw.alive()
    # the running configuration stays: both tills still allowed, level still "warning"
    assert pos_request(sock, sale("b-1", "till-1"))["ok"]
    assert pos_request(sock, sale("b-2", "till-2"))["ok"]
    assert not any(r.get("request_id") for r in gw.log_records())
    assert gw.stop() == 0, gw.log_text()
