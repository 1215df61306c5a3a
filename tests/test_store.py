"""FingerprintStore: add / get / list / exact search, keyed by file hash, failures kept per model."""
import numpy as np
import pytest

from tensorguard_fast import FingerprintStore, fast_fingerprint
from tensorguard_fast.lineage.store import identity

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


def test_same_checkpoint_is_replaced_and_skippable(tmp_path, fps):
    with FingerprintStore(tmp_path / "fp.db") as store:
        store.add(fps[0])
        store.add(fps[0], family="relabelled")
        assert len(store.list()) == 1 and store.list()[0]["family"] == "relabelled"
        assert store.has(identity(fps[0]), "full") and not store.has(identity(fps[0]), "tensorguard")
        assert identity(fps[0]).startswith("model.safetensors=q:")


def test_failures_and_two_writers(tmp_path, fps):
    a, b = FingerprintStore(tmp_path / "fp.db"), FingerprintStore(tmp_path / "fp.db")
    a.add(fps[0])
    b.add(fps[1])
    b.record_failure("/models/broken", "full", "truncated")
    assert len(a.list()) == 2
    assert a.failures()[0]["error"] == "truncated"
    a.close()
    b.close()
