"""The config contract: defaults, validation errors with field paths, secrets from env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, json_schema, load_default, load_file, load_text
from tests.files import NOT_A_CONFIG, ONE_MIB, make_not_a_config, unblock_fifos

DATA = Path(__file__).parent.parent / "data" / "config"
CASES = sorted(DATA.glob("*.yaml"))
ROOT = Path(__file__).parent.parent.parent
TOKEN = "tok-of-the-admin-port"  # long enough for --strict (16 bytes or more)


def _expected(path: Path) -> list[str]:
    """The ``# expect: `` lines at the top of a case file: every error it must report."""
    lines = path.read_text().splitlines()
    expected = [line[len("# expect: ") :] for line in lines if line.startswith("# expect: ")]
    assert expected
    assert lines[0].startswith("# expect: ")
    return expected


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_each_invalid_file_names_its_field(path: Path) -> None:
    """Every error in one run: type errors and cross-reference errors together."""
    with pytest.raises(ConfigError) as info:
        load_file(path, environ={})
    messages = [str(p) for p in info.value.problems]
    missing = [e for e in _expected(path) if e not in messages]
    assert missing == [], messages


def test_empty_file_means_the_documented_defaults() -> None:
    s = load_text("", environ={})
    cfg = s.config
    assert (cfg.listen.host, cfg.listen.port) == ("0.0.0.0", 8000)
    assert cfg.admin.port == 9901
    assert list(cfg.upstreams) == ["api"]
    assert cfg.upstreams["api"].url == "http://127.0.0.1:8080"
    assert [(r.name, r.path_prefix, r.upstream, r.rate_limits) for r in cfg.routes] == [
        ("default", "/", "api", ("per-ip",))
    ]
    p = cfg.rate_limit.policies["per-ip"]
    assert (p.requests, p.period_s, p.burst, p.key, p.mode) == (100, 1, 200, "ip", "enforce")
    assert cfg.rate_limit.backend == "memory"
    assert cfg.request.max_header_bytes == 16384
    assert cfg.security_headers.set["X-Frame-Options"] == "DENY"
    assert cfg.database is None
    assert load_default(environ={}).config == cfg


def test_partial_section_keeps_other_defaults() -> None:
    cfg = load_text("request: {max_body_bytes: 5}\nabuse: {ban_s: 10}", environ={}).config
    assert cfg.request.max_body_bytes == 5
    assert cfg.request.max_header_bytes == 16384
    assert cfg.abuse.ban_s == 10
    assert cfg.abuse.ban_score == 50


def test_policy_burst_defaults_to_requests() -> None:
    cfg = load_text(
        "rate_limit: {policies: {w: {requests: 30, period_s: 1, key: route}}}\n"
        "routes: [{name: r, upstream: api, rate_limits: [w]}]",
        environ={},
    ).config
    assert cfg.rate_limit.policies["w"].effective_burst == 30


def test_config_is_frozen() -> None:
    cfg = load_text("", environ={}).config
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        cfg.listen = cfg.listen  # type: ignore[misc]


def test_env_fields_are_resolved_and_kept_out_of_the_config() -> None:
    text = (
        "routes: [{name: bot, upstream: api, shared_secret: {header: X-S, value_env: BOT_S}}]\n"
        "rate_limit: {backend: redis}\n"
        "database: {}\n"
    )
    env = {
        "BOT_S": "s3cret",
        "GATEWAY_ADMIN_TOKEN": TOKEN,
        "GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0",
        "GATEWAY_DATABASE_URL": "postgresql://x@127.0.0.1/test",
    }
    s = load_text(text, environ=env)
    assert s.secrets.route_secrets == {"bot": b"s3cret"}
    assert s.secrets.admin_token == TOKEN
    assert s.secrets.redis_url == "redis://127.0.0.1:6379/0"
    assert s.secrets.database_dsn == "postgresql://x@127.0.0.1/test"
    dumped = json.dumps(s.config.model_dump(mode="json"))
    assert "s3cret" not in dumped
    assert "tok" not in dumped.replace("token_env", "")
    assert s.warnings == ()


def test_missing_env_values_are_warnings_not_errors() -> None:
    text = "routes: [{name: bot, upstream: api, shared_secret: {header: X-S, value_env: BOT_S}}]"
    s = load_text(text, environ={})
    paths = [w.path for w in s.warnings]
    assert "routes[0].shared_secret.value_env" in paths
    assert "admin.token_env" in paths


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("trusted_proxies: [0.0.0.0/0]", "trusted_proxies[0]"),
        ("trusted_proxies: ['::/0']", "trusted_proxies[0]"),
        ("metrics: {on_proxy_port: true}", "metrics.on_proxy_port"),
        ("security_headers: {enabled: false}", "security_headers.enabled"),
        ("rate_limit: {on_backend_error: allow}", "rate_limit.on_backend_error"),
    ],
)
def test_risky_settings_are_flagged(text: str, path: str) -> None:
    s = load_text(text, environ={"GATEWAY_ADMIN_TOKEN": TOKEN})
    assert [w.path for w in s.warnings if w.risky] == [path]


@pytest.mark.parametrize(
    ("token", "short"),
    [("t", True), ("x" * 15, True), ("x" * 16, False), ("\u00e9" * 8, False)],  # bytes count
)
def test_a_short_admin_token_is_warned_about(token: str, short: bool) -> None:
    s = load_text("", environ={"GATEWAY_ADMIN_TOKEN": token})
    flagged = [w for w in s.warnings if w.path == "admin.token_env"]
    assert [w.risky for w in flagged] == ([False] if short else [])
    if short:
        assert f"{len(token.encode())} bytes" in str(flagged[0])
        assert "16" in str(flagged[0])
        assert len(token) == 1 or token not in str(flagged[0])  # never the token itself


