"""The identity decisions as a table: which policy and key a request spends, and route
auth, from a snapshot and an identity (no sockets, no tokens: the identity is given)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from multidict import CIMultiDict

from gateway.config import load_text
from gateway.identity.resolver import NO_IDENTITY, RequestIdentity
from gateway.pipeline import decisions
from gateway.pipeline.reject import Reject
from gateway.pipeline.snapshot import Snapshot

CONFIG: dict[str, Any] = {
    "identity": {"jwt": {}, "api_keys": {}},
    "rate_limit": {
        "policies": {
            "user": {"requests": 1, "period_s": 1, "key": "jwt:sub", "fallback": "anon"},
            "tenant": {"requests": 1, "period_s": 1, "key": "jwt:tenant"},
            "key": {"requests": 1, "period_s": 1, "key": "api_key", "fallback": "anon"},
            "anon": {"requests": 1, "period_s": 1},
        }
    },
    "routes": [
        {"name": "u", "path_prefix": "/u", "upstream": "api", "rate_limits": ["user", "tenant"]},
        {"name": "both", "path_prefix": "/b", "upstream": "api", "rate_limits": ["user", "key"]},
        {"name": "own", "path_prefix": "/o", "upstream": "api", "rate_limits": ["user", "anon"]},
        {"name": "plain", "path_prefix": "/p", "upstream": "api", "rate_limits": ["anon"]},
        {"name": "jwt", "path_prefix": "/j", "upstream": "api", "auth": "jwt"},
        {"name": "key", "path_prefix": "/k", "upstream": "api", "auth": "api_key"},
        {"name": "any", "path_prefix": "/a", "upstream": "api", "auth": "any"},
    ],
}
SNAP = Snapshot(load_text(yaml.safe_dump(CONFIG), environ={}))
ROUTES = {r.name: r for r in SNAP.routes}
ALICE = RequestIdentity(claims={"sub": "alice", "tenant": 7}, api_key=None)
TEAM = RequestIdentity(claims=None, api_key="team-a")


@pytest.mark.parametrize(
    ("route", "ident", "expected"),
    [
        ("u", ALICE, [("user", "j:sub:alice"), ("tenant", "j:tenant:7")]),
        # no identity: the fallback with its own key; no fallback: the address
        ("u", NO_IDENTITY, [("anon", "10.0.0.1"), ("tenant", "10.0.0.1")]),
        # one fallback for two policies is spent once
        ("both", NO_IDENTITY, [("anon", "10.0.0.1")]),
        ("both", TEAM, [("anon", "10.0.0.1"), ("key", "k:team-a")]),
        # a fallback that is the route's own policy is not spent twice
        ("own", NO_IDENTITY, [("anon", "10.0.0.1")]),
        ("plain", ALICE, [("anon", "10.0.0.1")]),
    ],
)
def test_policy_checks(route: str, ident: RequestIdentity, expected: list[tuple[str, str]]) -> None:
    applied, checks = decisions.policy_checks(
        ROUTES[route], "10.0.0.1", CIMultiDict(), decoded=False, ident=ident
    )
    assert [p.name for p in applied] == [c.policy for c in checks]
    assert [(c.policy, c.key) for c in checks] == expected


def test_only_routes_that_need_it_read_credentials() -> None:
    assert not ROUTES["plain"].needs_identity
    assert all(ROUTES[n].needs_identity for n in ("u", "both", "jwt", "key", "any"))


@pytest.mark.parametrize(
    ("route", "ident", "status", "bearer"),
    [
        ("jwt", NO_IDENTITY, 401, True),
        ("jwt", TEAM, 401, True),
        ("jwt", ALICE, None, None),
        ("key", ALICE, 401, False),
        ("key", TEAM, None, None),
        ("any", NO_IDENTITY, 401, True),
        ("any", TEAM, None, None),
        ("any", ALICE, None, None),
        ("plain", NO_IDENTITY, None, None),
    ],
)
def test_check_auth(route: str, ident: RequestIdentity, status: int | None, bearer: Any) -> None:
    if status is None:
        decisions.check_auth(ROUTES[route], ident)
        return
    with pytest.raises(Reject) as info:
        decisions.check_auth(ROUTES[route], ident)
    assert info.value.status == status
    assert info.value.event == "auth_failure"
    assert ("WWW-Authenticate" in (info.value.headers or {})) is bearer


def _checks(route: str, ip: str, ident: RequestIdentity) -> list[str]:
    return [
        c.key
        for c in decisions.policy_checks(
            ROUTES[route], ip, CIMultiDict(), decoded=False, ident=ident
        )[1]
    ]


def test_checks_keyed_by_the_identity_alone_are_made_once_per_verified_token() -> None:
    kept = RequestIdentity(claims={"sub": "alice", "tenant": 7}, route_checks={})
    first = decisions.policy_checks(
        ROUTES["u"], "10.0.0.1", CIMultiDict(), decoded=False, ident=kept
    )
    again = decisions.policy_checks(
        ROUTES["u"], "10.0.0.2", CIMultiDict(), decoded=False, ident=kept
    )
    # the same lists, kept with the token's cache entry (a compiled build hands out a new
    # tuple around them)
    assert again[0] is first[0]
    assert again[1] is first[1]
    # a route with a policy keyed by the address: made again for another address
    assert _checks("own", "10.0.0.1", kept) == ["j:sub:alice", "10.0.0.1"]
    assert _checks("own", "10.0.0.2", kept) == ["j:sub:alice", "10.0.0.2"]
    # a claim the token lacks: the fallback, by the address, each time
    lacking = RequestIdentity(claims={"sub": "bob"}, route_checks={})
    assert _checks("u", "10.0.0.1", lacking) == ["j:sub:bob", "10.0.0.1"]
    assert _checks("u", "10.0.0.2", lacking) == ["j:sub:bob", "10.0.0.2"]
    assert _checks("u", "10.0.0.1", lacking) == ["j:sub:bob", "10.0.0.1"]
    assert set(kept.route_checks or {}) == {"u", "own"}
    assert set(lacking.route_checks or {}) == {"u"}


def test_checks_keyed_by_the_identity_and_the_address_are_kept_for_that_address() -> None:
    kept = RequestIdentity(claims={"sub": "alice"}, route_checks={})
    first = decisions.policy_checks(
        ROUTES["own"], "10.0.0.1", CIMultiDict(), decoded=False, ident=kept
    )
    again = decisions.policy_checks(
        ROUTES["own"], "10.0.0.1", CIMultiDict(), decoded=False, ident=kept
    )
    assert again[1] is first[1]
    other = decisions.policy_checks(
        ROUTES["own"], "10.0.0.2", CIMultiDict(), decoded=False, ident=kept
    )
    assert other[1] is not first[1]
    assert [c.key for c in other[1]] == ["j:sub:alice", "10.0.0.2"]
    # the last address's are kept: the first address's are made anew
    back = decisions.policy_checks(
        ROUTES["own"], "10.0.0.1", CIMultiDict(), decoded=False, ident=kept
    )
    assert back[1] is not first[1]
    assert [c.key for c in back[1]] == ["j:sub:alice", "10.0.0.1"]


def test_checks_keyed_by_a_field_are_never_kept() -> None:
    snap = Snapshot(
        load_text(
            yaml.safe_dump(
                {
                    "identity": {"jwt": {}},
                    "rate_limit": {
                        "policies": {
                            "user": {"requests": 1, "period_s": 1, "key": "jwt:sub"},
                            "tenant": {"requests": 1, "period_s": 1, "key": "header:X-Tenant"},
                        }
                    },
                    "routes": [
                        {
                            "name": "t",
                            "path_prefix": "/",
                            "upstream": "api",
                            "rate_limits": ["user", "tenant"],
                        }
                    ],
                }
            ),
            environ={},
        )
    )
    route = snap.routes[0]
    kept = RequestIdentity(claims={"sub": "alice"}, route_checks={})
    keys = [
        [
            c.key
            for c in decisions.policy_checks(
                route, "10.0.0.1", CIMultiDict({"X-Tenant": tenant}), decoded=False, ident=kept
            )[1]
        ]
        for tenant in ("a", "b")
    ]
    assert keys == [["j:sub:alice", "h:a"], ["j:sub:alice", "h:b"]]
    assert kept.route_checks == {}


def test_the_access_log_label() -> None:
    assert ALICE.label == "jwt:alice"
    assert TEAM.label == "api_key:team-a"
    assert NO_IDENTITY.label is None
    assert RequestIdentity(claims={"sub": 5}).label == "jwt:"
