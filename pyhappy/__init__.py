"""pyhappy: fused kernels for parameter-efficient fine-tuning in PyTorch.

Importing pyhappy never initialises CUDA and never fails because a compiled piece is missing:
ops fall back to the reference path and ``python -m pyhappy.info`` says what is served by what.
"""

__version__ = "0.1.0"

from . import backends, ops, quant, reference, sparse  # noqa: E402  (registers torch.ops.pyhappy.*)
from . import nn  # noqa: E402
from .inject import inject  # noqa: E402
from .quant import QuantizedWeight, quantize  # noqa: E402

__all__ = ["QuantizedWeight", "backends", "inject", "nn", "ops", "quant", "quantize", "reference", "sparse", "__version__"]
