"""pyhappy::moe_lora_linear — a mixture of LoRA experts as one fused training op.

    logits = x Rᵀ,  p = softmax(logits) (fp32),  (e_1..e_k) = top-k of p per token,
    g_j = p_{e_j} (/ Σ_j p_{e_j} when normalize),
    y = x Wᵀ + b + s · Σ_j g_j · B_{e_j} (A_{e_j} dropout(x))

R [E, K] the router (trainable), A [E, r, K] and B [E, N, r] the experts. Ties in the top-k go to
the lower expert index on every backend (pyhappy/reference.py pins the semantics).

The schedule every backend follows: the router and top-k once; the M·k (token, slot) assignments
sorted by expert once (a counting sort: ``perm`` lists the flat assignment t·k + j of each sorted
slot, ``offsets`` [E + 1] the segment of each expert), so each expert's tokens are one contiguous
segment; per segment the skinny products u = x_e A_eᵀ [m_e, r] over the segment's rows of
dropout(x) (the C++ kernels read them in place through the sorted token list, the other backends
gather them once) and (s·g ⊙ u) B_eᵀ, scatter-added into y (on CPU per column block of y, so the
per-slot products never exist at full width). u (before the gate) is saved per sorted slot and
the permutation is reused by the backward, the mirror image:

    dh = dy[tok] B_e,  dgate = s·⟨dh, u⟩,  du = s·g·dh,
    dA_e = du_eᵀ dropout(x)[tok_e],  dB_e = dy[tok_e]ᵀ (s·g ⊙ u_e),  dx = dy W + dropout(scatter(du_e A_e))
    dlogits = softmax / renormalisation Jacobian of dgate (+ the gradient of the logits output),
    dR = dlogitsᵀ x,  dx += dlogits R

The op returns the router logits as a differentiable output, so a load-balancing or z-loss built
on them (pyhappy.nn.MoLoRALinear.last_aux_loss) reaches R through the same op. weight=None gives
the adapter part alone (+ bias), which is how MoLoRALinear runs on a quantized base.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backends, reference
from .._tune import _is_fake, bucket, run_pick
from ._eager import eager_function
from ._checks import (autocast_args, check_dropout, check_float_input, check_in_features, check_tensor, finite_number,
                      rows, unview)
from .lora_linear import _dropout  # the same mask as lora_linear's for one (p, seed): C++ where built

OP = "moe_lora_linear"


def _validate(x, weight, bias, router_weight, lora_A, lora_B, top_k, normalize, scaling, dropout_p, seed):
    """Every argument checked, the one at fault named, before anything runs."""
    check_float_input(OP, "x", x)
    K = x.shape[-1]
    check_tensor(OP, "router_weight", router_weight, ndim=2, like=x)
    E = router_weight.shape[0]
    # An input of the wrong width: router_weight, lora_A (and weight) agree on a K that x does not have.
    agree = True
    for t in (lora_A, weight):
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] != router_weight.shape[1]:
            agree = False
    if agree:
        check_in_features(OP, x, router_weight.shape[1], f"router_weight is [E, K] = {tuple(router_weight.shape)}")
    if router_weight.shape[1] != K or E < 1:
        raise ValueError(f"pyhappy::{OP}: router_weight must be [E, K] with E >= 1 and K = x.shape[-1] = {K}, "
                         f"got {tuple(router_weight.shape)}")
    check_tensor(OP, "lora_A", lora_A, ndim=3, like=x)
    if lora_A.shape[0] != E or lora_A.shape[2] != K or lora_A.shape[1] < 1:
        raise ValueError(f"pyhappy::{OP}: lora_A must be [E, r, K] = [{E}, r, {K}] with r >= 1, "
                         f"got {tuple(lora_A.shape)}")
    r = lora_A.shape[1]
    check_tensor(OP, "lora_B", lora_B, ndim=3, like=x)
    if lora_B.shape[0] != E or lora_B.shape[2] != r or lora_B.shape[1] < 1:
        raise ValueError(f"pyhappy::{OP}: lora_B must be [E, N, r] = [{E}, N, {r}] with N >= 1, "
                         f"got {tuple(lora_B.shape)}")
    N = lora_B.shape[1]
    if weight is not None:
        check_tensor(OP, "weight", weight, shape=(N, K), like=x)
    if bias is not None:
        check_tensor(OP, "bias", bias, shape=(N,), like=x)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= E:
        raise ValueError(f"pyhappy::{OP}: top_k must be an int in [1, E] = [1, {E}], got {top_k!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"pyhappy::{OP}: normalize must be True or False, got {normalize!r}")
    finite_number(f"pyhappy::{OP}", "scaling", scaling)
    check_dropout(OP, dropout_p, seed)
    if seed is not None and seed.device != x.device:
        raise ValueError(f"pyhappy::{OP}: seed is on {seed.device} but x is on {x.device}")


def _backend(x):
    """backends.select, with the reference standing in for cpp when the loaded extension was built
    without this family's kernels."""
    b = backends.select(OP, x.device, x.dtype)
    if b == "cpp" and not hasattr(torch.ops.pyhappy, "moe_lora_linear_cpu"):
        return "reference"
    return b


