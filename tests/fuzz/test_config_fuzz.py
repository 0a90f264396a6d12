"""Property tests for the config loader: hostile input fails cleanly, valid input loads.

An operator's file is untrusted text: whatever it holds, loading must end in a
:class:`~gateway.config.ConfigError` (with every problem listed) or a valid config,
never another exception (which would crash ``serve`` or a reload with a traceback).
"""

from __future__ import annotations

import copy
import ipaddress
import string
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Config, ConfigError, Problem, load_text, parse_config

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --------------------------------------------------------------------------- strategies

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JUNK = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)

TOP_KEYS = sorted(Config.model_fields)
SECTION_KEYS = sorted(
    {
        name
        for field in Config.model_fields.values()
        for model in [getattr(field.annotation, "model_fields", None)]
        if model
        for name in model
    }
)

GOOD: dict[str, Any] = {
    "listen": {"host": "127.0.0.1", "port": 8000},
    "admin": {"host": "127.0.0.1", "port": 9901},
    "trusted_proxies": ["10.0.0.0/8"],
    "upstreams": {"api": {"url": "http://127.0.0.1:8080"}, "bot": {"url": "http://127.0.0.1:8081"}},
    "routes": [
        {
            "name": "bot",
            "path_prefix": "/bot/",
            "upstream": "bot",
            "methods": ["POST"],
            "rate_limits": ["webhook"],
        },
        {"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": ["per-ip"]},
    ],
    "rate_limit": {
        "policies": {
            "per-ip": {"requests": 20, "period_s": 1, "burst": 40},
            "webhook": {"requests": 30, "period_s": 1, "key": "route"},
        }
    },
    "database": {"checks": [{"name": "q", "query": "SELECT 1"}]},
}


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


GOOD_PATHS = _paths(GOOD)


def _replace(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    out = copy.deepcopy(obj)
    target = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return out


def _outcome(data: Any) -> Config | None:
    """parse_config's answer: a Config, or None for a ConfigError; anything else fails."""
    problems: list[Problem] = []
    try:
        return parse_config(data)
    except ConfigError as exc:
        problems = exc.problems
    assert problems, "a ConfigError must list its problems"
    assert all(str(p) for p in problems)
    return None


def _load(text: str) -> None:
    """load_text, where a ConfigError must list its problems; anything else fails."""
    problems: list[Problem] | None = None
    try:
        load_text(text, environ={})
    except ConfigError as exc:
        problems = exc.problems
    assert problems is None or problems


# --------------------------------------------------------------------------- hostile input


@FUZZ
@given(JUNK)
def test_any_data_is_a_config_or_a_config_error(data: Any) -> None:
    _outcome(data)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(TOP_KEYS),
        JUNK | st.dictionaries(st.sampled_from(SECTION_KEYS) | st.text(max_size=8), JUNK),
        max_size=6,
    )
)
def test_schema_shaped_junk_is_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    _outcome(data)


@FUZZ
@given(st.sampled_from(GOOD_PATHS), JUNK)
def test_one_field_of_a_good_config_replaced_by_junk(path: tuple[Any, ...], value: Any) -> None:
    cfg = _outcome(_replace(GOOD, path, value))
    if cfg is None:
        return
    # what loaded is still coherent: every route names a known upstream and policies
    for route in cfg.routes:
        assert route.upstream in cfg.upstreams
        assert set(route.rate_limits) <= set(cfg.rate_limit.policies)


@FUZZ
@given(st.text(max_size=300))
def test_any_text_loads_or_fails_with_a_config_error(text: str) -> None:
    _load(text)


YAML_TOKENS = st.sampled_from(
    [
        ": ",
        "- ",
        "\n",
        "  ",
        "{",
        "}",
        "[",
        "]",
        ",",
        "&a ",
        "*a",
        "!!python/object:os.system",
        "!!binary ",
        "? ",
        "|",
        ">",
        "'",
        '"',
        "#",
        "%YAML 1.2\n",
        "---\n",
        "...\n",
        "<<: *a",
        "listen",
        "routes",
        "port",
        "8000",
        "1e999",
        "0x1F",
        "~",
        "null",
        "yes",
        "no",
        "\t",
        "\x00",
        "\ufeff",
        "upstreams",
        "url",
        "http://x",
        "policies",
        "requests",
    ]
)


@FUZZ
@given(st.lists(YAML_TOKENS, max_size=40).map("".join))
def test_yaml_shaped_text_loads_or_fails_with_a_config_error(text: str) -> None:
    _load(text)


