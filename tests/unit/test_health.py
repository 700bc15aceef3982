"""gateway.core.health: the page's green / amber / red from the status JSON."""

from __future__ import annotations

from typing import Any

from gateway.core.health import LOW_DISK_BYTES, assess_health

GREEN: dict[str, Any] = {
    "signing": {"ok": True, "halted_reason": None},
    "printer": {"state": "ready", "last_error": None},
    "mqtt": {"enabled": True, "connected": True, "broker": "127.0.0.1:1883"},
    "offline": {"processors": []},
    "sync": {"processors": []},
    "review": [],
    "disk": {"free_bytes": 10 * LOW_DISK_BYTES},
}


def with_(**parts: Any) -> dict[str, Any]:
    return {**GREEN, **parts}


def test_health_all_fine_is_green() -> None:
    assert assess_health(GREEN) == {"level": "green", "reasons": []}


def test_health_paper_out_is_amber_with_the_reason() -> None:
    h = assess_health(with_(printer={"state": "paused", "problem": "paper out"}))
    assert h == {"level": "amber", "reasons": ["printer paused: paper out"]}


def test_health_amber_conditions_each_turn_amber() -> None:
    cases = [
        with_(mqtt={"enabled": True, "connected": False, "broker": "b:1883"}),
        with_(review=[{"processor": "p", "chain": "c", "seq": 1}]),
        with_(disk={"free_bytes": LOW_DISK_BYTES - 1}),
        with_(
            offline={
                "processors": [
                    {"name": "p", "state": "offline", "chains": [{"chain": "c", "budget": None}]}
                ]
            }
        ),
    ]
    for status in cases:
        assert assess_health(status)["level"] == "amber", status


def test_health_halted_or_budget_exhausted_is_red_and_keeps_amber_reasons() -> None:
    halted = with_(
        signing={"ok": False, "halted_reason": "chain broken at till-1 seq 3"},
        printer={"state": "unreachable", "problem": "no answer"},
    )
    h = assess_health(halted)
    assert h["level"] == "red"
    assert h["reasons"][0] == "signing halted: chain broken at till-1 seq 3"
    assert "printer unreachable: no answer" in h["reasons"]
    hard = with_(
        offline={
            "processors": [
                {
                    "name": "france/fiskaly",
                    "state": "online",
                    "chains": [{"chain": "till-1", "budget": {"level": "hard"}}],
                }
            ]
        }
    )
    assert assess_health(hard)["level"] == "red"


def test_health_batch_items_set_aside_for_review_is_red() -> None:
    status = with_(sync={"processors": [{"processor": "peppol/goroute", "needs_review": 2}]})
    h = assess_health(status)
    assert h["level"] == "red"
    assert h["reasons"][0].startswith("peppol/goroute: 2 item(s) set aside for review")


def test_health_batch_processor_held_by_a_429_is_amber_with_its_end() -> None:
    held = {"processor": "peppol/goroute", "hold_until": "2026-11-22T02:21:00.000Z"}
    h = assess_health(with_(sync={"processors": [held]}))
    assert h["level"] == "amber"
    assert h["reasons"] == [
        "peppol/goroute: the cloud asked to wait (429); nothing is sent before "
        "2026-11-22T02:21:00.000Z"
    ]
