"""drivers.signers.software, in memory: P-256, RFC 6979 deterministic signatures, key ring.

Key files (load_signer, generate_key) are integration tests; here keys come from PEM text.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.signers.software import KeyRing, SoftwareSigner
from gateway.core.errors import KeyError_

from .journal import key_ring, signer_for

# RFC 6979 appendix A.2.5: ECDSA, 256 bits (prime field), SHA-256.
RFC6979_X = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC6979_KAT = {
    b"sample": (
        0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
        0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8,
    ),
    b"test": (
        0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
        0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083,
    ),
}


@pytest.mark.parametrize("message", sorted(RFC6979_KAT))
def test_software_signer_rfc6979_known_answer(message: bytes) -> None:
    signer = SoftwareSigner(ec.derive_private_key(RFC6979_X, ec.SECP256R1()))
    r, s = decode_dss_signature(base64.b64decode(signer.sign(message)))
    assert (r, s) == RFC6979_KAT[message]


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200))
def test_software_signer_any_data_same_signature_twice_and_verifies(data: bytes) -> None:
    signer = signer_for()
    sig = signer.sign(data)
    assert sig == signer.sign(data)
    assert key_ring().check_sig(signer.key_id, data, sig)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=100), st.binary(min_size=1, max_size=4))
def test_key_ring_any_other_data_refused(data: bytes, extra: bytes) -> None:
    signer = signer_for()
    assert not key_ring().check_sig(signer.key_id, data + extra, signer.sign(data))


def test_key_ring_signature_of_other_key_refused() -> None:
    sig = signer_for("test-key-2").sign(b"x")
    assert not key_ring().check_sig(signer_for("test-key-1").key_id, b"x", sig)


@pytest.mark.parametrize("sig", ["", "!!!!", "AAAA", "MEUCIQ", "é", " " + "A" * 96])
def test_key_ring_malformed_signature_refused(sig: str) -> None:
    assert not key_ring().check_sig(signer_for().key_id, b"x", sig)


def test_key_ring_signature_not_a_string_refused() -> None:
    assert not key_ring().check_sig(signer_for().key_id, b"x", None)  # type: ignore[arg-type]


def test_key_ring_unknown_key_raises_key_error() -> None:
    with pytest.raises(KeyError):
        key_ring("test-key-1").check_sig(signer_for("test-key-2").key_id, b"x", "")


def test_key_ring_ids_and_membership() -> None:
    ring = KeyRing()
    kid = ring.add_pem(signer_for().public_pem)
    assert kid == signer_for().key_id
    assert kid in ring
    assert ring.ids() == [kid]


def test_software_signer_from_pem_not_a_key_refused() -> None:
    with pytest.raises(KeyError_):
        SoftwareSigner.from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_software_signer_other_curve_refused() -> None:
    with pytest.raises(KeyError_, match="P-256"):
        SoftwareSigner(ec.generate_private_key(ec.SECP384R1()))


def test_software_signer_rsa_key_refused() -> None:
    pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(KeyError_, match="EC"):
        SoftwareSigner.from_pem(pem)


def test_key_ring_rsa_public_key_refused() -> None:
    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(KeyError_):
        KeyRing([pem])
