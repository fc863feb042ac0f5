"""The training run's configuration: the paper's defaults (in one place), the
command line's flags in groups, and building the model a configuration describes.

The flags come in five groups. The first three (data, model, optimisation)
say what is trained: a ``--resume`` must repeat them, and RUN_DEFINING is
derived from those groups, not listed by hand. The flags marked
``may_change`` among them (where the data lives, how many epochs, how much is
evaluated) may differ on resume. The last two groups (run folder, machinery)
say how and where the run happens."""

from __future__ import annotations

import argparse
import ast
import inspect

from ..data import DATASETS, IMAGE_SIZE
from ..models import DOWNSAMPLING_CHOICES, LATENT_DOWNSAMPLING, image_size_problem
from ..objective import DEFAULT_SIGMA_X2
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
# A folder of photographs is trained like CelebA, the paper's data set of photographs.
PAPER_DEFAULTS["folder"] = PAPER_DEFAULTS["celeba"]
FOLDER_ONLY_FLAGS = ("image_size", "split_file", "skip_bad_images")
WARMUP_START_FACTOR = 0.2
QUANTIZER_NAMES = tuple(QUANTIZERS)  # the registry of gmvq_ext.quantizers: every quantizer by name
# Flags that set one keyword of the quantizer's constructor (None: the quantizer's default).
QUANTIZER_FLAGS = ("beta", "gamma", "sigma_z2", "noise_scale", "commitment")
# The value of a run-defining argument in checkpoints written before the flag existed.
RUN_DEFINING_BEFORE = {"precision": "fp32", "commitment": None, "image_size": None, "split_file": None,
                       "skip_bad_images": False, "downsampling": LATENT_DOWNSAMPLING,
                       # Runs before --sigma-x2 trained another objective (a plain MSE beside the quantizer's
                       # loss in other units): they cannot be continued by this version.
                       "sigma_x2": "none (an objective before the ALBO's units; continue it with gmvq_ext 0.1)"}
PRECISIONS = ("fp32", "bf16-mixed")


class TrainingParser(argparse.ArgumentParser):
    """An ArgumentParser whose flags are added through ``group``, which
    records the ones that define the run."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.run_defining: list[str] = []

    def group(self, title: str, description: str, defines_run: bool) -> "FlagGroup":
        return FlagGroup(self, self.add_argument_group(title, description), defines_run)


class FlagGroup:
    """Adds flags to one argument group; in a run-defining group, a flag passed
    ``may_change=True`` is left out of the parser's run_defining list."""

    def __init__(self, parser: TrainingParser, arguments, defines_run: bool):
        self.parser, self.arguments, self.defines_run = parser, arguments, defines_run

    def __call__(self, *flags, may_change: bool = False, **kwargs):
        return self._record(self.arguments.add_argument(*flags, **kwargs), may_change)

    def exclusive(self):
        """A function adding flags of which at most one may be given."""
        exclusive = self.arguments.add_mutually_exclusive_group()
        return lambda *flags, may_change=False, **kwargs: self._record(
            exclusive.add_argument(*flags, **kwargs), may_change)

    def _record(self, action, may_change: bool):
        if self.defines_run and not may_change:
            self.parser.run_defining.append(action.dest)
        return action


