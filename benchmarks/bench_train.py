"""Training throughput of `python -m gmvq_ext.train` with and without --compile
and --precision bf16-mixed: the effect of the two flags a GPU user reaches for
first, measured on whatever machine runs this.

    python benchmarks/bench_train.py --data-dir ../shared/data/cifar10-sample \
        --out benchmarks/results/train-cpu.json

Each configuration is one training run in its own process (GM-VQ, the paper's
autoencoder, batch 128). Epoch 1 pays for compilation and warm-up, so the
figure is the median images/s of the epochs after the first, as the training
loop itself reports them (metrics.jsonl). Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_quantize import machine_info

CONFIGS = {
    "eager fp32": [],
    "--compile fp32": ["--compile"],
    "eager bf16-mixed": ["--precision", "bf16-mixed"],
    "--compile bf16-mixed": ["--compile", "--precision", "bf16-mixed"],
}


def measure(args, extra: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "gmvq_ext.train", "--dataset", args.dataset, "--data-dir", args.data_dir,
               "--quantizer", args.quantizer, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--device", args.device, "--seed", "0", "--out", str(out), *extra]
    started = time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = [record["images_per_second"] for record in records[1:]]
    return {"command": command, "images_per_second": statistics.median(steady),
            "epoch_images_per_second": [record["images_per_second"] for record in records],
            "wall_seconds": time.time() - started}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--quantizer", default="gmvq")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=3, help="the first is left out of the figure")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch (compilation, warm-up) is not measured")

    document = {"machine": machine_info(args.device), "quantizer": args.quantizer, "batch_size": args.batch_size,
                "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            document["results"][name] = measure(args, CONFIGS[name], Path(tmp) / name.replace(" ", "_"))
            print(f"{name}: {document['results'][name]['images_per_second']:.0f} images/s", flush=True)
            base = document["results"].get("eager fp32", {}).get("images_per_second")
            for result in document["results"].values():
                result["speed_up_over_eager_fp32"] = result["images_per_second"] / base if base else None
            # Written after every configuration: a run cut short keeps what it measured.
            Path(args.out).write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
