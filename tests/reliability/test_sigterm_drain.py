"""SIGTERM under heavy load: 100 clients, streamed bodies both ways, an open WebSocket.

The drain follows Kubernetes: ``/readyz`` turns 503 at once, the endpoint is removed
while the gateway keeps serving for ``drain.delay_s``; here the clients stop starting
new requests halfway through the delay (the endpoint is gone), while long requests
started before keep going across the moment the listener closes.  Every one of them
must complete; the WebSocket gets close code 1001; the process exits 0 well before
``drain.timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.reliability.support import (
    GatewayProcess,
    UpstreamProcess,
    gateway_config,
    gateway_process,
    report,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]

CLIENTS = 100
DELAY_S = 1.0
TIMEOUT_S = 10.0
PART = b"u" * 8192


async def _body(parts: int, pause_s: float) -> AsyncIterator[bytes]:
    for _ in range(parts):
        yield PART
        await asyncio.sleep(pause_s)


def _outcome(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:60]}"


async def _upload(s: aiohttp.ClientSession, gw: GatewayProcess, parts: int, pause_s: float) -> Any:
    async with s.post(gw.url("/upload"), data=_body(parts, pause_s)) as r:
        if r.status != 200:
            return r.status
        size = json.loads(await r.read())["size"]
        return 200 if size == parts * len(PART) else f"size {size}"


async def _stream(s: aiohttp.ClientSession, gw: GatewayProcess, n: int, delay: float) -> Any:
    async with s.get(gw.url(f"/stream?n={n}&delay={delay}")) as r:
        body = await r.read()
        if r.status != 200:
            return r.status
        want = b"".join(b"part%d;" % i for i in range(n))
        return 200 if body == want else f"truncated {len(body)}/{len(want)}"


async def test_sigterm_under_heavy_load_drops_nothing(upstream: UpstreamProcess) -> None:
    cfg = gateway_config(upstream.url, drain={"delay_s": DELAY_S, "timeout_s": TIMEOUT_S})
    async with (
        gateway_process(cfg, name="drain", probe="/readyz") as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
    ):
        results: dict[str, list[Any]] = {"stream": [], "upload": [], "slow": [], "long": []}
        stop = asyncio.Event()

        async def one(kind: str) -> Any:
            if kind == "stream":
                return await _stream(s, gw, 5, 0.02)
            if kind == "upload":
                return await _upload(s, gw, 8, 0.005)
            async with s.get(gw.url("/slow?s=0.05")) as r:
                await r.read()
                return r.status

        async def client(i: int) -> None:
            kind = ("stream", "upload", "slow")[i % 3]
            while not stop.is_set():
                try:
                    results[kind].append(await one(kind))
                except aiohttp.ClientError as exc:
                    results[kind].append(_outcome(exc))

        async def long_stream() -> None:
            # 1.5 s of streamed response, across the moment the listener closes
            try:
                results["long"].append(await _stream(s, gw, 30, 0.05))
            except aiohttp.ClientError as exc:
                results["long"].append(_outcome(exc))

        ws = await s.ws_connect(gw.url("/ws"))
        await ws.send_str("hi")
        echo = await ws.receive(timeout=5)
        assert echo.data == "echo:hi"

        tasks = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
        await asyncio.sleep(1.0)
        gw.signal(signal.SIGTERM)
        t0 = time.monotonic()
        async with s.get(gw.url("/readyz")) as r:
            first_readyz = r.status
        unready_after = time.monotonic() - t0
        tasks += [asyncio.create_task(long_stream()) for _ in range(20)]
        await asyncio.sleep(DELAY_S / 2)
        stop.set()  # the endpoint is gone: no new requests from here on
        closing = await ws.receive(timeout=DELAY_S + 5)
        ws_closed_after = time.monotonic() - t0
        await asyncio.gather(*tasks)
        rc = await gw.wait_exit(TIMEOUT_S + 10)
        exited_after = time.monotonic() - t0
        await ws.close()

        served = {k: sum(1 for r in v if r == 200) for k, v in results.items()}
        failed = [r for v in results.values() for r in v if r != 200]
        report(
            "sigterm",
            served=served,
            failed=len(failed),
            failed_sample=failed[:5],
            first_readyz_after_sigterm=first_readyz,
            unready_after_ms=round(unready_after * 1000, 1),
            ws_close=(closing.type.name, closing.data),
            ws_closed_after_s=round(ws_closed_after, 2),
            exited_after_s=round(exited_after, 2),
            rc=rc,
        )
        assert first_readyz == 503
        assert unready_after < 0.5
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert closing.data == aiohttp.WSCloseCode.GOING_AWAY
        assert ws_closed_after >= DELAY_S * 0.9  # kept serving for the drain delay first
        assert rc == 0
        assert exited_after < TIMEOUT_S / 2, "the drain waited for its timeout"
        for kind in ("stream", "upload", "slow"):
            assert served[kind] >= 100, f"too little {kind} traffic to mean anything"
        assert served["long"] == 20
        assert failed == [], f"{len(failed)} accepted requests failed: {failed[:10]}"
        names = [e.get("event") for e in gw.events()]
        assert names.index("drain_started") < names.index("drain_finished")
        assert gw.unexpected_log_lines() == [], gw.unexpected_log_lines()[:3]


async def test_sigterm_request_bodies_in_flight_complete(upstream: UpstreamProcess) -> None:
    timeout_s = 4.0
    cfg = gateway_config(upstream.url, drain={"delay_s": DELAY_S, "timeout_s": timeout_s})
    async with (
        gateway_process(cfg, name="drain-bodies", probe="/readyz") as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
    ):
        outcomes: list[Any] = []

        async def long_upload() -> None:
            # 1 s of streamed request body, across the moment the listener closes
            try:
                outcomes.append(await _upload(s, gw, 20, 0.05))
            except aiohttp.ClientError as exc:
                outcomes.append(_outcome(exc))

        gw.signal(signal.SIGTERM)
        t0 = time.monotonic()
        await asyncio.sleep(DELAY_S / 2)
        await asyncio.gather(*(long_upload() for _ in range(20)))
        rc = await gw.wait_exit(timeout_s + 10)
        exited_after = time.monotonic() - t0
        report("sigterm bodies", outcomes=outcomes[:5], exited_after_s=round(exited_after, 2))
        assert rc == 0
        assert outcomes == [200] * 20
        assert exited_after < timeout_s - 1
