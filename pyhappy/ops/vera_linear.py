"""pyhappy::vera_linear and pyhappy::pvera_linear — VeRA and PVeRA on the fused LoRA op's kernels.

VeRA (PEFT's peft/tuners/vera):

    y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (dropout(x) Aᵀ)) Bᵀ)

A [r, K] and B [N, r] are frozen random projections shared by every layer of a model (sliced to the
layer), λ_d [r] and λ_b [N] the trainable vectors. It is LoRA with B' = diag(λ_b) B diag(λ_d), an
[N, r] scaling formed per call (N·r, nothing next to the products), so the forward is
pyhappy::lora_linear's (fused C++ on CPU, Triton on CUDA) with lora_A = A, lora_B = B', s = 1. Its
hidden state u = dropout(x) Aᵀ is unscaled, which is what the backward needs:

    dh = dy (λ_b ⊙ B)       [M, r]   dx = dy W + dropout((dh ⊙ λ_d) A)
    G  = dyᵀ u              [N, r]   ∂λ_b = (G ⊙ B) λ_d,   ∂λ_d = λ_bᵀ (G ⊙ B)

Three adapter products besides dy W (LoRA's backward has four: A and B are frozen here, so no [r, K]
gradient is formed unless A itself requires grad).

PVeRA (peft/tuners/pvera): A is [2r, K], λ_d [2r]; the rank-space hidden λ_d ⊙ (dropout(x) Aᵀ) is
split into (μ, log σ²) and, when sampling (training, or PEFT's sample_at_inference),

    h = μ + ε ⊙ exp(½ log σ²),     y = x Wᵀ + b + λ_b ⊙ (h Bᵀ)

else h = μ, which is VeRA on the first r rows (that path runs vera_linear's). ε is
reference.gaussian_noise(noise_seed, M, r): Box-Muller on pyhappy's counter-based dropout hash, a
pure function of (seed, row, col), so the backward regenerates it rather than storing it and a step
is reproducible from torch's generator (the seeds are drawn from it, as dropout's is).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, reference
from .lora_linear import _dropout as _lora_dropout
from .lora_linear import _forward as _lora_forward
from ._checks import autocast_args, check_dropout, check_float_input, check_tensor, unview

OP = "vera_linear"
POP = "pvera_linear"


def _validate(x, weight, bias, A, B, lambda_d, lambda_b, dropout_p, seed, op=OP, noise_seed=None):
    """Every argument checked, the one at fault named. VeRA: A [r, K], B [N, r], lambda_d [r];
    PVeRA (op=POP): A [2r, K], B [N, r], lambda_d [2r]."""
    pv = op == POP
    a_name, b_name = ("pvera_A", "pvera_B") if pv else ("vera_A", "vera_B")
    check_float_input(op, "x", x)
    K = x.shape[-1]
    check_tensor(op, "weight", weight, ndim=2, like=x)
    if weight.shape[1] != K:
        raise ValueError(f"pyhappy::{op}: weight must be [N, K] with K = x.shape[-1] = {K}, got {tuple(weight.shape)}")
    N = weight.shape[0]
    check_tensor(op, a_name, A, ndim=2, like=x)
    rows = A.shape[0]
    if A.shape[1] != K or rows < 1 or (pv and rows % 2):
        want = "[2r, K] with r >= 1" if pv else "[r, K] with r >= 1"
        raise ValueError(f"pyhappy::{op}: {a_name} must be {want} and K = {K}, got {tuple(A.shape)}")
    r = rows // 2 if pv else rows
    check_tensor(op, b_name, B, shape=(N, r), like=x)
    check_tensor(op, "lambda_d", lambda_d, shape=(rows,), like=x)
    check_tensor(op, "lambda_b", lambda_b, shape=(N,), like=x)
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(N,), like=x)
    check_dropout(op, dropout_p, seed)
    if seed is not None and seed.device != x.device:
        raise ValueError(f"pyhappy::{op}: seed is on {seed.device} but x is on {x.device}")
    if noise_seed is not None:
        if not isinstance(noise_seed, torch.Tensor) or noise_seed.dtype != torch.int64 or noise_seed.numel() != 1:
            raise TypeError(f"pyhappy::{op}: noise_seed must be an int64 tensor with one element")
        if noise_seed.device != x.device:
            raise ValueError(f"pyhappy::{op}: noise_seed is on {noise_seed.device} but x is on {x.device}")


def _draw_seed(x):
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)


# ---- VeRA ----------------------------------------------------------------------------------------


def _vera_forward(backend, x, weight, bias, A, B, lambda_d, lambda_b, dropout_p, seed):
    """(y, u): lora_linear's forward with lora_B = diag(λ_b) B diag(λ_d), s = 1; u = dropout(x) Aᵀ."""
    B_full = (B * lambda_b[:, None]) * lambda_d
    return _lora_forward(backend, x, weight, bias, A, B_full, None, 1.0, dropout_p, seed)


