"""benchmarks/finetune.py: the prose corpus, the conversion of the pre-trained top-K model per arm, and a quick run."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import byte_corpus  # noqa: E402

from benchmarks import finetune  # noqa: E402


def test_prose_corpus_is_a_fixed_split_of_english_text():
    train, valid = finetune.prose_corpus("train"), finetune.prose_corpus("validation")
    assert torch.equal(train, finetune.prose_corpus("train"))  # deterministic
    assert 400_000 < train.numel() and 20_000 < valid.numel() < train.numel() // 5
    text = bytes(valid.tolist()).decode()
    assert text[:2000] not in bytes(train.tolist()).decode()  # split by topic
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    assert letters > 0.85  # prose, not code
    assert text[:200] not in bytes(byte_corpus(4_000_000, "train").tolist()).decode()  # not in pre-training
    with pytest.raises(ValueError, match="unknown split 'test'"):
        finetune.prose_corpus("test")


@pytest.fixture
def quick_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, "CACHE", tmp_path)
    base = finetune.pretrained(finetune.settings(True), "quick", True)["fingerprint"]
    job = dict(size="quick", seed=0, lr=1e-3, quick=True, pretrained=base)
    return {arm: finetune.train_run(dict(job, arm=arm)) for arm in finetune.ARMS}


def test_conversion_per_arm(quick_runs, tmp_path):
    """All arms start from the one cached pre-trained model; warmed defaults change the paper form's function
    before fine-tuning, and leave top-K's and gradient-only's (whose forward value has no default term) as they are."""
    assert len(list(tmp_path.glob("pretrain-quick-*.pt"))) == 1
    before = {run["val_before_calibration"] for run in quick_runs.values()}
    assert len(before) == 1  # the same pre-trained weights, as top-K
    for arm, run in quick_runs.items():
        converted = run["val_curve"]["0"]
        if arm == "default":
            assert converted != pytest.approx(run["val_before_calibration"], abs=1e-7)
        else:
            assert converted == pytest.approx(run["val_before_calibration"], abs=1e-6)
        assert run["final_val"] < converted  # fine-tuning helps on the new text


def test_tables_render_partial_results(quick_runs):
    """A partial grid names no best rate and pairs nothing at it; a whole one does both, and sends the seeds."""
    runs = list(quick_runs.values())
    text = finetune.render(runs, quick=True)
    assert "quick (" in text and "| default | (0.001: grid partial) | 1 |" in text
    assert "better)" not in text
    assert finetune.best_lrs(runs, finetune.settings(True)) == {}  # the grid is not complete: no seed jobs yet
    lrs = finetune.settings(True)["lr_grid"]
    grid = [dict(r, lr=lr, final_val=r["final_val"] + i) for r in runs for i, lr in enumerate(lrs)]
    text = finetune.render(grid, quick=True)
    assert f"| default | {lrs[0]:g} | 1 |" in text and "/1 better)" in text
    base = runs[0]["pretrained"]
    assert {j["seed"] for j in finetune.seed_jobs(grid, True, "quick", base)} == {1}
    assert finetune.seed_jobs(grid, True, "quick", "another model") == []


def test_runs_from_other_pretrained_weights_are_never_mixed(quick_runs, tmp_path):
    """The cache is not committed: a later session (another code version) may pre-train other weights. Runs are
    keyed by the weights' fingerprint, a job planned from other weights refuses to run, and the tables use only the
    runs from each size's most recent weights."""
    runs = list(quick_runs.values())
    base = runs[0]["pretrained"]
    state = torch.load(next(tmp_path.glob("pretrain-quick-*.pt")))["state"]
    assert finetune.fingerprint(state) == base and len(base) == 16
    state[next(iter(state))].view(-1)[0] += 1e-6
    assert finetune.fingerprint(state) != base
    with pytest.raises(RuntimeError, match="changed under the study"):
        finetune.train_run(dict(size="quick", arm="topk", seed=0, lr=1e-3, quick=True, pretrained="0" * 16))
    older = [dict(r, pretrained="0" * 16, final_val=9.0) for r in runs]
    assert finetune.current(older + runs) == runs
    text = finetune.render(older + runs, quick=True)
    assert "(3 earlier runs from other pre-trained weights are left out.)" in text and "9.0000" not in text
