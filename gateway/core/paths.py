"""The canonical path: the one reading of a request target that every decision uses.

SPEC section 9.  Route matching, route guards, suspicious-path scoring and
``/admin/explain`` all read :func:`canonical_path` of the target; the upstream still
receives the target exactly as the client sent it.  Upstreams disagree on how they read
a path (Tomcat and Spring drop ``;`` parameters, IIS reads ``\\`` as ``/``, most servers
remove dot segments), so the gateway reads it the way that reaches the most: a spelling
that some upstream could serve as ``/admin/x`` meets ``/admin/``'s guards.

The rules, in order:

1. The path is the target up to the first ``?``.  A ``#`` before it is refused: a
   fragment has no place in a request target (RFC 9112 3.2), and a server that does not
   cut there would read what follows as path.
2. Percent-encodings are decoded once: unreserved characters (``A-Z a-z 0-9 - . _ ~``),
   ``%2F`` and ``%5C`` (both read as ``/``) and ``%3B`` (read as ``;``: containers
   disagree on whether they decode it before they cut path parameters, which is why
   Spring's firewall refuses it); every other one stays encoded, with upper-case
   hex (RFC 3986 6.2.2).  Refused: a ``%`` not followed by two hex digits, an encoded
   control character (``%00``-``%1F``, ``%7F``), and a double encoding of ``.``, ``/``,
   ``\\``, ``;``, ``%`` or a control character (``%252e``): a component that decodes twice
   would read a path other than the one decided on.
3. Non-ASCII characters (none come through the HTTP parser, which refuses them, but an
   ``/admin/explain`` path may hold some) are percent-encoded as UTF-8.  The encoded bytes
   must be UTF-8 (overlong forms such as ``%C0%AE`` are refused), and must not hold a
   character that an upstream's folding turns into ASCII: Unicode compatibility folding
   (NFKC, IIS "best fit": ``%EF%BC%8E`` is a full stop, ``%EF%BD%81`` an ``a``, a no-break
   space a space) or a one-letter case mapping (a dotless i, U+0131, upper-cases to ``I``, the
   Kelvin sign lower-cases to ``k``).
4. ``\\`` is read as ``/``.
5. Each segment loses its ``;`` parameters (``/admin;x=1/`` is ``/admin/``, ``..;`` is
   ``..``) and its trailing spaces, then dot segments are removed (RFC 3986 5.2.4; ``..``
   above the root stays at the root), empty segments are merged (``//`` is ``/``), and
   trailing dots are dropped from each segment (Windows file systems serve
   ``/admin./`` and ``/admin%20/`` as ``/admin/``).  A path
   whose last segment is empty or a dot segment ends in ``/``.

Letter case is kept; callers that match in any case (routes, suspicious paths) lower the
result once.  The function is pure and total on ``str``: it returns the canonical path
or raises :class:`PathError`, and ``canonical_path(canonical_path(t)) == canonical_path(t)``.
"""

from __future__ import annotations

import string
import unicodedata
from typing import Final
from urllib.parse import unquote_to_bytes

__all__ = ["PathError", "canonical_path", "reads_as_authority"]


class PathError(ValueError):
    """The target cannot be read as one path; the request is refused with a 400."""


_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)
# characters a second decoding must not produce: dot, slash, backslash, semicolon, percent
_TWICE = frozenset(("2E", "2F", "5C", "3B", "25"))
_SPACES = ("%20", " ")
_TAIL = (".", *_SPACES)


# a path starting so is a network-path reference to URL parsers (RFC 3986 4.2; WHATWG
# reads a backslash as a slash in http URLs)
_AUTHORITY: Final = ("//", "/\\")


def reads_as_authority(target: str) -> bool:
    """True when the target starts with two slashes (or a slash and a backslash).

    WHATWG URL parsers (Node's ``new URL(req.url, base)``) and Python's ``urlsplit`` read
    ``//h/admin/x`` as host ``h`` and path ``/admin/x``, while :func:`canonical_path`
    merges the slashes into ``/h/admin/x``: no one reading serves every upstream, so the
    pipeline refuses such a target (after scoring it, so ``//.env`` still counts).
    """
    return target.startswith(_AUTHORITY)


