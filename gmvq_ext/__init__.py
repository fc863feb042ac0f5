"""gmvq_ext: Gaussian Mixture Vector Quantization with fused C++/CUDA kernels.

Importing the package loads the kernels and registers ``torch.ops.gmvq.*``
with their fake kernels and autograd formulas."""

from ._library import build_info
from . import ops, reference
from .quantizers import QUANTIZERS, GaussianMixtureVQ, build_quantizer
from .tokenizer import Tokenizer

__all__ = ["build_info", "ops", "reference", "GaussianMixtureVQ", "build_quantizer", "QUANTIZERS", "Tokenizer"]
__version__ = "0.1.0"
