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
    # One line per (case, temperature); older results have no temperature (it was 1).
    series: dict[tuple, dict[str, list]] = {}
    for row in document["results"]:
        n, k, d = (int(v) for v in row["shape"].split("x"))
        for case, result in row["cases"].items():
            if result.get("status") != "ok":
                continue
            points = series.setdefault((case, row.get("temperature", 1.0)), {"k": [], "ms": [], "mib": []})
            points["k"].append(k)
            points["ms"].append(result["median_s"] * 1e3)
            points["mib"].append(max(result["peak_bytes"], 0) / 2**20)
    temperatures = sorted({t for _, t in series}, reverse=True)
    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for case in LABELS:
        for temperature in temperatures:
            if (case, temperature) not in series:
                continue
            points = series[(case, temperature)]
            label = LABELS[case] + (f", T = {temperature:g}" if len(temperatures) > 1 else "")
            style = dict(marker="o", linewidth=2.2 if case == "fused" else 1.2,
                         linestyle="-" if temperature == temperatures[0] else "--")
            ax_time.plot(points["k"], points["ms"], label=label, **style)
            ax_memory.plot(points["k"], points["mib"], label=label, **style)
    device = machine.get("gpu") or machine["cpu_model"]
    shape = document["results"][0]["shape"].split("x")
    for ax, ylabel in ((ax_time, "forward + backward, median ms"), (ax_memory, "peak memory above the inputs, MiB")):
        ax.set(xscale="log", yscale="log", xlabel="codebook size K", ylabel=ylabel)
        ax.set_xticks(sorted({k for points in series.values() for k in points["k"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_title(f"N = {shape[0]}, D = {shape[2]}, float32, training, hard")
    ax_time.legend(fontsize=7, loc="upper left")
    ax_memory.set_title(f"{device}, {machine['torch_threads']} threads, {machine['date_utc'][:10]}")
    fig.tight_layout()
    fig.savefig(args.out)
    plt.close(fig)


if __name__ == "__main__":
    main()
