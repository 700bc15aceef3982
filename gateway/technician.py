"""What the technician's page shows beyond the core status: key fingerprint, disk free,
items needing review and the recent technical events (docs/operations.md, "Status page").

Read-only: every query runs on the read pool (its own SQLite connections, never the writer).
The composition root merges :func:`technician_status` into the status JSON.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
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


def _newest(r: Reader, sql: str, limit: int) -> list[tuple[Any, ...]]:
    """The ``limit`` newest rows over all chains, newest first. Within a chain ``seq`` order is
    time order (record time never goes backward in a chain), so each chain's newest rows are
    read backward along its primary key — or the events' partial index — and merged here: the
    cost follows ``limit`` and the number of chains, not the size of the journal."""
    chains = [c for (c,) in r.conn.execute("SELECT chain FROM heads")]
    rows = [row for c in chains for row in r.conn.execute(sql, (c, limit))]
    # rows are (chain, seq, time, ...); order: time DESC, then chain, then seq DESC (stable
    # sorts, least significant key first)
    rows.sort(key=lambda row: row[1], reverse=True)
    rows.sort(key=lambda row: row[0])
    rows.sort(key=lambda row: row[2], reverse=True)
    return rows[:limit]


def _recent_records(r: Reader) -> list[dict[str, Any]]:
    out = []
    for chain, seq, time, type_, body in _newest(
        r,
        "SELECT chain, seq, time, type, body FROM records "
        "WHERE chain = ? AND type != 'INTENTION::EVENT' ORDER BY seq DESC LIMIT ?",
        RECENT_RECORDS,
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
    """Per processor, when its last run that delivered records and succeeded
    (``RunStats.succeeded``: nothing failed or rejected, no run error) started. A failed
    exchange that the run's own retries overcame (``errors_count``) is not a failure: the
    records went up and nothing was left behind."""
    return {
        p: format_time(ms)
        for p, ms in r.conn.execute(
            "SELECT processor, max(started_ms) FROM sync_runs WHERE accepted > 0 AND failed = 0 "
            "AND rejected = 0 AND run_error IS NULL GROUP BY processor"
        )
    }


def _review_and_events(
    r: Reader, *, with_events: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # 'rejected': a real-time cloud refused it for good (its chain's uplink stopped);
    # 'review': a batch processor set it aside (gateway.batch_sync). Neither is ever dropped.
    review = [
        {"processor": p, "chain": c, "seq": s, "state": st, "error": e, "since": t}
        for p, c, s, st, e, t in r.conn.execute(
            "SELECT processor, chain, seq, state, last_error, updated_at FROM outbox "
            "WHERE state IN ('rejected', 'review') ORDER BY processor, chain, seq LIMIT 200"
        )
    ]
    events: list[dict[str, Any]] = []
    if not with_events:
        return review, events
    for chain, seq, time, body in _newest(
        r,
        "SELECT chain, seq, time, body FROM records "
        "WHERE chain = ? AND type = 'INTENTION::EVENT' ORDER BY seq DESC LIMIT ?",
        RECENT_EVENTS,
    ):
        payload = dict(json.loads(body).get("payload", {}))
        code = payload.pop("event", "?")
        events.append({"chain": chain, "seq": seq, "time": time, "code": code, "fields": payload})
    return review, events


async def technician_status(
    reads: ReadPool, public_pem: str, state_dir: Path, *, lists: bool = True
) -> dict[str, Any]:
    """The ``key``, ``disk``, ``review``, ``events``, ``recent_records`` and
    ``last_sync_ok`` parts of the status JSON.

    ``lists=False`` leaves out ``events`` and ``recent_records``, the page's lists, which the
    MQTT retained status (computed every second, docs/mqtt.md) does not carry; each list costs
    well under a millisecond whatever the journal's size (:func:`_newest`)."""
    review, events = await reads.run(partial(_review_and_events, with_events=lists))
    records = await reads.run(_recent_records) if lists else None
    last_ok = await reads.run(_last_sync_ok)
    out = {
        "key": {"fingerprint_sha256": key_fingerprint(public_pem)},
        "disk": disk_status(state_dir),
        "review": review,
        "events": events,
        "recent_records": records,
        "last_sync_ok": last_ok,
    }
    if not lists:
        del out["events"], out["recent_records"]
    return out
