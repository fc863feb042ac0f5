"""Train systems at chosen settings with several seeds and compare them on
validation (or, once chosen, on test): the engine of issue 26's study.

    # GM-VQ's beta around the ALBO beside two baselines at their defaults
    python experiments/sweep.py "gmvq:beta=0.01|0.1|0.3|1|3|10|48" vqvae-l2 vqvae --seeds 0,1 --epochs 15
    # a system's learning rate, the grid extended until its best value is interior
    python experiments/sweep.py "vqvae-l2:lr=0.003|0.01|0.03" --extend "lr=0.0003|0.001|0.003|0.01|0.03|0.1|0.3"
    # the chosen settings, tested
    python experiments/sweep.py gmvq:lr=0.01 vqvae-l2:lr=0.003 --seeds 0,1,2 --epochs 30 --evaluate test

A point is ``SYSTEM[:lever=value,lever=value...]``; ``a|b|c`` gives one point
per value (several such levers: every combination). A lever is a flag of
``gmvq_ext.train`` (lr, beta, gamma, sigma_z2, noise_scale, sigma_x2,
commitment, weight_decay, warmup_epochs, batch_size) or else a keyword of the
quantizer's constructor (replace_after, latent_weight, kl_weight,
temperature_start, ...) passed as ``--quantizer-option``. Whatever a point
does not set is the package's default: lr 1e-2, batch 128 and 1 warmup epoch
are written into every command, and each run's quantizer settings as the
trainer resolved them are recorded beside it (``quantizer_options``), so a
row stays what it was when a default changes later; a study that must be
rerun under later defaults names its settings (``gmvq:gamma=0.3,...``).

Every run is one ``python -m gmvq_ext.train`` on one thread, ``--jobs`` at a
time, resumable (``--auto-resume``), kept under ``--runs-dir`` in a folder
named by its settings (a finished one is read, not retrained). ``--evaluate
val`` holds out 10% of CIFAR-10's training images (CelebA: its own
validation split, the official partition's or, for a folder of crops, the
second 10% of the sorted file names) and reads only the validation metrics:
nothing is chosen on a test split. ``--evaluate test`` trains on every training image and reports
the test split: for chosen settings only. Writes OUT.json (every run's
command, last-epoch metrics and per-epoch curve), OUT.md (mean ± standard
deviation over seeds), OUT.png (MSE against perplexity: the frontier) and
OUT-curves.png (MSE and perplexity against epoch, one line per point).
"""

from __future__ import annotations

import argparse
import itertools
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
DATA = ROOT.parent / "shared" / "data"
# CelebA: the sample's 2000 face crops (split 80/10/10 by file name); its 32 aligned faces are all "train".
DEFAULT_DATA = {"cifar10": DATA / "cifar10-sample", "celeba": DATA / "celeba-sample" / "test_crops"}
METRIC_NAMES = ("mse", "psnr", "perplexity", "codes_used")
TRAINER_LEVERS = ("lr", "beta", "gamma", "sigma_z2", "noise_scale", "sigma_x2", "commitment", "weight_decay",
                  "warmup_epochs", "batch_size")
# The settings every command states, unless a point sets them.
FIXED = {"lr": 1e-2, "batch_size": 128, "warmup_epochs": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("points", nargs="+", metavar="SYSTEM[:lever=v1|v2,...]")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--dataset", choices=tuple(DEFAULT_DATA), default="cifar10")
    p.add_argument("--data-dir", help="default: ../shared/data/<dataset>-sample")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "sweep"))
    p.add_argument("--evaluate", choices=("val", "test"), default="val",
                   help="val: tune (validation metrics only); test: the chosen settings, all training images")
    p.add_argument("--out", default=str(RESULTS / "sweep"),
                   help="writes OUT.json, OUT.md, OUT.png and OUT-curves.png")
    p.add_argument("--extend", metavar="LEVER=v1|v2|...",
                   help="a ladder of values for LEVER: wherever a system's best value of it (lowest mean validation "
                        "MSE) is the lowest or highest of its grid, the next value of the ladder is trained too, "
                        "until the best is interior or the ladder ends")
    args = p.parse_args(argv)
    args.ladder = None
    if args.extend:
        if args.evaluate != "val":
            p.error("--extend chooses values, so only on validation (--evaluate val)")
        name, _, values = args.extend.partition("=")
        args.ladder = (name.strip().replace("-", "_"), [literal(value) for value in values.split("|") if value])
        if len(args.ladder[1]) < 2:
            p.error(f"--extend {args.extend!r}: give LEVER=v1|v2|... with two values or more")
    args.data_dir = Path(args.data_dir or DEFAULT_DATA[args.dataset]).resolve()
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    return args


