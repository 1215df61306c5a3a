"""FingerprintStore: add / get / list / exact search, keyed by whole-file content digests, never a row replaced
silently, failures kept per model, damaged stores named in one line."""
import shutil
import sqlite3

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from tensorguard_fast import FingerprintStore, fast_fingerprint
from tensorguard_fast.lineage.loading import open_model
from tensorguard_fast.lineage.store import StoreConflict, StoreError, checkpoint_key, identity

from lineage_models import save_tiny


@pytest.fixture(scope="module")
def fps(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_models")
    return [fast_fingerprint(save_tiny(root / f"m{s}", seed=s)) for s in range(3)]


def test_add_get_list_search(tmp_path, fps):
    with FingerprintStore(tmp_path / "fp.db") as store:
        ids = [store.add(fp, family=f"fam{i}") for i, fp in enumerate(fps)]
        assert len(set(ids)) == 3
        assert [r["model"] for r in store.list()] == ["m0", "m1", "m2"]
        np.testing.assert_array_equal(store.get(ids[1]).vector, fps[1].vector)
        assert store.get("m2").model == "m2"
        hits = store.search(fps[1], k=2)
        assert hits[0][0] == 0 and hits[0][1]["model"] == "m1" and hits[0][1]["family"] == "fam1"
        assert hits[1][0] > 1.0 and len(hits) == 2
        assert store.list(profile="tensorguard") == []
        with pytest.raises(KeyError, match="nope"):
            store.get("nope")


def test_same_checkpoint_keeps_its_row_and_skips(tmp_path, fps):
    with FingerprintStore(tmp_path / "fp.db") as store:
        first = store.add(fps[0])
        assert store.add(fps[0], family="labelled") == first  # an unlabelled row takes its first label
        assert store.add(fps[0]) == first and store.add(fps[0], family="labelled") == first
        assert len(store.list()) == 1 and store.list()[0]["family"] == "labelled"
        assert store.has(identity(fps[0]), fps[0].profile) and not store.has(identity(fps[0]), "tensorguard")
        assert len(fps[0].metadata["file_hashes"]["model.safetensors"]) == 64  # a sha256, not a sample


def test_another_family_never_replaces_a_row(tmp_path, fps):
    with FingerprintStore(tmp_path / "fp.db") as store:
        rid = store.add(fps[0], family="smol")
        store.add(fps[1], family="other")
        with pytest.raises(StoreConflict, match=r"fp.db: m0 is the same checkpoint as #1 m0 .* family 'smol'.*'gemma'"):
            store.add(fps[0], family="gemma")
        assert [r["family"] for r in store.list()] == ["smol", "other"]
        assert store.search(fps[0], k=1)[0][1]["family"] == "smol"
        assert store.add(fps[0], family="gemma", relabel=True) == rid  # asked for: the one row is relabelled
        assert [r["family"] for r in store.list()] == ["gemma", "other"]


def test_an_edit_the_old_sampled_hash_missed_is_a_new_checkpoint(tmp_path):
    """The sampled hash read the first MiB and 16 pieces of 64 KiB: an edit between them kept the hash."""
    original = save_tiny(tmp_path / "orig", seed=0, hidden=256, layers=4, vocab=4096)
    state = load_file(str(original / "model.safetensors"))
    edited = tmp_path / "edited"
    shutil.copytree(original, edited)
    key = "model.layers.2.mlp.down_proj.weight"
    state[key] = state[key].clone()
    state[key][100, 7] += 1e-3  # one weight, deep inside the file
    save_file(state, str(edited / "model.safetensors"), metadata={"format": "pt"})
    a, b = open_model(original), open_model(edited)
    assert checkpoint_key(a.file_hashes(), a.name) != checkpoint_key(b.file_hashes(), b.name)
    with FingerprintStore(tmp_path / "fp.db") as store:
        store.add(fast_fingerprint(original, profile="tensorguard"), family="smol")
        assert store.has(checkpoint_key(a.file_hashes(), a.name), "tensorguard")
        assert not store.has(checkpoint_key(b.file_hashes(), b.name), "tensorguard")
        store.add(fast_fingerprint(edited, profile="tensorguard"), family="other")  # its own row, no conflict
        assert [r["family"] for r in store.list()] == ["smol", "other"]


def test_damaged_and_foreign_stores_are_named(tmp_path, fps):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="junk.db: not a fingerprint store"):
        FingerprintStore(junk)
    other = tmp_path / "other.db"
    sqlite3.connect(str(other)).executescript("CREATE TABLE fingerprints (a, b); INSERT INTO fingerprints VALUES (1, 2);")
    with pytest.raises(StoreError, match="other.db: not a tensorguard-fast fingerprint store"):
        FingerprintStore(other, readonly=True)
    with pytest.raises(FileNotFoundError, match="missing.db: no such fingerprint store"):
        FingerprintStore(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(StoreError, match="is a directory"):
        FingerprintStore(tmp_path)



def test_failures_and_two_writers(tmp_path, fps):
    a, b = FingerprintStore(tmp_path / "fp.db"), FingerprintStore(tmp_path / "fp.db")
    a.add(fps[0])
    b.add(fps[1])
    b.record_failure("/models/broken", "full", "truncated")
    assert len(a.list()) == 2
    assert a.failures()[0]["error"] == "truncated"
    a.close()
    b.close()
