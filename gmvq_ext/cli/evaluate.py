"""Re-evaluate a trained autoencoder from its checkpoint on a split (default: test).

    gmvq-evaluate --checkpoint runs/gmvq/checkpoint.pt [--split val] [--data-dir DIR] [--device cpu]

Prints the split's metrics as JSON (the same definitions and keys as
results.json: test_mse in [-1, 1] pixels, test_mse_01, test_psnr and
test_ssim (per image in [0, 1]), test_perplexity, test_code_entropy_bits,
codes_used, ...; "val_..." for --split val) and writes them to --out
(default: evaluation.json beside the checkpoint, evaluation_val.json for
another split). A folder of images is checked first, as training does.
Runs under torchrun too; rank 0 prints and writes. Opt-in: --fid-weights adds
rFID from a local Inception weights file, SHA-256 checked, never downloaded,
in one process (gmvq_ext/training/rfid.py; LPIPS: why not, there).
The checkpoint is read as plain data (torch.load with weights_only=True): a
damaged, foreign or tampered file ends the command with one line naming it,
and nothing inside it is run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data import SPLITS, DataError, DataSource, first_images
from ..files import write_json_atomic
from ..training import checkpoint as ckpt
from ..training import process_group
from ..training.config import quantizer_options
from ..training.metrics import evaluate, split_results
from ..training.rfid import INCEPTION_FILE, INCEPTION_SHA256_PREFIX, ReconstructionFID


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gmvq-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by gmvq_ext.train")
    p.add_argument("--split", default="test", choices=SPLITS,
                   help="default test; val needs a run with a validation split (--val-fraction, or a folder's)")
    p.add_argument("--data-dir", help="default: the --data-dir the model was trained with")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--batch-size", type=int, help="default: the training run's evaluation batch size")
    p.add_argument("--max-test-images", type=int, help="default: the training run's --max-test-images")
    p.add_argument("--all-test-images", action="store_true", help="ignore the run's --max-test-images")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--fid-weights", metavar="FILE",
                   help=f"add rFID (reconstructions against the split's images) with torch-fidelity's Inception "
                        f"weights from this local file ({INCEPTION_FILE}; its SHA-256 is checked; nothing is "
                        "downloaded; needs torch-fidelity); one process only")
    p.add_argument("--fid-weights-sha256", metavar="HEX",
                   help="the full SHA-256 --fid-weights must have (default: it must begin with the published "
                        f"prefix {INCEPTION_SHA256_PREFIX})")
    p.add_argument("--out", help="where to write the metrics JSON; default evaluation.json beside the checkpoint")
    return p


def main(argv=None) -> dict | None:
    options = build_parser().parse_args(argv)
    try:
        return run(options)
    except (DataError, FileNotFoundError, ValueError, KeyError, process_group.LostPeerError) as error:
        raise SystemExit(f"gmvq-evaluate: error: {error}") from error


def run(options) -> dict | None:
    state = ckpt.load(options.checkpoint)  # plain data only: a tampered file is refused, never run
    ctx = process_group.setup(options.device)
    return process_group.run_distributed(lambda ctx: evaluate_checkpoint(options, state, ctx), ctx)


def evaluate_checkpoint(options, state: dict, ctx: process_group.Context) -> dict | None:
    model, args = ckpt.restore_model(state, options.checkpoint, ctx.device)
    max_test_images = None if options.all_test_images else (options.max_test_images or args.max_test_images)
    batch_size = options.batch_size or args.eval_batch_size
    if options.fid_weights is not None and ctx.distributed:
        raise ValueError("--fid-weights runs in one process (its feature sums would be added in another order "
                         "across ranks); run gmvq-evaluate without torchrun")
    fid = (ReconstructionFID(options.fid_weights, ctx.device, options.fid_weights_sha256)
           if options.fid_weights is not None else None)
    datasets, skipped = DataSource.of_run(args, options.data_dir).open((options.split,), progress=ctx.is_main)
    dataset = first_images(datasets[options.split], max_test_images)
    metrics = evaluate(model, dataset, batch_size, ctx, options.num_workers,
                       each_batch=fid.update if fid is not None else None)

    results = None
    if ctx.is_main:
        results = {"checkpoint": str(options.checkpoint), "epoch": state["epoch"],
                   **split_results(metrics, options.split, args, quantizer_options(args)),
                   "skipped_images": len(skipped)}
        if fid is not None:
            results.update({f"{options.split}_rfid": fid.compute(), "rfid_weights_sha256": fid.sha256})
        name = "evaluation.json" if options.split == "test" else f"evaluation_{options.split}.json"
        out = Path(options.out) if options.out else Path(options.checkpoint).with_name(name)
        write_json_atomic(out, results)
        print(json.dumps(results, indent=2))
    return results


def command() -> None:
    """The console script gmvq-evaluate."""
    main()


if __name__ == "__main__":
    main()
