"""The ``[printer]`` section: every bad value is reported with its field path."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_config
from gateway.core.errors import ConfigError


def problems(printer: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config({"printer": printer})
    return {d.field: d.message for d in info.value.details}


def test_printer_config_serial_printer_is_accepted() -> None:
    cfg = parse_config(
        {
            "printer": {
                "kind": "serial",
                "device": "/dev/serial/by-id/usb-EPSON_TM-T20III-if00-port0",
                "baud": 38400,
                "parity": "even",
                "flow_control": "xonxoff",
                "paper_width_mm": 58,
                "profile": "generic",
                "code_page": "cp1252",
                "merchant": "Café de la Gare",
                "address": ["1 place de la Gare", "75010 Paris"],
                "drawer_kick": True,
            }
        }
    )
    p = cfg.printer
    assert (p.kind, p.baud, p.parity, p.flow_control, p.paper_width_mm) == (
        "serial",
        38400,
        "even",
        "xonxoff",
        58,
    )
    assert p.address == ("1 place de la Gare", "75010 Paris") and p.drawer_kick


def test_printer_config_network_printer_needs_socket_url() -> None:
    assert parse_config({"printer": {"kind": "network", "device": "socket://192.0.2.7:9100"}})
    assert "printer.device" in problems({"kind": "network", "device": "192.0.2.7:9100"})


def test_printer_config_bad_values_reported_with_field_paths() -> None:
    found = problems(
        {
            "kind": "usb",
            "baud": 12345,
            "parity": "mark",
            "flow_control": "dsrdtr",
            "paper_width_mm": 76,
            "profile": "star",
            "code_page": "cp999",
            "qr_module_dots": 40,
            "cut": "half",
            "feed_lines": 99,
            "status_timeout_s": 0,
            "address": "not a list",
        }
    )
    assert set(found) == {
        "printer.kind",
        "printer.baud",
        "printer.parity",
        "printer.flow_control",
        "printer.paper_width_mm",
        "printer.profile",
        "printer.code_page",
        "printer.qr_module_dots",
        "printer.cut",
        "printer.feed_lines",
        "printer.status_timeout_s",
        "printer.address",
    }
    assert "no DSR/DTR output flow control" in found["printer.flow_control"]


def test_printer_config_serial_without_absolute_device_refused() -> None:
    assert "printer.device" in problems({"kind": "serial"})
    assert "printer.device" in problems({"kind": "file", "device": "usb/lp0"})
