"""The gateway's response fields: render (and apply, on a multidict) against a plain model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.config import Config, load_text
from gateway.pipeline.headers import RATE_LIMIT_FIELDS, UPSTREAM_SKIP, ResponseHeaders

# names an upstream may send that the rules treat specially, in assorted cases
NAMES = [
    "Date",
    "date",
    "Content-Type",
    "Server",
    "X-Powered-By",
    "X-Frame-Options",
    "x-content-type-options",
    "Strict-Transport-Security",
    "Connection",
    "Keep-Alive",
    "Content-Length",
    "X-Request-ID",
    "RateLimit",
    "ratelimit-policy",
    "X-Custom",
]
FIELDS = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(["a", "b c", "DENY"])))
EXTRA = [("RateLimit-Policy", '"p";q=10;w=1'), ("RateLimit", '"p";r=9;t=1')]


def _config(*, override: bool, hsts: int) -> Config:
    text = f"security_headers: {{override: {str(override).lower()}, hsts: {{max_age_s: {hsts}}}}}"
    return load_text(text).config


def _rules(*, override: bool, hsts: int) -> ResponseHeaders:
    return ResponseHeaders(_config(override=override, hsts=hsts))


def _model(
    cfg: Config,
    fields: list[tuple[str, str]],
    rid: str | None,
    *,
    secure: bool,
    extra: list[tuple[str, str]] | None,
    skip: frozenset[str] | None,
) -> list[tuple[str, str]]:
    """The rules of the README, the plain way: what the response's fields become."""
    sh = cfg.security_headers
    rid_header = cfg.request.request_id_header
    hsts = None
    if sh.hsts.max_age_s > 0:
        hsts = f"max-age={sh.hsts.max_age_s}"
        if sh.hsts.include_subdomains:
            hsts += "; includeSubDomains"
    drop = {n.lower() for n in sh.remove} | set(skip or ())
    if extra:
        drop |= RATE_LIMIT_FIELDS
    if rid is not None:
        drop.add(rid_header.lower())
    if sh.override:
        drop |= {n.lower() for n in sh.set}
        if secure and hsts:
            drop.add("strict-transport-security")
    out = [(n, v) for n, v in fields if n.lower() not in drop]
    present = {n.lower() for n, _ in out}
    out += [(n, v) for n, v in sh.set.items() if sh.override or n.lower() not in present]
    if secure and hsts and (sh.override or "strict-transport-security" not in present):
        out.append(("Strict-Transport-Security", hsts))
    if rid is not None:
        out.append((rid_header, rid))
    return out + (extra or [])


def _as_block(fields: list[tuple[str, str]]) -> str:
    return "".join(f"{n}: {v}\r\n" for n, v in fields)


@settings(max_examples=300, deadline=None)
@given(
    fields=FIELDS,
    override=st.booleans(),
    hsts=st.sampled_from([0, 63072000]),
    secure=st.booleans(),
    rid=st.sampled_from([None, "abc123"]),
    extra=st.booleans(),
    skip=st.sampled_from([None, UPSTREAM_SKIP]),
)
def test_render_and_apply_follow_the_rules(  # noqa: PLR0917 - drawn by hypothesis
    fields: list[tuple[str, str]],
    override: bool,
    hsts: int,
    secure: bool,
    rid: str | None,
    extra: bool,
    skip: frozenset[str] | None,
) -> None:
    cfg = _config(override=override, hsts=hsts)
    rules = ResponseHeaders(cfg)
    extra_fields = list(EXTRA) if extra else None
    given_fields = list(fields)
    block, has_date = rules.render(given_fields, rid, secure=secure, extra=extra_fields, skip=skip)
    assert given_fields == fields  # render leaves the list alone
    applied = _model(cfg, fields, rid, secure=secure, extra=extra_fields, skip=skip)
    assert block == _as_block(applied)
    assert has_date == any(n.lower() == "date" for n, _ in applied)
    if extra is False and skip is None:  # the multidict path takes neither
        md = CIMultiDict(fields)
        rules.apply(md, rid, secure=secure)
        assert list(md.items()) == applied


@pytest.mark.parametrize("override", [False, True])
def test_upstream_security_fields_win_unless_override(override: bool) -> None:
    rules = _rules(override=override, hsts=100)
    upstream = [("X-Frame-Options", "SAMEORIGIN"), ("Strict-Transport-Security", "max-age=5")]
    block, _ = rules.render(upstream, "rid1", secure=True, skip=UPSTREAM_SKIP)
    lines = block.split("\r\n")
    ours = "Strict-Transport-Security: max-age=100; includeSubDomains"
    if override:
        assert "X-Frame-Options: DENY" in lines
        assert "X-Frame-Options: SAMEORIGIN" not in lines
        assert ours in lines
    else:
        assert "X-Frame-Options: SAMEORIGIN" in lines
        assert "X-Frame-Options: DENY" not in lines
        assert "Strict-Transport-Security: max-age=5" in lines
        assert ours not in lines
    assert lines.count("X-Request-ID: rid1") == 1
    assert not any(line.split(":")[0].lower() in RATE_LIMIT_FIELDS for line in lines)