# ---- the PyTorch formulation: routing and sort for the triton backend, the "torch" CPU candidate ----


def route_and_sort(x2, router_weight, top_k, normalize):
    """(logits, gates, experts, perm, offsets): reference.moe_route, then the assignments sorted by
    expert (stable: token order inside a segment); perm [M·k] holds the flat assignment t·k + j of
    each sorted slot, offsets [E + 1] the segment bounds."""
    E = router_weight.shape[0]
    logits, gates, experts = reference.moe_route(x2, router_weight, top_k, normalize)
    flat = experts.reshape(-1)
    perm = torch.sort(flat, stable=True).indices
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return logits, gates, experts, perm, offsets


def _base(x2, weight, bias, N):
    if weight is not None:
        return torch.nn.functional.linear(x2, weight, bias)
    y = x2.new_zeros(x2.shape[0], N)
    return y if bias is None else y.add_(bias)


def _segments(x2, offsets):
    """(e, start, end) of every non-empty expert segment, or None while tracing (fake tensors or
    symbolic segment bounds), where the grouped products below take their static masked form."""
    if _is_fake(x2):
        return None
    off = offsets.tolist()
    if not all(type(v) is int for v in off):
        return None
    return [(e, off[e], off[e + 1]) for e in range(len(off) - 1) if off[e + 1] > off[e]]


def _grouped(src, mats, es, segs):
    """out[a] = src[a] · mats[es[a]] for sorted slots a (src [Mk, P], mats [E, P, Q]): one product per
    expert segment; traced, each expert's product over every slot, kept where the slot is its own."""
    out = src.new_zeros(src.shape[0], mats.shape[2])
    if segs is None:
        for e in range(mats.shape[0]):
            out = torch.where((es == e)[:, None], src @ mats[e], out)
        return out
    for e, a, b in segs:
        torch.mm(src[a:b], mats[e], out=out[a:b])
    return out


def _grouped_outer(left, right, es, segs, E):
    """G[e] = Σ_{a in segment e} left[a]ᵀ right[a] -> [E, P, Q] (zero for an empty expert)."""
    out = left.new_zeros(E, left.shape[1], right.shape[1])
    if segs is None:
        for e in range(E):
            out[e] = (left * (es == e).to(left.dtype)[:, None]).t() @ right
        return out
    for e, a, b in segs:
        torch.mm(left[a:b].t(), right[a:b], out=out[e])
    return out


def _torch_forward(x2, weight, bias, router_weight, lora_A, lora_B, top_k, normalize, scaling, dropout_p, seed):
    """The sorted formulation in PyTorch ops (one gather of x, per-segment products, one index_add)."""
    N = lora_B.shape[1]
    logits, gates, experts, perm, offsets = route_and_sort(x2, router_weight, top_k, normalize)
    tok = perm // top_k
    es = experts.reshape(-1)[perm]
    segs = _segments(x2, offsets)
    sg = (gates.reshape(-1)[perm] * scaling).to(x2.dtype)
    xs = _dropout(x2, dropout_p, seed).index_select(0, tok)
    u = _grouped(xs, lora_A.transpose(1, 2), es, segs)
    z = _grouped(u * sg[:, None], lora_B.transpose(1, 2), es, segs)
    y = _base(x2, weight, bias, N).index_add_(0, tok, z)
    return y, logits, gates, experts, perm, offsets, u


def router_backward(logits, gates, experts, dgate, normalize):
    """d loss / d logits [M, E] fp32 from d loss / d gates [M, k] through the renormalisation and
    the softmax (the top-k choice itself is piecewise constant)."""
    probs = torch.softmax(logits, dim=-1)
    if normalize:
        s = probs.gather(1, experts).sum(-1, keepdim=True)
        dpk = (dgate - (dgate * gates).sum(-1, keepdim=True)) / s
    else:
        dpk = dgate
    dp = torch.zeros_like(probs).scatter_(1, experts, dpk)
    return probs * (dp - (dp * probs).sum(-1, keepdim=True))


