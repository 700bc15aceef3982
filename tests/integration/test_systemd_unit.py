"""The shipped systemd files: the unit verifies, keeps its hardening, and what it promises
about the daemon holds.

``systemd-analyze verify`` checks the unit as systemd would load it (unknown keys, bad
values, missing binaries); ExecStart is rewritten to this venv's ``fiscal-gateway`` because
verify insists the binary exists, and nothing else is changed. ``MemoryDenyWriteExecute=`` is
checked for real: the daemon runs under the kernel's ``PR_SET_MDWE`` (the same refusal of
writable+executable memory) and signs a receipt.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
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

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "fiscal-gateway.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze missing (.ci/run installs systemd)"
)

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of a repeated key in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's entry point; otherwise identical."""
    binary = Path(sys.executable).parent / "fiscal-gateway"
    assert binary.exists(), f"{binary}: install the project (pip install -e .)"
    text = UNIT.read_text("utf-8")
    assert "ExecStart=/usr/bin/fiscal-gateway run " in text
    rewritten = text.replace("ExecStart=/usr/bin/fiscal-gateway ", f"ExecStart={binary} ", 1)
    unit = tmp_path / UNIT.name
    unit.write_text(rewritten, "utf-8")
    return unit


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_tempdir() as path:
        yield path


@needs_systemd_analyze
def test_systemd_unit_verify_reports_nothing(verifiable_unit: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(verifiable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    about_unit = [
        line
        for line in output.splitlines()
        if verifiable_unit.name in line or str(verifiable_unit.parent) in line
    ]
    assert result.returncode == 0, output
    assert about_unit == [], output


@needs_systemd_analyze
def test_systemd_unit_security_exposure_is_low(verifiable_unit: Path) -> None:
    """systemd's own score: 1.6 today ("OK"); fail if a change pushes it past 2.0."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "security",
            "--offline=true",
            "--threshold=20",
            "--no-pager",
            str(verifiable_unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_unit_has_the_promised_settings() -> None:
    s = unit_settings(UNIT.read_text("utf-8"))
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",
        "User": "fiscal-gateway",
        "StateDirectory": "fiscal-gateway",
        "StateDirectoryMode": "0700",
        "RuntimeDirectory": "fiscal-gateway",
        "RuntimeDirectoryMode": "0750",
        "ConfigurationDirectory": "fiscal-gateway",
        "LoadCredential": "signing-key:/etc/fiscal-gateway/signing.pem",
        "UMask": "0077",
        "SupplementaryGroups": "dialout",
        "DevicePolicy": "closed",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "ExecStart": "/usr/bin/fiscal-gateway run --config /etc/fiscal-gateway/fiscal-gateway.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], (key, s.get(key))
    assert s["DeviceAllow"] == ["char-ttyUSB rw", "char-ttyS rw", "char-ttyACM rw"]
    assert s["SystemCallFilter"][0] == "@system-service"
    assert "PrivateDevices" not in s  # it would hide the serial ports
    assert "DynamicUser" not in s


def test_systemd_unit_stop_timeout_exceeds_the_daemon_grace() -> None:
    """systemd must not SIGKILL a clean stop: TimeoutStopSec > gateway.stop_timeout_s."""
    from gateway.config import GatewaySection

    (value,) = unit_settings(UNIT.read_text("utf-8"))["TimeoutStopSec"]
    m = re.fullmatch(r"(\d+)s?", value)
    assert m is not None, value
    assert int(m.group(1)) >= GatewaySection().stop_timeout_s + 5


def test_systemd_sysusers_and_tmpfiles_match_the_unit() -> None:
    sysusers = [
        line.split()
        for line in (SYSTEMD / "fiscal-gateway.sysusers.conf").read_text("utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert sysusers[0][:3] == ["u", "fiscal-gateway", "-"]
    tmpfiles = {
        fields[1]: fields
        for fields in (
            line.split()
            for line in (SYSTEMD / "fiscal-gateway.tmpfiles.conf").read_text("utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
    }
    assert tmpfiles["/var/lib/fiscal-gateway"][:5] == [
        "d",
        "/var/lib/fiscal-gateway",
        "0700",
        "fiscal-gateway",
        "fiscal-gateway",
    ]
    assert tmpfiles["/etc/fiscal-gateway"][:5] == [
        "d",
        "/etc/fiscal-gateway",
        "0755",
        "root",
        "root",
    ]


def _mdwe_supported() -> bool:
    """PR_SET_MDWE (Linux 6.3+) can be probed with PR_GET_MDWE (66) without setting it."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(66, 0, 0, 0, 0) >= 0)


MDWE_WRAPPER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(99)
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(not _mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
def test_systemd_unit_memory_deny_write_execute_daemon_still_signs(
    short_dir: Path, tmp_path: Path
) -> None:
    """The daemon starts, signs (cryptography: Rust + OpenSSL), serves HTTP and stops with
    writable+executable memory refused by the kernel, as under MemoryDenyWriteExecute=yes.
    The wrapper sets PR_SET_MDWE, which execve keeps, then execs the daemon."""
    state = short_dir / "state"
    port = free_port()
    wrapper = [sys.executable, "-c", MDWE_WRAPPER]
    with GatewayProcess(
        tmp_path / "daemon.log", state_dir=state, http=f"127.0.0.1:{port}", wrapper=wrapper
    ) as gw:
        gw.wait_socket(state / "pos.sock")
        first = held_events(state / "gateway.db") + 1  # after the held START, KEY_GENERATED
        reply = pos_request(state / "pos.sock", sale("mdwe-1"))
        assert reply["ok"], reply
        assert reply["record"]["seq"] == first
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=10) as resp:
            assert resp.status == 200
        assert gw.stop() == 0, gw.log_text()


def test_systemd_unit_umask_0077_socket_still_0660_files_private(
    short_dir: Path, tmp_path: Path
) -> None:
    """Started with UMask=0077 (as the unit does), the POS socket is still 0660 (chmod after
    bind) and everything else the daemon creates is private."""
    state = short_dir / "state"
    with GatewayProcess(
        tmp_path / "daemon.log",
        state_dir=state,
        http=f"127.0.0.1:{free_port()}",
        wrapper=["/bin/sh", "-c", 'umask 0077 && exec "$@"', "sh"],
    ) as gw:
        gw.wait_socket(state / "pos.sock")
        assert pos_request(state / "pos.sock", sale("umask-1"))["ok"]
        assert stat.S_IMODE((state / "pos.sock").stat().st_mode) == 0o660
        for path in [state, *state.rglob("*")]:
            if path.name != "pos.sock":
                assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        assert gw.stop() == 0, gw.log_text()


def test_systemd_unit_every_setting_explained_in_operations_doc() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text("utf-8")
    missing = [key for key in unit_settings(UNIT.read_text("utf-8")) if f"`{key}=" not in doc]
    assert missing == [], f"docs/operations.md does not explain {missing}"
