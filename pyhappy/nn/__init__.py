"""Drop-in nn.Module replacements for nn.Linear."""

from .lora_linear import LoRALinear
from .lora_linear_multi import MultiLoRALinear, adapter_batch
from .moe_lora_linear import MoLoRALinear, load_molora, save_molora
from .quant_linear import QLoRALinear, QuantLinear
from .sparse_delta_linear import SparseDelta, SparseDeltaLinear
from .tt_linear import TTAdapter, TTLinear
from .vera_linear import PVeRALinear, VeRALinear, VeRAProjections

__all__ = ["LoRALinear", "MultiLoRALinear", "adapter_batch", "MoLoRALinear", "save_molora", "load_molora", "QLoRALinear", "QuantLinear", "SparseDelta", "SparseDeltaLinear", "TTAdapter", "TTLinear", "VeRALinear", "PVeRALinear", "VeRAProjections"]
