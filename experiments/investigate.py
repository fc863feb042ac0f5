"""Does GM-VQ reconstruct better than VQ-VAE? Every system of the paper's Table 1,
tuned on validation only, then trained with several seeds (issue 9).

    python experiments/investigate.py                 # run (or continue) everything, then report
    python experiments/investigate.py --report-only   # the report from the runs finished so far

Three phases, every run one ``python -m gmvq_ext.train`` on one CPU thread,
``--jobs`` at a time, resumable (``--auto-resume``: an interrupted
investigation continues where it stopped, exactly):

1. Tuning (CIFAR-10 sample, 90% of its training images, validation = the
   other 10%, ``--val-fraction 0.1``; seed 0; ``--tune-epochs``). Each
   system's levers are searched one at a time (coordinate descent): every
   candidate value of a lever is tried with the best values found so far for
   the others, and the lever keeps the value with the lowest validation MSE
   of the last epoch. Ties keep the earlier candidate (the default comes
   first). Nothing reads a test metric in this phase.
2. Final rows (CIFAR-10 sample, all training images, ``--final-epochs``,
   seeds 0, 1, 2): each system with its chosen settings; every epoch is
   evaluated on the test split, which gives the learning curves (reported,
   never used for a choice).
3. CelebA (the sample's 2000 face crops at 128 x 128, split 80/10/10 by file
   name): GM-VQ and the strongest VQ-VAE variants, seeds 0, 1, 2, with their
   CIFAR-10 settings.

The default budget (3 tuning epochs, 4 final epochs, 2 on CelebA) is what two
CPU cores do in about an hour and a half; raise it with the flags on a bigger
machine (runs are named without their epoch count, so use a new --runs-dir).

Output: experiments/results/investigation.{json,md} and
experiments/results/investigation_{cifar10,celeba}_curves.png. Every run's
exact command is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
SEEDS = (0, 1, 2)
PRINT_LOCK = threading.Lock()

# The paper's Table 1 rows: label -> (quantizer name, levers searched in order).
# A lever is (what it sets, candidate values, default first); "lr" and
# "weight_decay" are training arguments, everything else a quantizer option.
# Every system's learning rate is tuned; GM-VQ's own levers are those the
# paper leaves open that matter most for reconstruction, and the two strongest
# baselines (VQ-VAE + l2, SQ-VAE) get a lever of their own each. The budget is
# two CPU cores for about an hour: wider searches are a flag away.
LR = ("lr", (1e-3, 3e-3, 1e-2))
# Loss weights are in the units of each system's bound (docs/math.md, "Units of
# the objective"); the candidates are those of the 2026-11-28 study, which ran
# before the units existed, converted exactly (times P / M = 48 at sigma_x2 =
# 0.5, CIFAR-10 at 4x downsampling). The VQ-VAE family's squared norms now sum
# over D: its regulariser weighs 64 / 48 of what it did then.
SYSTEMS: dict[str, tuple[str, list]] = {
    "VQ-VAE": ("vqvae", [LR]),
    "VQ-VAE + l2": ("vqvae-l2", [LR, ("commitment", (0.25, 1.0))]),
    "VQ-VAE + replace": ("vqvae-replace", [LR]),
    "VQ-VAE + l2 + replace": ("vqvae-l2-replace", [LR]),
    "VQ-VAE + Affine": ("vqvae-affine", [LR]),
    "VQ-VAE + OPT": ("vqvae-opt", [LR]),
    "VQ-VAE + Affine + OPT": ("vqvae-affine-opt", [LR]),
    "SQ-VAE": ("sqvae", [LR, ("latent_weight", (0.096, 0.48))]),
    "Gumbel-VQ": ("gumbel", [LR]),
    "GM-VQ": ("gmvq", [
        LR,
        ("beta", (48.0,)),  # the KL weight of the study: 1 beside a plain MSE
        # sigma_z2 scales the training noise s = ||z - e|| / sqrt(2 sigma_z2 D) and the
        # latent term down together; noise_scale 0 removes the noise, keeping the term.
        ("sigma_z2", (0.5, 8.0)),
        ("noise_scale", (1.0, 0.0)),
        ("temperature", ((2.0, 0.1), (0.5, 0.05))),
        # The latent term's weight, soft samples (z_q = y E) instead of hard ones, and
        # the precision weight per dimension, per vector or none (plain distances).
        ("gamma", (4.8, 48.0, 0.48)),
        ("hard", (True, False)),
        ("weight", ("full", "scalar", None)),
    ]),
    # GM-VQ + Entropy: GM-VQ's chosen settings, then the larger entropy weight.
    "GM-VQ + Entropy": ("gmvq-entropy", [("beta", (240.0, 480.0))]),
}
# Systems whose tuned settings start from another's (GM-VQ + Entropy from GM-VQ).
INHERITS = {"GM-VQ + Entropy": "GM-VQ"}
TRAINING_LEVERS = {"lr", "weight_decay"}
# Trained with every seed on all training images and tested: GM-VQ and the strongest
# baselines (the others' validation MSE from tuning is in the report).
FINAL_SYSTEMS = ("GM-VQ", "GM-VQ + Entropy", "VQ-VAE", "VQ-VAE + l2", "SQ-VAE")
# CelebA: GM-VQ against the strongest VQ-VAE variants on CIFAR-10, each with its CIFAR-10 settings.
CELEBA_SYSTEMS = ("GM-VQ", "VQ-VAE", "VQ-VAE + l2")


@dataclass
class Run:
    name: str
    phase: str           # "tune", "final", "celeba"
    system: str
    dataset: str
    settings: dict       # lever -> value
    seed: int
    epochs: int
    val: bool            # per-epoch evaluation on the validation split (tuning) or on test
    command: list = field(default_factory=list)

    def folder(self, runs_dir: Path) -> Path:
        return runs_dir / self.name

    def finished(self, runs_dir: Path) -> bool:
        results = self.folder(runs_dir) / "results.json"
        if not results.exists():
            return False
        if self.phase == "tune":  # named by its settings (those at their default left out)
            return True
        # Final and CelebA runs are named by system and seed only: a run made with
        # other settings (before a later lever changed the choice) must not pass for this one.
        recorded = json.loads(results.read_text())["args"]
        expected = train_settings(self.settings)
        same_lr = expected["lr"] is None or recorded["lr"] == expected["lr"]
        if not same_lr or sorted(recorded["quantizer_option"]) != sorted(expected["options"]):
            raise RuntimeError(f"{results.parent} was trained with other settings than {self.settings}; "
                               "move it away to train it again")
        return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="shared/data (cifar10-sample/, celeba-sample/)")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "investigate"))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    p.add_argument("--tune-epochs", type=int, default=3)
    p.add_argument("--final-epochs", type=int, default=4)
    p.add_argument("--celeba-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--celeba-batch-size", type=int, default=32)
    p.add_argument("--final-systems", default=",".join(FINAL_SYSTEMS),
                   help="systems trained with every seed and tested (comma-separated, in order)")
    p.add_argument("--phases", default="tune,final,celeba", help="comma-separated subset, in order")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- commands
def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def settings_slug(settings: dict) -> str:
    parts = []
    for key, value in sorted(settings.items()):
        parts.append(f"{key}={'-'.join(map(str, value)) if isinstance(value, tuple) else value}")
    return slug("_".join(parts)) or "defaults"


def train_command(args, run: Run, out: Path) -> list[str]:
    quantizer = SYSTEMS[run.system][0]
    data = Path(args.data) / ("cifar10-sample" if run.dataset == "cifar10" else "celeba-sample/test_crops")
    batch = args.batch_size if run.dataset == "cifar10" else args.celeba_batch_size
    command = [sys.executable, "-m", "gmvq_ext.train", "--dataset", run.dataset, "--data-dir", str(data),
               "--quantizer", quantizer, "--epochs", str(run.epochs), "--batch-size", str(batch),
               "--warmup-epochs", "1", "--seed", str(run.seed), "--codebook-size", "1024", "--dim", "64",
               "--device", "cpu", "--out", str(out), "--auto-resume"]
    if run.val:
        command += ["--val-fraction", "0.1"]
    settings = train_settings(run.settings)
    if settings["lr"] is not None:
        command += ["--lr", repr(settings["lr"])]
    if settings["weight_decay"] is not None:
        command += ["--weight-decay", repr(settings["weight_decay"])]
    for option in settings["options"]:
        command += ["--quantizer-option", option]
    return command


def train_settings(settings: dict) -> dict:
    """A run's levers as the training CLI takes them: lr, weight_decay and the
    --quantizer-option NAME=VALUE strings, in the levers' order."""
    out = {"lr": None, "weight_decay": None, "options": []}
    for lever, value in settings.items():
        if lever in TRAINING_LEVERS:
            out[lever] = value
        elif lever == "temperature":
            out["options"] += [f"temperature_start={value[0]!r}", f"temperature_end={value[1]!r}"]
        else:
            out["options"].append(f"{lever}={value!r}")
    return out


