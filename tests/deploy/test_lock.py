"""The hashed locks agree with pyproject.toml, with each other and with what is installed.

pyproject.toml keeps ranges for people who install the package into an environment of
their own; the locks in requirements/ hold the exact, hashed versions that CI, the README's
commands and the image install (scripts/update-lock writes them).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy.locks import LOCKS, Pin, canonical, read_lock
from tests.deploy.support import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
RUNTIME = read_lock(LOCKS / "runtime.lock")
BUILD = read_lock(LOCKS / "build.lock")
DEV = read_lock(LOCKS / "dev.lock")


def _declared(group: list[str]) -> dict[str, Requirement]:
    return {canonical(r.name): r for r in map(Requirement, group)}


DEPENDENCIES = _declared(PYPROJECT["project"]["dependencies"])
TEST_TOOLS = _declared(PYPROJECT["project"]["optional-dependencies"]["test"])
# the optional OTLP export: not in the image, in the tests' lock so that CI exercises it
OTEL = _declared(PYPROJECT["project"]["optional-dependencies"]["otel"])
BUILD_TOOLS = _declared(
    [
        line
        for line in (LOCKS / "build.in").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
)


@pytest.mark.parametrize("lock", ["runtime.lock", "build.lock", "dev.lock"])
def test_every_pin_is_exact_and_hashed(lock: str) -> None:
    pins = read_lock(LOCKS / lock)
    assert pins
    for name, pin in pins.items():
        assert pin.exact, f"{lock}: {name} is not pinned with =="
        assert pin.hashes >= 1, f"{lock}: {name} has no hash"


@pytest.mark.parametrize(
    ("declared", "lock"),
    [
        (DEPENDENCIES, RUNTIME),
        (DEPENDENCIES, DEV),
        (TEST_TOOLS, DEV),
        (OTEL, DEV),
        (BUILD_TOOLS, BUILD),
    ],
    ids=["runtime", "runtime-in-dev", "test-in-dev", "otel-in-dev", "build"],
)
def test_every_declared_dependency_is_locked_within_its_range(
    declared: dict[str, Requirement], lock: dict[str, Pin]
) -> None:
    for name, requirement in declared.items():
        assert name in lock, f"{name} is declared in pyproject.toml but not locked"
        version = lock[name].version
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} is outside the declared range {requirement.specifier}"
        )


def _closure(roots: dict[str, Requirement]) -> set[str]:
    """The declared packages and everything their installed metadata requires, here."""
    seen: set[str] = set()
    todo = [(canonical(r.name), frozenset(r.extras)) for r in roots.values() if _holds(r, set())]
    while todo:
        name, extras = todo.pop()
        seen.add(name)
        for line in importlib.metadata.requires(name) or []:
            child = Requirement(line)
            if _holds(child, set(extras)) and canonical(child.name) not in seen:
                todo.append((canonical(child.name), frozenset(child.extras)))
    return seen


def _holds(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": e}) for e in extras or {""})


def test_the_runtime_lock_holds_nothing_the_declared_dependencies_do_not_need() -> None:
    needed = _closure(DEPENDENCIES)
    locked_here = {name for name, pin in RUNTIME.items() if pin.applies}
    assert locked_here == needed, (
        f"stray: {sorted(locked_here - needed)}; missing: {sorted(needed - locked_here)}"
    )


def test_the_dev_lock_holds_nothing_stray() -> None:
    needed = _closure(DEPENDENCIES | TEST_TOOLS | OTEL | BUILD_TOOLS)
    locked_here = {name for name, pin in DEV.items() if pin.applies}
    assert locked_here == needed, (
        f"stray: {sorted(locked_here - needed)}; missing: {sorted(needed - locked_here)}"
    )


def test_ci_tests_the_versions_the_image_ships() -> None:
    for lock in (RUNTIME, BUILD):
        for name, pin in lock.items():
            assert name in DEV, f"{name} is locked for the image but not for the tests"
            assert DEV[name].version == pin.version, name


def test_this_environment_was_installed_from_the_dev_lock() -> None:
    for name, pin in DEV.items():
        if not pin.applies:
            continue
        assert importlib.metadata.version(name) == pin.version, name


def _commands(path: Path) -> str:
    return re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))


def test_the_readme_and_ci_install_from_the_locks_with_hashes() -> None:
    readme = _commands(ROOT / "README.md")
    block = readme.split("```sh", 1)[1].split("```", 1)[0]
    run, test = (ln for ln in block.splitlines() if ln.startswith("python3 -m venv"))
    assert (
        "--require-hashes -r requirements/runtime.lock -r requirements/build.lock"
        " -r requirements/compile.lock" in run
    )
    # the run command installs (compiled where it can), the test command installs in place
    assert "GATEWAY_COMPILE=auto .venv/bin/pip install --no-deps --no-build-isolation . " in run
    assert "--require-hashes -r requirements/dev.lock" in test
    ci = _commands(ROOT / ".ci" / "run")
    assert "--require-hashes -r requirements/dev.lock" in ci
    for text in (test, ci):
        assert "--no-deps --no-build-isolation -e ." in text
    for text in (run, test, ci):
        assert "pip install -e" not in text
        assert "[test]" not in text
