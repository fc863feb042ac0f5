"""Checkpoints are plain data: RNG states round-trip as tensors, and malicious,
truncated, foreign or malformed files are refused with one line naming the
file, never executed."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from gmvq_ext import train
from gmvq_ext.cli import evaluate
from gmvq_ext.training import checkpoint as ckpt
from gmvq_ext.training.config import build_model, parse_args
from helpers import PACKAGE_PARENT, subprocess_env

from training_runs import SMALL, small_state


class WritesMarker:
    """Pickles as a call to open(marker, "w"): loading it unsafely creates the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(()).item(), random.gauss(0, 1)


def test_rng_states_round_trip_through_a_file(tmp_path):
    random.gauss(0, 1)  # leaves a cached gauss_next in Python's state
    ckpt.seed_everything(5)
    random.gauss(0, 1)
    np.random.standard_normal()  # and a cached gaussian in NumPy's
    state = small_state()  # builds a model: draws from torch's generator
    state["rng"] = [ckpt.rng_state()]
    expected = draws()
    ckpt.save_atomic(state, tmp_path / "c.pt")
    ckpt.seed_everything(99)
    ckpt.set_rng_state(ckpt.load(tmp_path / "c.pt")["rng"][0])
    assert draws() == expected


def test_a_written_checkpoint_loads_with_weights_only_and_is_stamped(tmp_path):
    ckpt.save_atomic(small_state(), tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format"] == ckpt.CHECKPOINT_FORMAT and raw["version"] == ckpt.CHECKPOINT_VERSION
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_saving_anything_but_plain_data_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"\['args'\]\['extra'\] \(numpy.ndarray\)"):
        ckpt.save_atomic(small_state(args={**small_state()["args"], "extra": np.zeros(3)}), tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())


def test_a_reduce_payload_is_never_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save(small_state(args=WritesMarker(marker), format=ckpt.CHECKPOINT_FORMAT, version=1), path)

    with pytest.raises(ckpt.CheckpointError) as raised:
        ckpt.load(path)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message
    assert re.search(r"the Python object [\w.]*\bopen\b", message)  # io.open: what the payload calls
    assert not marker.exists()

    with pytest.raises(SystemExit) as raised:
        evaluate.main(["--checkpoint", str(path), "--device", "cpu"])
    assert str(raised.value).startswith("gmvq-evaluate: error: cannot load checkpoint")
    assert not marker.exists()


def test_evaluate_cli_refuses_a_payload_with_one_line_and_no_traceback(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": WritesMarker(marker)}, path)
    done = subprocess.run([sys.executable, "-m", "gmvq_ext.cli.evaluate", "--checkpoint", str(path), "--device", "cpu"],
                          cwd=PACKAGE_PARENT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmvq-evaluate: error:") and str(path) in lines[0]
    assert not marker.exists()


def test_resume_refuses_a_payload_in_the_run_folder(tmp_path):
    marker = tmp_path / "payload-ran"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "payload": WritesMarker(marker)}, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"gmvq-train: error: cannot load checkpoint .*checkpoint.pt"):
        train.main([*SMALL, "--epochs", "2", "--resume", "--out", str(out)])
    assert not marker.exists()


@pytest.mark.parametrize("damage,reason", [
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: b"", "empty"),
    (lambda data: b"definitely not a checkpoint", "not a readable torch.save file"),
])
def test_damaged_files_are_named(tmp_path, damage, reason):
    path = tmp_path / "damaged.pt"
    ckpt.save_atomic(small_state(), path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ckpt.CheckpointError, match=reason) as raised:
        ckpt.load(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_foreign_and_malformed_checkpoints_are_named(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save(build_model(parse_args([*SMALL, "--out", "x"]), {"seed": 3}).state_dict(), foreign)
    with pytest.raises(ckpt.CheckpointError, match="not a gmvq_ext training checkpoint") as raised:
        ckpt.load(foreign)
    assert str(foreign) in str(raised.value)

    cases = {
        "newer.pt": (dict(version=99), "format version 99"),
        "no-rng.pt": (dict(rng=[]), "0 RNG states for a world size of 1"),
        "bad-rng.pt": (dict(rng=[{"python": 1}]), r"rng\[0\]"),
        "bad-args.pt": (dict(args={"dataset": "cifar10"}), r"args\['quantizer'\]"),
        "bad-epoch.pt": (dict(epoch="1"), "'epoch' is missing or has the wrong type"),
    }
    for name, (changes, message) in cases.items():
        state = {"format": ckpt.CHECKPOINT_FORMAT, "version": ckpt.CHECKPOINT_VERSION, **small_state()}
        state.update(changes)
        torch.save(state, tmp_path / name)
        with pytest.raises(ckpt.CheckpointError, match=message) as raised:
            ckpt.load(tmp_path / name)
        assert str(tmp_path / name) in str(raised.value), name


def test_weights_that_do_not_fit_the_described_model_are_named(tmp_path):
    state = small_state()
    state["args"] = {**state["args"], "codebook_size": 32}
    path = tmp_path / "mismatch.pt"
    ckpt.save_atomic(state, path)
    with pytest.raises(ckpt.CheckpointError, match="weights do not fit") as raised:
        ckpt.restore_model(ckpt.load(path), path, torch.device("cpu"))
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(SystemExit, match="gmvq-evaluate: error: .*mismatch.pt.*weights do not fit"):
        evaluate.main(["--checkpoint", str(path), "--device", "cpu"])


def test_a_missing_checkpoint_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.load(tmp_path / "nothing.pt")
    assert os.listdir(tmp_path) == []
