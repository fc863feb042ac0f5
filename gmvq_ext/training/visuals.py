"""Pictures of a run: labelled reconstruction grids (Pillow), code-usage
histograms and training curves (matplotlib, Agg backend: no display needed).
Each is written under a temporary name and renamed, so a reader never sees a
half-written PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data import to_uint8
from ..files import write_atomic

ROW_LABELS = ("original", "reconstruction")
LABEL_PAD = 6  # pixels around the row labels in the left margin
CURVES_SIZE = (10, 7)  # inches at CURVES_DPI: a 1000 x 700 picture, 2 x 2 panels
CURVES_DPI = 100


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                             columns: int = 8) -> None:
    """Pairs of rows, ``columns`` images wide: originals, and below them their
    reconstructions; a left margin names each row ("original", "reconstruction")."""
    from PIL import Image, ImageDraw

    if len(originals) == 0 or originals.shape != reconstructions.shape:
        raise ValueError(f"need as many reconstructions as originals (at least one), got "
                         f"{tuple(originals.shape)} and {tuple(reconstructions.shape)}")
    originals, reconstructions = to_uint8(originals.cpu()), to_uint8(reconstructions.cpu())
    n, _, h, w = originals.shape
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    pad = 2
    font = label_font(h)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(int(np.ceil(measure.textlength(label, font=font))) for label in ROW_LABELS) + 2 * LABEL_PAD
    canvas = np.full((2 * rows * (h + pad) + pad, margin + columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        row, col = divmod(i, columns)
        x = margin + pad + col * (w + pad)
        for offset, source in enumerate((originals, reconstructions)):
            y = pad + (2 * row + offset) * (h + pad)
            canvas[y:y + h, x:x + w] = source[i].permute(1, 2, 0).numpy()
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for band in range(2 * rows):
        label = ROW_LABELS[band % 2]
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        y = pad + band * (h + pad) + (h - (bottom - top)) // 2 - top  # centred on the row
        draw.text((LABEL_PAD, y), label, fill=(0, 0, 0), font=font)
    write_atomic(path, lambda f: picture.save(f, format="PNG"))


def label_font(row_height: int):
    """Pillow's default font, sized to the rows where this Pillow can scale it."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(10, min(16, row_height // 4)))
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def save_code_histogram(counts: torch.Tensor, path: str | Path, title: str) -> None:
    """Bar chart of how often each code was chosen, codes sorted by frequency."""
    plt = pyplot()
    counts = counts.cpu().double()
    ordered = counts.sort(descending=True).values.numpy()
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    ax.bar(np.arange(len(ordered)), ordered, width=1.0, color="tab:blue")
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("assignments")
    used = int((counts > 0).sum())
    ax.set_title(f"{title}: {used} of {len(ordered)} codes used")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- training curves

# (metric, panel title); the training steps give mse and perplexity, the evaluation all four.
CURVE_PANELS = (("mse", "reconstruction MSE (pixels in [-1, 1])"),
                ("perplexity", "perplexity (exp H of the mean soft posterior)"),
                ("psnr", "PSNR, dB (per image in [0, 1], mean)"),
                ("ssim", "SSIM (per image in [0, 1], mean)"))
EVALUATION_ONLY = ("psnr", "ssim")
SPLIT_COLOURS = {"train": "tab:blue"}  # and the evaluation's split (val or test) orange


def read_curves(metrics_path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{"train/mse": (epochs, values), "<eval>/mse": ..., "train/perplexity": ...,
    "<eval>/perplexity": ..., "<eval>/psnr": ..., "<eval>/ssim": ...} from a
    run's metrics.jsonl, <eval> being "val" or "test" (whichever the run
    evaluated on each epoch); psnr and ssim only where the file has them (runs
    before they were measured do not). One value per epoch: a line repeating an
    epoch (a run resumed by hand) replaces the earlier one."""
    path = Path(metrics_path)
    by_epoch = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = record
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{str(path)!r} line {number} is not a metrics record: {error}") from None
    if not by_epoch:
        raise ValueError(f"{str(path)!r} holds no epochs yet")
    splits = ["train"] + [s for s in ("val", "test") if any(f"{s}/mse" in r for r in by_epoch.values())][:1]
    curves = {}
    for metric, _ in CURVE_PANELS:
        for split in splits:
            key = f"{split}/{metric}"
            points = [(epoch, float(r[key])) for epoch, r in sorted(by_epoch.items()) if r.get(key) is not None]
            if metric not in EVALUATION_ONLY or points:
                curves[key] = ([e for e, _ in points], [v for _, v in points])
    return curves


def save_training_curves(metrics_path: str | Path, path: str | Path) -> None:
    """Train and evaluation curves per epoch (``read_curves``), a 1000 x 700
    PNG of 2 x 2 panels: MSE (log scale) and perplexity above, the evaluation's
    PSNR and SSIM below (the numbers of metrics.jsonl and TensorBoard)."""
    curves = read_curves(metrics_path)
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=CURVES_SIZE, dpi=CURVES_DPI)
    for ax, (metric, title) in zip(axes.flat, CURVE_PANELS):
        drawn = False
        for key, (epochs, values) in curves.items():
            if key.endswith(f"/{metric}") and epochs:
                split = key.split("/")[0]  # one colour per split in every panel; markers: one epoch is one point
                ax.plot(epochs, values, marker="o", label=split, color=SPLIT_COLOURS.get(split, "tab:orange"))
                drawn = True
        if metric == "mse" and all(v > 0 for k, (_, vs) in curves.items() if k.endswith("/mse") for v in vs):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not in this run's metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- helpers

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