@torch.library.triton_op("pyhappy::vera_linear", mutates_args=())
def _vera_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], vera_A: Tensor, vera_B: Tensor,
                 lambda_d: Tensor, lambda_b: Tensor, dropout_p: float, seed: Optional[Tensor]
                 ) -> tuple[Tensor, Tensor]:
    """(y [..., N], u [..., r]); u = dropout(x) Aᵀ, the hidden state the backward reuses."""
    _validate(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p, seed)
    return _vera_forward(backends.select(OP, x.device, x.dtype), x, weight, bias, vera_A, vera_B, lambda_d, lambda_b,
                         dropout_p, seed)


def _vera_grads(dy, x2, weight, A, B, lambda_d, lambda_b, u, dropout_p, seed, need_x, need_A, need_B, need_d,
                need_b):
    """(gx, gA, gB, gλ_d, gλ_b) of the VeRA adapter plus dy W (None where not needed); dy [M, N],
    x2 [M, K], u = dropout(x) Aᵀ [M, r]."""
    gx = gA = gB = gd = gb = None
    if need_x or need_A:
        du = (dy @ (B * lambda_b[:, None])).mul_(lambda_d)
        if need_x:
            gx = dy @ weight
            if dropout_p == 0.0:
                gx.addmm_(du, A)
            else:
                gx.add_(_lora_dropout(du @ A, dropout_p, seed))
        if need_A:
            gA = du.t() @ _lora_dropout(x2, dropout_p, seed)
    if need_B or need_d or need_b:
        G = dy.t() @ u
        if need_B:
            gB = G * lambda_b[:, None] * lambda_d
        GB = G * B
        if need_d:
            gd = lambda_b @ GB
        if need_b:
            gb = GB @ lambda_d
    return gx, gA, gB, gd, gb


def _base_grads(need, dy, x2, weight):
    """(g_weight, g_bias): the base weight and bias are frozen in adapter training; if a caller makes
    them trainable their gradients are still exact (an [N, K] buffer exists only then)."""
    return (dy.t() @ x2 if need[1] else None), (dy.sum(0) if need[2] else None)


def _vera_setup_context(ctx, inputs, output):
    x, weight, bias, A, B, lambda_d, lambda_b, dropout_p, seed = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, weight, A, B, lambda_d, lambda_b, u, seed)
    ctx.dropout_p = dropout_p


def _vera_backward(ctx, grad_y, grad_u):
    x, weight, A, B, lambda_d, lambda_b, u, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    N, K = weight.shape
    dy = grad_y.reshape(-1, N)
    x2 = x.reshape(-1, K)
    gx, gA, gB, gd, gb = _vera_grads(dy, x2, weight, A, B, lambda_d, lambda_b, u.reshape(-1, A.shape[0]),
                                     ctx.dropout_p, seed, *need[0:1], *need[3:7])
    gW, gbias = _base_grads(need, dy, x2, weight)
    return (None if gx is None else gx.reshape(x.shape)), gW, gbias, gA, gB, gd, gb, None, None


_vera_linear.register_autograd(_vera_backward, setup_context=_vera_setup_context)


