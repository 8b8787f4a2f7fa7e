"""Drop-in nn.Module replacements for nn.Linear."""

from .lora_linear import LoRALinear

__all__ = ["LoRALinear"]
