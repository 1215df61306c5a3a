"""Open a model's weights as a `WeightSource`: named tensors read one at a time, never the whole model in float32.

Accepted inputs (`open_model`):
- a `.safetensors` file, or a directory holding one, or a sharded directory with `model.safetensors.index.json`
  (memory-mapped through `safe_open`: a tensor is read when it is asked for);
- a Hugging Face hub id, resolved through huggingface_hub's cache exactly as `from_pretrained` does (offline:
  whatever is cached; `HF_HUB_OFFLINE=1` is respected);
- a PEFT LoRA adapter directory (`adapter_config.json`): each adapted tensor is merged, W + s * B @ A, when read;
- a GGUF file (transformers + gguf dequantise it: this one path materialises the model, GGUF has no lazy reader);
- an `nn.Module` or a dict of tensors;
- pickled `.bin`/`.pt` checkpoints only with `allow_pickle=True`, and then with `torch.load(weights_only=True)`.

Every error names the file it is about. Headers of safetensors files are checked against the file size before any
tensor is read, so a truncated download fails with a sentence, not a crash inside the reader.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                        "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class ModelLoadError(ValueError):
    """The input cannot be read as model weights; the message names the file and the reason."""


class WeightSource:
    """Named tensors of one model. `keys()` keeps the file's order (safetensors: sorted names, as `safe_open`)."""

    name: str = "model"
    path: Optional[str] = None
    tied_embeddings: bool = False

    def keys(self) -> List[str]:
        raise NotImplementedError

    def shape(self, key: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> str:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor in its stored dtype (callers cast one tensor at a time)."""
        raise NotImplementedError

    def file_hashes(self) -> Dict[str, str]:
        return {}

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for key in self.keys():
            yield key, self.get(key)

    def describe(self) -> str:
        return self.path or self.name


# ----------------------------------------------------------------------------------------------------- safetensors

def read_safetensors_header(path: Path) -> dict:
    """Parse and check a safetensors header: every tensor's byte range must lie inside the file and match its shape."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path}: not a safetensors file (only {size} bytes, the header length is missing)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ModelLoadError(f"{path}: truncated or not safetensors: header claims {n} bytes, file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({exc})") from exc
    data_bytes = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            expect = numel * SAFETENSORS_ITEMSIZE.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: corrupt header entry for tensor {key!r} ({exc})") from exc
        if end > data_bytes or begin > end:
            raise ModelLoadError(f"{path}: truncated or corrupt: tensor {key!r} spans bytes {begin}..{end} but the "
                                 f"data section holds only {data_bytes} bytes")
        if info["dtype"] in SAFETENSORS_ITEMSIZE and end - begin != expect:
            raise ModelLoadError(f"{path}: corrupt: tensor {key!r} has {end - begin} bytes, shape {info['shape']} "
                                 f"{info['dtype']} needs {expect}")
    return header


def quick_file_hash(path: Path, chunks: int = 16, chunk_bytes: int = 1 << 16) -> str:
    """sha256 of the size, the first MiB (the header) and `chunks` evenly spaced 64 KiB pieces.

    Why not the whole file: hashing re-reads every byte and would double the cost of a fingerprint. Any fine-tune,
    quantisation or noise changes bytes everywhere, so sampled pieces tell checkpoints apart; a store keyed by this
    hash can skip files already fingerprinted. `full_file_hash` is there when a cryptographic identity is needed.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        for i in range(chunks):
            fh.seek(max(0, (size - chunk_bytes) * i // max(chunks - 1, 1)))
            h.update(fh.read(chunk_bytes))
    return "q:" + h.hexdigest()


def full_file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class SafetensorsSource(WeightSource):
    """One or several safetensors files (shards), memory-mapped; a tensor is read only when asked for."""

    def __init__(self, files: List[Path], name: str, path: str, tied_embeddings: bool = False):
        from safetensors import safe_open

        self.files = files
        self.name = name
        self.path = path
        self.tied_embeddings = tied_embeddings
        self._where: Dict[str, int] = {}
        self._info: Dict[str, dict] = {}
        self._handles = []
        for i, f in enumerate(files):
            header = read_safetensors_header(f)
            for key, info in header.items():
                if key != "__metadata__":
                    self._where[key] = i
                    self._info[key] = info
            try:
                self._handles.append(safe_open(str(f), framework="pt"))
            except Exception as exc:  # the Rust reader's own errors, made to name the file
                raise ModelLoadError(f"{f}: safetensors could not open it ({exc})") from exc
        self._keys = sorted(self._where)

    def keys(self) -> List[str]:
        return list(self._keys)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(int(d) for d in self._info[key]["shape"])

    def dtype(self, key: str) -> str:
        return self._info[key]["dtype"]

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def file_hashes(self) -> Dict[str, str]:
        return {f.name: quick_file_hash(f) for f in self.files}


class StateDictSource(WeightSource):
    """Tensors already in memory (an nn.Module, a dequantised GGUF, a pickled checkpoint)."""

    def __init__(self, state: Dict[str, torch.Tensor], name: str, path: Optional[str] = None,
                 tied_embeddings: bool = False, hashes: Optional[Dict[str, str]] = None):
        self.state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.name = name
        self.path = path
        self.tied_embeddings = tied_embeddings
        self._hashes = hashes or {}

    def keys(self) -> List[str]:
        return list(self.state)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.state[key].shape)

    def dtype(self, key: str) -> str:
        return str(self.state[key].dtype).replace("torch.", "")

    def get(self, key: str) -> torch.Tensor:
        return self.state[key].detach()

    def file_hashes(self) -> Dict[str, str]:
        return dict(self._hashes)


class LoraMergedSource(WeightSource):
    """A base model with a PEFT LoRA adapter merged tensor by tensor: W + scale * B @ A (as `merge_and_unload`)."""

    def __init__(self, base: WeightSource, adapter_dir: Path, config: dict, name: str):
        self.base = base
        self.name = name
        self.path = str(adapter_dir)
        self.tied_embeddings = base.tied_embeddings
        weights = adapter_dir / "adapter_model.safetensors"
        if weights.exists():
            adapter = SafetensorsSource([weights], name, str(weights))
            state = {k: adapter.get(k) for k in adapter.keys()}
            self._adapter_files = [weights]
        else:
            raise ModelLoadError(f"{adapter_dir}: adapter_config.json found but no adapter_model.safetensors "
                                 f"(a pickled adapter_model.bin is not read)")
        r = int(config.get("r", 8))
        alpha = float(config.get("lora_alpha", r))
        self.scale = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self.pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.replaced: Dict[str, torch.Tensor] = {}
        base_keys = set(base.keys())
        for key, value in state.items():
            stem = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            if ".lora_A." in stem:
                target = stem.split(".lora_A.")[0] + ".weight"
                b = state.get(key.replace(".lora_A.", ".lora_B."))
                if b is None:
                    raise ModelLoadError(f"{weights}: {key} has no matching lora_B tensor")
                if target not in base_keys:
                    raise ModelLoadError(f"{weights}: adapter targets {target!r}, absent from base {base.describe()}")
                self.pairs[target] = (value, b)
            elif ".lora_B." in stem:
                continue
            else:
                # modules_to_save copies: a full tensor that replaces the base one
                target = stem.replace(".modules_to_save.default", "")
                if target in base_keys:
                    self.replaced[target] = value

    def keys(self) -> List[str]:
        return self.base.keys()

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> str:
        return self.base.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        if key in self.replaced:
            return self.replaced[key]
        w = self.base.get(key)
        if key not in self.pairs:
            return w
        a, b = self.pairs[key]
        delta = (b.float() @ a.float()) * self.scale
        if self.fan_in_fan_out:
            delta = delta.T
        return (w.float() + delta).to(w.dtype)

    def file_hashes(self) -> Dict[str, str]:
        hashes = {f"base/{k}": v for k, v in self.base.file_hashes().items()}
        hashes.update({f.name: quick_file_hash(f) for f in self._adapter_files})
        return hashes


# ------------------------------------------------------------------------------------------------------ resolving

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
        except (OSError, json.JSONDecodeError):
            return False
    return False


def _sharded(index: Path, name: str) -> SafetensorsSource:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from exc
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        f = index.parent / shard
        if not f.exists():
            raise ModelLoadError(f"{index}: names shard {shard!r}, which is missing from {index.parent}")
        files.append(f)
    return SafetensorsSource(files, name, str(index.parent), _tied(index.parent))


def _pickled(path: Path, allow_pickle: bool) -> StateDictSource:
    if not allow_pickle:
        raise ModelLoadError(f"{path}: pickled PyTorch checkpoint; unpickling can run arbitrary code, so it is refused. "
                             f"Prefer safetensors, or pass allow_pickle=True (CLI: --allow-pickle) to load it with "
                             f"torch.load(weights_only=True).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: torch.load(weights_only=True) refused or failed ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return StateDictSource(state, model_name_for(path), str(path), _tied(path.parent),
                           {path.name: quick_file_hash(path)})


def _gguf(path: Path) -> StateDictSource:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"{path}: transformers could not read this GGUF file ({exc})") from exc
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = model.state_dict()
    if tied:
        state.pop("lm_head.weight", None)
    return StateDictSource(state, model_name_for(path), str(path), tied, {path.name: quick_file_hash(path)})


def _directory(path: Path, allow_pickle: bool, base: Optional[str]) -> WeightSource:
    if (path / "adapter_config.json").exists():
        config = json.loads((path / "adapter_config.json").read_text())
        base_id = base or config.get("base_model_name_or_path")
        if not base_id:
            raise ModelLoadError(f"{path}/adapter_config.json names no base_model_name_or_path; pass base=...")
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise ModelLoadError(f"{path}: PEFT type {config.get('peft_type')} is not supported (LoRA only)")
        return LoraMergedSource(open_model(base_id, allow_pickle=allow_pickle), path, config, path.name)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return _sharded(index, path.name)
    if (path / "model.safetensors").exists():
        return SafetensorsSource([path / "model.safetensors"], path.name, str(path), _tied(path))
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return SafetensorsSource(singles, path.name, str(path), _tied(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf(ggufs[0])
    for name in ("pytorch_model.bin", "model.pt", "model.bin"):
        if (path / name).exists():
            return _pickled(path / name, allow_pickle)
    raise ModelLoadError(f"{path}: no model weights found (looked for model.safetensors[.index.json], a single "
                         f"*.safetensors, *.gguf, pytorch_model.bin, adapter_config.json)")


def _hub(model_id: str, allow_pickle: bool, base: Optional[str]) -> WeightSource:
    """Resolve a hub id through huggingface_hub's cache (the same resolution from_pretrained uses)."""
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        local = snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                  local_files_only=offline)
    except Exception as exc:
        raise ModelLoadError(f"{model_id!r} is neither a local path nor a Hugging Face hub id that could be resolved "
                             f"(offline or unknown: {type(exc).__name__}: {exc})") from exc
    src = _directory(Path(local), allow_pickle, base)
    src.name = model_id.replace("/", "_")
    return src


