"""The batch simulators are as strict as the tests rely on (docs/sync.md, "The simulators"):
limits refused with 400/413/429 and recorded as violations, 429 with a Retry-After that is
checked for every request, and no document ever accepted twice. Plain HTTP on loopback."""

from __future__ import annotations

import json
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest
from batch_support import ISSUER, RUC, SELLER, FakeClock, entry_of, invoice_request

from drivers.cloud.goroute_sim import GoRouteSim
from drivers.cloud.sifen_sim import SifenSim
from gateway.core.cdc import derive_cdc
from gateway.core.ubl import render_invoice

pytestmark = pytest.mark.timeout(60)
KEY = {"X-API-Key": "k"}
TIME = "2026-11-22T02:00:00.000Z"


def invoice(number: int) -> dict[str, str]:
    payload = entry_of(invoice_request(f"r{number}")).payload
    xml = render_invoice(
        chain="till-1",
        number=number,
        time=TIME,
        request_id=f"r{number}",
        payload=payload,
        seller=SELLER,
    )
    return {"id": f"till-1:{number}", "xml": xml.decode()}


def cdc(number: int) -> str:
    return derive_cdc(
        ISSUER, chain="till-1", number=number, time=TIME, offline=False, record_hash="ab" * 32
    )


async def call(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    async with http.request(method, url, headers=headers, json=body) as r:
        return r.status, dict(r.headers), await r.read()


async def test_goroute_sim_limits_refused_as_violations() -> None:
    async with (
        GoRouteSim(api_keys={"k"}, max_docs=2, max_batch_bytes=40_000, max_doc_bytes=9_000) as sim,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        url = sim.url + "/api/v1/send/batch"
        assert (await call(http, "POST", url, {"X-API-Key": "bad"}, {"documents": []}))[0] == 401
        docs = [invoice(n) for n in (1, 2, 3)]
        assert (await call(http, "POST", url, KEY, {"documents": docs}))[0] == 400
        big = {"id": "till-1:9", "xml": docs[0]["xml"] + " " * 9_000}
        assert (await call(http, "POST", url, KEY, {"documents": [big]}))[0] == 413
        huge = [{"id": "x", "xml": "y" * 8_000}] * 6
        assert (await call(http, "POST", url, KEY, {"documents": huge}))[0] == 413
        assert (await call(http, "POST", url, KEY, {"docs": []}))[0] == 400
        assert sim.violations == [
            "3 documents",
            "document over bytes",
            "batch over bytes",
            "bad body",
        ]
        assert sim.sent_times == []


async def test_goroute_sim_never_accepts_an_invoice_twice() -> None:
    async with (
        GoRouteSim(api_keys={"k"}) as sim,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        url = sim.url + "/api/v1/send/batch"
        status, _, raw = await call(http, "POST", url, KEY, {"documents": [invoice(1)]})
        assert status == 200
        first = json.loads(raw)["results"][0]
        assert first["status"] == "accepted"
        # the same invoice number again, even under another document id
        again = {**invoice(1), "id": "other"}
        status, _, raw = await call(http, "POST", url, KEY, {"documents": [again, invoice(2)]})
        results = json.loads(raw)["results"]
        assert results[0]["status"] == "rejected"
        assert results[0]["error"]["code"] == "DUPLICATE_DOCUMENT"
        assert results[0]["transaction_id"] == first["transaction_id"]
        assert results[1]["status"] == "accepted"
        assert sim.duplicates == 1 and len(sim.invoices) == 2


@pytest.mark.parametrize("form", ["seconds", "date"])
async def test_goroute_sim_429_retry_after_and_early_requests_counted(form: str) -> None:
    clock = FakeClock()
    clock.ms -= clock.ms % 1000
    async with (
        GoRouteSim(api_keys={"k"}, clock=clock.now_s, rate_limit=2, retry_after_format=form) as sim,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        url = sim.url + "/api/v1/send/batch"
        for n in (1, 2):
            assert (await call(http, "POST", url, KEY, {"documents": [invoice(n)]}))[0] == 200
            clock.advance(10)
        status, headers, _ = await call(http, "POST", url, KEY, {"documents": [invoice(3)]})
        assert status == 429 and sim.violations == ["over the rate"]
        # the first batch leaves the window 60 s after it came: 40 s from now
        if form == "seconds":
            assert headers["Retry-After"] == "40"
        else:
            when = parsedate_to_datetime(headers["Retry-After"]).timestamp()
            assert when == clock.now_s() + 40
        clock.advance(39)
        status, _, _ = await call(http, "GET", sim.url + "/api/v1/batches/batch_000001", KEY)
        assert status == 429 and sim.early_requests == 1
        clock.advance(1)
        assert (await call(http, "POST", url, KEY, {"documents": [invoice(3)]}))[0] == 200
        assert sim.early_requests == 1 and sim.max_in_window() == 2


async def test_goroute_sim_429_from_another_client_is_not_a_violation() -> None:
    clock = FakeClock()
    async with (
        GoRouteSim(api_keys={"k"}, clock=clock.now_s) as sim,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        sim.spend_quota(10)
        status, headers, _ = await call(
            http, "POST", sim.url + "/api/v1/send/batch", KEY, {"documents": [invoice(1)]}
        )
        assert (status, headers["Retry-After"]) == (429, "60")
        assert sim.violations == [] and sim.early_requests == 0


async def test_sifen_sim_strict_and_duplicate_cdc_1001() -> None:
    clock = FakeClock()
    auth = {"token": "t", "Emisor": RUC}
    async with (
        SifenSim(
            tokens={"t"},
            emisor=RUC,
            clock=clock.now_s,
            max_docs=2,
            rate_limit=2,
            max_lote_bytes=5000,
        ) as sim,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        url = sim.url + "/recibe/lote"

        def lote(*numbers: int) -> dict[str, Any]:
            return {"documentos": [{"cdc": cdc(n), "de": {"n": n}} for n in numbers]}

        assert (await call(http, "POST", url, {**auth, "token": "x"}, lote(1)))[0] == 500
        assert (await call(http, "POST", url, {**auth, "Emisor": "1-1"}, lote(1)))[0] == 500
        assert (await call(http, "POST", url, auth, lote(1, 2, 3)))[0] == 400
        wrong_digit = cdc(1)[:-1] + str((int(cdc(1)[-1]) + 1) % 10)
        bad = {"documentos": [{"cdc": wrong_digit, "de": {}}]}
        assert (await call(http, "POST", url, auth, bad))[0] == 400
        padded = {"documentos": [{"cdc": cdc(1), "de": {"x": "y" * 6000}}]}
        assert (await call(http, "POST", url, auth, padded))[0] == 413
        assert len(sim.violations) == 3
        status, _, raw = await call(http, "POST", url, auth, lote(1, 2))
        first = json.loads(raw)["lote"]
        clock.advance(1)
        status, _, raw = await call(http, "POST", url, auth, lote(2))
        second = json.loads(raw)["lote"]
        query = sim.url + "/consulta/lote"
        for _ in range(3):
            status, _, raw = await call(http, "POST", query, auth, {"lote": second})
        (result,) = json.loads(raw)["resultados"]
        assert (result["estado"], result["codigoError"]) == ("Rechazado", 1001)
        for _ in range(3):  # En Cola, Procesando, then the verdicts
            status, _, raw = await call(http, "POST", query, auth, {"lote": first})
        assert [r["estado"] for r in json.loads(raw)["resultados"]] == ["Aprobado"] * 2
        assert sim.duplicates == 1
        # a third lote in the minute: 429, Retry-After; a query before it is early
        status, headers, _ = await call(http, "POST", url, auth, lote(3))
        assert (status, headers["Retry-After"]) == (429, "59")
        status, _, _ = await call(http, "POST", query, auth, {"lote": first})
        assert status == 429 and sim.early_requests == 1
