"""Software signing key: ECDSA P-256 + SHA-256, deterministic (RFC 6979), DER, base64.

The private key lives in a PEM file (PKCS#8, unencrypted) that must not be readable by group
or others: :func:`load_signer` refuses such a file with ``KEY_ERROR`` rather than sign with a
key anyone on the box could copy. :func:`generate_key` creates it with mode 0600 from the
first byte (``O_EXCL``, never overwriting) and writes the public key next to it.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.core.errors import KeyError_
from gateway.core.record import key_id_of

_SIGN_ALG = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_VERIFY_ALG = ec.ECDSA(hashes.SHA256())


def public_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_pem(public_key: ec.EllipticCurvePublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


class SoftwareSigner:
    """Signs with an in-memory P-256 private key."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise KeyError_(f"signing key must be P-256, not {private_key.curve.name}")
        self._key = private_key
        pub = private_key.public_key()
        self.public_key = pub
        self.key_id = key_id_of(public_der(pub))
        self.public_pem = public_pem(pub)

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._key.sign(data, _SIGN_ALG)).decode("ascii")

    @classmethod
    def from_pem(cls, pem: bytes) -> SoftwareSigner:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyError_(f"not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyError_("signing key must be an EC (P-256) key")
        return cls(key)


def load_signer(path: Path) -> SoftwareSigner:
    """Load a private key file, refusing one that group or others may read or write."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyError_(
            f"signing key {path} does not exist "
            f"(create one with 'fiscal-gateway keygen --out {path}')"
        ) from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyError_(
            f"signing key {path} has mode {mode:04o}; it must not be accessible by group or "
            f"others (chmod 600 {path})"
        )
    return SoftwareSigner.from_pem(path.read_bytes())


def generate_key(private_path: Path, public_path: Path | None = None) -> SoftwareSigner:
    """Create a new P-256 key: private PEM with mode 0600 (never overwrites), public PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyError_(f"{private_path} already exists; refusing to overwrite a key") from None
    try:
        os.fchmod(fd, 0o600)  # umask cannot widen it, but be explicit
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    signer = SoftwareSigner(key)
    pub_path = public_path or private_path.with_suffix(".pub.pem")
    tmp = pub_path.with_name(pub_path.name + ".tmp")
    tmp.write_text(signer.public_pem)
    os.replace(tmp, pub_path)
    _fsync_dir(private_path.parent)
    return signer


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KeyRing:
    """Public keys by key id; ``check_sig`` is what the core verifier calls."""

    def __init__(self, pems: Iterable[str] = ()) -> None:
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for pem in pems:
            self.add_pem(pem)

    def add_pem(self, pem: str) -> str:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise KeyError_("public key is not an EC key")
        kid = key_id_of(public_der(key))
        self._keys[kid] = key
        return kid

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def ids(self) -> list[str]:
        return sorted(self._keys)

    def check_sig(self, key_id: str, data: bytes, sig_b64: str) -> bool:
        key = self._keys[key_id]  # KeyError: unknown key, reported as UNKNOWN_KEY
        try:
            sig = base64.b64decode(sig_b64, validate=True)
            # b64decode ignores the unused low bits of the last character: accept only the
            # one canonical encoding, so that no other ``sig`` text passes for this signature.
            if base64.b64encode(sig).decode("ascii") != sig_b64:
                return False
            key.verify(sig, data, _VERIFY_ALG)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True
