"""Loading weights: every accepted format gives the same tensors, and every bad input fails with a sentence that
names the file."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tensorguard_fast import fast_fingerprint
from tensorguard_fast.lineage.family import distance
from tensorguard_fast.lineage.loading import ModelLoadError, ModelNotFound, NonFiniteWeights, open_model

from lineage_models import save_tiny, tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


def _same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a.keys():
        torch.testing.assert_close(a.get(k).float(), b.get(k).float(), rtol=0, atol=0)


def test_dir_file_module_and_state_dict_agree(tiny_dir):
    d = open_model(tiny_dir)
    f = open_model(tiny_dir / "model.safetensors")
    _same_tensors(d, f)
    fp_dir = fast_fingerprint(tiny_dir)
    fp_mod = fast_fingerprint(tiny_llama(seed=0))
    np.testing.assert_allclose(fp_dir.vector, fp_mod.vector, rtol=0, atol=1e-5)  # float32 mat-vec: summation order follows memory alignment
    assert "model.safetensors" in fp_dir.metadata["file_hashes"]


def test_sharded_directory_matches_single_file(tiny_dir, tmp_path):
    tiny_llama(seed=0).save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _same_tensors(open_model(tmp_path / "sharded"), open_model(tiny_dir))
    for profile in ("full", "tensorguard"):
        a = fast_fingerprint(tmp_path / "sharded", profile=profile)
        b = fast_fingerprint(tiny_dir, profile=profile)
        np.testing.assert_allclose(a.vector, b.vector, rtol=1e-5, atol=1e-5)


def test_missing_shard_is_named(tmp_path):
    tiny_llama(seed=0).save_pretrained(str(tmp_path / "m"), max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "m" / shard).unlink()
    with pytest.raises(ModelLoadError, match=shard):
        open_model(tmp_path / "m")


def test_truncated_file(tiny_dir, tmp_path):
    data = (tiny_dir / "model.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:len(data) - 1000])
    with pytest.raises(ModelLoadError, match="cut.safetensors.*truncated"):
        fast_fingerprint(bad)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(ModelLoadError, match="tiny.safetensors"):
        open_model(tiny)


def test_header_offsets_past_the_end(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    bad = tmp_path / "liar.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)  # 16 data bytes, header claims 64
    with pytest.raises(ModelLoadError, match="liar.safetensors.*data section holds only 16 bytes"):
        open_model(bad)


def test_pickle_needs_the_flag(tiny_dir, tmp_path):
    model = tiny_llama(seed=0)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    model.config.save_pretrained(str(tmp_path))  # the same config beside it as beside the safetensors
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*allow_pickle"):
        open_model(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled"):
        open_model(tmp_path)  # a directory holding only the pickle
    fp = fast_fingerprint(tmp_path / "pytorch_model.bin", allow_pickle=True)
    np.testing.assert_allclose(fp.vector, fast_fingerprint(tiny_dir).vector, rtol=0, atol=1e-5)  # float32 mat-vec: summation order follows memory alignment


def test_no_matrices(tmp_path):
    f = tmp_path / "norms.safetensors"
    save_file({"norm.weight": torch.ones(8), "bias": torch.zeros(3)}, str(f))
    for profile in ("full", "tensorguard"):
        with pytest.raises(ModelLoadError, match="norms.safetensors.*no 2-D"):
            fast_fingerprint(f, profile=profile)


def _damaged(tmp_path, name, edit):
    state = {k: v.clone() for k, v in tiny_llama(seed=0).state_dict().items()}
    edit(state)
    f = tmp_path / f"{name}.safetensors"
    save_file(state, str(f))
    return f


def test_nonfinite_weights_fail_with_the_tensor_named(tmp_path):
    def spots(state):
        state["model.layers.0.self_attn.q_proj.weight"][3, 5] = float("nan")
        state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
        state["model.embed_tokens.weight"][7, 1] = float("nan")

    f = _damaged(tmp_path, "nan", spots)
    for profile in ("full", "tensorguard"):
        with pytest.raises(NonFiniteWeights, match=r"nan.safetensors: tensor '.*' holds 1 NaN/Inf.*allow_nonfinite"):
            fast_fingerprint(f, profile=profile)
    for profile in ("full", "tensorguard"):  # asked for: fingerprinted, the damage recorded
        fp = fast_fingerprint(f, profile=profile, allow_nonfinite=True)
        assert np.isfinite(fp.vector).all() and fp.metadata["nonfinite_rows"] >= 1
    assert fast_fingerprint(f, profile="full", allow_nonfinite=True).metadata["nonfinite_rows"] == 3


def test_all_nan_and_all_inf_models_are_refused(tmp_path):
    nan = _damaged(tmp_path, "allnan", lambda st: [v.fill_(float("nan")) for v in st.values()])
    inf = _damaged(tmp_path, "allinf", lambda st: [v.fill_(float("inf")) for v in st.values()])
    for f in (nan, inf):  # before: both fingerprinted, at distance 0 from each other
        with pytest.raises(NonFiniteWeights, match=f.name):
            fast_fingerprint(f)
    bf16 = save_tiny(tmp_path / "bf16", seed=0, dtype=torch.bfloat16)
    fast_fingerprint(bf16)  # finite half-precision weights pass the check


def test_string_and_overlapping_data_offsets(tmp_path):
    def write(name, header, data=b"\0" * 128):
        raw = json.dumps(header).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return tmp_path / name

    cases = {
        "strings.safetensors": ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": ["0", "64"]}},
                                "data_offsets \\['0', '64'\\] is not two non-negative integers"),
        "overlap.safetensors": ({"a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
                                 "b": {"dtype": "F32", "shape": [4, 4], "data_offsets": [32, 96]}}, "overlap"),
        "dtype.safetensors": ({"w": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, "dtype 'F128'"),
        "shape.safetensors": ({"w": {"dtype": "F32", "shape": [-4, 4], "data_offsets": [0, 64]}}, "shape"),
        "list.safetensors": ([1, 2], "JSON object"),
    }
    for name, (header, message) in cases.items():
        with pytest.raises(ModelLoadError, match=f"{name}.*{message}"):
            open_model(write(name, header))
    deep = tmp_path / "deep.safetensors"
    raw = b"[" * 200_000 + b"]" * 200_000
    deep.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ModelLoadError, match="deep.safetensors: corrupt safetensors header"):
        open_model(deep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tmp_path, tiny_dir, dtype):
    d = save_tiny(tmp_path / str(dtype), seed=0, dtype=dtype)
    assert open_model(d).dtype("model.embed_tokens.weight") in ("BF16", "F16")
    # rounding to 8/11 significant bits moves the fingerprint a little, nowhere near another family (~1.41)
    assert distance(fast_fingerprint(d), fast_fingerprint(tiny_dir)) < 0.05


def test_lora_adapter_is_merged_like_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = save_tiny(tmp_path / "base", seed=0)
    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(str(tmp_path / "adapter"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    merged = model.merge_and_unload().state_dict()
    src = open_model(tmp_path / "adapter")
    key = "model.layers.2.self_attn.q_proj.weight"
    torch.testing.assert_close(src.get(key), merged[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(src.get(key), open_model(base_dir).get(key))
    fp = fast_fingerprint(tmp_path / "adapter")
    assert {"adapter_model.safetensors", "adapter_config.json", "base/model.safetensors"} <= set(
        fp.metadata["file_hashes"])


def test_unresolvable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        open_model("no-such-org/no-such-model")


def test_missing_path():
    with pytest.raises(ModelLoadError, match="no such file"):
        open_model("/nonexistent/model.safetensors")


def test_missing_relative_paths_never_go_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "models").mkdir()
    for spec in ("models/ft", "./ft", "../ft", "ft.safetensors", "a/b/c", "models/ft/", "~/nope/x"):
        with pytest.raises(ModelNotFound, match=f"^no such file or directory: {spec}$"):
            open_model(spec)
    with pytest.raises(ModelLoadError, match="^ghost-org/ghost: no such file or directory, and not a Hugging Face"):
        open_model("ghost-org/ghost")  # a hub-shaped id whose first part is not here: the hub, then both reasons


def test_bundled_names(tmp_path):
    with pytest.raises(ModelLoadError, match="bundled:nope: unknown bundled model; choose from bundled:gemma3-270m"):
        open_model("bundled:nope")
    with pytest.raises(ModelLoadError, match="unknown bundled model"):
        open_model("bundled:../../etc")


@pytest.mark.slow
def test_bundled_name_fingerprints_like_its_directory(smollm2_dir):
    a = fast_fingerprint("bundled:smollm2", profile="tensorguard")
    b = fast_fingerprint(smollm2_dir, profile="tensorguard")
    np.testing.assert_array_equal(a.vector, b.vector)
    assert a.metadata["file_hashes"] == b.metadata["file_hashes"]


@pytest.mark.slow
def test_gguf_matches_its_conversion(smollm2_dir):
    from tensorguard_fast.io.bundled import gguf_path

    a = fast_fingerprint(gguf_path("smollm2"))
    b = fast_fingerprint(smollm2_dir)
    assert distance(a, b) < 1e-6
