"""The configuration reference names every key the config accepts."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.deploy.support import ROOT

SCHEMA = json.loads((ROOT / "config" / "gateway.schema.json").read_text(encoding="utf-8"))
REFERENCE = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


def _keys(node: dict[str, Any], seen: set[str]) -> set[str]:
    """Every property name of the schema, through $ref, items and unions."""
    found: set[str] = set()
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return found
        return _keys(SCHEMA["$defs"][name], seen | {name})
    for name, sub in node.get("properties", {}).items():
        found.add(name)
        found |= _keys(sub, seen)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            found |= _keys(node[key], seen)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in node.get(key, []):
            found |= _keys(sub, seen)
    return found


def test_the_configuration_reference_names_every_key() -> None:
    spans = re.findall(r"`([^`]+)`", REFERENCE)
    named = {part for span in spans for part in re.split(r"[^A-Za-z0-9_]+", span) if part}
    missing = sorted(_keys(SCHEMA, set()) - named)
    assert not missing, f"docs/configuration.md does not name: {missing}"
