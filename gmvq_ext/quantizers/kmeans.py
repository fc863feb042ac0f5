"""Deterministic k-means (Lloyd) for codebook initialisation."""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per distance block: bounds the (rows, K) distance matrix in memory.
_BLOCK_ROWS = 8192
# Relative size of the jitter added to resampled points when there are
# fewer vectors than codes, so that duplicated codes are not identical.
_JITTER = 1e-3


def nearest_code(x: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid of every row of x (ties to the lowest index)."""
    code_norms = (centroids * centroids).sum(1)
    out = []
    for block in x.split(_BLOCK_ROWS):
        out.append((code_norms[None, :] - 2.0 * block @ centroids.T).argmin(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=x.device)


@torch.no_grad()
def kmeans(x: Tensor, k: int, iterations: int = 10, seed: int = 0) -> Tensor:
    """k centroids of the rows of x (N, D) after ``iterations`` Lloyd steps, float32 (or float64).

    Initial centroids: k distinct rows drawn by a CPU torch.Generator seeded
    with ``seed`` (the same on every device and run). With fewer rows than
    k, rows are drawn with replacement and jittered by 1e-3 times the data's
    per-dimension standard deviation. A cluster that loses every point keeps
    its previous centroid."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    data = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    n, d = data.shape
    generator = torch.Generator().manual_seed(int(seed))
    if n >= k:
        start = torch.randperm(n, generator=generator)[:k]
        centroids = data[start.to(data.device)].clone()
    else:
        start = torch.randint(n, (k,), generator=generator)
        jitter = torch.randn(k, d, generator=generator, dtype=data.dtype).to(data.device)
        scale = data.std(0, unbiased=False) if n > 1 else data.abs().mean(0)
        centroids = data[start.to(data.device)] + _JITTER * jitter * scale.clamp_min(1e-6)
    for _ in range(iterations):
        assignment = nearest_code(data, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, data)
        counts = torch.zeros(k, dtype=data.dtype, device=data.device).index_add_(
            0, assignment, torch.ones_like(assignment, dtype=data.dtype))
        filled = counts > 0
        centroids = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centroids)
    return centroids
