"""Hot reload: file replace, ConfigMap-style symlink swap, admin POST; bad configs kept out."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.app import Gateway
from gateway.config import load_file
from tests.files import NOT_A_CONFIG, make_not_a_config, unblock_fifos
from tests.gw import admin_url, base_config, url, wait_for

TOKEN = "reload-test-token"


def _write(path: Path, cfg: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(path)


def _cfg(upstream: str, burst: int, *, prefix: str = "/") -> dict[str, Any]:
    return base_config(
        upstream,
        reload={"interval_s": 0.1},
        routes=[{"name": "api", "path_prefix": prefix, "upstream": "api", "rate_limits": ["p"]}],
        rate_limit={"policies": {"p": {"requests": 1, "period_s": 60, "burst": burst}}},
    )


async def _start(path: Path) -> Gateway:
    gw = Gateway(
        load_file(path, environ={**os.environ, "GATEWAY_ADMIN_TOKEN": TOKEN}),
        config_path=str(path),
    )
    await gw.start()
    return gw


def _count(gw: Gateway, result: str) -> float:
    v = gw.runtime.metrics.registry.get_sample_value(
        "gateway_config_reloads_total", {"result": result}
    )
    return v or 0.0


async def test_file_replace_applies_and_keeps_unchanged_policy_state(
    tmp_path: Path, upstream: str
) -> None:
    path = tmp_path / "gateway.yaml"
    cfg = _cfg(upstream, burst=3)
    _write(path, cfg)
    gw = await _start(path)
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.get(url(gw, "/a")) as r:
                    assert r.status == 200
            async with s.get(url(gw, "/a")) as r:
                assert r.status == 429
            # change something else (a new route in front): the policy is unchanged
            cfg["routes"].insert(0, {"name": "other", "path_prefix": "/other/", "upstream": "api"})
            _write(path, cfg)
            assert await wait_for(lambda: _count(gw, "success") >= 1)
            assert [r.name for r in gw.runtime.snapshot.routes] == ["other", "api"]
            async with s.get(url(gw, "/a")) as r:
                assert r.status == 429, "an unchanged policy keeps its state"
            async with s.get(url(gw, "/other/x")) as r:
                assert r.status == 200
    finally:
        await gw.drain()


async def test_symlink_swap_like_a_configmap(tmp_path: Path, upstream: str) -> None:
    mount = tmp_path / "mount"
    mount.mkdir()
    v1 = mount / "..2026_01_01"
    v1.mkdir()
    _write(v1 / "gateway.yaml", _cfg(upstream, burst=5))
    (mount / "..data").symlink_to(v1.name)
    (mount / "gateway.yaml").symlink_to("..data/gateway.yaml")
    gw = await _start(mount / "gateway.yaml")
    try:
        v2 = mount / "..2026_01_02"
        v2.mkdir()
        _write(v2 / "gateway.yaml", _cfg(upstream, burst=5, prefix="/v2/"))
        tmp_link = mount / "..data_tmp"
        tmp_link.symlink_to(v2.name)
        tmp_link.replace(mount / "..data")
        assert await wait_for(lambda: gw.runtime.snapshot.routes[0].prefix == "/v2/")
        async with aiohttp.ClientSession() as s, s.get(url(gw, "/x")) as r:
            assert r.status == 404
    finally:
        await gw.drain()


async def test_invalid_yaml_and_invalid_values_are_kept_out(tmp_path: Path, upstream: str) -> None:
    path = tmp_path / "gateway.yaml"
    _write(path, _cfg(upstream, burst=5))
    gw = await _start(path)
    try:
        before = gw.runtime.settings
        path.write_text("routes: [\n")
        assert await wait_for(lambda: _count(gw, "failure") >= 1)
        bad = _cfg(upstream, burst=5)
        bad["routes"][0]["upstream"] = "nope"
        _write(path, bad)
        assert await wait_for(lambda: _count(gw, "failure") >= 2)
        assert gw.runtime.settings is before
        ok = gw.runtime.metrics.registry.get_sample_value
        assert ok("gateway_config_last_reload_successful", {}) == 0
        async with aiohttp.ClientSession() as s, s.get(url(gw, "/x")) as r:
            assert r.status == 200
        # a bad file is reported once, not every tick
        count = _count(gw, "failure")
        await _sleep(0.5)
        assert _count(gw, "failure") == count
    finally:
        await gw.drain()


async def _http(reader: Any, writer: Any, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return bytes(head.split(b"\r\n", 1)[0])


async def test_admin_post_reload_and_keepalive_connection_survives(
    tmp_path: Path, upstream: str
) -> None:
    path = tmp_path / "gateway.yaml"
    cfg = _cfg(upstream, burst=100)
    cfg["reload"] = {"interval_s": 3600}
    _write(path, cfg)
    gw = await _start(path)
    try:
        assert gw.proxy_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
        assert await _http(reader, writer, "/a") == b"HTTP/1.1 200 OK"
        cfg["routes"][0]["path_prefix"] = "/a"
        _write(path, cfg)
        async with aiohttp.ClientSession() as admin:
            async with admin.post(admin_url(gw, "/admin/reload")) as r:
                assert r.status == 401
            async with admin.post(
                admin_url(gw, "/admin/reload"), headers={"Authorization": f"Bearer {TOKEN}"}
            ) as r:
                assert r.status == 200
                assert (await r.json())["reloaded"] is True
        # the same connection still works, and sees the new config
        assert await _http(reader, writer, "/a") == b"HTTP/1.1 200 OK"
        assert await _http(reader, writer, "/b") == b"HTTP/1.1 404 Not Found"
        writer.close()
        assert _count(gw, "success") == 1
    finally:
        await gw.drain()


async def _sleep(s: float) -> None:
    await asyncio.sleep(s)


async def _raw_answer(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def test_the_proxy_ports_own_answers_follow_a_reload(tmp_path: Path, upstream: str) -> None:
    """Answers the proxy port's server writes itself (a request that cannot be parsed,
    a head that never ends) use the reloaded request id field, security headers and
    client timeout, like every other answer."""
    path = tmp_path / "gateway.yaml"
    cfg = _cfg(upstream, burst=100)
    cfg["reload"] = {"interval_s": 3600}
    cfg["request"] = {"client_timeout_s": 30}
    _write(path, cfg)
    gw = await _start(path)
    try:
        port = gw.proxy_port
        assert port is not None
        before = await _raw_answer(port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Field\r\n\r\n")
        assert before.startswith(b"HTTP/1.1 400 ")
        assert b"\r\nX-Request-ID: " in before
        assert b"X-Frame-Options: DENY\r\n" in before

        cfg["request"] = {"client_timeout_s": 0.5, "request_id_header": "X-Trace-Id"}
        cfg["security_headers"] = {"set": {"X-Frame-Options": "SAMEORIGIN"}}
        _write(path, cfg)
        async with aiohttp.ClientSession() as admin:
            async with admin.post(
                admin_url(gw, "/admin/reload"), headers={"Authorization": f"Bearer {TOKEN}"}
            ) as r:
                assert r.status == 200

        after = await _raw_answer(port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Field\r\n\r\n")
        assert after.startswith(b"HTTP/1.1 400 ")
        assert b"\r\nX-Trace-Id: " in after
        assert b"X-Request-ID" not in after
        assert b"X-Frame-Options: SAMEORIGIN\r\n" in after

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        slow = await _raw_answer(port, b"GET / HTTP/1.1\r\nHost: x\r\n")  # never ends
        assert slow.startswith(b"HTTP/1.1 408 ")
        assert loop.time() - t0 < 5, "the 408 came after the old 30 s timeout"
        assert b"X-Frame-Options: SAMEORIGIN\r\n" in slow
    finally:
        await gw.drain()


async def test_a_failing_reload_listener_does_not_undo_or_stop_reloads(
    tmp_path: Path, upstream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)  # reloads read secrets again
    path = tmp_path / "gateway.yaml"
    cfg = _cfg(upstream, burst=100)
    cfg["reload"] = {"interval_s": 3600}
    _write(path, cfg)
    gw = await _start(path)

    def broken(_settings: Any) -> None:
        raise RuntimeError("listener bug")

    gw.runtime.on_apply.insert(0, broken)
    try:
        async with aiohttp.ClientSession() as s:
            for prefix in ("/a", "/b"):  # twice: reloads keep working after the failure
                cfg["routes"][0]["path_prefix"] = prefix
                _write(path, cfg)
                async with s.post(
                    admin_url(gw, "/admin/reload"), headers={"Authorization": f"Bearer {TOKEN}"}
                ) as r:
                    assert r.status == 200
                    assert (await r.json())["reloaded"] is True
                async with s.get(url(gw, prefix + "/x")) as r:
                    assert r.status == 200
                async with s.get(url(gw, "/c/x")) as r:
                    assert r.status == 404
        assert _count(gw, "success") == 2
    finally:
        await gw.drain()


@pytest.mark.parametrize("kind", list(NOT_A_CONFIG))
async def test_a_path_that_is_not_a_config_file_is_a_failed_reload(
    tmp_path: Path, upstream: str, kind: str
) -> None:
    """The path swapped (as a ConfigMap swaps it) for a FIFO, a device, a directory, a
    loop, a huge or non-UTF-8 file: the watcher and POST /admin/reload each report one
    failed reload at once, probes keep answering, and the next good file applies."""
    mount = tmp_path / "mount"
    mount.mkdir()
    good = mount / "good.yaml"
    _write(good, _cfg(upstream, burst=5))
    path = mount / "gateway.yaml"
    path.symlink_to(good)
    gw = await _start(path)
    try:
        bad = make_not_a_config(kind, tmp_path)
        link = mount / "tmp-link"
        link.symlink_to(bad)
        link.replace(path)
        assert await wait_for(lambda: _count(gw, "failure") == 1), "the watcher saw nothing"
        async with aiohttp.ClientSession() as s:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with asyncio.timeout(5):
                async with s.post(admin_url(gw, "/admin/reload"), headers=auth) as r:
                    assert r.status == 422
                    errors = (await r.json())["errors"]
                async with s.get(url(gw, "/readyz")) as r:
                    assert r.status == 200
            assert any(NOT_A_CONFIG[kind] in e for e in errors), errors
            assert _count(gw, "failure") == 2
            # later reloads are not held: a good file applies by itself
            _write(good, _cfg(upstream, burst=5, prefix="/v2/"))
            link.symlink_to(good)
            link.replace(path)
            assert await wait_for(lambda: gw.runtime.snapshot.routes[0].prefix == "/v2/")
            assert _count(gw, "failure") == 2  # the bad path was reported once by the watcher
    finally:
        unblock_fifos(tmp_path)
        await gw.drain()


async def test_a_file_caught_half_written_is_not_applied(tmp_path: Path, upstream: str) -> None:
    """A writer that rewrites the file in place (an editor, ``cat >``, a bind mount edited
    on the host) leaves a prefix of the new file for a moment; a prefix that is valid YAML
    can drop a guard (here the route's ``source_cidrs``, on the line not yet written).
    The watcher applies a content only once two successive checks read the same."""
    path = tmp_path / "gateway.yaml"
    guarded = (
        "routes:\n"
        "  - name: admin\n"
        "    path_prefix: /admin/\n"
        "    upstream: api\n"
        "    source_cidrs: [10.0.0.0/8]\n"
    )
    cfg = base_config(upstream, reload={"interval_s": 0.5})
    del cfg["routes"]
    head = yaml.safe_dump(cfg)
    path.write_text(head + guarded)
    gw = await _start(path)
    read = asyncio.Event()
    loop = asyncio.get_running_loop()
    check = gw.reloader._digest

    def spy() -> str:  # the watcher's check, in its thread: tell the test it read
        digest = check()
        loop.call_soon_threadsafe(read.set)
        return digest

    gw.reloader._digest = spy  # type: ignore[method-assign]
    try:
        v2 = head + guarded.replace("admin", "admin2", 1)  # a harmless change, in place
        cut = v2.index("    source_cidrs")
        with path.open("r+") as f:
            f.truncate(0)
            f.write(v2[:cut])  # valid YAML: the route without its guard
            f.flush()
            read.clear()
            await asyncio.wait_for(read.wait(), 2)  # the watcher has read the prefix ...
            await asyncio.sleep(0.15)  # ... and had time to apply it, before its next check
            async with aiohttp.ClientSession() as s, s.get(url(gw, "/admin/x")) as r:
                during = r.status
            f.write(v2[cut:])
        assert await wait_for(lambda: gw.runtime.snapshot.routes[0].name == "admin2")
        assert during == 403
        async with aiohttp.ClientSession() as s, s.get(url(gw, "/admin/x")) as r:
            assert r.status == 403
        assert _count(gw, "success") == 1
    finally:
        await gw.drain()