def _torch_backward(dy, dlogits, x2, weight, router_weight, lora_A, lora_B, logits, gates, experts, perm, offsets,
                    u, top_k, normalize, scaling, dropout_p, seed, need_grad_x):
    """(gx or None, gR, gA, gB) by the formulas in the module docstring, in PyTorch ops."""
    M, K = x2.shape
    tok = perm // top_k
    sg = (gates.reshape(-1)[perm] * scaling).to(x2.dtype)
    xs = _dropout(x2, dropout_p, seed).index_select(0, tok)
    dys = dy.index_select(0, tok)
    es = experts.reshape(-1)[perm]
    segs = _segments(x2, offsets)
    E = lora_A.shape[0]
    dh = _grouped(dys, lora_B, es, segs)
    gB = _grouped_outer(dys, u * sg[:, None], es, segs, E)
    dgate = torch.empty(perm.shape[0], dtype=logits.dtype, device=x2.device)
    dgate[perm] = (dh * u).sum(1).to(logits.dtype) * scaling
    du = dh * sg[:, None]
    gA = _grouped_outer(du, xs, es, segs, E)
    dxs = _grouped(du, lora_A, es, segs)
    dl = router_backward(logits, gates, experts, dgate.reshape(M, top_k), normalize)
    if dlogits is not None:
        dl = dl + dlogits
    dl = dl.to(x2.dtype)
    gR = dl.t() @ x2
    gx = None
    if need_grad_x:
        dxa = _dropout(x2.new_zeros(M, K).index_add_(0, tok, dxs), dropout_p, seed)
        gx = dxa.addmm_(dl, router_weight)
        if weight is not None:
            gx.addmm_(dy, weight)
    return gx, gR, gA, gB


# ---- the op ----------------------------------------------------------------------------------------


def _tune_key(pass_, x2, lora_B, lora_A, top_k, dropout_p):
    return (pass_, str(x2.dtype).replace("torch.", ""), f"M{bucket(x2.shape[0])}", f"K{x2.shape[1]}",
            f"N{lora_B.shape[1]}", f"E{lora_A.shape[0]}", f"k{top_k}", f"r{lora_A.shape[1]}",
            "drop" if dropout_p else "")


def _memo_key(x2, weight, lora_A, top_k, dropout_p):
    return (x2.dtype, bucket(x2.shape[0]), x2.shape[1], id(weight), id(lora_A), tuple(lora_A.shape), top_k,
            dropout_p > 0)


def _cpp_forward(*args):
    x2, weight, lora_A, lora_B, top_k, dropout_p = args[0], args[1], args[4], args[5], args[6], args[9]

    cands = {"cpp": lambda: torch.ops.pyhappy.moe_lora_linear_cpu(*args), "torch": lambda: _torch_forward(*args)}
    return run_pick(OP, lambda: _tune_key("fwd", x2, lora_B, lora_A, top_k, dropout_p), cands, "cpp", x2,
                    memo=_memo_key(x2, weight, lora_A, top_k, dropout_p), cold=(weight,))


def _triton_forward(*args):
    return backends.triton_module(OP).moe_lora_forward(*args, wrap=torch.library.wrap_triton)


# (y [M, N], logits, gates, experts, perm, offsets, hidden) for x2 [M, K], by backend
# (pyhappy/backends.py); the reference is the PyTorch formulation.
FORWARD = {"cpp": _cpp_forward, "triton": _triton_forward, "reference": _torch_forward}


def _forward(backend, x, weight, bias, router_weight, lora_A, lora_B, top_k, normalize, scaling, dropout_p, seed):
    lead, K, N = x.shape[:-1], x.shape[-1], lora_B.shape[1]
    y, *rest = FORWARD[backend](x.reshape(-1, K), weight, bias, router_weight, lora_A, lora_B, top_k, normalize,
                                scaling, dropout_p, seed)
    return (unview(y, (*lead, N)), *rest)


