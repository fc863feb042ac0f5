"""GM-VQ's KL weight beta around the ALBO (beta = 1 in the units of docs/math.md,
"Units of the objective"): validation MSE, PSNR and perplexity per beta and seed
on the CIFAR-10 sample, the first axis of the usage/MSE frontier (issue 26),
beside baselines trained alike with their defaults.

    python experiments/sweep_beta.py --betas 0.1,1,10,48 --seeds 0,1 --epochs 15 --baselines vqvae-l2
    python experiments/sweep_beta.py --betas 1 --seeds 0,1,2 --epochs 30 --baselines vqvae-l2 \
        --evaluate test --out experiments/results/final_30_epochs    # the chosen beta, tested

Every run is one ``python -m gmvq_ext.train`` on one thread, ``--jobs`` at a
time, resumable (``--auto-resume``), with every other setting at the package's
defaults (lr 1e-2, gamma 0.3, sigma_z2 0.5, no noise, sigma_x2 0.5), 10% of the
training images held out. Only the validation split's metrics are read:
nothing here is chosen on a test split. ``--evaluate test`` trains on all
the training images and reports the test split instead: for the chosen
settings only, once they are chosen. Writes
experiments/results/beta_sweep.{json,md} with every run's command, and
beta_sweep.png: validation MSE against perplexity (the frontier), one point
per beta and per baseline, seeds as error bars.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import gmvq_ext
except ImportError:  # a development tree built in place (dev/dev_build.sh): the package beside this folder
    sys.path.insert(0, str(ROOT))
    import gmvq_ext
# The runs import the same gmvq_ext as this script (installed, or the development tree).
PACKAGE_PARENT = Path(gmvq_ext.__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-sample"
METRIC_NAMES = ("mse", "psnr", "perplexity", "codes_used")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--betas", default="0.1,1,10,48", help="comma-separated KL weights (1: the ALBO)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--baselines", default="", help="comma-separated quantizers trained alike, at their defaults")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "sweep-beta"))
    p.add_argument("--evaluate", choices=("val", "test"), default="val",
                   help="val: tune (10%% of the training images held out); test: the chosen settings, all images")
    p.add_argument("--out", default=str(RESULTS / "beta_sweep"), help="writes OUT.json, OUT.md and OUT.png")
    args = p.parse_args(argv)
    args.metrics = tuple(f"{args.evaluate}/{name}" for name in METRIC_NAMES)
    return args


def command(args, system: str, beta, seed: int, out: Path) -> list[str]:
    """system "gmvq" with this beta, or a baseline (beta None) at its defaults."""
    return [sys.executable, "-m", "gmvq_ext.train", "--dataset", "cifar10", "--data-dir", str(Path(args.data_dir).resolve()),
            "--quantizer", system, *(["--beta", repr(beta)] if beta is not None else []), "--epochs",
            str(args.epochs), "--batch-size", "128", "--warmup-epochs", "1", "--seed", str(seed),
            *(["--val-fraction", "0.1"] if args.evaluate == "val" else []), "--codebook-size", "1024", "--dim", "64", "--device", "cpu", "--out", str(out.resolve()), "--auto-resume"]


def train(args, system: str, beta, seed: int) -> dict:
    name = f"beta={beta!r}" if beta is not None else system
    out = Path(args.runs_dir) / f"{args.evaluate}-epochs={args.epochs}" / f"{name}-seed={seed}"
    cmd = command(args, system, beta, seed, out)
    if not (out / "results.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACKAGE_PARENT)}
        with open(out.parent / f"{out.name}.log", "a") as log:  # cwd: not a source tree that could shadow it
            done = subprocess.run(cmd, cwd=out.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"{name}, seed {seed} failed (exit {done.returncode}); see {out}.log")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"system": system, "beta": beta, "seed": seed, "epochs": last["epoch"], "command": cmd,
            **{name: last.get(name) for name in args.metrics}}


def summary(runs: list[dict], split: str) -> list[dict]:
    """One row per (system, beta): the mean and standard deviation over seeds of each metric of ``split``."""
    rows = []
    keys = sorted({(run["system"], run["beta"]) for run in runs}, key=lambda key: (key[1] is None, key[1] or 0, key[0]))
    for system, beta in keys:
        group = [run for run in runs if (run["system"], run["beta"]) == (system, beta)]
        row = {"system": system, "beta": beta, "seeds": len(group)}
        for name in METRIC_NAMES:
            values = [run[f"{split}/{name}"] for run in group if run.get(f"{split}/{name}") is not None]
            row[name] = statistics.mean(values) if values else None
            row[name + " sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


SPLIT_WORDS = {"val": "the validation split (10% of the training images held out)",
               "test": "the test split (trained on all training images; not used for any choice)"}


def markdown(args, rows: list[dict]) -> str:
    split = args.evaluate
    lines = [f"# GM-VQ: beta around the ALBO (CIFAR-10 sample, {split}, {args.epochs} epochs)", "",
             "beta = 1 is the ALBO's KL weight (docs/math.md, Units of the objective). "
             f"Seeds {args.seeds}; mean ± standard deviation over seeds; the last epoch's metrics on "
             f"{SPLIT_WORDS[split]}. Every other setting, and every baseline's, at the package's defaults "
             f"(lr 1e-2). Commands in {Path(args.out).name}.json.", "",
             f"| system | beta | {split} MSE (1e-3) | {split} PSNR (dB) | {split} perplexity | codes used | seeds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(row, name, scale=1.0, digits=1):
        if row[name] is None:
            return "-"
        return f"{row[name] * scale:.{digits}f} ± {row[name + ' sd'] * scale:.{digits}f}"

    for row in rows:
        beta = "-" if row["beta"] is None else f"{row['beta']:g}"
        lines.append(f"| {row['system']} | {beta} | {cell(row, 'mse', 1e3, 2)} | {cell(row, 'psnr', 1, 2)} | "
                     f"{cell(row, 'perplexity', 1, 0)} | {cell(row, 'codes_used', 1, 0)} | {row['seeds']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], split: str, path: Path) -> None:
    """The frontier: MSE against perplexity, GM-VQ over beta as a line, each baseline a point."""
    from gmvq_ext.training.visuals import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    gmvq = [row for row in rows if row["beta"] is not None]
    ax.errorbar([r["perplexity"] for r in gmvq], [1e3 * r["mse"] for r in gmvq],
                xerr=[r["perplexity sd"] for r in gmvq], yerr=[1e3 * r["mse sd"] for r in gmvq],
                marker="o", label="GM-VQ over beta")
    for row in gmvq:
        ax.annotate(f"beta {row['beta']:g}", (row["perplexity"], 1e3 * row["mse"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    for row in rows:
        if row["beta"] is None:
            ax.errorbar(row["perplexity"], 1e3 * row["mse"], xerr=row["perplexity sd"], yerr=1e3 * row["mse sd"],
                        marker="s", linestyle="none", label=row["system"])
    ax.set_xscale("log")
    ax.set_xlabel(f"{split} perplexity (of 1024 codes)")
    ax.set_ylabel(f"{split} MSE (1e-3, pixels in [-1, 1])")
    ax.set_title("CIFAR-10 sample: reconstruction against code usage")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    betas = [float(b) for b in args.betas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    baselines = [name for name in args.baselines.split(",") if name]
    jobs = [("gmvq", beta, seed) for beta in betas for seed in seeds]
    jobs += [(name, None, seed) for name in baselines for seed in seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda job: train(args, *job), jobs))
    rows = summary(runs, args.evaluate)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"epochs": args.epochs, "seeds": seeds, "split": args.evaluate,
                                                     "summary": rows,
                                                     "runs": runs}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(args, rows))
    plot(rows, args.evaluate, out.with_suffix(".png"))
    print(markdown(args, rows))


if __name__ == "__main__":
    main()
