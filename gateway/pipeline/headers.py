"""Response headers the gateway adds to every response: request id and security headers.

Computed once per config; applying them is a handful of dict operations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from gateway.config import Config


class ResponseHeaders:
    """Applied in the response-prepare hook, so streamed and error responses get them too."""

    __slots__ = ("_hsts", "_override", "_remove", "_rid_header", "_set")

    def __init__(self, cfg: Config) -> None:
        sh = cfg.security_headers
        self._rid_header = cfg.request.request_id_header
        if sh.enabled:
            self._set = tuple(sh.set.items())
            self._remove = tuple(sh.remove)
            hsts = f"max-age={sh.hsts.max_age_s}"
            if sh.hsts.include_subdomains:
                hsts += "; includeSubDomains"
            self._hsts: str | None = hsts if sh.hsts.max_age_s > 0 else None
        else:
            self._set = ()
            self._remove = ()
            self._hsts = None
        self._override = sh.override

    def apply(self, headers: CIMultiDict[str], rid: str | None, *, secure: bool) -> None:
        if rid is not None:
            headers[self._rid_header] = rid
        for name in self._remove:
            headers.popall(name, None)
        if self._override:
            for name, value in self._set:
                headers[name] = value
            if secure and self._hsts is not None:
                headers["Strict-Transport-Security"] = self._hsts
        else:
            for name, value in self._set:
                headers.setdefault(name, value)
            if secure and self._hsts is not None:
                headers.setdefault("Strict-Transport-Security", self._hsts)

    def static_block(self) -> str:
        """The headers as raw lines, for responses written below aiohttp (the 408)."""
        return "".join(f"{n}: {v}\r\n" for n, v in self._set)
