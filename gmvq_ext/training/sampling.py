"""Data order as a pure function of (seed, epoch, rank, world size).

A resumed run therefore sees exactly the batches an uninterrupted one would,
without saving any sampler state."""

from __future__ import annotations

import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Distinct, reproducible stream per (seed, epoch); the large odd multiplier
    # keeps (seed, epoch) pairs from colliding for any realistic values.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def training_batches(n: int, global_batch: int, seed: int, epoch: int, rank: int = 0,
                     world_size: int = 1) -> list[list[int]]:
    """This rank's index lists for one epoch.

    The n indices are shuffled by a generator seeded from (seed, epoch) and cut
    into global batches of ``global_batch`` (an incomplete last batch is
    dropped so every rank takes the same number of steps); each global batch
    is dealt to the ranks in equal strided shards."""
    if global_batch % world_size:
        raise ValueError(f"batch size {global_batch} is not divisible by the world size {world_size}")
    order = torch.randperm(n, generator=epoch_generator(seed, epoch)).tolist()
    batches = []
    for start in range(0, n - global_batch + 1, global_batch):
        batch = order[start:start + global_batch]
        batches.append(batch[rank::world_size])
    return batches


def evaluation_batches(n: int, batch_size: int) -> list[list[int]]:
    """Evaluation batches in order; the last one may be smaller."""
    return [list(range(start, min(n, start + batch_size))) for start in range(0, n, batch_size)]
