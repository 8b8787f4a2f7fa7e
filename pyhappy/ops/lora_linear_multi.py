"""pyhappy::lora_linear_multi — one batch, many LoRA adapters (multi-tenant serving).

    y[m] = x[m] Wᵀ + bias + s_a · (x[m] A_aᵀ) B_aᵀ,   a = adapter_index[m]  (-1: no adapter)

The base product is one GEMM shared by every row; the low-rank part runs in one op call over all
adapters (C++: rows grouped by adapter, one small GEMM pair per group, groups in parallel; Triton:
the gather scheme of multi-LoRA servers — a shrink kernel u[m] = x[m]·A[a]ᵀ and an expand kernel
y[m] += s_a·u[m]·B[a]ᵀ, each one launch for the whole batch). Adapters of different ranks are
stacked zero-padded to the largest rank (padded rows of A are zero, so the result is exact).
Inference only (no autograd formula): train adapters with lora_linear / LoRALinear.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from .._tune import bucket, is_traced, run_pick
from ._checks import check_float_input, check_in_features, check_tensor, rows, select_backend, unview

OP = "lora_linear_multi"


def _validate(x, weight, bias, lora_A, lora_B, scalings, adapter_index):
    check_float_input(OP, "x", x)
    K = x.shape[-1]
    check_tensor(OP, "weight", weight, ndim=2, like=x)
    check_in_features(OP, x, weight.shape[1], f"weight is [N, K] = {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None:
        check_tensor(OP, "bias", bias, shape=(N,), like=x)
    check_tensor(OP, "lora_A", lora_A, ndim=3, like=x)
    L, r = lora_A.shape[0], lora_A.shape[1]
    if lora_A.shape[2] != K or L < 1 or r < 1:
        raise ValueError(f"pyhappy::{OP}: lora_A must be [adapters, r_max, K] with K = {K}, got {tuple(lora_A.shape)}")
    check_tensor(OP, "lora_B", lora_B, shape=(L, N, r), like=x)
    if not isinstance(scalings, Tensor) or scalings.dtype != torch.float32 or tuple(scalings.shape) != (L,):
        raise ValueError(f"pyhappy::{OP}: scalings must be float32 [{L}] (one per adapter), got "
                         f"{getattr(scalings, 'dtype', type(scalings).__name__)} {tuple(getattr(scalings, 'shape', ()))}")
    M = rows(x)
    if not isinstance(adapter_index, Tensor) or adapter_index.dtype not in (torch.int32, torch.int64) or \
            adapter_index.numel() != M:
        raise ValueError(f"pyhappy::{OP}: adapter_index must be an int32/int64 tensor with one entry per row of x "
                         f"({M} rows), got {getattr(adapter_index, 'dtype', type(adapter_index).__name__)} "
                         f"{tuple(getattr(adapter_index, 'shape', ()))}")
    for name, t in (("scalings", scalings), ("adapter_index", adapter_index)):
        if t.device != x.device:
            raise ValueError(f"pyhappy::{OP}: {name} is on {t.device} but x is on {x.device}")


def _check_index_range(adapter_index, L):
    """Eager-only (a data-dependent check cannot run on fake tensors): entries in [-1, L). The C++
    kernel checks again; the Triton kernels treat an out-of-range entry as -1 (no adapter)."""
    if adapter_index.numel():
        lo, hi = int(adapter_index.min()), int(adapter_index.max())
        if lo < -1 or hi >= L:
            raise ValueError(f"pyhappy::{OP}: adapter_index entries must lie in [-1, {L}) (-1: no adapter), got "
                             f"[{lo}, {hi}]")


@torch.library.triton_op("pyhappy::lora_linear_multi", mutates_args=())
def _lora_linear_multi(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       scalings: Tensor, adapter_index: Tensor) -> Tensor:
    _validate(x, weight, bias, lora_A, lora_B, scalings, adapter_index)
    return _forward(select_backend(OP, x, "lora_linear_multi_cpu"), x, weight, bias, lora_A, lora_B, scalings,
                    adapter_index)


def _torch_forward(x2, weight, bias, lora_A, lora_B, scalings, idx):
    """The PEFT-style masked loop (a candidate of the measured CPU dispatch, pyhappy.tune): the base
    linear once, then per adapter the rows that use it through two small products, added in place."""
    y = torch.nn.functional.linear(x2, weight, bias)
    idx = idx.to(torch.int64)
    s = scalings.tolist()
    for a in range(lora_A.shape[0]):
        rows = (idx == a).nonzero().squeeze(1)
        if rows.numel():
            xa = x2.index_select(0, rows)
            y.index_add_(0, rows, (xa @ lora_A[a].t()) @ lora_B[a].t(), alpha=s[a])
    return y


def _cpp_forward(x2, weight, bias, lora_A, lora_B, scalings, idx):
    K, N = x2.shape[1], weight.shape[0]
    cands = {"cpp": lambda: torch.ops.pyhappy.lora_linear_multi_cpu(x2.contiguous(), weight, bias, lora_A, lora_B,
                                                                    scalings, idx.to(torch.int64)),
             "torch": lambda: _torch_forward(x2, weight, bias, lora_A, lora_B, scalings, idx)}
    if is_traced(x2):  # the PEFT loop selects rows by value: it cannot run on fake tensors
        del cands["torch"]
    key = lambda: ("fwd", str(x2.dtype).replace("torch.", ""), f"M{bucket(x2.shape[0])}", f"K{K}",  # noqa: E731
                   f"N{N}", f"L{lora_A.shape[0]}", f"r{lora_A.shape[1]}", "bias" if bias is not None else "")
    return run_pick(OP, key, cands, "cpp", x2, cold=(weight,))


def _triton_forward(x2, weight, bias, lora_A, lora_B, scalings, idx):
    return backends.triton_module(OP).lora_linear_multi_forward(x2, weight, bias, lora_A, lora_B, scalings, idx,
                                                                wrap=torch.library.wrap_triton)


# y [M, N] for x2 [M, K] and adapter_index [M], by backend (see pyhappy/backends.py).
FORWARD = {"cpp": _cpp_forward, "triton": _triton_forward, "reference": reference.lora_linear_multi}


def _forward(backend, x, weight, bias, lora_A, lora_B, scalings, adapter_index):
    lead, K, N = x.shape[:-1], x.shape[-1], weight.shape[0]
    y = FORWARD[backend](x.reshape(-1, K), weight, bias, lora_A, lora_B, scalings, adapter_index.reshape(-1))
    return unview(y, (*lead, N))


def lora_linear_multi(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      scalings: Tensor, adapter_index: Tensor) -> Tensor:
    """``x Wᵀ + bias + s_a·(x A_aᵀ) B_aᵀ`` with adapter a = adapter_index[row] (-1: base only).

    Args:
        x: [..., K]; weight [N, K]; bias [N] or None.
        lora_A: [adapters, r_max, K]; lora_B: [adapters, N, r_max] (zero-pad smaller ranks).
        scalings: float32 [adapters]; adapter_index: int [rows] (rows = x.numel() / K).
    Inference only: raises if an input requires grad under grad mode.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_A, lora_B)):
        raise RuntimeError(f"pyhappy::{OP} is inference-only (no autograd formula); run it under torch.no_grad() "
                           "or train with pyhappy.ops.lora_linear")
    if torch.compiler.is_compiling():
        return torch.ops.pyhappy.lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_index)
    _validate(x, weight, bias, lora_A, lora_B, scalings, adapter_index)
    _check_index_range(adapter_index, lora_A.shape[0])
    return _forward(select_backend(OP, x, "lora_linear_multi_cpu"), x, weight, bias, lora_A, lora_B, scalings,
                    adapter_index)


