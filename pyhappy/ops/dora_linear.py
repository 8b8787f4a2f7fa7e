"""pyhappy::dora_linear — DoRA (weight-decomposed low-rank adaptation) on the fused LoRA op.

    y = (m / ‖W + s·BA‖_row) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b            (dropout off)

PEFT's formulation (peft/tuners/lora/dora.py) forms W + s·BA, [N, K], every step to take its row
norms. Here

    ‖W_n + s·B_n A‖² = ‖W_n‖² + 2s · B_n·(W Aᵀ)_n + s² · B_n (A Aᵀ) B_nᵀ

needs one [N, K]·[K, r] product (pyhappy::dora_weight_norm), ‖W_n‖² being cached by the caller per
weight version (LoRALinear does), and the rest is pyhappy::lora_linear's kernels plus vector work.

Two ops:
  * ``dora_weight_norm(weight, lora_A, lora_B, weight_sqnorm, scaling) -> [N]``: the norm, not
    differentiable (DoRA treats it as a constant, section 4.3 of the paper; PEFT detaches it).
  * ``dora_linear(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed)
    -> (y, u, z)``: the layer with the norm as an input. Its autograd formula is exact for every
    input, weight_norm included (so float64 gradcheck covers them all); the functional API passes a
    detached norm, so in training nothing flows into it: PEFT's gradients.

Dropout as PEFT applies it: while dropout is active PEFT computes the scaled base term on the
dropped-out input too,

    y = x Wᵀ + b + (ms - 1) ⊙ (xd Wᵀ) + ms ⊙ s · xd Aᵀ Bᵀ = (x - xd) Wᵀ + ms ⊙ zd + b,

xd = dropout(x), zd = xd Wᵀ + s · xd Aᵀ Bᵀ, ms = m / ‖W + s·BA‖: two products with W, PEFT's
cost too. With dropout off (also every eval forward) xd = x and y = ms ⊙ z + b.

Memory (dropout off): y is the lora op's output z scaled in place, and it is y that the backward
keeps, not z: Σ_m dy ⊙ (y - b) = ms ⊙ Σ_m dy ⊙ z gives both the magnitude's and the norm's
gradient, and the magnitude's needs dividing by m (rows with m = 0 are recomputed; see the
backward). The C++ backward forms dz = dy ⊙ ms only in pieces within a tenth of W's size
(_block_cols): dz W as column blocks of dz times W's matching rows accumulated into grad_x (rows
fewer than about K), or as dy times column blocks of ms ⊙ W (more rows), and dz B = dy (ms ⊙ B);
so a step allocates no [M, N] or [N, K] tensor beyond what fused LoRA's does. A caller that modifies y
in place before the backward gets autograd's "modified by an inplace operation" error, as for any op
that saves its output.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, reference
from . import lora_linear as _lora
from .._tune import arg_signature, call_signature, products, remember_unfused, unfused_call, unfused_hit
from ._eager import eager_function
from ._checks import autocast_args, check_tensor, finite_number, rows, unview

OP = "dora_linear"
NORM_OP = "dora_weight_norm"


# ---- the norm ------------------------------------------------------------------------------------


def dora_weight_sqnorm(weight: Tensor) -> Tensor:
    """‖W_n‖² for every row n of weight [N, K], float64 [N] (what dora_weight_norm takes as
    weight_sqnorm; cache it while W is unchanged). Reduced in float32 (float64 for float64)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        return torch.linalg.vector_norm(weight, dim=1, dtype=acc).double().square()


def factored_weight_norm(P, lora_A, lora_B, sq, scaling, dtype):
    """‖W_n + s·B_n A‖ [N] in ``dtype`` from P = W Aᵀ [N, r] and ‖W_n‖² [N] (sq): the [N, r]
    combination in float64. Shared by the torch-op norm below, QDoRA (QLoRALinear, P from the packed
    weight) and pyhappy.compiler's QDoRA rewrite.

    A row where W_n + s·B_n A cancels to below the rounding of its terms can expand to 0 or a
    negative; the norm is floored at eps·(‖W_n‖ + |s|·‖B_n‖·‖A‖) (eps of ``dtype``), the size of the
    rounding noise in the output's numerator x·(W_n + s·B_n A), so such a row's output stays within
    ‖x‖·magnitude (its exact bound) instead of inf or NaN. The C++ kernel applies the same floor."""
    P = P.double()
    Ad, Bd = lora_A.double(), lora_B.double()
    sq = sq.to(P.device).double()
    quad = Bd @ (Ad @ Ad.t())
    n2 = sq + (Bd * (2.0 * scaling * P + (scaling * scaling) * quad)).sum(1)
    floor = torch.finfo(dtype).eps * (sq.sqrt() + abs(scaling) * Bd.norm(dim=1) * Ad.norm())
    return torch.maximum(n2.clamp_min_(0.0).sqrt_(), floor).to(dtype)


