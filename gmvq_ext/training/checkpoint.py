"""Training checkpoints: plain data, written atomically, read without running code.

A checkpoint is a ``torch.save`` of one dict holding only tensors, Python
numbers, strings, booleans, None and lists/tuples/dicts of them:

    format, version      "gmvq_ext.checkpoint", CHECKPOINT_VERSION
    model                the autoencoder's state_dict
    optimizer, scheduler their state_dicts (numbers, tensors, lists)
    epoch, step, train_seconds, world_size
                         (epoch: complete epochs; step: optimiser steps)
    epoch_progress       None, or for a checkpoint taken mid-epoch (a stop on
                         SIGTERM): {"batches": the epoch's batches done,
                         "metrics": its running sums, "code_counts": (K,)
                         int64, "seconds": its training time so far}
    rng                  one entry per rank, see ``rng_state``
    args                 vars() of the training command line
    quantizer_options    the keyword options the quantizer was built with

It is read with ``torch.load(weights_only=True)``, whose unpickler builds
only those types: a file that asks for any other Python object (a malicious
``__reduce__`` payload, a NumPy array, a class of another program) is refused
before anything is called, and nothing needs to be allowlisted. Every failure
to read or validate a file is a ``CheckpointError`` (a ValueError) whose one-line
message names the file.
"""

from __future__ import annotations

import io
import os
import random
import re
import warnings
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from ..files import write_atomic

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "gmvq_ext.checkpoint"
# 1: first plain-data format (RNG states as tensors); 2: epoch_progress
# (mid-epoch checkpoints). Bump when the layout changes; READABLE_VERSIONS are read.
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PLAIN_LEAVES = (torch.Tensor, torch.nn.Parameter, str, bytes, int, float, bool, type(None))
# The run arguments that evaluate, tokenize and --resume read back (name: accepted types).
REQUIRED_ARGS = {"dataset": str, "quantizer": str, "codebook_size": int, "dim": int, "seed": int, "epochs": int,
                 "data_dir": str, "val_fraction": (int, float), "eval_batch_size": int,
                 "max_test_images": (int, type(None)), "beta": (int, float, type(None)),
                 "gamma": (int, float, type(None)), "sigma_z2": (int, float, type(None)), "quantizer_option": list}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, not ours, or malformed."""


# ----------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    """Every generator this process draws from, as tensors and Python numbers.

    python: ``random.getstate()`` is (version, 625 ints, gauss_next); the ints
    (< 2**32) become an int64 tensor. numpy: the legacy global MT19937 state,
    its 624 uint32 words as an int64 tensor. torch/cuda: byte tensors already."""
    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state({"bit_generator": numpy["bit_generator"],
                         "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- writing

def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """Write the training checkpoint ``state`` (stamped with the format and
    version) to ``path`` atomically (``files.write_atomic``): a crash or a
    failed write leaves the old checkpoint, never a torn file; a failed write
    raises WriteError naming the path. Raises TypeError, before writing, when
    ``state`` holds anything but plain data (it could not be loaded back)."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    problem = first_non_plain(state)
    if problem is not None:
        raise TypeError(f"checkpoint entry {problem} is not a tensor, number, string or container of those; "
                        "a checkpoint must be loadable with torch.load(weights_only=True)")
    # Serialised in memory first: torch.save reports a failing file as a bare
    # RuntimeError, a plain write as the OSError it is (ENOSPC, EIO, ...).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def first_non_plain(obj, where: str = "") -> str | None:
    """The path (e.g. ``['args']['x']``) and type of the first value in ``obj``
    that is not plain data, or None when everything is."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                return f"{where} key {key!r} ({type(key).__name__})"
            found = first_non_plain(value, f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = first_non_plain(value, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    if type(obj) in PLAIN_LEAVES:  # exact types: a subclass may pickle as something else
        return None
    return f"{where or 'the checkpoint'} ({type(obj).__module__}.{type(obj).__qualname__})"


# ----------------------------------------------------------------------------- reading

def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint at ``path``, read with ``weights_only=True`` and checked
    to be a gmvq_ext training checkpoint; ``CheckpointError`` otherwise (and
    ``FileNotFoundError`` when there is no file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        with warnings.catch_warnings():
            # Foreign pickles make the weights-only unpickler warn about their protocol; the error says enough.
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # the unpickler and the zip reader raise many types on bad files
        raise CheckpointError(f"cannot load checkpoint {str(path)!r}: {why_unreadable(error)}") from None
    problem = structure_problem(state)
    if problem is not None:
        raise CheckpointError(f"cannot load checkpoint {str(path)!r}: {problem}")
    return state


def why_unreadable(error: Exception) -> str:
    """A one-line reason for a failed ``torch.load(weights_only=True)``."""
    text = str(error)
    unsafe = re.search(r"GLOBAL ([\w.]+)", text)
    if unsafe:
        return (f"it asks to build the Python object {unsafe.group(1)}, which a gmvq_ext checkpoint never "
                "contains; refused without running anything (a tampered file, or not written by gmvq_ext)")
    if "Weights only load failed" in text:
        return ("not a readable torch.save file of plain data (damaged, or not written by gmvq_ext); "
                "refused without running anything")
    if isinstance(error, EOFError) or "central directory" in text or "failed reading zip archive" in text:
        return "the file is empty, truncated or corrupted (not a complete torch.save archive)"
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    return f"not a readable torch.save file ({type(error).__name__}: {first_line[:200]})"


def structure_problem(state) -> str | None:
    """What makes ``state`` not a training checkpoint this version can use, or None."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        return (f"it is not a gmvq_ext training checkpoint (no format {CHECKPOINT_FORMAT!r} entry; written by "
                "another program or by a gmvq_ext older than the plain-data checkpoint format)")
    if state.get("version") not in READABLE_VERSIONS:
        return (f"checkpoint format version {state.get('version')!r}; this gmvq_ext reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}")
    expected = {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "step": int,
                "train_seconds": (int, float), "world_size": int, "rng": list, "args": dict,
                "quantizer_options": dict}
    for key, kind in expected.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"entry {key!r} is missing or has the wrong type ({type(state.get(key)).__name__})"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        return "entry 'model' is not a state_dict of tensors"
    for name, kinds in REQUIRED_ARGS.items():
        if name not in state["args"] or not isinstance(state["args"][name], kinds):
            return f"args[{name!r}] is missing or has the wrong type ({type(state['args'].get(name)).__name__})"
    progress = state.get("epoch_progress")
    if progress is not None and not (isinstance(progress, dict) and isinstance(progress.get("batches"), int)
                                     and isinstance(progress.get("metrics"), dict)
                                     and isinstance(progress.get("code_counts"), torch.Tensor)):
        return "entry 'epoch_progress' is malformed"
    if state["epoch"] < 0 or state["step"] < 0 or state["world_size"] < 1:
        return "negative epoch or step, or a world size below 1"
    if len(state["rng"]) != state["world_size"]:
        return f"{len(state['rng'])} RNG states for a world size of {state['world_size']}"
    for rank, rng in enumerate(state["rng"]):
        problem = rng_state_problem(rng)
        if problem is not None:
            return f"rng[{rank}]: {problem}"
    return None


