"""Loads the compiled kernels (gmvq_ext._C) after checking they fit this torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch


def _installed_elsewhere(here: Path) -> Path | None:
    """Another gmvq_ext on sys.path with its kernels: the installed one, shadowed by a source tree."""
    for entry in sys.path:
        candidate = Path(entry or ".").resolve() / "gmvq_ext"
        if candidate != here and any(candidate.glob("_C*")):
            return candidate
    return None


def _load():
    if importlib.util.find_spec("gmvq_ext._build_info") is None or importlib.util.find_spec("gmvq_ext._C") is None:
        here = Path(__file__).resolve().parent
        installed = _installed_elsewhere(here)
        if installed is not None:
            raise ImportError(
                f"gmvq_ext was imported from the source tree {here}, which has no compiled kernels: Python "
                f"puts the current directory first, ahead of the installed package in {installed}. Run from "
                "another directory, use the console scripts (gmvq-train, gmvq-evaluate, gmvq-tokenize) or "
                "`python -P -m ...`, or build the tree in place with `dev/dev_build.sh`."
            )
        raise ImportError(
            "gmvq_ext's compiled kernels are missing. Build them with "
            "`pip install --no-build-isolation .` (see README), or for development "
            "`dev/dev_build.sh`."
        )
    build = importlib.import_module("gmvq_ext._build_info")
    if build.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"gmvq_ext was built against torch {build.TORCH_VERSION} but torch {torch.__version__} "
            "is running. Rebuild it with this torch: `pip install --no-build-isolation --force-reinstall "
            "--no-deps .`"
        )
    return importlib.import_module("gmvq_ext._C")


_C = _load()


def build_info() -> dict:
    """How the loaded kernels were built: torch version, CUDA on/off, architectures."""
    return dict(_C.build_info())
