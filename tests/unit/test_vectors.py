"""Known-answer vectors (tests/vectors/*.json): the exact bytes, hashes and signatures of the
record format, valid and invalid. They never change unless the format version changes."""

from __future__ import annotations

import base64
import importlib.util
import json
from types import ModuleType
from typing import Any

import pytest
import rfc8785

from drivers.signers.software import KeyRing, SoftwareSigner
from gateway.core.canonical import CanonicalError, canonical_bytes, parse_canonical
from gateway.core.chain import ChainHead
from gateway.core.record import FORMAT, hash_b64, sha256_hex
from gateway.core.verify import StoredRecord, VerifyFailure, verify_chain

from .journal import VECTORS_DIR, load_vectors

CANONICAL = load_vectors("canonical.json")
RECORDS = load_vectors("records.json")
VALID = RECORDS["valid"]


def _ids(cases: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in cases]


def _signer(name: str) -> SoftwareSigner:
    pem = RECORDS["test_keys"][name]["TEST_ONLY_private_key_pem"]
    return SoftwareSigner.from_pem(pem.encode("ascii"))


def _ring() -> KeyRing:
    return KeyRing(RECORDS["test_keys"][n]["public_key_pem"] for n in RECORDS["key_ring"])


def _stored(rec: dict[str, str]) -> StoredRecord:
    body = rec.get("body_utf8", rec.get("canonical_utf8"))
    assert body is not None
    return StoredRecord(body.encode("utf-8"), rec["hash"], rec["sig"])


def test_vectors_are_for_the_current_format() -> None:
    assert CANONICAL["format"] == RECORDS["format"] == FORMAT


# ---------------------------------------------------------------------- canonical.json


@pytest.mark.parametrize("case", CANONICAL["valid"], ids=_ids(CANONICAL["valid"]))
def test_vector_canonical_value_gives_exact_bytes_and_sha256(case: dict[str, Any]) -> None:
    data = canonical_bytes(case["value"])
    assert data == bytes.fromhex(case["canonical_hex"])
    assert data == case["canonical_utf8"].encode("utf-8")
    assert data == rfc8785.dumps(case["value"])
    assert sha256_hex(data) == case["sha256"]
    assert parse_canonical(data) == case["value"]


@pytest.mark.parametrize("case", CANONICAL["refused_values"], ids=_ids(CANONICAL["refused_values"]))
def test_vector_canonical_refused_value_raises(case: dict[str, Any]) -> None:
    with pytest.raises(CanonicalError):
        canonical_bytes(json.loads(case["json_text"]))


@pytest.mark.parametrize(
    "case", CANONICAL["parse_refused_bytes"], ids=_ids(CANONICAL["parse_refused_bytes"])
)
def test_vector_parse_canonical_refused_bytes_raise(case: dict[str, Any]) -> None:
    with pytest.raises(CanonicalError):
        parse_canonical(bytes.fromhex(case["bytes_hex"]))


# ---------------------------------------------------------------------- records.json


@pytest.mark.parametrize("name", sorted(RECORDS["test_keys"]))
def test_vector_test_key_id_and_public_pem_follow_from_private_key(name: str) -> None:
    entry = RECORDS["test_keys"][name]
    assert "TEST KEY" in entry["WARNING"]
    signer = _signer(name)
    assert signer.key_id == entry["key_id"]
    assert signer.public_pem == entry["public_key_pem"]


@pytest.mark.parametrize("rec", VALID, ids=[f"seq{r['seq']}" for r in VALID])
def test_vector_record_body_canonical_hash_and_signature_exact(rec: dict[str, Any]) -> None:
    data = canonical_bytes(rec["body"])
    assert data == rec["canonical_utf8"].encode("utf-8")
    assert sha256_hex(data) == rec["hash"]
    assert hash_b64(rec["hash"]) == rec["hash_b64"]
    signer = _signer(rec["key"])
    assert rec["body"]["key_id"] == signer.key_id
    # RFC 6979: the same key and bytes give the same signature, byte for byte.
    assert signer.sign(data) == rec["sig"]
    assert _ring().check_sig(signer.key_id, data, rec["sig"])


def test_vector_valid_chain_verifies_to_last_record() -> None:
    head = verify_chain(
        RECORDS["chain"],
        [_stored(r) for r in VALID],
        _ring().check_sig,
        expected_seq=len(VALID),
        expected_hash=VALID[-1]["hash"],
    )
    last = VALID[-1]
    assert head == ChainHead.from_body(last["body"], last["hash"])
    assert head.key_id == RECORDS["test_keys"]["test-key-2"]["key_id"]


def test_vector_valid_chain_covers_rotation_clock_jump_offline_and_all_groups() -> None:
    bodies = [r["body"] for r in VALID]
    types = {b["type"].split("::")[0] for b in bodies}
    assert types == {"TRANSACTION", "INTENTION", "CLOSING"}
    assert any(b["payload"].get("event") == "KEY_ROTATED" for b in bodies)
    assert any(b["offline"] for b in bodies)
    assert len({r["key"] for r in VALID}) == 2
    assert any(b["time"].endswith(".001Z") for b in bodies)  # clock behind: previous + 1 ms


@pytest.mark.parametrize("case", RECORDS["invalid"], ids=_ids(RECORDS["invalid"]))
def test_vector_invalid_chain_fails_with_expected_seq_and_reason(case: dict[str, Any]) -> None:
    records = [_stored(r) for r in VALID[: case["prefix"]]] + [_stored(r) for r in case["records"]]
    with pytest.raises(VerifyFailure) as info:
        verify_chain(
            RECORDS["chain"], records, _ring().check_sig, expected_seq=case.get("expected_seq")
        )
    assert {"seq": info.value.seq, "reason": info.value.reason} == case["expected"]


def test_vector_invalid_cases_cover_every_listed_failure_kind() -> None:
    reasons = {c["expected"]["reason"] for c in RECORDS["invalid"]}
    assert reasons >= {
        "HASH_MISMATCH",
        "BAD_SIGNATURE",
        "NOT_CANONICAL",
        "SEQ_GAP",
        "SEQ_REPEATED",
        "TRUNCATED",
        "PREV_HASH_MISMATCH",
        "TIME_DECREASED",
        "COUNTER_MISMATCH",
        "TOTALS_MISMATCH",
        "WRONG_CHAIN",
        "WRONG_KEY",
        "UNKNOWN_KEY",
        "BAD_FIELD",
    }


def test_vector_signatures_are_base64_der_of_p256() -> None:
    for rec in VALID:
        der = base64.b64decode(rec["sig"], validate=True)
        assert der[0] == 0x30 and 8 <= len(der) <= 72


# ---------------------------------------------------------------------- the generator


def _make_vectors() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS_DIR / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vectors_files_equal_what_make_vectors_generates() -> None:
    generated = _make_vectors().build_all()
    for name, text in generated.items():
        assert (VECTORS_DIR / name).read_text(encoding="utf-8") == text, (
            f"{name} differs from make_vectors.py output: the record format changed "
            "(vectors must not change unless FORMAT does)"
        )
