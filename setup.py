"""Optional compiled build of the gateway's hot modules (mypyc); pyproject.toml holds the rest.

``pip install .`` installs pure Python, as it always did. With ``GATEWAY_COMPILE=1`` in the
environment (the image's build stage sets it), the modules of ``COMPILED`` are compiled
with mypyc into C extensions that Python imports in place of their ``.py`` files: the same
code, type-checked by mypy, run without the interpreter's dispatch. It needs mypy (the
``compile`` lock), a C compiler and the Python headers at build time, nothing at run time;
the build fails without them. ``GATEWAY_COMPILE=auto`` (the README's install command)
compiles when all three are there and installs pure Python, with a warning, when one is
missing, so that command works on any machine.

The modules are those the proxy port runs on every request and that compile as they are:
plain functions and classes, no class an interpreted class inherits from, no async
generator (``bench/README.md`` has what each set bought). An interpreted module imports a
compiled one as any other; ``gateway.compiled()`` says which build is running.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import setup

# Paths relative to this file. The async generators of the request path live in modules of
# their own that stay interpreted (pipeline/body_stream.py, upstream/body_chunks.py);
# upstream/client.py (the WebSocket client, a class made in a function) is not here.
COMPILED = (
    # pure decisions
    "gateway/core/gcra.py",
    "gateway/core/keys.py",
    "gateway/core/paths.py",
    "gateway/core/client_ip.py",
    "gateway/core/breaker.py",
    "gateway/core/concurrency.py",
    "gateway/core/window_stats.py",
    "gateway/core/buckets.py",
    "gateway/core/tracecontext.py",
    "gateway/core/allowlist.py",
    "gateway/core/abuse.py",
    "gateway/core/inflight.py",
    "gateway/core/evidence.py",
    "gateway/core/retry.py",
    "gateway/core/framing.py",
    "gateway/core/fieldnames.py",
    "gateway/stores/memory/limiter.py",
    "gateway/stores/redis/resp.py",
    "gateway/stores/redis/batch.py",
    "gateway/stores/redis/gcra_calls.py",
    "gateway/stores/redis/limiter.py",
    "gateway/identity/resolver.py",
    "gateway/identity/tokens.py",
    "gateway/stores/memory/bans.py",
    # the request pipeline
    "gateway/pipeline/context.py",
    "gateway/pipeline/snapshot.py",
    "gateway/pipeline/reject.py",
    "gateway/pipeline/request.py",
    "gateway/pipeline/headers.py",
    "gateway/pipeline/decisions.py",
    "gateway/pipeline/handler.py",
    "gateway/pipeline/upstream_leg.py",
    "gateway/problem.py",
    "gateway/logs.py",
    "gateway/runtime.py",
    "gateway/loopmetrics.py",
    # the proxy port's server and the upstream connections
    "gateway/downstream/head.py",
    "gateway/downstream/protocol.py",
    "gateway/downstream/messages.py",
    "gateway/downstream/server.py",
    "gateway/downstream/flow.py",
    "gateway/downstream/live.py",
    "gateway/batchwrite.py",
    "gateway/upstream/hop_by_hop.py",
    "gateway/upstream/state.py",
    "gateway/upstream/connection.py",
    "gateway/upstream/pool.py",
)


def _can_compile() -> str | None:
    """None when a C compiler builds an extension here, else why not: a missing compiler or
    missing Python headers are found now rather than halfway through the build."""
    from setuptools._distutils import ccompiler  # noqa: PLC0415
    from setuptools._distutils.sysconfig import customize_compiler  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("#include <Python.h>\nint gateway_probe(void) { return 0; }\n")
        cc = ccompiler.new_compiler()
        customize_compiler(cc)
        try:
            cc.compile([str(src)], output_dir=tmp, include_dirs=[sysconfig.get_path("include")])
        except Exception as exc:  # any failure means "build pure"
            return f"no working C compiler with the Python headers ({exc})"
    return None


def _ext_modules() -> list[object]:
    mode = os.environ.get("GATEWAY_COMPILE", "").lower()
    if mode not in ("1", "true", "yes", "auto"):
        return []
    try:
        from mypyc.build import mypycify  # noqa: PLC0415 - only a compiled build needs mypy
    except ImportError:
        if mode != "auto":
            raise SystemExit(
                "GATEWAY_COMPILE=1 needs mypy: "
                "pip install --require-hashes -r requirements/compile.lock"
            ) from None
        sys.stderr.write("gateway: mypy is not installed: installing pure Python\n")
        return []
    if mode == "auto":
        why = _can_compile()
        if why is not None:
            sys.stderr.write(f"gateway: {why}: installing pure Python\n")
            return []

    modules: tuple[str, ...] = COMPILED
    # GATEWAY_COMPILE_ONLY=PATH[,PATH...]: a subset, for a quick check of the build's
    # steps (the suite's replay of the Dockerfile compiles one module; CI compiles and
    # tests them all with scripts/test-compiled)
    only = os.environ.get("GATEWAY_COMPILE_ONLY", "")
    if only:
        modules = tuple(m for m in COMPILED if m in only.split(","))
        if not modules:
            raise SystemExit(f"GATEWAY_COMPILE_ONLY names none of setup.py's modules: {only}")

    # The project's mypy settings (the pydantic plugin) for the analysis. The strict check
    # is CI's; here an optional extra that is not installed (the image has no
    # OpenTelemetry SDK) must not stop the build: its imports are read as Any.
    options = ["--config-file", "pyproject.toml", "--ignore-missing-imports"]
    return list(mypycify([*options, "--no-warn-unused-ignores", *modules], opt_level="3"))


setup(ext_modules=_ext_modules())