def execute(args, run: Run) -> None:
    runs_dir = Path(args.runs_dir)
    out = run.folder(runs_dir)
    run.command = train_command(args, run, out)
    if run.finished(runs_dir):
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.time()
    log(f"start {run.name}")
    with open(runs_dir / f"{run.name}.log", "a") as stream:
        done = subprocess.run(run.command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT)
    status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode}; {run.name}.log)"
    log(f"{run.name}: {status} after {time.time() - started:.0f} s")


def run_all(args, runs: list[Run]) -> None:
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda run: execute(args, run), runs))


def log(message: str) -> None:
    with PRINT_LOCK:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- reading runs
def records(run: Run, runs_dir: Path) -> list[dict]:
    path = run.folder(runs_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_validation_mse(run: Run, runs_dir: Path) -> float:
    """The tuning score: validation MSE of the last epoch (inf while unfinished)."""
    if not run.finished(runs_dir):
        return math.inf
    last = records(run, runs_dir)[-1]["val/mse"]
    return last if math.isfinite(last) else math.inf  # a diverged run loses


# ----------------------------------------------------------------------------- phase 1: tuning
def tuning(args, dataset: str = "cifar10") -> dict[str, dict]:
    """Coordinate descent for every system; returns system -> chosen settings and
    the evidence (every candidate's validation MSE). Systems advance lever by
    lever in rounds, all systems' candidates of a round run together."""
    runs_dir = Path(args.runs_dir)
    state = {system: {"settings": {}, "lever": 0, "evidence": []} for system in SYSTEMS}
    while True:
        round_runs, pending = [], []
        for system, (_, levers) in SYSTEMS.items():
            current = state[system]
            parent = INHERITS.get(system)
            if parent and state[parent]["lever"] < len(SYSTEMS[parent][1]):
                continue  # starts from the parent's final choice
            if parent and not current["settings"]:
                current["settings"] = dict(state[parent]["settings"])
            if current["lever"] >= len(levers):
                continue
            lever, values = levers[current["lever"]]
            candidates = [tune_run(args, system, {**current["settings"], lever: value}) for value in values]
            round_runs += candidates
            pending.append((system, lever, values, candidates))
        if not pending:
            return state
        if not args.report_only:
            run_all(args, unique(round_runs))
        for system, lever, values, candidates in pending:
            scores = [final_validation_mse(run, runs_dir) for run in candidates]
            if any(math.isinf(score) for score in scores):
                if args.report_only:
                    state[system]["lever"] = len(SYSTEMS[system][1])  # stop here: report what exists
                    state[system]["incomplete"] = True
                    continue
                raise RuntimeError(f"{system}: a tuning run did not finish; see its log in {args.runs_dir}")
            best = min(range(len(values)), key=lambda i: (scores[i], i))
            state[system]["settings"][lever] = values[best]
            state[system]["evidence"].append({"lever": lever, "values": [repr(v) for v in values],
                                              "val_mse": scores, "chosen": repr(values[best]),
                                              "runs": [run.name for run in candidates]})
            state[system]["lever"] += 1


def system_levers(system: str) -> list:
    """Every lever of a system, its parent's (INHERITS) first, its own after."""
    levers = []
    while system:
        levers = SYSTEMS[system][1] + levers
        system = INHERITS.get(system)
    return levers


def lever_defaults(system: str) -> dict:
    """The first candidate of every lever (its default); a system's own lever overrides its parent's."""
    return {lever: values[0] for lever, values in system_levers(system)}


def tune_run(args, system: str, settings: dict) -> Run:
    # Every lever is passed to the trainer, those not searched yet at their first candidate,
    # so a run never depends on the package's defaults (which the study itself changes).
    defaults = lever_defaults(system)
    full = {**defaults, **settings}
    # A lever at its default (other than the learning rate, which every name carries)
    # leaves the name alone: the previous round's best run is this run, not run twice.
    named = {k: v for k, v in settings.items() if k == "lr" or v != defaults.get(k)}
    return Run(name=f"tune-{slug(system)}-{settings_slug(named)}", phase="tune", system=system,
               dataset="cifar10", settings=full, seed=0, epochs=args.tune_epochs, val=True)


def unique(runs: list[Run]) -> list[Run]:
    seen, out = set(), []
    for run in runs:
        if run.name not in seen:
            seen.add(run.name)
            out.append(run)
    return out


# ----------------------------------------------------------------------------- phases 2 and 3
def final_runs(args, chosen: dict) -> list[Run]:
    # The comparison that matters first: GM-VQ, GM-VQ + Entropy and the strongest baselines.
    runs = []
    for seed in SEEDS:
        for system in args.final_systems.split(","):
            settings = chosen[system]["settings"]
            runs.append(Run(name=f"final-{slug(system)}-seed{seed}", phase="final", system=system, dataset="cifar10",
                            settings=dict(settings), seed=seed, epochs=args.final_epochs, val=False))
    return runs


def celeba_runs(args, chosen: dict) -> list[Run]:
    """Seeded CelebA runs with each system's CIFAR-10 settings (learning rate included): the
    CPU budget has no room for a second search, and nothing here looks at a test split."""
    return [Run(name=f"celeba-{slug(system)}-seed{seed}", phase="celeba", system=system, dataset="celeba",
                settings=dict(chosen[system]["settings"]), seed=seed, epochs=args.celeba_epochs, val=False)
            for seed in SEEDS for system in CELEBA_SYSTEMS]


# ----------------------------------------------------------------------------- report
def summarize(runs: list[Run], runs_dir: Path) -> dict:
    """system -> mean and standard deviation over seeds of the final test metrics, and curves."""
    table = {}
    for system in dict.fromkeys(run.system for run in runs):
        mine = [run for run in runs if run.system == system and run.finished(runs_dir)]
        if not mine:
            continue
        results = [json.loads((run.folder(runs_dir) / "results.json").read_text()) for run in mine]
        curves = [records(run, runs_dir) for run in mine]

        def stats(values):
            return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values}

        table[system] = {
            "seeds": [run.seed for run in mine],
            "test_mse_1e3": stats([r["test_mse"] * 1e3 for r in results]),
            "test_perplexity": stats([r["test_perplexity"] for r in results]),
            "codes_used": stats([float(r["codes_used"]) for r in results]),
            "train_seconds": stats([r["train_seconds"] for r in results]),
            "curves": {"epoch": [rec["epoch"] for rec in curves[0]],
                       "test_mse_1e3": [[rec["test/mse"] * 1e3 for rec in c] for c in curves],
                       "test_perplexity": [[rec["test/perplexity"] for rec in c] for c in curves]},
            "runs": [run.name for run in mine],
            "commands": [shlex.join(run.command) for run in mine],
        }
    return table


