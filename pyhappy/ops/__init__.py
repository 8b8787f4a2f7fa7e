"""Functional API and op registration. Every kernel is a registered op under torch.ops.pyhappy."""

import torch

from .. import _ext
from . import dora_linear as _dora_linear_family
from . import lora_linear as _lora_linear_family
from . import lora_linear_multi as _lora_linear_multi_family
from . import moe_lora_linear as _moe_lora_linear_family
from . import quant_linear as _quant_linear_family
from . import sparse_delta_linear as _sparse_delta_linear_family
from . import vera_linear as _vera_linear_family
from .dora_linear import DoraNormCache, dora_linear, dora_weight_norm, dora_weight_sqnorm
from .lora_linear import lora_linear
from .lora_linear_multi import lora_linear_multi, stack_adapters
from .moe_lora_linear import moe_lora_linear
from .quant_linear import quant_linear
from .sparse_delta_linear import sparse_delta_linear, sparse_layout
from .tt_linear import tt_lowrank_linear, tt_matrix_linear
from .vera_linear import pvera_linear, vera_linear

if _ext.load() is not None:
    _lora_linear_family._register_cpp_fakes()
    if hasattr(torch.ops.pyhappy, "dora_weight_norm_cpu"):  # an extension built before DoRA lacks it
        _dora_linear_family._register_cpp_fakes()
    _lora_linear_multi_family._register_cpp_fakes()
    _quant_linear_family._register_cpp_fakes()
    _sparse_delta_linear_family._register_cpp_fakes()
    if hasattr(torch.ops.pyhappy, "moe_lora_linear_cpu"):  # an extension built before it lacks it
        _moe_lora_linear_family._register_cpp_fakes()
    if hasattr(torch.ops.pyhappy, "gaussian_noise_cpu"):  # an extension built before PVeRA lacks it
        _vera_linear_family._register_cpp_fakes()

__all__ = ["DoraNormCache", "dora_linear", "dora_weight_norm", "dora_weight_sqnorm", "lora_linear", "lora_linear_multi", "moe_lora_linear", "stack_adapters", "quant_linear", "sparse_delta_linear", "sparse_layout", "tt_lowrank_linear", "tt_matrix_linear", "vera_linear", "pvera_linear"]
