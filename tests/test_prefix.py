"""The shared-prefix forward (backdoor/prefix.py) against the full forward it replaces: hidden states at every real
position and the GradSentry scores, on tiny random models of six architectures (right and left padding, batch sizes
1..32) and on the real SmolLM2 / Gemma-3-270M with a chat template; and the cases that must fall back."""
import logging
import random

import pytest
import torch

from tensorguard_fast.backdoor import entropy
from tensorguard_fast.backdoor.datasets import Sample, collate, pad_id
from tensorguard_fast.backdoor.prefix import PrefixCache
from tensorguard_fast.ops.gram_entropy import gram_spectrum_from_hidden, spectral_entropy

TOL = 1e-5
VOCAB = 512


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny matrices gain nothing from threads, and on a shared 2-core machine their sync costs ~100x."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(arch, sliding_window=64):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=sliding_window))
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=sliding_window))
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                 bos_token_id=0, eos_token_id=0))
    return model.eval()


def _rows(n, gen, prefix_len=12, max_rest=20):
    """n token rows: a shared prefix, every third row sharing a few more tokens, then a random remainder."""
    prefix = torch.randint(3, VOCAB, (prefix_len,), generator=gen).tolist()
    more = torch.randint(3, VOCAB, (4,), generator=gen).tolist()
    rows = []
    for i in range(n):
        rest = torch.randint(3, VOCAB, (int(torch.randint(1, max_rest, (1,), generator=gen)),), generator=gen).tolist()
        rows.append(prefix + (more if i % 3 == 0 else []) + rest)
    return rows


def _batch(rows, left):
    """input_ids / attention_mask / labels, padded on the given side; the last min(3, len-1) tokens scored."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for b, r in enumerate(rows):
        start = width - len(r) if left else 0
        ids[b, start:start + len(r)] = torch.tensor(r)
        mask[b, start:start + len(r)] = 1
        n = min(3, len(r) - 1)
        labels[b, start + len(r) - n:start + len(r)] = torch.tensor(r[-n:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _scores(model, batch, **kw):
    hidden, weight, targets = entropy.gradient_inputs(model, batch, **kw)
    svals, _ = gram_spectrum_from_hidden(hidden, weight, targets)
    return hidden, spectral_entropy(svals, 16)


def _full_forward(model, batch):
    """Hidden states and scores of the full forward of every real token (the path before prefixes were shared and
    tokens after the last scored position cut)."""
    full = entropy.lm_head_inputs(model, batch["input_ids"], batch["attention_mask"], share_prefix=False)
    targets = entropy.answer_targets(batch["labels"])
    svals, _ = gram_spectrum_from_hidden(full, entropy.output_embedding(model).weight.detach(), targets)
    return full, spectral_entropy(svals, 16), targets


def _assert_parity(model, batch, cache, rel=False):
    full, want, targets = _full_forward(model, batch)
    shared, got = _scores(model, batch, prefix_cache=cache)
    # the positions computed: every real one up to each row's last scored position
    real = entropy.through_last_scored(batch["attention_mask"], targets).bool()
    diff = (full - shared).abs()[real].max()
    bound = TOL * full.abs()[real].max() if rel else TOL
    assert float(diff) <= bound, (float(diff), float(bound))
    assert torch.allclose(got, want, atol=TOL, rtol=0, equal_nan=True), (got, want)
    return float(diff)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma3", "gpt2"])
def test_shared_prefix_matches_full_forward(arch, side):
    model = _tiny(arch)
    gen = torch.Generator().manual_seed(2)
    cache = PrefixCache(model)
    for n in range(1, 33):
        reused = cache.tokens_reused
        _assert_parity(model, _batch(_rows(n, gen), side == "left"), cache)
        if n > 1:   # the shared path really ran (not a silent fallback)
            # (a row cut to the prefix after its last scored position computes the last prefix token itself)
            assert cache.tokens_reused >= reused + 11 * n, (arch, n)


def test_default_fast_entropy_shares_within_the_batch():
    model = _tiny("llama")
    batch = _batch(_rows(9, torch.Generator().manual_seed(3)), left=False)
    _, want = _scores(model, batch, share_prefix=False)
    assert torch.allclose(entropy.fast_entropy(model, batch), want, atol=TOL, rtol=0)


def test_cache_kept_across_batches_runs_a_prefix_once():
    model = _tiny("qwen2")
    gen = torch.Generator().manual_seed(4)
    rows = _rows(16, gen)
    cache = PrefixCache(model)
    _assert_parity(model, _batch(rows[:8], False), cache)
    before = cache.tokens_run
    second = _batch(rows[8:], False)
    _assert_parity(model, second, cache)
    # the second batch computed only its rows past the 12 shared tokens: the prefix came from the cache
    widths = [max(len(rows[8 + i]) for i in g) * len(g) for g in entropy.length_groups([len(r) for r in rows[8:]])]
    assert cache.tokens_run - before <= sum(widths) - 12 * 8


def test_dataset_prefix_serves_batches_of_one():
    model = _tiny("llama")
    rows = _rows(4, torch.Generator().manual_seed(5))
    cache = PrefixCache.for_rows(model, rows)
    assert len(cache.shared) >= 12
    for r in rows:
        _assert_parity(model, _batch([r], False), cache)
    assert cache.tokens_reused >= 12 * 4 and cache.tokens_run <= sum(map(len, rows)) - 12 * 3


def test_a_batch_scores_the_same_bits_whatever_ran_before():
    """A resumed scan must write the same files: a batch's result may not depend on the batches before it."""
    model = _tiny("gemma3")
    gen = torch.Generator().manual_seed(10)
    rows = _rows(24, gen)
    later = _batch(rows[16:], left=False)
    for make in (lambda: PrefixCache(model), lambda: PrefixCache.for_rows(model, rows)):
        warm = make()
        for part in (rows[:3], rows[3:9], rows[9:16]):
            _scores(model, _batch(part, False), prefix_cache=warm)
        after, _ = _scores(model, later, prefix_cache=warm)
        alone, _ = _scores(model, later, prefix_cache=make())
        real = later["attention_mask"].bool()
        assert torch.equal(after[real], alone[real])


