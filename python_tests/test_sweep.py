"""experiments/sweep.py: points expand into settings, every command states them and reads only
validation metrics, the summary is the mean and spread over seeds, a failed run is a result and
not a crash, and a real (one-epoch) sweep writes the table, the JSON and both plots."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import SAMPLE_DATA

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "sweep.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def load_sweep():
    spec = importlib.util.spec_from_file_location("sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_point_expands_into_every_combination_of_its_values():
    sweep = load_sweep()
    assert sweep.expand("vqvae") == [("vqvae", {})]
    assert sweep.expand("gmvq:beta=0.1|1,lr=0.01") == [("gmvq", {"beta": 0.1, "lr": 0.01}),
                                                       ("gmvq", {"beta": 1, "lr": 0.01})]
    assert len(sweep.expand("sqvae:lr=1|2|3,latent_weight=1|2")) == 6
    for bad in ("nonsense", "gmvq:beta", "gmvq:beta="):
        with pytest.raises(SystemExit, match="nonsense|beta"):
            sweep.expand(bad)


def test_commands_state_every_setting_trainer_flags_and_quantizer_options_apart(tmp_path):
    sweep = load_sweep()
    args = sweep.parse_args(["vqvae", "--runs-dir", str(tmp_path)])
    levers = {"lr": 0.003, "commitment": 1.0, "replace_after": 30}
    cmd = sweep.command(args, "vqvae-replace", levers, 1, tmp_path / "run")
    flags = dict(zip(cmd, cmd[1:]))
    assert flags["--lr"] == "0.003" and flags["--commitment"] == "1.0" and flags["--batch-size"] == "128"
    assert flags["--quantizer-option"] == "replace_after=30" and flags["--val-fraction"] == "0.1"
    test_args = sweep.parse_args(["vqvae", "--evaluate", "test"])
    assert "--val-fraction" not in sweep.command(test_args, "vqvae", {}, 0, tmp_path / "run")
    # Distinct settings never share a run folder.
    assert sweep.run_folder(args, "gmvq", {"lr": 0.01}, 0) != sweep.run_folder(args, "gmvq", {"lr": 0.03}, 0)


def test_summary_is_the_mean_and_spread_over_seeds_in_the_order_given():
    sweep = load_sweep()
    runs = [{"system": "vqvae", "levers": {}, "val/mse": 0.05, "val/psnr": 20.0, "val/perplexity": 20.0,
             "val/codes_used": 30, "test/mse": 1.0, "codes_replaced": None}]
    for beta, mses in ((10.0, (0.04, 0.06)), (0.1, (0.02, 0.03))):
        runs += [{"system": "gmvq", "levers": {"beta": beta}, "val/mse": mse, "val/psnr": 21.0,
                  "val/perplexity": 100.0, "val/codes_used": 200} for mse in mses]
    runs.append({"system": "gmvq", "levers": {"beta": 0.1}, "failed": "exit 1: diverged", "curve": []})
    rows = sweep.summary(runs, "val")
    assert [row["point"] for row in rows] == ["vqvae", "gmvq beta=10", "gmvq beta=0.1"]
    assert rows[0]["seeds"] == 1 and rows[0]["mse sd"] == 0.0 and rows[0]["mse"] == 0.05  # never the test split
    assert rows[2]["mse"] == pytest.approx(0.025) and rows[2]["mse sd"] == pytest.approx(0.00707, rel=1e-3)
    assert rows[2]["failed"] == 1 and rows[2]["seeds"] == 3
    args = sweep.parse_args(["vqvae"])
    assert "| gmvq beta=0.1 | 25.00 ± 7.07 |" in sweep.markdown(args, rows)
    assert "3 (1 failed)" in sweep.markdown(args, rows)


def test_the_frontier_draws_one_series_per_point_given_named_by_what_varies_in_it():
    sweep = load_sweep()
    specs = ["gmvq:beta=0.1|1,gamma=0.1", "gmvq:gamma=0.3|1", "vqvae:lr=0.01"]
    extended = ("gmvq", {"beta": 3.0, "gamma": 0.1})  # --extend went beyond the first grid's edge
    points = [point for spec in specs for point in sweep.expand(spec)] + [extended]
    series = sweep.point_series(specs, points, ladder_lever="beta")
    assert series == {"gmvq beta=0.1 gamma=0.1": 0, "gmvq beta=1 gamma=0.1": 0, "gmvq beta=3 gamma=0.1": 0,
                      "gmvq gamma=0.3": 1, "gmvq gamma=1": 1, "vqvae lr=0.01": 2}
    rows = [{"system": system, "levers": levers, "series": series[sweep.label(system, levers)]}
            for system, levers in points]
    names = sweep.series_names(rows)
    assert names == ["gmvq over beta (gamma=0.1)"] * 2 + ["gmvq over gamma"] * 2 + ["vqvae (lr=0.01)",
                                                                                    "gmvq over beta (gamma=0.1)"]
    assert [row["varying"] for row in rows] == [["beta"]] * 2 + [["gamma"]] * 2 + [[], ["beta"]]
    for kind in ("marker", "linestyle"):
        styles = [tuple(sweep.series_style(index, kind).items()) for index in range(40)]
        assert len(set(styles)) == 40, f"two of the first 40 series share a colour and a {kind}"


def test_a_one_epoch_sweep_writes_table_json_and_plots(tmp_path):
    sweep = load_sweep()
    out = tmp_path / "sweep"
    sweep.main(["gmvq:beta=1", "vqvae-replace:replace_after=5", "--seeds", "0", "--epochs", "1", "--jobs", "1",
                "--data-dir", str(SAMPLE_DATA / "cifar10-sample"), "--runs-dir", str(tmp_path / "runs"),
                "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["sweep_command"][2:5] == ["gmvq:beta=1", "vqvae-replace:replace_after=5", "--seeds"]
    assert [row["point"] for row in result["summary"]] == ["gmvq beta=1", "vqvae-replace replace_after=5"]
    for run in result["runs"]:
        assert "--val-fraction" in run["command"] and run["val/mse"] > 0 and run["epochs"] == 1
        assert not any(key.startswith("test/") for key in run)
        assert [point["epoch"] for point in run["curve"]] == [1] and run["curve"][0]["mse"] == run["val/mse"]
    gmvq, replace = result["runs"]
    assert gmvq["quantizer_options"]["beta"] == 1 and gmvq["quantizer_options"]["gamma"] == 0.1  # resolved
    assert gmvq["codes_replaced"] is None and replace["codes_replaced"] > 0  # dead codes were replaced
    assert "| gmvq beta=1 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert (tmp_path / "sweep-curves.png").stat().st_size > 10_000
    # A second call reads the finished runs instead of training them again.
    logs = {path: path.stat().st_size for path in (tmp_path / "runs").rglob("*.log")}
    sweep.main(["gmvq:beta=1", "--seeds", "0", "--epochs", "1", "--data-dir", str(SAMPLE_DATA / "cifar10-sample"),
                "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    assert {path: path.stat().st_size for path in (tmp_path / "runs").rglob("*.log")} == logs
    assert json.loads(out.with_suffix(".json").read_text())["runs"][0]["val/mse"] == gmvq["val/mse"]
    # From scratch (a fresh runs folder), the row comes back bit for bit: every row can be rerun.
    again = tmp_path / "again"
    sweep.main(["vqvae-replace:replace_after=5", "--seeds", "0", "--epochs", "1", "--data-dir",
                str(SAMPLE_DATA / "cifar10-sample"), "--runs-dir", str(tmp_path / "fresh"), "--out", str(again)])
    rerun, = json.loads(again.with_suffix(".json").read_text())["runs"]
    assert {key: rerun[key] for key in ("val/mse", "val/perplexity", "codes_replaced")} == \
        {key: replace[key] for key in ("val/mse", "val/perplexity", "codes_replaced")}
    # A run trained under an older default is not passed off as the point's setting today.
    results_file = Path(gmvq["command"][gmvq["command"].index("--out") + 1]) / "results.json"
    results = json.loads(results_file.read_text())
    results["quantizer"]["options"]["gamma"] = 0.25
    results["args"]["sigma_x2"] = 0.125
    results_file.write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=r"sigma_x2=0.125 \(now 0.5\), gamma=0.25 \(now 0.1\).*fresh --runs-dir"):
        sweep.main(["gmvq:beta=1", "--seeds", "0", "--epochs", "1", "--data-dir", str(SAMPLE_DATA / "cifar10-sample"),
                    "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])


def test_celeba_tunes_on_its_validation_split_and_tests_on_its_test_split(tmp_path):
    sweep = load_sweep()
    assert sweep.DEFAULT_DATA["celeba"].name == "test_crops"  # the sample's aligned faces are all "train"
    crops = tmp_path / "crops"  # 20 real faces: 16 train, 2 val, 2 test by file name (a batch of 8)
    crops.mkdir()
    for source in sorted((SAMPLE_DATA / "celeba-sample" / "test_crops").glob("*.jpg"))[:20]:
        (crops / source.name).write_bytes(source.read_bytes())
    common = ["vqvae:batch_size=8", "--dataset", "celeba", "--data-dir", str(crops), "--seeds", "0", "--epochs", "1",
              "--jobs", "1", "--runs-dir", str(tmp_path / "runs")]
    sweep.main([*common, "--out", str(tmp_path / "val")])
    tuned, = json.loads((tmp_path / "val.json").read_text())["runs"]
    assert "--val-fraction" in tuned["command"] and tuned["curve_split"] == "val" and tuned["val/mse"] > 0
    assert "second 10% of its sorted file names" in (tmp_path / "val.md").read_text()
    sweep.main([*common, "--evaluate", "test", "--out", str(tmp_path / "test")])
    tested, = json.loads((tmp_path / "test.json").read_text())["runs"]
    assert "--val-fraction" not in tested["command"] and tested["curve_split"] == "test"
    assert tested["test/mse"] > 0 and not any(key.startswith("val/") for key in tested)
    # A run that evaluated no validation split cannot be read for a choice.
    test_run = Path(tested["command"][tested["command"].index("--out") + 1])
    with pytest.raises(SystemExit, match="no validation split"):
        sweep.read_run("val", test_run, "vqvae", {"batch_size": 8}, 0, tested["command"])


def test_a_run_that_fails_is_recorded_with_its_reason(tmp_path):
    sweep = load_sweep()
    out = tmp_path / "sweep"
    sweep.main(["vqvae:lr=-1", "--seeds", "0", "--epochs", "1", "--data-dir", str(SAMPLE_DATA / "cifar10-sample"),
                "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    run, = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert run["failed"].startswith("exit 2") and "lr" in run["failed"]
    assert "1 (1 failed)" in out.with_suffix(".md").read_text()


def fake_run(system, levers, seed, mse):
    return {"system": system, "levers": levers, "seed": seed, "val/mse": mse, "val/psnr": 20.0,
            "val/perplexity": 10.0, "val/codes_used": 10, "codes_replaced": None, "curve_split": "val",
            "curve": [{"epoch": 1, "mse": mse, "perplexity": 10.0}]}


def test_a_grid_whose_best_value_is_at_an_edge_is_extended_along_the_ladder():
    sweep = load_sweep()
    ladder = ("lr", [0.001, 0.003, 0.01, 0.03, 0.1])
    points = sweep.expand("gmvq:lr=0.003|0.01|0.03,beta=1") + sweep.expand("gmvq:lr=0.003|0.01|0.03,beta=3")

    def runs_with(best_for_beta):  # the MSE falls towards each group's best lr
        return [fake_run(system, levers, seed, abs(levers["lr"] - best_for_beta[levers["beta"]]))
                for system, levers in points for seed in (0, 1)]

    added = sweep.beyond_the_edges(points, runs_with({1: 0.03, 3: 0.003}), ladder)
    assert added == [("gmvq", {"lr": 0.1, "beta": 1}), ("gmvq", {"lr": 0.001, "beta": 3})]
    assert sweep.beyond_the_edges(points, runs_with({1: 0.01, 3: 0.01}), ladder) == []  # interior: done
    at_the_end = ("lr", [0.003, 0.01, 0.03])
    assert sweep.beyond_the_edges(points, runs_with({1: 0.03, 3: 0.01}), at_the_end) == []  # the ladder ends
    failed = [run if run["levers"]["lr"] != 0.03 else {**run, "val/mse": None, "failed": "exit 1"}
              for run in runs_with({1: 0.03, 3: 0.01})]
    assert sweep.beyond_the_edges(points, failed, ladder) == []  # a diverged value is not a best


def test_extend_trains_until_the_best_value_is_interior(tmp_path, monkeypatch):
    sweep = load_sweep()
    trained = []

    def train(args, system, levers, seed):
        trained.append(levers["lr"])
        return fake_run(system, levers, seed, abs(levers["lr"] - 0.1) + seed * 1e-4)  # best lr: 0.1

    monkeypatch.setattr(sweep, "train", train)
    out = tmp_path / "lr"
    sweep.main(["vqvae:lr=0.003|0.01", "--extend", "lr=0.001|0.003|0.01|0.03|0.1|0.3|1", "--out", str(out)])
    assert sorted(set(trained)) == [0.003, 0.01, 0.03, 0.1, 0.3] and len(trained) == 10  # each once per seed
    result = json.loads(out.with_suffix(".json").read_text())
    assert [row["levers"]["lr"] for row in result["summary"]] == [0.003, 0.01, 0.03, 0.1, 0.3]
    with pytest.raises(SystemExit):
        sweep.main(["vqvae:lr=0.003|0.01", "--extend", "lr=0.001|0.003", "--evaluate", "test"])
    with pytest.raises(SystemExit, match="ladder"):
        sweep.main(["vqvae:lr=0.005", "--extend", "lr=0.001|0.003", "--out", str(out)])


@pytest.mark.parametrize("script", ["study_cifar10.sh", "study_celeba.sh"])
def test_every_command_of_a_study_script_is_one_the_trainer_accepts(tmp_path, script):
    # The script run with a stand-in `python` that records its arguments: nothing trains.
    recorder = tmp_path / "bin" / "python"
    recorder.parent.mkdir()
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/call-$$-$(date +%s%N)"\necho >> "{tmp_path}/calls"\n')
    recorder.chmod(0o755)
    env = {**os.environ, "PATH": f"{recorder.parent}{os.pathsep}{os.environ['PATH']}", "RUNS": str(tmp_path / "runs")}
    subprocess.run(["bash", str(SCRIPT.parent / script)], env=env, check=True, timeout=60)
    calls = [path.read_text().splitlines() for path in sorted(tmp_path.glob("call-*"))]
    assert len(calls) == len((tmp_path / "calls").read_text().splitlines()) >= 2
    sweep = load_sweep()
    from gmvq_ext.training.config import parse_args as trainer_args, quantizer_options

    for call in calls:
        assert call[0] == "experiments/sweep.py"
        args = sweep.parse_args(call[1:])
        assert args.runs_dir == str(tmp_path / "runs")
        for spec in args.points:
            for system, levers in sweep.expand(spec):
                cmd = sweep.command(args, system, levers, 0, tmp_path / "run")
                options = quantizer_options(trainer_args(cmd[3:]))  # raises on an option the quantizer lacks
                assert all(options[name] == value for name, value in levers.items() if name in options)
