"""Keys from a JSON request body (SPEC section 11, key kind ``json:POINTER``).

The pointer is RFC 6901, parsed once when the config is loaded. The key is the JSON text
of the value it points at (``123`` and ``"123"`` are different keys), so a chat id of a
webhook's update limits one chat. Only small bodies with a JSON media type are read
(:data:`MAX_BODY`); the body itself still goes upstream byte for byte.

The body is parsed with orjson. Where that parse cannot tell two values apart (a number
it read as a float: an integer past 64 bits, a fraction with more digits than a double
holds), the body is parsed again, keeping each number's exact value
(:class:`JsonBody`); a usual body, whose key is a string or a 64-bit integer, is parsed
once.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["MAX_BODY", "NO_BODY", "JsonBody", "JsonPointer", "is_json_media_type", "parse_body"]

MAX_BODY = 65536
"""Largest body a key is read from; a larger one has no key (the fallback applies)."""

NO_BODY: Any = object()
"""A request without a JSON body a key can be read from (none, too large, not JSON)."""


class JsonBody:
    """A parsed body: orjson's document, and the exact one when a key needs it."""

    __slots__ = ("_exact", "document", "raw")

    def __init__(self, raw: bytes, document: Any) -> None:
        self.raw = raw
        self.document = document
        self._exact: Any = None

    def exact(self) -> Any:
        """The document with each number a :class:`_Number` of its exact value (parsed
        once, on the first call), or :data:`NO_BODY` when that parse fails."""
        if self._exact is None:
            try:
                self._exact = json.loads(
                    self.raw, parse_int=_integer, parse_float=_fraction, parse_constant=_refuse
                )
            except (ValueError, RecursionError):  # an exponent too long for an int
                self._exact = NO_BODY
        return self._exact


def parse_body(body: bytes) -> Any:
    """The :class:`JsonBody` of a body of at most :data:`MAX_BODY` bytes, else
    :data:`NO_BODY`.

    Parsed once per request, whatever the number of policies that point into it."""
    if len(body) > MAX_BODY:
        return NO_BODY
    try:
        return JsonBody(body, orjson.loads(body))
    except orjson.JSONDecodeError:
        return NO_BODY


class _Number:
    """A number of the exact parse, by its canonical JSON text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _integer(literal: str) -> _Number:
    # the literal is its canonical text (JSON has no leading zeros, no '+'), as orjson
    # writes a 64-bit integer; only minus zero has another spelling
    return _Number("0" if literal == "-0" else literal)


def _fraction(literal: str) -> _Number:
    """A number with a fraction or an exponent: the shortest text of its double when
    that text is its exact value (``1e2`` and ``100.0`` are ``100.0``), else its exact
    value as ``D.DDDeN`` (which no double's text of another value can be)."""
    exact = _scientific(literal)
    if exact == "0":
        return _Number("0.0")  # -0.0, 0e5: one zero
    shortest = orjson.dumps(float(literal)).decode()
    return _Number(shortest if _scientific(shortest) == exact else exact)


def _scientific(literal: str) -> str:
    """The exact value of a JSON number's text as ``[-]D[.DDD]eN``, ``0`` for zero:
    two texts give the same string exactly when they are the same number."""
    mantissa, _, exponent = literal.lower().partition("e")
    negative = mantissa.startswith("-")
    whole, _, fraction = mantissa.lstrip("-").partition(".")
    digits = (whole + fraction).lstrip("0")
    if not digits:
        return "0"
    significant = digits.rstrip("0")
    # the value is int(digits) * 10 ** (exponent - len(fraction)): its first digit's power
    power = int(exponent or "0") - len(fraction) + len(digits) - 1
    rest = "." + significant[1:] if len(significant) > 1 else ""
    return f"{'-' if negative else ''}{significant[0]}{rest}e{power}"


def _refuse(literal: str) -> Any:
    raise ValueError(literal)  # NaN, Infinity: not JSON (orjson refused them already)


def _exact_text(value: object) -> Any:
    if isinstance(value, _Number):
        return orjson.Fragment(value.text)
    raise TypeError


def _has_float(value: Any) -> bool:
    """Whether orjson's ``value`` holds a float (a number it may not have read exactly)."""
    if type(value) is float:
        return True
    if type(value) is dict:
        return any(_has_float(v) for v in value.values())
    if type(value) is list:
        return any(_has_float(v) for v in value)
    return False


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or any ``*/*+json``, parameters and case aside."""
    if not content_type:
        return False
    if content_type == "application/json":  # the usual spelling: no parsing
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    kind, slash, subtype = media.partition("/")
    if not slash or not kind or "/" in subtype:
        return False
    return media == "application/json" or (subtype.endswith("+json") and len(subtype) > 5)


class JsonPointer:
    """One RFC 6901 pointer, checked at construction."""

    __slots__ = ("_tokens", "text")

    def __init__(self, text: str) -> None:
        if text and not text.startswith("/"):
            raise ValueError(f"JSON pointer {text!r} must be empty or start with '/'")
        tokens: list[str] = []
        for raw in text.split("/")[1:]:
            stripped = raw.replace("~0", "").replace("~1", "")
            if "~" in stripped:
                raise ValueError(f"JSON pointer {text!r}: '~' must be followed by 0 or 1")
            tokens.append(raw.replace("~1", "/").replace("~0", "~"))
        self.text = text
        self._tokens = tuple(tokens)

    def resolve(self, document: Any) -> tuple[bool, Any]:
        """``(True, value)`` where the pointer leads, else ``(False, None)``."""
        node = document
        for token in self._tokens:
            if isinstance(node, dict):
                if token not in node:
                    return False, None
                node = node[token]
            elif isinstance(node, list):
                if not token.isdigit() or (len(token) > 1 and token[0] == "0"):
                    return False, None
                index = int(token)
                if index >= len(node):
                    return False, None
                node = node[index]
            else:
                return False, None
        return True, node

    def value_text(self, document: Any) -> str | None:
        """The JSON text of the value the pointer leads to in a parsed ``document``
        (:func:`parse_body`), or ``None``. The text is canonical (object members sorted,
        no spaces, escapes resolved): spelling a value another way (``1e2`` for
        ``100.0``, ``"\\u0061"`` for ``"a"``) does not give a client another budget,
        while ``123`` and ``"123"`` stay two keys. Numbers are exact: two numbers a
        double cannot tell apart are two keys."""
        if document is NO_BODY:
            return None
        found, value = self.resolve(document.document)
        if not found:
            return None
        if not _has_float(value):  # strings, 64-bit integers: orjson's text is exact
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        exact = document.exact()
        if exact is NO_BODY:
            return None
        found, value = self.resolve(exact)
        if not found:
            return None
        return orjson.dumps(value, default=_exact_text, option=orjson.OPT_SORT_KEYS).decode()

    def key(self, body: bytes) -> str | None:
        """The JSON text of the value in ``body``, or ``None`` (not JSON, no such value)."""
        return self.value_text(parse_body(body))