@torch.library.triton_op("pyhappy::moe_lora_linear", mutates_args=())
def _moe_lora_linear(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    router_weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    top_k: int,
    normalize: bool,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y [..., N], logits [M, E] and gates [M, k] in fp32 (fp64 for fp64), experts [M, k] int64, perm [M·k] int64,
    offsets [E + 1] int64, hidden [M·k, r]): y and logits are differentiable, the rest is the
    routing and the per-slot u = dropout(x) A_eᵀ (sorted order) the backward reuses."""
    _validate(x, weight, bias, router_weight, lora_A, lora_B, top_k, normalize, scaling, dropout_p, seed)
    return _forward(_backend(x), x, weight, bias, router_weight, lora_A, lora_B, top_k,
                    normalize, scaling, dropout_p, seed)


def _cpp_backward(*args):
    x2, weight, lora_A, lora_B, top_k, dropout_p, need_grad_x = (args[2], args[3], args[5], args[6], args[13],
                                                                 args[16], args[18])

    cands = {"cpp": lambda: torch.ops.pyhappy.moe_lora_linear_backward_cpu(*args),
             "torch": lambda: _torch_backward(*args)}
    return run_pick(OP, lambda: _tune_key("bwd" if need_grad_x else "bwd_nodx", x2, lora_B, lora_A, top_k,
                                          dropout_p),
                    cands, "cpp", x2, memo=("bwd", need_grad_x, *_memo_key(x2, weight, lora_A, top_k, dropout_p)),
                    cold=(weight,))


def _triton_backward(*args):
    return backends.triton_module(OP).moe_lora_backward(*args, wrap=torch.library.wrap_triton)


# (grad_x [M, K] or empty, grad_router_weight, grad_A, grad_B), by backend.
BACKWARD = {"cpp": _cpp_backward, "triton": _triton_backward, "reference": _torch_backward}


@torch.library.triton_op("pyhappy::moe_lora_linear_backward", mutates_args=())
def _moe_lora_linear_backward(
    grad_out: Tensor,
    grad_logits: Optional[Tensor],
    x: Tensor,
    weight: Optional[Tensor],
    router_weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    logits: Tensor,
    gates: Tensor,
    experts: Tensor,
    perm: Tensor,
    offsets: Tensor,
    hidden: Tensor,
    top_k: int,
    normalize: bool,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    need_grad_x: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_router_weight, grad_A, grad_B); grad_x is an empty [0] tensor when not needed."""
    K, N = x.shape[-1], lora_B.shape[1]
    dy = grad_out.reshape(rows(x), N)
    x2 = x.reshape(rows(x), K)
    args = (dy, grad_logits, x2, weight, router_weight, lora_A, lora_B, logits, gates, experts, perm, offsets,
            hidden, top_k, normalize, scaling, dropout_p, seed, need_grad_x)
    gx, gR, gA, gB = BACKWARD[_backend(x)](*args)
    gx = gx.reshape(x.shape) if need_grad_x else x.new_empty(0)
    return gx, gR, gA, gB


def _setup_context(ctx, inputs, output):
    x, weight, bias, router_weight, lora_A, lora_B, top_k, normalize, scaling, dropout_p, seed = inputs
    _, logits, gates, experts, perm, offsets, hidden = output
    ctx.mark_non_differentiable(gates, experts, perm, offsets, hidden)
    ctx.save_for_backward(x, weight, router_weight, lora_A, lora_B, logits, gates, experts, perm, offsets, hidden,
                          seed)
    ctx.args = (top_k, normalize, scaling, dropout_p)


def _backward(ctx, grad_y, grad_logits, *_):
    x, weight, router_weight, lora_A, lora_B, logits, gates, experts, perm, offsets, hidden, seed = ctx.saved_tensors
    top_k, normalize, scaling, dropout_p = ctx.args
    need = ctx.needs_input_grad
    N = lora_B.shape[1]
    if grad_y is None:
        grad_y = x.new_zeros(*x.shape[:-1], N)
    gx, gR, gA, gB = getattr(ctx, "backward_op", torch.ops.pyhappy.moe_lora_linear_backward)(
        grad_y, grad_logits, x, weight, router_weight, lora_A, lora_B, logits, gates, experts, perm, offsets, hidden,
        top_k, normalize, scaling, dropout_p, seed, need[0])
    dy = grad_y.reshape(rows(x), N)
    # The base weight and bias are frozen in adapter training; their gradients are still exact if a
    # caller makes them trainable (an [N, K] buffer exists only then).
    g_weight = dy.t() @ x.reshape(rows(x), x.shape[-1]) if (weight is not None and need[1]) else None
    g_bias = dy.sum(0) if need[2] else None
    return (gx if need[0] else None, g_weight, g_bias, gR if need[3] else None, gA if need[4] else None,
            gB if need[5] else None, None, None, None, None, None)


_moe_lora_linear.register_autograd(_backward, setup_context=_setup_context)
_Eager = eager_function("MoeLoraLinear", _moe_lora_linear, _setup_context, _backward,
                        _moe_lora_linear_backward)


def rank_mask(ranks: Sequence[int], r_max: int, device=None, dtype=torch.float32) -> Tensor:
    """[E, r_max] with 1 where rank index j < ranks[e], else 0: heterogeneous experts padded to the
    largest rank (pyhappy.nn.MoLoRALinear keeps one as a buffer)."""
    ranks = [int(r) for r in ranks]
    return (torch.arange(r_max, device=device)[None, :] < torch.tensor(ranks, device=device)[:, None]).to(dtype)


