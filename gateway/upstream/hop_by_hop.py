"""Which header fields stay on one connection (hop-by-hop, RFC 9110 7.6.1) and which the
gateway sets itself, with the filters that apply them to requests and answers.

Both sides read these rules: the pipeline when it builds the fields sent upstream and
when it passes an answer on, the response headers when they render the gateway's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from gateway.core.fieldnames import lower_name

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

# RFC 9110 7.6.1 and the de-facto ones; plus whatever Connection names.
HOP_BY_HOP: Final = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Never believed from an untrusted peer: the gateway sets its own.
FORWARDING: Final = frozenset(
    h.lower() for h in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP")
)
# Request fields not passed upstream as they are (the gateway sets its own or none).
DROP_UPSTREAM: Final = FORWARDING | frozenset(("expect", "forwarded", "host"))


# Never dropped because Connection lists it: the body sent upstream is framed by it
# (without it, and without chunked coding, the upstream would read the body as the next
# request on its keep-alive connection).
_FRAMING: Final = frozenset(("content-length",))


def connection_tokens(fields: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Header names listed in ``Connection`` (they are hop-by-hop too), framing excepted."""
    tokens = frozenset(
        t.strip().lower()
        for name, value in fields
        if name.lower() == "connection"
        for t in value.split(",")
        if t.strip()
    )
    return tokens - _FRAMING


def filter_header_lines(
    fields: Sequence[tuple[str, str]],
    drop: frozenset[str],
    underscores: str | None = None,
) -> list[str]:
    r"""The header ``fields`` (in order) without those in ``drop`` (lower-case; it
    includes :data:`HOP_BY_HOP`) and those the ``Connection`` field names, as
    ``Name: value\r\n`` lines: the strings of the list, joined, are the lines (the
    usual case gives their pieces, joined once with the rest of the head).

    A name holding ``_`` reads as its ``-`` spelling to CGI and WSGI servers
    (``X_Forwarded_For`` is ``HTTP_X_FORWARDED_FOR``): with ``underscores="drop"`` every
    such field is left out, with ``"allow"`` only those whose ``-`` spelling is dropped
    (the fields the gateway sets itself are never doubled by an alias).  None: no field
    holds one (the common case, one test per name).
    """
    if underscores is None:
        # one pass; Connection is in ``drop``: only when it is there is a second needed
        lines: list[str] = []
        listed = False
        for name, value in fields:
            low = lower_name(name)
            if low not in drop:
                lines.append(name)
                lines.append(": ")
                lines.append(value)
                lines.append("\r\n")
            elif low == "connection":
                listed = True
        if not listed:
            return lines
    tokens = connection_tokens(fields)
    if tokens:
        drop = drop | tokens
    if underscores is None:
        return [f"{name}: {value}\r\n" for name, value in fields if name.lower() not in drop]
    if underscores == "drop":
        return [
            f"{name}: {value}\r\n"
            for name, value in fields
            if "_" not in name and name.lower() not in drop
        ]
    return [
        f"{name}: {value}\r\n"
        for name, value in fields
        if name.lower().replace("_", "-") not in drop
    ]


def header_pairs(lines: str) -> list[tuple[str, str]]:
    r"""``Name: value\r\n`` lines back as (name, value) pairs (for aiohttp's client)."""
    return [
        (name, value) for name, _, value in (ln.partition(": ") for ln in lines.split("\r\n") if ln)
    ]


def filter_header_list(
    headers: list[tuple[str, str]], drop: frozenset[str]
) -> list[tuple[str, str]]:
    """The same for a plain list of fields (an upstream's answer)."""
    listed = [v for n, v in headers if len(n) == 10 and n.lower() == "connection"]
    if listed:
        drop = drop | {t.strip().lower() for v in listed for t in v.split(",") if t.strip()}
    return [(n, v) for n, v in headers if (low := n.lower()) not in HOP_BY_HOP and low not in drop]
