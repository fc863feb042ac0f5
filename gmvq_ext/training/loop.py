"""The training loop of ``gmvq-train`` (``python -m gmvq_ext.train``): ``run`` drives a ``Trainer``.

The run folder --out receives, from rank 0 only:
    checkpoint.pt      model, optimizer, scheduler, position, RNG states of every rank, args
                       (written atomically after every epoch, and at the step where a stop was requested)
    metrics.jsonl      one JSON object per epoch (training averages, validation/test metrics)
    tensorboard/       the same scalars for TensorBoard, plus the loss and learning rate every --log-every steps
    images/            recon_epochNNN.png, codes_epochNNN.png, curves.png (redrawn every epoch)
    results.json       final test metrics (MSE, PSNR, SSIM, perplexity, codes used, entropy), the
                       images skipped as unreadable (--skip-bad-images), throughput, quantizer, arguments

Reproducibility: the data order is a pure function of (seed, epoch) and every
RNG state is checkpointed, so an interrupted and resumed CPU run ends with the
same weights and metrics as an uninterrupted one, from an epoch's checkpoint
or from one taken mid-epoch.

Host reads: the training step reads nothing from the device. Its metrics are
summed on the device (step_metrics.py) and read every --log-every steps,
where the loop also checks for a stop request and for non-finite terms.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..data import collate_images
from ..files import write_json_atomic
from ..objective import latent_fraction, per_pixel_bound
from ..quantizers.backend import has_kernel
from . import checkpoint as ckpt
from . import process_group
from .config import WARMUP_START_FACTOR, as_saved, build_model, quantizer_options
from .lr_schedule import warmup_cosine
from .metrics import evaluate, test_results
from .resume import check_same_run, open_metrics, starting_state
from .run_data import open_run_data
from .sampling import training_batches
from .step_metrics import StepMetrics
from .stopping import StopRequests
from .visuals import save_code_histogram, save_reconstruction_grid, save_training_curves

RECONSTRUCTION_IMAGES = 32
# Test hooks. "STEP:TERM" makes TERM (reconstruction, latent, KL or gradient) non-finite at that step;
# "STEP[:RANK]" makes the process (of that rank only) send itself SIGTERM after that step.
INJECT_NONFINITE_ENV = "GMVQ_TEST_INJECT_NONFINITE"
SIGNAL_AT_STEP_ENV = "GMVQ_TEST_SIGNAL_AT_STEP"


class Preempted(Exception):
    """The run stopped on SIGTERM or SIGUSR1 after writing a checkpoint."""


class NonFiniteError(ValueError):
    """A training step produced a NaN or an infinity; no checkpoint holds it."""


@dataclass
class Position:
    """Where the run is: complete epochs, optimiser steps, the current epoch's
    batches done, training seconds so far, steps skipped (--skip-nonfinite)."""
    epoch: int = 0
    step: int = 0
    batches_done: int = 0
    train_seconds: float = 0.0
    skipped: int = 0


def run(args, ctx: process_group.Context) -> dict | None:
    """Train (continuing the checkpoint in --out where there is one), evaluate after every epoch, test at
    the end. Returns rank 0's results (None on other ranks, and when --stop-after-epoch ends the process
    early, as an interruption would)."""
    # Bitwise reproducibility (exact --resume) needs deterministic kernels, e.g.
    # for the scatter-add of codebook gradients; on the CPU they cost little.
    if ctx.device.type == "cpu" or args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    trainer = Trainer(args, ctx)
    last_epoch = args.epochs if args.stop_after_epoch is None else min(args.epochs, args.stop_after_epoch)
    with StopRequests() as stop:
        while trainer.position.epoch < last_epoch:
            trainer.train_epoch(stop)
            trainer.end_epoch()
            if stop.agreed(ctx):
                raise Preempted(f"stopped on {stop.signal_name or 'another rank'} after epoch "
                                f"{trainer.position.epoch}, checkpoint written; --resume continues it")
    if last_epoch < args.epochs:
        trainer.log(f"stopped after epoch {last_epoch} of {args.epochs}; continue with --resume")
        trainer.close()
        return None
    return trainer.test()


class Trainer:
    """One run's state (data, model, optimiser, schedule, position, step metrics, outputs) and its
    parts: an epoch of steps, the end of an epoch, the checkpoint, the final test."""

    def __init__(self, args, ctx: process_group.Context):
        self.args, self.ctx = args, ctx
        self.log = print if ctx.is_main else (lambda *a, **k: None)
        self.out = Path(args.out)
        self.checkpoint_path = self.out / ckpt.CHECKPOINT_NAME

        # ---- resume or start fresh: rank 0 reads the run folder, every rank gets its decision
        state = process_group.broadcast_object(
            starting_state(args, self.checkpoint_path) if ctx.is_main else None, ctx)
        if isinstance(state, Exception):
            raise state
        if state is not None:
            check_same_run(args, state["args"], state["world_size"], ctx.world_size)

        # ---- data: train, per-epoch evaluation (validation when held out, else test), test
        self.data = data = open_run_data(args, ctx, self.log)
        self.steps_per_epoch = len(data.train) // args.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(data.train)} training images are fewer than one batch of {args.batch_size}")
        self.total_steps = args.epochs * self.steps_per_epoch
        self.log(f"{args.dataset}: {len(data.train)} train, {len(data.evaluation)} {data.eval_split}, "
                 f"{len(data.test)} test images"
                 + (f" ({len(data.skipped)} unreadable skipped)" if data.skipped else "") + "; "
                 f"{self.steps_per_epoch} steps/epoch, {ctx.world_size} process(es) on {ctx.device}")

        # ---- model, optimizer, schedule (same initial weights on every rank)
        torch.manual_seed(args.seed)
        self.options = self.quantizer_settings(state)
        self.bare = build_model(args, self.options).to(ctx.device)
        kernels = "kernels" if has_kernel("quantize", ctx.device.type) else "the reference (no kernel for this device)"
        self.log(f"quantizer {args.quantizer} {self.options}; {sum(p.numel() for p in self.bare.parameters())} "
                 f"parameters; gmvq ops: {ctx.device.type} {kernels}")
        self.optimizer = torch.optim.AdamW(self.bare.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(
            self.total_steps, round(args.warmup_epochs * self.steps_per_epoch), WARMUP_START_FACTOR))
        self.position, self.metrics = Position(), StepMetrics(ctx.device)
        self.code_counts = torch.zeros(args.codebook_size, dtype=torch.int64, device=ctx.device)
        self.epoch_seconds = 0.0  # of the current epoch, before this process (a resumed epoch's earlier part)
        if state is not None:
            self.restore(state)
        else:
            ckpt.seed_everything(args.seed + ctx.rank)  # each rank its own noise stream
        self.model = self.bare
        if ctx.distributed:
            process_group.keep_gradient_strides(self.bare)
            self.model = DistributedDataParallel(
                self.bare, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        # --compile: the whole training forward (the quantizer's fused op included) as compiled graphs;
        # --precision bf16-mixed: autocast (the quantizers compute in float32 inside).
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16,
                                       enabled=args.precision == "bf16-mixed")

        self.writer = self.metrics_file = None
        if ctx.is_main:  # the run folder appears once data and model are ready
            from torch.utils.tensorboard import SummaryWriter

            (self.out / "images").mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.out / "tensorboard"),
                                        purge_step=self.position.step if state is not None else None)
            self.metrics_file = open_metrics(self.out / "metrics.jsonl", keep_epochs=self.position.epoch)
        self.fixed_images = torch.stack([data.evaluation[i]
                                         for i in range(min(RECONSTRUCTION_IMAGES, len(data.evaluation)))])
        self.inject = parse_injection(os.environ.get(INJECT_NONFINITE_ENV))
        self.signal_step = signal_at_step(os.environ.get(SIGNAL_AT_STEP_ENV), ctx.rank)

    def quantizer_settings(self, state: dict | None) -> dict:
        """This version's settings for the run's arguments; a resumed run is built as it was started,
        even where this version's defaults differ."""
        options = quantizer_options(self.args)
        if state is None:
            return options
        saved = as_saved(options, state.get("quantizer_options"))
        changed = {name: value for name, value in saved.items() if options.get(name) != value}
        if changed:
            self.log(f"resuming with the checkpoint's quantizer settings {changed} (this version's defaults: "
                     f"{ {name: options.get(name) for name in changed} })")
        return saved

    def restore(self, state: dict) -> None:
        """Weights, optimiser, schedule, position and RNG from a checkpoint, mid-epoch ones included."""
        ckpt.load_weights(self.bare, state, self.checkpoint_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        position = self.position = Position(state["epoch"], state["step"], 0, state["train_seconds"],
                                            state.get("skipped_steps", 0))
        if ckpt.mid_epoch(state):
            progress = state["epoch_progress"]
            position.batches_done = progress["batches"]
            self.metrics.load_state(progress["metrics"])
            self.code_counts.copy_(progress["code_counts"])
            self.epoch_seconds = progress["seconds"]
        ckpt.set_rng_state(state["rng"][self.ctx.rank])
        self.log(f"resumed from epoch {position.epoch} (step {position.step}"
                 + (f", {position.batches_done} batches into epoch {position.epoch + 1})"
                    if position.batches_done else ")"))

    def save_checkpoint(self, epoch_progress: dict | None) -> None:
        """Rank 0 writes the run's state at ``position`` (a collective: every rank calls it)."""
        rng_states = process_group.gather_objects(ckpt.rng_state(), self.ctx)
        if self.ctx.is_main:
            position = self.position
            ckpt.save_atomic({"model": self.bare.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "scheduler": self.scheduler.state_dict(), "epoch": position.epoch,
                              "step": position.step, "train_seconds": position.train_seconds, "rng": rng_states,
                              "args": vars(self.args), "quantizer_options": self.options,
                              "world_size": self.ctx.world_size, "skipped_steps": position.skipped,
                              "epoch_progress": epoch_progress}, self.checkpoint_path)

    def train_epoch(self, stop: StopRequests) -> None:
        """The current epoch's remaining steps; on an agreed stop request, a mid-epoch checkpoint and
        Preempted."""
        args, ctx, position = self.args, self.ctx, self.position
        self.model.train()
        batches = training_batches(len(self.data.train), args.batch_size, args.seed, position.epoch, ctx.rank,
                                   ctx.world_size)
        loader = DataLoader(self.data.train, collate_fn=collate_images, num_workers=args.num_workers,
                            batch_sampler=batches[position.batches_done:],
                            pin_memory=ctx.device.type == "cuda", generator=torch.Generator())
        if position.batches_done == 0:
            self.metrics.start_epoch()
            self.code_counts.zero_()
            self.epoch_seconds = 0.0
        started = time.perf_counter()
        bar = progress_bar(loader, f"epoch {position.epoch + 1}/{args.epochs}", ctx.is_main,
                           position.batches_done, self.steps_per_epoch)
        for images in bar:
            self.step(images.to(ctx.device, non_blocking=True))
            if position.step % args.log_every == 0:  # the only host reads of the loop
                self.report(bar)
                if stop.agreed(ctx) and position.batches_done < len(batches):
                    self.count_seconds(started)
                    self.save_checkpoint({"batches": position.batches_done, "metrics": self.metrics.state(),
                                          "code_counts": self.code_counts.cpu(), "seconds": self.epoch_seconds})
                    raise Preempted(f"stopped on {stop.signal_name or 'another rank'} at step {position.step} "
                                    f"(epoch {position.epoch + 1}), checkpoint written; --resume continues it")
        self.count_seconds(started)

    def count_seconds(self, started: float) -> None:
        elapsed = time.perf_counter() - started
        self.epoch_seconds += elapsed
        self.position.train_seconds += elapsed

    def step(self, images: torch.Tensor) -> None:
        """One optimiser step on ``images``; its metrics stay on the device."""
        args, position = self.args, self.position
        self.bare.quantizer.set_progress(position.step, self.total_steps)
        with self.autocast:
            reconstruction, indices, quantizer_loss, info = self.forward(images)
            mse = F.mse_loss(reconstruction, images)
            mse, quantizer_loss, info = self.inject.terms(position.step + 1, mse, quantizer_loss, info)
            # The negative bound per pixel-channel (gmvq_ext/objective.py): a weight of 1 means the paper's.
            loss = per_pixel_bound(mse, quantizer_loss, latent_fraction(images, indices), args.sigma_x2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.inject.gradient(position.step + 1, self.bare)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.bare.parameters() if p.grad is not None])
        scalars = {"loss": loss, "mse": mse, "grad_norm": grad_norm, **scalar_info(info)}
        # --skip-nonfinite: a host read every step, the price of deciding before the update.
        bad_terms = self.metrics.nonfinite_terms(scalars) if args.skip_nonfinite else []
        if not bad_terms:
            self.optimizer.step()
        self.scheduler.step()
        position.step += 1
        position.batches_done += 1
        if bad_terms:
            position.skipped += 1
            self.log(f"step {position.step}: the {' and '.join(bad_terms)} went non-finite; step skipped "
                     f"({position.skipped} of at most {args.skip_nonfinite})")
            if position.skipped > args.skip_nonfinite:
                raise NonFiniteError(f"step {position.step}: more than --skip-nonfinite {args.skip_nonfinite} "
                                     f"steps went non-finite (this time the {' and '.join(bad_terms)}); "
                                     "nothing after the last checkpoint was saved")
        else:
            self.metrics.add(scalars, position.step)
            self.code_counts += torch.bincount(indices.reshape(-1), minlength=args.codebook_size)
        if position.step == self.signal_step:
            os.kill(os.getpid(), signal.SIGTERM)

    def report(self, bar) -> None:
        """The last --log-every steps' means: checked for non-finite terms, shown, logged."""
        reading = self.metrics.read()
        check_finite(reading)
        window = reading.window_means
        bar.set_postfix(loss=f"{window['loss']:.4f}", mse=f"{window['mse']:.4f}",
                        ppl=f"{window.get('perplexity', float('nan')):.0f}")
        if self.writer is not None:
            self.writer.add_scalar("step/loss", window["loss"], self.position.step)
            self.writer.add_scalar("step/lr", self.scheduler.get_last_lr()[0], self.position.step)

    def end_epoch(self) -> None:
        """Average over steps and ranks, evaluate, checkpoint, and (rank 0) write the epoch's files."""
        args, ctx, position = self.args, self.ctx, self.position
        reading = self.metrics.read()
        check_finite(reading)
        train_metrics = mean_over_ranks(reading.epoch_means, ctx)
        process_group.all_reduce_sum(self.code_counts, ctx)
        train_metrics["codes_used"] = int((self.code_counts > 0).sum())
        process_group.broadcast_buffers(self.bare, ctx)  # evaluate rank 0's BatchNorm statistics everywhere
        eval_metrics = evaluate(self.bare, self.data.evaluation, args.eval_batch_size, ctx, args.num_workers)
        position.epoch, position.batches_done = position.epoch + 1, 0
        self.save_checkpoint(None)
        if ctx.is_main:
            split = self.data.eval_split
            record = {"epoch": position.epoch, "step": position.step, "lr": self.scheduler.get_last_lr()[0],
                      "epoch_seconds": self.epoch_seconds,
                      "images_per_second": self.steps_per_epoch * args.batch_size / self.epoch_seconds,
                      **{f"train/{k}": v for k, v in train_metrics.items()},
                      **{f"{split}/{k}": v for k, v in eval_metrics.items() if k != "code_counts"}}
            write_epoch_outputs(self.out, record, eval_metrics, split, position.epoch, self.writer,
                                self.metrics_file, self.fixed_images,
                                reconstruct(self.bare, self.fixed_images, ctx.device))
            self.log(f"epoch {position.epoch}: train mse {train_metrics['mse']:.5f} | {split} mse "
                     f"{eval_metrics['mse']:.5f} perplexity {eval_metrics['perplexity']:.1f} "
                     f"codes {eval_metrics['codes_used']} | {record['images_per_second']:.0f} img/s")
        process_group.barrier(ctx)

    def test(self) -> dict | None:
        """The final test evaluation: rank 0 writes and returns results.json's contents."""
        args, ctx, position = self.args, self.ctx, self.position
        process_group.broadcast_buffers(self.bare, ctx)
        test_metrics = evaluate(self.bare, self.data.test, args.eval_batch_size, ctx, args.num_workers)
        # Data-parallel ranks must hold identical weights; record each rank's checksum.
        checksums = process_group.gather_objects(parameter_checksum(self.bare), ctx)
        if len(set(checksums)) > 1:
            self.log(f"warning: ranks ended with different parameters: checksums {checksums}")
        if not ctx.is_main:
            return None
        results = {
            **test_results(test_metrics, args, self.options),
            "train_images": len(self.data.train),
            **self.data.skipped_record(),
            "epochs": args.epochs,
            "steps": position.step,
            "skipped_nonfinite_steps": position.skipped,
            "train_seconds": position.train_seconds,
            "images_per_second": (position.step * args.batch_size / position.train_seconds
                                  if position.train_seconds > 0 else None),
            "world_size": ctx.world_size,
            "rank_parameter_checksums": checksums,
            "device": str(ctx.device),
            "args": vars(args),
        }
        write_json_atomic(self.out / "results.json", results)
        self.close()
        self.log(f"test mse {results['test_mse']:.5f} ([-1,1] pixels; {results['test_mse_01']:.5f} in [0,1]), "
                 f"perplexity {results['test_perplexity']:.1f}, codes used {results['codes_used']}"
                 f"/{args.codebook_size} -> {self.out / 'results.json'}")
        return results

    def close(self) -> None:
        if self.ctx.is_main:
            self.metrics_file.close()
            self.writer.close()


