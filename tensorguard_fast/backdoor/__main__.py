"""`torchrun --nproc-per-node N -m tensorguard_fast.backdoor ARGS`: `tensorguard-fast scan`'s arguments, the
dataset sharded by rank (gloo on CPU, nccl on GPU). `python -m tensorguard_fast.backdoor ARGS` is one rank.

A mistake in the input or the options (a missing file, a bad value, a bundled model not installed) is one line on
stderr and exit 2, as with `tensorguard-fast scan`; anything else is a bug and keeps its traceback."""
import sys

from ..io.errors import one_line, user_errors
from .command import run, scan_parser


def main(argv=None) -> int:
    args = scan_parser().parse_args(argv)
    try:
        return int(run(args) or 0)
    except user_errors() as exc:
        print(f"python -m tensorguard_fast.backdoor: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
