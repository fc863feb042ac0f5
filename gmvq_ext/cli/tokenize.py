"""Write the code map of every image of a split with a trained model.

    gmvq-tokenize --checkpoint runs/gmvq/checkpoint.pt --split train --out codes.npy

--out receives a NumPy array (N, H', W') (``numpy.load``): row i holds the
codes of image i of the split in gmvq_ext.data's order (CIFAR-10: the batch
files in order, minus the run's --val-fraction hold-out for train/val;
CelebA: sorted file names of the split; a folder: sorted relative paths of
the split, less the files that fail the check with --skip-bad-images). Its dtype is int16 when the codebook
has at most 32768 codes, else int32 (the API's int64 would double or
quadruple the size of a file of 200k CelebA code maps). The file is written
under a temporary name and renamed when complete; an existing --out is an
error unless --overwrite is given. Single process (see gmvq_ext.tokenizer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from ..data import SPLITS, DataError, DataSource, collate_images, first_images
from ..files import atomic_path
from ..tokenizer import Tokenizer
from ..training.sampling import evaluation_batches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gmvq-tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by gmvq_ext.train")
    p.add_argument("--out", required=True, help="the .npy file to write (N, H', W')")
    p.add_argument("--split", default="train", choices=SPLITS,
                   help="default train; val needs a run trained with --val-fraction (cifar10)")
    p.add_argument("--data-dir", help="default: the --data-dir the model was trained with")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-images", type=int, help="only the first N images of the split")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    return p


def main(argv=None) -> Path:
    parser = build_parser()
    options = parser.parse_args(argv)
    for name in ("batch_size", "max_images"):
        value = getattr(options, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if options.num_workers < 0:
        parser.error(f"--num-workers must be non-negative, got {options.num_workers}")
    try:
        return run(options)
    except (DataError, FileExistsError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"gmvq-tokenize: error: {error}") from error


def run(options) -> Path:
    out = Path(options.out)
    if out.exists() and not options.overwrite:
        raise FileExistsError(f"--out {str(out)!r} already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a folder; give a file name such as codes.npy")
    tokenizer = Tokenizer.from_checkpoint(options.checkpoint, device=options.device)
    run_args = tokenizer.run_args
    data_dir = options.data_dir or run_args["data_dir"]
    datasets, _ = DataSource.of_run(run_args, data_dir).open((options.split,))
    dataset = first_images(datasets[options.split], options.max_images)
    if len(dataset) == 0:
        raise ValueError(f"the {options.split} split of {str(data_dir)!r} holds no images"
                         + (" (the run was trained without --val-fraction)" if options.split == "val" else ""))
    dtype = np.int16 if tokenizer.codebook_size <= 2**15 else np.int32
    shape = (len(dataset), *tokenizer.code_shape)
    loader = DataLoader(dataset, batch_sampler=evaluation_batches(len(dataset), options.batch_size),
                        collate_fn=collate_images, num_workers=options.num_workers,
                        pin_memory=tokenizer.device.type == "cuda")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_codes_atomic(out, shape, dtype, (tokenizer.encode(images) for images in loader), options.split)
    print(f"wrote the codes of {shape[0]} {options.split} images, {shape} {np.dtype(dtype).name} "
          f"(codebook of {tokenizer.codebook_size}), to {str(out)!r}", file=sys.stderr)
    return out


def write_codes_atomic(out: Path, shape: tuple, dtype, batches, split: str) -> None:
    """Fill a memory-mapped .npy beside ``out`` batch by batch (progress bar on
    stderr), then rename it to ``out``; nothing is left behind on failure."""
    from tqdm import tqdm

    with atomic_path(out) as temporary:
        codes = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
        written = 0
        with tqdm(total=shape[0], desc=f"tokenizing {split}", unit="img", file=sys.stderr,
                  dynamic_ncols=True, mininterval=1.0) as bar:
            for batch in batches:
                codes[written:written + len(batch)] = batch.cpu().numpy()
                written += len(batch)
                bar.update(len(batch))
        if written != shape[0]:
            raise RuntimeError(f"encoded {written} images, expected {shape[0]}")
        codes.flush()
        del codes  # close the memory map before the rename


def command() -> None:
    """The console script gmvq-tokenize."""
    main()


if __name__ == "__main__":
    main()
