"""The till ACL ([mqtt.acl]): parsed and checked with field paths, rendered as a Mosquitto
acl_file, and the gateway's own check (gateway.core.mqtt_acl). The broker enforcing the rendered
file is tested against a real Mosquitto in tests/integration/test_mqtt_transport.py."""

from __future__ import annotations

import tomllib

import pytest

from gateway.config import parse_config
from gateway.core.errors import ConfigError
from gateway.core.mqtt_acl import TillAcl, render_mosquitto_acl
from gateway.core.mqtt_topics import Topics

ACL = TillAcl((("acct-1", ("till-1",)), ("store", ("till-2", "till-3"))))


def test_mqtt_acl_empty_allows_every_till_configured_only_its_own() -> None:
    assert TillAcl().allows("anything") and not TillAcl().configured
    assert ACL.configured and ACL.tills == {"till-1", "till-2", "till-3"}
    assert ACL.allows("till-3") and not ACL.allows("till-4")
    assert ACL.users_of("till-2") == ("store",) and ACL.users_of("till-9") == ()


def test_mqtt_acl_renders_gateway_rights_and_per_account_till_topics() -> None:
    text = render_mosquitto_acl(Topics("shop/a", "gw-7"), "gateway", ACL, source="x.toml")
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rules == [
        "user gateway",
        "topic readwrite shop/a/gw-7/#",
        "user acct-1",
        "topic write shop/a/gw-7/tills/till-1/req",
        "topic read shop/a/gw-7/tills/till-1/res/#",
        "topic read shop/a/gw-7/status",
        "topic read shop/a/gw-7/events",
        "user store",
        "topic write shop/a/gw-7/tills/till-2/req",
        "topic read shop/a/gw-7/tills/till-2/res/#",
        "topic write shop/a/gw-7/tills/till-3/req",
        "topic read shop/a/gw-7/tills/till-3/res/#",
        "topic read shop/a/gw-7/status",
        "topic read shop/a/gw-7/events",
    ]
    # nothing before the first user line: anonymous clients get no topic at all
    assert text.split("user gateway")[0].strip().splitlines()[-1].startswith("#")
    assert "x.toml" in text


def test_mqtt_acl_config_parsed_in_order() -> None:
    cfg = parse_config(
        tomllib.loads(
            '[mqtt]\nusername = "gateway"\n[mqtt.acl]\nacct-1 = ["till-1"]\n'
            'store = ["till-2", "till-3"]\n'
        )
    )
    assert TillAcl(cfg.mqtt.acl) == ACL


def test_mqtt_acl_config_errors_named_by_field() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            tomllib.loads(
                '[tills]\nallowed = ["till-1", "till-2"]\n[mqtt]\nusername = "gateway"\n'
                '[mqtt.acl]\ngateway = ["till-1"]\n"bad user" = ["till-1"]\nempty = []\n'
                'text = "till-1"\ntwice = ["till-1", "till-1"]\nbadtill = ["till 1"]\n'
                'stranger = ["till-7"]\n'
            )
        )
    assert {(d.field, d.code) for d in err.value.details} == {
        ("mqtt.acl.gateway", "RANGE"),
        ("mqtt.acl.bad user", "FORMAT"),
        ("mqtt.acl.empty", "RANGE"),
        ("mqtt.acl.text", "TYPE"),
        ("mqtt.acl.twice[1]", "RANGE"),
        ("mqtt.acl.badtill[0]", "FORMAT"),
        ("mqtt.acl.stranger[0]", "RANGE"),
    }
    with pytest.raises(ConfigError) as err:
        parse_config(tomllib.loads('[mqtt]\nacl = ["till-1"]\n'))
    assert [(d.field, d.code) for d in err.value.details] == [("mqtt.acl", "TYPE")]
