"""experiments/sweep_beta.py: its commands read only validation metrics, its
summary is the mean and spread over seeds, and a real (one-epoch) sweep writes
the table, the JSON and the frontier plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import SAMPLE_DATA

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "sweep_beta.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def load_sweep():
    spec = importlib.util.spec_from_file_location("sweep_beta", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_is_the_mean_and_spread_over_seeds_baselines_last():
    sweep = load_sweep()
    runs = [{"system": "vqvae", "beta": None, "val/mse": 0.05, "val/psnr": 20.0, "val/perplexity": 20.0,
             "val/codes_used": 30, "test/mse": 1.0}]
    for beta, mses in ((10.0, (0.04, 0.06)), (0.1, (0.02, 0.03))):
        runs += [{"system": "gmvq", "beta": beta, "val/mse": mse, "val/psnr": 21.0, "val/perplexity": 100.0,
                  "val/codes_used": 200} for mse in mses]
    rows = sweep.summary(runs, "val")
    assert [(row["system"], row["beta"]) for row in rows] == [("gmvq", 0.1), ("gmvq", 10.0), ("vqvae", None)]
    assert rows[0]["mse"] == pytest.approx(0.025) and rows[0]["mse sd"] == pytest.approx(0.00707, rel=1e-3)
    assert rows[2]["seeds"] == 1 and rows[2]["mse sd"] == 0.0 and rows[2]["mse"] == 0.05  # never the test split


def test_a_one_epoch_sweep_writes_table_json_and_plot(tmp_path):
    sweep = load_sweep()
    data = SAMPLE_DATA / "cifar10-sample"
    out = tmp_path / "sweep"
    sweep.main(["--betas", "1", "--seeds", "0", "--epochs", "1", "--jobs", "1", "--baselines", "vqvae",
                "--data-dir", str(data), "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(row["system"], row["beta"]) for row in result["summary"]] == [("gmvq", 1.0), ("vqvae", None)]
    for run in result["runs"]:
        assert "--val-fraction" in run["command"] and run["val/mse"] > 0 and run["epochs"] == 1
        assert not any(key.startswith("test/") for key in run)
    assert "| gmvq | 1 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000
