"""Keys from a JSON request body (SPEC section 11, key kind ``json:POINTER``).

The pointer is RFC 6901, parsed once when the config is loaded. The key is the JSON text
of the value it points at (``123`` and ``"123"`` are different keys), so a chat id of a
webhook's update limits one chat. Only small bodies with a JSON media type are read
(:data:`MAX_BODY`); the body itself still goes upstream byte for byte.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["MAX_BODY", "NO_BODY", "JsonPointer", "is_json_media_type", "parse_body"]

MAX_BODY = 65536
"""Largest body a key is read from; a larger one has no key (the fallback applies)."""

NO_BODY: Any = object()
"""A request without a JSON body a key can be read from (none, too large, not JSON)."""


def parse_body(body: bytes) -> Any:
    """The JSON document of a body of at most :data:`MAX_BODY` bytes, else :data:`NO_BODY`.

    Parsed once per request, whatever the number of policies that point into it."""
    if len(body) > MAX_BODY:
        return NO_BODY
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return NO_BODY


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
        while ``123`` and ``"123"`` stay two keys."""
        if document is NO_BODY:
            return None
        found, value = self.resolve(document)
        if not found:
            return None
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()

    def key(self, body: bytes) -> str | None:
        """The JSON text of the value in ``body``, or ``None`` (not JSON, no such value)."""
        return self.value_text(parse_body(body))
