"""`torchrun --nproc-per-node N -m tensorguard_fast.backdoor ARGS`: `tensorguard-fast scan`'s arguments, the
dataset sharded by rank (gloo on CPU, nccl on GPU). `python -m tensorguard_fast.backdoor ARGS` is one rank."""
from .command import run, scan_parser

if __name__ == "__main__":
    raise SystemExit(run(scan_parser().parse_args()))