def moe_lora_linear(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    router_weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    top_k: int,
    scaling: float,
    normalize: bool = True,
    dropout_p: float = 0.0,
    *,
    rank_mask: Optional[Tensor] = None,
    seed: Optional[Tensor] = None,
    return_router: bool = False,
):
    """Mixture of LoRA experts: ``y = x Wᵀ + b + s · Σ_j g_j · B_{e_j} (A_{e_j} dropout(x))`` over
    the top_k experts of the router ``softmax(x Rᵀ)``.

    Args:
        x: [..., K] input.
        weight: [N, K] frozen base weight, or None for the adapter part alone (+ bias).
        bias: [N] or None.
        router_weight: [E, K] router R (trainable).
        lora_A: [E, r, K]; lora_B: [E, N, r]: the experts (r: the largest rank when they differ).
        top_k: experts per token, 1..E (E: the dense soft mixture).
        scaling: the LoRA scale s (alpha / r), a finite number.
        normalize: renormalise the chosen gates to sum to 1 (Mixtral); else the raw probabilities.
        dropout_p: dropout on the adapter's input (one mask per token, shared by its experts).
        rank_mask: [E, r] of 0 / 1 for heterogeneous ranks (see ``rank_mask()``): A's rows and
            B's columns past an expert's rank are masked out, so they neither contribute nor get
            gradient.
        seed: int64 tensor of one element fixing the dropout mask (drawn from torch's generator
            when omitted).
        return_router: also return (logits [M, E] fp32, differentiable in R and x; experts [M, k]).
    Returns:
        y [..., N], or (y, logits, experts) with return_router.
    """
    scaling = finite_number(f"pyhappy::{OP}", "scaling", scaling)
    x, weight, bias, router_weight, lora_A, lora_B = autocast_args(x, weight, bias, router_weight, lora_A, lora_B)
    if rank_mask is not None:
        if not isinstance(rank_mask, torch.Tensor) or tuple(rank_mask.shape) != tuple(lora_A.shape[:2]):
            got = tuple(rank_mask.shape) if isinstance(rank_mask, torch.Tensor) else type(rank_mask).__name__
            raise ValueError(f"pyhappy::{OP}: rank_mask must be [E, r] = {tuple(lora_A.shape[:2])}, got {got}")
        m = rank_mask.to(device=lora_A.device, dtype=lora_A.dtype)
        lora_A = lora_A * m[:, :, None]
        lora_B = lora_B * m[:, None, :]
    if dropout_p > 0.0 and seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
    args = (x, weight, bias, router_weight, lora_A, lora_B, top_k, normalize, float(scaling), float(dropout_p), seed)
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6])
    ):
        # Eager inference: nothing to record for autograd; run the implementation without the
        # custom-op dispatcher around it (as lora_linear does: it is measurable next to a decode step).
        _validate(*args)
        out = _forward(_backend(x), *args)
    else:
        out = _Eager(*args)
    return (out[0], out[1], out[3]) if return_router else out[0]


def _register_cpp_fakes():
    """Fake kernels for the C++ ops, so torch.compile can trace the cpp backend."""

    @torch.library.register_fake("pyhappy::moe_lora_linear_cpu")
    def _(x, weight, bias, router_weight, lora_A, lora_B, top_k, normalize, scaling, dropout_p, seed):
        M, E, r, N = x.shape[0], router_weight.shape[0], lora_A.shape[1], lora_B.shape[1]
        f32, i64 = (torch.float64 if x.dtype == torch.float64 else torch.float32), torch.int64
        return (x.new_empty(M, N), x.new_empty(M, E, dtype=f32), x.new_empty(M, top_k, dtype=f32),
                x.new_empty(M, top_k, dtype=i64), x.new_empty(M * top_k, dtype=i64), x.new_empty(E + 1, dtype=i64),
                x.new_empty(M * top_k, r))

    @torch.library.register_fake("pyhappy::moe_lora_linear_backward_cpu")
    def _(grad_out, grad_logits, x, weight, router_weight, lora_A, lora_B, logits, gates, experts, perm, offsets,
          hidden, top_k, normalize, scaling, dropout_p, seed, need_grad_x):
        gx = x.new_empty(x.shape) if need_grad_x else x.new_empty(0)
        return gx, router_weight.new_empty(router_weight.shape), lora_A.new_empty(lora_A.shape), \
            lora_B.new_empty(lora_B.shape)
