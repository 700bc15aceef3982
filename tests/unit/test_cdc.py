"""SIFEN's CDC: structure, the modulo-11 check digit, determinism (gateway.core.cdc)."""

from __future__ import annotations

import pytest

from gateway.core.cdc import CdcError, Issuer, check_digit, derive_cdc, security_code, valid_cdc

#: The CDC example of SIFEN's Manual Técnico and the RUC it carries (80069563-1).
MANUAL_CDC = "01800695631001001000000612021112917595714694"
ISSUER = Issuer(ruc="80069563-1", expedition_points=(("till-2", "002"),))
HASH = "ab" * 32


def test_check_digit_manual_example_matches() -> None:
    assert check_digit(MANUAL_CDC[:43]) == 4
    assert valid_cdc(MANUAL_CDC)


def test_check_digit_ruc_examples_match() -> None:
    assert check_digit("80069563") == 1
    assert check_digit("80012345") == 0


def test_check_digit_remainder_0_or_1_gives_0() -> None:
    # "0": sum 0 → remainder 0; "6": 6×2 = 12 → remainder 1
    assert check_digit("0") == 0
    assert check_digit("6") == 0
    assert check_digit("1") == 9  # 2 → 11 − 2


def test_check_digit_non_digits_refused() -> None:
    with pytest.raises(CdcError):
        check_digit("12a4")


def test_derive_cdc_structure_fields_in_place() -> None:
    cdc = derive_cdc(
        ISSUER,
        chain="till-2",
        number=61,
        time="2021-11-29T17:59:57Z",
        offline=False,
        record_hash=HASH,
    )
    assert len(cdc) == 44 and valid_cdc(cdc)
    assert cdc[0:2] == "01"
    assert cdc[2:10] == "80069563" and cdc[10] == "1"
    assert cdc[11:14] == "001" and cdc[14:17] == "002"
    assert cdc[17:24] == "0000061"
    assert cdc[24] == "2"
    assert cdc[25:33] == "20211129"
    assert cdc[33] == "1"
    assert cdc[34:43] == security_code(HASH)


def test_derive_cdc_same_record_same_cdc_offline_is_contingency() -> None:
    kw = dict(chain="till-1", number=5, time="2026-03-08T10:00:00Z", record_hash=HASH)
    a = derive_cdc(ISSUER, offline=False, **kw)  # type: ignore[arg-type]
    assert a == derive_cdc(ISSUER, offline=False, **kw)  # type: ignore[arg-type]
    b = derive_cdc(ISSUER, offline=True, **kw)  # type: ignore[arg-type]
    assert b[33] == "2" and valid_cdc(b) and a != b


def test_derive_cdc_number_over_7_digits_refused() -> None:
    with pytest.raises(CdcError, match="7 digits"):
        derive_cdc(
            ISSUER,
            chain="t",
            number=10**7,
            time="2026-01-01T00:00:00Z",
            offline=False,
            record_hash=HASH,
        )


def test_valid_cdc_one_digit_changed_invalid() -> None:
    bad = MANUAL_CDC[:-1] + "5"
    assert not valid_cdc(bad)
    assert not valid_cdc(MANUAL_CDC[:43])


def test_issuer_validate_wrong_ruc_check_digit_refused() -> None:
    with pytest.raises(CdcError, match="check digit"):
        Issuer(ruc="80069563-2").validate()
    with pytest.raises(CdcError):
        Issuer(ruc="80069563-1", establishment="1").validate()
