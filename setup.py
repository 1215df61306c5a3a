"""Builds tensorguard_fast._C, the C++ CPU kernels, with pybind11 (no libtorch: buffers come in as raw arrays).

Portable flags by default; TENSORGUARD_FAST_NATIVE=1 adds -march=native. The kernels also carry
per-function target clones (AVX-512 / AVX2 / baseline) chosen at load time, so a portable build is still vectorised.
"""
import os
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(flag: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        cxx = os.environ.get("CXX", "c++")
        res = subprocess.run([cxx, flag, src, "-o", os.path.join(tmp, "t")], capture_output=True)
        return res.returncode == 0


def _extension() -> Pybind11Extension:
    compile_args = ["-O3", "-fno-math-errno", "-fopenmp-simd"]
    link_args = []
    macros = []
    if sys.platform != "win32" and _compiler_accepts("-fopenmp"):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
        macros.append(("TGF_HAVE_OPENMP", "1"))
    if os.environ.get("TENSORGUARD_FAST_NATIVE") == "1":
        compile_args.append("-march=native")
    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
    return Pybind11Extension(
        "tensorguard_fast._C",
        sources,
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=macros,
    )


setup(ext_modules=[_extension()], cmdclass={"build_ext": build_ext})
