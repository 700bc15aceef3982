"""paho-mqtt's v5 Properties and ReasonCode behave as the MQTT 5.0 spec says with the shared
tables of gateway.paho_tables: the same bytes out, the same attributes in, the same refusals.

Expected bytes are written out from the spec (§2.2.2.2, §3.3.2.3), not taken from paho, so the
test holds whether or not the patch is applied (it is: the first test applies it)."""

from __future__ import annotations

import pytest
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.mqtt import _ReplyProperties
from gateway.paho_tables import share_tables


def _props(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def test_paho_tables_verified_paho_version_is_patched() -> None:
    # False means paho-mqtt changed: check gateway/paho_tables.py against its source first.
    assert share_tables() is True
    assert share_tables() is True  # idempotent


def test_paho_tables_publish_properties_pack_as_the_spec_says() -> None:
    share_tables()
    p = _props(PacketTypes.PUBLISH)
    p.ResponseTopic = "a/b"
    p.CorrelationData = b"\x00k"
    p.UserProperty = ("u", "v")
    p.UserProperty = ("w", "x")  # may occur more than once: appended
    body = b"\x08\x00\x03a/b" + b"\x09\x00\x02\x00k"
    body += b"\x26\x00\x01u\x00\x01v" + b"\x26\x00\x01w\x00\x01x"
    assert p.pack() == bytes([len(body)]) + body  # type: ignore[no-untyped-call]
    assert p.UserProperty == [("u", "v"), ("w", "x")]


def test_paho_tables_publish_properties_unpack_into_attributes() -> None:
    share_tables()
    body = b"\x03\x00\x10application/json" + b"\x09\x00\x02r1" + b"\x02\x00\x00\x00\x3c"
    p = _props(PacketTypes.PUBLISH)
    p.ContentType = "stale"  # unpack clears what was there
    _, consumed = p.unpack(bytes([len(body)]) + body)  # type: ignore[no-untyped-call]
    assert consumed == len(body) + 1
    assert (p.ContentType, p.CorrelationData, p.MessageExpiryInterval) == (
        "application/json",
        b"r1",
        60,
    )
    assert not hasattr(p, "ResponseTopic")
    assert p.getIdentFromName("CorrelationData") == 9  # type: ignore[no-untyped-call]
    assert p.getIdentFromName("Nope") == -1  # type: ignore[no-untyped-call]
    assert p.getNameFromIdent(8) == "Response Topic"  # type: ignore[no-untyped-call]
    empty = _props(PacketTypes.PUBLISH)
    assert empty.unpack(b"\x00")[1] == 1  # type: ignore[no-untyped-call]
    assert empty.isEmpty()  # type: ignore[no-untyped-call]


def test_paho_tables_bad_names_packet_types_and_values_still_refused() -> None:
    share_tables()
    p = _props(PacketTypes.CONNECT)
    with pytest.raises(MQTTException, match="must be one of"):
        p.NoSuchProperty = 1
    with pytest.raises(MQTTException, match="does not apply"):
        p.ResponseTopic = "x"  # a PUBLISH property
    with pytest.raises(MQTTException, match="1-65535"):
        p.ReceiveMaximum = 0
    p.ReceiveMaximum = 10
    p.SessionExpiryInterval = 3600
    assert p.pack() == b"\x08\x11\x00\x00\x0e\x10\x21\x00\x0a"  # type: ignore[no-untyped-call]
    # the tables are shared, not rebuilt: two instances hold the very same dicts
    assert _props(PacketTypes.PUBLISH).names is _props(PacketTypes.PUBACK).names


def test_paho_tables_reason_codes_name_and_compare() -> None:
    share_tables()
    ok = ReasonCode(PacketTypes.PUBACK)
    assert ok.value == 0 and ok.getName() == "Success" and ok == 0 and not ok.is_failure
    denied = ReasonCode(PacketTypes.PUBACK, identifier=0x87)
    assert denied.getName() == "Not authorized" and denied.is_failure
    assert ReasonCode(PacketTypes.DISCONNECT).getName() == "Normal disconnection"
    with pytest.raises(KeyError):
        ReasonCode(PacketTypes.PUBACK, "No such reason")


def test_reply_properties_pack_content_type_and_correlation_data() -> None:
    with_corr = _ReplyProperties(b"t-1")
    body = b"\x03\x00\x10application/json\x09\x00\x03t-1"
    assert with_corr.pack() == bytes([len(body)]) + body
    body = b"\x03\x00\x10application/json"
    assert _ReplyProperties(None).pack() == bytes([len(body)]) + body
    # what paho unpacks from it is what a till reads
    seen = _props(PacketTypes.PUBLISH)
    seen.unpack(with_corr.pack())  # type: ignore[no-untyped-call]
    assert (seen.ContentType, seen.CorrelationData) == ("application/json", b"t-1")
    assert "t-1" in str(with_corr)
