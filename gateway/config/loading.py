"""Loading the configuration: reading the file, parsing YAML, validating, resolving secrets.

Every error carries its field path (``routes[1].upstream``) and all of a run's errors
are reported together (:class:`~gateway.config.errors.ConfigError`).  Secrets are kept
in :class:`Secrets`, apart from the config, so that dumping the config can never leak
one.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.checks import cross_check, risky_settings
from gateway.config.errors import ConfigError, Problem, pydantic_problems
from gateway.config.models import Config, Identity
from gateway.identity.resolver import IdentityKeys, load_identity

__all__ = [
    "MAX_CONFIG_BYTES",
    "Secrets",
    "Settings",
    "load_default",
    "load_file",
    "load_text",
    "parse_config",
    "read_config_bytes",
    "resolve_secrets",
]


MIN_ADMIN_TOKEN_BYTES = 16
"""A shorter admin token is warned about. It does not fail ``check-config --strict``:
SPEC section 2 lists the settings that do, and a token is a secret that the config file
does not hold (it may differ between the environment that checks and the one that runs)."""


@dataclass(frozen=True, slots=True)
class Secrets:
    """Values of the ``*_env`` fields, read from the environment at load time."""

    admin_token: str | None = None
    redis_url: str | None = None
    database_dsn: str | None = None
    route_secrets: Mapping[str, bytes] = field(default_factory=dict)


def _env(environ: Mapping[str, str], name: str | None) -> str | None:
    if not name:
        return None
    value = environ.get(name, "")
    return value or None


def resolve_secrets(cfg: Config, environ: Mapping[str, str]) -> tuple[Secrets, list[Problem]]:
    warnings: list[Problem] = []
    admin_token = _env(environ, cfg.admin.token_env)
    if admin_token is None:
        where = (
            f"environment variable {cfg.admin.token_env} is not set"
            if cfg.admin.token_env
            else "no token_env"
        )
        warnings.append(
            Problem(
                "admin.token_env",
                f"{where}: /admin/* endpoints refuse every call (403)",
                risky=True,
            )
        )
    elif len(admin_token.encode()) < MIN_ADMIN_TOKEN_BYTES:
        # guessing is bounded per address (the admin port's failure budget), not across
        # a spray of addresses: the token's length is what keeps it out of reach
        warnings.append(
            Problem(
                "admin.token_env",
                f"the admin token is {len(admin_token.encode())} bytes:"
                f" {MIN_ADMIN_TOKEN_BYTES} or more are needed (e.g. openssl rand -hex 32)",
            )
        )
    redis_url = _env(environ, cfg.rate_limit.redis_url_env)
    if cfg.rate_limit.backend == "redis" and redis_url is None:
        warnings.append(
            Problem(
                "rate_limit.redis_url_env",
                f"environment variable {cfg.rate_limit.redis_url_env} is not set:"
                f" the redis backend is unavailable (on_backend_error:"
                f" {cfg.rate_limit.on_backend_error} applies)",
            )
        )
    dsn = None
    if cfg.database is not None:
        dsn = _env(environ, cfg.database.dsn_env)
        if dsn is None:
            warnings.append(
                Problem(
                    "database.dsn_env",
                    f"environment variable {cfg.database.dsn_env} is not set:"
                    " the database component reports unhealthy",
                )
            )
    route_secrets: dict[str, bytes] = {}
    for i, route in enumerate(cfg.routes):
        if route.shared_secret is None:
            continue
        value = _env(environ, route.shared_secret.value_env)
        if value is None:
            warnings.append(
                Problem(
                    f"routes[{i}].shared_secret.value_env",
                    f"environment variable {route.shared_secret.value_env} is not set:"
                    " every request to this route is refused (403)",
                )
            )
        else:
            route_secrets[route.name] = value.encode()
    return Secrets(admin_token, redis_url, dsn, route_secrets), warnings


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    PyYAML keeps the last value silently: a second ``routes:`` would drop the first
    block's routes (and their guards) without a word.  Keys merged in with ``<<`` may
    still be overridden, as YAML means them to be.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (the first one would be silently ignored)",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


@dataclass(frozen=True, slots=True)
class Settings:
    """A loaded config: the validated object, its secrets, its warnings and its origin."""

    config: Config
    secrets: Secrets
    warnings: tuple[Problem, ...]
    source: str | None
    digest: str
    # the keys of the identity section (None: no such section; nothing is verified)
    identity: IdentityKeys | None = None

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "source": self.source or "built-in defaults",
            "listeners": {
                "proxy": f"{cfg.listen.host}:{cfg.listen.port}",
                "admin": f"{cfg.admin.host}:{cfg.admin.port}",
            },
            "upstreams": {n: u.url for n, u in cfg.upstreams.items()},
            "routes": [f"{r.name} {r.path_prefix} -> {r.upstream}" for r in cfg.routes],
            "policies": {
                n: f"{p.max_inflight} in flight key {p.key} {p.mode}"
                if p.concurrency
                else f"{p.requests}/{p.period} (UTC) key {p.key} {p.mode}"
                if p.period is not None
                else f"{p.requests}/{p.period_s}s burst {p.effective_burst} key {p.key} {p.mode}"
                for n, p in cfg.rate_limit.policies.items()
            },
            "backend": cfg.rate_limit.backend,
            "warnings": [str(w) for w in self.warnings],
        }

    def summary_line(self) -> str:
        cfg = self.config
        n_warn = len(self.warnings)
        return (
            f"ok: {len(cfg.upstreams)} upstream(s), {len(cfg.routes)} route(s), "
            f"{len(cfg.rate_limit.policies)} policy(ies), backend {cfg.rate_limit.backend}, "
            f"listen :{cfg.listen.port}, admin :{cfg.admin.port}, {n_warn} warning(s)"
        )


def parse_config(data: Any) -> Config:
    """Validate already-parsed YAML data; raise :class:`ConfigError` with every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("", "the top level must be a mapping of keys")])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        # the cross-reference errors too, read from the raw data: all errors in one run
        raise ConfigError(pydantic_problems(exc) + cross_check(data)) from None
    problems = cross_check(cfg.model_dump())
    if problems:
        raise ConfigError(problems)
    return cfg