def stack_adapters(pairs, dtype=None, device=None):
    """(lora_A [L, r_max, K], lora_B [L, N, r_max]) from [(A_i [r_i, K], B_i [N, r_i]), ...], zero-padded."""
    if not pairs:
        raise ValueError("stack_adapters: give at least one (A, B) pair")
    r_max = max(A.shape[0] for A, _ in pairs)
    K, N = pairs[0][0].shape[1], pairs[0][1].shape[0]
    dtype = dtype or pairs[0][0].dtype
    device = device or pairs[0][0].device
    As = torch.zeros(len(pairs), r_max, K, dtype=dtype, device=device)
    Bs = torch.zeros(len(pairs), N, r_max, dtype=dtype, device=device)
    for i, (A, B) in enumerate(pairs):
        if A.shape[1] != K or B.shape[0] != N or B.shape[1] != A.shape[0]:
            raise ValueError(f"stack_adapters: pair {i} has A {tuple(A.shape)}, B {tuple(B.shape)}; expected "
                             f"[r, {K}] and [{N}, r]")
        As[i, : A.shape[0]] = A.detach()
        Bs[i, :, : A.shape[0]] = B.detach()
    return As, Bs


def _register_cpp_fakes():
    if hasattr(torch.ops.pyhappy, "lora_linear_multi_cpu"):
        @torch.library.register_fake("pyhappy::lora_linear_multi_cpu")
        def _(x, weight, bias, lora_A, lora_B, scalings, adapter_index):
            return x.new_empty(x.shape[0], weight.shape[0])
