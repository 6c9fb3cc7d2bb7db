"""The command line: one-line errors with exit status 2, and the small commands end to end."""
import csv

from ferkit.cli import main


def test_bad_config_is_one_line_error(capsys):
    assert main(["train", "optim.lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ferkit: error:") and "optim.lr" in err and "\n" not in err


def test_bad_dataset_root_names_the_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["train", "data.dataset=fer2013", f"data.root={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "\n" not in err


def test_synth_writes_images_and_manifest(tmp_path):
    out = tmp_path / "synth"
    assert main(["synth", str(out), "--subjects", "1", "--per-subject", "7", "--size", "48"]) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv", encoding="utf-8")))
    assert len(rows) == 14 and {r["split"] for r in rows} == {"train", "test"}
    assert all((out / r["path"]).is_file() for r in rows)
    assert len({r["label"] for r in rows}) == 7


def test_profile_prints_the_paper_comparison(capsys):
    assert main(["profile", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "| resnet18 | 224x224 | 11.180 |" in out and "-0.27" in out
