"""LoRALinear: a drop-in nn.Linear replacement running pyhappy::lora_linear."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._transaction import TransactionalLoad, check_merged_state, restores_on_failure
from ..ops._checks import autocast_dtype, finite_number
from ..ops.dora_linear import DoraNormCache, dora_linear, dora_weight_norm, dora_weight_sqnorm, tensor_ident
from ..ops.lora_linear import lora_linear

INITS = ("peft", "gaussian", "none")


def in_dtype(dtype: torch.dtype, *tensors):
    """``tensors`` (None passes) cast to ``dtype`` where they are not in it: an adapter's weights as
    an op takes them (see LoRAAdapter.adapter_tensors)."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def adapter_to(layer, dtype) -> None:
    """``layer``'s adapter parameters (lora_A, lora_B, lora_C, lora_magnitude_vector; a LoRALinear,
    QLoRALinear or a MultiLoRALinear's LoRAPair) converted to ``dtype`` in place, the Parameter objects
    kept. PEFT keeps adapters in float32 on a bfloat16 / float16 base by default
    (autocast_adapter_dtype): converting them to the base's dtype would round the trained values."""
    for name in ("lora_A", "lora_B"):
        getattr(layer, name).to(dtype)
    for name in ("lora_C", "lora_magnitude_vector"):
        p = getattr(layer, name, None)
        if isinstance(p, torch.Tensor):
            p.data = p.data.to(dtype)


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

    def adapter_tensors(self, dtype: torch.dtype):
        """lora_A, lora_B, lora_C (weights) as the ops take them, in the compute ``dtype``. An adapter
        may be kept in another dtype than its base (float32 on a bfloat16 base, as PEFT keeps it by
        default, autocast_adapter_dtype): each call then casts it (r·(in + out) elements), autograd
        carries the gradients back in the adapter's own dtype, and the trained values are never
        rounded to the base's."""
        return in_dtype(dtype, self.lora_A.weight, self.lora_B.weight, self.lora_C)

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


