"""pyhappy::vera_linear and pyhappy::pvera_linear — VeRA and PVeRA.

VeRA (PEFT's peft/tuners/vera):

    y = x Wᵀ + b + λ_b ⊙ z,   z = v Bᵀ,   v = λ_d ⊙ u,   u = dropout(x) Aᵀ

A [r, K] and B [N, r] are frozen random projections shared by every layer of a model (sliced to the
layer), λ_d [r] and λ_b [N] the trainable vectors. The backward, with dv = dy (λ_b ⊙ B) [M, r]:

    ∂λ_b = Σ_rows dy ⊙ z,   ∂λ_d = Σ_rows dv ⊙ u,   du = λ_d ⊙ dv,   dx = dy W + dropout(du A)

Two adapter products in each direction besides the base GEMM (x Aᵀ and v Bᵀ; dy B and du A), as in
PEFT's autograd: z, the adapter's output before λ_b, is saved by the forward when λ_b is trained (an
[M, N] tensor, the one PEFT's autograd saves too), so ∂λ_b is one pass over dy and z rather than the
product dyᵀ v (M·N·r multiply-adds). Without z (the op called with save_z=False) ∂λ_b comes from
G = dyᵀ v: ∂λ_b = (G ⊙ B) 1.

On the CPU each pass offers candidates timed on first use (pyhappy/_tune.py): "torch", the unfused
PyTorch formulation (PEFT's ops, and the incumbent), and "cpp" / "cpp_skinny", the base GEMM in column
blocks with the adapter's share added to each block while it is in cache (csrc/cpu/vera_linear.cpp),
the adapter's products on BLAS or on the skinny kernels. On CUDA the forward is pyhappy::lora_linear's
Triton kernel with lora_B = diag(λ_b) B diag(λ_d) and the backward plain torch ops.

PVeRA (peft/tuners/pvera): A is [2r, K], λ_d [2r]; the rank-space hidden λ_d ⊙ (dropout(x) Aᵀ) is
split into (μ, log σ²) and, when sampling (training, or PEFT's sample_at_inference),

    v = μ + ε ⊙ exp(½ log σ²),     y = x Wᵀ + b + λ_b ⊙ (v Bᵀ)

else v = μ, which is VeRA on the first r rows (that path runs vera_linear's). ε is
reference.gaussian_noise(noise_seed, M, r): Box-Muller on pyhappy's counter-based dropout hash, a
pure function of (seed, row, col), so the backward regenerates it rather than storing it and a step
is reproducible from torch's generator (the seeds are drawn from it, as dropout's is). The sampled
step runs on the same pieces as VeRA's, with the sampling in rank space between them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, reference
from .._tune import (LastCalls, arg_signature, bucket, call_signature, remember_unfused, run_pick, unfused_call,
                     unfused_hit, with_aten_engine)
from .lora_linear import _dropout as _lora_dropout
from .lora_linear import _forward as _lora_forward
from .lora_linear import _grad_x as _lora_grad_x
from ._eager import eager_function
from ._checks import (any_autocast, autocast_args, check_dropout, check_float_input, check_in_features, check_tensor,
                      rows, unview)

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
    check_in_features(op, x, weight.shape[1], f"weight is [N, K] = {tuple(weight.shape)}")
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


# ---- the CPU candidates ---------------------------------------------------------------------------
#
# A step's passes, each with a rank-space function in the middle (VeRA: v = λ_d ⊙ u; PVeRA: the
# sampling), so VeRA and PVeRA share them. ``fwd_rank(u) -> v``; ``bwd_rank(dv) -> (du, ∂λ_d or None)``.


def _cpp_pieces():
    return hasattr(torch.ops.pyhappy, "vera_linear_out_cpu")


def _skinny_serves(x2):
    """Whether the skinny-kernel candidate differs from "cpp" here (fp32, unit column stride, enough
    rows: csrc/cpu/lora_linear.cpp's kSkinnyMinRows)."""
    return x2.dtype == torch.float32 and x2.stride(-1) == 1 and x2.shape[0] >= 64


def _key(pass_, x2, weight, A, bias, dropout_p, flag):
    return (pass_, str(x2.dtype).replace("torch.", ""), f"M{bucket(x2.shape[0])}", f"K{x2.shape[1]}",
            f"N{weight.shape[0]}", f"r{A.shape[0]}", flag, "drop" if dropout_p else "", "bias" if bias is not None else "")


def _memo(op, pass_, x2, weight, A, bias, dropout_p, flag):
    """The call's tuning signature (the key's parts, cheap to form)."""
    return (op, pass_, x2.dtype, bucket(x2.shape[0]), x2.shape[1], weight.shape[0], A.shape[0], flag, dropout_p > 0,
            bias is None)


def _torch_forward(x2, weight, bias, A, B, lambda_b, dropout_p, seed, save_z, fwd_rank, dropout=_lora_dropout):
    """The unfused PyTorch formulation (PEFT's layer: base(x) + λ_b ⊙ ((λ_d ⊙ (dropout(x) Aᵀ)) Bᵀ),
    accumulated into y): (y, u, z or an empty [0])."""
    u = dropout(x2, dropout_p, seed) @ A.t()
    v = fwd_rank(u)
    y = F.linear(x2, weight, bias)
    if save_z:
        z = v @ B.t()
        return y.addcmul_(z, lambda_b), u, z
    return y.addmm_(v, (B * lambda_b[:, None]).t()), u, x2.new_empty(0)


def _cpp_forward(x2, weight, bias, A, B, lambda_b, dropout_p, seed, save_z, fwd_rank, skinny):
    u = torch.ops.pyhappy.vera_hidden_cpu(x2, A, dropout_p, seed, skinny)
    y, z = torch.ops.pyhappy.vera_linear_out_cpu(x2, weight, bias, fwd_rank(u), B, lambda_b, save_z, skinny)
    return y, u, z


def _forward_cpu(op, x2, weight, bias, A, B, lambda_b, dropout_p, seed, save_z, fwd_rank):
    """(y [M, N], u [M, rows of A], z [M, N] or an empty [0]): the measured pick among the candidates."""
    args = (x2, weight, bias, A, B, lambda_b, dropout_p, seed, save_z, fwd_rank)
    if not _cpp_pieces():
        return _torch_forward(*args)

    def cands():
        c = {"cpp": lambda: _cpp_forward(*args, False), "torch": lambda: _torch_forward(*args)}
        if _skinny_serves(x2):
            c["cpp_skinny"] = lambda: _cpp_forward(*args, True)
        return with_aten_engine(x2, c, weight.t())
    flag = "z" if save_z else ""
    return run_pick(op, lambda: _key("fwd", x2, weight, A, bias, dropout_p, flag), cands, "cpp", x2,
                    memo=_memo(op, "fwd", x2, weight, A, bias, dropout_p, flag), cold=(weight,))


def _torch_backward(dy, weight, A, B, lambda_b, z, dropout_p, seed, need_x, bwd_rank):
    """The backward PEFT's autograd runs, as plain ops: (dx or None, du, ∂λ_d or None, ∂λ_b or None)."""
    gb = None if z is None else (dy * z).sum(0)
    du, gd = bwd_rank(dy @ (B * lambda_b[:, None]))
    return (_lora_grad_x(dy, weight, du, A, dropout_p, seed) if need_x else None), du, gd, gb


def _cpp_backward(dy, weight, A, B, lambda_b, z, dropout_p, seed, need_x, bwd_rank, skinny):
    dv, gb = torch.ops.pyhappy.vera_dy_side_cpu(dy, B, lambda_b, z, skinny)
    du, gd = bwd_rank(dv)
    gx = torch.ops.pyhappy.vera_dx_cpu(dy, weight, du, A, dropout_p, seed, skinny) if need_x else None
    return gx, du, gd, (None if z is None else gb)


def _backward_cpu(op, dy, x2, weight, A, B, lambda_b, z, dropout_p, seed, need_x, bwd_rank):
    args = (dy, weight, A, B, lambda_b, z, dropout_p, seed, need_x, bwd_rank)
    if not _cpp_pieces():
        return _torch_backward(*args)

    def cands():
        c = {"cpp": lambda: _cpp_backward(*args, False), "torch": lambda: _torch_backward(*args)}
        if _skinny_serves(dy) and _skinny_serves(x2):
            c["cpp_skinny"] = lambda: _cpp_backward(*args, True)
        return with_aten_engine(dy, c, weight if need_x else None)
    pass_ = "bwd" if need_x else "bwd_nodx"
    flag = "z" if z is not None else ""
    return run_pick(op, lambda: _key(pass_, x2, weight, A, None, dropout_p, flag), cands, "cpp", x2,
                    memo=_memo(op, pass_, x2, weight, A, None, dropout_p, flag), cold=(weight,))


# ---- VeRA ----------------------------------------------------------------------------------------


def _vera_forward(backend, x, weight, bias, A, B, lambda_d, lambda_b, dropout_p, seed, save_z=False):
    """(y, u, z): u = dropout(x) Aᵀ; z = (λ_d ⊙ u) Bᵀ when ``save_z`` and the backend forms it, else an
    empty [0] (the backward then derives ∂λ_b from dyᵀ v)."""
    lead, K, N, r = x.shape[:-1], x.shape[-1], weight.shape[0], A.shape[0]
    if backend == "cpp":
        y, u, z = _forward_cpu(OP, x.reshape(-1, K), weight, bias, A, B, lambda_b, dropout_p, seed, save_z,
                               lambda u: u * lambda_d)
        return unview(y, (*lead, N)), unview(u, (*lead, r)), (unview(z, (*lead, N)) if z.numel() else z)
    # lora_linear's forward with lora_B = diag(λ_b) B diag(λ_d), s = 1
    B_full = (B * lambda_b[:, None]) * lambda_d
    y, u = _lora_forward(backend, x, weight, bias, A, B_full, None, 1.0, dropout_p, seed)
    return y, u, x.new_empty(0)


@torch.library.triton_op("pyhappy::vera_linear", mutates_args=())
def _vera_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], vera_A: Tensor, vera_B: Tensor,
                 lambda_d: Tensor, lambda_b: Tensor, dropout_p: float, seed: Optional[Tensor], save_z: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(y [..., N], u [..., r], z): u = dropout(x) Aᵀ, the hidden state the backward reuses; z [..., N]
    the adapter's output before λ_b when ``save_z`` (and the backend forms it), else an empty [0]."""
    _validate(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p, seed)
    return _vera_forward(backends.select(OP, x.device, x.dtype), x, weight, bias, vera_A, vera_B, lambda_d, lambda_b,
                         dropout_p, seed, save_z)


