"""Request smuggling and framing: a hostile corpus over raw sockets.

Every case is sent on a fresh connection to a gateway subprocess whose upstream is a raw
asyncio server that parses framing itself and records every request head it receives.
The invariant for every case: the answer is a 4xx (the request refused), or the request
is normalised, and the upstream never sees a second request (``/smuggled``) hidden in
the first one's framing.  A positive control (plain pipelining) proves the detector
sees a second request when there is one.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.reliability.support import (
    GatewayProcess,
    RawRequest,
    RawUpstream,
    ThreadedUpstream,
    gateway_config,
    report,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]

MAX_HEADER = 16384
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"

REJECT = "reject"  # a 4xx and nothing reaches the upstream
NORMALISE = "normalise"  # a 2xx, one request upstream
EITHER = "either"


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    expect: str
    target: str | None = None  # the target the upstream must see when normalised
    forbid_headers: tuple[str, ...] = ()  # headers the upstream must not receive
    first_status: int | None = None  # a status other than 2xx/4xx this case may answer


def _req(
    method: str, target: str, headers: list[str], body: bytes = b"", *, eol: str = "\r\n"
) -> bytes:
    head = f"{method} {target} HTTP/1.1{eol}" + "".join(h + eol for h in headers) + eol
    return head.encode("latin-1") + body


def _chunked_hiding_smuggled() -> bytes:
    """A chunked body whose single chunk is a complete request (TE.CL / TE.TE)."""
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)


def _te_variant(case_id: str, te_lines: list[str], expect: str = EITHER) -> Case:
    """Content-Length covering only the chunk-size line, plus an obfuscated TE."""
    body = _chunked_hiding_smuggled()
    size_line = body.split(b"\r\n", 1)[0] + b"\r\n"
    return Case(
        case_id,
        _req(
            "POST",
            f"/{case_id}",
            ["Host: gw.test", f"Content-Length: {len(size_line)}", *te_lines],
            body,
        ),
        expect,
    )


CASES: list[Case] = [
    # --- CL.TE and TE.CL: both framings present -> RFC 9112 6.1: reject (or TE + close)
    Case(
        "cl-te",
        _req(
            "POST",
            "/cl-te",
            ["Host: gw.test", "Content-Length: 5", "Transfer-Encoding: chunked"],
            b"0\r\n\r\n" + SMUGGLED,
        ),
        EITHER,
    ),
    Case(
        "te-cl",
        _req(
            "POST",
            "/te-cl",
            ["Host: gw.test", "Transfer-Encoding: chunked", "Content-Length: 4"],
            _chunked_hiding_smuggled(),
        ),
        EITHER,
    ),
    # --- TE.TE: obfuscated Transfer-Encoding
    _te_variant("te-xchunked", ["Transfer-Encoding: xchunked"], REJECT),
    _te_variant("te-space-before-colon", ["Transfer-Encoding : chunked"], REJECT),
    _te_variant("te-duplicate-bogus", ["Transfer-Encoding: chunked", "Transfer-Encoding: x"]),
    _te_variant("te-tab", ["Transfer-Encoding:\tchunked"]),
    _te_variant("te-name-tab", ["Transfer-Encoding\t: chunked"], REJECT),
    _te_variant("te-obs-fold", ["X-Pad: a", " Transfer-Encoding: chunked"]),
    _te_variant("te-folded-value", ["Transfer-Encoding:", " chunked"]),
    _te_variant("te-chunked-not-last", ["Transfer-Encoding: chunked, identity"], REJECT),
    _te_variant("te-identity-chunked", ["Transfer-Encoding: identity, chunked"]),
    _te_variant("te-upper", ["Transfer-Encoding: CHUNKED"]),
    _te_variant("te-quoted", ['Transfer-Encoding: "chunked"'], REJECT),
    _te_variant("te-chunk", ["Transfer-Encoding: chunk"], REJECT),
    _te_variant("te-vtab", ["Transfer-Encoding: chunked\x0b"]),
    _te_variant("te-nul", ["Transfer-Encoding: chunked\x00"], REJECT),
    _te_variant("te-lf-in-name", ["X-Pad: a\nTransfer-Encoding: chunked"]),
    # --- transfer codings other than chunked alone (RFC 9112 6.1): 501 or 400, never read
    Case(
        "te-gzip-chunked",
        _req(
            "POST",
            "/te-gzip",
            ["Host: gw.test", "Transfer-Encoding: gzip, chunked"],
            _chunked_hiding_smuggled(),
        ),
        REJECT,
        first_status=501,
    ),
    Case(
        "te-identity-alone",
        _req("POST", "/te-id", ["Host: gw.test", "Transfer-Encoding: identity"], SMUGGLED),
        REJECT,
        first_status=501,
    ),
    Case(
        "te-chunked-twice-lines",
        _req(
            "POST",
            "/te-twice",
            ["Host: gw.test", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
            _chunked_hiding_smuggled(),
        ),
        REJECT,
    ),
    # --- Host (RFC 9112 3.2): exactly one, valid, agreeing with an absolute-form target
    Case("host-missing", _req("GET", "/no-host", []) + SMUGGLED, REJECT),
    Case("host-twice", _req("GET", "/two", ["Host: gw.test", "Host: evil.test"]), REJECT),
    Case("host-list", _req("GET", "/list", ["Host: gw.test, evil.test"]), REJECT),
    Case(
        "absolute-form-other-host",
        _req("GET", "http://evil.test/abs", ["Host: gw.test"]) + SMUGGLED,
        REJECT,
    ),
    # --- Content-Length games
    Case(
        "cl-duplicate-differing",
        _req(
            "POST",
            "/cl-dup",
            ["Host: gw.test", "Content-Length: 5", "Content-Length: 46"],
            b"hello" + SMUGGLED,
        ),
        REJECT,
    ),
    Case(
        "cl-list-differing",
        _req("POST", "/cl-list", ["Host: gw.test", "Content-Length: 5, 46"], b"hello" + SMUGGLED),
        REJECT,
    ),
    Case(
        "cl-duplicate-same",
        _req(
            "POST",
            "/cl-same",
            ["Host: gw.test", "Content-Length: 5", "Content-Length: 5"],
            b"hello",
        ),
        EITHER,
    ),
    Case(
        "cl-plus",
        _req("POST", "/cl-plus", ["Host: gw.test", "Content-Length: +5"], b"hello"),
        REJECT,
    ),
    Case(
        "cl-hex",
        _req("POST", "/cl-hex", ["Host: gw.test", "Content-Length: 0x5"], b"hello"),
        REJECT,
    ),
    Case(
        "cl-negative",
        _req("POST", "/cl-neg", ["Host: gw.test", "Content-Length: -5"], b"hello"),
        REJECT,
    ),
    Case(
        "cl-two-numbers",
        _req("POST", "/cl-two", ["Host: gw.test", "Content-Length: 5 46"], b"hello" + SMUGGLED),
        REJECT,
    ),
    Case(
        "cl-overflow",  # 2**64 + 5: wraps to 5 in a 64-bit parser that does not check
        _req(
            "POST",
            "/cl-ovf",
            ["Host: gw.test", "Content-Length: 18446744073709551621"],
            b"hello" + SMUGGLED,
        ),
        REJECT,
    ),
    Case(
        "cl-space-before-colon",
        _req("POST", "/cl-sp", ["Host: gw.test", "Content-Length : 5"], b"hello" + SMUGGLED),
        REJECT,
    ),
    # --- line endings and control characters
    Case("bare-lf", _req("GET", "/bare-lf", ["Host: gw.test"], eol="\n"), EITHER, "/bare-lf"),
    Case(
        "bare-lf-mixed",
        b"GET /bare-lf-mixed HTTP/1.1\r\nHost: gw.test\nX-A: b\r\n\r\n",
        EITHER,
        "/bare-lf-mixed",
    ),
    Case("bare-cr", b"GET /bare-cr HTTP/1.1\rHost: gw.test\r\n\r\n", REJECT),
    Case("cr-in-value", _req("GET", "/cr-value", ["Host: gw.test", "X-A: a\rb"]), REJECT),
    Case("nul-in-value", _req("GET", "/nul-value", ["Host: gw.test", "X-A: a\x00b"]), REJECT),
    Case("nul-in-name", _req("GET", "/nul-name", ["Host: gw.test", "X\x00A: b"]), REJECT),
    Case("nul-in-target", _req("GET", "/nul\x00target", ["Host: gw.test"]), REJECT),
    Case("space-in-target", b"GET /a b HTTP/1.1\r\nHost: gw.test\r\n\r\n", REJECT),
    Case("double-space", b"GET  /double HTTP/1.1\r\nHost: gw.test\r\n\r\n", EITHER, "/double"),
    Case("bad-version", b"GET /v HTTP/1.1x\r\nHost: gw.test\r\n\r\n", REJECT),
    # --- chunk sizes
    Case(
        "chunk-size-overflow",  # 2**68 + 5 in hex: wraps to 5 in a parser that does not check
        _req(
            "POST",
            "/chunk-ovf",
            ["Host: gw.test", "Transfer-Encoding: chunked"],
            b"100000000000000005\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
        ),
        REJECT,
    ),
    Case(
        "chunk-size-negative",
        _req(
            "POST",
            "/chunk-neg",
            ["Host: gw.test", "Transfer-Encoding: chunked"],
            b"-1\r\nhello\r\n0\r\n\r\n",
        ),
        REJECT,
    ),
    Case(
        "chunk-size-0x",
        _req(
            "POST",
            "/chunk-0x",
            ["Host: gw.test", "Transfer-Encoding: chunked"],
            b"0x5\r\nhello\r\n0\r\n\r\n",
        ),
        REJECT,
    ),
    Case(
        "chunk-data-longer-than-size",
        _req(
            "POST",
            "/chunk-long",
            ["Host: gw.test", "Transfer-Encoding: chunked"],
            b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
        ),
        REJECT,
    ),
    Case(
        "chunk-size-bare-lf",
        _req(
            "POST",
            "/chunk-lf",
            ["Host: gw.test", "Transfer-Encoding: chunked"],
            b"5\nhello\r\n0\r\n\r\n",
        ),
        EITHER,
    ),
    Case(
        "chunk-extension",  # valid: must be accepted and stay one request
        _req(
            "POST",
            "/chunk-ext",
            ["Host: gw.test", "Transfer-Encoding: chunked"],
            b'5;name="v"\r\nhello\r\n0\r\n\r\n',
        ),
        NORMALISE,
        "/chunk-ext",
    ),
    Case(
        "te-http10",
        b"POST /te10 HTTP/1.0\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n" + _chunked_hiding_smuggled(),
        EITHER,
    ),
    # --- request targets
    Case(
        "absolute-form",
        _req("GET", "http://evil.test/abs?q=1", ["Host: gw.test"]),
        EITHER,
        "/abs?q=1",
    ),
    Case("authority-form-get", _req("GET", "evil.test:443", ["Host: gw.test"]), REJECT),
    Case("asterisk-form-get", _req("GET", "*", ["Host: gw.test"]), REJECT),
    Case(
        "connect",
        _req("CONNECT", "evil.test:443", ["Host: evil.test:443"]) + SMUGGLED,
        REJECT,
    ),
    Case(
        "request-line-too-long",
        _req("GET", "/" + "a" * (MAX_HEADER + 2000), ["Host: gw.test"]),
        REJECT,
    ),
    Case(
        "header-too-long",
        _req("GET", "/hdr-long", ["Host: gw.test", "X-Big: " + "b" * (MAX_HEADER + 100)]),
        REJECT,
    ),
    Case(
        "too-many-headers",
        _req("GET", "/hdr-many", ["Host: gw.test"] + [f"X-H{i}: v" for i in range(400)]),
        REJECT,
    ),
    # --- obs-fold (RFC 9112 5.2: reject, or replace with SP)
    Case(
        "obs-fold",
        _req("GET", "/obs-fold", ["Host: gw.test", "X-A: a", " b"]),
        EITHER,
        "/obs-fold",
    ),
    Case("obs-fold-first-line", _req("GET", "/obs-first", [" Host: gw.test"]), REJECT),
    # --- upgrades: nothing after them may be read as a request
    Case(
        "h2c-upgrade",
        _req(
            "GET",
            "/h2c",
            [
                "Host: gw.test",
                "Upgrade: h2c",
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                "Connection: Upgrade, HTTP2-Settings",
            ],
        )
        + SMUGGLED,
        EITHER,
        "/h2c",
        ("upgrade", "http2-settings", "connection"),
    ),
    Case(
        "websocket-refused-upstream",
        _req(
            "GET",
            "/status/404",
            [
                "Host: gw.test",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
            ],
        )
        + SMUGGLED,
        EITHER,
        first_status=502,  # the upstream declined the upgrade: a gateway error, once
    ),
]

CONTROL = Case(
    "control-pipelining",
    _req("GET", "/control", ["Host: gw.test"]) + SMUGGLED,
    NORMALISE,
    "/control",
)


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[GatewayProcess, RawUpstream]]:
    with ThreadedUpstream() as upstream:
        gw = GatewayProcess(
            gateway_config(upstream.url, request={"max_header_bytes": MAX_HEADER}),
            name="smuggling",
        )
        gw.start()
        try:
            gw.wait_started_sync()
            yield gw, upstream
        finally:
            gw.stop()
            gw.cleanup()


def _responses(data: bytes) -> list[int]:
    """Status codes of the responses in ``data`` (heads with Content-Length or chunked)."""
    statuses = []
    while data.startswith(b"HTTP/1."):
        end = data.find(b"\r\n\r\n")
        if end < 0:
            statuses.append(int(data[9:12]))
            break
        head = data[:end].decode("latin-1")
        statuses.append(int(head[9:12]))
        rest = data[end + 4 :]
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        data = rest[length:]
    return statuses


def _exchange(port: int, payload: bytes, quiet_s: float = 0.3) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        chunks = []
        s.settimeout(quiet_s)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def _run(
    case: Case, gw: GatewayProcess, upstream: RawUpstream
) -> tuple[list[int], list[RawRequest]]:
    upstream.requests.clear()
    answer = _exchange(gw.port, case.data)
    time.sleep(0.05)  # anything forwarded has reached the upstream by now
    return _responses(answer), list(upstream.recorded())


# Known failures, each reported with the fix it needs (remove the entry once fixed).
KNOWN_BUGS: dict[str, str] = {}


def _params() -> list[object]:
    out: list[object] = []
    for case in CASES:
        reason = KNOWN_BUGS.get(case.id)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


@pytest.mark.parametrize("case", _params())
def test_framing_case_is_refused_or_normalised(
    case: Case, env: tuple[GatewayProcess, RawUpstream]
) -> None:
    gw, upstream = env
    statuses, seen = _run(case, gw, upstream)
    report(case.id, statuses=statuses, upstream=[r.request_line for r in seen])
    targets = [r.target for r in seen]
    # the invariant: nothing hidden in the framing ever becomes a request upstream
    assert "/smuggled" not in targets, f"smuggled request reached the upstream: {targets}"
    assert len(seen) <= 1, f"upstream saw {len(seen)} requests: {targets}"
    for r in seen:
        assert b"smuggled" not in r.head.lower()
        for line in r.head.split(b"\r\n")[1:]:
            assert line[:1] not in (b" ", b"\t"), f"folded line reached the upstream: {line!r}"
            assert b"\x00" not in line
            assert b"\r" not in line
            assert b"\n" not in line
    assert statuses, "no answer at all (the connection was dropped without a response)"
    first = statuses[0]
    assert first < 500 or first == case.first_status, f"framing is the client's fault: {first}"
    refused = first >= 400
    if case.expect == REJECT:
        assert refused, f"expected a 4xx, got {statuses}"
        assert not seen, f"a refused request reached the upstream: {targets}"
    if case.expect == NORMALISE:
        assert not refused, f"expected it to be accepted, got {statuses}"
    if refused:
        # the refused request itself may have been forwarded only if it was well-framed
        # (e.g. a WebSocket upgrade the upstream declined); never more than it
        assert len(statuses) == 1, f"more answers followed a refusal: {statuses}"
    else:
        assert len(seen) == 1
        if case.target is not None:
            assert seen[0].target == case.target
        for name in case.forbid_headers:
            assert not seen[0].header(name), f"{name} reached the upstream"


def test_the_detector_sees_a_real_second_request(env: tuple[GatewayProcess, RawUpstream]) -> None:
    """Positive control: plain pipelining makes two requests, and the upstream sees both."""
    gw, upstream = env
    statuses, seen = _run(CONTROL, gw, upstream)
    assert statuses == [200, 200]
    assert [r.target for r in seen] == ["/control", "/smuggled"]


def test_the_gateway_still_serves_after_the_corpus(env: tuple[GatewayProcess, RawUpstream]) -> None:
    gw, upstream = env
    for case in CASES:
        _run(case, gw, upstream)
    statuses, seen = _run(CONTROL, gw, upstream)
    assert statuses == [200, 200]
    assert len(seen) == 2
    assert gw.proc is not None
    assert gw.proc.poll() is None
    assert gw.unexpected_log_lines() == []