def build_parser() -> TrainingParser:
    p = TrainingParser(prog="gmvq-train",
                       description="Train a vector-quantized autoencoder (GM-VQ or a baseline).")
    data = p.group("data", "what is trained on", defines_run=True)
    data("--dataset", required=True, choices=DATASETS)
    data("--data-dir", default="./data", may_change=True,
         help="folder holding cifar-10-batches-py/ or img_align_celeba/, or that folder itself "
              "(celeba: also any folder of images; folder: the folder of images, subfolders included); "
              "default ./data")
    data("--download", action="store_true", may_change=True,
         help="cifar10: fetch the official archive into --data-dir when its batches are missing "
              "(checksum-verified); celeba: explains how to get it (no plain-URL download exists)")
    data("--val-fraction", type=float, default=0.0,
         help="cifar10: hold out this fraction of train for validation (celeba uses its official valid "
              "split); per-epoch evaluation uses validation when present, else test")
    data("--image-size", type=int, metavar="S",
         help="folder (required): images are center-cropped to their largest square and resized to S x S; "
              "S must be a multiple of --downsampling (the error names the sizes that work)")
    data("--split-file", metavar="FILE",
         help="folder: '<relative path> <train|val|test>' per line, instead of the split by the hash of each "
              "file's path (80/10/10); only the files it names are used")
    data("--skip-bad-images", action="store_true",
         help="folder: leave out files that fail the check before training (named and counted in the log and "
              "results.json) instead of stopping with an error naming the first")
    data("--max-train-images", type=int, help="use only the first N training images")
    data("--max-test-images", type=int, may_change=True,
         help="evaluate on only the first N test/validation images")

    model = p.group("model", "the autoencoder and its quantizer", defines_run=True)
    model("--quantizer", default="gmvq", choices=QUANTIZER_NAMES)
    model("--downsampling", type=int, default=LATENT_DOWNSAMPLING, choices=DOWNSAMPLING_CHOICES,
          help="the latent grid is the image size divided by this (one more stride-2 stage per factor of 2 "
               "beyond 4); default 4, the paper's")
    model("--codebook-size", type=int, help="K; default 1024")
    model("--dim", type=int, help="code dimension D; default 64")
    model("--sigma-x2", type=float, default=DEFAULT_SIGMA_X2,
          help="the decoder's variance sigma_x^2: the loss is MSE / (2 sigma_x^2) + (latent vectors / pixel-channels) "
               "* the quantizer's loss per latent vector, the bound per pixel-channel (docs/math.md, Units of the "
               f"objective); default {DEFAULT_SIGMA_X2} (the reconstruction term is the plain MSE)")
    model("--beta", type=float,
          help="GM-VQ: weight of KL(q_bar || uniform); 1 is the ALBO (default 1; gmvq-entropy 5)")
    model("--gamma", type=float, help="GM-VQ: weight of the latent term; 1 is the ALBO (default 0.1)")
    model("--sigma-z2", type=float, help="GM-VQ: prior variance sigma_z^2 of the latent term (default 0.5)")
    model("--noise-scale", type=float,
          help="GM-VQ: training noise, times the paper's s = ||z - z_q|| / sqrt(2 sigma_z^2 D); 1 the paper's, "
               "0 none (default 0)")
    model("--commitment", type=float, help="VQ-VAE family: commitment weight (default 0.25)")
    model("--quantizer-option", action="append", default=[], metavar="NAME=VALUE",
          help="any other keyword of the quantizer's constructor, e.g. kl_weight=1, replace_after=50, "
               "hard=False (repeatable; values parsed as Python literals)")

    optimisation = p.group("optimisation", "how it is trained", defines_run=True)
    optimisation("--epochs", type=int, may_change=True, help="default: the paper's 100")
    optimisation("--batch-size", type=int, help="global batch (split over torchrun ranks); default 256")
    optimisation("--lr", type=float, help="peak learning rate; default 1e-2 cifar10, 1e-4 celeba")
    optimisation("--weight-decay", type=float, help="AdamW weight decay; default 0.01")
    optimisation("--warmup-epochs", type=float, help="linear warmup from 0.2x; default 10")
    optimisation("--seed", type=int, default=0)
    optimisation("--precision", choices=PRECISIONS, default="fp32",
                 help="bf16-mixed: encoder and decoder under bfloat16 autocast; the quantizers keep their "
                      "statistics in float32")

    folder = p.group("run folder", "where the run is kept, and continuing it", defines_run=False)
    folder("--out", required=True, help="run folder: checkpoint, metrics, pictures, results.json")
    resume = folder.exclusive()
    resume("--resume", action="store_true", help="continue the run in --out up to --epochs")
    resume("--auto-resume", action="store_true",
           help="continue the run in --out when it holds a checkpoint, else start it (for schedulers and "
                "torchrun --max-restarts: a restarted job picks up where it stopped)")
    folder("--stop-after-epoch", type=int,
           help="end the process after this epoch (checkpoint written, no results.json), e.g. to split a long "
                "run across jobs; --resume continues it to --epochs exactly")

    machinery = p.group("machinery", "how it runs (may change between a run and its resumption)",
                        defines_run=False)
    machinery("--device", default=None, help="cpu, cuda, cuda:1 ...; default cuda when available")
    machinery("--deterministic", action="store_true",
              help="deterministic kernels on CUDA too (always on for CPU runs)")
    machinery("--compile", action="store_true",
              help="train the model (quantizer included) under torch.compile: the fused GM-VQ kernel runs inside "
                   "the compiled graph (evaluation stays eager)")
    machinery("--num-workers", type=int, default=0, help="DataLoader worker processes")
    machinery("--eval-batch-size", type=int, help="default: --batch-size")
    machinery("--log-every", type=int, default=20, metavar="STEPS",
              help="read the training metrics from the device (progress bar, TensorBoard) every this many "
                   "steps; the steps between make no host read; default 20")
    machinery("--skip-nonfinite", type=int, default=0, metavar="N",
              help="skip (do not apply) up to N steps whose loss or gradient is NaN or inf, each counted and logged, "
                   "as mixed-precision trainers do; this reads one flag from the device every step. Default 0: the "
                   "run stops at the first such step with an error naming it, before any checkpoint holds it")
    machinery("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
              help="under torchrun: how long a collective may wait for the other processes before this one "
                   "exits with an error (a lost or hung peer); default 300")
    return p