class LoRALinear(TransactionalLoad, LoRAAdapter, nn.Module):
    """``y = x Wᵀ + b + s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ`` with W, b frozen; with ``use_dora=True`` DoRA:
    ``y = (m / ‖W + s·BA‖_row) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b`` (pyhappy::dora_linear, PEFT's numerics,
    dropout included), the norm detached.

    Parameters (names as PEFT's, so state dicts map one to one):
        weight [out, in]   frozen base weight (shared with the wrapped nn.Linear, not copied)
        bias [out] | None  frozen base bias
        lora_A.weight [r, in], lora_B.weight [out, r]   trainable
        lora_C [r, r] | None   optional trainable core (LoTR/SORSA-style), identity at init
        lora_magnitude_vector [out]   DoRA's magnitude m (use_dora only), trainable; PEFT's
            initialisation ‖W + s·BA‖_row (‖W‖_row for B = 0)
    DoRA keeps ‖W_n‖² cached while the base weight is unchanged (keyed by its data pointer and
    version counter, so an in-place update such as load_state_dict or merge invalidates it).
    scaling = alpha / r, or alpha / sqrt(r) with rslora. The adapter is kept in the base weight's
    dtype; for mixed precision run under torch.autocast.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float | None = None, dropout: float = 0.0,
                 rslora: bool = False, bias: bool = True, core: bool = False, init: str = "peft",
                 device=None, dtype=None, use_dora: bool = False):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, r, alpha, dropout, rslora, core, init, use_dora)

    @classmethod
    @restores_on_failure
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                    rslora: bool = False, init: str = "peft", core: bool = False,
                    use_dora: bool = False) -> "LoRALinear":
        """Wrap an existing nn.Linear: its weight and bias are shared (not copied) and frozen.
        use_dora=True makes it a DoRA layer (adds lora_magnitude_vector)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, r, alpha, dropout, rslora, core, init, use_dora)
        return self

    def _setup(self, base: nn.Linear, r, alpha, dropout, rslora, core, init, use_dora=False):
        self.in_features, self.out_features = base.in_features, base.out_features
        if not isinstance(use_dora, bool):
            raise TypeError(f"LoRALinear: use_dora must be True or False, got {use_dora!r}")
        if use_dora and core:
            raise ValueError("LoRALinear: use_dora=True takes no core (lora_C): DoRA is defined on B A")
        # Adapter first: it validates the arguments, and a bad one must leave `base` untouched.
        self._setup_adapter(r, alpha, dropout, rslora, core, init, base.weight.device, base.weight.dtype)
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.merged = False
        self.use_dora = use_dora
        self._dora_sqnorm = None  # (key, ‖W_n‖²): see weight_sqnorm()
        self._dora_norm_cache = DoraNormCache()  # ‖W + s·BA‖_row between calls: see dora_weight_norm()
        self._dora_merge_norm = None  # the norm merge() divided by, for unmerge()
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self._dora_norm().to(base.weight.dtype))

    def reset_lora_parameters(self, init: str = "peft"):
        """LoRAAdapter's initialisation; for DoRA the magnitude is then PEFT's ‖W + s·BA‖_row."""
        super().reset_lora_parameters(init)
        if getattr(self, "use_dora", False) and not self.merged:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self._dora_norm())

    def weight_sqnorm(self) -> torch.Tensor:
        """‖W_n‖² [out] (float64), cached while the base weight is unchanged: the cache is keyed by
        the weight's data pointer, version counter (bumped by every in-place update), shape, dtype
        and device."""
        w = self.weight
        key = tensor_ident(w)
        if self._dora_sqnorm is None or self._dora_sqnorm[0] != key:
            self._dora_sqnorm = (key, dora_weight_sqnorm(w.detach()))
        return self._dora_sqnorm[1]

    def _dora_norm(self) -> torch.Tensor:
        """‖W + s·BA‖_row of the unmerged weight (detached), in the weight's dtype."""
        A, B, _ = self.adapter_tensors(self.weight.dtype)
        return dora_weight_norm(self.weight, A, B, self.scaling, self.weight_sqnorm())

    def dora_weight_norm(self) -> torch.Tensor:
        """‖W + s·BA‖_row [out] (detached) as forward uses it: kept from the last call while the base
        weight (frozen: same tensor, same version), the scaling and lora_A, lora_B (compared by value)
        are unchanged, so that serving, or the micro-batches of one optimizer step, computes it once
        (pyhappy.ops.DoraNormCache); recomputed otherwise."""
        w = self.weight
        key = None if w.requires_grad or w.is_meta else (tensor_ident(w), float(self.scaling),
                                                         autocast_dtype(w.device))
        # (the cache compares the adapter's own tensors; _dora_norm casts them to the weight's dtype)
        return self._dora_norm_cache.get(key, self.lora_A.weight, self.lora_B.weight, self._dora_norm)

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
        if self.use_dora:
            return self._dora_merge(sign)
        A = self.lora_A.weight.float()
        B = self.lora_B.weight.float()
        if self.lora_C is not None:
            B = B @ self.lora_C.float()
        w = self.weight.float().addmm_(B, A, alpha=sign * self.scaling)
        self.weight.copy_(w)

    def _dora_merge(self, sign: float):
        """PEFT's DoRA merge, W' = (m / ‖W + s·BA‖)_row ⊙ (W + s·BA), and its inverse
        W = W' / (m / ‖W + s·BA‖)_row - s·BA with the norm merge() used, in float32 (float64 for
        float64). Refused before any change when a row factor is 0 or not finite (W could not be
        recovered)."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        delta = (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc)).mul_(self.scaling)
        m = self.lora_magnitude_vector.detach().to(acc)
        if sign > 0:
            norm = torch.linalg.vector_norm(self.weight.to(acc) + delta, dim=1).to(self.weight.dtype).to(acc)
            factor = m / norm
            if not bool(torch.isfinite(factor).all()) or bool((factor == 0).any()):
                raise ValueError("LoRALinear.merge: a row's DoRA factor lora_magnitude_vector / ‖W + s·BA‖ is 0 or "
                                 "not finite; the merged weight could not be unmerged")
            self.weight.copy_(factor[:, None] * (self.weight.to(acc) + delta))
            self._dora_merge_norm = norm
        else:
            factor = m / self._dora_merge_norm
            self.weight.copy_(self.weight.to(acc) / factor[:, None] - delta)
            self._dora_merge_norm = None

    def _validate_state_dict(self, state_dict, prefix: str, who: str):
        """Check this module's own keys in ``state_dict``, its extra state included, before a load
        changes anything (see _transaction.check_state_dict)."""
        return check_merged_state(self, state_dict, prefix, who)

    def get_extra_state(self):
        # Saved so that a state dict taken from a merged module does not get the delta added twice
        # (and, for DoRA, so that unmerge() divides by the norm merge() used).
        state = {"merged": self.merged}
        if self._dora_merge_norm is not None:
            state["dora_merge_norm"] = self._dora_merge_norm
        return state

    def set_extra_state(self, state):
        self.merged = bool(state["merged"])
        self._dora_merge_norm = state.get("dora_merge_norm") if self.merged else None

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
        A, B, C = self.adapter_tensors(self.weight.dtype)
        if self.use_dora:
            # Under torch.compile the norm is computed in the graph (the caches are Python state).
            wn = None if torch.compiler.is_compiling() else self.dora_weight_norm()
            return dora_linear(x, self.weight, self.bias, A, B, self.lora_magnitude_vector.to(self.weight.dtype),
                               self.scaling, p, weight_norm=wn)
        return lora_linear(x, self.weight, self.bias, A, B, self.scaling, C, p)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._adapter_repr()}, use_dora={self.use_dora}, merged={self.merged}")