def _adapter_grads(op, backend, dy, x2, weight, A, B, lambda_b, z, dropout_p, seed, need_x, need_A, need_B, need_b,
                   bwd_rank, v_fn):
    """(gx, gA, gB, gλ_d, gλ_b) of the adapter plus dy W (None where not needed); dy [M, N], x2 [M, K],
    z [M, N] or None; bwd_rank(dv) -> (du, ∂λ_d or None); v_fn() -> v [M, r] (only without z)."""
    z = z if (need_b and z is not None and z.numel()) else None
    gx = gA = gB = gd = gb = None
    if need_x or need_A or z is not None or bwd_rank.need_d:
        if backend == "cpp":
            gx, du, gd, gb = _backward_cpu(op, dy, x2, weight, A, B, lambda_b, z, dropout_p, seed, need_x, bwd_rank)
        else:
            gx, du, gd, gb = _torch_backward(dy, weight, A, B, lambda_b, z, dropout_p, seed, need_x, bwd_rank)
        if need_A:
            gA = du.t() @ _lora_dropout(x2, dropout_p, seed)
    if need_B or (need_b and gb is None):
        G = dy.t() @ v_fn()  # dyᵀ v [N, r]
        if need_B:
            gB = G * lambda_b[:, None]
        if need_b and gb is None:
            gb = (G * B).sum(1)
    return gx, gA, gB, gd, gb


