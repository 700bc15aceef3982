"""Signers: turn canonical record bytes into a signature (software key today, PKCS#11 later).

A signer has ``key_id`` (16 hex), ``public_pem`` (SubjectPublicKeyInfo PEM) and
``sign(data: bytes) -> str`` (base64 of the DER ECDSA signature over SHA-256 of ``data``).
"""
