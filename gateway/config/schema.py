"""The JSON Schema of the configuration file (``gateway schema``)."""

from __future__ import annotations

from typing import Any

from gateway.config.models import Config

__all__ = ["json_schema"]


def json_schema() -> dict[str, Any]:
    return Config.model_json_schema(mode="validation")
