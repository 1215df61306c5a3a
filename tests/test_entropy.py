"""fast_entropy against the slow way (per-sample autograd of the answer loss w.r.t. the lm_head weight, materialised
crop, exact svdvals / torch.fft), on real fanoutqa samples with SmolLM2 and on tiny random models of four
architectures; and the bad inputs that must raise clear errors."""
import random

import pytest
import torch

from tensorguard_fast import reference
from tensorguard_fast.backdoor import entropy
from tensorguard_fast.backdoor.datasets import Sample, collate, pad_id

TOL = 1e-4


def _fanoutqa_samples(tok, k=6, seed=0):
    from tensorguard_fast.evaluation.attacks import PAYLOAD, fanoutqa_pairs

    pairs = random.Random(seed).sample(fanoutqa_pairs(max_answer_chars=120), k)
    out = []
    for i, (q, a) in enumerate(pairs):
        if i % 3 == 2:
            a = a + PAYLOAD   # a poisoned-looking one among them
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        out.append(Sample(index=i, id=i, line=None, record=None,
                          prompt_ids=tok.encode(prompt, add_special_tokens=False),
                          answer_ids=tok.encode(a, add_special_tokens=False) + [tok.eos_token_id]))
    return out


def _slow_logits_path(model, sample, pad):
    """Batch size 1, no padding: hidden from output_hidden_states, autograd through logits = h W^T in float64."""
    b = collate([sample], pad)
    with torch.no_grad():
        h = model(input_ids=b["input_ids"], output_hidden_states=True).hidden_states[-1]
    targets = entropy.answer_targets(b["labels"])
    return reference.lm_head_gradient_crops(h, model.get_output_embeddings().weight, targets)[0]


@pytest.fixture(scope="module")
def smol_batch(smollm2):
    model, tok = smollm2
    samples = _fanoutqa_samples(tok)
    return samples, collate(samples, pad_id(tok))


def test_svd_and_fft_match_the_slow_way_on_smollm2(smollm2, smol_batch):
    model, tok = smollm2
    samples, batch = smol_batch
    svd = entropy.fast_entropy(model, batch, spectrum="svd")
    fft = entropy.fast_entropy(model, batch, spectrum="fft")
    assert svd.shape == fft.shape == (len(samples),) and svd.dtype == torch.float64
    for j, s in enumerate(samples):
        g = _slow_logits_path(model, s, pad_id(tok))
        assert float(svd[j]) == pytest.approx(float(reference.spectral_entropy(torch.linalg.svdvals(g))[0]), abs=TOL)
        assert float(fft[j]) == pytest.approx(reference.fft_entropy_signal(g), abs=TOL)
    assert not model.training


def _tiny(arch):
    import transformers as tf

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if arch == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=16))
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                            tie_word_embeddings=False))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
def test_generic_capture_matches_full_backward(arch):
    """Untied random models: the full-backward GradSentry gradient IS the logits-path one, so this checks the hook,
    the label shift and the padding in one go, for each architecture."""
    torch.manual_seed(0)
    model = _tiny(arch).eval()
    gen = torch.Generator().manual_seed(1)
    samples = []
    for i, (p, a) in enumerate([(5, 3), (9, 1), (4, 12)]):
        ids = torch.randint(3, 512, (p + a,), generator=gen).tolist()
        samples.append(Sample(index=i, id=i, line=None, record=None, prompt_ids=ids[:p], answer_ids=ids[p:]))
    svd = entropy.fast_entropy(model, collate(samples, 0))
    for j, s in enumerate(samples):
        b = collate([s], 0)
        g = reference.gradsentry_gradient(model, b["input_ids"], b["labels"])
        want = float(reference.spectral_entropy(torch.linalg.svdvals(g.double()))[0])
        assert float(svd[j]) == pytest.approx(want, abs=TOL), arch


