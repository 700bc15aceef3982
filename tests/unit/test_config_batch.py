"""The [peppol] and [sifen] sections: defaults valid, every bad value named by its field path."""

from __future__ import annotations

import tomllib

from gateway.config import parse_config
from gateway.core.errors import ConfigError

ENABLED = """
[peppol]
enabled = true
base_url = "https://app.goroute.ai/peppol-api"
api_key_file = "credential:goroute-key"
seller_name = "Boulangerie"
seller_endpoint_id = "0009:12345678900011"
seller_country = "FR"

[sifen]
enabled = true
base_url = "http://127.0.0.1:8720"
token_file = "sifen.token"
ruc = "80069563-1"
expedition_points = ["till-2=002"]
"""


def problems(text: str) -> dict[str, str]:
    try:
        parse_config(tomllib.loads(text))
    except ConfigError as exc:
        return {d.field: d.code for d in exc.details}
    return {}


def test_config_batch_defaults_and_enabled_example_valid() -> None:
    assert problems("") == {}
    assert problems(ENABLED) == {}
    cfg = parse_config(tomllib.loads(ENABLED))
    assert cfg.peppol.max_docs == 100 and cfg.peppol.batches_per_minute == 10
    assert cfg.sifen.poll_interval_s == 30.0 and cfg.sifen.poll_timeout_s == 300.0
    assert cfg.peppol.retry_after_max_s == 300.0 == cfg.sifen.retry_after_max_s


def test_config_batch_enabled_without_required_keys_named() -> None:
    got = problems("[peppol]\nenabled = true\n[sifen]\nenabled = true\n")
    for key in (
        "peppol.api_key_file",
        "peppol.seller_name",
        "peppol.seller_endpoint_id",
        "peppol.seller_country",
        "peppol.base_url",
        "sifen.token_file",
        "sifen.ruc",
        "sifen.base_url",
    ):
        assert key in got, key


def test_config_batch_limits_over_the_apis_refused() -> None:
    text = ENABLED + "\n"
    text = text.replace(
        'seller_country = "FR"',
        'seller_country = "FR"\nmax_docs = 101\nbatches_per_minute = 11\nmax_doc_bytes = 20000000'
        "\nretry_after_max_s = 0",
    )
    text = text.replace(
        'ruc = "80069563-1"',
        'ruc = "80069563"\nmax_docs = 51\nestablishment = "1"\ntaxpayer_type = 3'
        "\nretry_after_max_s = 90000",
    )
    text = text.replace('"till-2=002"', '"till-2:002"')
    got = problems(text)
    assert got == {
        "peppol.max_docs": "RANGE",
        "peppol.batches_per_minute": "RANGE",
        "peppol.max_doc_bytes": "RANGE",
        "peppol.retry_after_max_s": "RANGE",
        "sifen.ruc": "FORMAT",
        "sifen.max_docs": "RANGE",
        "sifen.establishment": "FORMAT",
        "sifen.taxpayer_type": "RANGE",
        "sifen.expedition_points[0]": "FORMAT",
        "sifen.retry_after_max_s": "RANGE",
    }


def test_config_batch_plain_http_non_loopback_refused() -> None:
    text = ENABLED.replace("https://app.goroute.ai/peppol-api", "http://goroute.example")
    assert problems(text) == {"peppol.base_url": "RANGE"}


def test_config_sifen_poll_faster_than_30_s_only_against_a_loopback_simulator() -> None:
    fast = ENABLED.replace('ruc = "80069563-1"', 'ruc = "80069563-1"\npoll_interval_s = 0.05')
    assert problems(fast) == {}
    real = fast.replace("http://127.0.0.1:8720", "https://sifen.set.gov.py")
    assert problems(real) == {"sifen.poll_interval_s": "RANGE"}
    assert problems(real.replace("poll_interval_s = 0.05", "poll_interval_s = 30.0")) == {}
