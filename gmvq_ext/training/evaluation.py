"""Test/validation metrics of an autoencoder, identical for 1 or N processes.

- mse: mean over every pixel element of (x - x_hat)^2, pixels in [-1, 1]
  (the reconstruction is not clamped); mse_01 is the same in [0, 1] (= mse / 4).
- perplexity: the paper's definition, the mean over evaluation batches of
  exp(H(q_bar_b)), q_bar_b the mean soft posterior of the batch (the
  quantizer's info["perplexity"]); perplexity_hard likewise with hard counts.
- codes_used: codes chosen at least once over the whole split;
  perplexity_hard_global: exp(entropy) of those whole-split code counts.
Under torchrun every rank evaluates the whole split, identically. Splitting
it would be faster, but the quantizers communicate inside their forward (GM-VQ
all-reduces q_bar over ranks), so every rank must make the same calls, and
whole batches keep the per-batch perplexity exactly the single-process value.
Rank 0's BatchNorm statistics must be broadcast first (``broadcast_buffers``).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..data import collate_images
from .distributed import Context
from .sampling import evaluation_batches


def codebook_size(quantizer: torch.nn.Module) -> int:
    return int(quantizer.codebook_size)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int, ctx: Context, num_workers: int = 0) -> dict:
    """Metrics of ``model`` (the bare module, not a DDP wrapper) on ``dataset``.

    Returns floats plus "code_counts", a (K,) int64 tensor of hard assignments."""
    was_training = model.training
    model.eval()
    k = codebook_size(model.quantizer)
    batches = evaluation_batches(len(dataset), batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_images,
                        generator=torch.Generator())
    sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)  # sse, elements, ppl, ppl_hard, batches
    counts = torch.zeros(k, dtype=torch.int64, device=ctx.device)
    for images in loader:
        images = images.to(ctx.device, non_blocking=True)
        reconstruction, indices, _, info = model(images)
        sums[0] += (reconstruction.double() - images.double()).square().sum()
        sums[1] += images.numel()
        sums[2] += float(info["perplexity"])
        sums[3] += float(info["perplexity_hard"])
        sums[4] += 1
        counts += torch.bincount(indices.reshape(-1), minlength=k)
    model.train(was_training)
    sse, elements, perplexity, perplexity_hard, n_batches = sums.tolist()
    if n_batches == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    probabilities = counts.double() / counts.sum()
    nonzero = probabilities[probabilities > 0]
    mse = sse / elements
    return {
        "mse": mse,
        "mse_01": mse / 4.0,
        "perplexity": perplexity / n_batches,
        "perplexity_hard": perplexity_hard / n_batches,
        "codes_used": int((counts > 0).sum()),
        "perplexity_hard_global": float(torch.exp(-(nonzero * nonzero.log()).sum())),
        "images": len(dataset),
        "code_counts": counts.cpu(),
    }