class _VeraRank:
    """VeRA's rank-space backward: du = λ_d ⊙ dv, ∂λ_d = Σ_rows dv ⊙ u."""

    def __init__(self, u, lambda_d, need_d):
        self.u, self.lambda_d, self.need_d = u, lambda_d, need_d

    def __call__(self, dv):
        gd = (dv * self.u).sum(0) if self.need_d else None
        return dv.mul_(self.lambda_d), gd


def _vera_grads(backend, dy, x2, weight, A, B, lambda_d, lambda_b, u, z, dropout_p, seed, need_x, need_A, need_B,
                need_d, need_b):
    """(gx, gA, gB, gλ_d, gλ_b) of the VeRA adapter plus dy W (None where not needed); u = dropout(x) Aᵀ [M, r]."""
    return _adapter_grads(OP, backend, dy, x2, weight, A, B, lambda_b, z, dropout_p, seed, need_x, need_A, need_B,
                          need_b, _VeraRank(u, lambda_d, need_d), lambda: u * lambda_d)


def _base_grads(need, dy, x2, weight):
    """(g_weight, g_bias): the base weight and bias are frozen in adapter training; if a caller makes
    them trainable their gradients are still exact (an [N, K] buffer exists only then)."""
    return (dy.t() @ x2 if need[1] else None), (dy.sum(0) if need[2] else None)