# ----------------------------------------------------------------------------- helpers

def check_finite(reading) -> None:
    if reading.nonfinite_terms:
        raise NonFiniteError(
            f"step {reading.first_nonfinite_step}: the {' and '.join(reading.nonfinite_terms)} went non-finite "
            f"(NaN or inf); nothing after the last checkpoint was saved, and --resume continues from it "
            f"(a lower --lr, or fp32, usually avoids it)")


def write_epoch_outputs(out: Path, record: dict, eval_metrics: dict, eval_split: str, epoch: int, writer,
                        metrics_file, fixed_images, reconstructions) -> None:
    """Rank 0's files of one epoch: pictures, metrics.jsonl, curves, TensorBoard."""
    save_reconstruction_grid(fixed_images, reconstructions, out / "images" / f"recon_epoch{epoch:03d}.png")
    save_code_histogram(eval_metrics["code_counts"], out / "images" / f"codes_epoch{epoch:03d}.png",
                        f"{eval_split} code usage, epoch {epoch}")
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    save_training_curves(out / "metrics.jsonl", out / "images" / "curves.png")  # every epoch so far
    for key, value in record.items():
        if key != "epoch":
            writer.add_scalar(key, value, epoch)


def mean_over_ranks(means: dict[str, float], ctx) -> dict[str, float]:
    """The ranks' means, averaged (each rank took the same number of steps)."""
    names = sorted(means)
    if not ctx.distributed or not names:
        return dict(means)
    totals = torch.tensor([means[name] for name in names], dtype=torch.float64, device=ctx.device)
    process_group.all_reduce_sum(totals, ctx)
    return {name: value / ctx.world_size for name, value in zip(names, totals.tolist())}


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in state_dict order."""
    import hashlib

    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def scalar_info(info: dict) -> dict:
    """The quantizer's scalar diagnostics (perplexity, loss terms, ...) as 0-dim tensors."""
    return {name: value for name, value in info.items() if torch.is_tensor(value) and value.numel() == 1}


