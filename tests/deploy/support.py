"""Shared helpers of the deployment tests: rendering, looking objects up, the exported metrics."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Config, Settings, load_file, load_text, risky_settings
from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("staging", "production")
REFERENCE_CONFIG = ROOT / "config" / "gateway.yaml"
POD_CONFIGS = {
    "api": K8S / "base" / "gateway" / "api.yaml",
    "bot": K8S / "base" / "gateway" / "bot.yaml",
}
SECRET_TEMPLATE = K8S / "secret.example.yaml"
DASHBOARD = K8S / "base" / "dashboards" / "gateway.json"
PROBE_PATHS = frozenset({"/livez", "/readyz", "/startupz", "/healthz"})
KUBERNETES_VERSION = "1.32.0"  # the oldest version the manifests support (preStop sleep)

Obj = dict[str, Any]


# --------------------------------------------------------------------------- tools


def tool(name: str) -> str | None:
    """A command from PATH or from the virtualenv running the tests."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def require_tool(name: str, install: str) -> str:
    exe = tool(name)
    if exe is None:
        pytest.skip(f"{name} is not installed ({install})")
    return exe


# --------------------------------------------------------------------------- secrets


def secret_template() -> Obj:
    doc: Obj = yaml.safe_load(SECRET_TEMPLATE.read_text(encoding="utf-8"))
    return doc


def secret_env() -> dict[str, str]:
    """The environment a pod gets from the Secret (placeholder values of the template)."""
    data = secret_template()["stringData"]
    return {str(k): str(v) for k, v in data.items()}


# --------------------------------------------------------------------------- configs


def env_names(cfg: Config) -> set[str]:
    """Every environment variable a config reads."""
    names = {cfg.rate_limit.redis_url_env}
    if cfg.admin.token_env:
        names.add(cfg.admin.token_env)
    if cfg.database is not None:
        names.add(cfg.database.dsn_env)
    names.update(r.shared_secret.value_env for r in cfg.routes if r.shared_secret is not None)
    return names


def load(path: Path, environ: Mapping[str, str]) -> Settings:
    return load_file(path, environ=environ)


def check_config_strict(path: Path, environ: Mapping[str, str]) -> tuple[bool, str]:
    """`gateway check-config --strict PATH` when the command exists, else the same checks
    through gateway.config (validation, unset variables and risky settings)."""
    if importlib.util.find_spec("gateway.cli") is not None:
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", "check-config", "--strict", str(path)],
            env={"PATH": "/usr/bin:/bin", **environ},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return proc.returncode == 0, proc.stdout + proc.stderr
    settings = load_file(path, environ=environ)
    problems = [str(w) for w in settings.warnings] + [
        str(p) for p in risky_settings(settings.config)
    ]
    return not problems, "\n".join(problems)


# --------------------------------------------------------------------------- manifests


def render(overlay: str) -> list[Obj]:
    kubectl = require_tool("kubectl", "kubectl with its built-in kustomize is needed")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
    assert docs, f"overlay {overlay} rendered nothing"
    return docs


def objects(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Obj], kind: str, name: str) -> Obj:
    found = [d for d in objects(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for dep in objects(docs, "Deployment"):
        yield dep["metadata"]["name"], dep["spec"]["template"]["spec"]


def container(pod: Obj, name: str) -> Obj:
    found: list[Obj] = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, f"no single container {name!r} in {pod['containers']}"
    return found[0]


def gateway_container(pod: Obj) -> Obj:
    return container(pod, "gateway")


def resolve_port(cont: Obj, port: int | str) -> int:
    """A probe / Service / policy port (a number or a container port name) as a number."""
    if isinstance(port, int):
        return port
    for p in cont.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    msg = f"container {cont['name']} has no port named {port!r}"
    raise AssertionError(msg)


def config_path(cont: Obj) -> str:
    args = list(cont.get("command", [])) + list(cont.get("args", []))
    assert "--config" in args, f"the gateway is not started with --config: {args}"
    return str(args[args.index("--config") + 1])


def mounted_config(docs: list[Obj], pod: Obj) -> tuple[Obj, str, Obj]:
    """(volume mount, key, ConfigMap) holding the file the gateway container is started with."""
    gw = gateway_container(pod)
    path = config_path(gw)
    for mount in gw.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert "configMap" in volume, f"{mount['mountPath']} is not a ConfigMap volume"
        cm = named(docs, "ConfigMap", volume["configMap"]["name"])
        return mount, path[len(prefix) :], cm
    msg = f"{path} is on no volume of the gateway container"
    raise AssertionError(msg)


def pod_settings(docs: list[Obj], pod: Obj) -> Settings:
    _, key, cm = mounted_config(docs, pod)
    return load_text(
        cm["data"][key], source=f"ConfigMap {cm['metadata']['name']}", environ=secret_env()
    )


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------- metrics


def exported_metric_names() -> set[str]:
    """Every series name the gateway exports (histograms: _bucket, _sum, _count)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


_METRIC_RE = re.compile(r"\bgateway_[a-z_]+\b")
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')


def metric_names_in(expr: str) -> set[str]:
    """The gateway_* metric names a PromQL expression refers to (label values left out)."""
    return set(_METRIC_RE.findall(_STRING_RE.sub('""', expr)))
