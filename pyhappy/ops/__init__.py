"""Functional API and op registration. Every kernel is a registered op under torch.ops.pyhappy."""

from .. import _ext
from . import lora_linear as _lora_linear_family
from . import quant_linear as _quant_linear_family
from .lora_linear import lora_linear
from .quant_linear import quant_linear

if _ext.load() is not None:
    _lora_linear_family._register_cpp_fakes()
    _quant_linear_family._register_cpp_fakes()

__all__ = ["lora_linear", "quant_linear"]
