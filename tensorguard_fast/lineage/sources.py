"""`WeightSource`: named tensors of one model, read one at a time; the safetensors and in-memory kinds, and the
non-finite check every read goes through unless the caller allows NaN/Inf.

Headers of safetensors files are checked before any tensor is read (types, byte ranges inside the file, no overlap,
sizes matching shapes), so a damaged file fails with a sentence naming it, not with a crash inside the reader.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                        "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class ModelLoadError(ValueError):
    """The input cannot be read as model weights; the message names the input and the reason."""


class NonFiniteWeights(ModelLoadError):
    """A tensor holds NaN or Inf; fingerprints of such a checkpoint would be silently meaningless."""


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
        """{file name: sha256 of its whole content} (io.digest), the identity a store keys on."""
        return {}

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for key in self.keys():
            yield key, self.get(key)

    def describe(self) -> str:
        return self.path or self.name


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's text: messages we wrap stay one line."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


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
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({type(exc).__name__}: {first_line(exc)})") \
                from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (a JSON object was expected)")
    data_bytes = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        spans.append((*_check_entry(path, key, info, data_bytes), key))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise ModelLoadError(f"{path}: corrupt: tensors {k0!r} ({b0}..{e0}) and {k1!r} ({b1}..{e1}) overlap")
    return header


def _check_entry(path: Path, key: str, info, data_bytes: int) -> Tuple[int, int]:
    if not isinstance(info, dict):
        raise ModelLoadError(f"{path}: corrupt header entry for tensor {key!r} (not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE:
        raise ModelLoadError(f"{path}: tensor {key!r} has dtype {dtype!r}, not one of {sorted(SAFETENSORS_ITEMSIZE)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ModelLoadError(f"{path}: corrupt header entry for tensor {key!r}: shape {shape!r} is not a list of "
                             f"non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ModelLoadError(f"{path}: corrupt header entry for tensor {key!r}: data_offsets {offsets!r} is not two "
                             f"non-negative integers")
    begin, end = offsets
    if end > data_bytes or begin > end:
        raise ModelLoadError(f"{path}: truncated or corrupt: tensor {key!r} spans bytes {begin}..{end} but the "
                             f"data section holds only {data_bytes} bytes")
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * SAFETENSORS_ITEMSIZE[dtype]:
        raise ModelLoadError(f"{path}: corrupt: tensor {key!r} has {end - begin} bytes, shape {shape} {dtype} "
                             f"needs {numel * SAFETENSORS_ITEMSIZE[dtype]}")
    return begin, end


class SafetensorsSource(WeightSource):
    """One or several safetensors files (shards), memory-mapped; a tensor is read only when asked for.

    `extra_files` (config.json, the shard index) count in the identity, not in the tensors: they can change a
    fingerprint (tied embeddings) without changing a weight byte."""

    def __init__(self, files: List[Path], name: str, path: str, tied_embeddings: bool = False,
                 extra_files: Optional[List[Path]] = None):
        from safetensors import safe_open

        self.files = files
        self.extra_files = [f for f in (extra_files or []) if f.is_file()]
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
                raise ModelLoadError(f"{f}: safetensors could not open it ({first_line(exc)})") from exc
        self._keys = sorted(self._where)

    def keys(self) -> List[str]:
        return list(self._keys)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(int(d) for d in self._info[key]["shape"])

    def dtype(self, key: str) -> str:
        return self._info[key]["dtype"]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except Exception as exc:
            raise ModelLoadError(f"{self.files[self._where[key]]}: tensor {key!r} could not be read "
                                 f"({first_line(exc)})") from exc

    def file_hashes(self) -> Dict[str, str]:
        from ..io.digest import file_digest

        return {f.name: file_digest(f) for f in self.files + self.extra_files}


class StateDictSource(WeightSource):
    """Tensors already in memory (an nn.Module, a dequantised GGUF, a pickled checkpoint). Without file hashes its
    identity is a digest of the tensors themselves (io.digest.tensors_digest), computed when first asked for."""

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
        if not self._hashes:
            from ..io.digest import tensors_digest

            self._hashes = {"state_dict": tensors_digest(self.state)}
        return dict(self._hashes)


class FiniteChecked(WeightSource):
    """`source` with every floating tensor checked when read: NaN or Inf raises `NonFiniteWeights` naming the
    tensor. One min/max reduction per tensor (NaN propagates through both), no copy."""

    def __init__(self, source: WeightSource):
        self.source = source
        self.name, self.path, self.tied_embeddings = source.name, source.path, source.tied_embeddings

    def keys(self) -> List[str]:
        return self.source.keys()

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.source.shape(key)

    def dtype(self, key: str) -> str:
        return self.source.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        t = self.source.get(key)
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t)
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                bad = int((~torch.isfinite(t)).sum())
                raise NonFiniteWeights(f"{self.describe()}: tensor {key!r} holds {bad} NaN/Inf value(s) of "
                                       f"{t.numel()}; the checkpoint is damaged (pass allow_nonfinite=True, CLI "
                                       f"--allow-nonfinite, to fingerprint it anyway)")
        return t

    def file_hashes(self) -> Dict[str, str]:
        return self.source.file_hashes()

    def describe(self) -> str:
        return self.source.describe()