def vera_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], vera_A: Tensor, vera_B: Tensor, lambda_d: Tensor,
                lambda_b: Tensor, dropout_p: float = 0.0, *, seed: Optional[Tensor] = None) -> Tensor:
    """VeRA linear, PEFT's numerics: ``y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (dropout(x) Aᵀ)) Bᵀ)``.

    Args:
        x: [..., K] input.
        weight: [N, K] frozen base weight; bias: [N] or None.
        vera_A: [r, K], vera_B: [N, r]: the shared frozen projections sliced to this layer
            (PEFT's vera_A[:, :K], vera_B[:N, :]).
        lambda_d: [r], lambda_b: [N]: the trainable scaling vectors.
        dropout_p: dropout probability on the adapter's input (modules pass 0 in eval mode).
        seed: int64 tensor of one element on x's device fixing the dropout mask; drawn from torch's
            generator when omitted.
    Returns:
        y [..., N] in x's dtype (or the autocast dtype).
    """
    x, weight, bias, vera_A, vera_B, lambda_d, lambda_b = autocast_args(x, weight, bias, vera_A, vera_B, lambda_d,
                                                                        lambda_b)
    if dropout_p > 0.0 and seed is None:
        seed = _draw_seed(x)
    args = (x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, float(dropout_p), seed)
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:7])
    ):
        # Eager inference: nothing for autograd to record; skip the dispatcher (as lora_linear does).
        _validate(*args)
        return _vera_forward(backends.select(OP, x.device, x.dtype), *args)[0]
    return torch.ops.pyhappy.vera_linear(*args)[0]


# ---- PVeRA ---------------------------------------------------------------------------------------


def _noise(noise_seed, M, r, like):
    """ε [M, r] in like's dtype: the C++ kernel on CPU (one pass), else the torch formulation (the
    same numbers: both compute in float64)."""
    if (like.device.type == "cpu" and hasattr(torch.ops.pyhappy, "gaussian_noise_cpu")
            and backends.select(POP, like.device, like.dtype) != "reference"):
        return torch.ops.pyhappy.gaussian_noise_cpu(noise_seed, M, r, like.dtype)
    return reference.gaussian_noise(noise_seed, M, r, like.dtype, like.device)


def _register_cpp_fakes():
    """Fake kernel for the C++ noise, so torch.compile can trace the cpp backend."""

    @torch.library.register_fake("pyhappy::gaussian_noise_cpu")
    def _(seed, rows, cols, dtype):
        return seed.new_empty(rows, cols, dtype=dtype)


# The adapter input's dropout by backend: the C++ kernel where lora_linear runs it, else the reference.
_DROPOUT = {"cpp": _lora_dropout, "triton": _lora_dropout, "reference": reference.dropout}


def _pvera_forward(backend, x, weight, bias, A, B, lambda_d, lambda_b, dropout_p, sample, seed, noise_seed):
    lead, K, N, r2 = x.shape[:-1], x.shape[-1], weight.shape[0], A.shape[0]
    r = r2 // 2
    if not sample:  # h = μ: VeRA on the μ half of A and λ_d
        return _vera_forward(backend, x, weight, bias, A[:r], B, lambda_d[:r], lambda_b, dropout_p, seed)
    x2 = x.reshape(-1, K)
    u = _DROPOUT[backend](x2, dropout_p, seed) @ A.t()
    t = u * lambda_d
    h = torch.addcmul(t[:, :r], _noise(noise_seed, x2.shape[0], r, x2), torch.exp(0.5 * t[:, r:]))
    y = F.linear(x2, weight, bias).addmm_(h, (B * lambda_b[:, None]).t())
    return unview(y, (*lead, N)), unview(u, (*lead, r2))