def _identity_file_errors(data: Any, environ: Mapping[str, str]) -> list[Problem]:
    """The errors of the files a valid ``identity`` section names, when the rest of the
    config is not valid (else :func:`load_text` reads them with it)."""
    section = data.get("identity") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        return []
    try:
        identity = Identity.model_validate(section)
    except ValidationError:
        return []
    return load_identity(identity, environ)[1]


def load_text(
    text: str,
    *,
    source: str | None = None,
    environ: Mapping[str, str] | None = None,
    digest: str | None = None,
) -> Settings:
    env = os.environ if environ is None else environ
    data = None
    try:
        data = yaml.load(text, Loader=_Loader) if text.strip() else None  # noqa: S506 - a SafeLoader
        cfg = parse_config(data)
    except ConfigError as exc:
        # the identity files' errors too (a JWKS file that does not parse): all in one run
        raise ConfigError([*exc.problems, *_identity_file_errors(data, env)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem("", f"invalid YAML: {where}{problem}")]) from None
    except RecursionError:
        # PyYAML's parser recurses once a nesting level: a few KB of "[[[[" exceed
        # Python's limit; no real config comes near it
        raise ConfigError([Problem("", "invalid YAML: nested too deeply")]) from None
    secrets, warnings = resolve_secrets(cfg, env)
    identity, errors, identity_warnings = load_identity(cfg.identity, env)
    if errors:
        raise ConfigError(errors)
    warnings.extend(identity_warnings)
    warnings.extend(risky_settings(cfg))
    digest = digest or hashlib.sha256(text.encode()).hexdigest()
    return Settings(cfg, secrets, tuple(warnings), source, digest, identity)


MAX_CONFIG_BYTES = 1 << 20  # far above any real config; bounds what a read may take

_NOT_REGULAR = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
)


def read_config_bytes(path: Path) -> bytes:
    """The bytes of the config file at ``path``: a regular file of at most 1 MiB.

    Anything else is a :class:`ConfigError` at once, never a read that blocks or never
    ends (a path swapped for a symlink to a FIFO wedged the reload thread for good, and
    kept the process alive after SIGTERM; ``/dev/zero`` would fill memory).  The file is
    opened without blocking (a FIFO opens at once) and the opened descriptor is checked,
    not the path: a swap between a check and the open cannot slip a FIFO through.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read {path}: {exc.strerror}")]) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _NOT_REGULAR if test(mode)), "special")
            msg = f"{path} is not a regular file ({kind}): refused"
            raise ConfigError([Problem("", msg)])
        chunks: list[bytes] = []
        left = MAX_CONFIG_BYTES + 1  # one byte more tells a file that is too large
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:  # EAGAIN of a file that would block, EIO...
        raise ConfigError([Problem("", f"cannot read {path}: {exc.strerror}")]) from None
    finally:
        os.close(fd)
    if left <= 0:
        msg = f"{path} is larger than 1 MiB ({MAX_CONFIG_BYTES} bytes): refused"
        raise ConfigError([Problem("", msg)])
    return b"".join(chunks)


def load_file(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Settings:
    p = Path(path)
    raw = read_config_bytes(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"{p} is not UTF-8 text (byte {exc.start}): refused"
        raise ConfigError([Problem("", msg)]) from None
    digest = hashlib.sha256(raw).hexdigest()
    return load_text(text, source=str(p), environ=environ, digest=digest)


def load_default(environ: Mapping[str, str] | None = None) -> Settings:
    return load_text("", source=None, environ=environ)