def progress_bar(iterable, description: str, enabled: bool, done: int, total: int):
    import sys

    from tqdm import tqdm

    return tqdm(iterable, desc=description, disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0, initial=done, total=total)


@torch.no_grad()
def reconstruct(model, images, device) -> torch.Tensor:
    was_training = model.training
    model.eval()
    reconstructions = model(images.to(device))[0].cpu()
    model.train(was_training)
    return reconstructions


@dataclass
class NonFiniteInjection:
    """The test hook of INJECT_NONFINITE_ENV: at ``step``, ``term`` becomes NaN."""
    step: int = -1
    term: str = ""

    def terms(self, step: int, mse, quantizer_loss, info: dict):
        if step != self.step or self.term == "gradient":
            return mse, quantizer_loss, info
        nan = torch.full((), float("nan"), device=mse.device)
        if self.term == "reconstruction":
            return mse + nan, quantizer_loss, info
        key = {"latent": "loss/latent", "KL": "loss/kl_uniform"}[self.term]
        return mse, quantizer_loss + nan, {**info, key: info[key] + nan}

    def gradient(self, step: int, model: torch.nn.Module) -> None:
        if step == self.step and self.term == "gradient":
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))


def parse_injection(text: str | None) -> NonFiniteInjection:
    if not text:
        return NonFiniteInjection()
    step, _, term = text.partition(":")
    if term not in ("reconstruction", "latent", "KL", "gradient"):
        raise ValueError(f"{INJECT_NONFINITE_ENV}={text!r}: TERM is reconstruction, latent, KL or gradient")
    return NonFiniteInjection(int(step), term)


def signal_at_step(text: str | None, rank: int) -> int:
    """SIGNAL_AT_STEP_ENV's step for this rank, or -1."""
    if not text:
        return -1
    step, _, only_rank = text.partition(":")
    return int(step) if not only_rank or int(only_rank) == rank else -1