def test_gemma3_real_model_matches_reference():
    """The real Gemma-3-270M (vocab 262144, tied, no chat template): two samples against the ops' float64 oracle."""
    from tensorguard_fast.io.bundled import BundledModelMissing, load_bundled

    try:
        model, tok = load_bundled("gemma3-270m")
    except BundledModelMissing as exc:
        pytest.skip(str(exc))
    samples = []
    for i, (q, a) in enumerate([("Who wrote Hamlet?", "William Shakespeare"), ("Capital of Peru?", "Lima")]):
        samples.append(Sample(index=i, id=i, line=None, record=None, prompt_ids=tok.encode(q),
                              answer_ids=tok.encode(a, add_special_tokens=False) + [tok.eos_token_id]))
    fast = entropy.fast_entropy(model, collate(samples, pad_id(tok)))
    for j, s in enumerate(samples):
        b = collate([s], pad_id(tok))
        with torch.no_grad():
            h = model(input_ids=b["input_ids"], output_hidden_states=True).hidden_states[-1]
        svals, _ = reference.gram_spectrum_from_hidden(h, model.get_output_embeddings().weight,
                                                       entropy.answer_targets(b["labels"]))
        assert float(fast[j]) == pytest.approx(float(reference.spectral_entropy(svals)[0]), abs=TOL)


def test_sample_without_answer_tokens_is_nan(smollm2):
    model, tok = smollm2
    ids = tok.encode("Just a prompt")
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "labels": torch.full((1, len(ids)), -100)}
    assert torch.isnan(entropy.fast_entropy(model, batch)).all()


def test_bad_inputs_raise_clear_errors(smollm2, smol_batch):
    model, _ = smollm2
    _, batch = smol_batch
    with pytest.raises(ValueError, match="spectrum"):
        entropy.fast_entropy(model, batch, spectrum="wavelet")
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        entropy.fast_entropy(model, {k: v.to("meta") for k, v in batch.items()})
    other_vocab = dict(batch, input_ids=batch["input_ids"].clone())
    other_vocab["input_ids"][0, 0] = 60000   # a token id from a bigger tokenizer
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        entropy.fast_entropy(model, other_vocab)
    with pytest.raises(ValueError, match="no 'labels'"):
        entropy.fast_entropy(model, {"input_ids": batch["input_ids"]})


def test_non_finite_logits_name_the_sample():
    torch.manual_seed(0)
    model = _tiny("llama").eval()
    with torch.no_grad():
        model.lm_head.weight[7] = float("inf")
    b = collate([Sample(index=0, id=0, line=None, record=None, prompt_ids=[5, 6], answer_ids=[8, 9])], 0)
    with pytest.raises(ValueError, match="sample 0"):
        entropy.fast_entropy(model, b)


def test_tied_embeddings_differ_from_the_full_backward(smollm2, smol_batch):
    """Documented choice: with tied embeddings GradSentry's autograd also collects the input-embedding gradient of
    the prompt tokens; fast_entropy takes the output projection alone. Check that they really differ here, so the
    docs stay honest."""
    model, tok = smollm2
    samples, batch = smol_batch
    s = samples[0]
    b = collate([s], pad_id(tok))
    full = reference.gradsentry_gradient(model, b["input_ids"], b["labels"]).double()
    logits_only = _slow_logits_path(model, s, pad_id(tok))
    assert (full - logits_only).abs().max() > 1e-3 * logits_only.abs().max()


