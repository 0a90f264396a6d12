"""Command line: ``gateway serve | check-config | demo | schema | --version``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence

from gateway import build_name
from gateway.config import ConfigError, Settings, json_schema, load_default, load_file

EXIT_CONFIG = 2


def _run(coro: object) -> None:
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(coro)  # type: ignore[arg-type]


def _load(path: str | None) -> Settings:
    return load_file(path) if path else load_default()


def _print_errors(exc: ConfigError, source: str) -> None:
    print(f"{source}: invalid config ({len(exc.problems)} error(s))", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import logs  # noqa: PLC0415 - import the server stack only to serve
    from gateway.app import Gateway, StartupError  # noqa: PLC0415

    logs.configure()
    path = args.config or os.environ.get("GATEWAY_CONFIG") or None
    try:
        settings = _load(path)
    except ConfigError as exc:
        logs.get_logger().error("config_invalid", path=path, errors=[str(p) for p in exc.problems])
        _print_errors(exc, path or "defaults")
        return EXIT_CONFIG

    async def main() -> None:
        await Gateway(settings, config_path=path).run()

    try:
        _run(main())
    except StartupError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        settings = load_file(args.path)
    except ConfigError as exc:
        _print_errors(exc, args.path)
        return EXIT_CONFIG
    for w in settings.warnings:
        print(f"warning: {w}", file=sys.stderr)
    risky = [w for w in settings.warnings if w.risky]
    if args.strict and risky:
        print(f"{args.path}: refused by --strict ({len(risky)} risky setting(s))", file=sys.stderr)
        for w in risky:
            print(f"  {w}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.path}: {settings.summary_line()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway import logs  # noqa: PLC0415
    from gateway.demo import run_demo  # noqa: PLC0415

    logs.configure()
    _run(run_demo(quiet=args.quiet))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.check:
        try:
            with open(args.check, encoding="utf-8") as f:  # noqa: PTH123
                current = f.read()
        except OSError as exc:
            print(f"{args.check}: {exc}", file=sys.stderr)
            return 1
        if current != text:
            print(
                f"{args.check} is out of date: run `gateway schema > {args.check}`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.check} is current")
        return 0
    sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="A sidecar reverse proxy that protects and observes its pod."
    )
    parser.add_argument("--version", action="version", version=f"gateway {build_name()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $GATEWAY_CONFIG, else built-in defaults)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("--strict", action="store_true", help="also refuse risky settings")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="run sample upstreams and the gateway in front of them")
    p.add_argument("--quiet", action="store_true", help="do not print the curl lines")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("schema", help="print the config's JSON Schema")
    p.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from the schema")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
