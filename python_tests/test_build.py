"""The build records the torch it was compiled against and refuses another."""

import subprocess
import sys
import textwrap

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
