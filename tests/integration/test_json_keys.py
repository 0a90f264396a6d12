"""``json:/POINTER`` keys over real sockets (SPEC 11): the value in a small JSON body is
the key, ``123`` and ``"123"`` are two keys, the body reaches the upstream byte for byte
(Content-Length or chunked), and a large, non-JSON or pointer-less body streams on and
spends the fallback's budget (or the address's)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from gateway.config import ConfigError, load_text
from gateway.pipeline.handler import ProxyHandler
from tests.gw import admin_url, base_config, running_gateway, serve, url

pytestmark = pytest.mark.timeout(60)

ADMIN = "json-keys-admin-token-0123456789"


@pytest.fixture
async def digest_upstream() -> AsyncIterator[str]:
    """An upstream that answers with the SHA-256 of the body it received and how it was
    framed."""

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "sha256": hashlib.sha256(body).hexdigest(),
                "length": len(body),
                "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
            }
        )

    async with serve(handler) as url_:
        yield url_


def _cfg(upstream: str, **policy: Any) -> dict[str, Any]:
    per_chat = {"requests": 1, "period_s": 60, "burst": 2, "key": "json:/message/chat/id"}
    per_chat.update(policy)
    return base_config(
        upstream,
        rate_limit={
            "policies": {
                "per-chat": per_chat,
                "anon": {"requests": 1, "period_s": 60, "burst": 1},
            }
        },
        routes=[
            {"name": "bot", "path_prefix": "/bot/", "upstream": "api", "rate_limits": ["per-chat"]}
        ],
        abuse={"enabled": False},
    )


def _update(chat: Any, pad: int = 0) -> bytes:
    return json.dumps(
        {"update_id": 1, "message": {"chat": {"id": chat}, "text": "x" * pad}}
    ).encode()


async def _post(
    s: aiohttp.ClientSession,
    gw: Gateway,
    body: bytes | Any,
    content_type: str = "application/json",
) -> tuple[int, Mapping[str, Any] | str]:
    async with s.post(url(gw, "/bot/hook"), data=body, headers={"Content-Type": content_type}) as r:
        if r.status == 200:
            return r.status, await r.json()
        return r.status, await r.text()


async def test_each_chat_gets_its_own_budget_and_123_differs_from_string_123(
    digest_upstream: str,
) -> None:
    async with running_gateway(_cfg(digest_upstream)) as gw, aiohttp.ClientSession() as s:
        for _ in range(2):
            assert (await _post(s, gw, _update(123)))[0] == 200
        status, text = await _post(s, gw, _update(123))
        assert status == 429
        assert "per-chat" in str(text)
        # another chat, and the string "123": budgets of their own
        assert (await _post(s, gw, _update(124)))[0] == 200
        assert (await _post(s, gw, _update("123")))[0] == 200
        # another spelling of the same number is the same chat
        spelled = b'{"message": {"chat": {"id": 1.23e2}}}'
        assert (await _post(s, gw, spelled))[0] == 200
        assert (await _post(s, gw, spelled))[0] == 200
        assert (await _post(s, gw, b'{"message":{"chat":{"id":123.0}}}'))[0] == 429
        # a media type with +json is JSON
        assert (await _post(s, gw, _update(777), "application/vnd.bot+json"))[0] == 200


async def test_the_body_reaches_the_upstream_byte_for_byte(digest_upstream: str) -> None:
    async with running_gateway(_cfg(digest_upstream, burst=50)) as gw, aiohttp.ClientSession() as s:
        small = b'{ "message" : { "chat" : { "id" : 5 } } ,"z": "\\u00e9"}  '
        status, answer = await _post(s, gw, small)
        assert status == 200
        assert isinstance(answer, Mapping)
        assert answer["sha256"] == hashlib.sha256(small).hexdigest()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(small), 7):
                yield small[i : i + 7]

        status, answer = await _post(s, gw, chunks())
        assert status == 200
        assert isinstance(answer, Mapping)
        assert answer["sha256"] == hashlib.sha256(small).hexdigest()
        assert answer["chunked"]
        # the chunked request spent the same chat's budget
        status, _ = await _post(s, gw, b'{"message":{"chat":{"id":5}}}')
        assert status == 200


async def test_chunked_bodies_are_keyed(digest_upstream: str) -> None:
    async with running_gateway(_cfg(digest_upstream)) as gw, aiohttp.ClientSession() as s:
        body = _update(42)

        async def chunks() -> AsyncIterator[bytes]:
            yield body[:10]
            yield body[10:]

        assert (await _post(s, gw, chunks()))[0] == 200
        assert (await _post(s, gw, chunks()))[0] == 200
        assert (await _post(s, gw, chunks()))[0] == 429
        assert (await _post(s, gw, _update(43)))[0] == 200


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_and_non_json_bodies_stream_and_spend_the_fallback(
    digest_upstream: str, *, chunked: bool
) -> None:
    cfg = _cfg(digest_upstream, fallback="anon")
    big = _update(9, pad=200_000)  # over 64 KiB: not read for a key
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 16384):
                yield big[i : i + 16384]

        status, answer = await _post(s, gw, chunks() if chunked else big)
        assert status == 200
        assert isinstance(answer, Mapping)
        assert answer["sha256"] == hashlib.sha256(big).hexdigest()
        assert answer["length"] == len(big)
        # the fallback's budget (1) is spent: a non-JSON body, a body without the value
        # and JSON that does not parse are refused by it, naming it
        for body, ctype in (
            (_update(9), "text/plain"),
            (b'{"message": {}}', "application/json"),
            (b'{"message": ', "application/json"),
        ):
            status, text = await _post(s, gw, body, ctype)
            assert status == 429
            assert "anon" in str(text)
            assert "per-chat" not in str(text)
        # a chat with a value of its own is not touched by the fallback
        assert (await _post(s, gw, _update(9)))[0] == 200


async def test_without_fallback_the_address_budget_applies(digest_upstream: str) -> None:
    async with running_gateway(_cfg(digest_upstream)) as gw, aiohttp.ClientSession() as s:
        assert (await _post(s, gw, b"x", "text/plain"))[0] == 200
        assert (await _post(s, gw, b"{}", "application/json"))[0] == 200
        # rotating garbage bodies share the address's budget of 2
        assert (await _post(s, gw, b"[1]", "application/json"))[0] == 429


async def test_many_refused_json_requests_hold_no_body_bytes(digest_upstream: str) -> None:
    async with running_gateway(_cfg(digest_upstream, burst=1)) as gw, aiohttp.ClientSession() as s:
        for _ in range(5):
            await _post(s, gw, _update(1))
        assert gw._proxy_server is not None
        handler = gw._proxy_server.handler
        assert isinstance(handler, ProxyHandler)
        assert handler.leg.buffered == 0


async def test_explain_takes_a_body_and_shows_its_key(digest_upstream: str) -> None:
    cfg = _cfg(digest_upstream)
    async with (
        running_gateway(cfg, {"GATEWAY_ADMIN_TOKEN": ADMIN}) as gw,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s,
    ):
        query = {
            "ip": "10.1.2.3",
            "path": "/bot/hook",
            "method": "POST",
            "body": _update(77).decode(),
        }
        async with s.get(admin_url(gw, "/admin/explain"), params=query) as r:
            assert r.status == 200
            out = await r.json()
        assert out["policies"][0]["policy"] == "per-chat"
        assert out["policies"][0]["key"] == "b:77"
        query["body"] = json.dumps({"message": {"chat": {"id": "77"}}})
        async with s.get(admin_url(gw, "/admin/explain"), params=query) as r:
            out = await r.json()
        assert out["policies"][0]["key"] == 'b:"77"'
        # not JSON, or no body: the address
        query["body"] = "nope"
        async with s.get(admin_url(gw, "/admin/explain"), params=query) as r:
            out = await r.json()
        assert out["policies"][0]["key"] == "10.1.2.3"
        del query["body"]
        async with s.get(admin_url(gw, "/admin/explain"), params=query) as r:
            out = await r.json()
        assert out["policies"][0]["key"] == "10.1.2.3"


@pytest.mark.parametrize("pointer", ["json:message", "json:/a~2", "json:#/a"])
def test_check_config_names_a_bad_pointer(pointer: str) -> None:
    cfg = _cfg("http://127.0.0.1:1", key=pointer)
    with pytest.raises(ConfigError) as info:
        load_text(yaml.safe_dump(cfg), environ={})
    paths = {p.path for p in info.value.problems}
    assert "rate_limit.policies.per-chat.key" in paths


def test_a_fallback_keyed_by_a_body_value_is_refused() -> None:
    cfg = _cfg("http://127.0.0.1:1")
    cfg["rate_limit"]["policies"]["other"] = {"requests": 1, "period_s": 1, "key": "json:/a"}
    cfg["rate_limit"]["policies"]["per-chat"]["fallback"] = "other"
    with pytest.raises(ConfigError) as info:
        load_text(yaml.safe_dump(cfg), environ={})
    assert "rate_limit.policies.per-chat.fallback" in {p.path for p in info.value.problems}


async def test_expect_100_continue_bodies_are_keyed(digest_upstream: str) -> None:
    async with running_gateway(_cfg(digest_upstream)) as gw, aiohttp.ClientSession() as s:
        body = _update(31)
        statuses = []
        for _ in range(3):
            async with s.post(
                url(gw, "/bot/hook"),
                data=body,
                headers={"Content-Type": "application/json"},
                expect100=True,
            ) as r:
                statuses.append(r.status)
                if r.status == 200:
                    assert (await r.json())["sha256"] == hashlib.sha256(body).hexdigest()
        assert statuses == [200, 200, 429]


async def test_integers_past_64_bits_are_two_chats(digest_upstream: str) -> None:
    async with running_gateway(_cfg(digest_upstream)) as gw, aiohttp.ClientSession() as s:
        first = b'{"message":{"chat":{"id":123456789012345678901}}}'
        neighbour = b'{"message":{"chat":{"id":123456789012345678902}}}'
        assert (await _post(s, gw, first))[0] == 200
        assert (await _post(s, gw, first))[0] == 200
        assert (await _post(s, gw, first))[0] == 429
        # a neighbour's budget cannot be spent by naming a number that rounds to it
        assert (await _post(s, gw, neighbour))[0] == 200
        assert (await _post(s, gw, neighbour))[0] == 200
        assert (await _post(s, gw, neighbour))[0] == 429
        # the fraction of the same value is a key of its own, as 123.0 is beside 123
        fraction = b'{"message":{"chat":{"id":123456789012345678901.0}}}'
        assert (await _post(s, gw, fraction))[0] == 200


async def test_a_member_name_twice_on_the_path_spends_the_fallback(digest_upstream: str) -> None:
    cfg = _cfg(digest_upstream, fallback="anon")
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        # a chat's budget (2) is spent by requests naming only it
        assert (await _post(s, gw, _update(1)))[0] == 200
        assert (await _post(s, gw, _update(1)))[0] == 200
        assert (await _post(s, gw, _update(1)))[0] == 429
        # naming another chat first (which a first-wins upstream serves) and the spent one
        # last, or twice over, gives no chat's budget: the fallback's (1), then refused by it
        twice = b'{"message":{"chat":{"id":2},"chat":{"id":1}}}'
        status, answer = await _post(s, gw, twice)
        assert status == 200
        assert isinstance(answer, Mapping)
        assert answer["sha256"] == hashlib.sha256(twice).hexdigest()  # still byte for byte
        for body in (
            b'{"message":{"chat":{"id":3,"id":4}}}',
            b'{"message":{"chat":{"id":5}},"message":{"chat":{"id":5}}}',
        ):
            status, text = await _post(s, gw, body)
            assert status == 429
            assert "anon" in str(text)
        # chat 2's own budget is untouched
        assert (await _post(s, gw, _update(2)))[0] == 200
        assert (await _post(s, gw, _update(2)))[0] == 200


async def test_a_value_nested_deeper_than_a_key_is_written_spends_the_fallback(
    digest_upstream: str,
) -> None:
    cfg = _cfg(digest_upstream, fallback="anon")
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        for depth in (300, 1000):
            deep = b'{"message":{"chat":{"id":' + b"[" * depth + b"]" * depth + b"}}}"
            status, text = await _post(s, gw, deep)
            # the first spends the fallback's budget (1), the second is refused by it
            assert status == (200 if depth == 300 else 429), text
            if status == 429:
                assert "anon" in str(text)
