"""Command-line configuration of ``python -m gmvq_ext.train``, the paper's
defaults (in one place) and building the model an argument set describes."""

from __future__ import annotations

import argparse
import inspect

from ..data import DATASETS
from ..quantizers import QUANTIZERS

# The paper's settings (Yan et al. 2024, section 5): AdamW, batch 256,
# 10 warmup epochs from factor 0.2 then cosine, 100 epochs, K = 1024, D = 64.
# The paper gives no weight decay; AdamW's own default (0.01) is kept.
PAPER_DEFAULTS = {
    "cifar10": dict(lr=1e-2, epochs=100, batch_size=256, warmup_epochs=10, codebook_size=1024, dim=64,
                    weight_decay=0.01),
    "celeba": dict(lr=1e-4, epochs=100, batch_size=256, warmup_epochs=10, codebook_size=1024, dim=64,
                   weight_decay=0.01),
}
WARMUP_START_FACTOR = 0.2
QUANTIZER_NAMES = tuple(QUANTIZERS)  # the registry of gmvq_ext.quantizers: every quantizer by name
# Quantizer options settable from the command line; None means "the quantizer's default".
# --beta is GM-VQ's entropy weight and, for the VQ-VAE family, the commitment
# weight (the "beta" of the VQ-VAE paper): the first accepted name is used.
QUANTIZER_OPTIONS = {"beta": ("beta", "commitment"), "gamma": ("gamma",), "sigma_z2": ("sigma_z2",)}
# Arguments that define a run: a --resume with different values would not continue it.
RUN_DEFINING = ("dataset", "quantizer", "batch_size", "lr", "weight_decay", "warmup_epochs", "seed",
                "codebook_size", "dim", "beta", "gamma", "sigma_z2", "quantizer_option", "max_train_images",
                "val_fraction", "precision")
# The value of a run-defining argument in checkpoints written before it existed.
RUN_DEFINING_BEFORE = {"precision": "fp32"}
PRECISIONS = ("fp32", "bf16-mixed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gmvq_ext.train",
                                description="Train a vector-quantized autoencoder (GM-VQ or a baseline).")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-dir", default="./data",
                   help="folder holding cifar-10-batches-py/ or img_align_celeba/, or that folder itself "
                        "(celeba: also any folder of images); default ./data")
    p.add_argument("--download", action="store_true",
                   help="cifar10: fetch the official archive into --data-dir when its batches are missing "
                        "(checksum-verified); celeba: explains how to get it (no plain-URL download exists)")
    p.add_argument("--quantizer", default="gmvq", choices=QUANTIZER_NAMES)
    p.add_argument("--out", required=True, help="run folder: checkpoint, metrics, pictures, results.json")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run in --out up to --epochs")
    resume.add_argument("--auto-resume", action="store_true",
                        help="continue the run in --out when it holds a checkpoint, else start it (for "
                             "schedulers and torchrun --max-restarts: a restarted job picks up where it stopped)")
    p.add_argument("--epochs", type=int, help="default: the paper's 100")
    p.add_argument("--stop-after-epoch", type=int,
                   help="end the process after this epoch (checkpoint written, no results.json), e.g. to split "
                        "a long run across jobs; --resume continues it to --epochs exactly")
    p.add_argument("--batch-size", type=int, help="global batch (split over torchrun ranks); default 256")
    p.add_argument("--lr", type=float, help="peak learning rate; default 1e-2 cifar10, 1e-4 celeba")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay; default 0.01")
    p.add_argument("--warmup-epochs", type=float, help="linear warmup from 0.2x; default 10")
    p.add_argument("--codebook-size", type=int, help="K; default 1024")
    p.add_argument("--dim", type=int, help="code dimension D; default 64")
    p.add_argument("--beta", type=float, help="GM-VQ: weight of KL(q_bar || uniform) (default 1; gmvq-entropy 5); "
                                              "VQ-VAE family: commitment weight (default 0.25)")
    p.add_argument("--gamma", type=float, help="GM-VQ: weight of the latent term")
    p.add_argument("--sigma-z2", type=float, help="GM-VQ: prior variance sigma_z^2")
    p.add_argument("--quantizer-option", action="append", default=[], metavar="NAME=VALUE",
                   help="any other keyword of the quantizer's constructor, e.g. kl_weight=5e-4, "
                        "replace_after=50, hard=False (repeatable; values parsed as Python literals)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...; default cuda when available")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels on CUDA too (always on for CPU runs)")
    p.add_argument("--compile", action="store_true",
                   help="train the model (quantizer included) under torch.compile: the fused GM-VQ kernel runs "
                        "inside the compiled graph (evaluation stays eager)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16-mixed: encoder and decoder under bfloat16 autocast; the quantizers keep their "
                        "statistics in float32")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="under torchrun: how long a collective may wait for the other processes before this "
                        "one exits with an error (a lost or hung peer); default 300")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="cifar10: hold out this fraction of train for validation (celeba uses its official "
                        "valid split); per-epoch evaluation uses validation when present, else test")
    p.add_argument("--max-train-images", type=int, help="use only the first N training images")
    p.add_argument("--max-test-images", type=int, help="evaluate on only the first N test/validation images")
    p.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in PAPER_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    for name in ("epochs", "batch_size", "eval_batch_size", "codebook_size", "dim"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("max_train_images", "max_test_images", "stop_after_epoch"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.dist_timeout > 0:
        parser.error(f"--dist-timeout must be positive, got {args.dist_timeout}")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_epochs < 0 or args.num_workers < 0:
        parser.error("--lr must be positive and --weight-decay, --warmup-epochs, --num-workers non-negative")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    return args


def quantizer_options(args) -> dict:
    """Keyword options for ``build_quantizer`` from ``args``: the options given
    on the command line (each must be one the quantizer accepts) and the seed."""
    accepted = quantizer_keywords(QUANTIZERS[args.quantizer])
    options = {}
    for name, keywords in QUANTIZER_OPTIONS.items():
        value = getattr(args, name)
        if value is None:
            continue
        keyword = next((k for k in keywords if k in accepted), None)
        if keyword is None:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to the {args.quantizer} quantizer")
        options[keyword] = value
    for item in getattr(args, "quantizer_option", None) or []:
        keyword, value = parse_option(item)
        if keyword not in accepted or keyword in ("dim", "codebook_size"):
            raise ValueError(f"--quantizer-option {keyword}: the {args.quantizer} quantizer takes "
                             f"{sorted(accepted - {'dim', 'codebook_size'})}")
        options[keyword] = value
    if "seed" in accepted:
        options["seed"] = args.seed  # the quantizer's own (Philox) noise key
    return options


def quantizer_keywords(cls) -> set[str]:
    """Constructor keywords of a quantizer class, following ``**options`` to its base classes."""
    keywords = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters
        keywords |= {n for n, p in parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD
                     and p.kind is not p.VAR_POSITIONAL}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    return keywords


def parse_option(item: str) -> tuple[str, object]:
    import ast

    keyword, separator, text = item.partition("=")
    if not separator or not keyword:
        raise ValueError(f"--quantizer-option expects NAME=VALUE, got {item!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word such as full or scalar
    return keyword.strip(), value


def build_model(args, options: dict):
    """The autoencoder of ``args`` (dataset, quantizer, K, D) with quantizer ``options``."""
    from ..models import build_autoencoder
    from ..quantizers import build_quantizer

    quantizer = build_quantizer(args.quantizer, codebook_size=args.codebook_size, dim=args.dim, **options)
    return build_autoencoder(args.dataset, quantizer)