def plot_curves(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_mse, ax_ppl) = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    for system, row in table.items():
        epochs = row["curves"]["epoch"]
        for ax, key in ((ax_mse, "test_mse_1e3"), (ax_ppl, "test_perplexity")):
            runs = [c for c in row["curves"][key] if len(c) == len(epochs)]
            if not runs:
                continue
            values = np.array(runs)
            mean, std = values.mean(0), values.std(0)
            style = "-" if system.startswith("GM-VQ") else "--"
            (line,) = ax.plot(epochs, mean, style, label=f"{system} ({len(runs)} seeds)", linewidth=2 if
                              system.startswith("GM-VQ") else 1.2)
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax_mse.set(xlabel="epoch", ylabel="test MSE x 1e-3 (pixels in [-1, 1])", yscale="log", title=f"{title}: MSE")
    ax_ppl.set(xlabel="epoch", ylabel="test perplexity (soft, mean over batches)", yscale="log",
               title=f"{title}: codebook usage")
    ax_ppl.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(args, chosen: dict, final: list[Run], celeba: list[Run]) -> None:
    runs_dir = Path(args.runs_dir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cifar = summarize(final, runs_dir)
    faces = summarize(celeba, runs_dir)
    if cifar:
        plot_curves(cifar, RESULTS / "investigation_cifar10_curves.png", "CIFAR-10 sample")
    if faces:
        plot_curves(faces, RESULTS / "investigation_celeba_curves.png", "CelebA sample (128 x 128)")
    document = {
        "question": "Does GM-VQ reconstruct better than VQ-VAE at equal budget?",
        "protocol": {"tune_epochs": args.tune_epochs, "final_epochs": args.final_epochs,
                     "celeba_epochs": args.celeba_epochs, "batch_size": args.batch_size,
                     "celeba_batch_size": args.celeba_batch_size, "seeds": list(SEEDS),
                     "selection": "validation MSE of the last tuning epoch (10% of the training images)"},
        "tuning": {system: {"settings": {k: repr(v) for k, v in s["settings"].items()},
                            "evidence": s["evidence"], "incomplete": s.get("incomplete", False)}
                   for system, s in chosen.items()},
        "cifar10": cifar, "celeba": faces,
        "runs_dir": str(runs_dir),
    }
    (RESULTS / "investigation.json").write_text(json.dumps(document, indent=2) + "\n")
    (RESULTS / "investigation.md").write_text(markdown(args, document) + "\n")


def fmt(stat: dict, digits: int = 2) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def test_row(doc: dict, system: str, row: dict) -> str:
    """A seeded test table's row: mean ± std over seeds, and the system's chosen settings."""
    settings = ", ".join(f"{k}={v}" for k, v in doc["tuning"][system]["settings"].items())
    return (f"| {system} | {fmt(row['test_mse_1e3'])} | {fmt(row['test_perplexity'], 1)} | "
            f"{fmt(row['codes_used'], 0)} | {len(row['seeds'])} | {settings} |")


def markdown(args, doc: dict) -> str:
    lines = ["# Does GM-VQ reconstruct better than VQ-VAE? (CPU, the data samples)", "",
             f"Command: `python experiments/investigate.py {shlex.join(sys.argv[1:])}`; every run's exact command is "
             "in `investigation.json`.", "",
             f"Protocol: tuning on CIFAR-10 validation only ({args.tune_epochs} epochs, seed 0, coordinate descent "
             f"over each system's levers, the default first), then {len(SEEDS)} seeds x {args.final_epochs} epochs "
             "on all training images with test evaluation every epoch; batch 128, AdamW (weight decay 0.01 unless "
             "tuned), 1 warm-up epoch then cosine, K = 1024, D = 64, one CPU thread per run. MSE in units of 1e-3, "
             "pixels in [-1, 1]; perplexity: mean over test batches of exp H(q_bar) (soft posteriors); codes: used "
             "at least once on the test set. Mean ± standard deviation over seeds.", "",
             "## CIFAR-10 sample (5169 training, 1017 test images)", "",
             "| Method | test MSE (1e-3) | perplexity | codes used | seeds | chosen settings |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    lines += [test_row(doc, system, row) for system, row in doc["cifar10"].items()]
    lines += ["", "![CIFAR-10 curves](investigation_cifar10_curves.png)", ""]
    if doc["celeba"]:
        lines += ["## CelebA sample (2000 face crops at 128 x 128: 1600 train, 200 validation, 200 test)", "",
                  f"{args.celeba_epochs} epochs, batch {args.celeba_batch_size}; each system with its CIFAR-10 "
                  "settings (learning rate included).", "",
                  "| Method | test MSE (1e-3) | perplexity | codes used | seeds | settings |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        lines += [test_row(doc, system, row) for system, row in doc["celeba"].items()]
        lines += ["", "![CelebA curves](investigation_celeba_curves.png)", ""]
    lines += ["## Every system on validation (seed 0, the tuning runs)", "",
              f"Validation MSE (1e-3) after {args.tune_epochs} epochs with each system's chosen settings: the only "
              "figure for the systems not in the seeded test table above.", "",
              "| Method | validation MSE (1e-3) | chosen settings |", "| --- | ---: | --- |"]
    for system, tuned in doc["tuning"].items():
        if not tuned["evidence"]:
            continue
        best = min(tuned["evidence"][-1]["val_mse"])
        settings = ", ".join(f"{k}={v}" for k, v in tuned["settings"].items())
        lines.append(f"| {system} | {best * 1e3:.2f} | {settings} |")
    lines += ["", "## Tuning evidence (validation MSE x 1e-3 of the last tuning epoch)", ""]
    for system, tuned in doc["tuning"].items():
        lines.append(f"- **{system}**" + (" (incomplete)" if tuned["incomplete"] else "") + ":")
        for step in tuned["evidence"]:
            scores = ", ".join(f"{value}: {mse * 1e3:.2f}" for value, mse in zip(step["values"], step["val_mse"]))
            lines.append(f"  - {step['lever']}: {scores} -> {step['chosen']}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    phases = args.phases.split(",")
    chosen = tuning(args)
    final = final_runs(args, chosen)
    if "final" in phases and not args.report_only:
        run_all(args, final)
    celeba = celeba_runs(args, chosen)
    if "celeba" in phases and not args.report_only:
        run_all(args, celeba)
    for run in final + celeba:  # commands for the report, also of runs not (yet) started
        run.command = train_command(args, run, run.folder(Path(args.runs_dir)))
    write_report(args, chosen, final, celeba)
    log(f"report: {RESULTS / 'investigation.md'}")


if __name__ == "__main__":
    main()
