"""Choose GM-VQ's levers (gamma, sigma_z2, learning rate) on a VALIDATION split only.

    python experiments/validation_sweep.py                 # train every config, then summarise
    python experiments/validation_sweep.py --report-only   # summarise finished runs

Each config trains ``python -m gmvq_ext.train`` on 90% of the CIFAR-10 sample's
training images (``--val-fraction 0.1``: a fixed, seed-independent hold-out)
and is judged by the last epoch's validation metrics in its metrics.jsonl.
The runs also write a results.json with test metrics (train.py always ends
with a test evaluation); this script never reads it, so nothing here is
tuned on test. VQ-VAE rows at the same budget give the reference point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"

# name: train.py arguments
CONFIGS = {
    "A": ["--quantizer", "gmvq", "--lr", "1e-3", "--gamma", "0.1", "--sigma-z2", "0.5"],
    "B": ["--quantizer", "gmvq", "--lr", "1e-3", "--gamma", "0.1", "--sigma-z2", "2.0"],
    "C": ["--quantizer", "gmvq", "--lr", "1e-3", "--gamma", "0.1", "--sigma-z2", "8.0"],
    "V1": ["--quantizer", "vqvae", "--lr", "1e-3"],
}
# sigma_z2 scales the training noise s = ||z_hat - e_c|| / sqrt(2 sigma_z2 D) and
# the latent term down together: larger values train the decoder on inputs
# closer to the noiseless ones it sees at evaluation. (A CPU shared with other
# jobs allowed only these four 3-epoch runs; gamma and lr stayed unexplored.)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="/work/shared/data/cifar10-sample")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "validation_sweep"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def base_arguments(args) -> list[str]:
    return ["--dataset", "cifar10", "--data-dir", args.data_dir, "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--warmup-epochs", "1", "--val-fraction", "0.1", "--seed", "0",
            "--device", "cpu", "--max-test-images", "512"]


def train(args, name: str) -> None:
    out = Path(args.runs_dir) / name
    if (out / "results.json").exists():
        return
    command = [sys.executable, "-m", "gmvq_ext.train", *base_arguments(args), "--out", str(out), *CONFIGS[name]]
    if (out / "checkpoint.pt").exists():
        command.append("--resume")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{name}.log", "a") as log:
        subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def summarise(args) -> None:
    lines = ["# GM-VQ levers on a validation split (CIFAR-10 sample, CPU)", "",
             f"Common arguments: `{' '.join(base_arguments(args))}`. Validation = a fixed 10% of the training "
             "batches (517 images, 512 evaluated); MSE x 1e-3 with pixels in [-1, 1]; last epoch's values. "
             "Test metrics were not read.", "",
             "| config | arguments | epochs | val MSE (1e-3) | val perplexity | val codes used |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    summary = {}
    for name in args.configs:
        path = Path(args.runs_dir) / name / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if not records:
            lines.append(f"| {name} | `{' '.join(CONFIGS[name])}` | 0 | | | |")
            continue
        last = records[-1]
        summary[name] = {"arguments": CONFIGS[name], "epoch": last["epoch"], "val_mse": last["val/mse"],
                         "val_perplexity": last["val/perplexity"], "val_codes_used": last["val/codes_used"]}
        lines.append(f"| {name} | `{' '.join(CONFIGS[name])}` | {last['epoch']} | {last['val/mse'] * 1e3:.2f} | "
                     f"{last['val/perplexity']:.1f} | {last['val/codes_used']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gmvq_validation_sweep.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "gmvq_validation_sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    if not args.report_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda name: train(args, name), args.configs))
    summarise(args)


if __name__ == "__main__":
    main()
