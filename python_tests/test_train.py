"""python -m gmvq_ext.train end to end on the CIFAR-10 sample: artifacts, exact
resume, bad input (torchrun runs: test_train_distributed.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gmvq_ext import train
from gmvq_ext.training.visuals import read_curves
from training_runs import DATA, SMALL, load_weights, run_cli, without_gamma

RESULT_KEYS = {"test_mse", "test_mse_01", "test_perplexity", "codes_used", "epochs", "images_per_second",
               "quantizer", "args", "pixel_range"}
METRICS_TO_MATCH = ("test_mse", "test_mse_01", "test_perplexity", "test_perplexity_hard", "codes_used", "steps")


# One intra-op thread for every test (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_epoch_cli_writes_every_artifact(tmp_path):
    out = tmp_path / "run"
    done = run_cli(*SMALL, "--epochs", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gmvq ops: cpu kernels" in done.stdout  # which implementation of the ops ran is logged

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert {"train/mse", "train/loss", "train/perplexity", "test/mse", "test/perplexity",
            "test/codes_used", "lr", "images_per_second"} <= set(records[0])

    results = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["epochs"] == 1 and results["test_images"] == 64 and results["steps"] == 3
    assert results["test_mse_01"] == pytest.approx(results["test_mse"] / 4)
    assert 1 <= results["test_perplexity"] <= 64 and 1 <= results["codes_used"] <= 64
    assert results["images_per_second"] > 0

    from PIL import Image

    for name in ("recon_epoch001.png", "codes_epoch001.png", "curves.png"):
        with Image.open(out / "images" / name) as picture:
            assert picture.size[0] > 100 and picture.size[1] > 60
    assert read_curves(out / "metrics.jsonl")["test/mse"] == ([1], [records[0]["test/mse"]])

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "step", "rng", "args"} <= set(state)
    assert state["epoch"] == 1 and state["step"] == 3 and state["args"]["codebook_size"] == 64
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_interrupted_then_resumed_run_matches_uninterrupted(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main([*SMALL, "--epochs", "2", "--out", str(straight)]) is not None
    assert train.main([*SMALL, "--epochs", "2", "--stop-after-epoch", "1", "--out", str(split)]) is None
    assert not (split / "results.json").exists()
    assert torch.load(split / "checkpoint.pt", weights_only=True)["epoch"] == 1
    train.main([*SMALL, "--epochs", "2", "--resume", "--out", str(split)])

    a = json.loads((straight / "results.json").read_text())
    b = json.loads((split / "results.json").read_text())
    for key in METRICS_TO_MATCH:
        assert a[key] == b[key], key
    wa, wb = load_weights(straight), load_weights(split)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    lines = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    reference = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["test/mse"] == reference[1]["test/mse"]
    # the curves of the resumed run cover both epochs, with the uninterrupted run's values
    assert read_curves(split / "metrics.jsonl") == read_curves(straight / "metrics.jsonl")
    assert read_curves(split / "metrics.jsonl")["train/mse"][0] == [1, 2]
    assert (split / "images" / "curves.png").stat().st_mtime >= (split / "checkpoint.pt").stat().st_mtime

    # a resume that would change the run is refused, naming the difference
    with pytest.raises(SystemExit, match="--lr"):
        train.main([*[a if a != "1e-3" else "2e-3" for a in SMALL], "--epochs", "3", "--resume", "--out",
                    str(split)])


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--data-dir", "/nonexistent/cifar"], "does not exist"),
    (["--resume"], "no checkpoint"),
])
def test_bad_input_fails_clearly(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as raised:
        train.main([*SMALL, "--epochs", "1", "--out", str(tmp_path / "run"), *argv])
    assert message in str(raised.value) + capsys.readouterr().err


def test_unknown_dataset_and_existing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--dataset", "mnist", "--data-dir", str(DATA), "--out", str(tmp_path)])
    assert "invalid choice: 'mnist'" in capsys.readouterr().err
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main([*SMALL, "--epochs", "1", "--out", str(out)])


def test_options_must_fit_the_quantizer(tmp_path):
    # SMALL sets --gamma, a GM-VQ option
    with pytest.raises(SystemExit, match="--gamma does not apply to the vqvae quantizer"):
        train.main([*SMALL, "--quantizer", "vqvae", "--epochs", "1", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="takes.*kl_weight"):
        train.main([*without_gamma(), "--quantizer", "gumbel", "--quantizer-option", "kl_wieght=1",
                    "--epochs", "1",
                    "--out", str(tmp_path / "b")])


def test_quantizer_options_from_the_command_line():
    from gmvq_ext.training.config import parse_args, quantizer_options

    # Every keyword, at its default unless given: a checkpoint holds the settings in full.
    args = parse_args([*without_gamma(), "--quantizer", "vqvae", "--commitment", "0.5", "--out", "x"])
    assert quantizer_options(args) == {"commitment": 0.5, "seed": 3, "kmeans_init": True, "kmeans_iterations": 10,
                                       "channel_first": None}
    # --beta is GM-VQ's KL weight only, never the VQ-VAE commitment.
    with pytest.raises(ValueError, match="--beta does not apply to the vqvae quantizer"):
        quantizer_options(parse_args([*without_gamma(), "--quantizer", "vqvae", "--beta", "0.5", "--out", "x"]))
    args = parse_args([*SMALL, "--beta", "2", "--sigma-z2", "0.25", "--quantizer-option", "weight=scalar",
                       "--quantizer-option", "hard=False", "--out", "x"])
    given = {"beta": 2.0, "gamma": 0.1, "sigma_z2": 0.25, "weight": "scalar", "hard": False, "seed": 3}
    assert {name: quantizer_options(args)[name] for name in given} == given
    assert quantizer_options(args)["noise_scale"] == 0.0  # a default, written out


def test_compile_and_bf16_mixed_precision(tmp_path):
    eager = train.main([*SMALL, "--epochs", "1", "--out", str(tmp_path / "eager")])
    compiled = train.main([*SMALL, "--epochs", "1", "--compile", "--out", str(tmp_path / "compiled")])
    mixed = train.main([*SMALL, "--epochs", "1", "--precision", "bf16-mixed", "--out", str(tmp_path / "mixed")])
    # The compiled step computes what the eager one does (up to inductor's float reassociation).
    assert compiled["test_mse"] == pytest.approx(eager["test_mse"], rel=1e-3)
    assert compiled["codes_used"] == eager["codes_used"]
    # bfloat16 encoder and decoder: another rounding, the same training.
    assert math.isfinite(mixed["test_mse"]) and mixed["test_mse"] == pytest.approx(eager["test_mse"], rel=0.2)
    assert mixed["args"]["precision"] == "bf16-mixed"
    with pytest.raises(SystemExit, match="--precision 'fp32'"):  # a resume may not change the precision
        train.main([*SMALL, "--epochs", "2", "--resume", "--out", str(tmp_path / "mixed")])


def test_celeba_folder_of_crops_runs_at_128_pixels(tmp_path):
    crops = DATA.parent / "celeba-sample" / "test_crops"
    if not crops.is_dir():
        pytest.skip("CelebA sample not found")
    out = tmp_path / "celeba"
    results = train.main(["--dataset", "celeba", "--data-dir", str(crops), "--quantizer", "vqvae",
                          "--codebook-size", "32", "--dim", "8", "--batch-size", "4", "--max-train-images", "8",
                          "--max-test-images", "4", "--epochs", "1", "--warmup-epochs", "0", "--device", "cpu",
                          "--out", str(out)])
    assert results["test_images"] == 4 and results["train_images"] == 8 and results["steps"] == 2
    assert results["args"]["lr"] == 1e-4  # the paper's CelebA default
    from PIL import Image

    with Image.open(out / "images" / "recon_epoch001.png") as picture:
        assert picture.size[0] > 4 * 128  # 4 images of 128 pixels in a row
