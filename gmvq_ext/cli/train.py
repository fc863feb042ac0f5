"""Train a vector-quantized autoencoder (GM-VQ or a baseline) on CIFAR-10, CelebA or a folder of images.

    gmvq-train --dataset cifar10 --data-dir DATA --quantizer gmvq --out runs/gmvq
    torchrun --nproc_per_node 4 -m gmvq_ext.train ...       # the same, data-parallel
    gmvq-train ... --out runs/gmvq --resume                 # continue up to --epochs
    gmvq-train --dataset folder --data-dir PHOTOS --image-size 64 --downsampling 8 --out runs/photos

Flags and the paper's defaults: gmvq_ext/training/config.py; the loop:
gmvq_ext/training/loop.py; exit statuses: gmvq_ext/training/stopping.py.
"""

from __future__ import annotations

import sys

import torch

from ..data import DataError
from ..files import WriteError
from ..training import process_group
from ..training.config import parse_args
from ..training.loop import Preempted, run
from ..training.stopping import EXIT_PREEMPTED


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        ctx = process_group.setup(args.device, args.dist_timeout)
        return process_group.run_distributed(lambda ctx: run(args, ctx), ctx)
    except Preempted as stopped:
        print(f"gmvq-train: {stopped}", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED) from None
    except (DataError, FileExistsError, FileNotFoundError, ValueError, WriteError,
            process_group.LostPeerError) as error:
        raise SystemExit(f"gmvq-train: error: {error}") from None
    finally:  # main() may be called in-process (tests, notebooks): leave global state as found
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def command() -> None:
    """The console script gmvq-train."""
    main()


if __name__ == "__main__":
    main()