def _vera_setup_context(ctx, inputs, output):
    x, weight, bias, A, B, lambda_d, lambda_b, dropout_p, seed, save_z = inputs
    _, u, z = output
    ctx.mark_non_differentiable(u, z)
    ctx.save_for_backward(x, weight, A, B, lambda_d, lambda_b, u, z, seed)
    ctx.dropout_p = dropout_p


def _vera_backward(ctx, grad_y, grad_u, grad_z):
    x, weight, A, B, lambda_d, lambda_b, u, z, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    N, K = weight.shape
    dy = grad_y.reshape(rows(x), N)
    x2 = x.reshape(rows(x), K)
    backend = backends.select(OP, x.device, x.dtype)
    gx, gA, gB, gd, gb = _vera_grads(backend, dy, x2, weight, A, B, lambda_d, lambda_b, u.reshape(rows(x), A.shape[0]),
                                     z.reshape(rows(x), N) if z.numel() else None, ctx.dropout_p, seed, *need[0:1],
                                     *need[3:7])
    gW, gbias = _base_grads(need, dy, x2, weight)
    return (None if gx is None else gx.reshape(x.shape)), gW, gbias, gA, gB, gd, gb, None, None, None


_vera_linear.register_autograd(_vera_backward, setup_context=_vera_setup_context)
_VeraEager = eager_function("VeraLinear", _vera_linear, _vera_setup_context, _vera_backward)


def _unfused_serves(op, args, recording) -> bool:
    """Whether the measured dispatch runs this call (dropout off) as PEFT's formulation in plain
    torch ops, the whole call timed against the op (pyhappy._tune.unfused_call). ``args``: the
    op's up to seed, then for PVeRA its noise seed (None: the mean path)."""
    x, weight, bias, A, B, lambda_d, lambda_b, dropout_p = args[:8]
    if (dropout_p != 0.0 or weight.requires_grad or not isinstance(x, torch.Tensor) or x.dim() < 1
            or x.shape[-1] == 0 or torch.compiler.is_compiling()):
        return False
    ts = (x, bias, A, B, lambda_d, lambda_b)
    flags = tuple(t is not None and t.requires_grad for t in ts) if recording else ()
    need = tuple(t for t, f in zip(ts, flags) if f)
    sample = len(args) > 9 and args[9] is not None
    memo, key = call_signature(x, weight.shape[0], A.shape[0], bias, flags, (sample,), ("sample" if sample else "",))
    return unfused_call(op, memo, key, lambda: _op_call(op, args, recording), lambda: _unfused(*args), x, need,
                        cold=(weight,))


def _op_call(op, args, recording):
    """The op on a call's arguments (what the front runs when the op serves it), for the timing."""
    if op == OP:
        return _VeraEager(*args, recording and args[6].requires_grad)[0] if recording else \
            _vera_forward(backends.select(OP, args[0].device, args[0].dtype), *args)[0]
    sample = len(args) > 9 and args[9] is not None
    full = (*args[:8], sample, args[8], args[9] if sample else None)
    return _PveraEager(*full, recording and args[6].requires_grad)[0] if recording else \
        _pvera_forward(backends.select(POP, args[0].device, args[0].dtype), *full)[0]