RUN_DEFINING = tuple(build_parser().run_defining)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in PAPER_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    for name in ("epochs", "batch_size", "eval_batch_size", "codebook_size", "dim", "log_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.skip_nonfinite < 0:
        parser.error(f"--skip-nonfinite must be non-negative, got {args.skip_nonfinite}")
    for name in ("max_train_images", "max_test_images", "stop_after_epoch"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.dist_timeout > 0:
        parser.error(f"--dist-timeout must be positive, got {args.dist_timeout}")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_epochs < 0 or args.num_workers < 0:
        parser.error("--lr must be positive and --weight-decay, --warmup-epochs, --num-workers non-negative")
    if not (args.sigma_x2 > 0 and args.sigma_x2 < float("inf")):
        parser.error(f"--sigma-x2 must be finite and positive, got {args.sigma_x2}")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.dataset == "folder" and args.image_size is None:
        parser.error("--dataset folder needs --image-size S (images are center-cropped and resized to S x S)")
    if args.dataset == "folder" and args.download:
        parser.error("--download applies to cifar10 and celeba; a folder of images is read where --data-dir is")
    for name in FOLDER_ONLY_FLAGS:
        if args.dataset != "folder" and getattr(args, name) not in (None, False):
            parser.error(f"--{name.replace('_', '-')} applies to --dataset folder only ({args.dataset} images are "
                         f"{IMAGE_SIZE[args.dataset]} x {IMAGE_SIZE[args.dataset]}, in its official splits)")
    problem = image_size_problem(run_image_size(args), args.downsampling, "--image-size", "--downsampling")
    if problem is not None:
        parser.error(problem)
    return args


def run_image_size(args) -> int:
    """The side of a run's square images: the data set's, or a folder's --image-size."""
    return IMAGE_SIZE.get(args.dataset) or args.image_size


def run_downsampling(args) -> int:
    """How many times a run's network shrinks its images (runs before --downsampling: 4)."""
    return getattr(args, "downsampling", LATENT_DOWNSAMPLING)


def quantizer_options(args) -> dict:
    """Keyword options for ``build_quantizer`` from ``args``: every keyword the
    quantizer takes, at its default unless a flag or option gives it (each
    must be one the quantizer accepts), and the seed. Written in full into
    checkpoints, so that a run resumed by a later version, whose defaults may
    differ, is built as it was started (``as_saved``)."""
    defaults = quantizer_defaults(QUANTIZERS[args.quantizer])
    accepted = set(defaults)
    options = dict(defaults)
    for name in QUANTIZER_FLAGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in accepted:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to the {args.quantizer} quantizer")
        options[name] = value
    for item in getattr(args, "quantizer_option", None) or []:
        keyword, value = parse_option(item)
        if keyword == "noise" and "noise_scale" in accepted:  # GM-VQ's switch before noise_scale (gmvq_ext 0.1)
            keyword, value = "noise_scale", 1.0 if value else 0.0
        if keyword not in accepted:
            raise ValueError(f"--quantizer-option {keyword}: the {args.quantizer} quantizer takes {sorted(accepted)}")
        options[keyword] = value
    if "seed" in accepted:
        options["seed"] = args.seed  # the quantizer's own (Philox) noise key
    return options


def quantizer_defaults(cls) -> dict:
    """Every constructor keyword of a quantizer class but dim and codebook_size, with its default,
    following ``**options`` to its base classes (the first class to name a keyword sets its default)."""
    defaults: dict = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters
        for name, parameter in parameters.items():
            if name in ("self", "dim", "codebook_size") or parameter.default is parameter.empty:
                continue
            defaults.setdefault(name, parameter.default)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    return defaults


def as_saved(options: dict, saved: dict | None) -> dict:
    """The options of a model rebuilt from a checkpoint (resumed or loaded): ``options`` (this version's,
    from the run's arguments) overridden by those the checkpoint was built with (every keyword, for
    checkpoints written since they were stored in full). Its arguments give the same flags, so only
    defaults can differ."""
    return {**options, **(saved or {})}


def parse_option(item: str) -> tuple[str, object]:
    keyword, separator, text = item.partition("=")
    if not separator or not keyword:
        raise ValueError(f"--quantizer-option expects NAME=VALUE, got {item!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word such as full or scalar
    return keyword.strip(), value


def build_model(args, options: dict):
    """The autoencoder of ``args`` (dataset, downsampling, quantizer, K, D) with quantizer ``options``."""
    from ..models import build_autoencoder
    from ..quantizers import build_quantizer

    quantizer = build_quantizer(args.quantizer, codebook_size=args.codebook_size, dim=args.dim, **options)
    return build_autoencoder(args.dataset, quantizer, run_downsampling(args))
