"""RFC 9457 problem details for every error the gateway makes itself."""

from __future__ import annotations

import secrets
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

CONTENT_TYPE = "application/problem+json"

# Problem types: the IETF rate-limit draft's for 429s and bans, ours otherwise.
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
ABNORMAL_USAGE = "https://iana.org/assignments/http-problem-types#abnormal-usage-detected"
_OURS = "https://gateway.invalid/problems/"
# reason phrases by code, looked up without building an HTTPStatus on every error
PHRASES: dict[int, str] = {s.value: s.phrase for s in HTTPStatus}


def problem_type(slug: str) -> str:
    return _OURS + slug


def problem_body(
    status: int,
    detail: str,
    *,
    request_id: str | None,
    type_: str | None = None,
    title: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "type": type_ or "about:blank",
        "title": title or PHRASES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "request_id": request_id,
    }
    if extra:
        body.update(extra)
    return orjson.dumps(body)


def raw_problem(status: int, detail: str, *, rid_header: str, static_headers: str) -> bytes:
    """A whole problem+json answer that closes the connection, as bytes for a transport.

    For answers written below any request object (parse errors, the 408 of a request
    head that never completed); ``static_headers`` are ready ``Name: value\r\n`` lines.
    """
    rid = secrets.token_hex(16)
    body = problem_body(status, detail, request_id=rid)
    phrase = PHRASES.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"{rid_header}: {rid}\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        f"{static_headers}\r\n"
    ).encode("latin-1")
    return head + body


def problem_response(
    status: int,
    detail: str,
    *,
    request_id: str | None,
    type_: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> web.Response:
    resp = web.Response(
        status=status,
        body=problem_body(
            status, detail, request_id=request_id, type_=type_, title=title, extra=extra
        ),
        headers=headers,
    )
    resp.content_type = CONTENT_TYPE
    return resp


def server_error_answer(status: int, exc: BaseException | None) -> tuple[int, str]:
    """The status and detail for an error of aiohttp's own connection handler (a request
    its parser refused, a handler that failed), echoing nothing of the request: the
    admin port and the upgrade hand-off answer these alike."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)
    ):
        return 431, "request header fields too large"
    if status >= 500:  # a bug of ours: the caller logs its traceback
        return status, "internal error"
    return status, "the request could not be parsed"
