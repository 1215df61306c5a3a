"""`tensorguard-fast` command line. Each subcommand group lives in its own module with a `register(subparsers)`.

Conventions every command follows: `--version`; `-v` (more, and the traceback of an error) / `-q` (less) through
the logging module, before or after the command name; progress bars only on a terminal; a closed pipe
(`... | head`) ends quietly; exit 0 done, 1 an internal error (one line, "rerun with -v"), 2 a mistake in the input
or the options (one line naming it and the fix), 3 a degenerate scan outcome (see `scan --help`), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from .._version import __version__
from ..io.errors import one_line, user_errors

# Modules that add subcommands; a module whose dependencies are missing is skipped with its reason in --help.
_COMMAND_MODULES = ("tensorguard_fast.cli.info_cmd", "tensorguard_fast.cli.lineage", "tensorguard_fast.cli.backdoor")
USER_ERROR, INTERNAL_ERROR, BROKEN_PIPE = 2, 1, 141
log = logging.getLogger("tensorguard_fast")


def _verbosity(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v / -q on `parser` and every subcommand under it, so they work before or after the command name."""
    default = 0 if top else argparse.SUPPRESS   # a subcommand must not reset what was given before its name
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="more output; -v also shows the traceback of an error")
    parser.add_argument("-q", "--quiet", action="count", default=default, help="less output (no progress bars)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _verbosity(sub, top=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorguard-fast", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Model lineage (fingerprint, compare, classify, store, plot) and backdoor filtering (scan) "
                    "from gradient statistics. `tensorguard-fast COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"tensorguard-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    unavailable = []
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if getattr(exc, "name", None) == name:
                continue  # that part of the CLI is not written yet
            unavailable.append(f"  {name.rsplit('.', 1)[-1]}: {type(exc).__name__}: {exc}")
            continue
        module.register(sub)
    if unavailable:
        parser.epilog = "commands unavailable here (their modules failed to import):\n" + "\n".join(unavailable)
    _verbosity(parser, top=True)
    return parser


def _configure_logging(verbose: int, quiet: int) -> None:
    level = logging.DEBUG if verbose else (logging.INFO if not quiet else
                                            logging.WARNING if quiet == 1 else logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if level > logging.DEBUG else
                                           "%(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USER_ERROR
    _configure_logging(args.verbose, args.quiet)
    where = f"tensorguard-fast {args.command}"
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()   # a closed pipe shows up here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except user_errors() as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{where}: error: {one_line(exc)}", file=sys.stderr)
        return USER_ERROR
    except Exception as exc:  # an internal error: one line, the traceback behind -v
        if args.verbose:
            traceback.print_exc()
        print(f"{where}: internal error: {type(exc).__name__}: {one_line(exc)} (rerun with -v for the traceback)",
              file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
