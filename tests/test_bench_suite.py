"""bench/suite.py: one tiny model setting end to end, and the JSON-line schema of every kind of row."""
from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import suite  # noqa: E402

SCHEMA = {"figure": str, "model": (str, type(None)), "size": (int, type(None)), "batch": (int, type(None)),
          "device": str, "value": (float, type(None)), "unit": (str, type(None)), "date": str, "torch": str}


def run(tmp_path: Path, *extra: str) -> list[dict]:
    out = tmp_path / "results.jsonl"
    argv = ["--models", "resnet18", "--sizes", "32", "--batch", "2", "--warmup", "1", "--iters", "2",
            "--device", "cpu", "--data-root", str(tmp_path / "no-data"), "--out", str(out), *extra]
    assert suite.main(argv) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def check_schema(row: dict) -> None:
    for key, types in SCHEMA.items():
        assert key in row, f"{key} missing from {row}"
        assert isinstance(row[key], types), f"{key}={row[key]!r} in {row}"
    datetime.strptime(row["date"], "%Y-%m-%dT%H:%M:%SZ")
    assert row["torch"] == torch.__version__


def test_rows_follow_the_schema(tmp_path, capsys):
    rows = run(tmp_path)
    assert capsys.readouterr().out.count("\n") == len(rows)  # printed too, one line each
    for row in rows:
        check_schema(row)
    by_figure = {r["figure"]: r for r in rows}
    assert set(by_figure) == {"train_step", "train_step_peak_memory", "inference", "inference_peak_memory",
                              "data_pipeline"}
    for fig in ("train_step", "inference"):
        r = by_figure[fig]
        assert (r["model"], r["size"], r["batch"], r["device"], r["unit"]) == ("resnet18", 32, 2, "cpu", "images/s")
        assert r["value"] > 0 and r["iters"] == 2
        assert by_figure[f"{fig}_peak_memory"]["unit"] == "MiB" and by_figure[f"{fig}_peak_memory"]["value"] > 0
    assert by_figure["data_pipeline"]["value"] is None and "no FER2013" in by_figure["data_pipeline"]["skipped"]


def test_compile_failure_is_a_row_not_a_crash(tmp_path, monkeypatch):
    def broken(model, **kw):
        def call(*a, **k):
            raise RuntimeError("inductor exploded\nlong traceback")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    rows = run(tmp_path, "--compile", "--parts", "infer")
    assert [r["figure"] for r in rows] == ["inference"]
    check_schema(rows[0])
    assert rows[0]["value"] is None and rows[0]["compile"] is True
    assert rows[0]["error"] == "RuntimeError: inductor exploded"


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        suite.main(["--sizes", "huge"])
    assert "--sizes: 'huge'" in capsys.readouterr().err
    assert suite.main(["--models", "nope", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
