"""A tokenizer trained on a folder of one's own images, end to end: one epoch on
a nested folder of real images with a broken file (stopped before training
without --skip-bad-images, trained with it), exported, reloaded with
from_pretrained in a fresh process with encode/decode reproduced exactly,
and its PSNR and SSIM in results.json and gmvq-evaluate checked against an
independent computation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import gmvq_ext
from gmvq_ext.cli.evaluate import main as evaluate_main
from gmvq_ext.cli.export import main as export_main
from gmvq_ext.cli.tokenize import main as tokenize_main
from gmvq_ext.cli.train import main as train_main
from gmvq_ext.data import hash_split
from folder_runs import TINY, folder_test_images, folder_test_reconstructions, photos, run  # noqa: F401 (fixtures)
from helpers import PACKAGE_PARENT, subprocess_env
from image_folders import BROKEN
from image_quality_reference import psnr_reference, ssim_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def test_without_skip_the_broken_file_stops_the_run_before_training(photos, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as raised:
        train_main([*TINY, "--data-dir", str(photos), "--out", str(out)])
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"gmvq-train: error: unreadable image {str(photos / BROKEN)!r}: ")
    assert "pass --skip-bad-images" in message
    assert not out.exists()  # nothing trained, nothing written


def test_with_skip_one_epoch_trains_and_reports_the_skipped_file(run):
    out, printed = run
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_images"] == 1 and results["skipped_image_files"][0]["path"] == BROKEN
    assert f"skipped 1 unreadable image(s) (--skip-bad-images): {BROKEN}" in printed
    assert results["epochs"] == 1 and results["steps"] >= 1 and results["args"]["image_size"] == 32
    assert results["train_images"] + results["test_images"] <= 96
    for key in ("test_psnr", "test_ssim", "test_mse", "test_perplexity", "codes_used", "test_code_entropy_bits"):
        assert np.isfinite(results[key]), key
    assert "torchmetrics" in results["psnr_ssim_convention"]

    # the per-epoch evaluation's PSNR and SSIM: metrics.jsonl, TensorBoard and curves.png alike
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("val/psnr", "val/ssim"):
        assert [e.value for e in events.Scalars(key)] == pytest.approx([record[key]], rel=1e-6)
    assert (out / "images" / "curves.png").stat().st_size > 0


def test_export_and_from_pretrained_in_a_fresh_process_reproduce_encode_and_decode(run, photos, tmp_path):
    out, _ = run
    exported = tmp_path / "tokenizer"
    export_main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(exported)])
    images = folder_test_images(photos)
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "import gmvq_ext\n"
        "tokenizer = gmvq_ext.Tokenizer.from_pretrained(sys.argv[1], device='cpu')\n"
        "images = torch.load(sys.argv[2], weights_only=True)\n"
        "codes = tokenizer.encode(images)\n"
        "torch.save({'codes': codes, 'decoded': tokenizer.decode(codes),\n"
        "            'uint8_codes': tokenizer.encode(((images + 1) * 127.5).round().to(torch.uint8))}, sys.argv[3])\n"
        "assert 'gmvq_ext.training' not in sys.modules, 'from_pretrained must not need the training code'\n")
    done = subprocess.run([sys.executable, "-c", script, str(exported), str(tmp_path / "images.pt"),
                           str(tmp_path / "fresh.pt")], cwd=PACKAGE_PARENT, env=subprocess_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)

    original = gmvq_ext.Tokenizer.from_checkpoint(out / "checkpoint.pt", device="cpu")
    codes = original.encode(images)
    assert codes.shape == (len(images), 4, 4)
    assert torch.equal(fresh["codes"], codes)
    assert torch.equal(fresh["decoded"], original.decode(codes))
    with torch.no_grad():  # and the evaluation forward of the trained model, bit for bit
        assert torch.equal(fresh["decoded"], original.model(images)[0])


def test_psnr_and_ssim_in_results_and_evaluate_match_an_independent_computation(run, photos, capsys):
    out, _ = run
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    evaluate_main(["--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu"])
    printed = json.loads(capsys.readouterr().out)
    # gmvq-evaluate checks the files of the split it reads
    assert printed["skipped_images"] == (hash_split(BROKEN) == "test")
    assert printed["test_images"] == results["test_images"]

    images, reconstructions = folder_test_reconstructions(out, photos)
    psnr = np.mean([psnr_reference(r, x) for r, x in zip(reconstructions, images)])
    ssim = np.mean([ssim_reference(r, x) for r, x in zip(reconstructions, images)])
    for reported in (results, printed):
        assert reported["test_psnr"] == pytest.approx(psnr, rel=1e-6)
        # torchmetrics works in float32, the reference in float64: E[a^2] - mu^2 cancels where a
        # reconstruction is flat (var + c2 down to 9e-4), a few 1e-6 on this run's few codes.
        assert reported["test_ssim"] == pytest.approx(ssim, abs=1e-5)
    assert 0 < ssim < 1 and 5 < psnr < 40


def test_tokenize_writes_the_codes_of_the_folders_split(run, photos, tmp_path):
    out, _ = run
    tokenize_main(["--checkpoint", str(out / "checkpoint.pt"), "--split", "test", "--out", str(tmp_path / "c.npy"),
                   "--device", "cpu", "--batch-size", "5"])
    codes = np.load(tmp_path / "c.npy")
    tokenizer = gmvq_ext.Tokenizer.from_checkpoint(out / "checkpoint.pt", device="cpu")
    assert codes.dtype == np.int16 and np.array_equal(codes, tokenizer.encode(folder_test_images(photos)).numpy())
