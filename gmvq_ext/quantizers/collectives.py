"""torch.distributed helpers for the quantizers: rank, a differentiable
global mean, and broadcasting an initialisation from rank 0.

Every helper is a no-op in a single process (torch.distributed absent, not
initialised, or world size 1), so the quantizers never branch on it
themselves."""

from __future__ import annotations

import torch
from torch import Tensor


def is_distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def world_size_and_rank() -> tuple[int, int]:
    if not is_distributed():
        return 1, 0
    return torch.distributed.get_world_size(), torch.distributed.get_rank()


def global_weighted_mean(local_mean: Tensor, local_count: int) -> Tensor:
    """The mean over every rank's vectors from each rank's local mean, WITH gradient.

    global = sum_r n_r mean_r / sum_r n_r. The sum is a functional all-reduce,
    whose backward all-reduces the incoming gradients, so each rank's local
    mean receives (n_r / N) * sum_r' (dL_r'/d global): the gradient of the
    loss summed over ranks, which is what DDP's gradient averaging then
    divides by world size. Functional collectives also trace under torch.compile."""
    if not is_distributed():
        return local_mean
    from torch.distributed import _functional_collectives as funcol

    # One collective: the count travels with the weighted sum (it carries no gradient).
    count = torch.full((1,), float(local_count), dtype=local_mean.dtype, device=local_mean.device)
    packed = funcol.all_reduce(torch.cat([local_mean.reshape(-1) * count, count]), "sum",
                               torch.distributed.group.WORLD)
    return (packed[:-1] / packed[-1:].clamp_min(1)).reshape(local_mean.shape)


def broadcast_from_rank0_(tensor: Tensor) -> Tensor:
    """Overwrite ``tensor`` on every rank with rank 0's values (in place)."""
    if is_distributed():
        torch.distributed.broadcast(tensor, src=0)
    return tensor


def gather_to_rank0(rows: Tensor) -> Tensor:
    """Rank 0 gets every rank's rows concatenated in rank order; other ranks get their own.

    Ranks may hold different numbers of rows (all must have the same columns)."""
    if not is_distributed():
        return rows
    world_size, rank = world_size_and_rank()
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    torch.distributed.all_gather(counts, count)
    largest = int(max(c.item() for c in counts))
    padded = rows.new_zeros((largest, rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, padded.contiguous())
    if rank != 0:
        return rows
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)])
