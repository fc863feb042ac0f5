"""The command lines, one module each, named as their console scripts:

    gmvq-train      cli/train.py     (also ``python -m gmvq_ext.train``)
    gmvq-evaluate   cli/evaluate.py
    gmvq-tokenize   cli/tokenize.py
    gmvq-export     cli/export.py

Each module's ``main(argv=None)`` parses the arguments, runs, and turns the
errors a user can cause into a one-line ``SystemExit``. The console scripts
run them from any directory (in a source checkout ``python -m`` imports the
uninstalled tree, which has no kernels)."""

from __future__ import annotations

import importlib


def _command(module: str):
    def run() -> None:  # main() returns its results; a script's exit status must not be them
        importlib.import_module(f"gmvq_ext.cli.{module}").main()

    run.__name__ = module
    return run


train = _command("train")
evaluate = _command("evaluate")
tokenize = _command("tokenize")
export = _command("export")
