"""The gateway's configuration: one typed, frozen, validated object.

The schema is the contract of SPEC section 3.  Every field has a default, unknown
keys are errors, and every error carries its field path (``routes[1].upstream``).

- :mod:`~gateway.config.models`: the pydantic models (restart-only fields marked);
- :mod:`~gateway.config.loading`: reading the file, YAML, secrets from the environment,
  :class:`Settings`;
- :mod:`~gateway.config.checks`: rules across fields, risky settings;
- :mod:`~gateway.config.errors`: :class:`Problem` and :class:`ConfigError`;
- :mod:`~gateway.config.schema`: the JSON Schema.

The public names are re-exported here: ``from gateway.config import X``.
"""

from __future__ import annotations

from gateway.config.checks import risky_settings
from gateway.config.errors import ConfigError, Problem, format_loc
from gateway.config.loading import (
    MAX_CONFIG_BYTES,
    Secrets,
    Settings,
    load_default,
    load_file,
    load_text,
    parse_config,
    read_config_bytes,
    resolve_secrets,
)
from gateway.config.models import (
    Abuse,
    AbuseScores,
    AccessLog,
    Admin,
    CircuitBreaker,
    Concurrency,
    Config,
    Database,
    DatabaseCheck,
    Drain,
    EnvName,
    HeaderName,
    HealthCheck,
    HostName,
    Hsts,
    IPNetwork,
    Listen,
    Liveness,
    Metrics,
    NonNegativeSeconds,
    Policy,
    Port,
    PositiveInt,
    PositiveSeconds,
    RateLimit,
    RedisHealth,
    Reload,
    RequestLimits,
    Retries,
    Route,
    SecurityHeaders,
    SharedSecret,
    Upstream,
    WebSocket,
)
from gateway.config.schema import json_schema

__all__ = [
    "MAX_CONFIG_BYTES",
    "Abuse",
    "AbuseScores",
    "AccessLog",
    "Admin",
    "CircuitBreaker",
    "Concurrency",
    "Config",
    "ConfigError",
    "Database",
    "DatabaseCheck",
    "Drain",
    "EnvName",
    "HeaderName",
    "HealthCheck",
    "HostName",
    "Hsts",
    "IPNetwork",
    "Listen",
    "Liveness",
    "Metrics",
    "NonNegativeSeconds",
    "Policy",
    "Port",
    "PositiveInt",
    "PositiveSeconds",
    "Problem",
    "RateLimit",
    "RedisHealth",
    "Reload",
    "RequestLimits",
    "Retries",
    "Route",
    "Secrets",
    "SecurityHeaders",
    "Settings",
    "SharedSecret",
    "Upstream",
    "WebSocket",
    "format_loc",
    "json_schema",
    "load_default",
    "load_file",
    "load_text",
    "parse_config",
    "read_config_bytes",
    "resolve_secrets",
    "risky_settings",
]
