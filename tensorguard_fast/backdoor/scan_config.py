"""scan_config.json: the settings a scan's raw results depend on; a restart with other settings is refused."""
from __future__ import annotations

import json
import os

from ..io.files import write_json
from .datasets import Dataset


def scan_config(model_name: str, dataset: Dataset, spectrum: str, crop: int, max_len: int, batch_size: int) -> dict:
    return {"model": model_name, "data": os.path.abspath(dataset.path), "n_samples": len(dataset),
            "spectrum": spectrum, "crop": crop, "max_len": max_len, "batch_size": batch_size}


def check_config(out_dir: str, config: dict) -> None:
    path = os.path.join(out_dir, "scan_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out_dir} holds a scan with other settings {diff} (old, new); use another --out or "
                             "delete it")
        return
    write_json(path, config)
