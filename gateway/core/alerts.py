"""Alerts derived from two successive status snapshots: what changed for the worse (or better).

The status JSON (``App.status``, docs/protocol.md) is the one source of truth; this module
compares the last snapshot an alert was raised from with the current one and says which alerts
to raise, so every transport that announces alerts (MQTT ``events`` today) raises the same
ones. Pure: no clock (the caller stamps the time), no IO, no memory of its own.

Read from the status: ``signing.ok`` / ``signing.halted_reason`` (integrity alarm),
``printer.last_error`` (printer fault), ``offline.processors[].name`` and ``.limit``
(``"ok"``, ``"warning"``, ``"hard"``: the offline budget of a sync processor).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Status = Mapping[str, Any]


def _get(status: Status | None, section: str, key: str) -> Any:
    if status is None:
        return None
    part = status.get(section)
    return part.get(key) if isinstance(part, Mapping) else None


def _limits(status: Status | None) -> dict[str, str]:
    processors = _get(status, "offline", "processors")
    out: dict[str, str] = {}
    if isinstance(processors, list):
        for p in processors:
            if isinstance(p, Mapping) and isinstance(p.get("name"), str):
                out[p["name"]] = str(p.get("limit", "ok"))
    return out


def alerts(previous: Status | None, current: Status) -> list[dict[str, Any]]:
    """The alerts to raise going from ``previous`` (None: nothing seen yet) to ``current``.

    Each alert is ``{"alert", "severity", "message"}`` plus the subject (``processor``).
    A bad state seen first (``previous`` None) is raised too, so a restart does not hide it.
    """
    out: list[dict[str, Any]] = []
    was_ok = _get(previous, "signing", "ok")
    is_ok = _get(current, "signing", "ok")
    reason = _get(current, "signing", "halted_reason")
    if is_ok is False and (
        was_ok is not False or reason != _get(previous, "signing", "halted_reason")
    ):
        out.append(
            {
                "alert": "integrity_alarm",
                "severity": "critical",
                "message": f"signing halted: {reason}",
            }
        )
    elif is_ok is True and was_ok is False:
        out.append(
            {"alert": "signing_resumed", "severity": "info", "message": "signing works again"}
        )
    old_err = _get(previous, "printer", "last_error")
    new_err = _get(current, "printer", "last_error")
    if new_err and new_err != old_err:
        out.append({"alert": "printer_fault", "severity": "warning", "message": str(new_err)})
    elif old_err and not new_err:
        out.append({"alert": "printer_ok", "severity": "info", "message": "printer works again"})
    before = _limits(previous)
    for name, limit in sorted(_limits(current).items()):
        if limit == before.get(name, "ok"):
            continue
        if limit == "warning":
            severity, text = "warning", "offline budget warning level crossed"
        elif limit == "hard":
            severity, text = "critical", "offline budget exhausted (hard limit)"
        else:
            severity, text = "info", "back within the offline budget"
        out.append(
            {
                "alert": "offline_limit",
                "severity": severity,
                "processor": name,
                "limit": limit,
                "message": f"{name}: {text}",
            }
        )
    return out
