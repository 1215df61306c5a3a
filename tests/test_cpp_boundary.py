"""The checked hand-off to C++ (tensorguard_fast.ops._cpp): every wrong input raises a one-line error naming the kernel
and the argument before any address reaches the extension, and no other module hands the extension an address.

Each case builds the valid arguments of a kernel, breaks exactly one (dtype, device, layout, shape, value), and
expects the error; the valid call is run too, so a check that rejects everything cannot pass.
The "meta" device stands in for any non-CPU device (its tensors have no host memory at all).
"""
import ast
import math
import re
from pathlib import Path

import pytest
import torch

from tensorguard_fast import _backend
from tensorguard_fast.ops import _cpp

pytestmark = pytest.mark.skipif(_backend.cpp() is None, reason="needs the C++ extension")

PACKAGE = Path(__file__).resolve().parents[1] / "tensorguard_fast"


def _valid(kernel: str) -> dict:
    """Keyword arguments of a correct call of `kernel`."""
    g = torch.Generator().manual_seed(0)
    if kernel == "moments_many":
        return {"xs": [torch.randn(100, generator=g), torch.randn(7, generator=g).to(torch.bfloat16)]}
    if kernel == "fft_power_entropy":
        return {"spec": torch.randn(4, 6, dtype=torch.complex64, generator=g),
                "limit": torch.full((4,), 5, dtype=torch.int64)}
    if kernel == "twiddle_interleave":
        return {"zri": torch.randn(2, 3, 2, 5, generator=g), "k1_0": 0, "n": 15,
                "out": torch.empty(2, 3, 5, dtype=torch.complex64)}
    if kernel == "logsumexp_update":
        return {"z": torch.randn(4, 9, generator=g), "m": torch.full((4,), -math.inf, dtype=torch.float64),
                "s": torch.zeros(4, dtype=torch.float64), "bad": torch.zeros(4, dtype=torch.int64)}
    if kernel == "crop_error_rows":
        return {"z": torch.randn(4, 9, generator=g), "lse": torch.full((4,), 5.0, dtype=torch.float64),
                "labels": torch.tensor([0, 3, 100, -100])}
    if kernel == "pivoted_cholesky":
        a = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
        return {"gram": a @ a.mT, "rel_tol": 1e-12}
    if kernel == "spectrum_entropy":
        return {"svals": torch.rand(3, 8, generator=g, dtype=torch.float64), "q": 16, "squared": False}
    raise KeyError(kernel)


