"""Deciding whether a run starts or continues, and checking that a resumed
run is the run its checkpoint describes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import checkpoint as ckpt
from .config import RUN_DEFINING, RUN_DEFINING_BEFORE


def starting_state(args, checkpoint_path: Path):
    """The checkpoint to continue (None: start fresh), or the error to raise on every rank.

    --resume needs a checkpoint; --auto-resume takes one when it is there (a
    restarted torchrun worker continues its run); without either, an
    existing run is never overwritten."""
    exists = checkpoint_path.exists()
    if args.resume and not exists:
        return FileNotFoundError(f"--resume: no checkpoint at {str(checkpoint_path)!r}")
    if not (args.resume or args.auto_resume):
        if exists:
            return FileExistsError(f"{str(checkpoint_path.parent)!r} already holds a run; pass --resume or "
                                   "--auto-resume, or choose another --out")
        return None
    if not exists:
        return None
    try:
        state = ckpt.load(checkpoint_path)
    except (OSError, RuntimeError, ValueError) as error:  # ckpt.load names the file
        return error
    # --auto-resume of a finished run redoes only the final evaluation (a
    # restart may have come after the last checkpoint but before results.json).
    finished = state["epoch"] >= args.epochs and not ckpt.mid_epoch(state)
    if state["epoch"] > args.epochs or (finished and not args.auto_resume):
        return ValueError(f"the checkpoint in {str(checkpoint_path)!r} is at epoch {state['epoch']}, "
                          f"already >= --epochs {args.epochs}; ask for more epochs")
    return state


def check_same_run(args, saved: dict, saved_world_size: int, world_size: int) -> None:
    """A resumed run must describe the run it continues (only --epochs and the
    flags outside the data, model and optimisation groups may change)."""
    def saved_value(name):
        return saved.get(name, RUN_DEFINING_BEFORE.get(name))

    different = [f"--{name.replace('_', '-')} {getattr(args, name)!r} (checkpoint: {saved_value(name)!r})"
                 for name in RUN_DEFINING if getattr(args, name) != saved_value(name)]
    if different:
        raise ValueError("resuming with settings that differ from the checkpoint's: " + ", ".join(different))
    if args.epochs != saved["epochs"]:
        print(f"warning: --epochs {args.epochs} differs from the checkpoint's {saved['epochs']}: the learning-rate "
              "and temperature schedules stretch to the new length, so this is not the original run continued",
              file=sys.stderr)
    if saved_world_size != world_size:
        raise ValueError(f"resuming on {world_size} process(es), but the checkpoint was written by "
                         f"{saved_world_size}: the data shards and RNG streams would differ")


def open_metrics(path: Path, keep_epochs: int):
    """metrics.jsonl for appending, keeping only the epochs a resumed checkpoint covers."""
    kept = []
    if keep_epochs > 0 and path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] <= keep_epochs]
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")
