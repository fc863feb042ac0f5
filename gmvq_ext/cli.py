"""Console scripts: `gmvq-train`, `gmvq-evaluate`, `gmvq-tokenize` run `python -m
gmvq_ext.<module>` of the installed package from any directory (in a source
checkout, `python -m` imports the uninstalled tree, which has no kernels)."""

from __future__ import annotations

import importlib


def _command(module: str):
    def run() -> None:  # main() returns its results; a script's exit status must not be them
        importlib.import_module(f"gmvq_ext.{module}").main()

    run.__name__ = module
    return run


train = _command("train")
evaluate = _command("evaluate")
tokenize = _command("tokenize")
