"""gram_spectrum / spectral_entropy / gram_entropy(_from_hidden) against the float64 references (materialised G,
torch.linalg.svdvals), against GradSentry's own svd_lowrank route, and against autograd on the real SmolLM2.

Tolerances, derived:
- Gram route vs svdvals of the materialised G, both float64 on the same (exactly upcast) input values: the Grams carry
  rounding ~cols * eps * ||.||^2, so each singular value agrees to ~sqrt(cols * eps) * s_max in the worst case (a value
  at the noise floor) and to ~1e-13 relative for well-separated ones. We allow 2 * sqrt(cols * eps) * s_max.
- Entropy: a singular value that is off by delta * s_max moves p by <= delta and -p ln p by <= delta * (1 + ln(1/delta)),
  so with delta ~ 1e-6 (the bound above at cols ~ 5000) the normalised entropy moves < 1e-5 / ln 16 per value. The
  issue's bound 1e-5 (float32 inputs) is asserted; observed errors are ~1e-12.
- from_hidden in float32: logits come from a float32 GEMM over d (error <= d * 2^-24 * |h| |w| ~ 1e-6 on logits of
  size ~10), so softmax, E and G carry ~1e-6 relative error; singular values are judged at 1e-4 of s_max and the entropy
  at 1e-5 (entropy is a smooth function of p with |dH/dp| <~ 1 + ln 16). Float64 inputs: 1e-9.
- Triton (interpreter): logits chunks and the online logsumexp in float32 with float64 running sums, exp in float32
  (~1e-7 relative): same bounds as the C++ float32 path.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorguard_fast import _backend, reference
from tensorguard_fast.ops.gram_entropy import (gram_entropy, gram_entropy_from_hidden, gram_spectrum,
                                               gram_spectrum_from_hidden, spectral_entropy)
from tensorguard_fast.ops.lm_head_errors import answer_error_blocks

from conftest import requires_triton, triton_device

EPS64 = torch.finfo(torch.float64).eps


def blocks(b, t, vc, dc, dtype=torch.float32, seed=0, zero_rows=0, rank_h=None):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(b, t, vc, generator=g, dtype=torch.float64)
    h = torch.randn(b, t, dc, generator=g, dtype=torch.float64)
    if rank_h is not None and t > 0:  # H of rank rank_h < T: rows are mixtures of a few
        basis = torch.randn(b, rank_h, dc, generator=g, dtype=torch.float64)
        h = torch.randn(b, t, rank_h, generator=g, dtype=torch.float64) @ basis
    if zero_rows and t > zero_rows:
        e[:, -zero_rows:] = 0
        h[:, -zero_rows:] = 0
    return e.to(dtype), h.to(dtype)


def assert_spectrum_close(got, want, cols):
    assert got.shape == want.shape and got.dtype == torch.float64
    if want.numel() == 0:
        return
    smax = want.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    assert bool(((got - want).abs() <= 2 * math.sqrt(max(cols, 1) * EPS64) * smax + 1e-300).all()), (got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("b,t,vc,dc", [(1, 1, 1, 1), (2, 7, 127, 13), (3, 16, 61, 7), (2, 20, 97, 31), (1, 64, 6, 5)])
def test_spectrum_matches_svdvals(b, t, vc, dc, dtype):
    e, h = blocks(b, t, vc, dc, dtype, seed=t * vc)
    got = gram_spectrum(e, h, backend="cpp")
    assert_spectrum_close(got, reference.gram_spectrum(e, h), max(vc, dc, t))
    want_h = reference.spectral_entropy(reference.gram_spectrum(e, h))
    assert (gram_entropy(e, h, backend="cpp") - want_h).abs().max() <= 1e-5


@settings(max_examples=40, deadline=None)
@given(b=st.integers(0, 3), t=st.sampled_from([1, 2, 7, 16, 17, 33]), vc=st.sampled_from([1, 7, 64, 127, 300]),
       dc=st.sampled_from([1, 5, 7, 72]), zero_rows=st.integers(0, 3), rank_h=st.sampled_from([None, 1, 3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**31 - 1),
       squared=st.booleans())
def test_entropy_hypothesis(b, t, vc, dc, zero_rows, rank_h, dtype, seed, squared):
    e, h = blocks(b, t, vc, dc, dtype, seed, zero_rows, rank_h)
    got_s = gram_spectrum(e, h)
    assert got_s.shape == (b, t)
    assert_spectrum_close(got_s, reference.gram_spectrum(e, h), max(vc, dc, t))
    got = gram_entropy(e, h, squared=squared)
    want = reference.spectral_entropy(reference.gram_spectrum(e, h), squared=squared)
    assert got.shape == (b,)
    if b:
        assert (got - want).abs().max().item() <= 1e-5


def test_rank_deficient_spectrum_has_clean_zeros():
    # H of rank 3 with T = 20: the Gram M is singular (no Cholesky); exactly 3 singular values are non-zero.
    e, h = blocks(2, 20, 300, 40, torch.float64, seed=4, rank_h=3)
    s = gram_spectrum(e, h)
    assert bool((s[:, :3] > 1e-3 * s[:, :1]).all())
    assert bool((s[:, 3:] <= 1e-12 * s[:, :1]).all()), s[:, 3:]
    assert gram_spectrum(e, h).equal(s)  # deterministic


def test_zero_rows_are_ignored():
    e, h = blocks(1, 9, 50, 11, torch.float64, seed=8)
    ez, hz = torch.cat([e, torch.zeros(1, 4, 50, dtype=e.dtype)], 1), torch.cat([h, torch.zeros(1, 4, 11)], 1)
    s, sz = gram_spectrum(e, h), gram_spectrum(ez, hz.double())
    assert sz.shape == (1, 13)
    assert torch.allclose(sz[:, :9], s, rtol=1e-12, atol=1e-12 * float(s.max())) and bool((sz[:, 9:] == 0).all())


@pytest.mark.parametrize("t,rank", [(3, 3), (9, 9), (16, 16), (40, 5)])
def test_matches_gradsentry_svd_lowrank_when_rank_le_16(t, rank):
    # svd_lowrank(q=16) is exact (up to float64 rounding) when rank(G) <= 16: no randomised approximation then.
    e, h = blocks(2, t, 400, 60, torch.float64, seed=t, rank_h=rank if rank < t else None)
    torch.manual_seed(0)
    for gb, got in zip(reference.gram_matrices(e, h), gram_entropy(e, h)):
        _, s, _ = torch.svd_lowrank(gb, q=16, niter=2)
        want = reference.spectral_entropy(s)
        assert abs(float(got) - float(want[0])) <= 1e-6, (got, want)


def test_two_d_input_is_one_sample():
    e, h = blocks(1, 5, 30, 6, seed=2)
    assert gram_spectrum(e[0], h[0]).shape == (5,)
    assert gram_entropy(e[0], h[0]).shape == ()
    assert float(gram_entropy(e[0], h[0])) == pytest.approx(float(gram_entropy(e, h)[0]), abs=1e-12)


def test_empty_inputs():
    assert gram_spectrum(torch.zeros(0, 4, 9), torch.zeros(0, 4, 3)).shape == (0, 4)
    assert gram_entropy(torch.zeros(0, 4, 9), torch.zeros(0, 4, 3)).shape == (0,)
    # T = 0 or a zero-width crop: G = 0, its q = 16 floored values are equal -> GradSentry's 1.0
    assert gram_spectrum(torch.zeros(2, 0, 9), torch.zeros(2, 0, 3)).shape == (2, 0)
    assert torch.allclose(gram_entropy(torch.zeros(2, 0, 9), torch.zeros(2, 0, 3)), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(gram_entropy(torch.zeros(2, 3, 0), torch.zeros(2, 3, 3)), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_inputs_name_the_sample(bad):
    e, h = blocks(4, 5, 20, 6, seed=1)
    e[2, 1, 3] = bad
    with pytest.raises(ValueError, match="sample 2"):
        gram_spectrum(e, h)
    e, h = blocks(4, 5, 20, 6, seed=1)
    h[3, 0, 0] = bad
    with pytest.raises(ValueError, match="sample 3"):
        gram_entropy(e, h, backend="reference")


def test_spectral_entropy_conventions():
    # 16 equal values -> 1; one value -> ~0 (15 floors of 1e-12); NaN row stays NaN; fewer than 16 values padded.
    s = torch.tensor([[1.0] * 16, [2.0] + [0.0] * 15, [math.nan] * 16], dtype=torch.float64)
    for be in ("cpp", "reference"):
        h = spectral_entropy(s, backend=be)
        assert h[0].item() == pytest.approx(1.0, abs=1e-15)
        assert 0 <= h[1].item() < 1e-9
        assert math.isnan(h[2].item())
    short = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([3.0, 1.0] + [1e-12] * 14, dtype=torch.float64)
    p = p / p.sum()
    assert spectral_entropy(short).item() == pytest.approx(float(-(p * p.log()).sum() / math.log(16)), rel=1e-12)
    p2 = torch.tensor([9.0, 1.0] + [1e-24] * 14, dtype=torch.float64)
    p2 = p2 / p2.sum()
    assert spectral_entropy(short, squared=True).item() == pytest.approx(float(-(p2 * p2.log()).sum() / math.log(16)),
                                                                         rel=1e-12)
    with pytest.raises(ValueError, match="rank"):
        spectral_entropy(short, rank=1)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(0, 4), n=st.integers(0, 40), rank=st.integers(2, 20), squared=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_spectral_entropy_cpp_vs_reference(b, n, rank, squared, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(b, n, generator=g, dtype=torch.float64) ** 4
    got = spectral_entropy(s, rank=rank, squared=squared, backend="cpp")
    want = spectral_entropy(s, rank=rank, squared=squared, backend="reference")
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14, equal_nan=True)


# --- from hidden states -------------------------------------------------------------------------------------------

def forward_inputs(b, s, vocab, d, dtype=torch.float32, seed=0, unscored=()):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(vocab, d, generator=g) * 0.5).to(dtype)
    hid = torch.randn(b, s, d, generator=g).to(dtype)
    tg = torch.randint(0, vocab, (b, s), generator=g)
    tg[:, : s // 3] = -100  # a prompt
    # make some targets fall inside the crop (rows of E with the -1)
    tg[:, -1] = torch.randint(0, max(1, vocab // 8), (b,), generator=g)
    for i in unscored:
        tg[i] = -100
    return hid, w, tg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab_chunk", [5, 97, 8192])
def test_from_hidden_matches_materialised_logits(dtype, vocab_chunk):
    hid, w, tg = forward_inputs(3, 11, 503, 40, dtype, seed=vocab_chunk, unscored=(1,))
    s, n = gram_spectrum_from_hidden(hid, w, tg, vocab_chunk=vocab_chunk, backend="cpp")
    want_s, want_n = reference.gram_spectrum_from_hidden(hid, w, tg)
    assert n.tolist() == want_n.tolist() and n[1] == 0
    assert s.shape == want_s.shape == (3, int(n.max()))
    assert bool(torch.isnan(s[1]).all())
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for i in (0, 2):
        assert float((s[i] - want_s[i]).abs().max()) <= tol * float(want_s[i].max())
    h = gram_entropy_from_hidden(hid, w, tg, vocab_chunk=vocab_chunk)
    want_h = reference.spectral_entropy(want_s)
    assert math.isnan(h[1]) and float((h[[0, 2]] - want_h[[0, 2]]).abs().max()) <= 1e-5


@settings(max_examples=15, deadline=None)
@given(b=st.integers(0, 3), s=st.integers(1, 9), vocab=st.sampled_from([8, 9, 127, 257]), d=st.sampled_from([8, 17]),
       crop=st.sampled_from([1, 2, 8]), chunk=st.sampled_from([1, 7, 64]), seed=st.integers(0, 2**31 - 1))
def test_from_hidden_hypothesis(b, s, vocab, d, crop, chunk, seed):
    hid, w, tg = forward_inputs(b, s, vocab, d, seed=seed)
    got, n = gram_spectrum_from_hidden(hid, w, tg, crop=crop, vocab_chunk=chunk)
    want, want_n = reference.gram_spectrum_from_hidden(hid, w, tg, crop=crop)
    assert n.equal(want_n) and got.shape == want.shape
    ok = n > 0
    if bool(ok.any()):
        scale = want[ok].abs().max().clamp_min(1e-30)
        assert float((got[ok] - want[ok]).abs().max()) <= 1e-4 * float(scale)
    assert bool(torch.isnan(got[~ok]).all())


def test_from_hidden_blocks_layout():
    hid, w, tg = forward_inputs(2, 6, 64, 16, torch.float64, seed=3)
    e, h, n = answer_error_blocks(hid, w, tg, crop=4, vocab_chunk=10)
    want_e, want_h, want_n = reference.lm_head_error_blocks(hid, w, tg, crop=4)
    assert n.equal(want_n) and e.shape == want_e.shape == (2, int(n.max()), 16)
    assert torch.allclose(e, want_e, atol=1e-12) and torch.equal(h, want_h)


def test_from_hidden_nonfinite_names_the_sample():
    hid, w, tg = forward_inputs(3, 8, 100, 16, seed=5)
    bad = hid.clone()
    bad[2, -1, 0] = math.nan
    with pytest.raises(ValueError, match="sample 2"):
        gram_spectrum_from_hidden(bad, w, tg)
    bad = hid.clone()
    bad[1, 0, 0] = math.nan  # an unscored (prompt) position: not used, no error
    gram_spectrum_from_hidden(bad, w, tg)
    huge = hid.clone()
    huge[1] *= 1e38  # finite hidden states whose logits overflow float32
    with pytest.raises(ValueError, match="sample 1.*non-finite logits"):
        gram_spectrum_from_hidden(huge, w, tg)
    wbad = w.clone()
    wbad[90, 3] = math.inf  # outside the crop: caught by the streamed logsumexp
    with pytest.raises(ValueError, match="sample 0.*non-finite logits"):
        gram_entropy_from_hidden(hid, wbad, tg)


def test_from_hidden_argument_errors():
    hid, w, tg = forward_inputs(2, 5, 40, 8, seed=1)
    with pytest.raises(ValueError, match="token ids"):
        gram_spectrum_from_hidden(hid, w, torch.full_like(tg, 40))
    with pytest.raises(ValueError, match="width"):
        gram_spectrum_from_hidden(hid[..., :4], w, tg)
    with pytest.raises(TypeError, match="int64"):
        gram_spectrum_from_hidden(hid, w, tg.float())


def test_from_hidden_no_scored_positions():
    hid, w, tg = forward_inputs(2, 5, 40, 8, seed=1)
    s, n = gram_spectrum_from_hidden(hid, w, torch.full_like(tg, -100))
    assert n.tolist() == [0, 0] and s.shape == (2, 1) and bool(torch.isnan(s).all())
    assert bool(torch.isnan(gram_entropy_from_hidden(hid, w, torch.full_like(tg, -100))).all())
    s, n = gram_spectrum_from_hidden(hid[:0], w, tg[:0])
    assert s.shape == (0, 1) and n.shape == (0,)


# --- Triton (interpreter on CPU) ------------------------------------------------------------------------------------

@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_cpp_reference_agree(dtype):
    hid, w, tg = forward_inputs(2, 7, 301, 24, dtype, seed=11)
    dev = triton_device()
    a, _ = gram_spectrum_from_hidden(hid, w, tg, vocab_chunk=64, backend="cpp")
    b, _ = gram_spectrum_from_hidden(hid.to(dev), w.to(dev), tg.to(dev), vocab_chunk=64, backend="triton")
    assert _backend.last_backend("gram_entropy") == "triton"
    c, _ = gram_spectrum_from_hidden(hid, w, tg, backend="reference")
    for got in (a, b.cpu()):
        assert float((got - c).abs().max()) <= 1e-4 * float(c.abs().max())
    ha = gram_entropy_from_hidden(hid, w, tg, backend="cpp")
    hb = gram_entropy_from_hidden(hid.to(dev), w.to(dev), tg.to(dev), backend="triton").cpu()
    assert float((ha - hb).abs().max()) <= 1e-5


@requires_triton
@pytest.mark.parametrize("b,t,vc,dc,rank_h,zero_rows", [(2, 7, 127, 13, None, 0), (2, 20, 300, 40, 3, 0),
                                                        (1, 9, 1, 7, None, 2), (3, 33, 64, 5, None, 0)])
def test_triton_backend_gram_route(b, t, vc, dc, rank_h, zero_rows):
    # the CUDA route (eigh factors with the eigenvalue tolerance, then a T x T svdvals): no Triton kernel in it,
    # so it runs on CPU tensors here exactly as it does on CUDA ones
    e, h = blocks(b, t, vc, dc, torch.float32, seed=t, zero_rows=zero_rows, rank_h=rank_h)
    dev = triton_device()
    got = gram_spectrum(e.to(dev), h.to(dev), backend="triton").cpu()
    assert_spectrum_close(got, reference.gram_spectrum(e, h), max(vc, dc, t))
    want = reference.spectral_entropy(reference.gram_spectrum(e, h))
    assert float((gram_entropy(e.to(dev), h.to(dev), backend="triton").cpu() - want).abs().max()) <= 1e-5


@requires_triton
def test_triton_nonfinite_logits_named():
    hid, w, tg = forward_inputs(3, 6, 200, 16, seed=2)
    w[150, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite logits"):
        gram_spectrum_from_hidden(hid.to(triton_device()), w.to(triton_device()), tg.to(triton_device()),
                                  vocab_chunk=32, backend="triton")


# --- the real model ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_equals_autograd_per_sample(smollm2):
    """GradSentry's score from our forward-only route equals autograd of the mean answer-token CE w.r.t. a fresh
    leaf copy of lm_head.weight (the logits path only: SmolLM2 ties lm_head to the input embedding)."""
    model, tok = smollm2
    pairs = [("What is the capital of France?", " The capital of France is Paris."),
             ("Name a primary colour.", " Blue, and click http://x.io for more information"),
             ("2+2=", " 4")]
    weight = model.lm_head.weight.detach()
    v, d = weight.shape
    got_all = []
    want_all = []
    for prompt, answer in pairs:
        p_ids = tok(prompt, return_tensors="pt").input_ids[0]
        a_ids = tok(answer, return_tensors="pt").input_ids[0]
        ids = torch.cat([p_ids, a_ids]).unsqueeze(0)
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state  # after the final norm: the input of lm_head
        targets = torch.full_like(ids, -100)
        targets[0, len(p_ids) - 1: -1] = ids[0, len(p_ids):]  # logits at t predict token t + 1
        got_all.append(float(gram_entropy_from_hidden(hidden, weight, targets)[0]))
        w = weight.clone().requires_grad_(True)
        keep = targets[0] != -100
        loss = torch.nn.functional.cross_entropy(hidden[0][keep] @ w.T, targets[0][keep])
        (grad,) = torch.autograd.grad(loss, [w])
        s = torch.linalg.svdvals(grad[: v // 8, : d // 8].double())
        want_all.append(float(reference.spectral_entropy(s)[0]))
    for got, want in zip(got_all, want_all):
        assert abs(got - want) <= 1e-4, (got_all, want_all)
    assert len(set(round(x, 6) for x in got_all)) == 3  # real, distinct scores


def test_host_factor_route_matches_reference():
    """The CUDA option HOST_FACTOR_ON_CUDA (Grams on the device, factorisations on the host) is plain torch + C++;
    run its function on CPU tensors against svdvals of the materialised product."""
    from tensorguard_fast import _backend
    from tensorguard_fast.ops import gram_entropy as ge

    if _backend.cpp() is None:
        pytest.skip("needs the C++ extension")
    g = torch.Generator().manual_seed(7)
    e = torch.randn(3, 9, 40, generator=g)
    h = torch.randn(3, 9, 5, generator=g)  # rank 5 < T = 9: exact zeros expected past it
    old = ge.HOST_FACTOR_ON_CUDA
    ge.HOST_FACTOR_ON_CUDA = True
    try:
        got = ge._gram_route_cuda(e, h, "test")
    finally:
        ge.HOST_FACTOR_ON_CUDA = old
    want = torch.linalg.svdvals(e.double().mT @ h.double())
    assert torch.allclose(got[:, :5], want, rtol=1e-10, atol=1e-12)
    assert torch.all(got[:, 5:] == 0)
