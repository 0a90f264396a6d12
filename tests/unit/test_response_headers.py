"""The gateway's response fields: the rendered block is exactly what apply_list makes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import load_text
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


def _rules(*, override: bool, hsts: int) -> ResponseHeaders:
    text = f"security_headers: {{override: {str(override).lower()}, hsts: {{max_age_s: {hsts}}}}}"
    return ResponseHeaders(load_text(text).config)


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
def test_render_is_apply_list_as_lines(  # noqa: PLR0917 - drawn by hypothesis
    fields: list[tuple[str, str]],
    override: bool,
    hsts: int,
    secure: bool,
    rid: str | None,
    extra: bool,
    skip: frozenset[str] | None,
) -> None:
    rules = _rules(override=override, hsts=hsts)
    extra_fields = list(EXTRA) if extra else None
    given_fields = list(fields)
    block, has_date = rules.render(given_fields, rid, secure=secure, extra=extra_fields, skip=skip)
    assert given_fields == fields  # render leaves the list alone
    applied = list(fields)
    rules.apply_list(applied, rid, secure=secure, extra=extra_fields, skip=skip)
    assert block == _as_block(applied)
    assert has_date == any(n.lower() == "date" for n, _ in applied)


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
