"""`default-moe demo --quick`: the README's first command, end to end (smaller sizes, same code path)."""

import json

import pytest

from default_moe.cli import main
from default_moe.training.demo import verdict


def test_demo_quick_trains_both_compares_saves_reloads_and_generates(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress", "--steps", "12"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("\nrouting ") + 1 :].splitlines()
    assert table[0].split()[:4] == ["routing", "seeds", "validation", "loss"] and "tokens/s" in table[0]
    assert table[2].startswith("default") and table[3].startswith("topk")
    assert table[2].split()[1] == "2"  # two seeds
    assert "per-seed difference (default - topk): seed 0: " in printed and ", seed 1: " in printed
    assert "In this 2-seed demo " in printed and "BENCHMARKS.md" in printed
    assert "sample (prompt 'def '):" in printed and "\ndef " in printed
    assert "demo finished in" in printed

    final = out / "default-seed0" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["routing"] == "default" and "AutoModelForCausalLM" in config["auto_map"]
    assert (final / "tokenizer.json").exists() and (final / "README.md").exists()
    assert not (out / "topk-seed0" / "final").exists()  # only the Default MoE checkpoint is kept
    assert (out / "comparison_loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = (out / "comparison.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["default", "0"], ["topk", "0"], ["default", "1"], ["topk", "1"]]
    assert not (out / "default-seed1" / "final").exists()


@pytest.mark.parametrize(
    ("differences", "expected"),
    [
        ([-0.02, -0.01], "Default MoE reached a lower validation loss than top-K on all 2 seeds (mean -0.0150)"),
        ([0.02, 0.04], "top-K reached a lower validation loss than Default MoE on all 2 seeds (mean +0.0300)"),
        ([0.02, -0.01], "changes sign between seeds (mean +0.0050), so this short run cannot tell them apart"),
    ],
)
def test_demo_verdict_says_what_the_seeds_show(differences, expected):
    sentence = verdict(differences)
    assert expected in sentence and sentence.count(". ") == 0 and "BENCHMARKS.md" in sentence


def test_demo_rejects_bad_steps(tmp_path, capsys):
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "d"), "--steps", "0"]) == 1
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
