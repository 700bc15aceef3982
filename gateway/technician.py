"""What the technician's page shows beyond the core status: key fingerprint, disk free,
items needing review and the recent technical events (docs/operations.md, "Status page").

Read-only: every query runs on the read pool (its own SQLite connections, never the writer).
The composition root merges :func:`technician_status` into the status JSON.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from gateway.core.record import format_time
from gateway.reads import ReadPool
from gateway.store import Reader

#: how many technical events the page lists
RECENT_EVENTS = 50
#: how many recent fiscal records (receipts, closings, ...) the page lists
RECENT_RECORDS = 10


def key_fingerprint(public_pem: str) -> str:
    """SHA-256 of the public key's DER (SubjectPublicKeyInfo), hex in colon-separated pairs —
    what ``openssl pkey -pubin -outform DER | sha256sum`` prints, grouped."""
    key = serialization.load_pem_public_key(public_pem.encode("ascii"))
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(der).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def disk_status(state_dir: Path) -> dict[str, Any]:
    try:
        usage = shutil.disk_usage(state_dir)
    except OSError as exc:
        return {"path": str(state_dir), "free_bytes": None, "total_bytes": None, "error": str(exc)}
    return {"path": str(state_dir), "free_bytes": usage.free, "total_bytes": usage.total}


def _recent_records(r: Reader) -> list[dict[str, Any]]:
    out = []
    for chain, seq, type_, time, body in r.conn.execute(
        "SELECT chain, seq, type, time, body FROM records WHERE type != 'INTENTION::EVENT' "
        "ORDER BY time DESC, chain, seq DESC LIMIT ?",
        (RECENT_RECORDS,),
    ):
        payload = json.loads(body).get("payload", {})
        lines = payload.get("lines") or []
        first = lines[0] if lines and isinstance(lines[0], dict) else {}
        out.append(
            {
                "chain": chain,
                "seq": seq,
                "type": type_,
                "time": time,
                "total": payload.get("total"),
                "first_line": first.get("text"),
            }
        )
    return out


def _last_sync_ok(r: Reader) -> dict[str, str]:
    """Per processor, when its last run that delivered records without a failure started."""
    return {
        p: format_time(ms)
        for p, ms in r.conn.execute(
            "SELECT processor, max(started_ms) FROM sync_runs WHERE accepted > 0 AND failed = 0 "
            "AND errors_count = 0 AND run_error IS NULL GROUP BY processor"
        )
    }


def _review_and_events(r: Reader) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # 'rejected': a real-time cloud refused it for good (its chain's uplink stopped);
    # 'review': a batch processor set it aside (gateway.batch_sync). Neither is ever dropped.
    review = [
        {"processor": p, "chain": c, "seq": s, "state": st, "error": e, "since": t}
        for p, c, s, st, e, t in r.conn.execute(
            "SELECT processor, chain, seq, state, last_error, updated_at FROM outbox "
            "WHERE state IN ('rejected', 'review') ORDER BY processor, chain, seq LIMIT 200"
        )
    ]
    events = []
    for chain, seq, time, body in r.conn.execute(
        "SELECT chain, seq, time, body FROM records WHERE type = 'INTENTION::EVENT' "
        "ORDER BY time DESC, chain, seq DESC LIMIT ?",
        (RECENT_EVENTS,),
    ):
        payload = dict(json.loads(body).get("payload", {}))
        code = payload.pop("event", "?")
        events.append({"chain": chain, "seq": seq, "time": time, "code": code, "fields": payload})
    return review, events


async def technician_status(reads: ReadPool, public_pem: str, state_dir: Path) -> dict[str, Any]:
    """The ``key``, ``disk``, ``review``, ``events``, ``recent_records`` and
    ``last_sync_ok`` parts of the status JSON."""
    review, events = await reads.run(_review_and_events)
    records = await reads.run(_recent_records)
    last_ok = await reads.run(_last_sync_ok)
    return {
        "key": {"fingerprint_sha256": key_fingerprint(public_pem)},
        "disk": disk_status(state_dir),
        "review": review,
        "events": events,
        "recent_records": records,
        "last_sync_ok": last_ok,
    }
