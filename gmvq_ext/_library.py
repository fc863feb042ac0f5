"""Loads the compiled kernels (gmvq_ext._C) after checking they fit this torch."""

from __future__ import annotations

import importlib
import importlib.util

import torch


def _load():
    if importlib.util.find_spec("gmvq_ext._build_info") is None or importlib.util.find_spec("gmvq_ext._C") is None:
        raise ImportError(
            "gmvq_ext's compiled kernels are missing. Build them with "
            "`pip install --no-build-isolation .` (see README), or for development "
            "`tools/dev_build.sh`."
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