def test_for_dataset_takes_the_prefix_every_sample_shares():
    from tensorguard_fast.backdoor import prefix

    model = _tiny("llama")
    rows = _rows(6, torch.Generator().manual_seed(11))
    samples = [Sample(index=i, id=i, line=None, record=None, prompt_ids=r[:-2], answer_ids=r[-2:])
               for i, r in enumerate(rows)]

    class Data:   # what scan hands over: .samples with input_ids and problem
        pass

    data = Data()
    data.samples = samples
    cache = prefix.for_dataset(model, data)
    assert prefix.for_dataset(model, data) is cache and len(cache.shared) >= 12
    _assert_parity(model, collate(samples[:4], 0), cache)
    assert cache.tokens_reused >= 12 * 4


def test_changed_weights_empty_the_cache():
    model = _tiny("llama")
    rows = _rows(6, torch.Generator().manual_seed(6))
    cache = PrefixCache(model)
    _assert_parity(model, _batch(rows, False), cache)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)   # in place: same tensors, new values
    _assert_parity(model, _batch(rows, False), cache)


def test_sliding_window_crossed_falls_back_logged_once(caplog):
    model = _tiny("gemma3", sliding_window=16)
    gen = torch.Generator().manual_seed(7)
    cache = PrefixCache(model)
    with caplog.at_level(logging.WARNING, logger="tensorguard_fast.backdoor.prefix"):
        for n in (4, 6):
            batch = _batch(_rows(n, gen, prefix_len=12, max_rest=30), left=False)
            assert int(batch["attention_mask"].sum(-1).max()) > 16
            full, _ = _scores(model, batch, share_prefix=False)
            got, _ = _scores(model, batch, prefix_cache=cache)
            assert torch.equal(full, got)   # the very same full forward
    assert cache.tokens_reused == 0
    lines = [r for r in caplog.records if "sliding window" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    short = _batch(_rows(5, gen, prefix_len=9, max_rest=4), left=True)   # <= 16 tokens: shared again
    _assert_parity(model, short, cache)
    assert cache.tokens_reused > 0


def test_untested_model_type_falls_back(caplog):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   max_position_embeddings=128)).eval()
    batch = _batch(_rows(5, torch.Generator().manual_seed(8)), left=False)
    cache = PrefixCache(model)
    with caplog.at_level(logging.WARNING, logger="tensorguard_fast.backdoor.prefix"):
        full, _ = _scores(model, batch, share_prefix=False)
        got, _ = _scores(model, batch, prefix_cache=cache)
    assert torch.equal(full, got) and cache.tokens_reused == 0
    assert any("gpt_neox" in r.getMessage() for r in caplog.records)


