"""Training that survives what clusters and optimisers do to it: a stop
request (SIGTERM, SIGUSR1), a step that goes non-finite, a checkpoint that
cannot be written. Each ends with a checkpoint that --resume continues
exactly, or with a one-line error and the previous checkpoint intact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmvq_ext import files, train
from gmvq_ext.training import checkpoint as ckpt
from gmvq_ext.training.stopping import EXIT_PREEMPTED
from helpers import SAMPLE_DATA
from training_runs import finish, start, torchrun, wait_for

DATA = SAMPLE_DATA / "cifar10-sample"
# 8 steps an epoch (1 process, or 2 ranks of 16 images), 3 epochs; a logging (and stopping) point every step.
RUN = ["--dataset", "cifar10", "--data-dir", str(DATA), "--quantizer", "gmvq", "--codebook-size", "32",
       "--dim", "8", "--batch-size", "32", "--max-train-images", "256", "--max-test-images", "32",
       "--lr", "1e-3", "--warmup-epochs", "1", "--seed", "5", "--device", "cpu", "--log-every", "1",
       "--epochs", "3"]
pytestmark = pytest.mark.usefixtures("one_thread")
SAME = ("test_mse", "test_perplexity", "test_perplexity_hard", "codes_used", "steps", "rank_parameter_checksums")


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def assert_same_run(a: dict, b: dict) -> None:
    for key in SAME:
        assert a[key] == b[key], key


def gmvq_train(*argv: str, **env: str) -> tuple[int, str, str]:
    return finish(start([sys.executable, "-m", "gmvq_ext.train", *argv], **env), 600)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The uninterrupted run, one process."""
    out = tmp_path_factory.mktemp("straight") / "run"
    code, _, err = gmvq_train(*RUN, "--out", str(out))
    assert code == 0, err[-3000:]
    return results(out)


def test_sigterm_mid_epoch_checkpoints_that_step_and_resume_is_exact(tmp_path, straight):
    out = tmp_path / "run"
    code, _, err = gmvq_train(*RUN, "--out", str(out), GMVQ_TEST_SIGNAL_AT_STEP="11")
    assert code == EXIT_PREEMPTED, err[-3000:]
    assert "stopped on SIGTERM at step 11 (epoch 2), checkpoint written" in err
    assert "Traceback" not in err and not (out / "results.json").exists()
    state = ckpt.load(out / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["epoch_progress"]["batches"]) == (1, 11, 3)
    code, stdout, err = gmvq_train(*RUN, "--out", str(out), "--resume")
    assert code == 0, err[-3000:]
    assert "resumed from epoch 1 (step 11, 3 batches into epoch 2)" in stdout
    assert_same_run(straight, results(out))
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_an_outside_sigusr1_stops_the_run_and_auto_resume_finishes_it(tmp_path, straight):
    # A real signal from another process, at whatever step the run has reached.
    out = tmp_path / "run"
    process = start([sys.executable, "-m", "gmvq_ext.train", *RUN, "--out", str(out)])
    wait_for(out / "checkpoint.pt", process)  # epoch 1 done
    os.kill(process.pid, signal.SIGUSR1)
    code, _, err = finish(process, 600)
    if code == 0:
        pytest.skip("the run finished before the signal arrived")
    assert code == EXIT_PREEMPTED, err[-3000:]
    assert "stopped on SIGUSR1" in err
    code, _, err = gmvq_train(*RUN, "--out", str(out), "--auto-resume")
    assert code == 0, err[-3000:]
    assert_same_run(straight, results(out))


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_auto_resume_is_exact(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    common = ["--standalone", "--nproc_per_node", "2", "-m", "gmvq_ext.train", *RUN, "--auto-resume"]
    code, _, err = finish(start(torchrun(*common, "--out", str(straight))), 600)
    assert code == 0, err[-3000:]
    # Only rank 1 is signalled: the ranks agree at the next logging point, rank 0 writes the checkpoint.
    code, _, err = finish(start(torchrun(*common, "--out", str(stopped)), GMVQ_TEST_SIGNAL_AT_STEP="11:1"), 600)
    assert code != 0 and "stopped on SIGTERM at step 11 (epoch 2)" in err, err[-3000:]
    assert "stopped on another rank at step 11 (epoch 2)" in err  # rank 0, which was not signalled
    state = ckpt.load(stopped / "checkpoint.pt")
    assert (state["step"], state["epoch_progress"]["batches"], state["world_size"]) == (11, 3, 2)
    code, _, err = finish(start(torchrun(*common, "--out", str(stopped))), 600)
    assert code == 0, err[-3000:]
    assert_same_run(results(straight), results(stopped))


@pytest.mark.parametrize("term, named", [("reconstruction", "reconstruction"), ("latent", "latent"),
                                         ("KL", "KL"), ("gradient", "gradient norm")])
def test_a_nonfinite_step_stops_the_run_before_a_checkpoint_holds_it(tmp_path, monkeypatch, term, named):
    out = tmp_path / "run"
    monkeypatch.setenv("GMVQ_TEST_INJECT_NONFINITE", f"11:{term}")
    with pytest.raises(SystemExit) as raised:
        train.main([*RUN, "--log-every", "4", "--out", str(out)])
    message = str(raised.value)
    assert message.startswith("gmvq-train: error: step 11: the ") and named in message.split("went")[0]
    assert "\n" not in message
    state = ckpt.load(out / "checkpoint.pt")  # the last good one: the end of epoch 1
    assert (state["epoch"], state["step"]) == (1, 8)
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())


