"""io.digest: whole-file sha256, cached by file identity so a rerun does not re-read, never stale after a rewrite."""
import hashlib
import os

import torch

from tensorguard_fast.io import digest


def test_digest_is_the_sha256_of_every_byte(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORGUARD_FAST_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    data = os.urandom(3 * digest.BLOCK // 2)
    f.write_bytes(data)
    assert digest.file_digest(f) == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "cache" / "digests.json").exists()


def test_cache_is_used_and_never_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORGUARD_FAST_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    first = digest.file_digest(f)
    reads = []
    monkeypatch.setattr(digest, "stream_digest", lambda p: reads.append(p) or "0" * 64)
    assert digest.file_digest(f) == first and reads == []  # remembered: not read again
    monkeypatch.undo()
    monkeypatch.setenv("TENSORGUARD_FAST_CACHE", str(tmp_path / "cache"))
    stat = f.stat()
    with open(f, "r+b") as fh:  # same size, one byte changed in place, mtime set back
        fh.seek(500)
        fh.write(b"b")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert digest.file_digest(f) == hashlib.sha256(b"a" * 500 + b"b" + b"a" * 499).hexdigest()


def test_damaged_or_unwritable_cache_only_costs_a_read(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "digests.json").write_text("{not json")
    monkeypatch.setenv("TENSORGUARD_FAST_CACHE", str(cache))
    f = tmp_path / "w.bin"
    f.write_bytes(b"xyz")
    assert digest.file_digest(f) == hashlib.sha256(b"xyz").hexdigest()
    monkeypatch.setenv("TENSORGUARD_FAST_DIGEST_CACHE", "0")
    assert digest.cache_file() is None and digest.file_digest(f) == hashlib.sha256(b"xyz").hexdigest()


def test_model_digest_and_tensors_digest(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORGUARD_FAST_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "sub" / "w.safetensors").write_bytes(b"123")
    (d / ".converted").write_text("marker")
    assert digest.model_digest(d) == {"config.json": hashlib.sha256(b"{}").hexdigest(),
                                      "sub/w.safetensors": hashlib.sha256(b"123").hexdigest()}
    assert digest.model_digest(d / "config.json") == {"config.json": hashlib.sha256(b"{}").hexdigest()}
    a = {"w": torch.ones(3, 2), "b": torch.zeros(2, dtype=torch.bfloat16)}
    b = {"w": torch.ones(3, 2), "b": torch.zeros(2, dtype=torch.bfloat16)}
    assert digest.tensors_digest(a) == digest.tensors_digest(b)
    b["w"][1, 1] = 1.0000001
    assert digest.tensors_digest(a) != digest.tensors_digest(b)
    assert digest.tensors_digest({"w": torch.ones(6)}) != digest.tensors_digest({"w": torch.ones(3, 2)})