@torch.library.triton_op("pyhappy::pvera_linear", mutates_args=())
def _pvera_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], pvera_A: Tensor, pvera_B: Tensor,
                  lambda_d: Tensor, lambda_b: Tensor, dropout_p: float, sample: bool, seed: Optional[Tensor],
                  noise_seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y [..., N], u): u = dropout(x) Aᵀ, [..., 2r] when sampling, else [..., r] (the μ half only)."""
    _validate(x, weight, bias, pvera_A, pvera_B, lambda_d, lambda_b, dropout_p, seed, POP, noise_seed)
    if sample and noise_seed is None:
        raise ValueError(f"pyhappy::{POP}: sample=True needs noise_seed (an int64 tensor of one element)")
    return _pvera_forward(backends.select(POP, x.device, x.dtype), x, weight, bias, pvera_A, pvera_B, lambda_d,
                          lambda_b, dropout_p, sample, seed, noise_seed)


def _pvera_setup_context(ctx, inputs, output):
    x, weight, bias, A, B, lambda_d, lambda_b, dropout_p, sample, seed, noise_seed = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, weight, A, B, lambda_d, lambda_b, u, seed, noise_seed)
    ctx.dropout_p = dropout_p
    ctx.sample = sample


def _pvera_backward(ctx, grad_y, grad_u):
    x, weight, A, B, lambda_d, lambda_b, u, seed, noise_seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    N, K = weight.shape
    r2 = A.shape[0]
    r = r2 // 2
    dy = grad_y.reshape(-1, N)
    x2 = x.reshape(-1, K)
    p = ctx.dropout_p
    gW, gbias = _base_grads(need, dy, x2, weight)
    if not ctx.sample:
        gx, gA, gB, gd, gb = _vera_grads(dy, x2, weight, A[:r], B, lambda_d[:r], lambda_b, u.reshape(-1, r), p, seed,
                                         need[0], need[3], need[4], need[5], need[6])
        if gA is not None:
            gA = torch.cat([gA, gA.new_zeros(r, K)])
        if gd is not None:
            gd = torch.cat([gd, gd.new_zeros(r)])
    else:
        u = u.reshape(-1, r2)
        t = u * lambda_d
        eps = _noise(noise_seed, u.shape[0], r, u)
        es = eps.mul_(torch.exp(0.5 * t[:, r:]))  # ε σ
        gx = gA = gB = gd = gb = None
        if need[4] or need[6]:
            G = dy.t() @ (t[:, :r] + es)  # dyᵀ h [N, r]
            gB = G * lambda_b[:, None] if need[4] else None
            gb = (G * B).sum(1) if need[6] else None
        if need[0] or need[3] or need[5]:
            dh = dy @ (B * lambda_b[:, None])
            dt = torch.cat([dh, dh * es * 0.5], dim=1)  # d/dμ, d/dlog σ²
            gd = (dt * u).sum(0) if need[5] else None
            du = dt.mul_(lambda_d)
            if need[0]:
                gx = dy @ weight
                if p == 0.0:
                    gx.addmm_(du, A)
                else:
                    gx.add_(_lora_dropout(du @ A, p, seed))
            if need[3]:
                gA = du.t() @ _lora_dropout(x2, p, seed)
    return ((None if gx is None else gx.reshape(x.shape)), gW, gbias, gA, gB, gd, gb, None, None, None, None)


_pvera_linear.register_autograd(_pvera_backward, setup_context=_pvera_setup_context)


def pvera_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], pvera_A: Tensor, pvera_B: Tensor,
                 lambda_d: Tensor, lambda_b: Tensor, dropout_p: float = 0.0, *, sample: bool = False,
                 seed: Optional[Tensor] = None, noise_seed: Optional[Tensor] = None) -> Tensor:
    """PVeRA linear, PEFT's numerics: (μ, log σ²) = chunk(λ_d ⊙ (dropout(x) Aᵀ), 2),
    h = μ + ε ⊙ exp(½ log σ²) if ``sample`` else μ, ``y = x Wᵀ + b + λ_b ⊙ (h Bᵀ)``.

    Args:
        x: [..., K]; weight: [N, K] frozen; bias: [N] or None.
        pvera_A: [2r, K], pvera_B: [N, r]: the shared frozen projections sliced to this layer.
        lambda_d: [2r] (first half scales μ, second log σ²), lambda_b: [N]: trainable.
        dropout_p: dropout on the adapter's input; seed as for vera_linear.
        sample: draw h (PEFT's training mode, or eval with sample_at_inference); False: h = μ.
        noise_seed: int64 tensor of one element fixing ε (pyhappy's counter-based Gaussian); drawn
            from torch's generator when omitted, so torch.manual_seed reproduces a step.
    Returns:
        y [..., N] in x's dtype (or the autocast dtype).
    """
    if not isinstance(sample, bool):
        raise TypeError(f"pyhappy::{POP}: sample must be True or False, got {sample!r}")
    x, weight, bias, pvera_A, pvera_B, lambda_d, lambda_b = autocast_args(x, weight, bias, pvera_A, pvera_B,
                                                                          lambda_d, lambda_b)
    if dropout_p > 0.0 and seed is None:
        seed = _draw_seed(x)
    if sample and noise_seed is None:
        noise_seed = _draw_seed(x)
    args = (x, weight, bias, pvera_A, pvera_B, lambda_d, lambda_b, float(dropout_p), sample, seed, noise_seed)
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:7])
    ):
        _validate(*args[:8], seed, POP, noise_seed)
        return _pvera_forward(backends.select(POP, x.device, x.dtype), *args[:8], sample, seed, noise_seed)[0]
    return torch.ops.pyhappy.pvera_linear(*args)[0]
