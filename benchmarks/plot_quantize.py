"""Time and peak memory of each bench_quantize.py case against the codebook size K,
from one results JSON (one run, one machine).

    python benchmarks/plot_quantize.py benchmarks/results/quantize-cpu-<date>.json --out <name>.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {
    "fused": "fused gmvq.quantize",
    "reference_noise": "eager reference (given its noise)",
    "reference_compiled": "torch.compile(reference) (given its noise)",
    "vqtorch": "vector-quantize-pytorch VectorQuantize",
    "reference": "eager reference (generating its noise)",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    document = json.loads(args.results.read_text())
    machine = document["machine"]
    series: dict[str, dict[str, list]] = {}
    for row in document["results"]:
        n, k, d = (int(v) for v in row["shape"].split("x"))
        for case, result in row["cases"].items():
            if result.get("status") != "ok":
                continue
            points = series.setdefault(case, {"k": [], "ms": [], "mib": []})
            points["k"].append(k)
            points["ms"].append(result["median_s"] * 1e3)
            points["mib"].append(max(result["peak_bytes"], 0) / 2**20)
    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for case in LABELS:
        if case not in series:
            continue
        points = series[case]
        style = dict(marker="o", linewidth=2.2 if case == "fused" else 1.2)
        ax_time.plot(points["k"], points["ms"], label=LABELS[case], **style)
        ax_memory.plot(points["k"], points["mib"], label=LABELS[case], **style)
    device = machine.get("gpu") or machine["cpu_model"]
    shape = document["results"][0]["shape"].split("x")
    for ax, ylabel in ((ax_time, "forward + backward, median ms"), (ax_memory, "peak memory above the inputs, MiB")):
        ax.set(xscale="log", yscale="log", xlabel="codebook size K", ylabel=ylabel)
        ax.set_xticks(sorted({k for points in series.values() for k in points["k"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_title(f"N = {shape[0]}, D = {shape[2]}, float32, training, hard")
    ax_memory.set_title(f"{device}, {machine['torch_threads']} threads, {machine['date_utc'][:10]}")
    ax_memory.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out)
    plt.close(fig)


if __name__ == "__main__":
    main()
