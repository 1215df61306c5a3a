"""scan_config.json: everything a scan's raw results depend on; a restart with anything different is refused.

Recorded: the data's content (sha256 of the bytes read, and the row count), the model's content (sha256 of every
file of its directory, cached by io.digest so a rerun does not re-read them; for a model with no files, the digest of
its tensors), the dtype and device it ran in, and the score inputs (spectrum, crop, max_len, chat template, field
mapping, batch size: batches are fixed by it). Not recorded: the score and the threshold, which are computed from the
raw results at the end and may change between runs. The data path is not compared: the same content moved resumes.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from ..io.digest import model_digest, tensors_digest
from ..io.files import write_json
from .datasets import Dataset


def model_files(model, model_name: str) -> Optional[str]:
    """The file or directory the model was loaded from, when there is one on this machine."""
    if model_name.startswith("bundled:"):
        from ..io.bundled import bundled_model_dir

        return str(bundled_model_dir(model_name.split(":", 1)[1]))
    for candidate in (model_name, getattr(model, "name_or_path", None)):
        if candidate and os.path.exists(str(candidate)):
            return str(candidate)
    try:   # a hub id: its snapshot in the local cache, never a download
        from huggingface_hub import snapshot_download

        return snapshot_download(model_name, local_files_only=True)
    except Exception:
        return None


def model_identity(model, model_name: str) -> dict:
    path = model_files(model, model_name)
    if path is not None:
        return {"model_files": model_digest(path)}
    return {"model_tensors": tensors_digest(model.state_dict())}


def scan_config(model_name: str, dataset: Dataset, spectrum: str, crop: int, max_len: int, batch_size: int,
                model=None) -> dict:
    """The settings and content digests of a scan. `model`: the nn.Module scored with (its files or tensors,
    dtype and device are recorded)."""
    config = {"model": model_name, "data_sha256": dataset.digest, "n_samples": len(dataset),
              "spectrum": spectrum, "crop": crop, "max_len": max_len, "batch_size": batch_size,
              "chat_template": dataset.tokenization.get("chat_template"),
              "chat_template_sha256": dataset.tokenization.get("chat_template_sha256"),
              "fields": list(dataset.fields) if dataset.fields else None}
    if model is not None:
        param = next(model.parameters(), None)
        config.update(model_identity(model, model_name),
                      dtype=str(param.dtype).replace("torch.", "") if param is not None else None,
                      device=str(param.device) if param is not None else None)
    return config


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:16] + "..."


def _describe(key: str, old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):   # per-file digests: name the files
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"{key}: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} differ"
    return f"{key}: {_short(old)} then, {_short(new)} now"


def check_config(out_dir: str, config: dict) -> None:
    """Write `config` into a new output directory, or check it against the one there: any difference raises a
    one-line ValueError naming what differs."""
    path = os.path.join(out_dir, "scan_config.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is unreadable ({exc}); use another --out or delete it") from None
        keys = sorted(set(old) | set(config))
        diff = [_describe(k, old.get(k), config.get(k)) for k in keys if old.get(k) != config.get(k)]
        if diff:
            raise ValueError(f"{out_dir} holds a scan with other settings or content ({'; '.join(diff)}); use "
                             "another --out or delete it")
        return
    write_json(path, config)
