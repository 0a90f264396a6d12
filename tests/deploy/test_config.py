"""The shipped gateway configs: valid, not risky, and saying what the operators asked for."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Config, load_file
from tests.deploy.support import (
    POD_CONFIGS,
    REFERENCE_CONFIG,
    check_config_strict,
    env_names,
    secret_env,
)

ALL_CONFIGS = [REFERENCE_CONFIG, *POD_CONFIGS.values()]
TELEGRAM = {ipaddress.ip_network("149.154.160.0/20"), ipaddress.ip_network("91.108.4.0/22")}


def _id(path: Path) -> str:
    return str(path.relative_to(REFERENCE_CONFIG.parents[1]))


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_id)
def test_config_is_valid_and_not_risky_once_the_secret_is_set(path: Path) -> None:
    ok, output = check_config_strict(path, secret_env())
    assert ok, output


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_id)
def test_secret_template_fills_every_variable_the_config_reads(path: Path) -> None:
    cfg = load_file(path, environ={}).config
    assert env_names(cfg) <= set(secret_env())


def test_without_secrets_only_the_unset_variables_are_reported() -> None:
    settings = load_file(REFERENCE_CONFIG, environ={})
    assert {w.path for w in settings.warnings} == {
        "admin.token_env",
        "rate_limit.redis_url_env",
        "database.dsn_env",
        "routes[0].shared_secret.value_env",
    }
    # The only risky one is the admin token, which the Secret provides.
    assert [w.path for w in settings.warnings if w.risky] == ["admin.token_env"]


def _reference() -> Config:
    return load_file(REFERENCE_CONFIG, environ=secret_env()).config


def test_bot_route_admits_telegram_posts_with_the_shared_secret_only() -> None:
    cfg = _reference()
    route = next(r for r in cfg.routes if r.upstream == "bot")
    assert route.path_prefix == "/bot/"
    assert route.methods == ("POST",)
    assert set(route.source_cidrs or ()) == TELEGRAM
    assert route.shared_secret is not None
    assert route.shared_secret.header == "X-Telegram-Bot-Api-Secret-Token"
    assert route.shared_secret.value_env == "BOT_WEBHOOK_SECRET"
    # First match wins: the bot route must come before the catch-all API route.
    assert cfg.routes.index(route) < next(
        i for i, r in enumerate(cfg.routes) if r.path_prefix == "/"
    )


def test_api_route_limits_bursts_and_shadows_the_hourly_budget() -> None:
    cfg = _reference()
    route = next(r for r in cfg.routes if r.upstream == "api")
    assert route.rate_limits == ("per-ip-burst", "per-ip-hourly")
    policies = cfg.rate_limit.policies
    assert policies["per-ip-burst"].key == policies["per-ip-hourly"].key == "ip"
    assert policies["per-ip-burst"].mode == "enforce"
    assert policies["per-ip-hourly"].mode == "shadow"
    assert cfg.rate_limit.backend == "redis"
    assert cfg.rate_limit.on_backend_error != "allow"


def test_upstreams_are_the_pod_loopback_ports() -> None:
    cfg = _reference()
    assert {n: u.url for n, u in cfg.upstreams.items()} == {
        "api": "http://127.0.0.1:8080",
        "bot": "http://127.0.0.1:8081",
    }
    assert all(u.health.critical for u in cfg.upstreams.values())


def test_database_thresholds() -> None:
    db = _reference().database
    assert db is not None
    assert db.degraded_latency_ms == 100
    assert not db.critical
    checks = {c.name: c for c in db.checks}
    queue = checks["notification_queue"]
    assert queue.query == "SELECT count(*) FROM outbox WHERE processed_at IS NULL"
    assert (queue.degraded_above, queue.unhealthy_above) == (100, 1000)
    assert checks["failed_notifications"].degraded_above == 10


def test_drain_and_network_settings() -> None:
    cfg = _reference()
    assert (cfg.drain.delay_s, cfg.drain.timeout_s) == (5, 25)
    assert cfg.trusted_proxies, "trusted_proxies must name the ingress range"
    assert all(n.prefixlen > 0 for n in cfg.trusted_proxies)
    assert cfg.allow_cidrs
    assert not cfg.metrics.on_proxy_port
    assert cfg.security_headers.enabled


# --------------------------------------------------------------------------- pod configs


def _raw(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def _dump(path: Path) -> dict[str, Any]:
    return load_file(path, environ=secret_env()).config.model_dump(mode="json")


@pytest.mark.parametrize("upstream", sorted(POD_CONFIGS))
def test_pod_config_is_the_reference_restricted_to_its_upstream(upstream: str) -> None:
    ref, pod = _dump(REFERENCE_CONFIG), _dump(POD_CONFIGS[upstream])
    # Everything that is not about one upstream is identical.
    for key in ref.keys() - {"upstreams", "routes", "rate_limit"}:
        assert pod[key] == ref[key], f"{key} differs from config/gateway.yaml"
    ref_rl = {k: v for k, v in ref["rate_limit"].items() if k != "policies"}
    pod_rl = {k: v for k, v in pod["rate_limit"].items() if k != "policies"}
    assert pod_rl == ref_rl
    # Its upstream, its routes and their policies, taken from the reference unchanged.
    assert pod["upstreams"] == {upstream: ref["upstreams"][upstream]}
    routes = [r for r in ref["routes"] if r["upstream"] == upstream]
    assert pod["routes"] == routes
    used = {p for r in routes for p in r["rate_limits"]}
    assert pod["rate_limit"]["policies"] == {p: ref["rate_limit"]["policies"][p] for p in used}
    # And the file gives the same sections as the reference (no default left implicit
    # in one file and spelled out in the other).
    assert _raw(POD_CONFIGS[upstream]).keys() == _raw(REFERENCE_CONFIG).keys()