def expand(spec: str) -> list[tuple[str, dict]]:
    """'gmvq:beta=0.1|1,lr=0.01' -> [("gmvq", {"beta": 0.1, "lr": 0.01}), ("gmvq", {"beta": 1.0, "lr": 0.01})]."""
    system, _, settings = spec.partition(":")
    if system not in gmvq_ext.QUANTIZERS:
        raise SystemExit(f"point {spec!r}: unknown system {system!r}; choose one of {sorted(gmvq_ext.QUANTIZERS)}")
    names, choices = [], []
    for item in filter(None, settings.split(",")):
        name, equals, values = item.partition("=")
        if not equals or not values:
            raise SystemExit(f"point {spec!r}: {item!r} is not lever=value")
        names.append(name.strip().replace("-", "_"))
        choices.append([literal(value) for value in values.split("|")])
    return [(system, dict(zip(names, combination))) for combination in itertools.product(*choices)]


def literal(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def beyond_the_edges(points: list[tuple[str, dict]], runs: list[dict], ladder) -> list[tuple[str, dict]]:
    """The points to add so that each group's best value of the ladder's lever is not at the edge of its grid.

    A group: the points of one system that differ only in that lever. Its best value has the lowest mean
    validation MSE over seeds (failed runs left out)."""
    name, values = ladder
    groups: dict[str, list] = {}
    for system, levers in points:
        if name in levers:
            others = {key: value for key, value in levers.items() if key != name}
            groups.setdefault(label(system, others), []).append((system, levers))
    added = []
    for group in groups.values():
        grid = sorted(levers[name] for _, levers in group)
        if len(grid) < 2 or any(value not in values for value in grid):
            continue
        mean_mse = {}
        for system, levers in group:
            mses = [run["val/mse"] for run in runs if run["system"] == system and run["levers"] == levers
                    and run.get("val/mse") is not None]
            if mses:
                mean_mse[levers[name]] = statistics.mean(mses)
        if not mean_mse:
            continue
        best = min(mean_mse, key=mean_mse.get)
        step = -1 if best == grid[0] else 1 if best == grid[-1] else 0
        position = values.index(best) + step
        if step and 0 <= position < len(values) and values[position] not in grid:
            system, levers = group[0]
            added.append((system, {**levers, name: values[position]}))
    return added


def in_grid_order(points: list[tuple[str, dict]], lever: str) -> list[tuple[str, dict]]:
    """Points grouped as first given, each group ordered by ``lever``."""
    first_seen: dict[str, int] = {}
    for system, levers in points:
        first_seen.setdefault(label(system, {k: v for k, v in levers.items() if k != lever}), len(first_seen))
    return sorted(points, key=lambda point: (
        first_seen[label(point[0], {k: v for k, v in point[1].items() if k != lever})],
        point[1].get(lever, 0)))


def point_series(specs: list[str], points: list[tuple[str, dict]], ladder_lever: str | None) -> dict[str, int]:
    """The index of the point given (spec) that each point comes from; a point --extend added belongs
    to the grid it extends."""
    series = {label(system, levers): index for index, spec in enumerate(specs) for system, levers in expand(spec)}

    def others(levers):
        return {name: value for name, value in levers.items() if name != ladder_lever}

    for system, levers in points:
        if label(system, levers) not in series:
            series[label(system, levers)] = next(series[label(s, l)] for s, l in points
                                                 if s == system and others(l) == others(levers)
                                                 and label(s, l) in series)
    return series


def label(system: str, levers: dict) -> str:
    return system + "".join(f" {name}={value:g}" if isinstance(value, float) else f" {name}={value}"
                            for name, value in sorted(levers.items()))


def command(args, system: str, levers: dict, seed: int, out: Path) -> list[str]:
    settings = {**FIXED, **levers}
    flags = []
    for name, value in sorted(settings.items()):
        if name in TRAINER_LEVERS:
            flags += [f"--{name.replace('_', '-')}", str(value)]
        else:
            flags += ["--quantizer-option", f"{name}={value!r}"]
    # CIFAR-10 holds out 10% of its training images; CelebA evaluates its own validation split.
    split = ["--val-fraction", "0.1"] if args.evaluate == "val" else []
    return [sys.executable, "-m", "gmvq_ext.train", "--dataset", args.dataset, "--data-dir", str(args.data_dir),
            "--quantizer", system, *flags, "--epochs", str(args.epochs), "--seed", str(seed), *split,
            "--codebook-size", "1024", "--dim", "64", "--device", "cpu", "--out", str(out.resolve()),
            "--auto-resume"]


def run_folder(args, system: str, levers: dict, seed: int) -> Path:
    name = label(system, levers).replace(" ", "_")
    return Path(args.runs_dir) / f"{args.dataset}-{args.evaluate}-epochs={args.epochs}" / f"{name}-seed={seed}"


def train(args, system: str, levers: dict, seed: int) -> dict:
    out = run_folder(args, system, levers, seed)
    cmd = command(args, system, levers, seed, out)
    if not (out / "results.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACKAGE_PARENT)}
        with open(out.parent / f"{out.name}.log", "a") as log:  # cwd: not a source tree that could shadow it
            done = subprocess.run(cmd, cwd=out.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:  # e.g. a diverged run (a non-finite loss stops it): a result, not a crash
            reason = (out.parent / f"{out.name}.log").read_text().strip().splitlines()[-1:] or ["no output"]
            print(f"{label(system, levers)}, seed {seed}: exit {done.returncode}: {reason[0]}", file=sys.stderr)
            return {"system": system, "levers": levers, "seed": seed, "command": cmd,
                    "failed": f"exit {done.returncode}: {reason[0]}", "curve": []}
    else:
        changed = settings_since_changed(out, cmd)
        if changed:
            raise SystemExit(f"{out} was trained with {', '.join(changed)}: a default changed since, so this "
                             f"point no longer names that run. Name the setting in the point (to read the run) "
                             f"or give a fresh --runs-dir (to train it as the point now means).")
    return read_run(args.evaluate, out, system, levers, seed, cmd)


def settings_since_changed(out: Path, cmd: list[str]) -> list[str]:
    """The settings a finished run was trained with that its command now resolves otherwise: a folder is
    named by the levers a point sets, so a later change of a default would otherwise pass an old run off
    as the new setting. Compares what the run recorded (runs of older versions record fewer settings)."""
    from gmvq_ext.training.config import QUANTIZER_FLAGS, RUN_DEFINING, parse_args as trainer_args, quantizer_options

    now_args = trainer_args(cmd[3:])  # the command after "python -m gmvq_ext.train"
    results = json.loads((out / "results.json").read_text())
    then_args, then_options = results.get("args", {}), results["quantizer"]["options"]
    now_options = quantizer_options(now_args)
    # The quantizer's flags and options are compared as resolved (a flag left out means its default).
    trainer_settings = set(RUN_DEFINING) - set(QUANTIZER_FLAGS) - {"quantizer_option"}
    changed = [f"{name}={then_args[name]!r} (now {getattr(now_args, name)!r})" for name in RUN_DEFINING
               if name in trainer_settings and name in then_args and then_args[name] != getattr(now_args, name)]
    return changed + [f"{name}={then_options[name]!r} (now {now_options[name]!r})"
                      for name in sorted(then_options.keys() & now_options.keys())
                      if then_options[name] != now_options[name]]


def read_run(split: str, out: Path, system: str, levers: dict, seed: int, cmd: list[str]) -> dict:
    """The final metrics of ``split``, the per-epoch curve of the split evaluated every epoch (validation
    where there is one) and how many codes were replaced in all."""
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last, steps = epochs[-1], [0] + [epoch["step"] for epoch in epochs]
    results = json.loads((out / "results.json").read_text())
    if split == "val" and "val/mse" not in last:
        raise SystemExit(f"{out} evaluated no validation split: it cannot be read for a choice")
    if split == "test":  # results.json: the test split after the last epoch
        final = {f"test/{name}": results.get("codes_used" if name == "codes_used" else f"test_{name}")
                 for name in METRIC_NAMES}
    else:
        final = {f"val/{name}": last.get(f"val/{name}") for name in METRIC_NAMES}
    every_epoch = "val" if "val/mse" in last else "test"
    replaced = [epoch.get("train/codes_replaced") for epoch in epochs]
    return {"system": system, "levers": levers, "seed": seed, "epochs": last["epoch"], "command": cmd, **final,
            # Every setting of the quantizer as the trainer resolved it: a later change of a default does not
            # change what this row was (rerun it with these values given explicitly).
            "quantizer_options": results["quantizer"]["options"],
            "curve_split": every_epoch,
            "curve": [{"epoch": epoch["epoch"], "mse": epoch.get(f"{every_epoch}/mse"),
                       "perplexity": epoch.get(f"{every_epoch}/perplexity")} for epoch in epochs],
            "codes_replaced": None if None in replaced else round(sum(
                mean * (after - before) for mean, before, after in zip(replaced, steps, steps[1:])))}


def summary(runs: list[dict], split: str) -> list[dict]:
    """One row per point, in the order first given: mean and standard deviation over seeds of each metric."""
    rows = {}
    for run in runs:
        rows.setdefault(label(run["system"], run["levers"]), []).append(run)
    table = []
    for name, group in rows.items():
        row = {"point": name, "system": group[0]["system"], "levers": group[0]["levers"], "seeds": len(group),
               "failed": sum(1 for run in group if run.get("failed"))}
        for metric in METRIC_NAMES:
            values = [run[f"{split}/{metric}"] for run in group if run.get(f"{split}/{metric}") is not None]
            row[metric] = statistics.mean(values) if values else None
            row[metric + " sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        replaced = [run["codes_replaced"] for run in group if run.get("codes_replaced") is not None]
        row["codes_replaced"] = statistics.mean(replaced) if replaced else None
        table.append(row)
    return table


SPLIT_WORDS = {("val", "cifar10"): "the validation split (10% of the training images held out)",
               ("val", "celeba"): "the validation split (the official partition's; a folder of crops such as "
                                  "the sample's: the second 10% of its sorted file names)",
               ("test", "cifar10"): "the test split (trained on all training images; not used for any choice)",
               ("test", "celeba"): "the test split (not used for any choice)"}


def markdown(args, rows: list[dict]) -> str:
    split = args.evaluate
    lines = [f"# {args.dataset} sample, {split}, {args.epochs} epochs", "",
             f"Seeds {args.seeds}; mean ± standard deviation over seeds; the last epoch's metrics on "
             f"{SPLIT_WORDS[split, args.dataset]}. Settings a row does not name are the package's defaults with "
             f"lr {FIXED['lr']:g}, batch {FIXED['batch_size']}, {FIXED['warmup_epochs']} warmup epoch. "
             f"Commands in {Path(args.out).name}.json.", "",
             f"| point | {split} MSE (1e-3) | {split} PSNR (dB) | {split} perplexity | codes used | "
             "codes replaced | seeds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(row, name, scale=1.0, digits=1):
        if row[name] is None:
            return "-"
        return f"{row[name] * scale:.{digits}f} ± {row[name + ' sd'] * scale:.{digits}f}"

    for row in rows:
        replaced = "-" if row["codes_replaced"] is None else f"{row['codes_replaced']:.0f}"
        seeds = f"{row['seeds']}" + (f" ({row['failed']} failed)" if row["failed"] else "")
        lines.append(f"| {row['point']} | {cell(row, 'mse', 1e3, 2)} | {cell(row, 'psnr', 1, 2)} | "
                     f"{cell(row, 'perplexity', 1, 0)} | {cell(row, 'codes_used', 1, 0)} | {replaced} | {seeds} |")
    return "\n".join(lines) + "\n"


def series_names(rows: list[dict]) -> list[str]:
    """Each row's series in the frontier plot: its point's group (one point given on the command line, the
    points its values expand into and those --extend added), named by the system, the levers that vary
    within it and the values of those that do not."""
    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("series", 0), []).append(row)
    names = {}
    for group in groups.values():
        lever_names = sorted({name for row in group for name in row["levers"]})
        varying = [name for name in lever_names if len({repr(row["levers"].get(name)) for row in group}) > 1]
        fixed = [f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                 for name, value in sorted(group[0]["levers"].items()) if name not in varying]
        name = group[0]["system"] + (f" over {', '.join(varying)}" if varying else "")
        name += f" ({', '.join(fixed)})" if fixed else ""
        for row in group:
            names[id(row)] = name
            row["varying"] = varying
    return [names[id(row)] for row in rows]


def series_style(index: int, kind: str) -> dict:
    """Matplotlib's ten colours, then the same colours with the next marker ("marker") or dash pattern
    ("linestyle"), so that no two of the first forty series look alike."""
    styles = {"marker": ["o", "s", "^", "D"], "linestyle": ["-", "--", ":", "-."]}[kind]
    return {"color": f"C{index % 10}", kind: styles[index // 10 % len(styles)]}


def plot_frontier(rows: list[dict], split: str, dataset: str, path: Path) -> None:
    """MSE against perplexity, seeds as error bars: one series per point given (its values joined in
    order), each point labelled by the levers that vary within its series."""
    from gmvq_ext.training.visuals import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(13, 6), dpi=110)
    names = series_names(rows)
    for index, name in enumerate(dict.fromkeys(names)):
        group = [row for row, row_name in zip(rows, names) if row_name == name and row["mse"] is not None]
        ax.errorbar([r["perplexity"] for r in group], [1e3 * r["mse"] for r in group],
                    xerr=[r["perplexity sd"] for r in group], yerr=[1e3 * r["mse sd"] for r in group],
                    capsize=2, label=name, **series_style(index, "marker"))
        for row in group:
            if row["varying"]:
                text = " ".join(f"{k}={row['levers'][k]:g}" if isinstance(row["levers"][k], float)
                                else f"{k}={row['levers'][k]}" for k in row["varying"])
                ax.annotate(text, (row["perplexity"], 1e3 * row["mse"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel(f"{split} perplexity (of 1024 codes)")
    ax.set_ylabel(f"{split} MSE (1e-3, pixels in [-1, 1])")
    ax.set_title(f"{dataset} sample: reconstruction against code usage")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(runs: list[dict], path: Path) -> None:
    """MSE and perplexity against epoch, one line per point (the mean over its seeds)."""
    from gmvq_ext.training.visuals import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    groups = {}
    for run in runs:
        if run["curve"]:
            groups.setdefault(label(run["system"], run["levers"]), []).append(run["curve"])
    for index, (name, curves) in enumerate(groups.items()):
        epochs = [point["epoch"] for point in curves[0]]
        for axis, metric, scale in ((left, "mse", 1e3), (right, "perplexity", 1.0)):
            values = [statistics.mean(scale * curve[i][metric] for curve in curves) for i in range(len(epochs))]
            axis.plot(epochs, values, label=name, **series_style(index, "linestyle"))
    split = next((run["curve_split"] for run in runs if run["curve"]), "val")
    left.set_ylabel(f"{split} MSE (1e-3)")
    right.set_ylabel(f"{split} perplexity")
    left.set_yscale("log")  # the first epochs' errors are ten times the last ones'
    right.set_yscale("log")
    for axis in (left, right):
        axis.set_xlabel("epoch")
        axis.grid(True, alpha=0.3)
    fig.tight_layout()
    if groups:  # beside the plots, not over the lines; the saved figure grows to hold it
        right.legend(*left.get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                     ncol=1 + (len(groups) - 1) // 30)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    points = [point for spec in args.points for point in expand(spec)]
    if args.ladder:
        ladder_values = args.ladder[1]
        for system, levers in points:
            if args.ladder[0] in levers and levers[args.ladder[0]] not in ladder_values:
                raise SystemExit(f"{label(system, levers)}: {args.ladder[0]} is not a value of --extend's ladder")
    runs: list[dict] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        while True:
            done = {(run["system"], label("", run["levers"]), run["seed"]) for run in runs}
            jobs = [(system, levers, seed) for system, levers in points for seed in args.seed_list
                    if (system, label("", levers), seed) not in done]
            runs += list(pool.map(lambda job: train(args, *job), jobs))
            added = beyond_the_edges(points, runs, args.ladder) if args.ladder else []
            if not added:
                break
            points += added
    if args.ladder:
        points = in_grid_order(points, args.ladder[0])
    order = {(system, label("", levers)): index for index, (system, levers) in enumerate(points)}
    runs.sort(key=lambda run: (order[(run["system"], label("", run["levers"]))], run["seed"]))
    rows = summary(runs, args.evaluate)
    series = point_series(args.points, points, args.ladder[0] if args.ladder else None)
    for row in rows:
        row["series"] = series[row["point"]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "sweep_command": ["python", "experiments/sweep.py", *argv],
        "dataset": args.dataset, "epochs": args.epochs, "seeds": args.seed_list, "split": args.evaluate,
        "points": args.points, "summary": rows, "runs": runs}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(args, rows))
    plot_frontier(rows, args.evaluate, args.dataset, out.with_suffix(".png"))
    plot_curves(runs, out.parent / f"{out.name}-curves.png")
    print(markdown(args, rows))


if __name__ == "__main__":
    main()
