"""pyhappy: fused kernels for parameter-efficient fine-tuning in PyTorch.

Importing pyhappy never initialises CUDA and never fails because a compiled piece is missing:
ops fall back to the reference path and ``python -m pyhappy.info`` says what is served by what.
"""

__version__ = "0.1.0"

from . import backends, ops, quant, reference, sparse  # noqa: E402  (registers torch.ops.pyhappy.*)
from . import nn  # noqa: E402
from .inject import inject  # noqa: E402
from .nn import adapter_batch  # noqa: E402
from .interop import (add_adapter, delete_adapter, from_peft, load_peft_adapter, load_quantized_state_dict, merge, save_peft_adapter,  # noqa: E402
                      set_adapter, unload, unmerge)
from .quant import QuantizedWeight, quantize  # noqa: E402

__all__ = ["QuantizedWeight", "adapter_batch", "add_adapter", "delete_adapter", "set_adapter", "backends", "from_peft", "inject", "load_peft_adapter", "load_quantized_state_dict", "merge", "save_peft_adapter",
           "unload", "unmerge", "nn", "ops", "quant", "quantize", "reference", "sparse", "__version__"]
