"""setup.py's GATEWAY_COMPILE modes: "auto" (the README's install command) falls back to pure
Python where nothing can compile, "1" (the image) fails there instead of shipping pure
Python unnoticed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    shutil.copytree(
        ROOT / "gateway", tmp_path / "gateway", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    env = {
        **os.environ,
        "GATEWAY_COMPILE": mode,
        "GATEWAY_COMPILE_ONLY": "gateway/core/gcra.py",
        "CC": str(tmp_path / "no-such-cc"),  # a machine without a C compiler
    }
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_auto_installs_pure_python_without_a_compiler(tmp_path: Path) -> None:
    proc = _build(tmp_path, "auto")
    assert proc.returncode == 0, proc.stderr
    assert "no working C compiler" in proc.stderr
    assert "installing pure Python" in proc.stderr
    assert not list((tmp_path / "gateway").rglob("*.so"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_explicit_compile_fails_without_a_compiler(tmp_path: Path) -> None:
    pytest.importorskip("mypyc", reason="the compile lock is not installed")
    proc = _build(tmp_path, "1")
    assert proc.returncode != 0
    assert not list((tmp_path / "gateway").rglob("*.so"))
