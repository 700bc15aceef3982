"""Regenerate the known-answer vectors next to this file.

    python tests/vectors/make_vectors.py           # write canonical.json and records.json
    python tests/vectors/make_vectors.py --check   # exit 1 if the files differ from the code

(from the repository root, with the project installed: ``pip install -e '.[test]'``).

THE VECTORS MUST NEVER CHANGE unless the record format version (``gateway.core.record.FORMAT``)
changes. They pin the exact bytes that are hashed and signed: an auditor's tool, an old export
and the fiscal cloud all depend on them. If a code change makes ``--check`` fail, the change
is wrong — or it is a new format version, which gets new vector files next to these, never an
edit of these.

What is generated:

- ``canonical.json``: RFC 8785 canonical bytes (UTF-8 and hex) and their SHA-256 for values
  covering escapes, unicode, non-BMP keys (JCS sorts keys by UTF-16 code units) and nesting;
  values that ``canonical_bytes`` must refuse; byte strings that ``parse_canonical`` must
  refuse.
- ``records.json``: a chain of complete records (body → canonical bytes → SHA-256 → RFC 6979
  deterministic ECDSA P-256 signature, base64 DER) including a key rotation, and invalid
  variants, each with the failure ``verify_chain`` must report (``seq`` and ``reason``).

The keys are TEST KEYS, derived from fixed public labels so that the vectors are reproducible.
Their private halves are printed in ``records.json`` on purpose: they are not secret and must
never sign a real record. No key file is written anywhere.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from drivers.signers.software import KeyRing, SoftwareSigner
from gateway.core.canonical import CanonicalError, canonical_bytes, parse_canonical
from gateway.core.chain import KEY_ROTATED, ChainHead, draft
from gateway.core.record import FORMAT, format_time, hash_b64, sha256_hex
from gateway.core.request import validate_sale
from gateway.core.verify import StoredRecord, VerifyFailure, verify_chain

HERE = Path(__file__).resolve().parent
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
TEST_KEY_LABELS = {
    "test-key-1": "fiscal-gateway TEST key 1 (public test vector, never a real key)",
    "test-key-2": "fiscal-gateway TEST key 2 (public test vector, never a real key)",
    "test-key-outsider": "fiscal-gateway TEST key 3 (not in the vector key ring)",
}
KEY_WARNING = (
    "TEST KEY: derived from a public label for reproducible vectors. Not secret. "
    "Never use it to sign real records."
)
CHAIN = "vector-till-1"
T0_MS = 1795255200000  # 2026-11-21T10:00:00.000Z


# ---------------------------------------------------------------------- keys


def test_private_key(name: str) -> ec.EllipticCurvePrivateKey:
    """The P-256 test key ``name``: scalar = SHA-256(label) mod (n - 1) + 1."""
    digest = hashlib.sha256(TEST_KEY_LABELS[name].encode()).digest()
    scalar = int.from_bytes(digest, "big") % (P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def test_private_pem(name: str) -> str:
    return (
        test_private_key(name)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode("ascii")
    )


def key_entry(name: str) -> dict[str, str]:
    signer = SoftwareSigner(test_private_key(name))
    return {
        "WARNING": KEY_WARNING,
        "label": TEST_KEY_LABELS[name],
        "key_id": signer.key_id,
        "public_key_pem": signer.public_pem,
        "TEST_ONLY_private_key_pem": test_private_pem(name),
    }


# ---------------------------------------------------------------------- canonical.json

# (name, value, expected canonical text or None). Expected texts are written by hand from
# RFC 8785 where that is practical; every value is also checked against ``rfc8785.dumps``.
CANONICAL_VALID: list[tuple[str, Any, str | None]] = [
    ("null", None, "null"),
    ("true", True, "true"),
    ("false", False, "false"),
    ("zero", 0, "0"),
    ("negative integer", -42, "-42"),
    ("largest safe integer", 2**53 - 1, "9007199254740991"),
    ("smallest safe integer", -(2**53 - 1), "-9007199254740991"),
    ("empty string", "", '""'),
    ("empty object", {}, "{}"),
    ("empty array", [], "[]"),
    (
        "string escapes: short forms, other controls as lowercase \\u00xx, DEL and / raw",
        'q" b\\ /\b\f\n\r\t\x00\x1f\x7f',
        '"q\\" b\\\\ /\\b\\f\\n\\r\\t\\u0000\\u001f\x7f"',
    ),
    (
        "unicode stays raw UTF-8, incl. U+2028/U+2029 and non-BMP",
        "Café € ☕ \u2028\u2029 🥐 \U0010fffd",
        '"Café € ☕ \u2028\u2029 🥐 \U0010fffd"',
    ),
    (
        "ASCII keys sorted by code unit",
        {"b": 1, "a": 2, "A": 3, "_": 4, "aa": 5, "": 6, "1": 7},
        '{"":6,"1":7,"A":3,"_":4,"a":2,"aa":5,"b":1}',
    ),
    (
        "RFC 8785 section 3.2.3 sorting example (UTF-16 order, non-BMP before U+FB33)",
        {
            "\u20ac": "Euro Sign",
            "\r": "Carriage Return",
            "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\U0001f600": "Emoji: Grinning Face",
            "\u0080": "Control",
            "\u00f6": "Latin Small Letter O With Diaeresis",
        },
        '{"\\r":"Carriage Return","1":"One","\u0080":"Control",'
        '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign",'
        '"\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}',
    ),
    (
        "non-BMP key sorts before U+E000..U+FFFF keys (code point order would differ)",
        {"\uffff": 1, "\ue000": 2, "\U0001f600": 3, "\U00010000": 4, "z": 5, "\ud7ff": 6},
        '{"z":5,"\ud7ff":6,"\U00010000":4,"\U0001f600":3,"\ue000":2,"\uffff":1}',
    ),
    (
        "nested objects and arrays, sorted at every level, array order kept",
        {"z": {"b": [3, 1, {"d": None, "c": True}], "a": "x"}, "a": [[], {}, [{}]]},
        '{"a":[[],{},[{}]],"z":{"a":"x","b":[3,1,{"c":true,"d":null}]}}',
    ),
    (
        "a record-like payload",
        {
            "currency": "EUR",
            "lines": [
                {"text": "Crème brûlée", "qty": "0.250", "unit_price": 1999, "vat_rate": "10.00"}
            ],
            "vat": [{"rate": "10.00", "net": 454, "vat": 46, "gross": 500}],
            "total": 500,
            "prices_include_vat": True,
        },
        None,
    ),
]

# JSON texts whose parsed value ``canonical_bytes`` must refuse with CanonicalError.
CANONICAL_REFUSED_VALUES: list[tuple[str, str]] = [
    ("float", "1.5"),
    ("float with integral value", "100.0"),
    ("float from exponent", "1e3"),
    ("float nested in an object in an array", '{"a":[1,{"b":0.5}]}'),
    ("integer above 2**53-1", "9007199254740992"),
    ("integer below -(2**53-1)", "-9007199254740992"),
    ("lone high surrogate in a string", '"\\ud800"'),
    ("lone low surrogate in a key", '{"\\udfff":1}'),
    ("reversed surrogate pair", '"\\ude00\\ud83d"'),
]

# Byte strings that ``parse_canonical`` must refuse with CanonicalError.
PARSE_REFUSED_BYTES: list[tuple[str, bytes]] = [
    ("leading whitespace", b' {"a":1}'),
    ("trailing newline", b'{"a":1}\n'),
    ("space after colon", b'{"a": 1}'),
    ("keys out of order", b'{"b":1,"a":2}'),
    ("duplicate key", b'{"a":1,"a":1}'),
    ("float", b'{"a":1.5}'),
    ("float with integral value", b"1.0"),
    ("exponent", b"1e2"),
    ("negative zero", b"-0"),
    ("leading zero", b"01"),
    ("NaN", b"NaN"),
    ("Infinity", b"[Infinity]"),
    ("integer above 2**53-1", b"9007199254740992"),
    ("escaped ASCII letter", b'"\\u0041"'),
    ("escaped solidus", b'"\\/"'),
    ("uppercase hex escape", b'"\\u001F"'),
    ("escaped non-ASCII", b'"caf\\u00e9"'),
    ("escaped lone surrogate", b'"\\ud800"'),
    ("invalid UTF-8", b'"\xff"'),
    ("UTF-8 encoded surrogate", b'"\xed\xa0\x80"'),
    ("UTF-8 byte order mark", b'\xef\xbb\xbf{"a":1}'),
    ("non-BMP key in code point order", '{"\ue000":1,"\U0001f600":2}'.encode()),
    ("single quotes", b"{'a':1}"),
    ("trailing comma", b"[1,]"),
    ("empty input", b""),
]


def build_canonical() -> dict[str, Any]:
    valid = []
    for name, value, expected in CANONICAL_VALID:
        data = canonical_bytes(value)
        assert data == rfc8785.dumps(value), name
        if expected is not None:
            assert data == expected.encode("utf-8"), (name, data)
        assert parse_canonical(data) == value, name
        valid.append(
            {
                "name": name,
                "value": value,
                "canonical_utf8": data.decode("utf-8"),
                "canonical_hex": data.hex(),
                "sha256": sha256_hex(data),
            }
        )
    refused_values = []
    for name, text in CANONICAL_REFUSED_VALUES:
        _expect_refused(lambda t=text: canonical_bytes(json.loads(t)), name)
        refused_values.append({"name": name, "json_text": text})
    refused_bytes = []
    for name, data in PARSE_REFUSED_BYTES:
        _expect_refused(lambda d=data: parse_canonical(d), name)
        refused_bytes.append({"name": name, "bytes_hex": data.hex()})
    return {
        "description": (
            "RFC 8785 known answers for gateway.core.canonical. canonical_hex is "
            "authoritative; canonical_utf8 is the same bytes for reading. Generated by "
            "make_vectors.py; never edit, never regenerate with a different result unless "
            "the record format version changes."
        ),
        "format": FORMAT,
        "valid": valid,
        "refused_values": refused_values,
        "parse_refused_bytes": refused_bytes,
    }


def _expect_refused(call: Callable[[], object], name: str) -> None:
    try:
        call()
    except CanonicalError:
        return
    raise AssertionError(f"{name}: not refused")


# ---------------------------------------------------------------------- records.json


def _sale(request_id: str, **fields: Any) -> dict[str, Any]:
    req = {"id": request_id, "op": "sign", "till": CHAIN, "currency": "EUR"}
    req.update(fields)
    return validate_sale(req).payload()


class _Writer:
    """Draft → sign, as the ledger writer does, in memory."""

    def __init__(self, signer: SoftwareSigner) -> None:
        self.head = ChainHead(CHAIN)
        self.signer = signer
        self.records: list[dict[str, Any]] = []

    def append(
        self, record_type: str, payload: dict[str, Any], now_ms: int, *, offline: bool = False
    ) -> dict[str, Any]:
        seq = self.head.seq + 1
        d = draft(
            self.head,
            record_type=record_type,
            client="pos-1",
            request_id=f"req-{seq:04d}",
            payload=payload,
            now_ms=now_ms,
            key_id=self.signer.key_id,
            offline=offline,
        )
        sig = self.signer.sign(d.body_bytes)
        self.head = d.head
        rec = {
            "seq": seq,
            "key": _key_name(self.signer.key_id),
            "body": d.body,
            "canonical_utf8": d.body_bytes.decode("utf-8"),
            "hash": d.hash,
            "hash_b64": hash_b64(d.hash),
            "sig": sig,
        }
        self.records.append(rec)
        return rec


_SIGNERS = {name: SoftwareSigner(test_private_key(name)) for name in TEST_KEY_LABELS}


def _key_name(key_id: str) -> str:
    return next(name for name, s in _SIGNERS.items() if s.key_id == key_id)


def _valid_chain() -> list[dict[str, Any]]:
    k1, k2 = _SIGNERS["test-key-1"], _SIGNERS["test-key-2"]
    w = _Writer(k1)
    w.append("INTENTION::EVENT", {"event": "START", "version": "0.1.0"}, T0_MS)
    receipt = w.append(
        "TRANSACTION::RECEIPT",
        _sale(
            "r-1",
            type="RECEIPT",
            lines=[
                {
                    "text": "Croissant 🥐",
                    "qty": "2",
                    "unit_price": 120,
                    "vat_rate": "5.50",
                    "amount": 240,
                },
                {
                    "text": "Pain de campagne ½",
                    "qty": "0.5",
                    "unit_price": 301,
                    "vat_rate": "5.50",
                    "amount": 151,
                },
                {
                    "text": "Vin « Côtes »",
                    "qty": "1",
                    "unit_price": 1599,
                    "vat_rate": "20.00",
                    "amount": 1599,
                },
            ],
            payments=[{"method": "CASH", "amount": 1000}, {"method": "CARD", "amount": 990}],
            total=1990,
        ),
        T0_MS + 60_000,
    )
    w.append(
        "TRANSACTION::INVOICE",
        _sale(
            "r-2",
            type="INVOICE",
            prices_include_vat=False,
            lines=[
                {
                    "text": "Traiteur",
                    "qty": "1.25",
                    "unit_price": 987,
                    "vat_rate": "20.00",
                    "amount": 1234,
                },
                {
                    "text": "Livraison",
                    "qty": "1",
                    "unit_price": 105,
                    "vat_rate": "10.00",
                    "amount": 105,
                },
            ],
            payments=[{"method": "TRANSFER", "amount": 1597}],
            total=1597,
            customer={"name": "Boulangerie Ünal SARL", "vat_id": "FR40303265045", "country": "FR"},
        ),
        T0_MS + 120_000,
    )
    ref = {"seq": receipt["seq"], "hash": receipt["hash"]}
    w.append("INTENTION::DUPLICATE", {"of": ref, "copy": True}, T0_MS + 150_000)
    negated = [
        {"rate": v["rate"], "net": -v["net"], "vat": -v["vat"], "gross": -v["gross"]}
        for v in receipt["body"]["payload"]["vat"]
    ]
    w.append(
        "TRANSACTION::CANCELLATION",
        {"cancels": ref, "currency": "EUR", "vat": negated, "total": -1990},
        T0_MS + 180_000,
    )
    w.append(
        "INTENTION::EVENT",
        {
            "event": KEY_ROTATED,
            "old_key_id": k1.key_id,
            "new_key_id": k2.key_id,
            "new_public_key": k2.public_pem,
        },
        T0_MS + 240_000,
    )
    w.signer = k2
    # The wall clock went back 10 minutes: the record takes previous time + 1 ms.
    w.append(
        "INTENTION::EVENT",
        {"event": "CLOCK_JUMP", "clock": format_time(T0_MS - 360_000), "behind_ms": 600_001},
        T0_MS - 360_000,
    )
    w.append(
        "TRANSACTION::RECEIPT",
        _sale(
            "r-3",
            type="RECEIPT",
            lines=[
                {"text": "Café", "qty": "3", "unit_price": 150, "vat_rate": "10.00", "amount": 450},
                {
                    "text": "Remise fidélité",
                    "qty": "1",
                    "unit_price": -45,
                    "vat_rate": "10.00",
                    "amount": -45,
                },
            ],
            payments=[{"method": "CARD", "amount": 405}],
            total=405,
        ),
        T0_MS - 300_000,
        offline=True,
    )
    w.append(
        "CLOSING::DAILY",
        {"date": "2026-11-21", "first_seq": 1, "last_seq": 8},
        T0_MS + 36_000_000,
    )
    return w.records


def _stored(body: dict[str, Any] | bytes, *, key: str | None = "test-key-1") -> dict[str, str]:
    """A stored record of ``body``: hashed and (when ``key``) signed as it is."""
    data = body if isinstance(body, bytes) else canonical_bytes(body)
    sig = _SIGNERS[key].sign(data) if key is not None else ""
    return {"body_utf8": data.decode("utf-8"), "hash": sha256_hex(data), "sig": sig}


def _as_stored(rec: dict[str, Any]) -> dict[str, str]:
    return {"body_utf8": rec["canonical_utf8"], "hash": rec["hash"], "sig": rec["sig"]}


def _edit(rec: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    body = json.loads(json.dumps(rec["body"]))
    change(body)
    return body


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = body
        for p in parents:
            node = node[p]
        node[last] = value

    return change


def _invalid_cases(valid: list[dict[str, Any]]) -> list[dict[str, Any]]:
    r1, r2, r3 = valid[0], valid[1], valid[2]
    k3 = _SIGNERS["test-key-outsider"]
    body2 = r2["canonical_utf8"].encode()
    total = r2["body"]["payload"]["total"]
    sig2_der = bytearray(base64.b64decode(r2["sig"]))
    sig2_der[-1] ^= 0x01
    padded = next(r for r in valid if r["sig"].endswith("="))
    pad_sig = padded["sig"].rstrip("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    bumped = alphabet[alphabet.index(pad_sig[-1]) ^ 1]  # flips an unused low bit only
    noncanon_sig = pad_sig[:-1] + bumped + "=" * (len(padded["sig"]) - len(pad_sig))
    assert base64.b64decode(noncanon_sig) == base64.b64decode(padded["sig"])
    tampered = body2.replace(f'"total":{total},'.encode(), f'"total":{total + 1},'.encode())
    assert tampered != body2
    as_float = body2.replace(f'"total":{total},'.encode(), f'"total":{total}.0,'.encode())
    rot = valid[5]
    no_offline = _edit(r1, lambda b: b.pop("offline"))

    def case(
        name: str,
        prefix: int,
        records: list[dict[str, str]],
        seq: int,
        reason: str,
        expected_seq: int | None = None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "prefix": prefix, "records": records}
        if expected_seq is not None:
            out["expected_seq"] = expected_seq
        out["expected"] = {"seq": seq, "reason": reason}
        return out

    return [
        case(
            "tampered body (payload total +1), stored hash and sig kept",
            1,
            [{**_as_stored(r2), "body_utf8": tampered.decode()}],
            2,
            "HASH_MISMATCH",
        ),
        case(
            "tampered body with its hash recomputed, stored sig kept",
            1,
            [{**_stored(tampered), "sig": r2["sig"]}],
            2,
            "BAD_SIGNATURE",
        ),
        case(
            "hash changed (last hex digit)",
            1,
            [{**_as_stored(r2), "hash": r2["hash"][:-1] + ("0" if r2["hash"][-1] != "0" else "1")}],
            2,
            "HASH_MISMATCH",
        ),
        case(
            "wrong signature (the signature of another record)",
            1,
            [{**_as_stored(r2), "sig": r3["sig"]}],
            2,
            "BAD_SIGNATURE",
        ),
        case(
            "signature with one DER byte flipped",
            1,
            [{**_as_stored(r2), "sig": base64.b64encode(bytes(sig2_der)).decode()}],
            2,
            "BAD_SIGNATURE",
        ),
        case(
            "signature in non-canonical base64 (unused padding bit set)",
            padded["seq"] - 1,
            [{**_as_stored(padded), "sig": noncanon_sig}],
            padded["seq"],
            "BAD_SIGNATURE",
        ),
        case(
            "non-canonical bytes: pretty-printed body, hashed and signed as is",
            1,
            [
                _stored(
                    json.dumps(r2["body"], indent=2, sort_keys=True, ensure_ascii=False).encode()
                )
            ],
            2,
            "NOT_CANONICAL",
        ),
        case(
            "non-canonical bytes: keys in record-field order, hashed and signed as is",
            1,
            [_stored(json.dumps(r2["body"], separators=(",", ":"), ensure_ascii=False).encode())],
            2,
            "NOT_CANONICAL",
        ),
        case(
            "non-canonical bytes: non-ASCII escaped as \\u, hashed and signed as is",
            1,
            [
                _stored(
                    json.dumps(
                        r2["body"], separators=(",", ":"), sort_keys=True, ensure_ascii=True
                    ).encode()
                )
            ],
            2,
            "NOT_CANONICAL",
        ),
        case(
            "float in body (payload total 1990.0), hashed and signed as is",
            1,
            [_stored(as_float)],
            2,
            "NOT_CANONICAL",
        ),
        case("deleted record (seq 2 missing)", 1, [_as_stored(r3)], 2, "SEQ_GAP"),
        case(
            "deleted tail record (head says seq 9)",
            len(valid) - 1,
            [],
            len(valid),
            "TRUNCATED",
            expected_seq=len(valid),
        ),
        case("duplicated record (seq 2 twice)", 2, [_as_stored(r2)], 3, "SEQ_REPEATED"),
        case("swapped records (3 before 2)", 1, [_as_stored(r3), _as_stored(r2)], 2, "SEQ_GAP"),
        case(
            "prev_hash is not the previous hash (re-signed)",
            1,
            [_stored(_edit(r2, _set("prev_hash", "0" * 64)))],
            2,
            "PREV_HASH_MISMATCH",
        ),
        case(
            "time before the previous record (re-signed)",
            1,
            [_stored(_edit(r2, _set("time", format_time(T0_MS - 1))))],
            2,
            "TIME_DECREASED",
        ),
        case(
            "impossible date 2026-13-21 (re-signed)",
            1,
            [_stored(_edit(r2, _set("time", "2026-13-21T10:01:00.000Z")))],
            2,
            "BAD_FIELD",
        ),
        case(
            "time without milliseconds (re-signed)",
            1,
            [_stored(_edit(r2, _set("time", "2026-11-21T10:01:00Z")))],
            2,
            "BAD_FIELD",
        ),
        case(
            "number and counter skip one (re-signed)",
            1,
            [
                _stored(
                    _edit(
                        r2,
                        lambda b: (
                            _set("number", 2)(b),
                            _set("counters.TRANSACTION::RECEIPT", 2)(b),
                        ),
                    )
                )
            ],
            2,
            "COUNTER_MISMATCH",
        ),
        case(
            "counter is true instead of 1 (re-signed)",
            0,
            [_stored(_edit(r1, _set("counters.INTENTION::EVENT", True)))],
            1,
            "COUNTER_MISMATCH",
        ),
        case(
            "grand total gross +1 (re-signed)",
            1,
            [_stored(_edit(r2, _set("totals.gross", r2["body"]["totals"]["gross"] + 1)))],
            2,
            "TOTALS_MISMATCH",
        ),
        case(
            "record of another chain (re-signed)",
            0,
            [_stored(_edit(r1, _set("chain", "vector-till-2")))],
            1,
            "WRONG_CHAIN",
        ),
        case(
            "unknown format version 2 (re-signed)",
            0,
            [_stored(_edit(r1, _set("format", 2)))],
            1,
            "BAD_FIELD",
        ),
        case(
            "unknown record type (re-signed)",
            0,
            [_stored(_edit(r1, _set("type", "TRANSACTION::REFUND")))],
            1,
            "BAD_FIELD",
        ),
        case("missing field offline (re-signed)", 0, [_stored(no_offline)], 1, "BAD_FIELD"),
        case(
            "first record signed by a key not in the key ring",
            0,
            [_stored(_edit(r1, _set("key_id", k3.key_id)), key="test-key-outsider")],
            1,
            "UNKNOWN_KEY",
        ),
        case(
            "record signed by another known key than the chain's, before any rotation",
            1,
            [_stored(_edit(r2, _set("key_id", _SIGNERS["test-key-2"].key_id)), key="test-key-2")],
            2,
            "WRONG_KEY",
        ),
        case(
            "record signed by the old key after the rotation",
            rot["seq"],
            [_stored(_edit(valid[rot["seq"]], _set("key_id", _SIGNERS["test-key-1"].key_id)))],
            rot["seq"] + 1,
            "WRONG_KEY",
        ),
        case(
            "rotation whose new_key_id is not the id of new_public_key (re-signed)",
            rot["seq"] - 1,
            [_stored(_edit(rot, _set("payload.new_key_id", k3.key_id)))],
            rot["seq"],
            "BAD_FIELD",
        ),
        case(
            "rotation whose new_public_key is not PEM (re-signed)",
            rot["seq"] - 1,
            [_stored(_edit(rot, _set("payload.new_public_key", "not a key")))],
            rot["seq"],
            "BAD_FIELD",
        ),
        case(
            "rotation whose new_public_key is a number (re-signed)",
            rot["seq"] - 1,
            [_stored(_edit(rot, _set("payload.new_public_key", 42)))],
            rot["seq"],
            "BAD_FIELD",
        ),
    ]


def build_records() -> dict[str, Any]:
    valid = _valid_chain()
    ring = KeyRing([_SIGNERS["test-key-1"].public_pem, _SIGNERS["test-key-2"].public_pem])
    head = verify_chain(
        CHAIN,
        [StoredRecord(r["canonical_utf8"].encode(), r["hash"], r["sig"]) for r in valid],
        ring.check_sig,
        expected_seq=len(valid),
        expected_hash=valid[-1]["hash"],
    )
    assert head.seq == len(valid)
    invalid = _invalid_cases(valid)
    for c in invalid:
        _expect_failure(valid, c, ring)
    return {
        "description": (
            "Known-answer records for gateway.core (chain, verify) and drivers.signers. "
            "body -> canonical_utf8 (RFC 8785) -> hash (SHA-256 hex) -> sig (ECDSA P-256 "
            "SHA-256, RFC 6979 deterministic, base64 DER). Invalid cases: feed the first "
            "`prefix` valid records, then `records`, to verify_chain with key ring = "
            "key_ring (and expected_seq when given); it must fail with `expected`. Generated "
            "by make_vectors.py; never edit, never regenerate with a different result "
            "unless the record format version changes."
        ),
        "format": FORMAT,
        "chain": CHAIN,
        "test_keys": {name: key_entry(name) for name in TEST_KEY_LABELS},
        "key_ring": ["test-key-1", "test-key-2"],
        "valid": valid,
        "invalid": invalid,
    }


def _expect_failure(valid: list[dict[str, Any]], c: dict[str, Any], ring: KeyRing) -> None:
    records = [_as_stored(r) for r in valid[: c["prefix"]]] + c["records"]
    try:
        verify_chain(
            CHAIN,
            [StoredRecord(r["body_utf8"].encode(), r["hash"], r["sig"]) for r in records],
            ring.check_sig,
            expected_seq=c.get("expected_seq"),
        )
    except VerifyFailure as exc:
        got = {"seq": exc.seq, "reason": exc.reason}
        assert got == c["expected"], (c["name"], got)
        return
    raise AssertionError(f"{c['name']}: verified")


# ---------------------------------------------------------------------- files


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=True) + "\n"


def build_all() -> dict[str, str]:
    """File name → the text this script writes."""
    return {
        "canonical.json": render(build_canonical()),
        "records.json": render(build_records()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    status = 0
    for name, text in build_all().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                print(f"{path}: differs from what the code generates", file=sys.stderr)
                status = 1
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
