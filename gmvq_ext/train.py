"""Train a vector-quantized autoencoder (GM-VQ or a baseline) on CIFAR-10 or CelebA.

    python -m gmvq_ext.train --dataset cifar10 --data-dir DATA --quantizer gmvq --out runs/gmvq
    torchrun --nproc_per_node 4 -m gmvq_ext.train ...          # the same, data-parallel
    python -m gmvq_ext.train ... --out runs/gmvq --resume       # continue up to --epochs

Defaults are the paper's (gmvq_ext/training/config.py). The run folder --out
receives, from rank 0 only:
    checkpoint.pt      model, optimizer, scheduler, epoch, step, RNG states of every rank, args
                       (written atomically after every epoch)
    metrics.jsonl      one JSON object per epoch (training averages, validation/test metrics)
    tensorboard/       the same scalars for TensorBoard, plus per-step loss and learning rate
    images/            recon_epochNNN.png (labelled rows: originals over reconstructions), codes_epochNNN.png,
                       curves.png (train and evaluation MSE and perplexity per epoch, redrawn every epoch)
    results.json       final test metrics, throughput, quantizer and arguments

Reproducibility: the data order is a pure function of (seed, epoch) and every
RNG state is checkpointed, so an interrupted and resumed CPU run ends with the
same weights and metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .data import DataError, build_dataset, collate_images
from .download import ensure_dataset
from .quantizers.backend import has_kernel
from .training import checkpoint as ckpt
from .training import distributed
from .training.config import (RUN_DEFINING, RUN_DEFINING_BEFORE, WARMUP_START_FACTOR, build_model, parse_args,
                              quantizer_options)
from .training.evaluation import evaluate, test_results
from .training.sampling import training_batches
from .training.schedule import warmup_cosine
from .training.visuals import save_code_histogram, save_reconstruction_grid, save_training_curves

RECONSTRUCTION_IMAGES = 32


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        ctx = distributed.setup(args.device, args.dist_timeout)
        return distributed.run_distributed(lambda ctx: run(args, ctx), ctx)
    except (DataError, FileExistsError, FileNotFoundError, ValueError, distributed.LostPeerError) as error:
        raise SystemExit(f"gmvq_ext.train: error: {error}") from None
    finally:  # main() may be called in-process (tests, notebooks): leave global state as found
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def run(args, ctx: distributed.Context) -> dict | None:
    # Bitwise reproducibility (exact --resume) needs deterministic kernels, e.g.
    # for the scatter-add of codebook gradients; on the CPU they cost little.
    if ctx.device.type == "cpu" or args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    log = print if ctx.is_main else (lambda *a, **k: None)
    out = Path(args.out)
    checkpoint_path = out / ckpt.CHECKPOINT_NAME

    # ---- resume or start fresh: rank 0 reads the run folder, every rank gets its
    # decision (the other ranks need not see the same file system)
    state = distributed.broadcast_object(starting_state(args, checkpoint_path) if ctx.is_main else None, ctx)
    if isinstance(state, Exception):
        raise state
    if state is not None:
        check_same_run(args, state["args"], state["world_size"], ctx.world_size)

    # ---- data: train, per-epoch evaluation (validation when held out, else test), test
    if args.download and ctx.local_rank == 0:  # one download per machine; the other ranks wait
        ensure_dataset(args.dataset, args.data_dir)
    distributed.barrier(ctx)
    train_set = build_dataset(args.dataset, args.data_dir, "train", args.val_fraction, args.max_train_images)
    test_set = build_dataset(args.dataset, args.data_dir, "test", args.val_fraction, args.max_test_images)
    eval_split = "val" if args.val_fraction > 0 else "test"
    eval_set = (build_dataset(args.dataset, args.data_dir, "val", args.val_fraction, args.max_test_images)
                if eval_split == "val" else test_set)
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch
    log(f"{args.dataset}: {len(train_set)} train, {len(eval_set)} {eval_split}, {len(test_set)} test images; "
        f"{steps_per_epoch} steps/epoch, {ctx.world_size} process(es) on {ctx.device}")

    # ---- model, optimizer, schedule (same initial weights on every rank)
    torch.manual_seed(args.seed)
    options = quantizer_options(args)
    model = build_model(args, options).to(ctx.device)
    kernels = "kernels" if has_kernel("quantize", ctx.device.type) else "the reference (no kernel for this device)"
    log(f"quantizer {args.quantizer} {options}; {sum(p.numel() for p in model.parameters())} parameters; "
        f"gmvq ops: {ctx.device.type} {kernels}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps, WARMUP_START_FACTOR))
    start_epoch, step, train_seconds = 0, 0, 0.0
    if state is not None:
        ckpt.load_weights(model, state, checkpoint_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, train_seconds = state["epoch"], state["step"], state["train_seconds"]
        ckpt.set_rng_state(state["rng"][ctx.rank])
        log(f"resumed from epoch {start_epoch} (step {step})")
    else:
        ckpt.seed_everything(args.seed + ctx.rank)  # each rank its own noise stream
    bare = model
    if ctx.distributed:
        distributed.keep_gradient_strides(model)
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    # --compile: the whole training forward (the quantizer's fused op included) as compiled graphs;
    # --precision bf16-mixed: autocast (the quantizers compute in float32 inside).
    forward = torch.compile(model) if args.compile else model
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")

    writer = metrics_file = None
    if ctx.is_main:  # the run folder appears once data and model are ready
        from torch.utils.tensorboard import SummaryWriter

        (out / "images").mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=step if state is not None else None)
        metrics_file = open_metrics(out / "metrics.jsonl", keep_epochs=start_epoch)
    fixed_images = torch.stack([eval_set[i] for i in range(min(RECONSTRUCTION_IMAGES, len(eval_set)))])

    # ---- training (--stop-after-epoch ends the process early, as an interruption would)
    last_epoch = args.epochs if args.stop_after_epoch is None else min(args.epochs, args.stop_after_epoch)
    for epoch in range(start_epoch, last_epoch):
        model.train()
        loader = DataLoader(train_set, collate_fn=collate_images, num_workers=args.num_workers,
                            batch_sampler=training_batches(len(train_set), args.batch_size, args.seed, epoch,
                                                           ctx.rank, ctx.world_size),
                            pin_memory=ctx.device.type == "cuda", generator=torch.Generator())
        sums, code_counts = {}, torch.zeros(args.codebook_size, dtype=torch.int64, device=ctx.device)
        started = time.perf_counter()
        bar = progress_bar(loader, f"epoch {epoch + 1}/{args.epochs}", ctx.is_main)
        for images in bar:
            images = images.to(ctx.device, non_blocking=True)
            bare.quantizer.set_progress(step, total_steps)
            with autocast:
                reconstruction, indices, quantizer_loss, info = forward(images)
                mse = F.mse_loss(reconstruction, images)
                loss = mse + quantizer_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1

            scalars = {"loss": loss.detach(), "mse": mse.detach(), **scalar_info(info)}
            for name, value in scalars.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            code_counts += torch.bincount(indices.reshape(-1), minlength=args.codebook_size)
            if writer is not None and step % 10 == 0:
                writer.add_scalar("step/loss", float(loss.detach()), step)
                writer.add_scalar("step/lr", scheduler.get_last_lr()[0], step)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", mse=f"{float(mse.detach()):.4f}",
                            ppl=f"{float(info['perplexity']):.0f}")
        epoch_seconds = time.perf_counter() - started
        train_seconds += epoch_seconds

        # ---- end of epoch: average over steps and ranks, evaluate, pictures, checkpoint
        train_metrics = average_over_ranks(sums, steps_per_epoch, ctx)
        distributed.all_reduce_sum(code_counts, ctx)
        train_metrics["codes_used"] = int((code_counts > 0).sum())
        distributed.broadcast_buffers(bare, ctx)  # evaluate rank 0's BatchNorm statistics everywhere
        eval_metrics = evaluate(bare, eval_set, args.eval_batch_size, ctx, args.num_workers)
        rng_states = distributed.gather_objects(ckpt.rng_state(), ctx)
        if ctx.is_main:
            record = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0],
                      "epoch_seconds": epoch_seconds,
                      "images_per_second": steps_per_epoch * args.batch_size / epoch_seconds,
                      **{f"train/{k}": v for k, v in train_metrics.items()},
                      **{f"{eval_split}/{k}": v for k, v in eval_metrics.items() if k != "code_counts"}}
            reconstructions = reconstruct(bare, fixed_images, ctx.device)
            save_reconstruction_grid(fixed_images, reconstructions, out / "images" / f"recon_epoch{epoch + 1:03d}.png")
            save_code_histogram(eval_metrics["code_counts"], out / "images" / f"codes_epoch{epoch + 1:03d}.png",
                                f"{eval_split} code usage, epoch {epoch + 1}")
            ckpt.save_atomic({"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step,
                              "train_seconds": train_seconds, "rng": rng_states, "args": vars(args),
                              "quantizer_options": options, "world_size": ctx.world_size},
                             checkpoint_path)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            save_training_curves(out / "metrics.jsonl", out / "images" / "curves.png")  # every epoch so far
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch + 1)
            log(f"epoch {epoch + 1}: train mse {train_metrics['mse']:.5f} | {eval_split} mse "
                f"{eval_metrics['mse']:.5f} perplexity {eval_metrics['perplexity']:.1f} "
                f"codes {eval_metrics['codes_used']} | {record['images_per_second']:.0f} img/s")
        distributed.barrier(ctx)

    if last_epoch < args.epochs:
        log(f"stopped after epoch {last_epoch} of {args.epochs}; continue with --resume")
        if ctx.is_main:
            metrics_file.close()
            writer.close()
        return None

    # ---- final test evaluation
    distributed.broadcast_buffers(bare, ctx)
    test_metrics = evaluate(bare, test_set, args.eval_batch_size, ctx, args.num_workers)
    # Data-parallel ranks must hold identical weights; record each rank's checksum.
    checksums = distributed.gather_objects(parameter_checksum(bare), ctx)
    if len(set(checksums)) > 1:
        log(f"warning: ranks ended with different parameters: checksums {checksums}")
    results = None
    if ctx.is_main:
        results = {
            **test_results(test_metrics, args, options),
            "train_images": len(train_set),
            "epochs": args.epochs,
            "steps": step,
            "train_seconds": train_seconds,
            "images_per_second": step * args.batch_size / train_seconds if train_seconds > 0 else None,
            "world_size": ctx.world_size,
            "rank_parameter_checksums": checksums,
            "device": str(ctx.device),
            "args": vars(args),
        }
        ckpt.write_json_atomic(out / "results.json", results)
        metrics_file.close()
        writer.close()
        log(f"test mse {results['test_mse']:.5f} ([-1,1] pixels; {results['test_mse_01']:.5f} in [0,1]), "
            f"perplexity {results['test_perplexity']:.1f}, codes used {results['codes_used']}"
            f"/{args.codebook_size} -> {out / 'results.json'}")
    return results


# ----------------------------------------------------------------------------- helpers

def starting_state(args, checkpoint_path: Path):
    """The checkpoint to continue (None: start fresh), or the error to raise on every rank.

    --resume needs a checkpoint; --auto-resume takes one when it is there (a
    restarted torchrun worker continues its run); without either, an
    existing run is never overwritten."""
    exists = checkpoint_path.exists()
    if args.resume and not exists:
        return FileNotFoundError(f"--resume: no checkpoint at {str(checkpoint_path)!r}")
    if not (args.resume or args.auto_resume):
        if exists:
            return FileExistsError(f"{str(checkpoint_path.parent)!r} already holds a run; pass --resume or "
                                   "--auto-resume, or choose another --out")
        return None
    if not exists:
        return None
    try:
        state = ckpt.load(checkpoint_path)
    except (OSError, RuntimeError, ValueError) as error:  # ckpt.load names the file
        return error
    # --auto-resume of a finished run redoes only the final evaluation (a
    # restart may have come after the last checkpoint but before results.json).
    if state["epoch"] > args.epochs or (state["epoch"] == args.epochs and not args.auto_resume):
        return ValueError(f"the checkpoint in {str(checkpoint_path)!r} is at epoch {state['epoch']}, "
                          f"already >= --epochs {args.epochs}; ask for more epochs")
    return state


def check_same_run(args, saved: dict, saved_world_size: int, world_size: int) -> None:
    """A resumed run must describe the run it continues (only --epochs and the
    machinery such as --device or --num-workers may change)."""
    def saved_value(name):
        return saved.get(name, RUN_DEFINING_BEFORE.get(name))

    different = [f"--{name.replace('_', '-')} {getattr(args, name)!r} (checkpoint: {saved_value(name)!r})"
                 for name in RUN_DEFINING if getattr(args, name) != saved_value(name)]
    if different:
        raise ValueError("resuming with settings that differ from the checkpoint's: " + ", ".join(different))
    if args.epochs != saved["epochs"]:
        print(f"warning: --epochs {args.epochs} differs from the checkpoint's {saved['epochs']}: the learning-rate "
              "and temperature schedules stretch to the new length, so this is not the original run continued",
              file=sys.stderr)
    if saved_world_size != world_size:
        raise ValueError(f"resuming on {world_size} process(es), but the checkpoint was written by "
                         f"{saved_world_size}: the data shards and RNG streams would differ")


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in state_dict order."""
    import hashlib

    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def scalar_info(info: dict) -> dict:
    """The quantizer's scalar diagnostics (perplexity, loss terms, ...)."""
    return {name: value for name, value in info.items()
            if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1)}


def average_over_ranks(sums: dict, steps: int, ctx) -> dict:
    names = sorted(sums)
    totals = torch.tensor([sums[name] for name in names], dtype=torch.float64, device=ctx.device)
    distributed.all_reduce_sum(totals, ctx)
    return {name: value / (steps * ctx.world_size) for name, value in zip(names, totals.tolist())}


def progress_bar(iterable, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, desc=description, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


@torch.no_grad()
def reconstruct(model, images, device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    reconstructions = model(images.to(device))[0].cpu()
    model.train(was_training)
    return reconstructions


def open_metrics(path: Path, keep_epochs: int):
    """metrics.jsonl for appending, keeping only the epochs a resumed checkpoint covers."""
    kept = []
    if keep_epochs > 0 and path.exists():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] <= keep_epochs]
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


if __name__ == "__main__":
    main()
