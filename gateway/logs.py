"""Structured logs: one JSON object a line on stdout (structlog + orjson)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog


def _dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default or str)


def configure(level: int = logging.INFO) -> None:
    """Configure structlog once, for the whole process (JSON lines on stdout)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library: route their warnings to
    # stderr as plain lines so stdout stays one JSON object a line.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str = "gateway") -> Any:
    return structlog.get_logger(name)