KERNELS = ["moments_many", "fft_power_entropy", "twiddle_interleave", "logsumexp_update", "crop_error_rows",
           "pivoted_cholesky", "spectrum_entropy"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_valid_call_runs(kernel):
    getattr(_cpp, kernel)(**_valid(kernel))


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same shape and dtype, every other element of a twice-as-long last dimension."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    return wide[..., ::2]


# (kernel, argument, how to break it, exception, words the message must contain)
CASES = [
    ("moments_many", "xs[0]", lambda t: t.to(torch.int32), TypeError, "dtype torch.int32"),
    ("moments_many", "xs[0]", lambda t: t.to("meta"), ValueError, "meta"),
    ("moments_many", "xs[0]", _non_contiguous, ValueError, "contiguous"),
    ("moments_many", "xs[0]", lambda t: t.numpy(), TypeError, "torch.Tensor"),
    ("fft_power_entropy", "spec", lambda t: t.real.contiguous(), TypeError, "complex"),
    ("fft_power_entropy", "spec", lambda t: t.to("meta"), ValueError, "meta"),
    ("fft_power_entropy", "spec", lambda t: t.mT, ValueError, "rows"),  # column-major
    ("fft_power_entropy", "spec", lambda t: t[:, :1].expand(4, 6), ValueError, "rows"),  # stride 0
    ("fft_power_entropy", "spec", lambda t: t.reshape(2, 2, 6), ValueError, "2-D"),
    ("fft_power_entropy", "spec", lambda t: t.conj(), ValueError, "conj"),
    ("fft_power_entropy", "limit", lambda t: t.to(torch.int32), TypeError, "int64"),
    ("fft_power_entropy", "limit", lambda t: t[:3], ValueError, "shape (4)"),
    ("fft_power_entropy", "limit", _non_contiguous, ValueError, "contiguous"),
    ("twiddle_interleave", "zri", lambda t: t.half(), TypeError, "float32"),
    ("twiddle_interleave", "zri", lambda t: t[:, :, :1].contiguous(), ValueError, "shape (*, *, 2, *)"),
    ("twiddle_interleave", "zri", lambda t: t.transpose(0, 1).contiguous().transpose(0, 1), ValueError, "contiguous"),
    ("twiddle_interleave", "out", lambda t: t.to(torch.complex128), TypeError, "complex64"),  # zri's precision
    ("twiddle_interleave", "out", lambda t: t.real, TypeError, "complex"),
    ("twiddle_interleave", "out", lambda t: t[:1], ValueError, "shape"),
    ("twiddle_interleave", "n", lambda v: 0, ValueError, ">= 1"),
    ("twiddle_interleave", "k1_0", lambda v: -1, ValueError, ">= 0"),
    ("twiddle_interleave", "n", lambda v: 15.0, ValueError, "int"),
    ("logsumexp_update", "z", lambda t: t.double(), TypeError, "float32"),
    ("logsumexp_update", "z", lambda t: t.to("meta"), ValueError, "meta"),
    ("logsumexp_update", "z", lambda t: t.T.contiguous().T, ValueError, "rows"),
    ("logsumexp_update", "m", lambda t: t.float(), TypeError, "float64"),
    ("logsumexp_update", "s", lambda t: t[:3], ValueError, "shape (4)"),
    ("logsumexp_update", "bad", lambda t: t.to(torch.int32), TypeError, "int64"),
    ("logsumexp_update", "bad", _non_contiguous, ValueError, "contiguous"),
    ("crop_error_rows", "z", lambda t: t.half(), TypeError, "float32"),
    ("crop_error_rows", "z", lambda t: t[:, :1].expand(4, 9), ValueError, "rows"),  # writes would overlap
    ("crop_error_rows", "z", lambda t: torch._neg_view(t), ValueError, "negative"),
    ("crop_error_rows", "lse", lambda t: t.float(), TypeError, "float64"),
    ("crop_error_rows", "lse", lambda t: t.unsqueeze(1), ValueError, "1-D"),
    ("crop_error_rows", "labels", lambda t: t.to(torch.int32), TypeError, "int64"),
    ("crop_error_rows", "labels", lambda t: t[:2], ValueError, "shape (4)"),
    ("pivoted_cholesky", "gram", lambda t: t.float(), TypeError, "float64"),
    ("pivoted_cholesky", "gram", lambda t: t[:, :, :4], ValueError, "shape (*, 4, 4)"),
    ("pivoted_cholesky", "gram", lambda t: t.mT.contiguous().mT, ValueError, "contiguous"),
    ("pivoted_cholesky", "gram", lambda t: t[0], ValueError, "3-D"),
    ("pivoted_cholesky", "rel_tol", lambda v: -1.0, ValueError, "rel_tol"),
    ("spectrum_entropy", "svals", lambda t: t.float(), TypeError, "float64"),
    ("spectrum_entropy", "svals", lambda t: t.mT, ValueError, "contiguous"),
    ("spectrum_entropy", "svals", lambda t: t.to("meta"), ValueError, "meta"),
    ("spectrum_entropy", "q", lambda v: 1, ValueError, ">= 2"),
    ("spectrum_entropy", "q", lambda v: -5, ValueError, ">= 2"),
]


@pytest.mark.parametrize("kernel,arg,breaks,exc,words", CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_wrong_input_raises_naming_kernel_and_argument(kernel, arg, breaks, exc, words):
    kwargs = _valid(kernel)
    if arg.startswith("xs["):
        i = int(arg[3])
        kwargs["xs"][i] = breaks(kwargs["xs"][i])
    else:
        kwargs[arg] = breaks(kwargs[arg])
    name = kernel.replace("_many", "")  # moments_many reports as the op users call
    with pytest.raises(exc) as info:
        getattr(_cpp, kernel)(**kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name}: "), msg
    assert f"'{arg}'" in msg, msg
    assert re.search(re.escape(words), msg), msg


def test_inputs_are_not_written_when_a_check_fails():
    kwargs = _valid("crop_error_rows")
    z = kwargs["z"].clone()
    with pytest.raises(TypeError):
        _cpp.crop_error_rows(kwargs["z"], kwargs["lse"].float(), kwargs["labels"])
    assert torch.equal(kwargs["z"], z)


def test_row_slices_are_read_correctly():
    """A column slice of a wider matrix (rows contiguous, row stride > columns) is accepted and read at its own
    stride: the kernels' results equal those on a contiguous copy."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(5, 12, generator=g)
    z = wide[:, 2:9]
    outs = []
    for zz in (z, z.contiguous()):
        m = torch.full((5,), -math.inf, dtype=torch.float64)
        s = torch.zeros(5, dtype=torch.float64)
        bad = torch.zeros(5, dtype=torch.int64)
        _cpp.logsumexp_update(zz, m, s, bad)
        outs.append(m + s.log())
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-12)
    assert torch.allclose(outs[0], torch.logsumexp(z.double(), 1), rtol=1e-6)
    spec = torch.randn(4, 10, dtype=torch.complex128, generator=g)
    lim = torch.full((4,), 9, dtype=torch.int64)
    a = _cpp.fft_power_entropy(spec[:, 1:7], lim)
    b = _cpp.fft_power_entropy(spec[:, 1:7].contiguous(), lim)
    assert a[0] == pytest.approx(b[0], rel=1e-14) and a[1] == pytest.approx(b[1], rel=1e-14)
    assert a[0] == pytest.approx(float((spec[:, 1:7].abs() ** 2).sum()), rel=1e-12)


def test_no_other_module_hands_the_extension_an_address():
    """Only ops/_cpp.py may call data_ptr() or a kernel of the extension."""
    kernels = set(KERNELS) | {"moments"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_cpp.py" and path.parent.name == "ops":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "data_ptr":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} data_ptr")
            if (isinstance(node, ast.Attribute) and node.attr in kernels and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "attr", "") == "cpp"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} _backend.cpp().{node.attr}")
    assert not offenders, offenders
