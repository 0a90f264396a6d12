"""The kustomize overlays: they build, every object is valid, and the pieces fit the gateway.

Built objects are validated against the Kubernetes OpenAPI schemas of KUBERNETES_VERSION
(kubernetes-validate, strict: unknown fields are errors). The prometheus-operator kinds
(ServiceMonitor, PrometheusRule) are custom resources the package has no schema for: they
are checked structurally here, and their rules by promtool in test_observability.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.support import (
    KUBERNETES_VERSION,
    OVERLAYS,
    PROBE_PATHS,
    SECRET_TEMPLATE,
    Obj,
    config_path,
    container,
    env_names,
    gateway_container,
    mounted_config,
    named,
    objects,
    pod_settings,
    pod_specs,
    render,
    resolve_port,
    secret_env,
    secret_template,
    selects,
)

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
EXPECTED_KINDS = {
    "Namespace",
    "ServiceAccount",
    "ConfigMap",
    "Service",
    "Deployment",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
    *CRD_KINDS,
}
APPS = ("api", "bot")


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    name: str = request.param
    return name, render(name)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    return {name: render(name) for name in OVERLAYS}


# --------------------------------------------------------------------------- schemas


def test_overlay_renders_the_expected_kinds_in_one_namespace(
    overlay: tuple[str, list[Obj]],
) -> None:
    name, docs = overlay
    assert {d["kind"] for d in docs} == EXPECTED_KINDS
    ns = named(docs, "Namespace", f"mobile-{name}")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == f"mobile-{name}", d["metadata"]["name"]
    # The Secret is created out of band: no overlay may ship the placeholder values.
    assert not objects(docs, "Secret")


def test_every_builtin_object_is_valid_for_the_pinned_kubernetes(
    overlay: tuple[str, list[Obj]],
) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (test extra)"
    )
    _, docs = overlay
    checked = 0
    for d in docs:
        if d["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(d, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{d['kind']} {d['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked == len(docs) - len(CRD_KINDS)


def test_secret_template_is_a_valid_secret() -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (test extra)"
    )
    kv.validate(secret_template(), KUBERNETES_VERSION, strict=True)


_DURATION = re.compile(r"^([0-9]+(ms|s|m|h))+$")


def test_service_monitor_structure(overlay: tuple[str, list[Obj]]) -> None:
    _, docs = overlay
    (sm,) = objects(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    spec = sm["spec"]
    assert set(spec) <= {
        "selector",
        "endpoints",
        "podTargetLabels",
        "namespaceSelector",
        "jobLabel",
    }
    assert spec["selector"]["matchLabels"]
    assert spec["endpoints"]
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert isinstance(ep["port"], str)
        assert ep["path"] == "/metrics"
        assert ep.get("scheme", "http") == "http"
        assert _DURATION.match(ep["interval"])
        assert _DURATION.match(ep["scrapeTimeout"])
    assert isinstance(spec.get("podTargetLabels", []), list)


def test_prometheus_rule_structure(overlay: tuple[str, list[Obj]]) -> None:
    _, docs = overlay
    (rule,) = objects(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    names = []
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        assert group["name"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
            assert isinstance(r["expr"], str)
            assert r["expr"].strip()
            if "for" in r:
                assert _DURATION.match(r["for"])
            assert r["labels"]["severity"] in {"critical", "warning", "info"}
            assert set(r["annotations"]) >= {"summary", "description", "runbook"}
            assert all(v.strip() for v in r["annotations"].values())
            names.append(r["alert"])
    assert len(names) == len(set(names)), "duplicate alert names"


# --------------------------------------------------------------------------- the gateway config


def test_mounted_config_passes_the_gateway_validation(overlay: tuple[str, list[Obj]]) -> None:
    _, docs = overlay
    for app, pod in pod_specs(docs):
        settings = pod_settings(docs, pod)
        assert settings.warnings == (), f"{app}: {[str(w) for w in settings.warnings]}"
        assert set(settings.config.upstreams) == {app}


def test_config_is_mounted_as_a_directory_that_reload_can_follow(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, docs = overlay
    for app, pod in pod_specs(docs):
        mount, key, cm = mounted_config(docs, pod)
        assert "subPath" not in mount, f"{app}: a subPath mount never sees ConfigMap updates"
        assert "subPathExpr" not in mount
        assert mount["mountPath"] == "/etc/gateway"
        assert mount.get("readOnly") is True
        assert "/" not in key
        assert key in cm["data"]
        assert config_path(gateway_container(pod)) == "/etc/gateway/gateway.yaml"
        # The ConfigMap keeps its name across changes, so it is updated in place (reload)
        # rather than replaced by a hashed copy (rollout).
        assert cm["metadata"]["name"] == f"{app}-gateway-config"


def test_gateway_gets_every_variable_its_config_reads_from_the_secret(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, docs = overlay
    template = secret_template()
    keys = set(template["stringData"])
    for app, pod in pod_specs(docs):
        settings = pod_settings(docs, pod)
        env = {e["name"]: e for e in gateway_container(pod).get("env", [])}
        for name in env_names(settings.config):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == template["metadata"]["name"], f"{app}: {name}"
            assert ref["key"] in keys, f"{app}: {name}"
        for cont in pod["containers"]:
            for e in cont.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == template["metadata"]["name"]
                    assert ref["key"] in keys, f"{app}/{cont['name']}: {ref['key']}"
    assert SECRET_TEMPLATE.exists()
    assert set(secret_env()) == keys


# --------------------------------------------------------------------------- probes and ports


def test_probes_use_the_gateway_endpoints_on_its_listen_port(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, docs = overlay
    for app, pod in pod_specs(docs):
        cfg = pod_settings(docs, pod).config
        gw = gateway_container(pod)
        expected = {
            "startupProbe": "/startupz",
            "livenessProbe": "/livez",
            "readinessProbe": "/readyz",
        }
        for probe, path in expected.items():
            get = gw[probe]["httpGet"]
            assert get["path"] == path, f"{app}.{probe}"
            assert get["path"] in PROBE_PATHS
            assert resolve_port(gw, get["port"]) == cfg.listen.port, f"{app}.{probe}"
            assert gw[probe]["timeoutSeconds"] <= gw[probe]["periodSeconds"]
        # A slow start is the startup probe's business; liveness only restarts a stuck loop.
        startup = gw["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
        live = gw["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= cfg.liveness.max_event_loop_lag_s
        ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
        assert ports == {"http": cfg.listen.port, "admin": cfg.admin.port}
        # The application declares no port: it listens on loopback, behind the gateway,
        # and has no probe of its own (the gateway's readiness covers it).
        for cont in pod["containers"]:
            if cont["name"] != "gateway":
                assert "ports" not in cont
                assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(cont)


def test_services_expose_the_gateway_port_and_metrics_the_admin_port(
    overlay: tuple[str, list[Obj]],
) -> None:
    _, docs = overlay
    pods = dict(pod_specs(docs))
    deployments = {d["metadata"]["name"]: d for d in objects(docs, "Deployment")}
    for app in APPS:
        svc = named(docs, "Service", app)
        labels = deployments[app]["spec"]["template"]["metadata"]["labels"]
        assert selects(svc["spec"]["selector"], labels)
        cfg = pod_settings(docs, pods[app]).config
        (port,) = svc["spec"]["ports"]
        assert resolve_port(gateway_container(pods[app]), port["targetPort"]) == cfg.listen.port
    # ServiceMonitor -> metrics Service port -> the admin port of every gateway pod.
    (sm,) = objects(docs, "ServiceMonitor")
    metrics_svcs = [
        s
        for s in objects(docs, "Service")
        if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))
    ]
    assert len(metrics_svcs) == 1
    msvc = metrics_svcs[0]
    assert msvc["spec"]["clusterIP"] == "None"
    # The scrape job is named after the Service: GatewayMetricsDown matches on it.
    assert msvc["metadata"]["name"] == "gateway-metrics"
    assert "jobLabel" not in sm["spec"]
    for ep in sm["spec"]["endpoints"]:
        (sport,) = [p for p in msvc["spec"]["ports"] if p["name"] == ep["port"]]
        for app in APPS:
            labels = deployments[app]["spec"]["template"]["metadata"]["labels"]
            assert selects(msvc["spec"]["selector"], labels), f"metrics Service misses {app}"
            cfg = pod_settings(docs, pods[app]).config
            assert resolve_port(gateway_container(pods[app]), sport["targetPort"]) == cfg.admin.port
    for label in sm["spec"].get("podTargetLabels", []):
        for app in APPS:
            assert label in deployments[app]["spec"]["template"]["metadata"]["labels"]


def test_network_policy_admits_only_the_gateway_ports(overlay: tuple[str, list[Obj]]) -> None:
    _, docs = overlay
    (policy,) = objects(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    for app, pod in pod_specs(docs):
        dep = named(docs, "Deployment", app)
        assert selects(
            spec["podSelector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"]
        )
        cfg = pod_settings(docs, pod).config
        gw = gateway_container(pod)
        opened: dict[int, list[Any]] = {}
        for rule in spec["ingress"]:
            assert rule.get("ports"), "a rule without ports would open every port"
            for p in rule["ports"]:
                opened.setdefault(resolve_port(gw, p["port"]), []).append(rule.get("from"))
        assert set(opened) == {cfg.listen.port, cfg.admin.port}
        admin_from = opened[cfg.admin.port]
        assert admin_from == [
            [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        ]


# --------------------------------------------------------------------------- hardening


def test_pods_are_hardened(overlay: tuple[str, list[Obj]]) -> None:
    _, docs = overlay
    (sa,) = objects(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    for app, pod in pod_specs(docs):
        assert pod["serviceAccountName"] == sa["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert isinstance(psc["runAsUser"], int)
        assert psc["runAsUser"] > 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        tmp_volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for cont in pod["containers"]:
            sc = cont["securityContext"]
            where = f"{app}/{cont['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc.get("runAsNonRoot", True) is True, where
            assert sc.get("privileged", False) is False, where
            tmp = [m for m in cont["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1, f"{where}: /tmp must be an emptyDir"
            assert tmp[0]["name"] in tmp_volumes, where
            assert cont["resources"]["requests"]["cpu"], where
            assert cont["resources"]["requests"]["memory"], where
            assert cont["resources"]["limits"]["memory"], where
        gw = gateway_container(pod)
        assert gw["securityContext"]["runAsUser"] == 10001
        assert "command" not in gw, "the image's exec-form ENTRYPOINT must stay PID 1"


def test_images_are_set_per_overlay(rendered: dict[str, list[Obj]]) -> None:
    images: dict[str, set[str]] = {}
    for name, docs in rendered.items():
        for _, pod in pod_specs(docs):
            for cont in pod["containers"]:
                image = cont["image"]
                assert "/" in image, f"{name}: {image} has no registry"
                assert re.search(r":[\w.-]+$|@sha256:[0-9a-f]{64}$", image), f"{name}: {image}"
                assert not image.endswith(":latest")
                images.setdefault(name, set()).add(image)
    assert images["staging"] != images["production"]


# --------------------------------------------------------------------------- rollout


def test_shutdown_timeline_drops_no_request(overlay: tuple[str, list[Obj]]) -> None:
    _, docs = overlay
    for app, pod in pod_specs(docs):
        drain = pod_settings(docs, pod).config.drain
        gateway_exit = drain.delay_s + drain.timeout_s  # the gateway is gone by then
        gw = gateway_container(pod)
        # The gateway takes SIGTERM at once: its own drain.delay_s keeps serving while the
        # endpoint removal propagates; a preStop would only postpone its /readyz 503.
        assert "lifecycle" not in gw or "preStop" not in gw["lifecycle"]
        application = container(pod, app)
        sleep = application["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert sleep > gateway_exit, f"{app} would stop while the gateway still forwards to it"
        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= sleep + 10, f"{app}: no time left for the application after its preStop"
        assert grace > gateway_exit
        # The application is listed first and the gateway is a regular container, not an
        # init-container sidecar (which would be stopped after the application).
        assert [c["name"] for c in pod["containers"]] == [app, "gateway"]
        assert not pod.get("initContainers")
        dep = named(docs, "Deployment", app)
        strategy = dep["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0
        assert dep["spec"].get("minReadySeconds", 0) > 0


def test_autoscaling_and_disruption_budgets(rendered: dict[str, list[Obj]]) -> None:
    bounds: dict[str, dict[str, tuple[int, int]]] = {}
    for name, docs in rendered.items():
        for app in APPS:
            dep = named(docs, "Deployment", app)
            assert "replicas" not in dep["spec"], f"{name}/{app}: the HPA owns replicas"
            hpa = named(docs, "HorizontalPodAutoscaler", app)
            assert hpa["apiVersion"] == "autoscaling/v2"
            assert hpa["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": app,
            }
            (metric,) = hpa["spec"]["metrics"]
            assert metric["type"] == "Resource"
            assert metric["resource"]["name"] == "cpu"
            lo, hi = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
            assert 2 <= lo <= hi
            bounds.setdefault(name, {})[app] = (lo, hi)
            pdb = named(docs, "PodDisruptionBudget", app)
            labels = dep["spec"]["template"]["metadata"]["labels"]
            assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
            assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    assert bounds["staging"]["api"] == (2, 3)
    assert bounds["production"]["api"][0] > bounds["staging"]["api"][0]
    assert bounds["production"]["api"][1] >= 10