def canonical_path(target: str) -> str:
    """The canonical path of an origin-form target (``/path?query``): see the module."""
    path, _, _ = target.partition("?")
    if (
        path.isascii()
        and "%" not in path
        and "\\" not in path
        and ";" not in path
        and "#" not in path
        and " " not in path
        and "//" not in path
        and ("." not in path or ("/." not in path and "./" not in path and path[-1] != "."))
        and path[:1] == "/"
        and path.isprintable()
    ):
        return path  # the common case: already canonical, nothing allocated
    return _canonical(path)


def _canonical(path: str) -> str:
    if path[:1] != "/":
        raise PathError("the request target is not a path")
    if "#" in path:
        raise PathError("a fragment (#) in the request target")
    if not path.isascii():
        path = _encode_non_ascii(path)
    if not path.isprintable():
        raise PathError("a control character in the request target")
    if "%" in path:
        path = _decode_once(path)
    segments = path.replace("\\", "/").split("/")
    out: list[str] = []
    trailing = False
    for seg in segments[1:]:
        if ";" in seg:
            seg = seg.partition(";")[0]  # noqa: PLW2901 - the segment without its parameters
        while seg.endswith(_SPACES):  # Windows drops trailing spaces: "admin%20" is "admin"
            seg = seg.removesuffix("%20").removesuffix(" ")  # noqa: PLW2901
        if seg == "..":
            if out:
                out.pop()
            trailing = True
            continue
        while seg.endswith(_TAIL):  # "." and "..." leave nothing, "admin. " leaves "admin"
            seg = seg.rstrip(". ").removesuffix("%20")  # noqa: PLW2901
        if seg:
            out.append(seg)
            trailing = False
        else:
            trailing = True
    if not out:
        return "/"
    return "/" + "/".join(out) + ("/" if trailing else "")


def _encode_non_ascii(path: str) -> str:
    try:
        return "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in path)
    except UnicodeEncodeError:  # a lone surrogate
        raise PathError("the request target is not UTF-8") from None


def _decode_once(path: str) -> str:
    parts = path.split("%")
    out = [parts[0]]
    high = False  # a non-ASCII byte was seen: the bytes must be UTF-8
    for part in parts[1:]:
        hx = part[:2]
        if len(hx) < 2 or hx[0] not in _HEX or hx[1] not in _HEX:
            raise PathError("an invalid percent-encoding in the request target")
        byte = int(hx, 16)
        char = chr(byte)
        if char in _UNRESERVED:
            out.append(char)
        elif byte in (0x2F, 0x5C):
            out.append("/")
        elif byte == 0x3B:
            out.append(";")
        elif byte < 0x20 or byte == 0x7F:
            raise PathError("an encoded control character in the request target")
        else:
            high = high or byte >= 0x80
            out.append("%" + hx.upper())
        out.append(part[2:])
    decoded = "".join(out)
    if "%25" in decoded:
        _check_twice(decoded)
    if high:
        _check_text(decoded)
    return decoded


def _check_twice(path: str) -> None:
    """A ``%`` decoded once must not start an encoding a second decoding would act on."""
    for part in path.split("%25")[1:]:
        nxt = part[:2].upper()
        if len(nxt) < 2 or nxt[0] not in _HEX or nxt[1] not in _HEX:
            continue
        if nxt in _TWICE or nxt < "20" or nxt == "7F":
            raise PathError("a doubly encoded character in the request target")


def _one_ascii_letter(mapped: str) -> bool:
    """A case mapping that is one ASCII letter, bar combining marks (the dotted capital I
    lower-cases to ``i`` and a combining dot; Java's per-character mapping gives ``i``)."""
    return mapped[0].isascii() and all(unicodedata.combining(c) for c in mapped[1:])


def _check_text(path: str) -> None:
    """The percent-encoded bytes of ``path`` must be UTF-8 with no character that folds to ASCII."""
    try:
        text = unquote_to_bytes(path).decode()
    except UnicodeDecodeError:
        raise PathError("the request target is not UTF-8") from None
    for char in set(text):
        if char.isascii():
            continue
        if any(c.isascii() for c in unicodedata.normalize("NFKC", char)) or (
            _one_ascii_letter(char.lower()) or _one_ascii_letter(char.upper())
        ):
            raise PathError("a character that reads as ASCII once folded")