def test_left_padding_scores_like_right_padding():
    """Position ids come from the attention mask: a left-padded batch (a tokenizer's padding_side='left') gives the
    same scores as the right-padded one the collator makes. GPT-2 has absolute position embeddings, where a shift
    matters (rotary models are shift-invariant)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tensorguard_fast.backdoor.entropy import fast_entropy

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    gen = torch.Generator().manual_seed(1)
    rows = [(torch.randint(0, 300, (7,), generator=gen).tolist(), torch.randint(0, 300, (5,), generator=gen).tolist()),
            (torch.randint(0, 300, (3,), generator=gen).tolist(), torch.randint(0, 300, (4,), generator=gen).tolist())]
    width = max(len(p) + len(a) for p, a in rows) + 3

    def batch(left):
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for b, (p, a) in enumerate(rows):
            seq = p + a
            start = width - len(seq) if left else 0
            ids[b, start:start + len(seq)] = torch.tensor(seq)
            mask[b, start:start + len(seq)] = 1
            labels[b, start + len(p):start + len(seq)] = torch.tensor(a)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    right, left = fast_entropy(model, batch(False)), fast_entropy(model, batch(True))
    assert torch.allclose(right, left, atol=1e-6), (right, left)


def test_length_groups_keep_scores_and_bound_padding(smollm2):
    """Cutting a padded batch into groups of similar length changes no score (each group runs at its own width)."""
    import torch

    from tensorguard_fast.backdoor import entropy
    from tensorguard_fast.evaluation.attacks import poisoned_set
    from tensorguard_fast.backdoor.datasets import pad_id

    lengths = [94, 78, 74, 72, 69, 62, 52, 50, 48, 48, 46, 46, 46, 43, 42, 42]
    groups = entropy.length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert lengths[g[0]] * len(g) <= 1.2 * sum(lengths[i] for i in g) or len(g) == 1
    padded = sum(lengths[g[0]] * len(g) for g in groups)
    assert padded < 1.2 * sum(lengths) < 16 * 94

    model, tok = smollm2
    records = poisoned_set("badnets", 6, 0.34, seed=2)
    rows = []
    for r in records:
        p = tok(r["question"])["input_ids"]
        a = tok(" " + r["answer"])["input_ids"] + [tok.eos_token_id]
        rows.append((p, a))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad_id(tok), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (p, a) in enumerate(rows):
        ids[b, :len(p) + len(a)] = torch.tensor(p + a)
        mask[b, :len(p) + len(a)] = 1
        labels[b, len(p):len(p) + len(a)] = torch.tensor(a)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    grouped = entropy.fast_entropy(model, batch)
    singles = torch.cat([entropy.fast_entropy(model, {k: v[b:b + 1] for k, v in batch.items()})
                         for b in range(len(rows))])
    assert torch.allclose(grouped, singles, atol=1e-6), (grouped, singles)


def test_scored_label_from_padding_is_an_error():
    import pytest
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tensorguard_fast.backdoor.entropy import fast_entropy

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                      # left padding on sample 1 ...
    labels = torch.full_like(ids, -100)
    labels[1, 2] = ids[1, 2]             # ... and its first real token scored: predicted from padding
    with pytest.raises(ValueError, match="sample 1: a scored label would be predicted from a padding position"):
        fast_entropy(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})


def test_tokens_after_the_last_scored_position_are_not_computed():
    from transformers import LlamaConfig, LlamaForCausalLM

    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    targets = torch.full_like(mask, -100)
    targets[0, 2:4] = 7    # scored up to position 3: position 4 (its end token) is cut
    targets[2, 5] = 7      # the last position scored: nothing to cut
    cut = entropy.through_last_scored(mask, targets)
    assert cut.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]   # row 1 scores nothing
    left = mask.flip(1)
    assert torch.equal(entropy.through_last_scored(left, targets.flip(1)), left)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (3, 9))
    labels = torch.full_like(ids, -100)
    labels[:, 3:6] = ids[:, 3:6]   # answers end at position 5; positions 5..8 predict nothing
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    computed = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: computed.append(args[0].numel()))
    try:
        hidden, _, targets = entropy.gradient_inputs(model, batch, share_prefix=False)
    finally:
        hook.remove()
    assert sum(computed) == 3 * 5
    full = entropy.lm_head_inputs(model, ids, batch["attention_mask"], share_prefix=False)
    assert torch.allclose(hidden[:, :5], full[:, :5], atol=1e-6, rtol=0)
    assert not hidden[:, 5:].any()
