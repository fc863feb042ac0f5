"""The build records the torch it was compiled against and refuses another."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gmvq_ext
from gmvq_ext import _build_info


def test_build_info_matches_running_torch():
    info = gmvq_ext.build_info()
    assert info["torch_version"] == torch.__version__ == _build_info.TORCH_VERSION
    assert info["with_cuda"] == _build_info.WITH_CUDA
    if not info["with_cuda"]:
        assert info["cuda_architectures"] == ""


def test_every_op_is_registered_with_a_backward():
    for name in ["codebook_distance", "weighted_softmax", "gumbel_argmax", "aggregated_posterior_entropy",
                 "quantize"]:
        assert hasattr(torch.ops.gmvq, name)
        assert hasattr(torch.ops.gmvq, name + "_backward")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gmvq::{name}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gmvq::{name}_backward", "CPU")


def test_torch_version_mismatch_is_a_clear_import_error():
    # A stand-in _build_info that claims another torch, installed before gmvq_ext loads.
    script = textwrap.dedent(
        """
        import importlib.machinery, sys, types
        fake = types.ModuleType("gmvq_ext._build_info")
        fake.__spec__ = importlib.machinery.ModuleSpec("gmvq_ext._build_info", None)
        fake.TORCH_VERSION = "1.0.0"
        sys.modules["gmvq_ext._build_info"] = fake
        try:
            import gmvq_ext
        except ImportError as error:
            print("ImportError:", error)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(gmvq_ext.__file__).parent.parent))
    assert "built against torch 1.0.0" in out.stdout
    assert torch.__version__ in out.stdout


def test_a_source_tree_without_kernels_says_it_shadows_the_installed_package(tmp_path):
    # A checkout's gmvq_ext (no _C) in the current directory, the working package on
    # PYTHONPATH: what `python -m gmvq_ext.train` meets in a clone after `pip install .`.
    package = Path(gmvq_ext.__file__).resolve().parent
    shutil.copytree(package, tmp_path / "gmvq_ext", ignore=shutil.ignore_patterns("_C*", "_build_info*", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(package.parent)}
    out = subprocess.run([sys.executable, "-c", "import gmvq_ext"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert out.returncode != 0
    message = out.stderr.strip().splitlines()[-1]
    assert str(tmp_path / "gmvq_ext") in message and str(package) in message and "gmvq-train" in message


def test_console_scripts_run_the_modules(monkeypatch, capsys):
    import importlib

    for name in ("train", "evaluate", "tokenize"):
        module = importlib.import_module(f"gmvq_ext.cli.{name}")
        monkeypatch.setattr(sys, "argv", [f"gmvq-{name}", "--help"])
        with pytest.raises(SystemExit) as done:
            module.command()
        assert done.value.code == 0
        assert "--" in capsys.readouterr().out
    # The entry points pyproject declares are these functions.
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    for name in ("train", "evaluate", "tokenize"):
        assert f'gmvq-{name} = "gmvq_ext.cli.{name}:command"' in pyproject
