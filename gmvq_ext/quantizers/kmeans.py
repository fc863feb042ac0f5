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


def _squared_distance_to(data: Tensor, row_norms: Tensor, point: Tensor) -> Tensor:
    # ||x||^2 - 2 x.p + ||p||^2: one matrix-vector product instead of an (N, D) temporary.
    return (row_norms - 2.0 * (data @ point) + point.dot(point)).clamp_min(0)


def kmeans_plus_plus(data: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is a row
    drawn with probability proportional to its squared distance to the nearest
    centre so far. The uniforms come from ``generator`` (CPU) up front, and
    each draw is an inverse-CDF search on the device: no host round trip per centre."""
    n = data.shape[0]
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64).to(data.device)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = torch.empty(k, dtype=torch.int64, device=data.device)
    chosen[0] = first
    row_norms = (data * data).sum(1)
    nearest = _squared_distance_to(data, row_norms, data[first]).double()
    for i in range(1, k):
        cumulative = nearest.cumsum(0)
        # All rows coincide with a centre: fall back to uniform choice.
        weights_total = cumulative[-1]
        target = uniforms[i] * torch.where(weights_total > 0, weights_total, torch.ones_like(weights_total))
        cumulative = torch.where(weights_total > 0, cumulative,
                                 torch.arange(1, n + 1, device=data.device, dtype=torch.float64))
        pick = torch.searchsorted(cumulative, target[None], right=True).clamp_max(n - 1)
        chosen[i] = pick[0]
        nearest = torch.minimum(nearest, _squared_distance_to(data, row_norms, data[pick[0]]).double())
    return data[chosen].clone()


@torch.no_grad()
def kmeans(x: Tensor, k: int, iterations: int = 10, seed: int = 0) -> Tensor:
    """k centroids of the rows of x (N, D) after ``iterations`` Lloyd steps, float32 (float64 for float64).

    Seeding: k-means++ from a CPU torch.Generator seeded with ``seed``, so the
    result is a function of (x, k, iterations, seed) on a given device (on CUDA,
    index_add_ may sum in another order: last-bit differences between runs;
    under torch.distributed rank 0's result is broadcast). With fewer rows than
    k, rows are drawn with replacement and jittered by 1e-3 times the data's
    per-dimension standard deviation. A cluster that loses every point keeps
    its previous centroid."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    data = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    n, d = data.shape
    generator = torch.Generator().manual_seed(int(seed))
    if n >= k:
        centroids = kmeans_plus_plus(data, k, generator)
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
