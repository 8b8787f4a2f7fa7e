"""Drop-in nn.Module replacements for nn.Linear."""

from .lora_linear import LoRALinear
from .quant_linear import QLoRALinear, QuantLinear
from .sparse_delta_linear import SparseDelta, SparseDeltaLinear
from .tt_linear import TTAdapter, TTLinear

__all__ = ["LoRALinear", "QLoRALinear", "QuantLinear", "SparseDelta", "SparseDeltaLinear", "TTAdapter", "TTLinear"]
