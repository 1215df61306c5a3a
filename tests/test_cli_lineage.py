"""`tensorguard-fast fingerprint / compare / classify / store / plot` on real (tiny) model directories."""
import json

import pytest

from tensorguard_fast.cli import main

from lineage_models import save_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_models")
    return {name: save_tiny(root / name, seed=seed) for name, seed in (("alpha", 0), ("beta", 1))}


def test_fingerprint_compare_classify(models, tmp_path, capsys):
    out = tmp_path / "fps"
    assert main(["fingerprint", str(models["alpha"]), str(models["beta"]), "-o", str(out)]) == 0
    fa, fb = out / "alpha.invariant.json", out / "beta.invariant.json"  # the default profile
    assert fa.exists() and fb.exists()
    capsys.readouterr()
    assert main(["compare", str(fa), str(models["beta"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["same_family"] is False and result["distance"] > 1.0
    assert main(["compare", str(models["alpha"]), str(fa)]) == 0
    assert "same family" in capsys.readouterr().out
    report = tmp_path / "classify.json"
    assert main(["classify", "--base", f"A={fa}", "--base", f"B={models['beta']}", str(models["alpha"]), str(fb),
                 "--method", "nearest", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "alpha" in text and "open set" in text
    preds = json.loads(report.read_text())["predictions"]
    assert [p["family"] for p in preds] == ["A", "B"]


def test_tensorguard_profile_and_mixing_error(models, tmp_path, capsys):
    out = tmp_path / "tg"
    assert main(["fingerprint", str(models["alpha"]), "--profile", "tensorguard", "-o", str(out)]) == 0
    assert (out / "alpha.tensorguard.json").exists()
    main(["fingerprint", str(models["beta"]), "-o", str(out)])
    code = main(["compare", str(out / "alpha.tensorguard.json"), str(out / "beta.invariant.json")])
    assert code == 2 and "same --profile" in capsys.readouterr().err  # 2: a mistake in the input


def test_store_and_plot(models, tmp_path, capsys):
    db = str(tmp_path / "s.db")
    assert main(["store", "add", db, str(models["alpha"]), str(models["beta"]), "--family", "tiny"]) == 0
    assert main(["store", "add", db, str(tmp_path / "missing")]) == 2  # recorded as a failure, not a crash
    assert main(["store", "list", db]) == 0
    capsys.readouterr()
    assert main(["store", "search", db, str(models["alpha"]), "-k", "1"]) == 0
    assert "alpha" in capsys.readouterr().out
    png = tmp_path / "p.png"
    assert main(["plot", str(models["alpha"]), str(models["beta"]), "--base", f"a={models['alpha']}", "-o",
                 str(png)]) == 0
    assert png.stat().st_size > 1000


def test_bad_file_names_itself(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["fingerprint", str(bad), "-o", str(tmp_path)]) == 2   # a user mistake: one line, exit 2
    assert "broken.safetensors" in capsys.readouterr().err


def test_same_directory_names_do_not_overwrite(tmp_path):
    a = save_tiny(tmp_path / "one" / "ft", seed=0)
    b = save_tiny(tmp_path / "two" / "ft", seed=1)
    assert main(["fingerprint", str(a), str(b), "-o", str(tmp_path / "out")]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())  # the second gets a short digest suffix
    assert len(names) == 2 and names[0].startswith("ft-") and names[1].startswith("ft."), names
