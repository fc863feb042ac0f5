"""Test/validation metrics of an autoencoder, identical for 1 or N processes.

- mse: mean over every pixel element of (x - x_hat)^2, pixels in [-1, 1]
  (the reconstruction is not clamped); mse_01 is the same in [0, 1] (= mse / 4).
- perplexity: the paper's definition, the mean over evaluation batches of
  exp(H(q_bar_b)), q_bar_b the mean soft posterior of the batch (the
  quantizer's info["perplexity"]); perplexity_hard likewise with hard counts.
- psnr (dB), ssim: per image, pixels mapped to [0, 1] with the
  reconstruction clamped, then the mean over images (image_quality.py).
- codes_used: codes chosen at least once over the whole split;
  perplexity_hard_global: exp(entropy) of those whole-split code counts,
  code_entropy_bits: that entropy in bits.
Under torchrun the evaluation batches are dealt to the ranks (batch i to rank
i mod world size) and each rank evaluates whole batches, so every per-batch
value is exactly the single-process one; rank 0 then adds the per-batch
values in batch order, so the metrics are bit for bit those of one process
(every rank gets them).
The quantizers do not communicate in evaluation mode. Rank 0's BatchNorm
statistics must be broadcast first (``broadcast_buffers``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.data import DataLoader

from ..data import collate_images
from .image_quality import convention, psnr_and_ssim
from .process_group import Context, all_reduce_sum, gather_objects
from .sampling import evaluation_batches


def codebook_size(quantizer: torch.nn.Module) -> int:
    return int(quantizer.codebook_size)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int, ctx: Context, num_workers: int = 0,
             each_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> dict:
    """Metrics of ``model`` (the bare module, not a DDP wrapper) on ``dataset``,
    the same on every rank. ``each_batch(images, reconstructions)``, when
    given, sees every batch this rank evaluates (rFID's features).

    Returns floats plus "code_counts", a (K,) int64 tensor of hard assignments."""
    was_training = model.training
    model.eval()
    k = codebook_size(model.quantizer)
    batches = evaluation_batches(len(dataset), batch_size)
    if not batches:
        raise ValueError("cannot evaluate on an empty dataset")
    mine = list(range(ctx.rank, len(batches), ctx.world_size))
    loader = DataLoader(dataset, batch_sampler=[batches[i] for i in mine], num_workers=num_workers,
                        collate_fn=collate_images, generator=torch.Generator())
    records = []  # (batch index, sse, elements, perplexity, hard perplexity, psnr sum, ssim sum) of this rank's batches
    counts = torch.zeros(k, dtype=torch.int64, device=ctx.device)
    for batch, images in zip(mine, loader):
        images = images.to(ctx.device, non_blocking=True)
        reconstruction, indices, _, info = model(images)
        sse = (reconstruction.double() - images.double()).square().sum()
        psnr, ssim = psnr_and_ssim(reconstruction, images)
        if each_batch is not None:
            each_batch(images, reconstruction)
        records.append((batch, float(sse), images.numel(), float(info["perplexity"]),
                        float(info["perplexity_hard"]), float(psnr.sum()), float(ssim.sum())))
        counts += torch.bincount(indices.reshape(-1), minlength=k)
    model.train(was_training)
    # Every batch's values, added in batch order as one process adds them.
    every_record = sorted(record for rank_records in gather_objects(records, ctx) for record in rank_records)
    sse = elements = perplexity = perplexity_hard = psnr_sum = ssim_sum = 0.0
    for _, batch_sse, batch_elements, batch_perplexity, batch_hard, batch_psnr, batch_ssim in every_record:
        sse += batch_sse
        elements += batch_elements
        perplexity += batch_perplexity
        perplexity_hard += batch_hard
        psnr_sum += batch_psnr
        ssim_sum += batch_ssim
    all_reduce_sum(counts, ctx)
    n_batches = len(batches)
    probabilities = counts.double() / counts.sum()
    nonzero = probabilities[probabilities > 0]
    entropy = float(-(nonzero * nonzero.log()).sum())
    mse = sse / elements
    return {
        "mse": mse,
        "mse_01": mse / 4.0,
        "perplexity": perplexity / n_batches,
        "perplexity_hard": perplexity_hard / n_batches,
        "psnr": psnr_sum / len(dataset),
        "ssim": ssim_sum / len(dataset),
        "codes_used": int((counts > 0).sum()),
        "perplexity_hard_global": math.exp(entropy),
        "code_entropy_bits": entropy / math.log(2),
        "images": len(dataset),
        "code_counts": counts.cpu(),
    }


SPLIT_METRICS = ("mse", "mse_01", "psnr", "ssim", "perplexity", "perplexity_hard", "perplexity_hard_global",
                 "code_entropy_bits")


def split_results(metrics: dict, split: str, args, options: dict) -> dict:
    """The metrics of ``split`` as results.json (gmvq-train, the test split)
    and evaluation.json (gmvq-evaluate, any split) record them: one
    definition of the keys ("<split>_mse", "<split>_psnr", ..., codes_used)."""
    return {
        "pixel_range": "[-1, 1]",
        "psnr_ssim_convention": convention(),
        **{f"{split}_{name}": metrics[name] for name in SPLIT_METRICS},
        "codes_used": metrics["codes_used"],
        "codebook_size": args.codebook_size,
        f"{split}_images": metrics["images"],
        "quantizer": {"name": args.quantizer, "options": options},
    }


def test_results(metrics: dict, args, options: dict) -> dict:
    """``split_results`` of the test split."""
    return split_results(metrics, "test", args, options)
