"""Malformed (and a few valid) model inputs and fingerprint stores, generated at test time from a tiny real model.

`model_cases(root)` and `store_cases(root, good_model)` write the inputs under `root` and return `Case`s: the
command-line arguments to run, whether a result or an error is expected, and the text the error must name.
Nothing big is committed: every file is built from a random-init Llama of a few hundred KB.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch
from safetensors.torch import save_file


@dataclass
class Case:
    name: str
    args: List[str]          # after the command (fingerprint / store ...)
    ok: bool                 # a result (exit 0) or a user error (exit 2)
    names: str = ""          # text the one-line error must contain (the input)
    extra: dict = field(default_factory=dict)


def _header_file(path: Path, header, data: bytes = b"\0" * 64, length=None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _state(seed: int = 0):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lineage_models import tiny_llama

    return tiny_llama(seed=seed), {k: v.clone() for k, v in tiny_llama(seed=seed).state_dict().items()}


class _Payload:
    def __reduce__(self):  # harmless if it ever ran; weights_only must refuse it anyway
        return (os.getcwd, ())


def model_cases(root: Path) -> List[Case]:
    root.mkdir(parents=True, exist_ok=True)
    model, state = _state()
    good = root / "good"
    model.save_pretrained(str(good))
    blob = (good / "model.safetensors").read_bytes()
    cases = [Case("valid directory", [str(good)], True)]

    bare = root / "no_config"
    bare.mkdir()
    shutil.copy(good / "model.safetensors", bare / "model.safetensors")
    cases.append(Case("weights without config.json", [str(bare)], True))

    def add(name: str, path: Path, names: str = None, args=()):
        cases.append(Case(name, [str(path), *args], False, names or path.name))

    (root / "truncated.safetensors").write_bytes(blob[:len(blob) // 2])
    add("truncated safetensors", root / "truncated.safetensors")
    add("absurd header length", _header_file(root / "absurd.safetensors", {}, length=1 << 62))
    w = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    add("overlapping data_offsets", _header_file(root / "overlap.safetensors",
                                                 {"a": w, "b": dict(w, data_offsets=[32, 96])}, b"\0" * 96))
    add("string data_offsets", _header_file(root / "strings.safetensors", {"a": dict(w, data_offsets=["0", "64"])}))
    add("header not JSON", _header_file(root / "notjson.safetensors", b"{not json"))
    add("header a JSON list", _header_file(root / "list.safetensors", [1, 2, 3]))
    add("header nested 100k deep", _header_file(root / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000))
    add("unknown dtype", _header_file(root / "dtype.safetensors", {"a": dict(w, dtype="F128")}))
    add("negative shape", _header_file(root / "shape.safetensors", {"a": dict(w, shape=[-4, -4])}))
    (root / "zero.safetensors").write_bytes(b"")
    add("zero-byte safetensors", root / "zero.safetensors")
    save_file({"norm.weight": torch.ones(8)}, str(root / "norms.safetensors"))
    add("no 2-D tensor", root / "norms.safetensors")

    nan = dict(state)
    nan["model.layers.1.mlp.up_proj.weight"] = nan["model.layers.1.mlp.up_proj.weight"].clone()
    nan["model.layers.1.mlp.up_proj.weight"][2, 3] = float("nan")
    save_file(nan, str(root / "nan.safetensors"))
    add("one NaN weight", root / "nan.safetensors", "up_proj")
    cases.append(Case("one NaN weight, allowed", [str(root / "nan.safetensors"), "--allow-nonfinite"], True))
    save_file({k: torch.full_like(v, float("inf")) for k, v in state.items()}, str(root / "allinf.safetensors"))
    add("all-Inf model", root / "allinf.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(root / "allnan.safetensors"))
    add("all-NaN model", root / "allnan.safetensors")

    pick = root / "pickled"
    pick.mkdir()
    torch.save(state, pick / "pytorch_model.bin")
    add("pickle without --allow-pickle", pick / "pytorch_model.bin")
    torch.save({"w": _Payload()}, root / "payload.bin")
    add("pickle payload with --allow-pickle", root / "payload.bin", "payload.bin: torch.load(weights_only=True) "
        "refused", args=["--allow-pickle"])
    torch.save(state, root / "legacy.pt", _use_new_zipfile_serialization=False)
    cases.append(Case("legacy pickle with --allow-pickle", [str(root / "legacy.pt"), "--allow-pickle"], True))

    (root / "empty_dir").mkdir()
    add("empty directory", root / "empty_dir")
    (root / "config_only").mkdir()
    shutil.copy(good / "config.json", root / "config_only" / "config.json")
    add("config but no weights", root / "config_only")
    two = root / "two_files"
    two.mkdir()
    save_file({"a": torch.ones(2, 2)}, str(two / "a.safetensors"))
    save_file({"b": torch.ones(2, 2)}, str(two / "b.safetensors"))
    add("two unindexed safetensors", two)
    (root / "trunc.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 10) + b"\x07\x00")
    add("truncated GGUF", root / "trunc.gguf")
    (root / "weights.txt").write_text("not weights")
    add("unknown suffix", root / "weights.txt")

    shard = root / "sharded"
    model.save_pretrained(str(shard), max_shard_size="100KB")
    index = json.loads((shard / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[-1]
    (shard / missing).unlink()
    add("missing shard", shard, missing)
    badidx = root / "bad_index"
    badidx.mkdir()
    (badidx / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    add("index without a weight map", badidx, "model.safetensors.index.json")
    evil_idx = root / "evil_index"
    evil_idx.mkdir()
    (evil_idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../good/model.safetensors"}}))
    add("index naming a shard outside its directory", evil_idx, "model.safetensors.index.json")

    adapter = root / "adapter_bad_json"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{oops")
    add("adapter config not JSON", adapter, "adapter_config.json")
    orphan = root / "adapter_no_base"
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                            "base_model_name_or_path": str(root / "gone")}))
    add("adapter whose base is missing", orphan, "adapter_no_base")

    (root / "list.json").write_text("[1, 2]")
    add("fingerprint JSON that is a list", root / "list.json")
    (root / "truncated_fp.json").write_text('{"format": "tensorguard-fast-fingerprint", "names": ["a"]')
    add("fingerprint JSON cut short", root / "truncated_fp.json")
    cases.append(Case("missing relative path (never a hub id)", ["good/ft.safetensors"], False,
                      "no such file or directory: good/ft.safetensors"))
    cases.append(Case("missing relative directory under an existing one", ["good/nothing"], False,
                      "no such file or directory: good/nothing"))
    cases.append(Case("unknown bundled name", ["bundled:nope"], False, "bundled:nope"))
    return cases


def evil_fingerprint(root: Path, fingerprint_json: str, model: str, name: str) -> Path:
    """A valid fingerprint JSON whose metadata.model is `model` (an untrusted name: '../..', an absolute path)."""
    data = json.loads(fingerprint_json)
    data["metadata"]["model"] = model
    path = root / name
    path.write_text(json.dumps(data))
    return path


def store_cases(root: Path, good_model: Path, good_fp: Path) -> List[Case]:
    """Stores, each run through `store list`, `store search` and `store add`: args hold only the DB path."""
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    (root / "corrupt.db").write_bytes(b"SQLite format 2\0" + bytes(range(256)) * 16)
    cases.append(Case("corrupt store", [str(root / "corrupt.db")], False, "corrupt.db"))
    db = sqlite3.connect(str(root / "schema.db"))
    db.executescript("CREATE TABLE fingerprints (who TEXT, what BLOB); INSERT INTO fingerprints VALUES ('x', 'y');")
    db.close()
    cases.append(Case("another program's schema", [str(root / "schema.db")], False, "schema.db"))
    (root / "empty.db").write_bytes(b"")
    cases.append(Case("empty file", [str(root / "empty.db")], True, extra={"empty": True}))
    (root / "dir.db").mkdir()
    cases.append(Case("a directory", [str(root / "dir.db")], False, "dir.db"))
    cases.append(Case("missing store", [str(root / "missing.db")], False, "missing.db",
                      extra={"add_ok": True}))
    cases.append(Case("store in a missing directory", [str(root / "nowhere" / "s.db")], False, "s.db"))
    cases.append(Case("locked store", [str(root / "locked.db")], False, "locked.db", extra={"lock": True}))
    cases.append(Case("read-only store", [str(root / "readonly.db")], True, "readonly.db", extra={"readonly": True}))
    cases.append(Case("damaged fingerprint row", [str(root / "damaged.db")], False, "damaged.db",
                      extra={"damaged": True}))
    return cases
