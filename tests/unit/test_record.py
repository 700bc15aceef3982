"""gateway.core.record: record time format, key ids, PEM bodies and the Record value."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.signers.software import public_der
from gateway.core.record import (
    BODY_FIELDS,
    FORMAT,
    Record,
    format_time,
    hash_b64,
    key_id_of,
    parse_time,
    pem_to_der,
    sha256_hex,
)

from .journal import T0_MS, Journal, signer_for

MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z


def test_format_time_examples_utc_with_milliseconds() -> None:
    assert format_time(0) == "1970-01-01T00:00:00.000Z"
    assert format_time(T0_MS) == "2026-11-21T10:00:00.000Z"
    assert format_time(T0_MS + 7) == "2026-11-21T10:00:00.007Z"
    assert format_time(MAX_MS) == "9999-12-31T23:59:59.999Z"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, MAX_MS))
def test_format_time_any_epoch_ms_round_trips(epoch_ms: int) -> None:
    text = format_time(epoch_ms)
    assert len(text) == 24
    assert parse_time(text) == epoch_ms


@settings(max_examples=100, deadline=None)
@given(st.integers(0, MAX_MS - 1))
def test_format_time_order_is_text_order(epoch_ms: int) -> None:
    assert format_time(epoch_ms) < format_time(epoch_ms + 1)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-21T10:00:00Z",
        "2026-11-21T10:00:00.0Z",
        "2026-11-21T10:00:00.000000Z",
        "2026-11-21T10:00:00.000+00:00",
        "2026-11-21T10:00:00.000z",
        "2026-11-21t10:00:00.000Z",
        "2026-11-21 10:00:00.000Z",
        "2026-11-21T10:00:00.000Z\n",
        " 2026-11-21T10:00:00.000Z",
        "2026-13-21T10:00:00.000Z",
        "2026-02-29T10:00:00.000Z",
        "2026-11-21T25:00:00.000Z",
        "",
    ],
)
def test_parse_time_other_forms_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_key_id_of_is_first_16_hex_of_sha256_of_der() -> None:
    der = public_der(signer_for().public_key)
    assert key_id_of(der) == hashlib.sha256(der).hexdigest()[:16]
    assert key_id_of(der) == signer_for().key_id


def test_pem_to_der_public_pem_gives_subject_public_key_info() -> None:
    signer = signer_for()
    assert pem_to_der(signer.public_pem) == public_der(signer.public_key)
    assert pem_to_der("\n  " + signer.public_pem.replace("\n", "\r\n") + "\n\n") == public_der(
        signer.public_key
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE",
        "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----",
        "-----BEGIN PUBLIC KEY-----\nMFk*\n-----END PUBLIC KEY-----",
        "BEGIN\nMFkw\nEND",
    ],
)
def test_pem_to_der_not_a_pem_block_refused(text: str) -> None:
    with pytest.raises(ValueError):
        pem_to_der(text)


def test_hash_b64_is_base64_of_raw_digest() -> None:
    digest = hashlib.sha256(b"x").digest()
    assert hash_b64(digest.hex()) == base64.b64encode(digest).decode()
    assert sha256_hex(b"x") == digest.hex()


def test_record_from_body_to_json_round_trip() -> None:
    j = Journal()
    d = j.append("INTENTION::EVENT", {"event": "START"}, T0_MS)
    rec = Record.from_body(d.body, d.hash, j.records[0].sig)
    assert rec.body() == d.body
    assert tuple(rec.body()) == BODY_FIELDS
    assert rec.to_json() == {**d.body, "hash": d.hash, "sig": j.records[0].sig}
    assert rec.format == FORMAT