def test_resume_after_a_nonfinite_step_continues_from_the_last_good_checkpoint(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"
    monkeypatch.setenv("GMVQ_TEST_INJECT_NONFINITE", "20:latent")
    with pytest.raises(SystemExit, match="step 20: the .*latent went non-finite"):
        train.main([*RUN, "--out", str(out)])
    monkeypatch.delenv("GMVQ_TEST_INJECT_NONFINITE")
    resumed = train.main([*RUN, "--out", str(out), "--resume"])
    assert resumed["steps"] == straight["steps"] and resumed["codes_used"] > 0


def test_skip_nonfinite_skips_counts_and_logs_the_steps(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = gmvq_train(*RUN, "--epochs", "1", "--skip-nonfinite", "1", "--out", str(out),
                                   GMVQ_TEST_INJECT_NONFINITE="5:gradient")
    assert code == 0, err[-3000:]
    assert "step 5: the gradient norm went non-finite; step skipped (1 of at most 1)" in stdout
    summary = results(out)
    assert summary["skipped_nonfinite_steps"] == 1 and summary["test_mse"] == summary["test_mse"]  # finite


def _mount_small_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def test_a_failed_checkpoint_write_ends_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = tmp_path / "first"
    train.main([*RUN, "--epochs", "1", "--log-every", "1000", "--out", str(first)])
    checkpoint_bytes = (first / "checkpoint.pt").stat().st_size
    folder_bytes = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    # A file system with room for the run folder and half a checkpoint more, as root; else an
    # fsync that fails as a full disk's delayed allocation does.
    disk = tmp_path / "disk"
    mounted = _mount_small_tmpfs(disk, folder_bytes + checkpoint_bytes // 2 + 64 * 1024)
    try:
        if not mounted:
            def full_disk(descriptor):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(files.os, "fsync", full_disk)
        out = disk / "run"
        shutil.copytree(first, out)
        with pytest.raises(SystemExit) as raised:
            train.main([*RUN, "--epochs", "2", "--log-every", "1000", "--resume", "--out", str(out)])
        message = str(raised.value)
        assert message == (f"gmvq-train: error: cannot write {str(out / 'checkpoint.pt')!r}: "
                           "No space left on device"), message
        state = ckpt.load(out / "checkpoint.pt")  # the previous one, intact
        assert (state["epoch"], state["step"]) == (1, 8)
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def test_a_resumed_run_keeps_the_quantizer_settings_it_started_with(tmp_path, capsys):
    """Defaults change between versions (GM-VQ's gamma did): the checkpoint holds every quantizer keyword,
    and a resumed run is built with them, not with this version's defaults, and says so."""
    out = tmp_path / "run"
    train.main([*RUN, "--out", str(out), "--stop-after-epoch", "1"])
    path = out / ckpt.CHECKPOINT_NAME
    state = ckpt.load(path)
    saved = state["quantizer_options"]
    assert saved["gamma"] == 0.1 and saved["temperature_end"] == 0.1 and saved["kmeans_init"] is True
    state["quantizer_options"] = {**saved, "gamma": 0.25}  # as a version whose default was 0.25 wrote it
    ckpt.save_atomic(state, path)
    capsys.readouterr()
    resumed = train.main([*RUN, "--out", str(out), "--resume"])
    assert resumed["quantizer"]["options"]["gamma"] == 0.25
    logged = "".join(capsys.readouterr())
    assert "resuming with the checkpoint's quantizer settings {'gamma': 0.25}" in logged
    assert "this version's defaults: {'gamma': 0.1}" in logged
    # A model loaded from the checkpoint is described by the same settings.
    from gmvq_ext import Tokenizer
    tokenizer = Tokenizer.from_checkpoint(path, device="cpu")
    assert tokenizer.config["quantizer_options"]["gamma"] == 0.25 and tokenizer.model.quantizer.gamma == 0.25