def _unfused(x, weight, bias, A, B, lambda_d, lambda_b, dropout_p, seed, noise_seed=None):
    """PEFT's VeRA / PVeRA forward in plain torch ops, dropout off: x Wᵀ + b + λ_b ⊙ (h Bᵀ) with
    h = λ_d ⊙ (x Aᵀ) (VeRA); for PVeRA (μ, log σ²) = chunk(λ_d ⊙ (x Aᵀ), 2) and h = μ, or with
    ``noise_seed`` μ + ε ⊙ exp(½ log σ²), ε the op's counter-based noise (the same draw)."""
    r = B.shape[1]
    if noise_seed is None and A.shape[0] == r:  # VeRA
        h = torch.nn.functional.linear(x, A) * lambda_d
    elif noise_seed is None:  # PVeRA's mean: the first r rank rows
        h = torch.nn.functional.linear(x, A[:r]) * lambda_d[:r]
    else:
        mu, logvar = (torch.nn.functional.linear(x, A) * lambda_d).chunk(2, dim=-1)
        eps = _noise(noise_seed, mu.numel() // r, r, mu).view(mu.shape)
        h = mu + eps * torch.exp(0.5 * logvar)
    # PEFT's own expression, op for op: its autograd nodes cost less than one addcmul's (whose backward
    # forms both products' gradients) at the small layers this formulation serves.
    return torch.nn.functional.linear(x, weight, bias) + lambda_b * torch.nn.functional.linear(h, B)


# The last call served unfused through its signature on each weight (pyhappy._tune.LastCalls).
_LAST, _PLAST = LastCalls(OP), LastCalls(POP)


def _recording(args):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:7])


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
    repeat = dropout_p == 0.0 and not torch.compiler.is_compiling() and not any_autocast()
    if repeat and _LAST.get(x, weight, (bias, vera_A, vera_B, lambda_d, lambda_b), ()) == "unfused":
        return _unfused(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, 0.0, seed)
    x, weight, bias, vera_A, vera_B, lambda_d, lambda_b = autocast_args(x, weight, bias, vera_A, vera_B, lambda_d,
                                                                        lambda_b)
    if dropout_p > 0.0 and seed is None:
        seed = _draw_seed(x)
    args = (x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, float(dropout_p), seed)
    sig = arg_signature(*args[:7]) if dropout_p == 0.0 else None
    if unfused_hit(OP, sig):
        if repeat:  # (the next call like this one skips the signature: LastCalls)
            _LAST.put("unfused", x, weight, (bias, vera_A, vera_B, lambda_d, lambda_b), ())
        return _unfused(*args)
    recording = _recording(args)
    if _unfused_serves(OP, args, recording):
        _validate(*args)
        remember_unfused(OP, sig)
        return _unfused(*args)
    if not torch.compiler.is_compiling() and not recording:
        # Eager inference: nothing for autograd to record; skip the dispatcher (as lora_linear does).
        _validate(*args)
        return _vera_forward(backends.select(OP, x.device, x.dtype), *args)[0]
    # z (an [M, N] tensor, as PEFT's autograd saves) only where λ_b's gradient will read it
    args = (*args, recording and lambda_b.requires_grad)
    return _VeraEager(*args)[0]  # the registered op's forward and gradient, without its dispatcher layers


# ---- PVeRA ---------------------------------------------------------------------------------------


def _noise(noise_seed, M, r, like):
    """ε [M, r] in like's dtype: the C++ kernel on CPU (one pass), else the torch formulation (the
    same numbers: both compute in float64)."""
    if (like.device.type == "cpu" and hasattr(torch.ops.pyhappy, "gaussian_noise_cpu")
            and backends.select(POP, like.device, like.dtype) != "reference"):
        return torch.ops.pyhappy.gaussian_noise_cpu(noise_seed, M, r, like.dtype)
    return reference.gaussian_noise(noise_seed, M, r, like.dtype, like.device)


def _register_cpp_fakes():
    """Fake kernels for the C++ pieces, so torch.compile can trace the cpp backend."""

    @torch.library.register_fake("pyhappy::gaussian_noise_cpu")
    def _(seed, rows, cols, dtype):
        return seed.new_empty(rows, cols, dtype=dtype)

    if not _cpp_pieces():  # an extension built before the fused VeRA step lacks them
        return

    @torch.library.register_fake("pyhappy::vera_hidden_cpu")
    def _(x, A, dropout_p, seed, skinny):
        return x.new_empty(x.shape[0], A.shape[0])

    @torch.library.register_fake("pyhappy::vera_linear_out_cpu")
    def _(x, weight, bias, v, B, lambda_b, want_z, skinny):
        y = x.new_empty(x.shape[0], weight.shape[0])
        return y, (x.new_empty(x.shape[0], weight.shape[0]) if want_z else x.new_empty(0))

    @torch.library.register_fake("pyhappy::vera_dy_side_cpu")
    def _(dy, B, lambda_b, z, skinny):
        return dy.new_empty(dy.shape[0], B.shape[1]), (dy.new_empty(dy.shape[1]) if z is not None else dy.new_empty(0))

    @torch.library.register_fake("pyhappy::vera_dx_cpu")
    def _(dy, weight, du, A, dropout_p, seed, skinny):
        return dy.new_empty(dy.shape[0], weight.shape[1])


