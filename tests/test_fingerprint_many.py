"""Many-model fingerprinting into a FingerprintStore: workers, failures recorded per model, reruns skip."""
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from lineage_models import save_tiny
from tensorguard_fast.lineage.many import fingerprint_many, model_list
from tensorguard_fast.lineage.store import FingerprintStore

ROOT = Path(__file__).resolve().parents[1]


def _registry(tmp_path):
    reg = tmp_path / "registry"
    reg.mkdir()
    for seed in range(3):
        save_tiny(reg / f"m{seed}", seed=seed)
    (reg / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return reg


def test_two_workers_failures_and_skips(tmp_path):
    reg = _registry(tmp_path)
    models = model_list(str(reg))
    assert [Path(m).name for m in models] == ["broken.safetensors", "m0", "m1", "m2"]
    db = tmp_path / "fp.db"
    results = fingerprint_many(models, str(db), profile="tensorguard", workers=2, progress=False)
    status = {Path(r["model"]).name: r["status"] for r in results}
    assert status == {"broken.safetensors": "failed", "m0": "done", "m1": "done", "m2": "done"}
    with FingerprintStore(db) as store:
        assert sorted(r["model"] for r in store.list()) == ["m0", "m1", "m2"]
        (failure,) = store.failures()
        assert failure["path"].endswith("broken.safetensors") and "broken.safetensors" in failure["error"]
    again = fingerprint_many(models, str(db), profile="tensorguard", workers=1, progress=False)
    assert [r["status"] for r in again] == ["failed", "skipped", "skipped", "skipped"]
    with FingerprintStore(db) as store:
        assert len(store.list()) == 3 and len(store.failures()) == 2


def test_cli_list_file_and_torchrun_ranks(tmp_path):
    reg = _registry(tmp_path)
    # m2 (rank 1's only new model) is made slow, so rank 0 (the broken file, then a skip) fails long before it ends.
    shutil.rmtree(reg / "m2")
    save_tiny(reg / "m2", seed=2, hidden=512, vocab=16384)
    listing = tmp_path / "models.txt"
    listing.write_text(f"# registry\n{reg / 'm0'}\n\n{reg / 'm1'}\n")
    db = tmp_path / "cli.db"
    out = subprocess.run([sys.executable, "-m", "tensorguard_fast.cli", "fingerprint", "--from", str(listing),
                          "--store", str(db), "--profile", "tensorguard"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "2 fingerprinted, 0 already in the store, 0 failed" in out.stdout
    # torchrun ranks share the list: every model once, the two already there skipped.
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "tensorguard_fast.lineage.many", "--from", str(reg), "--store", str(db),
                          "--profile", "tensorguard"], cwd=ROOT, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1, out.stdout + out.stderr  # the broken file fails its rank, the rest is stored
    assert "failed: " in out.stdout and "broken.safetensors" in out.stdout
    ranks = [line for line in out.stdout.splitlines() if line.startswith("rank ")]
    assert len(ranks) == 2, out.stdout + out.stderr  # both finished: a failing rank must not stop the other early
    with FingerprintStore(db) as store:
        assert sorted(r["model"] for r in store.list()) == ["m0", "m1", "m2"], out.stdout + out.stderr


def test_an_edited_copy_is_not_skipped(tmp_path):
    """Skips key on whole-file digests: a copy with one weight changed deep in the file is fingerprinted again."""
    reg = tmp_path / "registry"
    original = save_tiny(reg / "a", seed=0, hidden=256, vocab=4096)
    shutil.copytree(original, reg / "b")
    state = load_file(str(original / "model.safetensors"))
    key = "model.layers.2.mlp.down_proj.weight"
    state[key][100, 7] += 1e-3
    save_file(state, str(reg / "b" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(original, reg / "c")  # a byte-identical copy: skipped
    db = str(tmp_path / "fp.db")
    results = fingerprint_many(model_list(str(reg)), db, profile="tensorguard", progress=False)
    assert [r["status"] for r in results] == ["done", "done", "skipped"]