def mid_epoch(state: dict) -> bool:
    """Whether the checkpoint was taken inside an epoch (a stop on a signal)."""
    return state.get("epoch_progress") is not None


def rng_state_problem(rng) -> str | None:
    try:
        python, numpy = rng["python"], rng["numpy"]
        ok = (isinstance(python["version"], int) and python["state"].dtype == torch.int64
              and python["state"].shape == (625,) and isinstance(python["gauss_next"], (float, type(None)))
              and isinstance(numpy["bit_generator"], str) and numpy["key"].dtype == torch.int64
              and numpy["key"].shape == (624,) and isinstance(numpy["pos"], int)
              and isinstance(numpy["has_gauss"], int) and isinstance(numpy["gauss"], float)
              and rng["torch"].dtype == torch.uint8)
    except (KeyError, TypeError, AttributeError):
        ok = False
    return None if ok else "not an RNG state written by gmvq_ext.training.checkpoint.rng_state"


# ----------------------------------------------------------------------------- models from checkpoints

def restore_model(state: dict, path: str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, Namespace]:
    """(the trained autoencoder on ``device``, in eval mode; the run's arguments)
    from a ``load``ed ``state``. ``path`` only names the file in errors."""
    from .config import as_saved, build_model, quantizer_options

    args = Namespace(**state["args"])
    try:
        model = build_model(args, as_saved(quantizer_options(args), state.get("quantizer_options")))
    except (ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} describes a model this gmvq_ext cannot build: "
                              f"{error}") from None
    load_weights(model, state, path)
    return model.to(device).eval(), args


def load_weights(model: torch.nn.Module, state: dict, path: str | os.PathLike) -> None:
    """model.load_state_dict(state["model"]); weights that do not fit raise a
    one-line CheckpointError naming ``path``."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:  # missing, unexpected or mis-shaped weights
        first_line = next((line for line in str(error).splitlines() if line.strip()), "")
        raise CheckpointError(f"checkpoint {str(path)!r}: its weights do not fit the model its arguments "
                              f"describe ({first_line.strip()[:300]})") from None
