"""Keys from a JSON request body (SPEC section 11, key kind ``json:POINTER``).

The pointer is RFC 6901, parsed once when the config is loaded. The key is the JSON text
of the value it points at (``123`` and ``"123"`` are different keys), so a chat id of a
webhook's update limits one chat. Only small bodies with a JSON media type are read
(:data:`MAX_BODY`); the body itself still goes upstream byte for byte.

The body is parsed with orjson. Where that parse cannot tell two values apart (a number
it read as a float: an integer past 64 bits, a fraction with more digits than a double
holds), the body is parsed again, keeping each number's exact value
(:class:`JsonBody`).

A member name twice gives no key (the fallback applies) when it is the name the pointer
takes in an object on its way, or anywhere in the value: orjson keeps the last one, an
upstream may read the first, and the budget spent must be the one of the value the
upstream serves. RFC 8259 says names SHOULD be unique and I-JSON (RFC 7493) that they
MUST; the body still goes upstream as it came (the gateway does not refuse what the
upstream may accept). orjson drops a repeated name silently, so a body is proven free
of them by counting colons: in the body, one for each member and one for each ``:`` in
a string; in orjson's document written out again, the same less those of each dropped
member. When no string spells a colon as ``\\u003a`` (the one way a colon can be in the
document and not in the body), as many in both proves that none was dropped. A body
where they differ (a repeated name) or with such an escape is parsed again, as above,
to see where the repetition is. A usual body (a key that is a string or a 64-bit
integer) is parsed once and written out once more.
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

    __slots__ = ("_exact", "_unique", "document", "raw")

    def __init__(self, raw: bytes, document: Any) -> None:
        self.raw = raw
        self.document = document
        self._exact: Any = None
        self._unique: bool | None = None

    def unique_names(self) -> bool:
        """True when no object of the body has a member name twice (a proof, not a
        guess: False may also be a ``\\u003a`` escape)."""
        if self._unique is None:
            raw = self.raw
            try:
                self._unique = (
                    b"\\u003a" not in raw
                    and b"\\u003A" not in raw
                    and raw.count(b":") == orjson.dumps(self.document).count(b":")
                )
            except orjson.JSONEncodeError:  # nested deeper than orjson writes
                self._unique = False
        return self._unique

    def exact(self) -> Any:
        """The document with each integer a Python ``int``, each other number an
        ``orjson.Fragment`` of its canonical text (:func:`_fraction`) and each object with
        a member name twice a :class:`_Repeated` (parsed once, on the first call), or
        :data:`NO_BODY` when that parse fails."""
        if self._exact is None:
            try:
                self._exact = json.loads(
                    self.raw,
                    object_pairs_hook=_object,
                    parse_float=_fraction,
                    parse_constant=_refuse,
                )
            except (ValueError, RecursionError):  # a number too long for an int
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


class _Repeated(dict[str, Any]):
    """An object of the exact parse with a member name twice: no pointer goes through
    one of its repeated ``names``, and no key is made of a value holding it."""

    __slots__ = ("names",)

    def __init__(self, members: dict[str, Any], names: frozenset[str]) -> None:
        super().__init__(members)
        self.names = names


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) == len(pairs):
        return members
    seen: set[str] = set()
    repeated: set[str] = set()
    for name, _ in pairs:
        (repeated if name in seen else seen).add(name)
    return _Repeated(members, frozenset(repeated))


def _fraction(literal: str) -> orjson.Fragment:
    """A number with a fraction or an exponent: the shortest text of its double when
    that text is its exact value (``1e2`` and ``100.0`` are ``100.0``), else its exact
    value as ``D.DDDeN`` (which no double's text of another value can be)."""
    exact = _scientific(literal)
    if exact == "0":
        return _ZERO  # -0.0, 0e5: one zero
    shortest = orjson.dumps(float(literal)).decode()
    return orjson.Fragment(shortest if _scientific(shortest) == exact else exact)


_ZERO = orjson.Fragment("0.0")
_I64_MIN = -(2**63)
_U64_END = 2**64  # orjson writes the integers from _I64_MIN up to here, not beyond


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


class _RepeatedNameError(Exception):
    """A value of the exact parse holds a :class:`_Repeated`: it makes no key."""


def _writable(value: Any) -> Any:
    """``value`` of the exact parse as orjson can write it: an integer past 64 bits as
    its digits (integers are JSON's canonical text of themselves)."""
    kind = type(value)
    if kind is int:
        return value if _I64_MIN <= value < _U64_END else orjson.Fragment(str(value))
    if kind is dict:
        return {name: _writable(member) for name, member in value.items()}
    if kind is list:
        return [_writable(item) for item in value]
    if kind is _Repeated:
        raise _RepeatedNameError
    return value


def _has_float(value: Any) -> bool:
    """Whether orjson's ``value`` holds a float (a number it may not have read exactly).
    Without recursion: orjson reads 1024 levels, more than Python's stack allows."""
    kind = type(value)
    if kind is not dict and kind is not list:  # the usual key: a scalar
        return kind is float
    stack = [value]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is float:
            return True
        if kind is dict:
            stack.extend(node.values())
        elif kind is list:
            stack.extend(node)
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
                if token not in node or (type(node) is _Repeated and token in node.names):
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
        double cannot tell apart are two keys. A member name twice on the way or in the
        value: ``None``."""
        if document is NO_BODY:
            return None
        found, value = self.resolve(document.document)
        if not found:
            return None
        # strings, 64-bit integers, each name once: orjson's document is the body's
        if _has_float(value) or not document.unique_names():
            found, value = self._exact_value(document.exact())
            if not found:
                return None
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except orjson.JSONEncodeError:  # nested deeper than orjson writes: no key
            return None

    def _exact_value(self, exact: Any) -> tuple[bool, Any]:
        """:meth:`resolve` in the document of :meth:`JsonBody.exact`, the value as
        orjson writes it; not found through or with a repeated name."""
        if exact is NO_BODY:
            return False, None
        found, value = self.resolve(exact)
        if not found:
            return False, None
        try:
            return True, _writable(value)
        except (_RepeatedNameError, RecursionError):
            return False, None

    def key(self, body: bytes) -> str | None:
        """The JSON text of the value in ``body``, or ``None`` (not JSON, no such value)."""
        return self.value_text(parse_body(body))
