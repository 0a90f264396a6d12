"""Instructions per request of the proxy port's Python work, counted by valgrind.

    .venv/bin/python bench/instructions.py [--config bench/gateway-memory.yaml]
        [--requests 2000] [--post] [--source OTHER_CHECKOUT]
        [--handler NAME | --floor | --observability]
        [--backend redis [--redis-url URL]]

Wall-clock figures on a shared VM move by 10-20 % between identical runs; an
instruction count of the same work moves by well under 1 %, whatever else the machine
does. This runs one rig of ``bench/inprocess.py`` (the real server, pipeline and
upstream pool over in-memory transports) under ``valgrind --tool=callgrind`` with
collection off, warms it up, switches collection on (``callgrind_control -i on``) for
``--requests`` requests and off again, and prints the instructions per request. The
bench token is made from one RSA key and a fixed ``exp`` for the whole invocation and
``PYTHONHASHSEED`` is fixed, so two checkouts measured one after the other
(``--source``: the other checkout's ``gateway`` package runs, with this virtualenv's
dependencies) do exactly the same work.

``--handler``: the rig counted, ``pipeline`` by default, ``floor`` (also ``--floor``:
the forwarding-only handler) or one of ``inprocess.py --observability``'s pipelines
(``no-tracing``, ``trace-0``, ``trace-1``, ``trace-1-export``, ``no-window-stats``).
``--observability``: each of those rigs in turn, a process each, as a table. Every
thread is counted while collection is on: the span queue is flushed before it is
switched off, so ``trace-1-export`` includes the SDK thread's encoding and sending of
the counted requests' spans (the local OTLP sink is a child process, not counted).

``--backend redis``: the config with ``rate_limit.backend: redis`` and ``GATEWAY_REDIS_URL``
set to ``--redis-url`` (``$GATEWAY_REDIS_URL``, else ``redis://127.0.0.1:6379/0``), as
``bench/run.py`` runs its ``gw-redis`` variant: the decisions go to a real Redis over a
socket. Only the gateway's instructions are counted (Redis is another process), not the
kernel's work for the socket.

Valgrind runs OpenSSL without the CPU's SHA extensions: hashing and signature checks
weigh more here than natively (the bench token is verified once, then found in the
verifier's cache). It takes about a minute a rig (most of it the imports, at valgrind's
pace); it needs ``valgrind`` (with ``callgrind_control``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
_EXP = 4_102_444_800  # 2100-01-01: the token never expires during a count
_WARM_ROUNDS = 100
_CONNECTIONS = 50


def _control(what: str) -> None:
    subprocess.run(
        ["callgrind_control", "-i", what, str(os.getpid())], capture_output=True, check=False
    )


async def _child(args: argparse.Namespace) -> None:
    if args.source:
        os.environ["BENCH_GATEWAY_SOURCE"] = str(Path(args.source).resolve())
    sys.path.insert(0, str(BENCH))
    import inprocess  # noqa: PLC0415 - after the gateway package is chosen
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    key = serialization.load_pem_private_key(Path(args.key_file).read_bytes(), None)
    async with contextlib.AsyncExitStack() as stack:
        rigs = await inprocess.make_rigs(
            args.config,
            _CONNECTIONS,
            stack,
            post=args.post,
            observability=args.handler in inprocess.OBSERVABILITY,
            # the warm-up's spans are flushed at its end, the counted ones at theirs
            spans_per_flush=max(args.requests, _WARM_ROUNDS * _CONNECTIONS),
            key=key,
            exp=_EXP,
        )
        rig = rigs[args.handler]
        rig.wait_for_answers = args.backend != "memory"  # answers that wait on Redis
        await inprocess.warm_up([rig], _WARM_ROUNDS)
        _control("on")
        for _ in range(args.requests // _CONNECTIONS):
            await rig.round()
        rig.drain()
        _control("off")


def _write_key(key_file: Path) -> None:
    """The invocation's RSA key: every rig counted signs its token with it."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _count(args: argparse.Namespace, handler: str, key_file: Path) -> int:
    out = key_file.with_name(f"callgrind-{handler}.out")
    config = args.config
    if args.backend != "memory":  # the config with the backend switched, beside the key
        cfg = yaml.safe_load(Path(config).read_text())
        cfg.setdefault("rate_limit", {})["backend"] = args.backend
        variant = key_file.with_name(f"{Path(config).stem}-{args.backend}.yaml")
        variant.write_text(yaml.safe_dump(cfg, sort_keys=False))
        config = str(variant)
    argv = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        sys.executable, str(Path(__file__).resolve()), "--child", "--key-file", str(key_file),
        "--config", config, "--requests", str(args.requests), "--handler", handler,
        "--backend", args.backend,
    ]  # fmt: skip
    if args.post:
        argv.append("--post")
    if args.source:
        argv += ["--source", args.source]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if args.backend == "redis":
        env["GATEWAY_REDIS_URL"] = args.redis_url
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        sys.exit(f"the counted run of {handler} failed:\n{done.stderr[-3000:]}")
    if args.keep is not None:  # for callgrind_annotate
        args.keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, args.keep / out.name)
    return int(found.group(1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(BENCH / "gateway-memory.yaml"))
    p.add_argument("--requests", type=int, default=2000, help="counted (a multiple of 50)")
    p.add_argument("--handler", default="pipeline", help="the rig counted (see above)")
    p.add_argument("--floor", action="store_true", help="the forwarding-only handler")
    p.add_argument(
        "--keep", type=Path, help="a directory to keep callgrind's output in (callgrind-RIG.out)"
    )
    p.add_argument(
        "--observability", action="store_true", help="every rig of inprocess.py --observability"
    )
    p.add_argument("--post", action="store_true", help="a POST with a 200-byte body")
    p.add_argument(
        "--backend",
        choices=("memory", "redis"),
        default="memory",
        help="the rate-limit backend (redis: --redis-url's Redis, as bench/run.py's gw-redis)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("GATEWAY_REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="the Redis of --backend redis (default $GATEWAY_REDIS_URL, else local 6379/0)",
    )
    p.add_argument("--source", help="another checkout whose gateway package runs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--key-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.child:
        import uvloop  # noqa: PLC0415

        uvloop.run(_child(args))
        return 0
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        print(f"needs {' and '.join(missing)} (Debian: apt-get install valgrind)")
        return 2
    args.requests -= args.requests % _CONNECTIONS
    sys.path.insert(0, str(BENCH))
    from inprocess import OBSERVABILITY  # noqa: PLC0415 - beside this script

    names = ("pipeline", *OBSERVABILITY, "floor")
    handlers = list(names) if args.observability else ["floor" if args.floor else args.handler]
    if not set(handlers) <= set(names):
        print(f"--handler: one of {', '.join(names)}")
        return 2
    source = args.source or str(BENCH.parent)
    if len(handlers) > 1:
        print(f"{source}, {args.config}, {args.requests} requests a rig")
        print("| handler | instructions / request |")
        print("|---|--:|")
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key.pem"
        _write_key(key_file)
        for handler in handlers:
            per_request = _count(args, handler, key_file) / args.requests
            if len(handlers) > 1:
                print(f"| {handler} | {per_request:,.0f} |", flush=True)
            else:
                what = "floor (forwarding only)" if handler == "floor" else handler
                print(
                    f"{what}, {source}, {args.config}, {args.backend} backend:"
                    f" {per_request:,.0f} instructions a request"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
