"""Start a real gateway in-process on free loopback ports, for integration tests."""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import orjson
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import Gateway
from gateway.config import load_text
from gateway.logs import AccessLog
from gateway.metrics import Metrics
from tests.conftest import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def base_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A config with one upstream `api`, one catch-all route, no limits, fast drain."""
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "upstreams": {"api": {"url": upstream_url, "health": {"interval_s": 0.2}}},
        "routes": [{"name": "api", "path_prefix": "/", "upstream": "api"}],
        "drain": {"delay_s": 0, "timeout_s": 2},
    }
    cfg.update(overrides)
    return cfg


@asynccontextmanager
async def running_gateway(
    cfg: Mapping[str, Any], env: Mapping[str, str] | None = None, *, path: str | None = None
) -> AsyncIterator[Gateway]:
    settings = load_text(yaml.safe_dump(dict(cfg)), environ=dict(env or {}), source=path)
    gw = Gateway(settings, config_path=path)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.drain()


@asynccontextmanager
async def running_replicas(
    cfg: Mapping[str, Any], env: Mapping[str, str] | None = None, *, count: int = 2
) -> AsyncIterator[list[Gateway]]:
    """``count`` gateways of one config, each on ports of its own (replicas sharing a
    Redis when the config's backend is redis)."""
    async with AsyncExitStack() as stack:
        gateways = []
        for i in range(count):
            ports = {
                "listen": {"host": "127.0.0.1", "port": free_port()},
                "admin": {"host": "127.0.0.1", "port": free_port()},
            }
            replica = cfg if i == 0 else {**cfg, **ports}
            gateways.append(await stack.enter_async_context(running_gateway(replica, env)))
        yield gateways


def url(gw: Gateway, path: str = "/") -> str:
    return f"http://127.0.0.1:{gw.proxy_port}{path}"


def admin_url(gw: Gateway, path: str = "/") -> str:
    return f"http://127.0.0.1:{gw.admin_port}{path}"


async def raw_exchange(port: int, data: bytes, *, wait_s: float = 1.0) -> bytes:
    """Send raw bytes to the port and read what comes back until close or wait_s of quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), wait_s)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        pass
    finally:
        writer.close()
    return b"".join(chunks)


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@asynccontextmanager
async def serve(target: web.Application | Handler) -> AsyncIterator[str]:
    """Serve an app, or one catch-all handler, on a free loopback port; yield its URL."""
    if isinstance(target, web.Application):
        app = target
    else:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", target)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def backend_errors(metrics: Metrics) -> float:
    """``gateway_ratelimit_backend_errors_total`` as exported."""
    value = metrics.registry.get_sample_value("gateway_ratelimit_backend_errors_total")
    return value or 0.0


class AccessLines:
    """The access log's lines of a running gateway, as the objects they are written as.

    A real :class:`~gateway.logs.AccessLog` writing into memory replaces the runtime's (not
    a stand-in object: a compiled build accepts only its own class there)."""

    def __init__(self, runtime: Any, monkeypatch: Any) -> None:
        runtime.access_log.close()  # what it holds is written, its timer stopped
        self._sink = io.BytesIO()
        self._log = AccessLog(self._sink)
        monkeypatch.setattr(runtime, "access_log", self._log)

    @property
    def lines(self) -> list[dict[str, Any]]:
        self._log.flush()
        return [orjson.loads(line) for line in self._sink.getvalue().splitlines()]
