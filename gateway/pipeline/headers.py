"""Response headers the gateway adds to every response: request id and security headers.

Computed once per config; applying them is a handful of dict operations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from gateway.core.fieldnames import lower_name
from gateway.downstream.live import AnswerHeaders
from gateway.upstream.hop_by_hop import HOP_BY_HOP, header_pairs

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from gateway.config import Config


# the fields the rate-limit step adds to an allowed request's answer (lower-case)
RATE_LIMIT_FIELDS: Final = frozenset(("ratelimit", "ratelimit-policy"))
# an upstream's fields never passed on as they are: hop-by-hop ones and the length
UPSTREAM_SKIP: Final = HOP_BY_HOP | {"content-length"}


class ResponseHeaders(AnswerHeaders):
    """Applied to every response, streamed and error ones included.

    It names the servers' :class:`~gateway.downstream.live.AnswerHeaders` as its base: the
    compiled servers then call :meth:`render` directly, not by name."""

    __slots__ = (
        "_block",
        "_block_hsts",
        "_drops",
        "_drops_rid",
        "_hsts",
        "_override",
        "_rid_header",
        "_rid_lower",
        "_rid_prefix",
        "_set",
        "_set_lower",
        "_set_names",
    )

    def __init__(self, cfg: Config) -> None:
        sh = cfg.security_headers
        self._rid_header = cfg.request.request_id_header
        self._rid_lower = self._rid_header.lower()
        self._rid_prefix = f"{self._rid_header}: "
        remove: tuple[str, ...] = ()
        if sh.enabled:
            self._set: tuple[tuple[str, str], ...] = tuple(sh.set.items())
            remove = tuple(sh.remove)
            hsts = f"max-age={sh.hsts.max_age_s}"
            if sh.hsts.include_subdomains:
                hsts += "; includeSubDomains"
            self._hsts: str | None = hsts if sh.hsts.max_age_s > 0 else None
        else:
            self._set = ()
            self._hsts = None
        self._override = sh.override
        self._set_lower = tuple((n.lower(), (n, v)) for n, v in self._set)
        # the gateway's fields an upstream may send itself (then, without override, it wins)
        self._set_names = frozenset(low for low, _ in self._set_lower) | {
            "strict-transport-security"
        }
        # the fields the gateway sets, as header lines: added whole when none is present
        self._block = "".join(f"{n}: {v}\r\n" for n, v in self._set)
        hsts_line = f"Strict-Transport-Security: {self._hsts}\r\n" if self._hsts else ""
        self._block_hsts = self._block + hsts_line
        # names dropped before the gateway's own are added (lower-case)
        drop = {n.lower() for n in remove}
        if self._override:
            drop.update(n.lower() for n, _ in self._set)
        plain = frozenset(drop)
        drop_hsts = frozenset((drop | {"strict-transport-security"}) if self._override else drop)
        # every combination a response can need, made once:
        # (upstream fields to skip, HSTS sent, RateLimit fields added) -> names dropped
        self._drops: dict[tuple[frozenset[str] | None, bool, bool], frozenset[str]] = {}
        for skip in (None, UPSTREAM_SKIP):
            for hsts_on in (False, True):
                for extra_on in (False, True):
                    names = drop_hsts if hsts_on and self._hsts is not None else plain
                    if extra_on:
                        names |= RATE_LIMIT_FIELDS
                    if skip is not None:
                        names |= skip
                    self._drops[skip, hsts_on, extra_on] = frozenset(names)
        # the same with the request id field, which the gateway always sets itself
        self._drops_rid = {k: v | {self._rid_lower} for k, v in self._drops.items()}

    def render(
        self,
        headers: list[tuple[str, str]],
        rid: str | None,
        *,
        secure: bool,
        extra: list[tuple[str, str]] | None = None,
        skip: frozenset[str] | None = None,
    ) -> tuple[str, bool]:
        """``headers`` with the gateway's rules applied, as header lines (CRLF after each),
        and whether a Date field is among them; the list itself is left as it is.

        Dropped: the ``remove`` names, the request id field (``rid`` replaces it), any
        RateLimit fields when ``extra`` (the rate-limit step's) is given, and ``skip``
        (None, or :data:`UPSTREAM_SKIP` for an upstream's fields as they came). Added: the
        ``set`` fields (with ``override`` always, else those absent), HSTS when ``secure``,
        the request id, then ``extra``.
        """
        drops = self._drops_rid if rid is not None else self._drops
        drop = drops[skip, secure, bool(extra)]
        lines: list[str] = []
        set_names = self._set_names
        present: list[str] = []  # the gateway's fields the answer has and keeps
        has_date = False
        for name, value in headers:
            low = lower_name(name)
            if low not in drop:
                # pieces joined once below rather than a line made and freed first
                lines.append(name)
                lines.append(": ")
                lines.append(value)
                lines.append("\r\n")
                if low in set_names:
                    present.append(low)
                if low == "date":
                    has_date = True
        hsts = secure and self._hsts is not None
        # (with none of them kept, adding only those not kept is adding them all)
        if self._override or not present:
            lines.append(self._block_hsts if hsts else self._block)
        else:  # the upstream's own values win: add only what it did not send
            lines.extend([f"{n}: {v}\r\n" for low, (n, v) in self._set_lower if low not in present])
            if hsts and "strict-transport-security" not in present:
                lines.append(f"Strict-Transport-Security: {self._hsts}\r\n")
        if rid is not None:
            lines.append(self._rid_prefix)
            lines.append(rid)
            lines.append("\r\n")
        if extra:
            for n, v in extra:
                lines.append(n)
                lines.append(": ")
                lines.append(v)
                lines.append("\r\n")
        return "".join(lines), has_date

    def apply(self, headers: CIMultiDict[str], rid: str | None, *, secure: bool) -> None:
        """The same on a multidict in place (responses of the upgrade protocol, admin)."""
        block, _ = self.render(list(headers.items()), rid, secure=secure)
        headers.clear()
        # names hold no ":" and values no CR/LF (aiohttp and the config refuse them)
        headers.extend(header_pairs(block))

    def static_block(self) -> str:
        """The headers as raw lines, for responses written below aiohttp (the 408)."""
        return self._block
