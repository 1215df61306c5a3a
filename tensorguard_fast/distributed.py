"""torch.distributed plumbing shared by the multi-process jobs (torchrun): who am I, which share is mine, all ok?

Threads: torchrun sets OMP_NUM_THREADS=1 for every rank unless the caller set it. The C++ kernels follow torch's
intra-op thread count (`torch.get_num_threads()`, which OMP_NUM_THREADS sets), so N ranks on N cores use one thread
each, and `OMP_NUM_THREADS=k torchrun ...` gives each rank k threads. Nothing here changes that setting.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """Rank and size from torchrun's environment (a plain `python` run is rank 0 of 1)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init(backend: Optional[str] = None) -> World:
    """Join the process group when launched by torchrun: nccl when CUDA is usable, gloo otherwise."""
    w = world()
    if w.size > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group(backend=backend)
    return w


def device_for(w: World) -> torch.device:
    return torch.device(f"cuda:{w.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def shard(indices: Sequence[int], w: World) -> list:
    """Rank r's share: every size-th index starting at r (balanced when samples are sorted by length later)."""
    return list(indices)[w.rank::w.size]


def all_ok(ok: bool) -> bool:
    """True on every rank only if `ok` is true on every rank (so one failing rank stops the merge everywhere)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
