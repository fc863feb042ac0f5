"""gmvq-evaluate reproduces a run's test metrics from its checkpoint."""

from __future__ import annotations

import json

import pytest

from gmvq_ext import train
from gmvq_ext.cli import evaluate

from training_runs import SMALL, run_cli

# One intra-op thread for every test (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_evaluate_reproduces_results_json(tmp_path):
    out = tmp_path / "run"
    train.main([*SMALL, "--epochs", "1", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    done = run_cli("--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu",
                   module=("-m", "gmvq_ext.cli.evaluate"))
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    written = json.loads((out / "evaluation.json").read_text())
    assert printed == written
    for key in ("test_mse", "test_mse_01", "test_perplexity", "codes_used", "test_images"):
        assert printed[key] == pytest.approx(results[key], rel=1e-9, abs=0), key


def test_evaluate_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        evaluate.main(["--checkpoint", str(tmp_path / "missing.pt")])
