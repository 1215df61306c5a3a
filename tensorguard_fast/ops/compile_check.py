"""Compile every Triton kernel for a Hopper GPU (sm_90) without one: `python -m tensorguard_fast.ops.compile_check`.

Triton's CPU interpreter (TRITON_INTERPRET=1, used by the tests) runs kernels as Python and accepts code the real
compiler rejects (a non-constexpr global, a dtype mismatch in tl.where, an unsupported op). This runs the real
pipeline (Python AST -> TTIR -> TTGIR -> LLVM -> PTX -> cubin, ptxas included) on the CPU for each kernel listed
in a `*_triton` module's COMPILE_SPECS = [(kernel, signature, constexprs), ...]. Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys


def kernel_modules():
    from tensorguard_fast import ops

    for info in pkgutil.iter_modules(ops.__path__):
        if info.name.endswith("_triton"):
            yield importlib.import_module(f"tensorguard_fast.ops.{info.name}")


def main(arch: int = 90) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    failures = 0
    count = 0
    for module in kernel_modules():
        for kernel, signature, constexprs in getattr(module, "COMPILE_SPECS", []):
            count += 1
            name = f"{module.__name__.rsplit('.', 1)[1]}.{kernel.fn.__name__} {constexprs}"
            try:
                sig = dict(signature)
                for key in constexprs:
                    sig.setdefault(key, "constexpr")
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=target)
                print(f"ok   {name}: {len(compiled.asm['cubin'])} bytes of sm_{arch} code, "
                      f"{compiled.metadata.num_warps} warps, {compiled.metadata.shared} B shared")
            except Exception as exc:  # report every kernel, not just the first failure
                failures += 1
                print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    print(f"{count - failures}/{count} kernels compiled for sm_{arch}")
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    raise SystemExit(main())
