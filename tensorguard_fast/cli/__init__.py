"""`tensorguard-fast` command line. Each subcommand group lives in its own module with a `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add subcommands; a module whose dependencies are missing is skipped with its reason in --help.
_COMMAND_MODULES = ("tensorguard_fast.cli.info_cmd", "tensorguard_fast.cli.lineage", "tensorguard_fast.cli.backdoor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorguard-fast",
        description="Model lineage (fingerprint, compare, classify, store, plot) and backdoor filtering (scan) "
                    "from gradient statistics. `tensorguard-fast COMMAND --help` for each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that part of the CLI is not written yet
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"tensorguard-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
