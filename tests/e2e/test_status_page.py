"""The technician's status page in a real headless Chromium (Debian ``chromium`` driven by
Playwright), against the daemon as a real subprocess with a fake ESC/POS printer on a real
pty: figures after sales, amber on paper out, red when the ledger halts, a maintenance
action through the form, HTML injection escaped. Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from escpos_peer import FakePrinter, open_pty
from gateway_process import GatewayProcess
from playwright.async_api import async_playwright, expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TOKEN = "status-page-admin-token-0123456789"
HOSTILE = '<img src=x onerror="document.title=1">&amp;</td>'

StartDaemon = Callable[..., Any]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not Path(CHROMIUM).exists():  # noqa: ASYNC240 - one stat before the browser starts
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def fake() -> Iterator[tuple[FakePrinter, str]]:
    master, slave, path = open_pty()
    printer = FakePrinter(master)
    try:
        yield printer, path
    finally:
        printer.close()
        os.close(slave)


def config(tmp_path: Path, printer_path: str | None) -> str:
    token = tmp_path / "admin.token"
    token.write_text(TOKEN + "\n", "utf-8")
    printer = (
        f"""
[printer]
kind = "serial"
device = "{printer_path}"
baud = 115200
flow_control = "none"
status_timeout_s = 0.5
poll_s = 0.2
confirm_timeout_s = 30.0
retry_max_s = 1.0
"""
        if printer_path
        else ""
    )
    return f'[http]\nadmin_token_file = "{token}"\n{printer}'


def sale(request_id: str, amount: int, text: str = "Café") -> dict[str, Any]:
    return {
        "id": request_id,
        "op": "sign",
        "till": "till-1",
        "type": "RECEIPT",
        "currency": "EUR",
        "lines": [
            {"text": text, "qty": "1", "unit_price": amount, "vat_rate": "10.00", "amount": amount}
        ],
        "payments": [{"method": "CASH", "amount": amount}],
        "total": amount,
    }


async def new_page(browser: Any, errors: list[str]) -> Any:
    page = await browser.new_page(viewport={"width": 900, "height": 1400})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)) as conn:
        return conn.execute(sql, params).fetchall()


def text_of(body: bytes | str) -> str:
    return body.decode("utf-8") if isinstance(body, bytes) else body


async def until(check: Callable[[], Any], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_status_page_sales_paper_out_and_reprint_form_work_in_chromium(
    start_daemon: StartDaemon,
    browser: Any,
    fake: tuple[FakePrinter, str],
    tmp_path: Path,
) -> None:
    printer, path = fake
    d = await start_daemon(config(tmp_path, path))
    errors: list[str] = []
    page = await new_page(browser, errors)
    await page.goto(d.http_url + "/")
    await page.wait_for_selector("#health[data-level=green]")

    # sales made while the page is open show up by the page's own refresh (the chain opens
    # with the gateway-wide events held since start: START, KEY_GENERATED)
    held = d.held_events()
    for i, amount in enumerate((250, 480, 1270)):
        assert (await d.request(sale(f"s{i}", amount)))["ok"]
    assert (await d.request(sale("s3", 100, HOSTILE)))["ok"]
    chain = page.locator(".chain[data-chain='till-1']")
    await expect(chain.locator(".seq")).to_have_text(str(held + 4), timeout=15_000)
    await expect(chain.locator(".gross")).to_have_text("21.00")
    await expect(chain).to_contain_text("TRANSACTION::RECEIPT: 4")
    # the item text is shown as text, never as markup
    await expect(page.locator("#records .item").first).to_have_text(HOSTILE)
    assert await page.locator("#records img").count() == 0
    assert await page.title() != "1"

    # paper out: amber, with the reason
    printer.set(paper_out=True)
    await page.wait_for_selector("#health[data-level=amber]", timeout=15_000)
    await expect(page.locator("#health-reasons")).to_contain_text("paper out")
    await expect(page.locator("#printer")).to_contain_text("OUT")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "status-page-amber.png"), full_page=True)
    printer.set(paper_out=False)
    await page.wait_for_selector("#health[data-level=green]", timeout=15_000)

    # a maintenance action through the forms: log in, reprint receipt 2 as a duplicate
    await page.fill("input[name=token]", TOKEN)
    await page.click("form[action='/login'] button")
    await page.fill("form[action='/admin/reprint'] input[name=seq]", str(held + 2))
    await page.click("#act-reprint")
    await expect(page.locator(".flash")).to_contain_text("reprint: ok")
    dup = d.query("SELECT seq, body FROM records WHERE type = 'INTENTION::DUPLICATE'")
    assert len(dup) == 1 and f'"seq":{held + 2}' in text_of(dup[0][1])

    async def action_recorded() -> bool:
        bodies = [
            json.loads(text_of(b))["payload"]
            for (b,) in d.query("SELECT body FROM records WHERE type = 'INTENTION::EVENT'")
        ]
        return any(
            p["event"] == "ADMIN_ACTION"
            and p["action"] == "reprint"
            and p["who"].startswith("technician session")
            and p["input"] == {"chain": "till-1", "seq": str(held + 2)}
            for p in bodies
        )

    await until(action_recorded)
    await expect(page.locator("#events")).to_contain_text("ADMIN_ACTION", timeout=15_000)
    # the test page goes to the real (fake) printer between receipts
    await asyncio.to_thread(printer.wait_printed, 5)  # 4 sales + the duplicate
    await page.click("#act-test-page")
    await expect(page.locator(".flash")).to_contain_text("test-page: ok")
    docs = await asyncio.to_thread(printer.wait_printed, 6)
    assert any("TEST" in t.upper() for t in docs[-1].texts), docs[-1].texts
    # an export of today downloaded through the form (CSRF token and all)
    async with page.expect_download() as download_info:
        await page.click("#act-export")
    download = await download_info.value
    saved = tmp_path / download.suggested_filename
    await download.save_as(saved)
    with tarfile.open(saved) as tar:
        assert "export/manifest.json" in tar.getnames()
    await page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
    await page.close()
    assert errors == []
    # stop while the printer fake still answers (fixtures are torn down before the daemon)
    assert await d.stop() == 0


async def test_status_page_ledger_halted_turns_red_and_health_503(
    start_daemon: StartDaemon, browser: Any, tmp_path: Path
) -> None:
    d = await start_daemon(config(tmp_path, None))
    for i in range(3):
        assert (await d.request(sale(f"r{i}", 300)))["ok"]
    assert await d.stop() == 0
    # tamper with the last sale's body: the start-up check must find the broken chain
    with closing(sqlite3.connect(d.db_path)) as conn:
        conn.execute(
            "UPDATE records SET body = CAST(replace(CAST(body AS TEXT), "
            "'\"amount\":300', '\"amount\":301') AS BLOB) WHERE chain = 'till-1' AND seq = 3"
        )
        conn.commit()
    port = d.port
    assert d.config_path is not None
    with GatewayProcess(
        tmp_path / "halted.log",
        config=d.config_path,
        state_dir=d.state_dir,
        http=f"127.0.0.1:{port}",
    ):
        async with aiohttp.ClientSession() as http:

            async def halted() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/v1/health") as r:
                        return r.status == 503
                except aiohttp.ClientError:
                    return False

            await until(halted, 30.0)
        errors: list[str] = []
        page = await new_page(browser, errors)
        await page.goto(f"http://127.0.0.1:{port}/")
        await page.wait_for_selector("#health[data-level=red]")
        reasons = page.locator("#health-reasons")
        await expect(reasons).to_contain_text("signing halted")
        await expect(reasons).to_contain_text("HASH_MISMATCH")
        await page.screenshot(path=str(ARTIFACTS / "status-page-red.png"), full_page=True)
        await page.close()
        assert errors == []