# The adapter input's dropout by backend: the C++ kernel where lora_linear runs it, else the reference.
_DROPOUT = {"cpp": _lora_dropout, "triton": _lora_dropout, "reference": reference.dropout}


def _sampler(noise_seed, lambda_d, r):
    """PVeRA's rank-space forward: v = μ + ε ⊙ exp(½ log σ²) with (μ, log σ²) = chunk(λ_d ⊙ u, 2)."""
    def fwd_rank(u):
        t = u * lambda_d
        return torch.addcmul(t[:, :r], _noise(noise_seed, u.shape[0], r, u), torch.exp(0.5 * t[:, r:]))
    return fwd_rank


def _pvera_forward(backend, x, weight, bias, A, B, lambda_d, lambda_b, dropout_p, sample, seed, noise_seed,
                   save_z=False):
    lead, K, N, r2 = x.shape[:-1], x.shape[-1], weight.shape[0], A.shape[0]
    r = r2 // 2
    if not sample:  # v = μ: VeRA on the μ half of A and λ_d
        return _vera_forward(backend, x, weight, bias, A[:r], B, lambda_d[:r], lambda_b, dropout_p, seed, save_z)
    x2 = x.reshape(rows(x), K)
    args = (x2, weight, bias, A, B, lambda_b, dropout_p, seed, save_z, _sampler(noise_seed, lambda_d, r))
    if backend == "cpp":
        y, u, z = _forward_cpu(POP, *args)
    else:
        y, u, z = _torch_forward(*args, dropout=_DROPOUT[backend])
    return unview(y, (*lead, N)), unview(u, (*lead, r2)), (unview(z, (*lead, N)) if z.numel() else z)


