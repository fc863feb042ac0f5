"""gmvq_ext: Gaussian Mixture Vector Quantization with fused C++/CUDA kernels.

Importing the package loads the kernels and registers ``torch.ops.gmvq.*``
with their fake kernels and autograd formulas."""

from ._library import build_info
from . import ops, reference

__all__ = ["build_info", "ops", "reference"]
__version__ = "0.1.0"
