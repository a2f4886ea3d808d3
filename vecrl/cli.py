"""The `vecrl` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_tasks(args) -> int:
    import envs_mjx  # pylint: disable=import-outside-toplevel

    for domain in envs_mjx.DOMAINS:
        print(f"{domain:12s} " + " ".join(t.split("-", 1)[1] for t in envs_mjx.list_tasks(domain)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vecrl", description="Many-seed model-based off-policy RL on MJX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tasks", help="list the DMC tasks available on MJX")
    p.set_defaults(func=_cmd_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
