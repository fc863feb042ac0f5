"""Export a training run's model as a shareable tokenizer folder.

    gmvq-export --checkpoint runs/gmvq/checkpoint.pt --out my-tokenizer

--out receives model.safetensors (the model's weights and buffers; no
optimizer, no pickle) and config.json (everything that rebuilds the model,
with a format version), which ``gmvq_ext.Tokenizer.from_pretrained(OUT)``
loads in one line without the training code (gmvq_ext/pretrained.py). An
--out that already holds an export is an error unless --overwrite is given.
The checkpoint is read as plain data (torch.load with weights_only=True): a
damaged, foreign or tampered file ends the command with one line naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..files import WriteError
from ..pretrained import CONFIG_NAME, WEIGHTS_NAME
from ..tokenizer import Tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gmvq-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by gmvq-train")
    p.add_argument("--out", required=True, help="the folder to write (created)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    return p


def main(argv=None) -> Path:
    options = build_parser().parse_args(argv)
    try:
        return run(options)
    except (FileExistsError, FileNotFoundError, ValueError, WriteError) as error:
        raise SystemExit(f"gmvq-export: error: {error}") from None


def run(options) -> Path:
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file; give a folder")
    if any((out / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME)) and not options.overwrite:
        raise FileExistsError(f"--out {str(out)!r} already holds an exported tokenizer; pass --overwrite to "
                              "replace it")
    tokenizer = Tokenizer.from_checkpoint(options.checkpoint, device="cpu")
    tokenizer.save_pretrained(out)
    print(f"exported {options.checkpoint} ({tokenizer.config['quantizer']}, {tokenizer.codebook_size} codes, "
          f"{tokenizer.image_shape[1]} x {tokenizer.image_shape[2]} images -> {tokenizer.code_shape[0]} x "
          f"{tokenizer.code_shape[1]} codes) to {str(out)!r}; load it with "
          f"gmvq_ext.Tokenizer.from_pretrained({str(out)!r})", file=sys.stderr)
    return out


def command() -> None:
    """The console script gmvq-export."""
    main()


if __name__ == "__main__":
    main()
