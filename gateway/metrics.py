"""Prometheus metrics (``GET /metrics``, text format 0.0.4; docs/operations.md, "Metrics").

Two kinds: the sign latency histogram, observed as requests are answered
(:meth:`Metrics.observe_sign`), and everything else read from the status JSON at scrape time
(:class:`_StatusCollector`), so a scrape shows exactly what ``/v1/status`` shows. Each
:class:`Metrics` has its own registry (no process-global state: tests run several daemons).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.core.health import assess_health

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: ops whose replies carry a new signed record
SIGNING_OPS = frozenset({"sign", "cancel", "correction", "reprint", "close", "batch"})
PRINTER_STATES = ("starting", "ready", "paused", "unreachable")
HEALTH_LEVELS = ("green", "amber", "red")


class _StatusCollector(Collector):
    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.sync_stats: list[dict[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        s = self.status
        writer = s.get("writer", {})
        yield CounterMetricFamily(
            "fiscal_gateway_records_signed",
            "records signed by the ledger writer since the daemon started",
            value=writer.get("records", 0),
        )
        yield CounterMetricFamily(
            "fiscal_gateway_writer_groups",
            "group commits since start",
            value=writer.get("groups", 0),
        )
        yield GaugeMetricFamily(
            "fiscal_gateway_writer_group_size_avg",
            "mean records per group commit since start",
            value=writer.get("avg_group", 0),
        )
        yield GaugeMetricFamily(
            "fiscal_gateway_writer_group_size_max",
            "largest group commit since start",
            value=writer.get("max_group", 0),
        )
        yield GaugeMetricFamily(
            "fiscal_gateway_signing_ok",
            "1 while signing works, 0 when halted",
            value=1 if s.get("signing", {}).get("ok") else 0,
        )
        health = GaugeMetricFamily(
            "fiscal_gateway_health", "overall health (1 for the current level)", labels=["level"]
        )
        level = assess_health(s)["level"]
        for name in HEALTH_LEVELS:
            health.add_metric([name], 1 if name == level else 0)
        yield health
        seq = GaugeMetricFamily("fiscal_gateway_chain_head_seq", "head seq", labels=["chain"])
        for c in s.get("chains", []):
            seq.add_metric([c["chain"]], c["seq"])
        yield seq
        outbox = GaugeMetricFamily(
            "fiscal_gateway_outbox_depth", "records not yet synced", labels=["processor"]
        )
        depths = s.get("outbox", {})
        known = {p["processor"] for p in s.get("sync", {}).get("processors", [])}
        for processor in sorted(known | set(depths)):  # 0 for a processor with nothing queued
            outbox.add_metric([processor], depths.get(processor, 0))
        yield outbox
        replay = GaugeMetricFamily(
            "fiscal_gateway_replay_remaining",
            "offline records still to replay",
            labels=["processor", "chain"],
        )
        for p in s.get("offline", {}).get("processors", []):
            for c in p.get("chains", []):
                replay.add_metric(
                    [p["name"], c["chain"]], (c.get("budget") or {}).get("pending_records", 0)
                )
        yield replay
        results = GaugeMetricFamily(
            "fiscal_gateway_sync_items_24h",
            "sync results per processor over the last 24 hours",
            labels=["processor", "result"],
        )
        for st in self.sync_stats:
            for result in ("accepted", "rejected", "failed"):
                results.add_metric([st["processor"], result], st.get(result, 0))
        yield results
        printer = s.get("printer", {})
        pstate = GaugeMetricFamily(
            "fiscal_gateway_printer_state", "printer state (1 for the current)", labels=["state"]
        )
        current = printer.get("state", "unknown")
        for name in sorted({*PRINTER_STATES, current}):
            pstate.add_metric([name], 1 if name == current else 0)
        yield pstate
        yield GaugeMetricFamily(
            "fiscal_gateway_printer_queue", "print jobs waiting", value=printer.get("queue", 0)
        )
        mqtt = s.get("mqtt", {})
        yield GaugeMetricFamily(
            "fiscal_gateway_mqtt_connected",
            "1 while connected to the broker (0 when disconnected or disabled)",
            value=1 if mqtt.get("connected") else 0,
        )
        yield GaugeMetricFamily(
            "fiscal_gateway_uptime_seconds",
            "seconds since start",
            value=s.get("gateway", {}).get("uptime_s", 0),
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.sign_latency = Histogram(
            "fiscal_gateway_sign_latency_seconds",
            "time from a signing request's arrival at the dispatcher to its reply",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self._status = _StatusCollector()
        self.registry.register(self._status)

    def observe_sign(self, op: object, seconds: float) -> None:
        if op in SIGNING_OPS:
            self.sign_latency.observe(seconds)

    def render(self, status: dict[str, Any], sync_stats: list[dict[str, Any]]) -> bytes:
        self._status.status = status
        self._status.sync_stats = sync_stats
        return generate_latest(self.registry)
