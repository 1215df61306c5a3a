"""moments / moments_many / outer_moments against the float64 reference (tensorguard_fast.reference).

Tolerances, derived:
- C++ accumulates float64 inputs in float64 from the exact upcast of each input element, so it must agree with the
  float64 two-pass reference to ~1e-12 relative (we allow 1e-10: chunk merges add a few roundings).
- Triton accumulates each block in float32 with tree sums (log2(4096) = 12 levels): relative error <= ~12 * 2^-24 =
  7e-7 of the sum of magnitudes; partials are merged in float64. We allow 4e-6 relative (std, L1, L2), 4e-6 of
  mean|x| for the mean, and 2e-5 absolute for skewness/kurtosis (scale-free ratios of those sums).
- bf16/fp16 inputs are judged against the reference on the same (upcast) values: low precision enters only through
  the input, which both paths read identically.
- C++ bf16/fp16/fp32 on AVX-512 and on AVX2 accumulate power sums of d = x - c in float32 (u = 2^-24) in chunks
  whose mean lies within half a chunk std of c (else the chunk is redone about its mean, or in float64). A lane's
  float32 sum before each float64 flush takes 7 roundings: on AVX-512 four sums of 6 terms (5 roundings each) added
  pairwise (2 more); on AVX2 two sums of 7 terms (6 each) added once. Adding two partial sums that err by at most
  k u of their own |terms| errs by at most (k + 1) u of all of them, so 7u either way. First-order bounds per chunk,
  from the term roundings (d: u, d^2: 3u, or 2u formed inside an fma, d^3 in an fma: 4u, d^4: 6u) plus those 7
  summation roundings (7u), relative to the sums of |terms|:
      l1: 7u;  s1: 8u sum|d|;  s2: 10u sum d^2;  s3: 11u sum|d|^3;  s4: 13u sum d^4.
  With n a^2 <= m2 / 4 (a = chunk mean - c): sum d^2 <= 1.25 m2, and m2 = s2 - s1 a errs by <= 10u * 1.25 m2
  + 2|a| * 8u sum|d| <= 12.5u m2 + 9u m2 = 21.5u m2, so std errs by <= 10.8u = 6.4e-7 relative; sum x^2 =
  s2 + 2c s1 + n c^2 errs by <= (10u * 1.25 + 16u) sum x^2, so L2 by <= 14.3u = 8.5e-7; L1 by 7u = 4.2e-7; the mean
  by |s1 error| / n <= 8u * 1.12 std = 5.4e-7 std. Float64 flushes and merges add ~n * 2^-53, negligible. Hence
  the 1e-6 relative bound of issue 13 for std, L1, L2, and for the mean against max(mean|x|, std).
  Skewness and kurtosis are ratios of those sums: their errors are ~u times the standardised absolute moments
  (E|z|^3, E z^4 <~ 10 for the test data) times the constants above, <= ~100u * E z^4 = 6e-5 for kurtosis: we allow
  2e-5 * max(1, |value|) (|kurtosis| >= 3 whenever E z^4 >= 6), the Triton bound, which has the same float32 form.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorguard_fast as tgf
from tensorguard_fast import _backend, reference
from tensorguard_fast.ops.moments import moments, moments_many, outer_moments
from tensorguard_fast.stats import Moments

from conftest import requires_triton, triton_device

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BLOCKS = (torch.bfloat16, torch.float16, torch.float32)  # summed in float32 blocks (header)


def cpp_tol(dtype) -> dict:
    """Tolerances of the C++ path for inputs of `dtype` (header): the float32-block bound for bf16/fp16/fp32, float64
    for float64."""
    return {"rel": 1e-6, "skew_abs": 2e-5} if dtype in BLOCKS else {"rel": 1e-10, "skew_abs": 1e-9}


FIELDS = ("count", "mean", "std", "skewness", "kurtosis", "min", "max", "l1", "l2", "nonfinite")


def assert_close(got: Moments, want: Moments, rel: float, skew_abs: float, exact_extremes: bool = True):
    assert got.count == want.count and got.nonfinite == want.nonfinite
    if want.count == 0:
        assert math.isnan(got.mean) and got.l1 == 0 and got.l2 == 0
        return
    scale = max(want.l1 / want.count, want.std)  # mean |x|, or the spread: sums about a shift err relative to it
    assert abs(got.mean - want.mean) <= rel * scale + 1e-300, (got.mean, want.mean)
    # Each deviation x - mean carries a rounding error of ~eps * |mean| (eps = 2^-52, float64), i.e. a relative error
    # of eps * |mean| / std that the reference shares: it bounds how well any two float64 methods can agree.
    offset = 20 * 2.0 ** -52 * abs(want.mean) / want.std if want.std > 0 else 0.0
    assert got.std == pytest.approx(want.std, rel=rel + offset, abs=1e-300)
    for f in ("l1", "l2"):
        assert getattr(got, f) == pytest.approx(getattr(want, f), rel=rel, abs=1e-300), f
    if exact_extremes:  # every kernel reads the input values exactly
        assert got.min == want.min and got.max == want.max
    else:
        assert (got.min, got.max) == pytest.approx((want.min, want.max), rel=rel)
    shape_tol = skew_abs + offset  # ratios of central sums: the same deviation error
    for f in ("skewness", "kurtosis"):
        a, b = getattr(got, f), getattr(want, f)
        if math.isnan(b):
            continue  # degenerate spread: the kernels may round to a tiny non-zero variance
        assert abs(a - b) <= shape_tol * max(1.0, abs(b)), (f, a, b)


def make(n: int, dtype: torch.dtype, seed: int, nonfinite: int = 0, loc: float = 0.0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale + loc
    # a skewed, heavy-tailed part so skewness and kurtosis are not ~0
    if n > 3:
        x[: n // 3] = torch.empty(n // 3, dtype=torch.float64).exponential_(generator=g) * scale + loc
    if nonfinite and n:
        idx = torch.randint(0, n, (nonfinite,), generator=g)
        vals = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
        x[idx] = vals[torch.arange(nonfinite) % 3]
    return x.to(dtype)


# 16, 31, 33, 48: around the 16-lane steps and the masked tail of the AVX-512 bodies; 63-65, 383-385: around the
# 64-value steps and 384-value float32 blocks of AVX-512's, 4095-4097 around a chunk
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 16, 31, 33, 48, 63, 64, 65, 127, 383, 384, 385, 4095, 4096, 4097, 1000003])
def test_cpp_matches_reference(n, dtype):
    x = make(n, dtype, seed=n, nonfinite=min(n // 50, 9))
    assert_close(moments(x, backend="cpp"), reference.moments(x), **cpp_tol(dtype))
    assert _backend.last_backend("moments") == "cpp"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 70000), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
       nonfinite=st.integers(0, 5), loc=st.sampled_from([0.0, 1e-3, 7.0, -1e4]),
       scale=st.sampled_from([1e-6, 1.0, 1e3]))
def test_cpp_hypothesis(n, dtype, seed, nonfinite, loc, scale):
    x = make(n, dtype, seed, nonfinite, loc, scale)
    tol = cpp_tol(dtype)
    assert_close(moments(x, backend="cpp"), reference.moments(x), rel=max(tol["rel"], 1e-9),
                 skew_abs=max(tol["skew_abs"], 1e-7))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [0, 1, 7, 127, 4097, 1000003])
def test_triton_matches_reference(n, dtype):
    x = make(n, dtype, seed=n + 1, nonfinite=min(n // 50, 9)).to(triton_device())
    got = moments(x, backend="triton")
    assert _backend.last_backend("moments") == "triton"
    assert_close(got, reference.moments(x), rel=4e-6, skew_abs=2e-5)


@requires_triton
@settings(max_examples=12, deadline=None)
@given(n=st.integers(0, 20000), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1), nonfinite=st.integers(0, 5))
def test_triton_hypothesis(n, dtype, seed, nonfinite):
    x = make(n, dtype, seed, nonfinite).to(triton_device())
    assert_close(moments(x, backend="triton"), reference.moments(x), rel=4e-6, skew_abs=2e-5)


@requires_triton
def test_cpp_triton_reference_agree():
    x = make(300007, torch.bfloat16, seed=3, nonfinite=4)
    a = moments(x, backend="cpp")
    b = moments(x.to(triton_device()), backend="triton")
    c = moments(x, backend="reference")
    assert_close(a, c, **cpp_tol(x.dtype))
    assert_close(b, c, rel=4e-6, skew_abs=2e-5)


def test_conventions_match_scipy_and_torch():
    x = make(10007, torch.float64, seed=11)
    m = moments(x)
    v = x.numpy()
    assert m.skewness == pytest.approx(scipy.stats.skew(v), rel=1e-9)
    assert m.kurtosis == pytest.approx(scipy.stats.kurtosis(v), rel=1e-9)  # Fisher, biased
    assert m.std == pytest.approx(float(x.std(correction=0)), rel=1e-12)
    assert m.l2 == pytest.approx(float(torch.linalg.vector_norm(x)), rel=1e-12)
    assert m.l1 == pytest.approx(float(x.abs().sum()), rel=1e-12)


def test_all_nonfinite_and_empty():
    x = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float32)
    m = moments(x)
    assert m.count == 0 and m.nonfinite == 3 and math.isnan(m.mean) and math.isnan(m.std)
    e = moments(torch.empty(0))
    assert e.count == 0 and e.nonfinite == 0 and e.l2 == 0.0
    assert math.isnan(e.skewness)


def test_constant_input_has_nan_shape_statistics():
    m = moments(torch.full((1001,), 3.25))
    assert m.std == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(m.skewness) and math.isnan(m.kurtosis)


def test_large_offset_is_stable():
    # mean 1e6, spread 1e-2: naive sum-of-powers would lose every digit of the variance in float64.
    x = make(200003, torch.float64, seed=5, loc=1e6, scale=1e-2)
    assert_close(moments(x), reference.moments(x), rel=1e-8, skew_abs=1e-4)


@pytest.mark.parametrize("dtype", BLOCKS)
@pytest.mark.parametrize("case", ["huge", "tiny", "sorted", "shifted_blocks", "nonfinite_every_chunk", "constant"])
def test_cpp_float32_blocks_fall_back_where_they_cannot_vouch(case, dtype):
    """Inputs the float32 blocks must refuse (the chunk is then redone about its mean, or in float64): |d| beyond
    2^28 (d^4 overflows float32), below 2^-28 (d^4 underflows), chunk means far from the running mean (sorted data,
    blocks at different offsets: the central sums would cancel), a non-finite value in every chunk; and a constant."""
    g = torch.Generator().manual_seed(17)
    n = 5 * 4096 + 77
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if case == "huge":
        x = x * (3e4 if dtype == torch.float16 else 1e30)  # fp16 tops out at 65504
    elif case == "tiny":
        x = x * (1e-6 if dtype == torch.float16 else 1e-30)
    elif case == "sorted":
        x = x.sort().values
    elif case == "shifted_blocks":
        x = x + torch.arange(n, dtype=torch.float64).div(4096, rounding_mode="floor") * 50.0
    elif case == "nonfinite_every_chunk":
        x[::3000] = math.inf
        x[1::3001] = math.nan
    else:
        x = torch.full((n,), 0.3, dtype=torch.float64)
    x = x.to(dtype)
    want = reference.moments(x)
    got = moments(x, backend="cpp")
    if case == "tiny" and dtype != torch.float16:
        assert got.kurtosis == pytest.approx(want.kurtosis, rel=1e-6)  # float32 would flush d^4 to zero
    assert_close(got, want, **cpp_tol(dtype))


def test_no_avx512_switch_selects_the_avx2_loops_in_every_kernel():
    """TGF_NO_AVX512=1 caps every vectorised kernel at AVX2 (csrc/common.h: isa_level); the results agree with the
    float64 reference within the float32-block bound for bf16 (the AVX2 twin of the blocks, moments_avx2.h: 7
    roundings per lane's float32 sum, as on AVX-512, so the same bound)."""
    code = ("import torch, tensorguard_fast._C as C\n"
            "from tensorguard_fast.ops.moments import moments\n"
            "from tensorguard_fast.ops.gram_entropy import gram_entropy_from_hidden\n"
            "g = torch.Generator().manual_seed(0)\n"
            "x = torch.randn(300001, generator=g).to(torch.bfloat16)\n"
            "m = moments(x, backend='cpp')\n"
            "h, w = torch.randn(2, 5, 32, generator=g), torch.randn(400, 32, generator=g)\n"
            "t = torch.randint(0, 400, (2, 5), generator=g)\n"
            "e = gram_entropy_from_hidden(h, w, t, vocab_chunk=64, backend='cpp')\n"
            "print(C.isa(), repr(m.std), repr(m.kurtosis), repr(e.tolist()))\n")
    outs = {}
    for flag in ("0", "1"):
        env = {**__import__("os").environ, "TGF_NO_AVX512": flag}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        outs[flag] = r.stdout.split(" ", 1)
    assert outs["1"][0] in ("avx2", "default")
    if _backend.cpp().isa() != "avx512":
        pytest.skip("this CPU has no AVX-512: both runs took the same (AVX2 or baseline) loops")
    assert outs["0"][0] == "avx512"
    g = torch.Generator().manual_seed(0)
    want = reference.moments(torch.randn(300001, generator=g).to(torch.bfloat16))
    std1, kurt1, ent1 = (eval(v) for v in outs["1"][1].split(" ", 2))
    std0, kurt0, ent0 = (eval(v) for v in outs["0"][1].split(" ", 2))
    for std, kurt in ((std1, kurt1), (std0, kurt0)):
        assert std == pytest.approx(want.std, rel=1e-6) and kurt == pytest.approx(want.kurtosis, abs=2e-5)
    assert ent0 == pytest.approx(ent1, abs=1e-6)  # float32 logits paths, different vector widths


def test_merge_equals_whole():
    x = make(50001, torch.float64, seed=9, nonfinite=3)   # float64: the merge alone adds roundings
    parts = [x[:1], x[1:20000], x[20000:20000], x[20000:]]
    merged = Moments.empty()
    for p in parts:
        merged = merged.merge(moments(p))
    assert_close(merged, reference.moments(x), rel=1e-10, skew_abs=1e-8)


def test_moments_many_matches_single():
    xs = [make(n, dt, seed=n) for n, dt in [(0, torch.float32), (5, torch.bfloat16), (70001, torch.float16)]]
    for got, x in zip(moments_many(xs), xs):
        assert_close(got, reference.moments(x), **cpp_tol(x.dtype))
    assert moments_many([]) == []


def test_non_contiguous_and_2d():
    x = make(300 * 257, torch.float32, seed=2).reshape(300, 257).T  # a transposed view
    assert_close(moments(x), reference.moments(x), **cpp_tol(x.dtype))


@pytest.mark.parametrize("m,n", [(1, 1), (7, 1), (1, 127), (97, 1003)])
def test_outer_rank1_exact(m, n):
    g = torch.Generator().manual_seed(m * n)
    u, x = torch.randn(m, generator=g), torch.randn(n, generator=g)
    assert_close(outer_moments(u, x), reference.outer_moments(u.unsqueeze(0), x.unsqueeze(0)), rel=1e-9,
                 skew_abs=1e-7, exact_extremes=False)


def test_outer_rank1_nonfinite_pairs_are_excluded():
    u = torch.tensor([1.0, math.nan, 2.0, -3.0])
    x = torch.tensor([0.5, math.inf, -1.0])
    got = outer_moments(u, x)
    want = reference.outer_moments(u.unsqueeze(0), x.unsqueeze(0))
    assert got.nonfinite == want.nonfinite == 12 - 3 * 2
    assert_close(got, want, rel=1e-12, skew_abs=1e-10)


@pytest.mark.parametrize("k,m,n", [(2, 5, 7), (4, 1030, 33), (15, 300, 2000)])
def test_outer_rank_k_tiles(k, m, n):
    g = torch.Generator().manual_seed(k)
    u, x = torch.randn(k, m, generator=g), torch.randn(k, n, generator=g)
    # float32 GEMM tiles: rounding of each entry ~ k * 2^-24 relative, far inside 1e-5
    assert_close(outer_moments(u, x, tile_rows=128), reference.outer_moments(u, x), rel=1e-5, skew_abs=1e-4,
                 exact_extremes=False)


def test_outer_shape_errors():
    with pytest.raises(ValueError, match="same k"):
        outer_moments(torch.randn(2, 3), torch.randn(3, 3))


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="int64"):
        moments(torch.arange(5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        moments(np.zeros(3))
    with pytest.raises(ValueError, match="unknown backend"):
        moments(torch.zeros(3), backend="fortran")


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(tgf.BackendUnavailable, match="triton"):
        moments(torch.zeros(3), backend="triton")


def test_reference_switch_and_missing_extension():
    code = ("import warnings, torch, tensorguard_fast as t\n"
            "m = t.moments(torch.ones(10))\n"
            "print(t.last_backend('moments'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "TENSORGUARD_FAST_BACKEND": "reference"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    # Without the compiled extension the package still imports, warns once and falls back.
    block = ("import sys, importlib.abc\n"
             "class Block(importlib.abc.MetaPathFinder):\n"
             "    def find_spec(self, name, path, target=None):\n"
             "        if name == 'tensorguard_fast._C': raise ImportError('blocked for the test')\n"
             "sys.meta_path.insert(0, Block())\n")
    out = subprocess.run([sys.executable, "-W", "always", "-c", block + code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    assert "did not load" in out.stderr and "blocked for the test" in out.stderr


def test_rank1_moments_batched_equal_each_materialised_outer_product():
    """The batched rank-1 op (what the lineage profile calls) against the float64 moments of each u_b x_b^T formed
    whole; a NaN factor entry removes its row of pairs; bf16 factors are read exactly (upcast first)."""
    from tensorguard_fast.ops.moments import rank1_moments

    g = torch.Generator().manual_seed(4)
    u, x = torch.randn(3, 301, generator=g, dtype=torch.float64), torch.randn(3, 77, generator=g, dtype=torch.float64)
    u[1, 5] = math.nan
    for uu, xx in ((u, x), (u.float(), x.to(torch.bfloat16))):
        got = rank1_moments(uu, xx)
        assert len(got) == 3
        for b in range(3):
            want = reference.moments(torch.outer(uu[b].double(), xx[b].double()))
            assert_close(got[b], want, rel=1e-12, skew_abs=1e-10, exact_extremes=False)
    with pytest.raises(ValueError, match="same B"):
        rank1_moments(u, x[:2])
