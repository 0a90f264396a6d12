"""Reading the hashed locks in requirements/ (pip's requirements format, as uv writes it)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from tests.deploy.support import ROOT

LOCKS = ROOT / "requirements"
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True, slots=True)
class Pin:
    requirement: Requirement
    hashes: int

    @property
    def version(self) -> str:
        (spec,) = self.requirement.specifier
        return spec.version

    @property
    def exact(self) -> bool:
        specs = list(self.requirement.specifier)
        return len(specs) == 1 and specs[0].operator == "=="

    @property
    def applies(self) -> bool:
        """Whether the pin's environment marker holds on this machine."""
        marker = self.requirement.marker
        return marker is None or marker.evaluate()


def read_lock(path: Path) -> dict[str, Pin]:
    """{canonical name: pin}; each logical line (continuations joined) is one requirement."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    pins: dict[str, Pin] = {}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        hashes = len(_HASH.findall(line))
        requirement = Requirement(_HASH.sub("", line).strip())
        name = canonical(requirement.name)
        assert name not in pins, f"{path.name}: {name} is pinned twice"
        pins[name] = Pin(requirement, hashes)
    return pins
