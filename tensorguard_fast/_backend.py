"""Which kernels can run here, and the one dispatch rule every op follows.

Rule (docs/methods.md section 7): an explicitly requested backend that cannot run raises `BackendUnavailable`; an
automatically chosen one falls back (CUDA tensor -> Triton; CPU tensor -> C++ `_C`; otherwise -> reference) and the
op records which one ran in `last_backend(op)`.

`TENSORGUARD_FAST_BACKEND=reference` forces the pure-PyTorch reference path everywhere (useful to rule the kernels
out when a number looks wrong).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

BACKENDS = ("cpp", "triton", "reference")

# Must match csrc/common.h::DType.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


_C = None
_C_ERROR: Optional[str] = None
_TRITON_ERROR: Optional[str] = None
_LAST: dict = {}


def _forced() -> Optional[str]:
    value = os.environ.get("TENSORGUARD_FAST_BACKEND", "").strip().lower()
    if value and value not in BACKENDS:
        raise ValueError(f"TENSORGUARD_FAST_BACKEND={value!r}: expected one of {BACKENDS}")
    return value or None


def _load_cpp() -> None:
    global _C, _C_ERROR
    if _forced() == "reference":
        _C_ERROR = "disabled by TENSORGUARD_FAST_BACKEND=reference"
        return
    try:
        from . import _C as ext  # type: ignore[attr-defined]

        _C = ext
    except ImportError as exc:  # not built, or built for another Python
        _C_ERROR = f"compiled extension tensorguard_fast._C did not load ({exc})"
        warnings.warn(f"tensorguard_fast: {_C_ERROR}; using the PyTorch reference path", RuntimeWarning, stacklevel=3)


_load_cpp()


def cpp():
    """The compiled extension, or None."""
    return _C


def cpp_error() -> Optional[str]:
    return _C_ERROR


def triton_error() -> Optional[str]:
    """None when Triton kernels can run (on CUDA, or anywhere under TRITON_INTERPRET=1), else why not."""
    if _forced() == "reference":
        return "disabled by TENSORGUARD_FAST_BACKEND=reference"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install 'tensorguard-fast[gpu]'"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def choose(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """Pick the backend for `op` on tensors living on `device` and remember it for `last_backend`."""
    forced = _forced()
    if backend is None or backend == "auto":
        if forced is not None:
            backend = forced
            explicit = True
        else:
            explicit = False
    else:
        explicit = True
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'")

    if explicit:
        why = _why_not(backend, device)
        if why is not None:
            raise BackendUnavailable(f"{op}: backend {backend!r} cannot run here: {why}")
        chosen = backend
    elif device.type == "cuda" and triton_error() is None:
        chosen = "triton"
    elif device.type == "cpu" and _C is not None:
        chosen = "cpp"
    else:
        chosen = "reference"
    _LAST[op] = chosen
    return chosen


def _why_not(backend: str, device: torch.device) -> Optional[str]:
    if backend == "reference":
        return None
    if backend == "cpp":
        if _C is None:
            return _C_ERROR
        if device.type != "cpu":
            return f"the C++ kernels read host memory; got a tensor on {device}"
        return None
    why = triton_error()
    if why is not None:
        return why
    if device.type != "cuda" and not triton_interpreted():
        return f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1); got one on {device}"
    return None


def last_backend(op: str) -> Optional[str]:
    """Which backend the most recent call of `op` used ('cpp', 'triton' or 'reference')."""
    return _LAST.get(op)


def num_threads() -> int:
    """Threads the C++ kernels use: torch's intra-op setting, so OMP_NUM_THREADS / torch.set_num_threads govern both."""
    return max(1, torch.get_num_threads())
