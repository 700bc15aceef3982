"""The overall health of the gateway — green, amber or red, with the reasons — from the
status JSON (docs/operations.md, "Status page").

- **red**: signing is halted (an integrity or storage failure), a sync processor stopped a
  chain or raised its failure-rate alert, or a chain reached its hard offline level.
- **amber**: the printer is not ready (paper out, cover open, unreachable, ...) or has a last
  error, a chain reached its offline warning level, a cloud is offline, MQTT is enabled but
  not connected, items wait for review, or the state directory's disk is nearly full.
- **green**: none of these.

Pure: it reads the dict it is given; no IO, no clock.
"""

from __future__ import annotations

from typing import Any

#: below this many free bytes on the state directory's file system the page turns amber
LOW_DISK_BYTES = 200 * 1024 * 1024


def assess_health(status: dict[str, Any]) -> dict[str, Any]:
    """``{"level": "green" | "amber" | "red", "reasons": [...]}`` for a status dict."""
    red: list[str] = []
    amber: list[str] = []
    signing = status.get("signing", {})
    if not signing.get("ok", True):
        red.append(f"signing halted: {signing.get('halted_reason')}")
    for p in status.get("sync", {}).get("processors", []):
        if p.get("stopped_chains"):
            red.append(
                f"{p['processor']}: uplink stopped for {', '.join(p['stopped_chains'])}"
                " (a record was rejected; review it, then retry)"
            )
        if p.get("alert"):
            red.append(f"{p['processor']}: sync failure rate above the alert threshold")
        if p.get("needs_review"):
            red.append(
                f"{p['processor']}: {p['needs_review']} item(s) set aside for review"
                " (GET /v1/admin/sync/review; retry after correction)"
            )
        if p.get("hold_until"):
            amber.append(
                f"{p['processor']}: the cloud asked to wait (429); nothing is sent before "
                f"{p['hold_until']}"
            )
    for p in status.get("offline", {}).get("processors", []):
        if p.get("state") not in (None, "online"):
            amber.append(f"{p['name']}: cloud {p['state']}")
        for c in p.get("chains", []):
            level = (c.get("budget") or {}).get("level", "ok")
            if level == "hard":
                red.append(f"{p['name']} {c['chain']}: offline budget exhausted")
            elif level == "warning":
                amber.append(f"{p['name']} {c['chain']}: offline budget at warning level")
    printer = status.get("printer", {})
    if printer.get("state") not in (None, "ready", "starting"):
        amber.append(f"printer {printer['state']}: {printer.get('problem') or 'not ready'}")
    elif printer.get("last_error"):
        amber.append(f"printer error: {printer['last_error']}")
    mqtt = status.get("mqtt", {})
    if mqtt.get("enabled") and not mqtt.get("connected"):
        amber.append(f"MQTT broker {mqtt.get('broker')} not connected")
    review = status.get("review", [])
    if review:
        amber.append(f"{len(review)} item(s) need review")
    disk = status.get("disk", {})
    if disk.get("free_bytes") is not None and disk["free_bytes"] < LOW_DISK_BYTES:
        amber.append(f"disk nearly full: {disk['free_bytes'] // (1024 * 1024)} MiB free")
    if red:
        return {"level": "red", "reasons": red + amber}
    if amber:
        return {"level": "amber", "reasons": amber}
    return {"level": "green", "reasons": []}
