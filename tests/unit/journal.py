"""Test keys from the vectors and an in-memory chain writer (draft → sign), for unit tests.

The keys are the TEST keys printed in ``tests/vectors/records.json``; nothing here writes a
file. :class:`Journal` does what the ledger writer does to make a record — ``chain.draft``,
then the signer — and keeps the stored form (:class:`StoredRecord`) a verifier reads.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from drivers.signers.software import KeyRing, SoftwareSigner
from gateway.core.canonical import canonical_bytes
from gateway.core.chain import KEY_ROTATED, ChainHead, Draft, draft
from gateway.core.record import sha256_hex
from gateway.core.request import validate_sale
from gateway.core.verify import StoredRecord

VECTORS_DIR = Path(__file__).resolve().parent.parent / "vectors"
T0_MS = 1795255200000  # 2026-11-21T10:00:00.000Z


@functools.cache
def load_vectors(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS_DIR / name).read_text(encoding="utf-8"))
    return data


@functools.cache
def signer_for(name: str = "test-key-1") -> SoftwareSigner:
    """The TEST signing key ``name`` of the record vectors."""
    pem = load_vectors("records.json")["test_keys"][name]["TEST_ONLY_private_key_pem"]
    return SoftwareSigner.from_pem(pem.encode("ascii"))


def key_ring(*names: str) -> KeyRing:
    return KeyRing(signer_for(n).public_pem for n in (names or ("test-key-1", "test-key-2")))


def stored(body: dict[str, Any], signer: SoftwareSigner | None = None) -> StoredRecord:
    """``body`` canonicalized, hashed and signed (default: test key 1) as it is."""
    data = canonical_bytes(body)
    return StoredRecord(data, sha256_hex(data), (signer or signer_for()).sign(data))


class Journal:
    """An in-memory chain writer: ``chain.draft`` then ``signer.sign``, no IO."""

    def __init__(self, signer: SoftwareSigner | None = None, chain: str = "till-1") -> None:
        self.signer = signer or signer_for()
        self.head = ChainHead(chain)
        self.drafts: list[Draft] = []
        self.records: list[StoredRecord] = []

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [d.body for d in self.drafts]

    def append(
        self,
        record_type: str,
        payload: dict[str, Any],
        now_ms: int,
        *,
        offline: bool = False,
        client: str = "pos-1",
    ) -> Draft:
        d = draft(
            self.head,
            record_type=record_type,
            client=client,
            request_id=f"req-{self.head.seq + 1}",
            payload=payload,
            now_ms=now_ms,
            key_id=self.signer.key_id,
            offline=offline,
        )
        self.records.append(StoredRecord(d.body_bytes, d.hash, self.signer.sign(d.body_bytes)))
        self.drafts.append(d)
        self.head = d.head
        return d

    def rotate(self, new_signer: SoftwareSigner, now_ms: int) -> Draft:
        """Record the key change, signed by the current key, then sign with ``new_signer``."""
        d = self.append("INTENTION::EVENT", rotation_payload(self.signer, new_signer), now_ms)
        self.signer = new_signer
        return d


def rotation_payload(old: SoftwareSigner, new: SoftwareSigner) -> dict[str, Any]:
    return {
        "event": KEY_ROTATED,
        "old_key_id": old.key_id,
        "new_key_id": new.key_id,
        "new_public_key": new.public_pem,
    }


def play(ops: list[tuple[Any, ...]], journal: Journal | None = None) -> Journal:
    """Write the operations of ``strategies.journal_ops`` into a journal; return it."""
    j = journal or Journal()
    now_ms = T0_MS
    sales: list[Draft] = []
    for kind, data, step_ms in ops:
        now_ms += step_ms
        if kind == "sale":
            sale = validate_sale(data)
            sales.append(j.append(sale.record_type, sale.payload(), now_ms))
        elif kind == "event":
            j.append("INTENTION::EVENT", {"event": data}, now_ms)
        else:
            of = sales[data].body
            ref = {"seq": of["seq"], "hash": sales[data].hash}
            if kind == "duplicate":
                j.append("INTENTION::DUPLICATE", {"of": ref, "copy": True}, now_ms)
            else:
                vat = [
                    {"rate": v["rate"], "net": -v["net"], "vat": -v["vat"], "gross": -v["gross"]}
                    for v in of["payload"]["vat"]
                ]
                payload = {"cancels": ref, "vat": vat, "total": -of["payload"]["total"]}
                j.append("TRANSACTION::CANCELLATION", payload, now_ms)
    return j
