"""Every quantizer of the paper's Table 1 trains by name with ``python -m gmvq_ext.train``:
a tiny run per name, the command-line options of the new names, and an exact resume
of the one that keeps optimiser state inside the quantizer (``vqvae-affine-opt``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gmvq_ext import QUANTIZERS, train
from gmvq_ext.training.config import QUANTIZER_NAMES, parse_args, quantizer_defaults, quantizer_options
from helpers import SAMPLE_DATA

TINY = ["--dataset", "cifar10", "--data-dir", str(SAMPLE_DATA / "cifar10-sample"), "--codebook-size", "64",
        "--dim", "16", "--batch-size", "32", "--max-train-images", "64", "--max-test-images", "32",
        "--lr", "1e-3", "--warmup-epochs", "1", "--seed", "3", "--device", "cpu"]
NEW_NAMES = ["vqvae-l2-replace", "vqvae-affine", "vqvae-opt", "vqvae-affine-opt", "gmvq-entropy"]


# One intra-op thread for every test (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_command_line_offers_every_registered_quantizer():
    assert set(QUANTIZER_NAMES) == set(QUANTIZERS) and set(NEW_NAMES) <= set(QUANTIZER_NAMES)


@pytest.mark.parametrize("name", NEW_NAMES)
def test_one_epoch_by_name_gives_finite_metrics(tmp_path, name):
    results = train.main([*TINY, "--quantizer", name, "--epochs", "1", "--out", str(tmp_path / name)])
    assert results["quantizer"]["name"] == name and results["steps"] == 2
    for key in ("test_mse", "test_perplexity", "test_perplexity_hard"):
        assert math.isfinite(results[key]), key
    assert 1 <= results["test_perplexity"] <= 64 and 1 <= results["codes_used"] <= 64
    assert json.loads((tmp_path / name / "results.json").read_text())["test_mse"] == results["test_mse"]


def test_alternating_state_resumes_exactly(tmp_path):
    """The codebook velocity and the affine map live in the state_dict: a split run ends bit-identical."""
    argv = [*TINY, "--quantizer", "vqvae-affine-opt", "--epochs", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main([*argv, "--out", str(straight)])
    assert train.main([*argv, "--stop-after-epoch", "1", "--out", str(split)]) is None
    train.main([*argv, "--resume", "--out", str(split)])
    a, b = (torch.load(out / "checkpoint.pt", weights_only=False)["model"] for out in (straight, split))
    assert {"quantizer.codebook_velocity", "quantizer.affine_weight", "quantizer.affine_bias"} <= set(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["quantizer.codebook_velocity"].any()


@pytest.mark.parametrize("name, argv, expected", [
    ("gmvq-entropy", [], {}),
    ("gmvq-entropy", ["--beta", "2"], {"beta": 2.0}),
    ("vqvae-opt", ["--commitment", "0"], {"commitment": 0.0}),
    ("vqvae-affine-opt", ["--quantizer-option", "sync_nu=0.5", "--quantizer-option", "affine_lr=10"],
     {"sync_nu": 0.5, "affine_lr": 10}),
    ("vqvae-l2-replace", ["--quantizer-option", "replace_after=50"], {"replace_after": 50}),
])
def test_options_of_the_new_names(name, argv, expected):
    args = parse_args([*TINY, "--quantizer", name, *argv, "--out", "unused"])
    # What was given, and every other keyword at the quantizer's default (a checkpoint holds them all).
    assert quantizer_options(args) == {**quantizer_defaults(QUANTIZERS[name]), **expected, "seed": args.seed}


def test_options_of_another_quantizer_are_refused():
    args = parse_args([*TINY, "--quantizer", "vqvae-affine", "--quantizer-option", "sync_nu=1", "--out", "unused"])
    with pytest.raises(ValueError, match="sync_nu"):
        quantizer_options(args)


@pytest.mark.parametrize("value, scale", [("False", 0.0), ("True", 1.0)])
def test_gmvq_noise_switch_of_older_runs_reads_as_its_noise_scale(value, scale):
    # Checkpoints of gmvq_ext 0.1 recorded --quantizer-option noise=...: they still evaluate and tokenize.
    args = parse_args([*TINY, "--quantizer", "gmvq", "--quantizer-option", f"noise={value}", "--out", "unused"])
    assert quantizer_options(args)["noise_scale"] == scale
    assert QUANTIZERS["gmvq"](dim=16, codebook_size=64, **quantizer_options(args)).noise_scale == scale
    args = parse_args([*TINY, "--quantizer", "vqvae", "--quantizer-option", "noise=False", "--out", "unused"])
    with pytest.raises(ValueError, match="noise"):
        quantizer_options(args)  # only GM-VQ ever had it
