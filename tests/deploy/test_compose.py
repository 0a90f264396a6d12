"""compose.yaml: valid against the Compose Specification, and a faithful local copy of the pod.

The Compose Specification's JSON Schema is the one check-jsonschema ships
(check_jsonschema/builtin_schemas/vendor/compose-spec.json): nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import copy
import http.client
import importlib
import importlib.resources
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_file
from tests.conftest import free_port
from tests.deploy.support import REFERENCE_CONFIG, ROOT, env_names

COMPOSE = ROOT / "compose.yaml"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (test extra)")
    jsonschema = importlib.import_module("jsonschema")  # installed with check-jsonschema

    text = (
        importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
        .joinpath("compose-spec.json")
        .read_text(encoding="utf-8")
    )
    schema = json.loads(text)
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


def test_compose_file_matches_the_compose_specification() -> None:
    assert _schema_errors(_compose()) == []


def test_schema_check_catches_a_typo() -> None:
    broken = copy.deepcopy(_compose())
    broken["services"]["gateway"]["healtcheck"] = broken["services"]["gateway"].pop("healthcheck")
    assert _schema_errors(broken)


def test_gateway_service_runs_the_reference_config_like_the_pod() -> None:
    compose = _compose()
    gw = compose["services"]["gateway"]
    assert gw["build"]["context"] == "."
    assert gw["build"]["target"] == "runtime"
    (mount,) = [v for v in gw["volumes"] if v["target"] == "/etc/gateway"]
    assert mount["type"] == "bind"
    assert mount["read_only"] is True
    # A directory, as the ConfigMap: a single-file bind mount would not follow edits.
    source = (ROOT / mount["source"]).resolve()
    assert source.is_dir()
    config_arg = gw["command"][gw["command"].index("--config") + 1]
    assert config_arg.startswith("/etc/gateway/")
    assert (source / config_arg.removeprefix("/etc/gateway/")).resolve() == REFERENCE_CONFIG
    cfg = load_file(REFERENCE_CONFIG, environ={}).config
    assert env_names(cfg) <= set(gw["environment"])
    published = {str(p).rsplit(":", 1)[-1] for p in gw["ports"]}
    assert published == {str(cfg.listen.port), str(cfg.admin.port)}
    assert gw["read_only"] is True
    assert gw["user"] == "10001:10001"
    assert gw["cap_drop"] == ["ALL"]
    assert "/tmp" in gw["tmpfs"]


def test_applications_share_the_gateway_loopback_on_the_configured_ports() -> None:
    compose = _compose()
    cfg = load_file(REFERENCE_CONFIG, environ={}).config
    for name, upstream in cfg.upstreams.items():
        svc = compose["services"][name]
        assert svc["network_mode"] == "service:gateway"
        assert "ports" not in svc
        port = upstream.url.rsplit(":", 1)[-1]
        assert upstream.url == f"http://127.0.0.1:{port}"
        assert svc["command"] == [name, port]
    gw = compose["services"]["gateway"]
    for dep in ("redis", "postgres"):
        assert "healthcheck" in compose["services"][dep]
        assert gw["depends_on"][dep]["condition"] == "service_healthy"
    assert gw["environment"]["GATEWAY_REDIS_URL"].startswith("redis://redis:6379/")
    assert "@postgres:5432/" in gw["environment"]["GATEWAY_DATABASE_URL"]


def _request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_upstream_stand_in_serves_health_and_echoes(tmp_path: Path) -> None:
    script = tmp_path / "upstream.py"
    script.write_text(_compose()["configs"]["upstream-standin"]["content"])
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(script), "api", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                status, health = _request(port, "GET", "/health")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        assert (status, health) == (200, {"status": "ok", "upstream": "api"})
        status, echo = _request(port, "PUT", "/v1/things?x=1", b"hello")
        assert status == 200
        assert echo["upstream"] == "api"
        assert echo["method"] == "PUT"
        assert echo["path"] == "/v1/things?x=1"
        assert echo["body_bytes"] == 5
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


async def test_postgres_init_supports_the_configured_database_checks(pg_dsn: str) -> None:
    """The init SQL and every database check of config/gateway.yaml, on real PostgreSQL,
    in a transaction that is rolled back (nothing is left behind)."""
    asyncpg = pytest.importorskip("asyncpg")
    db = load_file(REFERENCE_CONFIG, environ={}).config.database
    assert db is not None
    init_sql = _compose()["configs"]["postgres-init"]["content"]
    try:
        conn = await asyncio.wait_for(asyncpg.connect(pg_dsn), 5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL at {pg_dsn} is not usable: {exc}")
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            role = "deploy_test_gateway_ro"
            await conn.execute(
                "CREATE SCHEMA deploy_test_compose; SET LOCAL search_path = deploy_test_compose"
            )
            await conn.execute(init_sql.replace("gateway_ro", role))
            await conn.execute(
                "INSERT INTO outbox (processed_at, failed_at) VALUES"
                " (NULL, NULL), (NULL, NULL), (now(), NULL), (NULL, now())"
            )
            # The checks run as the read-only role the gateway is given.
            await conn.execute(f"GRANT USAGE ON SCHEMA deploy_test_compose TO {role}")
            await conn.execute(f"SET LOCAL ROLE {role}")
            for table in db.required_tables:
                assert await conn.fetchval("SELECT to_regclass($1)", table) is not None, table
            results = {c.name: await conn.fetchval(c.query) for c in db.checks}
            assert results == {"notification_queue": 3, "failed_notifications": 1}
        finally:
            await tx.rollback()
    finally:
        await conn.close()
