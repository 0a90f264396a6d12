"""The operator page in a real browser: Debian's headless chromium over the DevTools protocol.

The test starts a gateway with an upstream, sends traffic, a 429 and a ban, loads
``/admin/ui#token=...`` and reads the DOM; with a wrong token the page shows no data.
Screenshots (1366x900 and 800x900) go to ``$GATEWAY_ARTIFACTS`` or
``tests/browser/artifacts/``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import free_port
from tests.gw import admin_url, base_config, running_gateway, serve
from tests.integration.test_admin_stats import (
    AUTH,
    ENV,
    TOKEN,
    send_traffic,
    traffic_config,
    upstream_handler,
)

pytestmark = pytest.mark.timeout(90)

CHROMIUM = os.environ.get("GATEWAY_CHROMIUM") or shutil.which("chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
ARTIFACTS = Path(os.environ.get("GATEWAY_ARTIFACTS") or Path(__file__).parent / "artifacts")

# what the page shows once /admin/stats has answered: the tables' text, and whether it is up
READ_PAGE = """(() => {
  const text = (id) => document.getElementById(id).innerText;
  return {
    dashboard: !document.getElementById("dashboard").hidden,
    login: !document.getElementById("login").hidden,
    error: text("error"),
    status: text("pod-status"),
    upstreams: text("upstreams"),
    routes: text("routes"),
    limited: text("limited"),
    bans: text("bans"),
    allow: text("allow"),
    config: text("config"),
    rows: document.querySelectorAll("main tbody tr").length,
    body: document.body.innerText,
    width: document.documentElement.scrollWidth,
  };
})()"""


class Page:
    """One browser tab driven over its DevTools websocket (commands only; events kept)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            data = msg.json()
            fut = self._waiting.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[n] = fut
        await self._ws.send_json({"id": n, "method": method, "params": params})
        answer = await asyncio.wait_for(fut, 20)
        assert "error" not in answer, answer
        result: dict[str, Any] = answer["result"]
        return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def size(self, width: int, height: int) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    async def screenshot(self, name: str) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


class Browser:
    def __init__(self, port: int, session: aiohttp.ClientSession) -> None:
        self._base = f"http://127.0.0.1:{port}"
        self._session = session

    async def new_page(self) -> Page:
        """A fresh tab (its own sessionStorage)."""
        async with self._session.put(f"{self._base}/json/new?about:blank") as resp:
            target = await resp.json()
        ws = await self._session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        await page.send("Log.enable")
        return page


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; or $GATEWAY_CHROMIUM)")
    port = free_port()
    # chromium's helper processes may still write into the profile for a moment after the
    # browser has exited: its process group is ended as a whole, and a file they leave
    # behind does not fail the test
    with tempfile.TemporaryDirectory(
        prefix="gateway-chromium-", ignore_cleanup_errors=True
    ) as profile:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={port}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(200):  # up to 20 s for a cold start on a busy machine
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"http://127.0.0.1:{port}/json/version") as r:
                            if r.status == 200:
                                break
                    if proc.returncode is not None:
                        pytest.fail(f"chromium exited with {proc.returncode}")
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail("chromium's DevTools port did not answer")
                yield Browser(port, session)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


async def settle(page: Page, done: str, timeout: float = 15.0) -> dict[str, Any]:
    """Poll the page until the JS expression ``done`` (on the page's state ``s``) holds."""
    state: dict[str, Any] = {}
    for _ in range(int(timeout / 0.1)):
        # one reading, judged and returned: two would let the page redraw in between
        found = await page.evaluate(f"(s => ({{s, ok: Boolean({done})}}))({READ_PAGE})") or {}
        state = found.get("s") or {}
        if state and found.get("ok"):
            return state
        await asyncio.sleep(0.1)
    pytest.fail(f"the page never reached {done!r}: {state}")


@pytest.fixture
async def up_url() -> AsyncIterator[str]:
    async with serve(upstream_handler) as url_:
        yield url_


def csp_reports(page: Page) -> list[str]:
    return [
        str(e["params"]["entry"].get("text"))
        for e in page.events
        if e["method"] == "Log.entryAdded"
        and "Content Security Policy" in str(e["params"]["entry"].get("text"))
    ]


async def test_operator_page_shows_the_pod_in_a_real_browser(up_url: str) -> None:
    async with running_gateway(traffic_config(up_url), ENV) as gw, chromium() as browser:
        async with aiohttp.ClientSession() as s:
            await send_traffic(s, gw)
            entry = {"ip": "10.0.0.99", "ttl_s": 3600, "reason": "ticket 1234: false positive"}
            async with s.post(admin_url(gw, "/admin/allow"), json=entry, headers=AUTH) as r:
                assert r.status == 201

        page = await browser.new_page()
        await page.size(1366, 900)
        await page.send("Page.navigate", url=admin_url(gw, f"/admin/ui#token={TOKEN}"))
        state = await settle(
            page, "s.dashboard && s.bans.includes('10.0.0.66') && s.upstreams.includes('500')"
        )
        assert "api" in state["upstreams"]
        assert "closed" in state["upstreams"].lower()
        assert "draining" not in state["body"].lower()
        assert "site" in state["routes"]
        assert "10.0.0.66" in state["bans"]
        assert "suspicious_path" in state["bans"]
        # the ban's evidence: its scored requests, shown unasked while bans are few
        assert "GET /.env" in state["bans"]
        assert "scored events" in state["bans"]
        assert "ticket 1234" in state["allow"]
        assert "10.0.0.99" in state["allow"]
        assert "10.0.0.7" in state["limited"]
        assert "generation" in state["config"]
        assert not state["login"]
        assert not state["error"]
        # the token left the address bar (the fragment is dropped once read)
        assert TOKEN not in await page.evaluate("location.href")
        assert state["width"] <= 1366, "the page scrolls sideways on a laptop screen"
        await page.screenshot("admin-ui-1366x900.png")

        await page.size(800, 900)
        state = await settle(page, "s.dashboard")
        assert state["width"] <= 800, "the page scrolls sideways on a narrow screen"
        await page.screenshot("admin-ui-800x900.png")
        assert csp_reports(page) == []
        await page.close()

        wrong = await browser.new_page()
        await wrong.size(1366, 900)
        await wrong.send("Page.navigate", url=admin_url(gw, "/admin/ui#token=not-the-token"))
        state = await settle(wrong, "s.login && s.error.includes('refused')")
        assert not state["dashboard"]
        assert "10.0.0.66" not in state["body"]
        assert "suspicious_path" not in state["body"]
        assert "site" not in state["body"]
        await wrong.screenshot("admin-ui-wrong-token.png")
        await wrong.close()


async def test_a_link_with_a_bad_fragment_still_asks_for_a_token(up_url: str) -> None:
    """``#token=`` that is not valid percent-encoding: the page shows the form (it used to
    stop at the exception, blank) and drops the fragment."""
    async with running_gateway(base_config(up_url), ENV) as gw, chromium() as browser:
        page = await browser.new_page()
        await page.send("Page.navigate", url=admin_url(gw, "/admin/ui#token=%E0%A4%A"))
        state = await settle(page, "s.login")
        assert not state["dashboard"]
        assert "%E0" not in await page.evaluate("location.href")
        await page.close()
