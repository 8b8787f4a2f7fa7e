"""MoLoRALinear: a mixture of LoRA experts on a frozen linear layer (pyhappy::moe_lora_linear)."""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from torch import nn

from .. import reference
from .._safetensors import read_safetensors, write_safetensors
from .._transaction import TransactionalLoad, restores_on_failure
from ..ops._checks import finite_number
from ..ops.moe_lora_linear import moe_lora_linear, rank_mask
from .quant_linear import QuantLinear

_FORMAT = "pyhappy.molora"


class MoLoRALinear(TransactionalLoad, nn.Module):
    """``y = x Wᵀ + b + s · Σ_j g_j · B_{e_j} (A_{e_j} dropout(x))`` with W, b frozen: E LoRA experts
    and a trainable router; each token goes to its top_k experts of ``softmax(x Rᵀ)`` (fp32; ties to
    the lower expert index), gated by their probabilities, renormalised over the chosen k when
    ``normalize`` (Mixtral). top_k = E is the dense soft mixture.

    Parameters:
        weight [out, in], bias [out] | None   frozen base (shared with the wrapped nn.Linear); None
            with a quantized base, which is then the QuantLinear at ``base``
        router.weight [E, in]                  trainable router R
        lora_A [E, r, in], lora_B [E, out, r]  trainable experts (A Kaiming-uniform, B zero: a fresh
            layer leaves the base output unchanged)
    ``r`` is one rank or one per expert (heterogeneous experts): the experts are padded to the
    largest rank with zeros, and a rank mask keeps the padding out of the product and its gradient.
    scaling = alpha / max(r).

    After each forward, ``last_aux_loss`` holds the Switch load-balancing loss E · Σ_e f_e · P_e
    (f_e the share of routed assignments, P_e the mean router probability; 1 when balanced) and,
    with ``z_loss=True``, ``last_z_loss`` the router z-loss mean(logsumexp(logits)²); both are
    differentiable in the router. Add them (times a small coefficient) to the training loss.

    The mixture depends on each input through the router, so it cannot be folded into W: ``merge``
    refuses; ``unload`` gives the base layer back. With a quantized base (``quantize=``) the base
    product is pyhappy::quant_linear on the packed weight (as QLoRALinear's) and the experts run as
    pyhappy::moe_lora_linear with weight=None, added to it.
    """

    TRAINABLE_PREFIXES = ("lora_", "router.")  # parameters inject() leaves trainable

    def __init__(self, in_features: int, out_features: int, num_experts: int = 8, top_k: int = 2,
                 r: int | Sequence[int] = 16, alpha: float = 32, dropout: float = 0.0, normalize: bool = True,
                 bias: bool = True, z_loss: bool = False, device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, num_experts, top_k, r, alpha, dropout, normalize, z_loss)

    @classmethod
    @restores_on_failure
    def from_linear(cls, linear: nn.Linear, num_experts: int = 8, top_k: int = 2, r: int | Sequence[int] = 16,
                    alpha: float = 32, dropout: float = 0.0, normalize: bool = True, *, z_loss: bool = False,
                    quantize: str | None = None, group_size: int | None = None, method="rtn",
                    calib=None) -> "MoLoRALinear":
        """Wrap an nn.Linear (weight and bias shared, frozen) with ``num_experts`` LoRA experts of rank
        ``r`` (int, or one per expert) routed top_k per token. quantize: "nf4" | "int4" | "int3" packs
        the base into a QuantLinear at ``base`` (group_size, method, calib as for pyhappy.quantize)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, num_experts, top_k, r, alpha, dropout, normalize, z_loss)
        if quantize is not None:
            q = QuantLinear.from_linear(linear, quantize, group_size, method=method, calib=calib)
            self.weight = None
            self.bias = None
            self.base = q
        return self

    def _setup(self, base: nn.Linear, num_experts, top_k, r, alpha, dropout, normalize, z_loss):
        name = type(self).__name__
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
            raise ValueError(f"{name}: num_experts must be a positive int, got {num_experts!r}")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
            raise ValueError(f"{name}: top_k must be an int in [1, num_experts] = [1, {num_experts}], got {top_k!r}")
        ranks = [r] * num_experts if isinstance(r, int) and not isinstance(r, bool) else list(r)
        if len(ranks) != num_experts or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in ranks):
            raise ValueError(f"{name}: r must be a positive int or {num_experts} positive ints (one per expert), "
                             f"got {r!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"{name}: normalize must be True or False, got {normalize!r}")
        alpha = finite_number(name, "alpha", alpha)
        K, N = base.in_features, base.out_features
        dev, dt = base.weight.device, base.weight.dtype
        self.in_features, self.out_features = K, N
        self.num_experts, self.top_k, self.ranks, self.r = num_experts, top_k, ranks, max(ranks)
        self.lora_alpha, self.scaling = alpha, alpha / max(ranks)
        self.lora_dropout, self.normalize, self.z_loss = float(dropout), normalize, bool(z_loss)
        self.router = nn.Linear(K, num_experts, bias=False, device=dev, dtype=dt)
        self.lora_A = nn.Parameter(torch.empty(num_experts, self.r, K, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(num_experts, N, self.r, device=dev, dtype=dt))
        hetero = min(ranks) != self.r
        self.register_buffer("rank_mask", rank_mask(ranks, self.r, dev, dt) if hetero else None, persistent=False)
        self.reset_lora_parameters()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.base = None
        self.last_aux_loss = None
        self.last_z_loss = None

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "peft"):
        """Each expert as PEFT's LoRA: A Kaiming-uniform (a=√5), B = 0 ("none": B drawn too, for
        tests); the router as nn.Linear's default. Padded ranks are zero."""
        if init not in ("peft", "none"):
            raise ValueError(f"{type(self).__name__}: init must be 'peft' or 'none', got {init!r}")
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) of an [r, in] matrix
        self.lora_A.uniform_(-bound, bound)
        if init == "none":
            self.lora_B.uniform_(-1.0 / math.sqrt(self.r), 1.0 / math.sqrt(self.r))
        else:
            self.lora_B.zero_()
        if self.rank_mask is not None:
            self.lora_A.mul_(self.rank_mask[:, :, None])
            self.lora_B.mul_(self.rank_mask[:, None, :])
        self.router.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.lora_dropout if self.training else 0.0
        args = (self.router.weight, self.lora_A, self.lora_B, self.top_k, self.scaling, self.normalize, p)
        if self.base is None:
            y, logits, experts = moe_lora_linear(x, self.weight, self.bias, *args, rank_mask=self.rank_mask,
                                                 return_router=True)
        else:
            delta, logits, experts = moe_lora_linear(x, None, None, *args, rank_mask=self.rank_mask,
                                                     return_router=True)
            y = self.base(x) + delta
        self.last_aux_loss = reference.moe_load_balancing_loss(logits, experts, self.num_experts)
        self.last_z_loss = reference.moe_z_loss(logits) if self.z_loss else None
        return y

    def __getstate__(self):
        """Copies and pickles leave out the last forward's losses: they belong to that forward's
        autograd graph (copy.deepcopy refuses a tensor that is not a leaf), not to the layer."""
        return {k: (None if k in ("last_aux_loss", "last_z_loss") else v) for k, v in self.__dict__.items()}

    def merge(self):
        raise RuntimeError(f"{type(self).__name__}.merge: a mixture of LoRA experts cannot be merged into the base "
                           "weight: which experts apply, and with what gate, depends on each input token (the "
                           "router). Keep the module, or drop the experts with unload().")

    def unload(self) -> nn.Module:
        """The base layer back, experts dropped: the original nn.Linear (sharing its weight and bias),
        or the QuantLinear of a quantized base."""
        if self.base is not None:
            return self.base
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        r = self.r if self.rank_mask is None else self.ranks
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={(self.bias if self.base is None else self.base.bias) is not None}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, r={r}, alpha={self.lora_alpha:g}, "
                f"dropout={self.lora_dropout:g}, normalize={self.normalize}, quantized={self.base is not None}")


