"""Who may read the status page: loopback clients without a token; others only with the
token, unless ``http.status_page_remote`` is set. The daemon is a real subprocess listening
on this machine's non-loopback address (``http.allow_non_loopback``)."""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest
from gateway_process import GatewayProcess, free_port, short_tempdir

TOKEN = "status-access-admin-token-0123456789"


def own_address() -> str:
    """This machine's outward IPv4 address (a UDP connect sends nothing)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            pytest.skip("no non-loopback IPv4 address on this machine")
        address = str(s.getsockname()[0])
    if address.startswith("127."):
        pytest.skip("no non-loopback IPv4 address on this machine")
    return address


async def wait_health(http: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            async with http.get(url + "/v1/health") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, "daemon not ready"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("remote_read", [False, True])
async def test_status_page_from_another_address_needs_token_unless_configured(
    remote_read: bool, tmp_path: Path
) -> None:
    host = own_address()
    token = tmp_path / "admin.token"
    token.write_text(TOKEN, "utf-8")
    config = tmp_path / "gw.toml"
    config.write_text(
        "[http]\nallow_non_loopback = true\n"
        f'admin_token_file = "{token}"\n'
        f"status_page_remote = {'true' if remote_read else 'false'}\n",
        "utf-8",
    )
    port = free_port()
    url = f"http://{host}:{port}"
    with (
        short_tempdir() as state,
        GatewayProcess(tmp_path / "gw.log", config=config, state_dir=state, http=f"{host}:{port}"),
    ):
        async with aiohttp.ClientSession() as http:
            await wait_health(http, url)
            want = 200 if remote_read else 403
            for path in ("/", "/fragment", "/metrics"):
                async with http.get(url + path) as r:
                    assert r.status == want, path
                async with http.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    assert r.status == 200, path
            # maintenance always needs credentials, whatever the read setting
            async with http.post(url + "/admin/test-page") as r:
                assert r.status == 401