def test_durations_may_be_fractions() -> None:
    cfg = load_text("drain: {delay_s: 0.5}\nreload: {interval_s: 0.25}", environ={}).config
    assert cfg.drain.delay_s == 0.5
    assert cfg.reload.interval_s == 0.25


def test_published_schema_is_current() -> None:
    path = ROOT / "config" / "gateway.schema.json"
    current = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    assert path.read_text() == current, "run: gateway schema > config/gateway.schema.json"


# ------------------------------------------------------------------------- CLI


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def test_check_config_ok_prints_one_summary_line(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("listen: {port: 8001}\n")
    r = _cli("check-config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1
    assert "ok" in r.stdout
    assert "warning: admin.token_env" in r.stderr


def test_check_config_error_exits_2_naming_the_field() -> None:
    r = _cli("check-config", str(DATA / "unknown_upstream.yaml"))
    assert r.returncode == 2
    assert "routes[1].upstream: unknown upstream 'bott'" in r.stderr


def test_check_config_reports_type_and_reference_errors_in_one_run() -> None:
    path = DATA / "type_and_reference_errors.yaml"
    r = _cli("check-config", str(path))
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert lines[0] == f"{path}: invalid config ({len(_expected(path))} error(s))"
    assert [line.strip() for line in lines[1:]] == _expected(path)


def test_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    r = _cli("check-config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert "nope.yaml" in r.stderr


def test_check_config_strict_refuses_risky_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "risky.yaml"
    cfg.write_text("trusted_proxies: [0.0.0.0/0]\n")
    env = {"GATEWAY_ADMIN_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}
    assert _cli("check-config", str(cfg), env=env).returncode == 0
    r = _cli("check-config", "--strict", str(cfg), env=env)
    assert r.returncode == 2
    assert "trusted_proxies[0]" in r.stderr
    ok = tmp_path / "ok.yaml"
    ok.write_text("")
    assert _cli("check-config", "--strict", str(ok), env=env).returncode == 0
    # no admin token is risky too
    assert _cli("check-config", "--strict", str(ok), env={"PATH": "/usr/bin:/bin"}).returncode == 2
    # a short one warns, without failing --strict (not one of SPEC's risky settings)
    short = {"GATEWAY_ADMIN_TOKEN": "t" * 15, "PATH": "/usr/bin:/bin"}
    r = _cli("check-config", str(ok), env=short)
    assert r.returncode == 0
    assert "admin.token_env" in r.stderr
    assert "15 bytes" in r.stderr
    r = _cli("check-config", "--strict", str(ok), env=short)
    assert r.returncode == 0
    assert "admin.token_env" in r.stderr
    long_ = {"GATEWAY_ADMIN_TOKEN": "t" * 16, "PATH": "/usr/bin:/bin"}
    assert _cli("check-config", "--strict", str(ok), env=long_).returncode == 0


def test_version() -> None:
    r = _cli("--version")
    assert r.returncode == 0
    assert r.stdout.startswith("gateway ")


@pytest.mark.parametrize("kind", list(NOT_A_CONFIG))
def test_only_a_regular_file_of_at_most_1_mib_is_read(tmp_path: Path, kind: str) -> None:
    """A FIFO, a device, a directory, a socket, a symlink loop, a huge or non-UTF-8 file,
    YAML nested past the parser's recursion, is a ConfigError at once: never a read that
    blocks or never ends, never another exception."""
    path = make_not_a_config(kind, tmp_path)
    try:
        with pytest.raises(ConfigError) as info:
            load_file(path, environ={})
    finally:
        unblock_fifos(tmp_path)
    (problem,) = info.value.problems
    assert NOT_A_CONFIG[kind] in problem.message, problem.message
    if kind != "deep-nesting":  # the file itself is refused: the message names it
        assert str(path) in problem.message


def test_a_file_of_exactly_1_mib_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    line = b"listen: {port: 8001}\n"
    path.write_bytes(line + b"#" * (ONE_MIB - len(line) - 1) + b"\n")
    assert path.stat().st_size == ONE_MIB
    assert load_file(path, environ={}).config.listen.port == 8001


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "symlink-to-fifo", "dev-zero", "directory"])
def test_check_config_of_a_path_that_is_not_a_file_exits_2(tmp_path: Path, kind: str) -> None:
    path = make_not_a_config(kind, tmp_path)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "gateway", "check-config", str(path)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    finally:
        unblock_fifos(tmp_path)
    assert r.returncode == 2
    assert NOT_A_CONFIG[kind] in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_a_type_error_elsewhere_hides_no_other_error(path: Path) -> None:
    """Each case file with one more type error (in a section it does not use) still
    reports all its own errors: cross-reference checks run on the raw data too."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        pytest.skip("not YAML: nothing else can be checked")
    if any(e.startswith("invalid YAML") for e in _expected(path)):
        pytest.skip("the case is about the YAML itself")
    if not isinstance(data, dict) or "request" in data:
        pytest.skip("the case is not a mapping, or uses the section the type error goes in")
    data["request"] = {"max_body_bytes": "lots"}
    with pytest.raises(ConfigError) as info:
        load_text(yaml.safe_dump(data), environ={})
    messages = [str(p) for p in info.value.problems]
    assert [e for e in _expected(path) if e not in messages] == [], messages
    assert any(m.startswith("request.max_body_bytes: ") for m in messages)
