"""Alerts and dashboard: valid PromQL, only metrics the gateway exports, alerts that fire.

promtool comes from Debian's `prometheus` package (apt-get install prometheus); without it
the promtool tests skip and the metric-name tests still run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import (
    DASHBOARD,
    K8S,
    exported_metric_names,
    metric_names_in,
    require_tool,
)

RULE_TESTS = Path(__file__).with_name("alerts_test.yaml")
PROMTOOL_INSTALL = "apt-get install prometheus (Debian) provides promtool"


def _rule_spec() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    spec: dict[str, Any] = doc["spec"]
    return spec


def _alerts() -> list[dict[str, Any]]:
    return [r for g in _rule_spec()["groups"] for r in g["rules"]]


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _dashboard_exprs() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for panel in _dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        out[panel["title"]] = [t["expr"] for t in panel["targets"]]
    return out


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = require_tool("promtool", PROMTOOL_INSTALL)
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# --------------------------------------------------------------------------- alerts


def test_alert_rules_pass_promtool_check(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rule_spec()))
    proc = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in proc.stdout


def test_alerts_fire_on_the_series_the_gateway_exports(tmp_path: Path) -> None:
    spec = _rule_spec()
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # templates: checked by promtool check rules
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    shutil.copy(RULE_TESTS, tmp_path / "alerts_test.yaml")
    proc = _promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test() -> None:
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert {a["alert"] for a in _alerts()} <= tested


def test_alerts_use_only_exported_metrics() -> None:
    exported = exported_metric_names()
    for alert in _alerts():
        used = metric_names_in(alert["expr"])
        if not used:  # the scrape itself: Prometheus' `up` of the metrics Service's job
            assert alert["expr"].strip() == 'up{job="gateway-metrics"} == 0', alert["alert"]
            continue
        assert used <= exported, f"{alert['alert']}: unknown {sorted(used - exported)}"


@pytest.mark.parametrize(
    ("concern", "pattern"),
    [
        ("breaker open", r"gateway_circuit_state\{[^}]*state"),
        ("429 ratio", r'code="429"'),
        ("5xx ratio", r'code=~"5\.\."'),
        ("critical component unhealthy", r'gateway_health_status\{component=~"upstream:'),
        ("config reload failing", r'gateway_config_reloads_total\{result="failure"\}'),
        ("redis backend errors", r"gateway_ratelimit_backend_errors_total"),
    ],
)
def test_required_alert_exists(concern: str, pattern: str) -> None:
    assert any(re.search(pattern, a["expr"]) for a in _alerts()), concern


def test_metric_name_parser_ignores_label_values() -> None:
    expr = 'rate(gateway_requests_total{route="gateway_not_a_metric"}[5m])'
    assert metric_names_in(expr) == {"gateway_requests_total"}


def test_exported_names_cover_histogram_series() -> None:
    exported = exported_metric_names()
    assert "gateway_request_duration_seconds_bucket" in exported
    assert "gateway_requests_total" in exported
    assert "gateway_request_duration_seconds" not in exported


# --------------------------------------------------------------------------- dashboard


def test_dashboard_uses_only_exported_metrics() -> None:
    exported = exported_metric_names()
    for title, exprs in _dashboard_exprs().items():
        for expr in exprs:
            used = metric_names_in(expr)
            assert used, f"panel {title!r}: {expr}"
            assert used <= exported, f"panel {title!r}: unknown {sorted(used - exported)}"


def _concrete(expr: str) -> str:
    """A Grafana query as plain PromQL: variables replaced by what Grafana would put there."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query:{i}", "expr": _concrete(expr)}
        for i, expr in enumerate(e for exprs in _dashboard_exprs().values() for e in exprs)
    ]
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    proc = _promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_shows_what_operators_need() -> None:
    exprs = [e for es in _dashboard_exprs().values() for e in es]
    joined = "\n".join(exprs)
    assert re.search(r"sum by \(route\) \(rate\(gateway_requests_total", joined)
    assert re.search(r"sum by \(code\) \(rate\(gateway_requests_total", joined)
    quantile = (
        "histogram_quantile({}, sum by (le, route) (rate(gateway_request_duration_seconds_bucket"
    )
    for q in ("0.5", "0.9", "0.99"):
        assert quantile.format(q) in joined
    for metric in (
        "gateway_ratelimit_decisions_total",
        "gateway_bans_total",
        "gateway_active_bans",
        "gateway_circuit_state",
        "gateway_health_status",
    ):
        assert metric in joined, metric


def test_dashboard_is_importable() -> None:
    dash = _dashboard()
    assert dash["uid"]
    assert dash["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "app"} <= variables
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0
        assert pos["x"] + pos["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            for target in panel["targets"]:
                # Every query follows the dashboard's namespace and app selectors.
                assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
                assert 'app=~"$app"' in target["expr"], panel["title"]
