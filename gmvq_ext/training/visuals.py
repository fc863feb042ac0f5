"""Per-epoch pictures: reconstruction grids (Pillow) and code-usage histograms
(matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import to_uint8


def save_reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                             columns: int = 8) -> None:
    """Rows alternate originals and their reconstructions, ``columns`` images a row."""
    from PIL import Image

    originals, reconstructions = to_uint8(originals.cpu()), to_uint8(reconstructions.cpu())
    n, _, h, w = originals.shape
    rows = (n + columns - 1) // columns
    pad = 2
    canvas = np.full((2 * rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        row, col = divmod(i, columns)
        x = pad + col * (w + pad)
        for offset, source in enumerate((originals, reconstructions)):
            y = pad + (2 * row + offset) * (h + pad)
            canvas[y:y + h, x:x + w] = source[i].permute(1, 2, 0).numpy()
    Image.fromarray(canvas).save(path)


def save_code_histogram(counts: torch.Tensor, path: str | Path, title: str) -> None:
    """Bar chart of how often each code was chosen, codes sorted by frequency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = counts.cpu().double()
    ordered = counts.sort(descending=True).values.numpy()
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    ax.bar(np.arange(len(ordered)), ordered, width=1.0, color="tab:blue")
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("assignments")
    used = int((counts > 0).sum())
    ax.set_title(f"{title}: {used} of {len(ordered)} codes used")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