def _torch_weight_norm(weight, lora_A, lora_B, sq, scaling):
    """The factored norm in plain torch ops (devices without the C++ kernel): one product W Aᵀ in
    weight's dtype, then factored_weight_norm."""
    return factored_weight_norm(weight @ lora_A.t(), lora_A, lora_B, sq, scaling, weight.dtype)


def _cpp_norm(weight, lora_A, lora_B, sq, scaling):
    if sq is None:
        sq = dora_weight_sqnorm(weight)
    if hasattr(torch.ops.pyhappy, "dora_weight_norm_cpu"):  # an extension built before DoRA lacks it
        with products():
            return torch.ops.pyhappy.dora_weight_norm_cpu(weight, lora_A, lora_B, sq, scaling)
    return _torch_weight_norm(weight, lora_A, lora_B, sq, scaling)


def _triton_norm(weight, lora_A, lora_B, sq, scaling):
    return _torch_weight_norm(weight, lora_A, lora_B, dora_weight_sqnorm(weight) if sq is None else sq, scaling)


def _reference_norm(weight, lora_A, lora_B, sq, scaling):
    return reference.dora_weight_norm(weight, lora_A, lora_B, scaling)


# ‖W_n + s·B_n A‖ [N] by backend (see pyhappy/backends.py); no Triton kernel: torch ops serve it.
NORM = {"cpp": _cpp_norm, "triton": _triton_norm, "reference": _reference_norm}


def _validate_norm(weight, lora_A, lora_B, sq, scaling):
    check_tensor(NORM_OP, "weight", weight, ndim=2)
    if not weight.is_floating_point():
        raise TypeError(f"pyhappy::{NORM_OP}: weight must be a float tensor, got {weight.dtype}")
    finite_number(f"pyhappy::{NORM_OP}", "scaling", scaling)
    N, K = weight.shape
    check_tensor(NORM_OP, "lora_A", lora_A, ndim=2)
    if lora_A.shape[1] != K or lora_A.shape[0] < 1:
        raise ValueError(f"pyhappy::{NORM_OP}: lora_A must be [r, K] with r >= 1 and K = {K}, got "
                         f"{tuple(lora_A.shape)}")
    for name, t, shape in (("lora_A", lora_A, None), ("lora_B", lora_B, (N, lora_A.shape[0]))):
        check_tensor(NORM_OP, name, t, shape=shape)
        if t.dtype != weight.dtype or t.device != weight.device:
            raise TypeError(f"pyhappy::{NORM_OP}: {name} must have weight's dtype and device ({weight.dtype}, "
                            f"{weight.device}), got {t.dtype} on {t.device}")
    if sq is not None:
        check_tensor(NORM_OP, "weight_sqnorm", sq, shape=(N,))
        if not sq.is_floating_point() or sq.device != weight.device:
            raise TypeError(f"pyhappy::{NORM_OP}: weight_sqnorm must be a float tensor on weight's device "
                            f"({weight.device}), got {sq.dtype} on {sq.device}")


@torch.library.custom_op("pyhappy::dora_weight_norm", mutates_args=())
def _dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, weight_sqnorm: Optional[Tensor],
                      scaling: float) -> Tensor:
    _validate_norm(weight, lora_A, lora_B, weight_sqnorm, scaling)
    return backends.run(OP, NORM, weight.device, weight.dtype, weight, lora_A, lora_B, weight_sqnorm, scaling)


@_dora_weight_norm.register_fake
def _(weight, lora_A, lora_B, weight_sqnorm, scaling):
    _validate_norm(weight, lora_A, lora_B, weight_sqnorm, scaling)
    return weight.new_empty(weight.shape[0])


def _norm_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output)


def _norm_backward(ctx, grad):
    return None, None, None, None, None


_dora_weight_norm.register_autograd(_norm_backward, setup_context=_norm_setup_context)


