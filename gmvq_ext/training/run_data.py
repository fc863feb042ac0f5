"""The data of a training run: its train, per-epoch evaluation and test
splits, opened the same way on every rank.

A folder of images is checked once, by rank 0 (a progress bar over every
file of the run's splits), before anything trains; every rank gets its
verdict: the one-line error naming an unreadable file, or with
--skip-bad-images the files to leave out, which the log and results.json
count and name."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from ..data import BadImage, DataSource, first_images
from ..download import ensure_dataset
from . import process_group

SKIPPED_NAMED_IN_LOG = 10
SKIPPED_NAMED_IN_RESULTS = 100


@dataclass
class RunData:
    train: Dataset
    evaluation: Dataset
    test: Dataset
    eval_split: str  # "val" or "test": what the per-epoch evaluation reads
    skipped: list[BadImage]  # unreadable files left out (--skip-bad-images)

    def skipped_record(self) -> dict:
        """The skipped files as results.json records them."""
        return {"skipped_images": len(self.skipped),
                "skipped_image_files": [{"path": b.path, "reason": b.reason}
                                        for b in self.skipped[:SKIPPED_NAMED_IN_RESULTS]]}


def open_run_data(args, ctx: process_group.Context, log) -> RunData:
    if args.download and ctx.local_rank == 0:  # one download per machine; the other ranks wait
        ensure_dataset(args.dataset, args.data_dir)
    process_group.barrier(ctx)
    source = DataSource.of_run(args)
    eval_split = evaluation_split(args, source)
    splits = tuple(dict.fromkeys(("train", eval_split, "test")))
    verdict = process_group.broadcast_object(check_or_error(source, splits) if ctx.is_main else None, ctx)
    if isinstance(verdict, Exception):
        raise verdict
    datasets, skipped = source.open(splits, known_bad=verdict)
    if skipped:
        named = "; ".join(f"{b.path} ({b.reason})" for b in skipped[:SKIPPED_NAMED_IN_LOG])
        log(f"skipped {len(skipped)} unreadable image(s) (--skip-bad-images): {named}"
            + (" ..." if len(skipped) > SKIPPED_NAMED_IN_LOG else ""))
    return RunData(train=first_images(datasets["train"], args.max_train_images),
                   evaluation=first_images(datasets[eval_split], args.max_test_images),
                   test=first_images(datasets["test"], args.max_test_images),
                   eval_split=eval_split, skipped=skipped)


def evaluation_split(args, source: DataSource) -> str:
    """CIFAR-10 and CelebA: "val" with --val-fraction, else "test"; a folder:
    its "val" split when the split gives it any file, else "test"."""
    if args.dataset == "folder":
        return "val" if source.has_split("val") else "test"
    return "val" if args.val_fraction > 0 else "test"


def check_or_error(source: DataSource, splits: tuple[str, ...]):
    """Rank 0's check: the files to leave out, or the error every rank raises."""
    try:
        return source.check(splits)
    except Exception as error:  # DataError, OSError: sent to the other ranks, raised everywhere
        return error
