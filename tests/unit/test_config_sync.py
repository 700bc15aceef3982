"""The [sync] and [fiskaly] sections: defaults valid, every bad value named by its field path."""

from __future__ import annotations

import tomllib

import pytest

from gateway.config import parse_config
from gateway.core.errors import ConfigError

ENABLED = """
[fiskaly]
enabled = true
base_url = "https://api.example.invalid/fr"
api_key_file = "credential:fiskaly-key"
api_secret_file = "fiskaly.secret"
system_id = "0189f7ea-ae2c-7809-8aeb-b819cf5e9e7f"
"""


def problems(text: str) -> dict[str, str]:
    try:
        parse_config(tomllib.loads(text))
    except ConfigError as exc:
        return {d.field: d.code for d in exc.details}
    return {}


def test_config_sync_defaults_and_enabled_example_valid() -> None:
    assert problems("") == {}
    assert problems(ENABLED) == {}
    cfg = parse_config(tomllib.loads(ENABLED))
    assert cfg.fiskaly.enabled and cfg.sync.max_pending_records == 9999


def test_config_sync_loopback_http_allowed_for_the_simulator() -> None:
    text = ENABLED.replace("https://api.example.invalid/fr", "http://127.0.0.1:8700")
    assert problems(text) == {}


@pytest.mark.parametrize(
    ("text", "field", "code"),
    [
        ("[sync]\nmax_pending_records = 10000", "sync.max_pending_records", "RANGE"),
        ("[sync]\nwarn_pending_records = 0", "sync.warn_pending_records", "RANGE"),
        (
            "[sync]\nwarn_offline_age_s = 10.0\nmax_offline_age_s = 5.0",
            "sync.warn_offline_age_s",
            "RANGE",
        ),
        ('[sync]\noffline_policy = "refuse"', "sync.offline_policy", "RANGE"),
        ("[sync]\nalert_failure_rate = 1.5", "sync.alert_failure_rate", "RANGE"),
        ('[fiskaly]\nbase_url = "http://192.0.2.1"', "fiskaly.base_url", "RANGE"),
        ('[fiskaly]\nbase_url = "ftp://x"', "fiskaly.base_url", "FORMAT"),
        ('[fiskaly]\napi_version = "2026-13-01"', "fiskaly.api_version", "FORMAT"),
        ("[fiskaly]\nretry_attempts = 0", "fiskaly.retry_attempts", "RANGE"),
        (
            "[fiskaly]\nread_timeout_s = 40.0\ntotal_timeout_s = 30.0",
            "fiskaly.total_timeout_s",
            "RANGE",
        ),
        ("[fiskaly]\nprobe_min_s = 10.0\nprobe_max_s = 5.0", "fiskaly.probe_min_s", "RANGE"),
        ('[fiskaly]\napi_key_file = "credential:"', "fiskaly.api_key_file", "FORMAT"),
    ],
)
def test_config_sync_invalid_value_reports_field_path(text: str, field: str, code: str) -> None:
    assert problems(text) == {field: code}


def test_config_fiskaly_enabled_needs_files_and_system_id() -> None:
    assert problems('[fiskaly]\nenabled = true\nbase_url = "https://x.invalid"') == {
        "fiskaly.api_key_file": "REQUIRED",
        "fiskaly.api_secret_file": "REQUIRED",
        "fiskaly.system_id": "FORMAT",
    }