def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     weight_sqnorm: Optional[Tensor] = None) -> Tensor:
    """‖W_n + s·B_n A‖ for every row n, [N] in weight's dtype, without forming W + s·BA; not
    differentiable (DoRA's detached norm). weight_sqnorm: ‖W_n‖² [N] (``dora_weight_sqnorm(weight)``),
    computed here when omitted (one more pass over W)."""
    scaling = finite_number(f"pyhappy::{NORM_OP}", "scaling", scaling)
    return torch.ops.pyhappy.dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(),
                                              None if weight_sqnorm is None else weight_sqnorm.detach(),
                                              float(scaling))


# ---- the layer -----------------------------------------------------------------------------------


def _validate(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, dropout_p, seed, scaling):
    """Every argument checked, the one at fault named (weight_norm None: not given yet)."""
    _lora._validate(x, weight, bias, lora_A, lora_B, None, dropout_p, seed, scaling, op=OP)
    N = weight.shape[0]
    check_tensor(OP, "magnitude", magnitude, shape=(N,), like=x)
    if weight_norm is not None:
        check_tensor(OP, "weight_norm", weight_norm, shape=(N,), like=x)


def _forward(backend, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed):
    lead, K, N, r = x.shape[:-1], x.shape[-1], weight.shape[0], lora_A.shape[0]
    x2 = x.reshape(-1, K)
    ms = magnitude / weight_norm
    if dropout_p == 0.0:
        z, u = _lora._forward(backend, x2, weight, None, lora_A, lora_B, None, scaling, 0.0, None)
        # z is the lora op's fresh output: y is z scaled in place (one pass), the only [M, N] tensor
        y = z.mul_(ms) if bias is None else torch.addcmul(bias, z, ms, out=z)
        zd = x.new_empty(0)
    else:
        xd = _lora._dropout(x2, dropout_p, seed)
        zd, u = _lora._forward(backend, xd, weight, None, lora_A, lora_B, None, scaling, 0.0, None)
        y = F.linear(x2 - xd, weight, bias).addcmul_(zd, ms)
    return unview(y, (*lead, N)), unview(u, (*lead, r)), zd


@torch.library.triton_op("pyhappy::dora_linear", mutates_args=())
def _dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """(y [..., N], u [..., r], zd): u = dropout(x) Aᵀ (the hidden state the backward reuses); zd the
    unscaled dropped-out product [M, N] when dropout_p > 0 (the backward needs it), else empty [0]."""
    _validate(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, dropout_p, seed, scaling)
    return _forward(backends.select(OP, x.device, x.dtype), x, weight, bias, lora_A, lora_B, magnitude, weight_norm,
                    scaling, dropout_p, seed)