def _molora_modules(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLoRALinear)]


def save_molora(path, model: nn.Module) -> int:
    """Save the router and experts of every MoLoRALinear in ``model`` (or ``model`` itself) to a
    safetensors file: ``<module>.router.weight``, ``<module>.lora_A``, ``<module>.lora_B``, with each
    module's configuration (experts, top_k, ranks, alpha, normalize) in the metadata. Returns the
    number of modules saved."""

    tensors, meta = {}, {"format": _FORMAT}
    for name, m in _molora_modules(model):
        key = name or "_"
        tensors[f"{key}.router.weight"] = m.router.weight.detach()
        tensors[f"{key}.lora_A"] = m.lora_A.detach()
        tensors[f"{key}.lora_B"] = m.lora_B.detach()
        meta[f"{key}.config"] = (f"{m.num_experts},{m.top_k},{':'.join(map(str, m.ranks))},{m.lora_alpha!r},"
                                 f"{int(m.normalize)}")
    if not tensors:
        raise ValueError("save_molora: the model has no MoLoRALinear")
    write_safetensors(os.fspath(path), tensors, meta)
    return len(tensors) // 3


@torch.no_grad()
def load_molora(path, model: nn.Module) -> int:
    """Load a file written by ``save_molora`` into ``model``'s MoLoRALinear modules (same names,
    same configuration). Every tensor and module is checked before any is changed, so a bad file
    leaves the model as it was. Returns the number of modules loaded."""

    who = "load_molora"
    tensors, meta = read_safetensors(os.fspath(path))
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{who}: {path} is not a pyhappy MoLoRA file (format {meta.get('format')!r})")
    mods = dict(_molora_modules(model))
    keys = sorted({k.rsplit(".", 1)[0] for k in meta if k.endswith(".config")})
    plan = []
    for key in keys:
        name = "" if key == "_" else key
        if name not in mods:
            raise ValueError(f"{who}: {path} holds module {key!r}, which is not a MoLoRALinear of the model")
        m = mods[name]
        want = {f"{key}.router.weight": m.router.weight, f"{key}.lora_A": m.lora_A, f"{key}.lora_B": m.lora_B}
        cfg = f"{m.num_experts},{m.top_k},{':'.join(map(str, m.ranks))},{m.lora_alpha!r},{int(m.normalize)}"
        if meta[f"{key}.config"] != cfg:
            raise ValueError(f"{who}: module {key!r} was saved with (experts, top_k, ranks, alpha, normalize) = "
                             f"{meta[f'{key}.config']}, the model's is {cfg}")
        for k, p in want.items():
            if k not in tensors:
                raise ValueError(f"{who}: {path} has no tensor {k!r}")
            if tuple(tensors[k].shape) != tuple(p.shape):
                raise ValueError(f"{who}: {k} is {tuple(tensors[k].shape)} in the file, {tuple(p.shape)} in the model")
            plan.append((p, tensors[k]))
    if not plan:
        raise ValueError(f"{who}: {path} holds no MoLoRA module")
    for p, t in plan:
        p.copy_(t.to(device=p.device, dtype=p.dtype))
    return len(plan) // 3