def open_model(model_or_path, allow_pickle: bool = False, base: Optional[str] = None) -> WeightSource:
    """A `WeightSource` for any accepted input (see the module docstring). `base` overrides a LoRA adapter's base."""
    if isinstance(model_or_path, WeightSource):
        return model_or_path
    if isinstance(model_or_path, torch.nn.Module):
        config = getattr(model_or_path, "config", None)
        tied = bool(getattr(config, "tie_word_embeddings", False)) if config is not None else False
        state = dict(model_or_path.state_dict())
        if tied:
            state.pop("lm_head.weight", None)
        name = getattr(config, "_name_or_path", "") or type(model_or_path).__name__
        return StateDictSource(state, Path(str(name)).name or "model", None, tied)
    if isinstance(model_or_path, dict):
        return StateDictSource(model_or_path, "state_dict")
    path = Path(os.path.expanduser(str(model_or_path)))
    if path.is_dir():
        return _directory(path, allow_pickle, base)
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return _sharded(path, path.parent.name)
        if path.suffix == ".safetensors":
            return SafetensorsSource([path], model_name_for(path), str(path), _tied(path.parent))
        if path.suffix == ".gguf":
            return _gguf(path)
        if path.suffix in PICKLE_SUFFIXES:
            return _pickled(path, allow_pickle)
        raise ModelLoadError(f"{path}: unknown weight format (expected .safetensors, .gguf, a model directory, or "
                             f"a pickled .bin/.pt with allow_pickle=True)")
    text = str(model_or_path)
    if text.count("/") <= 1 and not text.startswith((".", "/", "~")) and not path.suffix:
        return _hub(text, allow_pickle, base)
    raise ModelLoadError(f"{path}: no such file or directory")
