"""LoRALinear: a drop-in nn.Linear replacement running pyhappy::lora_linear."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._checks import finite_number
from ..ops.lora_linear import lora_linear

INITS = ("peft", "gaussian", "none")


class LoRAAdapter:
    """The trainable low-rank adapter shared by LoRALinear and QLoRALinear (PEFT parameter names).

    Needs ``in_features`` / ``out_features`` set; adds lora_A, lora_B (nn.Linear, no bias), the
    optional core lora_C, r, lora_alpha, rslora, scaling, lora_dropout.
    """

    TRAINABLE_PREFIXES = ("lora_",)  # parameters inject() leaves trainable

    def _setup_adapter(self, r, alpha, dropout, rslora, core, init, device, dtype):
        name = type(self).__name__
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"{name}: r must be a positive int, got {r!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise ValueError(f"{name}: init must be one of {INITS}, got {init!r}")
        alpha = float(r) if alpha is None else finite_number(name, "alpha", alpha)
        self.r, self.lora_alpha, self.rslora = r, alpha, bool(rslora)
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = float(dropout)
        kw = dict(device=device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        self.lora_C = nn.Parameter(torch.eye(r, **kw)) if core else None
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "peft"):
        """PEFT's initialisation: A Kaiming-uniform (a=√5) or N(0, 1/r) ("gaussian"), B = 0, so a
        fresh adapter leaves the base output unchanged. "none" draws B too (tests, not training)."""
        if init not in INITS:
            raise ValueError(f"{type(self).__name__}: init must be one of {INITS}, got {init!r}")
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init == "none":
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B.weight)
        if self.lora_C is not None:
            self.lora_C.copy_(torch.eye(self.r))

    def delta_weight(self) -> torch.Tensor:
        """The dense update s · B C A [out, in], computed in float32, returned in the adapter's dtype."""
        A = self.lora_A.weight.float()
        B = self.lora_B.weight.float()
        if self.lora_C is not None:
            B = B @ self.lora_C.float()
        return (self.scaling * (B @ A)).to(self.lora_A.weight.dtype)

    def _adapter_repr(self) -> str:
        return (f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g}, dropout={self.lora_dropout:g}, "
                f"rslora={self.rslora}, core={self.lora_C is not None}")


class LoRALinear(LoRAAdapter, nn.Module):
    """``y = x Wᵀ + b + s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ`` with W, b frozen.

    Parameters (names as PEFT's, so state dicts map one to one):
        weight [out, in]   frozen base weight (shared with the wrapped nn.Linear, not copied)
        bias [out] | None  frozen base bias
        lora_A.weight [r, in], lora_B.weight [out, r]   trainable
        lora_C [r, r] | None   optional trainable core (LoTR/SORSA-style), identity at init
    scaling = alpha / r, or alpha / sqrt(r) with rslora. The adapter is kept in the base weight's
    dtype; for mixed precision run under torch.autocast.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float | None = None, dropout: float = 0.0,
                 rslora: bool = False, bias: bool = True, core: bool = False, init: str = "peft",
                 device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, r, alpha, dropout, rslora, core, init)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                    rslora: bool = False, init: str = "peft", core: bool = False) -> "LoRALinear":
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, r, alpha, dropout, rslora, core, init)
        return self

    def _setup(self, base: nn.Linear, r, alpha, dropout, rslora, core, init):
        self.in_features, self.out_features = base.in_features, base.out_features
        # Adapter first: it validates the arguments, and a bad one must leave `base` untouched.
        self._setup_adapter(r, alpha, dropout, rslora, core, init, base.weight.device, base.weight.dtype)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.merged = False

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into the base weight (in place, in float32); forward then runs F.linear."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: the adapter is already merged")
        self._add_delta(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(): subtract the same float32 delta (exact up to one rounding of weight's dtype)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the adapter is not merged")
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float):
        A = self.lora_A.weight.float()
        B = self.lora_B.weight.float()
        if self.lora_C is not None:
            B = B @ self.lora_C.float()
        w = self.weight.float().addmm_(B, A, alpha=sign * self.scaling)
        self.weight.copy_(w)

    def get_extra_state(self):
        # Saved so that a state dict taken from a merged module does not get the delta added twice.
        return {"merged": self.merged}

    def set_extra_state(self, state):
        self.merged = bool(state["merged"])

    def to_linear(self) -> nn.Linear:
        """An nn.Linear holding the base weights (merged ones if merged), sharing storage."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        p = self.lora_dropout if self.training else 0.0
        return lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
                           self.lora_C, p)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._adapter_repr()}, merged={self.merged}")