def _block_cols(K: int) -> int:
    """Columns of W per block of the C++ backward's dz W: its one buffer, [N, cols] of ms ⊙ W or as
    many elements of dz's column blocks, is the only temporary the backward adds to LoRA's. cols
    <= K/10 keeps it within a tenth of W's size; as wide as that allows (in multiples of 64), since
    more blocks cost more passes (compare dora_linear fwd+bwd M=512 against LoRA in
    benchmarks/dora_linear.py)."""
    return max(64, (K // 10) // 64 * 64)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backward_nodrop(backend, dy, x2, weight, bias, lora_A, lora_B, magnitude, weight_norm, y, u, scaling,
                     need_grad_x):
    """(grad_x, grad_A, grad_B, S) with S = Σ_m dy ⊙ (y - b) = ms ⊙ Σ_m dy ⊙ z: the reference and
    Triton backends' form, with dz = dy ⊙ ms formed whole (the C++ op dora_linear_backward_cpu
    never forms it)."""
    acc = _acc(x2.dtype)
    ms = magnitude / weight_norm
    S = ((y if bias is None else y - bias).to(acc) * dy.to(acc)).sum(0)
    gx, gA, gB, _ = _lora._backward_impl(backend, dy * ms, x2, weight, lora_A, lora_B, None, u, scaling, 0.0, None,
                                         need_grad_x)
    return gx, gA, gB, S


def _cpp_backward_nodrop(dy, x2, weight, bias, lora_A, lora_B, magnitude, weight_norm, y, u, scaling, need_grad_x):
    if not hasattr(torch.ops.pyhappy, "dora_linear_backward_cpu"):  # an extension built before DoRA lacks it
        return _backward_nodrop("cpp", dy, x2, weight, bias, lora_A, lora_B, magnitude, weight_norm, y, u, scaling,
                                need_grad_x)
    with products():
        gx, gA, gB, S = torch.ops.pyhappy.dora_linear_backward_cpu(
            dy, x2, weight, bias, lora_A, lora_B, magnitude, weight_norm, y, u, scaling, need_grad_x,
            _block_cols(x2.shape[1]))
    return gx, gA, gB, S.to(_acc(x2.dtype))


# (grad_x, grad_A, grad_B, S) of the backward with dropout off, by backend (see pyhappy/backends.py).
BACKWARD_NODROP = {"cpp": _cpp_backward_nodrop, "triton": functools.partial(_backward_nodrop, "triton"),
                   "reference": functools.partial(_backward_nodrop, "reference")}


@torch.library.custom_op("pyhappy::dora_linear_backward", mutates_args=())
def _dora_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    weight_norm: Tensor,
    out: Tensor,
    lora_hidden: Tensor,
    lora_z: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    need_grad_x: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (grad_x, grad_A, grad_B, grad_magnitude, grad_weight_norm) of dora_linear; grad_x is
    empty [0] when not needed. ``out`` is the forward's y, ``lora_z`` its zd.

    A custom op (not traced into by torch.compile): rows whose magnitude is exactly 0 have lost z
    from y (y = b there), so their magnitude gradient Σ_m dy ⊙ z / ‖·‖ is recomputed from x, W and u
    for those rows only, a data-dependent step that runs on real tensors."""
    K, N, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    M = rows(x)
    x2 = x.reshape(M, K)
    dy = grad_out.reshape(M, N)
    u = lora_hidden.reshape(M, r)
    backend = backends.select(OP, x.device, x.dtype)
    acc = _acc(x.dtype)
    ms = magnitude / weight_norm
    if dropout_p == 0.0:
        y2 = out.reshape(M, N)
        gx, gA, gB, S = BACKWARD_NODROP[backend](dy, x2, weight, bias, lora_A, lora_B, magnitude, weight_norm, y2, u,
                                                 scaling, need_grad_x)
        g_wn = -S / weight_norm.to(acc)
        g_m = S / magnitude.to(acc)
        zero = magnitude == 0
        if bool(zero.any()):
            idx = zero.nonzero().squeeze(1)
            z = (x2 @ weight[idx].t()).to(acc) + scaling * (u @ lora_B[idx].t()).to(acc)
            g_m[idx] = (dy[:, idx].to(acc) * z).sum(0) / weight_norm[idx].to(acc)
    else:
        xd = _lora._dropout(x2, dropout_p, seed)
        dz = dy * ms
        gxd, gA, gB, _ = _lora._backward_impl(backend, dz, xd, weight, lora_A, lora_B, None, u, scaling, 0.0, None,
                                              need_grad_x)
        if need_grad_x:  # d/dx of (x - xd) Wᵀ + ms ⊙ zd(xd): dy W + dropout(dz-path - dy W)
            base = dy @ weight
            gx = base.add_(_lora._dropout(gxd.reshape(-1, K) - base, dropout_p, seed))
        else:
            gx = x.new_empty(0)
        S = (dy.to(acc) * lora_z.reshape(M, N).to(acc)).sum(0)
        g_m = S / weight_norm.to(acc)
        g_wn = -S * ms.to(acc) / weight_norm.to(acc)
    return (gx.reshape(x.shape) if need_grad_x else gx), gA, gB, g_m.to(magnitude.dtype), g_wn.to(weight_norm.dtype)


@_dora_linear_backward.register_fake
def _(grad_out, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, out, lora_hidden, lora_z, scaling, dropout_p,
      seed, need_grad_x):
    gx = x.new_empty(x.shape) if need_grad_x else x.new_empty(0)
    return (gx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), magnitude.new_empty(magnitude.shape),
            weight_norm.new_empty(weight_norm.shape))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed = inputs
    y, u, zd = output
    ctx.mark_non_differentiable(u, zd)
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, y, u, zd, seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p


def _backward(ctx, grad_y, grad_u, grad_z):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, y, u, zd, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, gA, gB, gm, gwn = getattr(ctx, "backward_op", torch.ops.pyhappy.dora_linear_backward)(
        grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, y, u, zd, ctx.scaling, ctx.dropout_p, seed,
        need[0])
    N, K = weight.shape
    dy = grad_y.reshape(rows(x), N)
    g_bias = dy.sum(0) if need[2] else None
    g_weight = None
    if need[1]:
        # The base weight is frozen in DoRA training; if a caller makes it trainable, its gradient
        # (the norm held constant, as DoRA does) is exact: (dy ⊙ ms)ᵀ xd + dyᵀ (x - xd).
        x2 = x.reshape(rows(x), K)
        ms = magnitude / weight_norm
        if ctx.dropout_p == 0.0:
            g_weight = (dy.t() @ x2) * ms[:, None]
        else:
            xd = _lora._dropout(x2, ctx.dropout_p, seed)
            g_weight = (dy * ms).t() @ xd + dy.t() @ (x2 - xd)
    return (gx if need[0] else None, g_weight, g_bias, gA if need[3] else None, gB if need[4] else None,
            gm if need[5] else None, gwn if need[6] else None, None, None, None)


_dora_linear.register_autograd(_backward, setup_context=_setup_context)
_Eager = eager_function("DoraLinear", _dora_linear, _setup_context, _backward, _dora_linear_backward)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    seed: Optional[Tensor] = None,
    weight_sqnorm: Optional[Tensor] = None,
    weight_norm: Optional[Tensor] = None,
) -> Tensor:
    """DoRA linear, PEFT's numerics without forming W + s·BA:
    ``y = x Wᵀ + b + (ms - 1) ⊙ (xd Wᵀ) + ms ⊙ s · (xd Aᵀ) Bᵀ``, ms = magnitude / ‖W + s·BA‖_row
    (detached), xd = dropout(x); with dropout_p = 0 that is ``ms ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b``.

    Args:
        x: [..., K] input.
        weight: [N, K] frozen base weight; bias: [N] or None (added unscaled, as PEFT does).
        lora_A: [r, K]; lora_B: [N, r]; magnitude: [N] (PEFT's lora_magnitude_vector).
        scaling: the LoRA scale s; a finite real number.
        dropout_p: dropout probability (modules pass 0 in eval mode); seed as for lora_linear.
        weight_sqnorm: ‖W_n‖² [N] (``pyhappy.ops.dora_weight_sqnorm(weight)``); pass it
            while W is unchanged to skip one pass over W per call (LoRALinear caches it).
        weight_norm: ‖W + s·BA‖_row [N] (``dora_weight_norm``, or ``DoraNormCache``) for these
            weight, lora_A, lora_B and scaling: no norm is computed (no pass over W); the caller
            answers for it matching them (LoRALinear passes its cached norm). weight_sqnorm is
            then unused.
    Returns:
        y [..., N] in x's dtype (or the autocast dtype).
    """
    scaling = finite_number(f"pyhappy::{OP}", "scaling", scaling)
    if weight_norm is not None:
        check_tensor(OP, "weight_norm", weight_norm)  # a tensor, before autocast casts it
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm = autocast_args(x, weight, bias, lora_A, lora_B, magnitude,
                                                                            weight_norm)
    if dropout_p > 0.0 and seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
    if weight_norm is not None:
        weight_norm = weight_norm.detach()
    call = (x, weight, bias, lora_A, lora_B, magnitude, float(scaling), float(dropout_p), seed, weight_sqnorm,
            weight_norm)
    sig = arg_signature(*call[:6], weight_norm) if dropout_p == 0.0 else None
    if unfused_hit(OP, sig):
        return _unfused(*call)
    _validate(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, dropout_p, seed, scaling)
    if dropout_p == 0.0 and not weight.requires_grad:
        need = tuple(t for t in (x, bias, lora_A, lora_B, magnitude) if t is not None and t.requires_grad
                     ) if torch.is_grad_enabled() else ()
        memo, key = call_signature(x, weight.shape[0], lora_A.shape[0], bias,
                                   tuple(t.requires_grad for t in call[:6] if t is not None) if need else (),
                                   memo=(weight_norm is not None,),
                                   tags=("norm",) if weight_norm is not None else ())
        if unfused_call(OP, memo, key, lambda: _op_call(*call), lambda: _unfused(*call), x, need, cold=(weight,)):
            remember_unfused(OP, sig)
            return _unfused(*call)
    return _op_call(*call)


def _unfused(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_sqnorm, weight_norm):
    """PEFT's formulation in plain torch ops, dropout off: the detached norm of the formed W + s·BA
    (or the given weight_norm), then ms ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b (a candidate of the measured
    dispatch, pyhappy.tune)."""
    if weight_norm is not None:
        wn = weight_norm
    else:
        with torch.no_grad():
            wn = torch.linalg.vector_norm(torch.addmm(weight, lora_B, lora_A, alpha=scaling), dim=1)
    y = torch.addmm(F.linear(x, weight).reshape(-1, weight.shape[0]), F.linear(x, lora_A).reshape(-1, lora_A.shape[0]),
                    lora_B.t(), alpha=scaling)
    y = y * (magnitude / wn) if bias is None else torch.addcmul(bias, y, magnitude / wn)
    return y.view(*x.shape[:-1], weight.shape[0])


def _op_call(x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed, weight_sqnorm, weight_norm):
    wn = dora_weight_norm(weight, lora_A, lora_B, scaling, weight_sqnorm) if weight_norm is None else weight_norm
    args = (x, weight, bias, lora_A, lora_B, magnitude, wn, scaling, dropout_p, seed)
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6])
    ):
        # Eager inference: nothing to record for autograd, so run the same implementation without
        # the custom-op dispatcher around it (as lora_linear does); the arguments are checked above.
        return _forward(backends.select(OP, x.device, x.dtype), *args)[0]
    return _Eager(*args)[0]  # the registered op's forward and gradient, without its dispatcher layers


class DoraNormCache:
    """‖W + s·BA‖_row kept from one call to the next while W, A, B and s are unchanged, so that
    serving (or the micro-batches of one optimizer step) computes DoRA's norm once instead of one
    pass over W per call.

    ``get(key, lora_A, lora_B, compute)``: the norm ``compute()`` returned last time if ``key`` (the
    caller's description of W, s and the autocast state: W's data pointer, version counter, shape,
    dtype and device) is the same and A and B are unchanged; else ``compute()``, kept. A frozen W's
    version counter is reliable (every in-place op bumps it; a write through ``.data`` does not, and
    is not seen); a trainable one is not: ``key=None`` disables the cache for that call. A and B:

      * on the CPU, compared by value with the copies kept last time (their r·(K + N) elements,
        against the N·K of the norm's pass): fused optimizers (``torch.optim.AdamW(fused=True)``)
        update parameters in place without bumping their version counters;
      * on other devices (where a comparison would wait for the device on every call), by address
        and version counter, and only while neither requires grad (no optimizer updates them);
        trainable ones recompute the norm on the device every call.

    A norm computed under ``torch.inference_mode`` is handed out of it as a normal tensor (one copy
    of [N]), so a training step after an inference-mode evaluation can save it for backward."""

    def __init__(self):
        self._entry = None

    def get(self, key, lora_A: Tensor, lora_B: Tensor, compute) -> Tensor:
        A, B = lora_A.detach(), lora_B.detach()
        by_value = A.device.type == "cpu"
        if key is not None and not by_value:
            key = None if (lora_A.requires_grad or lora_B.requires_grad or A.device.type == "meta") else (
                key, tensor_ident(A), tensor_ident(B))
        e = self._entry
        if key is not None and e is not None and e[0] == key and (not by_value or (_same(e[1], A) and _same(e[2], B))):
            norm = e[3]
            if norm.is_inference() and not torch.is_inference_mode_enabled():
                norm = norm.clone()
                self._entry = (*e[:3], norm)
            return norm
        norm = compute()
        self._entry = None if key is None else (key, A.clone() if by_value else None, B.clone() if by_value else None,
                                                norm)
        return norm

    def clear(self):
        self._entry = None


def tensor_ident(t: Tensor) -> tuple:
    """(data pointer, version counter, shape, dtype, device): what identifies ``t``'s current
    contents without reading them (the DoRA norm caches' keys)."""
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)


def _same(kept: Tensor, t: Tensor) -> bool:
    return (kept.shape == t.shape and kept.dtype == t.dtype and kept.device == t.device
            and bool(torch.equal(kept, t)))


def _register_cpp_fakes():
    """Fake kernel for the C++ op, so torch.compile can trace the cpp backend."""

    @torch.library.register_fake("pyhappy::dora_weight_norm_cpu")
    def _(weight, lora_A, lora_B, weight_sqnorm, scaling):
        return weight.new_empty(weight.shape[0])

    @torch.library.register_fake("pyhappy::dora_linear_backward_cpu")
    def _(grad_out, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, out, lora_hidden, scaling, need_grad_x,
          block_cols):
        gx = x.new_empty(x.shape) if need_grad_x else x.new_empty(0)
        return (gx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape),
                x.new_empty(weight.shape[0], dtype=torch.float64))