@torch.library.triton_op("pyhappy::pvera_linear", mutates_args=())
def _pvera_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], pvera_A: Tensor, pvera_B: Tensor,
                  lambda_d: Tensor, lambda_b: Tensor, dropout_p: float, sample: bool, seed: Optional[Tensor],
                  noise_seed: Optional[Tensor], save_z: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(y [..., N], u, z): u = dropout(x) Aᵀ, [..., 2r] when sampling, else [..., r] (the μ half only);
    z as for vera_linear."""
    _validate(x, weight, bias, pvera_A, pvera_B, lambda_d, lambda_b, dropout_p, seed, POP, noise_seed)
    if sample and noise_seed is None:
        raise ValueError(f"pyhappy::{POP}: sample=True needs noise_seed (an int64 tensor of one element)")
    return _pvera_forward(backends.select(POP, x.device, x.dtype), x, weight, bias, pvera_A, pvera_B, lambda_d,
                          lambda_b, dropout_p, sample, seed, noise_seed, save_z)


def _pvera_setup_context(ctx, inputs, output):
    x, weight, bias, A, B, lambda_d, lambda_b, dropout_p, sample, seed, noise_seed, save_z = inputs
    _, u, z = output
    ctx.mark_non_differentiable(u, z)
    ctx.save_for_backward(x, weight, A, B, lambda_d, lambda_b, u, z, seed, noise_seed)
    ctx.dropout_p = dropout_p
    ctx.sample = sample


class _PveraRank:
    """PVeRA's rank-space backward of v = μ + ε σ, (μ, log σ²) = chunk(λ_d ⊙ u, 2), σ = exp(½ log σ²):
    dt = [dv, ½ dv ⊙ ε σ] (d/dμ, d/dlog σ²), ∂λ_d = Σ_rows dt ⊙ u, du = λ_d ⊙ dt."""

    def __init__(self, u, lambda_d, es, need_d):
        self.u, self.lambda_d, self.es, self.need_d = u, lambda_d, es, need_d

    def __call__(self, dv):
        dt = torch.cat([dv, dv * self.es * 0.5], dim=1)
        gd = (dt * self.u).sum(0) if self.need_d else None
        return dt.mul_(self.lambda_d), gd


def _pvera_backward(ctx, grad_y, grad_u, grad_z):
    x, weight, A, B, lambda_d, lambda_b, u, z, seed, noise_seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    N, K = weight.shape
    r2 = A.shape[0]
    r = r2 // 2
    dy = grad_y.reshape(rows(x), N)
    x2 = x.reshape(rows(x), K)
    p = ctx.dropout_p
    z = z.reshape(rows(x), N) if z.numel() else None
    backend = backends.select(POP, x.device, x.dtype)
    gW, gbias = _base_grads(need, dy, x2, weight)
    if not ctx.sample:
        gx, gA, gB, gd, gb = _vera_grads(backend, dy, x2, weight, A[:r], B, lambda_d[:r], lambda_b, u.reshape(rows(x), r),
                                         z, p, seed, need[0], need[3], need[4], need[5], need[6])
        if gA is not None:
            gA = torch.cat([gA, gA.new_zeros(r, K)])
        if gd is not None:
            gd = torch.cat([gd, gd.new_zeros(r)])
    else:
        u = u.reshape(rows(x), r2)
        t = u * lambda_d
        es = _noise(noise_seed, u.shape[0], r, u).mul_(torch.exp(0.5 * t[:, r:]))  # ε σ
        gx, gA, gB, gd, gb = _adapter_grads(POP, backend, dy, x2, weight, A, B, lambda_b, z, p, seed, need[0], need[3],
                                            need[4], need[6], _PveraRank(u, lambda_d, es, need[5]),
                                            lambda: t[:, :r] + es)
    return ((None if gx is None else gx.reshape(x.shape)), gW, gbias, gA, gB, gd, gb, None, None, None, None, None)


_pvera_linear.register_autograd(_pvera_backward, setup_context=_pvera_setup_context)
_PveraEager = eager_function("PveraLinear", _pvera_linear, _pvera_setup_context, _pvera_backward)


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
    # (a repeat only where the noise seed is drawn here: a given one is checked with the signature)
    repeat = (dropout_p == 0.0 and noise_seed is None and not torch.compiler.is_compiling() and not any_autocast())
    if repeat and _PLAST.get(x, weight, (bias, pvera_A, pvera_B, lambda_d, lambda_b), (sample,)) == "unfused":
        return _unfused(x, weight, bias, pvera_A, pvera_B, lambda_d, lambda_b, 0.0, seed,
                        _draw_seed(x) if sample else None)
    x, weight, bias, pvera_A, pvera_B, lambda_d, lambda_b = autocast_args(x, weight, bias, pvera_A, pvera_B,
                                                                          lambda_d, lambda_b)
    if dropout_p > 0.0 and seed is None:
        seed = _draw_seed(x)
    if sample and noise_seed is None:
        noise_seed = _draw_seed(x)
    args = (x, weight, bias, pvera_A, pvera_B, lambda_d, lambda_b, float(dropout_p), sample, seed, noise_seed)
    sig = arg_signature(*args[:7], noise_seed) if dropout_p == 0.0 else None
    sig = None if sig is None else (sample, sig)  # the mean and the sampled path differ
    if unfused_hit(POP, sig):
        if repeat:
            _PLAST.put("unfused", x, weight, (bias, pvera_A, pvera_B, lambda_d, lambda_b), (sample,))
        return _unfused(*args[:8], seed, noise_seed if sample else None)
    if _unfused_serves(POP, (*args[:8], seed, noise_seed if sample else None), _recording(args)):
        _validate(*args[:8], seed, POP, noise_seed)
        remember_unfused(POP, sig)
        return _unfused(*args[:8], seed, noise_seed if sample else None)
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:7])
    ):
        _validate(*args[:8], seed, POP, noise_seed)
        return _pvera_forward(backends.select(POP, x.device, x.dtype), *args[:8], sample, seed, noise_seed)[0]
    args = (*args, _recording(args) and lambda_b.requires_grad)
    return _PveraEager(*args)[0]  # the registered op's forward and gradient, without its dispatcher layers
