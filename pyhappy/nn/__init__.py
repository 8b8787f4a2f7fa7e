"""Drop-in nn.Module replacements for nn.Linear."""

from .lora_linear import LoRALinear
from .quant_linear import QLoRALinear, QuantLinear

__all__ = ["LoRALinear", "QLoRALinear", "QuantLinear"]