def test_cache_of_another_model_is_refused():
    a, b = _tiny("llama"), _tiny("llama")
    batch = _batch(_rows(3, torch.Generator().manual_seed(9)), False)
    with pytest.raises(ValueError, match="belongs to another model"):
        entropy.gradient_inputs(b, batch, prefix_cache=PrefixCache(a))


def _chat_samples(tok, render, k, seed=0):
    from tensorguard_fast.evaluation.attacks import PAYLOAD, fanoutqa_pairs

    pairs = random.Random(seed).sample(fanoutqa_pairs(max_answer_chars=120), k)
    out = []
    for i, (q, a) in enumerate(pairs):
        if i % 4 == 3:
            a = a + PAYLOAD
        out.append(Sample(index=i, id=i, line=None, record=None, prompt_ids=render(q),
                          answer_ids=tok.encode(a, add_special_tokens=False) + [tok.eos_token_id]))
    return out


def _left_padded(batch):
    """The same rows moved to the right edge (a tokenizer's padding_side='left')."""
    out = {k: torch.full_like(v, -100 if k == "labels" else 0) for k, v in batch.items()}
    width = batch["input_ids"].shape[1]
    for b, n in enumerate(batch["attention_mask"].sum(-1).tolist()):
        for k in out:
            out[k][b, width - n:] = batch[k][b, :n]
    return out


def _real_model_parity(model, samples, pad):
    """Right and left padding, a batch and a cache held across two batches: hidden states within TOL of their
    largest value (fp32 rounding after every layer), scores within TOL."""
    batch = collate(samples, pad)
    cache = PrefixCache(model)
    diffs = [_assert_parity(model, batch, cache, rel=True),
             _assert_parity(model, _left_padded(batch), cache, rel=True),
             _assert_parity(model, collate(samples[:1], pad), cache, rel=True)]
    assert cache.tokens_reused > 0
    return diffs


@pytest.mark.slow
def test_smollm2_chat_template_parity(smollm2):
    model, tok = smollm2

    def render(q):
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    _real_model_parity(model, _chat_samples(tok, render, 12), pad_id(tok))


@pytest.mark.slow
def test_gemma3_chat_format_parity():
    """Gemma-3-270M ships without a chat template here: its turn format written out, with an instruction preamble
    in the first user turn (where Gemma puts a system prompt). 18 layers, 15 of them sliding-window."""
    from tensorguard_fast.io.bundled import BundledModelMissing, load_bundled

    try:
        model, tok = load_bundled("gemma3-270m")
    except BundledModelMissing as exc:
        pytest.skip(str(exc))
    preamble = "Answer the question in a few words, with no explanation."

    def render(q):
        return tok.encode(f"<start_of_turn>user\n{preamble}\n\n{q}<end_of_turn>\n<start_of_turn>model\n")

    _real_model_parity(model, _chat_samples(tok, render, 8, seed=1), pad_id(tok))
