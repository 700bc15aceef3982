"""gateway.core.verify: every way a stored chain can be wrong is reported, at the right place.

A failure names the chain position where the chain breaks — the ``seq`` expected next — and a
stable reason. Chains come from :class:`journal.Journal` (in memory, TEST keys); tampered
records that need a valid signature are re-signed with :func:`journal.stored`.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.canonical import canonical_bytes, parse_canonical
from gateway.core.chain import ChainHead
from gateway.core.record import format_time, sha256_hex
from gateway.core.verify import ChainVerifier, StoredRecord, VerifyFailure, verify_chain

from .journal import T0_MS, Journal, key_ring, play, rotation_payload, signer_for, stored
from .strategies import journal_ops

PROPERTY = settings(max_examples=60, deadline=None)
RECEIPT = "TRANSACTION::RECEIPT"
EVENT = "INTENTION::EVENT"
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

#: What a body edit with a recomputed hash (but no valid signature) may be reported as.
EDIT_REASONS = {
    "BAD_FIELD",
    "WRONG_CHAIN",
    "SEQ_GAP",
    "SEQ_REPEATED",
    "PREV_HASH_MISMATCH",
    "TIME_DECREASED",
    "WRONG_KEY",
    "UNKNOWN_KEY",
    "BAD_SIGNATURE",
}


def fail(
    records: list[StoredRecord], *, expected_seq: int | None = None, names: tuple[str, ...] = ()
) -> VerifyFailure:
    """The failure verify_chain reports for ``records`` (key ring: ``names`` or keys 1+2)."""
    with pytest.raises(VerifyFailure) as info:
        verify_chain("till-1", records, key_ring(*names).check_sig, expected_seq=expected_seq)
    return info.value


def body_of(rec: StoredRecord) -> dict[str, Any]:
    body: dict[str, Any] = parse_canonical(rec.body)
    return body


def edited(rec: StoredRecord, **fields: Any) -> dict[str, Any]:
    body = body_of(rec)
    body.update(fields)
    return body


def three_sales() -> Journal:
    j = Journal()
    j.append(EVENT, {"event": "START"}, T0_MS)
    vat = [{"rate": "20.00", "net": 100, "vat": 20, "gross": 120}]
    j.append(RECEIPT, {"vat": vat}, T0_MS + 1000)
    j.append(RECEIPT, {"vat": vat}, T0_MS + 2000)
    return j


chains = journal_ops(min_size=1, max_size=6).map(lambda ops: play(ops).records)
chains_2 = journal_ops(min_size=2, max_size=6).map(lambda ops: play(ops).records)


# ---------------------------------------------------------------------- valid chains


def test_verify_chain_valid_chain_returns_head() -> None:
    j = three_sales()
    head = verify_chain(
        "till-1", j.records, key_ring().check_sig, expected_seq=3, expected_hash=j.head.hash
    )
    assert head == j.head


def test_verify_chain_empty_chain_is_empty_head() -> None:
    assert verify_chain("till-1", [], key_ring().check_sig, expected_seq=0) == ChainHead("till-1")


def test_chain_verifier_feed_returns_body_and_counts() -> None:
    j = three_sales()
    v = ChainVerifier("till-1", key_ring().check_sig)
    bodies = [v.feed(r) for r in j.records]
    assert bodies == j.bodies
    assert v.count == 3


def test_chain_verifier_resumes_from_a_stored_head() -> None:
    j = three_sales()
    start = ChainHead.from_body(j.bodies[0], j.records[0].hash)
    v = ChainVerifier("till-1", key_ring().check_sig, start=start)
    for r in j.records[1:]:
        v.feed(r)
    v.finish(expected_seq=3, expected_hash=j.head.hash)
    assert v.head == j.head


def test_chain_verifier_resume_from_wrong_head_fails_prev_hash() -> None:
    j = three_sales()
    start = ChainHead.from_body(j.bodies[0], "f" * 64)
    v = ChainVerifier("till-1", key_ring().check_sig, start=start)
    with pytest.raises(VerifyFailure) as info:
        v.feed(j.records[1])
    assert (info.value.seq, info.value.reason) == (2, "PREV_HASH_MISMATCH")


# ---------------------------------------------------------------------- tampering (properties)


@PROPERTY
@given(chains, st.data())
def test_verify_any_body_byte_flipped_detected_at_that_seq(
    records: list[StoredRecord], data: st.DataObject
) -> None:
    k = data.draw(st.integers(0, len(records) - 1))
    body = bytearray(records[k].body)
    pos = data.draw(st.integers(0, len(body) - 1))
    body[pos] ^= data.draw(st.integers(1, 255))
    records[k] = StoredRecord(bytes(body), records[k].hash, records[k].sig)
    f = fail(records)
    assert f.seq == k + 1
    assert f.reason in {"NOT_CANONICAL", "HASH_MISMATCH"}


@PROPERTY
@given(chains, st.data())
def test_verify_any_hash_changed_detected_hash_mismatch(
    records: list[StoredRecord], data: st.DataObject
) -> None:
    k = data.draw(st.integers(0, len(records) - 1))
    other = data.draw(st.from_regex(r"[0-9a-f]{64}", fullmatch=True) | st.text(max_size=70))
    if other == records[k].hash:
        other = records[k].hash.upper()
    records[k] = StoredRecord(records[k].body, other, records[k].sig)
    f = fail(records)
    assert (f.seq, f.reason) == (k + 1, "HASH_MISMATCH")


@st.composite
def _other_sig(draw: st.DrawFn, sig: str, records: list[StoredRecord]) -> str:
    how = draw(st.sampled_from(["char", "der-byte", "other-record", "other-data", "cut", "junk"]))
    if how == "char":
        pos = draw(st.integers(0, len(sig) - 1))
        new = draw(st.sampled_from(B64 + "=-_ ").filter(lambda c: c != sig[pos]))
        return sig[:pos] + new + sig[pos + 1 :]
    if how == "der-byte":
        der = bytearray(base64.b64decode(sig))
        der[draw(st.integers(0, len(der) - 1))] ^= draw(st.integers(1, 255))
        return base64.b64encode(bytes(der)).decode()
    if how == "other-record":
        others = [r.sig for r in records if r.sig != sig]
        return draw(st.sampled_from(others)) if others else ""
    if how == "other-data":
        return signer_for().sign(draw(st.binary(max_size=20)))
    if how == "cut":
        return sig[: draw(st.integers(0, len(sig) - 1))]
    return draw(st.text(max_size=100).filter(lambda s: s != sig))


@PROPERTY
@given(chains, st.data())
def test_verify_any_sig_changed_detected_bad_signature(
    records: list[StoredRecord], data: st.DataObject
) -> None:
    k = data.draw(st.integers(0, len(records) - 1))
    sig = data.draw(_other_sig(records[k].sig, records))
    assert sig != records[k].sig
    records[k] = StoredRecord(records[k].body, records[k].hash, sig)
    f = fail(records)
    assert (f.seq, f.reason) == (k + 1, "BAD_SIGNATURE")


def _leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _leaf_paths(v, (*prefix, k))]
    if isinstance(value, list) and value:
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*prefix, i))]
    return [prefix]


new_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=8), st.just({})
)


@PROPERTY
@given(chains, st.data(), st.booleans())
def test_verify_any_body_edit_with_recomputed_hash_detected_at_that_seq(
    records: list[StoredRecord], data: st.DataObject, attacker_signs: bool
) -> None:
    k = data.draw(st.integers(0, len(records) - 1))
    body = body_of(records[k])
    path = data.draw(st.sampled_from(_leaf_paths(body)))
    new = data.draw(new_leaves)
    node = body
    for p in path[:-1]:
        node = node[p]
    if node[path[-1]] == new and type(node[path[-1]]) is type(new):
        new = [new]
    node[path[-1]] = new
    if attacker_signs:
        # Signed by a key the verifier does not trust: even a valid signature does not help.
        records[k] = stored(body, signer_for("test-key-outsider"))
    else:
        data_bytes = canonical_bytes(body)
        records[k] = StoredRecord(data_bytes, sha256_hex(data_bytes), records[k].sig)
    f = fail(records)
    assert f.seq == k + 1
    assert f.reason in EDIT_REASONS


@PROPERTY
@given(chains_2, st.data())
def test_verify_any_record_deleted_detected_seq_gap_at_its_seq(
    records: list[StoredRecord], data: st.DataObject
) -> None:
    k = data.draw(st.integers(0, len(records) - 2))  # not the last: that is truncation
    del records[k]
    f = fail(records)
    assert (f.seq, f.reason) == (k + 1, "SEQ_GAP")


@PROPERTY
@given(chains, st.data())
def test_verify_any_tail_deleted_detected_truncated(
    records: list[StoredRecord], data: st.DataObject
) -> None:
    n = len(records)
    cut = data.draw(st.integers(1, n))
    f = fail(records[: n - cut], expected_seq=n)
    assert (f.seq, f.reason) == (n - cut + 1, "TRUNCATED")


@PROPERTY
@given(chains_2, st.data())
def test_verify_any_two_records_swapped_detected_seq_gap(
    records: list[StoredRecord], data: st.DataObject
) -> None:
    i, j = sorted(
        data.draw(st.lists(st.integers(0, len(records) - 1), min_size=2, max_size=2, unique=True))
    )
    records[i], records[j] = records[j], records[i]
    f = fail(records)
    assert (f.seq, f.reason) == (i + 1, "SEQ_GAP")


@PROPERTY
@given(chains, st.data())
def test_verify_any_record_duplicated_detected_seq_repeated(
    records: list[StoredRecord], data: st.DataObject
) -> None:
    k = data.draw(st.integers(0, len(records) - 1))
    records.insert(k + 1, records[k])
    f = fail(records)
    assert (f.seq, f.reason) == (k + 2, "SEQ_REPEATED")


@PROPERTY
@given(chains_2, st.data())
def test_verify_any_earlier_record_replayed_detected_seq_repeated(
    records: list[StoredRecord], data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, len(records) - 1))
    replayed = data.draw(st.integers(0, k - 1))
    records.insert(k, records[replayed])
    f = fail(records)
    assert (f.seq, f.reason) == (k + 1, "SEQ_REPEATED")


# ---------------------------------------------------------------------- single rules


def test_verify_prev_hash_not_previous_hash_fails() -> None:
    j = three_sales()
    f = fail([j.records[0], stored(edited(j.records[1], prev_hash="0" * 64))])
    assert (f.seq, f.reason) == (2, "PREV_HASH_MISMATCH")


def test_verify_record_of_other_chain_fails_wrong_chain() -> None:
    j = Journal(chain="till-2")
    j.append(EVENT, {}, T0_MS)
    f = fail(j.records)
    assert (f.seq, f.reason) == (1, "WRONG_CHAIN")


def test_verify_time_decreased_fails() -> None:
    j = three_sales()
    earlier = format_time(T0_MS - 1)
    records = [j.records[0], stored(edited(j.records[1], time=earlier))]
    f = fail(records)
    assert (f.seq, f.reason) == (2, "TIME_DECREASED")


def test_verify_time_equal_to_previous_accepted() -> None:
    j = Journal()
    j.append(EVENT, {}, T0_MS)
    j.append(EVENT, {}, T0_MS)
    assert verify_chain("till-1", j.records, key_ring().check_sig).seq == 2


@pytest.mark.parametrize(
    "time",
    [
        "2026-13-21T10:00:00.000Z",
        "2026-02-30T10:00:00.000Z",
        "2026-11-21T24:00:00.000Z",
        "2026-11-21T23:59:60.000Z",
        "2026-11-21T10:00:00.000Z\n",
        "2026-11-21T10:00:00Z",
        "2026-11-21T10:00:00.000+00:00",
        "2026-11-21 10:00:00.000Z",
    ],
)
def test_verify_bad_time_fails_bad_field(time: str) -> None:
    j = three_sales()
    f = fail([j.records[0], stored(edited(j.records[1], time=time))])
    assert (f.seq, f.reason) == (2, "BAD_FIELD")


@pytest.mark.parametrize(
    "change",
    [
        {"seq": "2"},
        {"seq": True},
        {"number": None},
        {"offline": 0},
        {"payload": []},
        {"counters": []},
        {"format": True},
        {"format": 2},
        {"type": "TRANSACTION::REFUND"},
        {"key_id": 1},
        {"extra": 1},
    ],
    ids=repr,
)
def test_verify_malformed_field_fails_bad_field(change: dict[str, Any]) -> None:
    j = three_sales()
    f = fail([j.records[0], stored(edited(j.records[1], **change))])
    assert (f.seq, f.reason) == (2, "BAD_FIELD")


def test_verify_missing_field_fails_bad_field() -> None:
    j = three_sales()
    body = body_of(j.records[1])
    del body["client"]
    f = fail([j.records[0], stored(body)])
    assert (f.seq, f.reason) == (2, "BAD_FIELD")


def test_verify_malformed_vat_in_signed_transaction_fails_bad_field() -> None:
    j = three_sales()
    body = edited(j.records[1], payload={"vat": [{"rate": "20.00", "net": "100"}]})
    f = fail([j.records[0], stored(body)])
    assert (f.seq, f.reason) == (2, "BAD_FIELD")


def test_verify_body_not_an_object_fails_bad_field() -> None:
    f = fail([StoredRecord(b"[]", sha256_hex(b"[]"), signer_for().sign(b"[]"))])
    assert (f.seq, f.reason) == (1, "BAD_FIELD")


def test_verify_counter_skipping_fails_counter_mismatch() -> None:
    j = three_sales()
    body = edited(j.records[1], number=2, counters={EVENT: 1, RECEIPT: 2})
    f = fail([j.records[0], stored(body)])
    assert (f.seq, f.reason) == (2, "COUNTER_MISMATCH")


def test_verify_counter_regression_fails_counter_mismatch() -> None:
    j = three_sales()
    body = edited(j.records[2], number=1, counters={EVENT: 1, RECEIPT: 1})
    f = fail([*j.records[:2], stored(body)])
    assert (f.seq, f.reason) == (3, "COUNTER_MISMATCH")


def test_verify_counter_dropping_a_type_fails_counter_mismatch() -> None:
    j = three_sales()
    body = edited(j.records[1], counters={RECEIPT: 1})
    f = fail([j.records[0], stored(body)])
    assert (f.seq, f.reason) == (2, "COUNTER_MISMATCH")


def test_verify_counter_boolean_for_integer_fails_counter_mismatch() -> None:
    # Python has True == 1; JSON does not: a signed `true` counter is not the counter 1.
    j = three_sales()
    f = fail([stored(edited(j.records[0], counters={EVENT: True}))])
    assert (f.seq, f.reason) == (1, "COUNTER_MISMATCH")


def test_verify_totals_not_following_fails_totals_mismatch() -> None:
    j = three_sales()
    totals = copy.deepcopy(j.bodies[1]["totals"])
    totals["by_rate"]["20.00"]["vat"] += 1
    f = fail([j.records[0], stored(edited(j.records[1], totals=totals))])
    assert (f.seq, f.reason) == (2, "TOTALS_MISMATCH")


def test_verify_totals_boolean_for_integer_fails_totals_mismatch() -> None:
    j = Journal()
    j.append(RECEIPT, {"vat": [{"rate": "0.00", "net": 1, "vat": 0, "gross": 1}]}, T0_MS)
    totals = copy.deepcopy(j.bodies[0]["totals"])
    totals["gross"] = True
    f = fail([stored(edited(j.records[0], totals=totals))])
    assert (f.seq, f.reason) == (1, "TOTALS_MISMATCH")


def test_verify_non_transaction_changing_totals_fails_totals_mismatch() -> None:
    j = three_sales()
    totals = copy.deepcopy(j.bodies[2]["totals"])
    body = edited(
        j.records[2],
        type="INTENTION::DUPLICATE",
        number=1,
        counters={EVENT: 1, RECEIPT: 1, "INTENTION::DUPLICATE": 1},
        totals=totals,
    )
    f = fail([*j.records[:2], stored(body)])
    assert (f.seq, f.reason) == (3, "TOTALS_MISMATCH")


# ---------------------------------------------------------------------- keys and signatures


def test_verify_first_record_by_unknown_key_fails_unknown_key() -> None:
    j = Journal(signer_for("test-key-outsider"))
    j.append(EVENT, {}, T0_MS)
    f = fail(j.records)
    assert (f.seq, f.reason) == (1, "UNKNOWN_KEY")


def test_verify_record_by_other_known_key_fails_wrong_key() -> None:
    j = three_sales()
    other = signer_for("test-key-2")
    f = fail([j.records[0], stored(edited(j.records[1], key_id=other.key_id), other)])
    assert (f.seq, f.reason) == (2, "WRONG_KEY")


def test_verify_signature_over_other_bytes_fails_bad_signature() -> None:
    j = three_sales()
    rec = j.records[1]
    forged = StoredRecord(rec.body, rec.hash, signer_for().sign(rec.body + b" "))
    f = fail([j.records[0], forged])
    assert (f.seq, f.reason) == (2, "BAD_SIGNATURE")


def test_verify_signature_in_non_canonical_base64_fails_bad_signature() -> None:
    j = Journal()
    for i in range(12):  # DER signatures of 70 or 71 bytes end in padding
        j.append(EVENT, {"n": i}, T0_MS)
    k = next(i for i, r in enumerate(j.records) if r.sig.endswith("="))
    sig = j.records[k].sig
    body = sig.rstrip("=")
    bumped = body[:-1] + B64[B64.index(body[-1]) ^ 1] + sig[len(body) :]
    assert base64.b64decode(bumped) == base64.b64decode(sig)  # same DER, other text
    j.records[k] = StoredRecord(j.records[k].body, j.records[k].hash, bumped)
    f = fail(j.records)
    assert (f.seq, f.reason) == (k + 1, "BAD_SIGNATURE")


def _rotated() -> Journal:
    j = Journal(signer_for("test-key-1"))
    j.append(EVENT, {"event": "START"}, T0_MS)
    j.rotate(signer_for("test-key-2"), T0_MS + 1)
    j.append(RECEIPT, {"vat": [{"rate": "5.50", "net": 100, "vat": 6, "gross": 106}]}, T0_MS + 2)
    return j


def test_verify_key_rotation_later_records_by_new_key_verify() -> None:
    j = _rotated()
    head = verify_chain("till-1", j.records, key_ring().check_sig, expected_seq=3)
    assert head.key_id == signer_for("test-key-2").key_id
    assert j.bodies[1]["key_id"] == signer_for("test-key-1").key_id


def test_verify_old_key_after_rotation_fails_wrong_key() -> None:
    j = _rotated()
    old = signer_for("test-key-1")
    late = stored(edited(j.records[2], key_id=old.key_id), old)
    f = fail([*j.records[:2], late])
    assert (f.seq, f.reason) == (3, "WRONG_KEY")


def test_verify_rotation_signed_by_new_key_fails_wrong_key() -> None:
    j = _rotated()
    new = signer_for("test-key-2")
    f = fail([j.records[0], stored(edited(j.records[1], key_id=new.key_id), new)])
    assert (f.seq, f.reason) == (2, "WRONG_KEY")


def test_verify_rotation_new_key_id_not_matching_pem_fails_bad_field() -> None:
    j = _rotated()
    payload = rotation_payload(signer_for("test-key-1"), signer_for("test-key-2"))
    payload["new_key_id"] = signer_for("test-key-outsider").key_id
    f = fail([j.records[0], stored(edited(j.records[1], payload=payload))])
    assert (f.seq, f.reason) == (2, "BAD_FIELD")


@pytest.mark.parametrize(
    "new_public_key", [None, 42, ["pem"], "", "not a key", "-----BEGIN X-----\n!!\n-----END X-----"]
)
def test_verify_rotation_without_valid_pem_fails_bad_field(new_public_key: Any) -> None:
    j = _rotated()
    payload = rotation_payload(signer_for("test-key-1"), signer_for("test-key-2"))
    payload["new_public_key"] = new_public_key
    f = fail([j.records[0], stored(edited(j.records[1], payload=payload))])
    assert (f.seq, f.reason) == (2, "BAD_FIELD")


def test_verify_rotation_without_new_key_fields_fails_bad_field() -> None:
    j = _rotated()
    payload = {"event": "KEY_ROTATED"}
    f = fail([j.records[0], stored(edited(j.records[1], payload=payload))])
    assert (f.seq, f.reason) == (2, "BAD_FIELD")


def test_verify_new_key_missing_from_key_ring_fails_unknown_key() -> None:
    f = fail(_rotated().records, names=("test-key-1",))
    assert (f.seq, f.reason) == (3, "UNKNOWN_KEY")


def test_verify_check_sig_raising_key_error_reported_unknown_key() -> None:
    def check_sig(key_id: str, data: bytes, sig: str) -> bool:
        raise KeyError(key_id)

    with pytest.raises(VerifyFailure) as info:
        verify_chain("till-1", three_sales().records, check_sig)
    assert (info.value.seq, info.value.reason) == (1, "UNKNOWN_KEY")


# ---------------------------------------------------------------------- finish


def test_chain_verifier_finish_at_expected_head_passes() -> None:
    j = three_sales()
    v = ChainVerifier("till-1", key_ring().check_sig)
    for r in j.records:
        v.feed(r)
    v.finish(expected_seq=3, expected_hash=j.head.hash)


def test_chain_verifier_finish_other_head_hash_fails_hash_mismatch() -> None:
    j = three_sales()
    with pytest.raises(VerifyFailure) as info:
        verify_chain("till-1", j.records, key_ring().check_sig, expected_hash="0" * 64)
    assert (info.value.seq, info.value.reason) == (3, "HASH_MISMATCH")


def test_chain_verifier_finish_beyond_expected_head_fails_seq_gap() -> None:
    f = fail(three_sales().records, expected_seq=2)
    assert (f.seq, f.reason) == (3, "SEQ_GAP")


def test_verify_failure_to_json_names_chain_seq_reason() -> None:
    f = fail(three_sales().records[1:])
    assert f.to_json() == {
        "chain": "till-1",
        "seq": 1,
        "reason": "SEQ_GAP",
        "message": "found seq 2, expected 1",
    }
    assert str(f) == "chain 'till-1' seq 1: SEQ_GAP: found seq 2, expected 1"
