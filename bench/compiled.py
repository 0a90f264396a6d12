"""A compiled copy of a checkout's gateway package, as the image builds it (setup.py).

    .venv/bin/python bench/compiled.py [CHECKOUT] [--out DIR]   # prints the copy's path

The package, ``setup.py`` and ``pyproject.toml`` are copied to a directory of their own
and built there with ``GATEWAY_COMPILE=1 setup.py build_ext --inplace`` (this
virtualenv's mypy, a C compiler and the Python headers): the checkout itself never gets
a ``.so`` that would shadow its edited ``.py`` files. Run the copy with
``PYTHONPATH=DIR`` (``bench/run.py --build compiled`` and ``bench/instructions.py
--source DIR`` do).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def compiled_copy(checkout: Path, out: Path | None = None) -> Path:
    """Build ``checkout``'s package compiled into ``out`` (a new temporary directory when
    None) and return it; raises ``RuntimeError`` with the build's output on failure."""
    checkout = checkout.resolve()
    if not (checkout / "setup.py").exists():
        raise RuntimeError(f"{checkout} has no setup.py: it has no compiled build")
    dest = Path(tempfile.mkdtemp(prefix="gateway-compiled-")) if out is None else out
    dest.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest / "gateway", ignore_errors=True)
    shutil.copytree(
        checkout / "gateway",
        dest / "gateway",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"),
    )
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(checkout / name, dest / name)
    env = {**os.environ, "GATEWAY_COMPILE": "1"}
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=dest,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compiled build of {checkout} failed:\n{proc.stdout}\n{proc.stderr}")
    check = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.compiled())"],
        cwd=dest,
        env={**os.environ, "PYTHONPATH": str(dest)},
        capture_output=True,
        text=True,
        check=False,
    )
    if check.stdout.strip() != "True":
        raise RuntimeError(f"the copy in {dest} does not run compiled: {check.stderr}")
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", nargs="?", type=Path, default=BENCH.parent)
    p.add_argument("--out", type=Path, help="the directory to build in (default: a new one)")
    args = p.parse_args()
    print(compiled_copy(args.checkout, args.out))


if __name__ == "__main__":
    main()
