"""`python -m tensorguard_fast.info`: what was built, which backends are usable here, and why not."""
from __future__ import annotations

import json
import os
import platform
import sys

import torch

from . import _backend
from ._version import __version__


def collect() -> dict:
    ext = _backend.cpp()
    cpp = {"usable": ext is not None, "why_not": _backend.cpp_error()}
    if ext is not None:
        cpp.update(openmp=bool(ext.has_openmp()), omp_max_threads=int(ext.max_threads()),
                   threads_used=_backend.num_threads())
    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        pass
    return {
        "tensorguard_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "forced_backend": os.environ.get("TENSORGUARD_FAST_BACKEND") or None,
        "cpp": cpp,
        "triton": {"installed": triton_version, "usable": _backend.triton_error() is None,
                   "interpreter": _backend.triton_interpreted(), "why_not": _backend.triton_error()},
        "cuda": {"available": torch.cuda.is_available(),
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }


def render(info: dict) -> str:
    lines = [f"tensorguard-fast {info['tensorguard_fast']}  (python {info['python']}, torch {info['torch']})"]
    c = info["cpp"]
    if c["usable"]:
        lines.append(f"  C++ (_C):   usable, OpenMP {'on' if c['openmp'] else 'off'}, {c['threads_used']} thread(s)")
    else:
        lines.append(f"  C++ (_C):   not usable: {c['why_not']}")
    t = info["triton"]
    state = "usable" + (" (interpreter)" if t["interpreter"] else "") if t["usable"] else f"not usable: {t['why_not']}"
    lines.append(f"  Triton:     {t['installed'] or 'not installed'}, {state}")
    cu = info["cuda"]
    lines.append(f"  CUDA:       {cu['device'] if cu['available'] else 'not available'}")
    if info["forced_backend"]:
        lines.append(f"  forced by TENSORGUARD_FAST_BACKEND={info['forced_backend']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tensorguard_fast.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
