"""`default-moe compare`: both routings from the same initial weights on the same data, tables and plots."""

import csv
import json

import pytest

from default_moe.cli import main
from default_moe.training.compare import markdown_table, summary_rows, text_table
from training.helpers import TINY_RUN


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "code.jsonl"
    lines = [json.dumps({"text": f"def function_{i}(x, y):\n    return x * {i} + y - {i % 7}\n"}) for i in range(300)]
    path.write_text("\n".join(lines))
    return path


def test_compare_on_files_with_seeds_writes_table_csv_and_plot(tmp_path, jsonl, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *TINY_RUN, "--preset", "micro", "--data", str(jsonl), "--max-steps", "4", "--seeds", "0", "1"]
    # With the causal EMA order the first forward uses D = 0, where Default MoE and top-K are the same function.
    argv += ["--output-dir", str(out), "--set", "default_ema_update=after_use"]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "tokens/s" in printed and "throughput vs topk" in printed

    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(r["routing"], r["seed"]) for r in rows] == [
        ("default", "0"),
        ("topk", "0"),
        ("default", "1"),
        ("topk", "1"),
    ]
    assert all(int(r["steps"]) == 4 and float(r["tokens_per_second"]) > 0 for r in rows)
    markdown = (out / "comparison.md").read_text()
    assert "| routing |" in markdown and "| default | 2 |" in markdown and "| topk | 2 |" in markdown
    assert (out / "comparison_loss.png").read_bytes()[:4] == b"\x89PNG"

    # Same initial weights and the same first batch: the step-1 losses of the two routings agree, per seed, while
    # the two seeds differ.
    losses = {}
    for run in ("default-seed0", "topk-seed0", "default-seed1", "topk-seed1"):
        history = _history(out / run)
        losses[run] = next(e["loss"] for e in history if e.get("step") == 1)
    assert losses["default-seed0"] == pytest.approx(losses["topk-seed0"], rel=1e-6)
    assert losses["default-seed1"] == pytest.approx(losses["topk-seed1"], rel=1e-6)
    assert losses["default-seed0"] != pytest.approx(losses["default-seed1"], rel=1e-6)


def _history(run_dir):
    return json.loads((run_dir / "log_history.json").read_text())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--routing", "topk"], "compare trains both routings"),
        (["--seeds", "1", "1"], "--seeds has repeats"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_compare_bad_input(tmp_path, capsys, extra, message):
    argv = ["compare", *TINY_RUN, "--preset", "micro", "--max-steps", "2", "--output-dir", str(tmp_path / "o"), *extra]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_compare_refuses_to_overwrite_a_comparison(tmp_path, capsys):
    (tmp_path / "comparison.md").write_text("old")
    argv = ["compare", *TINY_RUN, "--preset", "micro", "--max-steps", "2", "--output-dir", str(tmp_path)]
    assert main(argv) == 1
    assert "already holds a comparison" in capsys.readouterr().err
    assert (tmp_path / "comparison.md").read_text() == "old"


def test_summary_rows_and_tables():
    from default_moe.training.compare import RunRecord

    records = [
        RunRecord("default", 0, 2.0, 2.1, 1000.0, 1.0, 10, 100),
        RunRecord("topk", 0, 2.5, 2.6, 1100.0, 1.0, 10, 100),
        RunRecord("default", 1, 2.2, 2.1, 1000.0, 1.0, 10, 100),
        RunRecord("topk", 1, 2.7, 2.6, 900.0, 1.0, 10, 100),
    ]
    rows = summary_rows(records)
    assert [r["routing"] for r in rows] == ["default", "topk"]
    assert rows[0]["validation loss"] == "2.1000 ± 0.1414" and rows[0]["Δ loss vs topk"] == "-0.5000"
    assert rows[0]["throughput vs topk"] == "+0.0%" and "Δ loss vs topk" not in rows[1]
    assert text_table(rows).splitlines()[0].split()[:3] == ["routing", "seeds", "validation"]
    assert markdown_table(rows).splitlines()[1].startswith("|---|")
