"""The main job on the bundled real model, offline: `python -m tensorguard_fast.demo`.

Grows with the library: today it summarises every weight matrix of SmolLM2-135M-Instruct with the fused moments
kernel and checks the result against the float64 reference.
"""
from __future__ import annotations

import time

import torch


def main() -> int:
    from . import _backend, reference
    from .io.bundled import bundled_model_dir
    from .ops.moments import moments_many
    from safetensors import safe_open

    path = bundled_model_dir("smollm2") / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]
    total = sum(t.numel() for t in tensors)
    t0 = time.perf_counter()
    stats = moments_many(tensors)
    dt = time.perf_counter() - t0
    worst = max(abs(s.std - r.std) / max(r.std, 1e-30) for s, r in zip(stats, map(reference.moments, tensors)))
    print(f"SmolLM2-135M: {len(tensors)} tensors, {total / 1e6:.1f} M weights, moments in {dt * 1e3:.1f} ms "
          f"({total * 4 / dt / 1e9:.1f} GB/s, backend {_backend.last_backend('moments')}); "
          f"worst std error vs float64 reference {worst:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