def test_yaml_tags_never_build_python_objects() -> None:
    with pytest.raises(ConfigError):
        load_text("listen: !!python/object/apply:os.system ['true']\n", environ={})


def test_a_billion_laughs_is_refused_or_bounded() -> None:
    """Aliases expand in memory: a nested alias bomb must not hang or exhaust the loader."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    with pytest.raises(ConfigError):
        load_text("\n".join(lines) + "\n", environ={})


# --------------------------------------------------------------------------- valid mutations

NAMES = st.from_regex(r"\A[a-z][a-z0-9-]{0,15}\Z")
SECONDS = st.floats(min_value=0.001, max_value=86_400, allow_nan=False, allow_infinity=False)
PREFIXES = st.from_regex(r"\A/[a-z0-9/_-]{0,20}\Z")


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    upstreams = draw(st.lists(NAMES, min_size=1, max_size=3, unique=True))
    policies = draw(st.lists(NAMES, min_size=0, max_size=4, unique=True))
    cfg: dict[str, Any] = {
        "listen": {"port": draw(st.integers(1, 65535))},
        "upstreams": {
            name: {
                "url": f"http://127.0.0.1:{draw(st.integers(1, 65535))}",
                "timeout_s": draw(SECONDS),
                "max_connections": draw(st.integers(1, 10_000)),
                "circuit_breaker": {
                    "consecutive_failures": draw(st.integers(1, 100)),
                    "failure_ratio": draw(st.floats(0.01, 1.0)),
                    "open_s": draw(SECONDS),
                },
            }
            for name in upstreams
        },
        "rate_limit": {
            "policies": {
                name: {
                    "requests": draw(st.integers(1, 10**6)),
                    "period_s": draw(SECONDS),
                    "burst": draw(st.none() | st.integers(1, 10**6)),
                    "key": draw(st.sampled_from(["ip", "route", "ip_route", "header:X-Key"])),
                    "mode": draw(st.sampled_from(["enforce", "shadow"])),
                }
                for name in policies
            }
        },
        "trusted_proxies": [
            str(ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}"))
            for ip in draw(st.lists(st.ip_addresses(), max_size=3))
        ],
        "request": {
            "max_body_bytes": draw(st.integers(0, 2**40)),
            "max_header_bytes": draw(st.integers(1024, 1_048_576)),
            "client_timeout_s": draw(SECONDS),
            "request_id_header": draw(st.from_regex(r"\AX-[A-Za-z0-9-]{1,20}\Z")),
        },
    }
    cfg["admin"] = {"port": cfg["listen"]["port"] % 65535 + 1}
    cfg["routes"] = [
        {
            "name": f"r{i}",
            "path_prefix": draw(PREFIXES),
            "upstream": draw(st.sampled_from(upstreams)),
            "rate_limits": draw(st.lists(st.sampled_from(policies), unique=True))
            if policies
            else [],
        }
        for i in range(draw(st.integers(1, 4)))
    ]
    return cfg


@FUZZ
@given(valid_configs())
def test_valid_configs_load_with_their_values(data: dict[str, Any]) -> None:
    settings_ = load_text(yaml.safe_dump(data), environ={})
    cfg = settings_.config
    assert [r.name for r in cfg.routes] == [r["name"] for r in data["routes"]]
    for name, pol in data["rate_limit"]["policies"].items():
        got = cfg.rate_limit.policies[name]
        assert got.requests == pol["requests"]
        assert got.period_s == pytest.approx(pol["period_s"])
        assert got.effective_burst == (pol["burst"] or pol["requests"])
    assert {str(n) for n in cfg.trusted_proxies} == set(data["trusted_proxies"])


@FUZZ
@given(valid_configs())
def test_the_effective_config_reloads_to_itself(data: dict[str, Any]) -> None:
    """What /admin/config shows (the dump) is itself a valid config meaning the same."""
    cfg = load_text(yaml.safe_dump(data), environ={}).config
    dumped = cfg.model_dump(mode="json")
    again = load_text(yaml.safe_dump(dumped), environ={}).config
    assert again == cfg


@FUZZ
@given(valid_configs(), st.sampled_from(string.ascii_lowercase))
def test_an_unknown_key_anywhere_is_refused(data: dict[str, Any], letter: str) -> None:
    typo = _replace(data, ("rate_limit", "polices" + letter), {})
    with pytest.raises(ConfigError) as info:
        load_text(yaml.safe_dump(typo), environ={})
    assert any("rate_limit.polices" in str(p) for p in info.value.problems)
