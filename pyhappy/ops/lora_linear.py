"""pyhappy::lora_linear — fused low-rank adapter linear (LoRA, rsLoRA, LoTR/SORSA-style core).

    y = x Wᵀ + bias + s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ

Registered with ``torch.library.triton_op``: one op, one schema, one fake (the function itself,
run on fake tensors), one autograd formula; the function picks the backend per device
(pyhappy/backends.py) and under torch.compile Inductor sees the Triton launches inside it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext, backends, reference
from .._tune import (LastCalls, arg_signature, bucket, cached_pick, call_signature, is_traced, node_passes,
                     pick_hit, remember_pick, remember_unfused, run_choice, sliced, whole_call_pick, with_aten_engine)
from .._tune import mode as _tune_mode
from ._eager import UNFUSED_NODE, eager_function, offered_nodes, step_way
from ._checks import (any_autocast, autocast_args, check_dropout, check_float_input, check_grad_out, check_in_features,
                      check_tensor, finite_number, rows, unview)

OP = "lora_linear"


def _validate(x, weight, bias, lora_A, lora_B, lora_C, dropout_p, seed, scaling=1.0, op=OP):
    """Checks every argument, naming the one at fault; ``op`` is the op named in the errors (pyhappy::dora_linear
    runs these checks too)."""
    check_float_input(op, "x", x)
    finite_number(f"pyhappy::{op}", "scaling", scaling)
    K = x.shape[-1]
    check_tensor(op, "weight", weight, ndim=2, like=x)
    check_in_features(op, x, weight.shape[1], f"weight is [N, K] = {tuple(weight.shape)}")
    N = weight.shape[0]
    check_tensor(op, "lora_A", lora_A, ndim=2, like=x)
    if lora_A.shape[1] != K or lora_A.shape[0] < 1:
        raise ValueError(f"pyhappy::{op}: lora_A must be [r, K] with r >= 1 and K = {K}, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    check_tensor(op, "lora_B", lora_B, shape=(N, r), like=x)
    if lora_C is not None:
        check_tensor(op, "lora_C", lora_C, shape=(r, r), like=x)
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(N,), like=x)
    check_dropout(op, dropout_p, seed)
    if seed is not None and seed.device != x.device:
        raise ValueError(f"pyhappy::{op}: seed is on {seed.device} but x is on {x.device}")


@torch.library.triton_op("pyhappy::lora_linear", mutates_args=())
def _lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    lora_C: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    _validate(x, weight, bias, lora_A, lora_B, lora_C, dropout_p, seed, scaling)
    return _forward(backends.select(OP, x.device, x.dtype), x, weight, bias, lora_A, lora_B, lora_C, scaling,
                    dropout_p, seed)


def _dropout(x2, p, seed):
    if p == 0.0:
        return x2
    if x2.device.type == "cpu" and hasattr(torch.ops.pyhappy, "dropout_cpu"):
        return torch.ops.pyhappy.dropout_cpu(x2, p, seed)
    return reference.dropout(x2, p, seed)


def _torch_forward(x2, weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed):
    """The unfused PyTorch formulation (PEFT's base(x) + lora_B(lora_A(dropout(x))) · s, the adapter
    product accumulated into y): a candidate of the measured CPU dispatch (pyhappy.tune)."""
    u = _dropout(x2, dropout_p, seed) @ lora_A.t()
    v = u if lora_C is None else u @ lora_C.t()
    y = torch.nn.functional.linear(x2, weight, bias)
    return y.addmm_(v, lora_B.t(), alpha=scaling), u


def _torch_backward(dy, x2, weight, lora_A, lora_B, lora_C, u, scaling, dropout_p, seed, need_grad_x):
    """The backward autograd runs for the unfused formulation, as plain products (a candidate of the
    measured CPU dispatch): dv = s·dy·B, dB = s·dyᵀ·v, dA = duᵀ·dropout(x), dx = dy·W + dropout(du·A)."""
    v = u if lora_C is None else u @ lora_C.t()
    dv = torch.mm(dy, lora_B).mul_(scaling)
    gB = torch.mm(dy.t(), v).mul_(scaling)
    gC = None if lora_C is None else dv.t() @ u
    du = dv if lora_C is None else dv @ lora_C
    gA = du.t() @ _dropout(x2, dropout_p, seed)
    return (_grad_x(dy, weight, du, lora_A, dropout_p, seed) if need_grad_x else None), gA, gB, gC


def _grad_x(dy, weight, du, lora_A, dropout_p, seed):
    """dx = dy·W + dropout(du·A) of a base layer with a low-rank adapter on dropout(x), as plain products
    (du: the gradient of the adapter's rank-space hidden)."""
    gx = torch.mm(dy, weight)
    if dropout_p == 0.0:
        return gx.addmm_(du, lora_A)
    return gx.add_(_dropout(du @ lora_A, dropout_p, seed))


def _tune_key(pass_, x2, weight, lora_A, lora_C, bias, dropout_p):
    return (pass_, str(x2.dtype).replace("torch.", ""), f"M{bucket(x2.shape[0])}", f"K{x2.shape[1]}",
            f"N{weight.shape[0]}", f"r{lora_A.shape[0]}", "core" if lora_C is not None else "",
            "drop" if dropout_p else "", "bias" if bias is not None else "")


def _memo_key(x2, weight, bias, lora_A, lora_C, dropout_p):
    """What makes two calls the same tuning decision, cheaply: what _tune_key is made of (dtype, row
    bucket, shapes, which optional inputs are present, whether dropout is on), not the tensors'
    identities, so factors rebuilt every call (TT-LoRA's A and B) hit it too."""
    return (x2.dtype, bucket(x2.shape[0]), x2.shape[1], weight.shape[0], bias is None, lora_A.shape[0],
            lora_C is None, dropout_p > 0)


def _cpp_forward(x2, weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed):
    args = (x2, weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed)

    def cpp():
        return torch.ops.pyhappy.lora_linear_cpu(*args)

    def on_rows(m):  # a large call's candidates on its first m rows (timed there: _tune.sliced)
        part = (x2[:m], *args[1:])
        return {"cpp": lambda: torch.ops.pyhappy.lora_linear_cpu(*part), "torch": lambda: _torch_forward(*part)}

    def cands():
        c = sliced({"cpp": cpp, "torch": lambda: _torch_forward(*args)}, x2.shape[0], on_rows)
        return with_aten_engine(x2, c, weight.t())
    return run_choice(OP, lambda: _tune_key("fwd", x2, weight, lora_A, lora_C, bias, dropout_p), cands, "cpp", x2,
                      memo=_memo_key(x2, weight, bias, lora_A, lora_C, dropout_p), cold=(weight,),
                      direct={"cpp": cpp})[1]


def _triton_forward(x2, weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed):
    return backends.triton_module(OP).lora_linear_forward(x2, weight, bias, lora_A, lora_B, lora_C, scaling,
                                                          dropout_p, seed, wrap=torch.library.wrap_triton)


def _reference_forward(x2, weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed):
    return reference.lora_linear(x2, weight, bias, lora_A, lora_B, scaling, lora_C, dropout_p, seed)


# (y [M, N], u [M, r]) for x2 [M, K], by backend (see pyhappy/backends.py).
FORWARD = {"cpp": _cpp_forward, "triton": _triton_forward, "reference": _reference_forward}


def _forward(backend, x, weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed):
    """(y [..., N], u [..., r]) on ``backend`` (pyhappy::dora_linear and vera_linear run it on their own choice)."""
    lead, K, N, r = x.shape[:-1], x.shape[-1], weight.shape[0], lora_A.shape[0]
    y, u = FORWARD[backend](x.reshape(-1, K), weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed)
    return unview(y, (*lead, N)), unview(u, (*lead, r))


@torch.library.triton_op("pyhappy::lora_linear_backward", mutates_args=())
def _lora_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    lora_C: Optional[Tensor],
    lora_hidden: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    need_grad_x: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (grad_x, grad_A, grad_B, grad_C) of lora_linear; grad_x / grad_C are empty [0]
    tensors when not needed / when there is no core (schemas cannot return None)."""
    check_grad_out(f"{OP}_backward", grad_out, x, weight.shape[0])
    return _backward_impl(backends.select(OP, x.device, x.dtype), grad_out, x, weight, lora_A, lora_B, lora_C,
                          lora_hidden, scaling, dropout_p, seed, need_grad_x)


def _op_grads(x, lora_C, need_grad_x, gx, gA, gB, gC):
    """The backward op's outputs from a backend's (gx [M, K] or None, gA, gB, gC or None): grad_x in
    x's shape, empty [0] tensors for grad_x / grad_C when not needed / when there is no core."""
    empty = x.new_empty(0)
    return (
        gx.reshape(x.shape) if need_grad_x else empty,
        gA,
        gB,
        gC if lora_C is not None else empty.clone(),
    )


def _cpp_backward(x, dy, x2, weight, lora_A, lora_B, lora_C, u, scaling, dropout_p, seed, need_grad_x):
    args = (dy, x2, weight, lora_A, lora_B, lora_C, u, scaling, dropout_p, seed, need_grad_x)

    direct = {"cpp": lambda: torch.ops.pyhappy.lora_linear_backward_cpu(*args),
              "torch": lambda: _torch_backward(*args)}

    def on_rows(m):  # a large call's candidates on its first m rows (timed there: _tune.sliced)
        part = (dy[:m], x2[:m], weight, lora_A, lora_B, lora_C, u[:m], *args[7:])
        return {"cpp": lambda: torch.ops.pyhappy.lora_linear_backward_cpu(*part),
                "torch": lambda: _torch_backward(*part)}

    def cands():
        return with_aten_engine(dy, sliced(dict(direct), x2.shape[0], on_rows), weight if need_grad_x else None)
    pick, (gx, gA, gB, gC) = run_choice(
        OP, lambda: _tune_key("bwd" if need_grad_x else "bwd_nodx", x2, weight, lora_A, lora_C, None, dropout_p),
        cands, "cpp", x2, memo=("bwd", need_grad_x, *_memo_key(x2, weight, None, lora_A, lora_C, dropout_p)),
        cold=(weight,), direct=direct)
    if pick != "torch":  # the C++ kernels return the layout the op returns
        return (gx.reshape(x.shape) if need_grad_x else gx), gA, gB, gC
    return _op_grads(x, lora_C, need_grad_x, gx, gA, gB, gC)


def _triton_backward(x, dy, x2, weight, lora_A, lora_B, lora_C, u, scaling, dropout_p, seed, need_grad_x):
    return _op_grads(x, lora_C, need_grad_x, *backends.triton_module(OP).lora_linear_backward(
        dy, x2, weight, lora_A, lora_B, lora_C, u, scaling, dropout_p, seed, need_grad_x,
        wrap=torch.library.wrap_triton))


def _reference_backward(x, dy, x2, weight, lora_A, lora_B, lora_C, u, scaling, dropout_p, seed, need_grad_x):
    return _op_grads(x, lora_C, need_grad_x, *reference.lora_linear_backward(
        dy, x2, weight, lora_A, lora_B, lora_C, u, scaling, dropout_p, seed, need_grad_x))


# The backward op's outputs from (x, dy [M, N], x2 [M, K], ..., u [M, r], ...), by backend.
BACKWARD = {"cpp": _cpp_backward, "triton": _triton_backward, "reference": _reference_backward}


def _backward_impl(backend, grad_out, x, weight, lora_A, lora_B, lora_C, lora_hidden, scaling, dropout_p, seed,
                   need_grad_x):
    """lora_linear_backward's body on a given backend (pyhappy::dora_linear's backward runs it on its own)."""
    K, N, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    M = rows(x)
    return BACKWARD[backend](x, grad_out.reshape(M, N), x.reshape(M, K), weight, lora_A, lora_B, lora_C,
                             lora_hidden.reshape(M, r), scaling, dropout_p, seed, need_grad_x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, weight, lora_A, lora_B, lora_C, u, seed)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p


def _backward(ctx, grad_y, grad_u):
    x, weight, lora_A, lora_B, lora_C, u, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, gA, gB, gC = getattr(ctx, "backward_op", torch.ops.pyhappy.lora_linear_backward)(
        grad_y, x, weight, lora_A, lora_B, lora_C, u, ctx.scaling, ctx.dropout_p, seed, need[0]
    )
    N = weight.shape[0]
    dy = grad_y.reshape(rows(x), N)
    g_bias = dy.sum(0) if need[2] else None
    # The base weight is frozen in LoRA training; if a caller does make it trainable, its gradient
    # is still exact (an [N, K] buffer exists only then).
    g_weight = dy.t() @ x.reshape(dy.shape[0], x.shape[-1]) if need[1] else None
    return (
        gx if need[0] else None,
        g_weight,
        g_bias,
        gA if need[3] else None,
        gB if need[4] else None,
        gC if (lora_C is not None and need[5]) else None,
        None,
        None,
        None,
    )


_lora_linear.register_autograd(_backward, setup_context=_setup_context)


_Eager = eager_function("LoraLinear", _lora_linear, _setup_context, _backward, _lora_linear_backward)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    lora_C: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    *,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """Fused LoRA linear: ``x Wᵀ + bias + scaling · ((dropout(x) Aᵀ) Cᵀ) Bᵀ``.

    Args:
        x: [..., K] input.
        weight: [N, K] frozen base weight (no gradient buffer is allocated for it unless it
            requires grad).
        bias: [N] or None.
        lora_A: [r, K]; lora_B: [N, r]; lora_C: optional [r, r] core (None = identity).
        scaling: the LoRA scale s (alpha / r, or alpha / sqrt(r) for rsLoRA); a finite real number
            (None, NaN and inf are refused).
        dropout_p: dropout probability applied to the adapter's input only (the functional form
            always applies it; modules pass 0 in eval mode).
        seed: int64 tensor of one element on x's device fixing the dropout mask; drawn from
            torch's generator of that device when omitted (so torch.manual_seed reproduces it).
    Returns:
        y [..., N] in x's dtype (or the autocast dtype).
    """
    repeat = dropout_p == 0.0 and not torch.compiler.is_compiling() and not any_autocast()
    if repeat:
        hit = _repeat_hit(x, weight, bias, lora_A, lora_B, lora_C, scaling)
        if hit is not None:
            return _run_hit(hit, (x, weight, bias, lora_A, lora_B, lora_C, float(scaling), 0.0, seed))
    scaling = finite_number(f"pyhappy::{OP}", "scaling", scaling)
    x, weight, bias, lora_A, lora_B, lora_C = autocast_args(x, weight, bias, lora_A, lora_B, lora_C)
    if dropout_p > 0.0 and seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
    args = (x, weight, bias, lora_A, lora_B, lora_C, float(scaling), float(dropout_p), seed)
    if torch.compiler.is_compiling():
        if _traced_unfused(*args[:8]):  # small layers: the unfused formulation, as eager calls would run
            return _unfused(*args[:7])
        return _Eager(*args)[0]
    sig = arg_signature(*args[:6]) if dropout_p == 0.0 else None
    hit = pick_hit(OP, sig)
    if hit in _HITS:
        if repeat:  # (the next call like this one skips the signature: LastCalls)
            _LAST.put(hit, x, weight, (bias, lora_A, lora_B, lora_C), (args[6],))
        return _run_hit(hit, args)
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:6])
    way = _serving(args, recording) if dropout_p == 0.0 and x.device.type == "cpu" else None
    if way == "unfused":
        # The measured dispatch chose the unfused formulation for this layer and row count (forward,
        # and backward when autograd records): run it as plain torch ops, as PEFT does, without the
        # custom op around it (its Python layers cost more than a small product's kernel).
        _validate(x, weight, bias, lora_A, lora_B, lora_C, dropout_p, seed, scaling)
        remember_unfused(OP, sig)
        return _unfused(*args[:7])
    if way is not None:
        # A training call whose passes are decided: one C++ autograd node (the passes' picks, or for a
        # small layer the node its whole step measured fastest; the registered op's gradient formula,
        # without its Python layers in the forward and the backward, which cost as much as a small
        # layer's products).
        _validate(x, weight, bias, lora_A, lora_B, lora_C, dropout_p, seed, scaling)
        if not weight.requires_grad:  # (_serving gives a node there once the whole step is decided)
            remember_pick(OP, sig, way)
        return _node(args, way)
    if not recording:
        # Eager inference: nothing to record for autograd, so run the same implementation without
        # the custom-op dispatcher around it, whose Python layers are measurable next to a decode
        # step's kernel (benchmarks/README.md).
        _validate(x, weight, bias, lora_A, lora_B, lora_C, dropout_p, seed, scaling)
        backend = backends.select(OP, x.device, x.dtype)
        y = _forward(backend, *args)[0]
        if backend == "cpp" and sig is not None:
            remember_pick(OP, sig, "cpp", _memo_key(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_C,
                                                    dropout_p))
        return y
    return _Eager(*args)[0]  # the registered op's forward and gradient, without its dispatcher layers


def _run_hit(hit, args):
    """A call whose signature met ``hit`` before (``pick_hit``: its arguments checked, the decision
    settled): "unfused" the unfused formulation as plain torch ops; "cpp" an inference call on the C++
    kernels at once, without the dispatcher (what the checks and the decision's lookup cost in Python
    is a measurable share of a decode step that streams its weight once); an _NODES key a training call
    as that C++ node."""
    if hit == "unfused":
        return _unfused(*args[:7])
    x, weight = args[0], args[1]
    if hit == "cpp":
        lead, K = x.shape[:-1], x.shape[-1]
        y = _ext.load().lora_linear_eager(x.reshape(-1, K), *args[1:])  # the op's C++ function, no dispatcher
        return unview(y, (*lead, weight.shape[0]))
    return _ext.load().lora_linear_step(*args[:7], *_NODES[hit])


_LAST = LastCalls(OP)  # the last call served through pick_hit on each weight (_repeat_hit)


def _repeat_hit(x, weight, bias, lora_A, lora_B, lora_C, scaling) -> str | None:
    """``pick_hit``'s answer for a dropout-free call (not traced, no autocast) that repeats the last
    call kept for this weight (``LastCalls``: the same bias and adapter objects and scaling, nothing
    the signature reads changed), else None."""
    if type(scaling) is not float and type(scaling) is not int:
        return None
    return _LAST.get(x, weight, (bias, lora_A, lora_B, lora_C), (scaling,))


def plus_adapter(y, x2, lora_A, lora_B, lora_C, scaling):
    """y + s · (x2 Aᵀ Cᵀ) Bᵀ in plain torch ops, as the unfused formulations (this op's, quant_linear's)
    run the adapter: y + s v Bᵀ out of place (torch.addmm; an in-place addmm_ on the base product
    records a slower autograd node, a measurable share of a small layer's training step)."""
    u = x2 @ lora_A.t()
    return torch.addmm(y, u if lora_C is None else u @ lora_C.t(), lora_B.t(), alpha=scaling)


def _unfused(x, weight, bias, lora_A, lora_B, lora_C, scaling):
    """The unfused formulation in plain torch ops, dropout off: x Wᵀ + b + s · (x Aᵀ Cᵀ) Bᵀ (no reshape
    of a 2-D x: each adds a node to a training call's autograd graph)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = plus_adapter(torch.nn.functional.linear(x2, weight, bias), x2, lora_A, lora_B, lora_C, scaling)
    return y if x.dim() == 2 else unview(y, (*x.shape[:-1], weight.shape[0]))


def _pass_memos(x, weight, bias, lora_A, lora_C):
    """The ``choose`` signatures of a dropout-free call's forward and backward passes (as _cpp_forward
    and _cpp_backward make them; x of any rank)."""
    x2 = x.reshape(-1, x.shape[-1])
    return (_memo_key(x2, weight, bias, lora_A, lora_C, 0.0),
            ("bwd", x.requires_grad, *_memo_key(x2, weight, None, lora_A, lora_C, 0.0)))


def _step_memo(args):
    """(memo, key) of a training call's whole-step decision (``whole_call_pick``)."""
    x, weight, bias, lora_A, lora_B, lora_C = args[:6]
    ts = (x, bias, lora_A, lora_B, lora_C)
    flags = tuple(t is not None and t.requires_grad for t in ts)
    return call_signature(x, weight.shape[0], lora_A.shape[0], bias, flags, (lora_C is None,),
                          ("core",) if lora_C is not None else ())


# The C++ node's passes by their candidates: (fwd_pass, bwd_pass) of pyhappy._C.lora_linear_step
# ("cpp": pyhappy's kernels, 0; "torch": the unfused products on ATen, 1; "cpp_aten": the kernels with
# their products on ATen, 2).
_PASSES = {"cpp": 0, "torch": 1, "cpp_aten": 2}
_NODES = {f"step:{f}/{b}": (_PASSES[f], _PASSES[b]) for f in _PASSES for b in _PASSES}
_HITS = {"unfused", "cpp", *_NODES}  # what pick_hit can answer for this op (_run_hit)


def _node(args, way):
    """A training call as the C++ node ``way`` (an _NODES key), or through the registered op's autograd
    where ``way`` is None."""
    if way is None:
        return _Eager(*args)[0]
    return _ext.load().lora_linear_step(*args[:7], *_NODES[way])


def _serving(args, recording) -> str | None:
    """How a dropout-free CPU call is served: "unfused" (the unfused formulation as plain torch ops), an
    _NODES key (a training call as one C++ node: its passes' picks, or the node a small layer's step
    measured fastest), or None (the registered op, which measures passes not decided yet).

    Inference: "unfused" where the tuner gave the forward to the unfused formulation. Training: once
    both passes are decided, a layer whose passes take little time has its whole step (forward and
    backward) measured as the C++ nodes ``offered_nodes`` names against the unfused formulation
    (``whole_call_pick``): there the autograd layers are a share of the step that the passes' own
    measurements do not see; the winner serves. Above that time, the node of the passes' decisions
    serves (the unfused formulation where both passes picked it and the base weight trains)."""
    x, weight, bias, lora_A, lora_B, lora_C = args[:6]
    if backends.requested(OP) not in (None, "cpp") or x.dim() < 1 or x.shape[-1] == 0 or is_traced(x):
        return None  # (bad shapes go on to the op's checks, which name them; fake tensors to the op)
    fwd_memo, bwd_memo = _pass_memos(x, weight, bias, lora_A, lora_C)
    fwd = cached_pick(OP, fwd_memo)
    if not recording:
        return "unfused" if fwd == "torch" else None
    bwd = cached_pick(OP, bwd_memo)
    if weight.requires_grad:
        node = offered_nodes((fwd, bwd), _NODES, "lora_linear_step")[0]
        return "unfused" if node == UNFUSED_NODE else node
    x2 = x.reshape(-1, x.shape[-1])
    passes = (_tune_key("fwd", x2, weight, lora_A, lora_C, bias, 0.0),
              _tune_key("bwd" if x.requires_grad else "bwd_nodx", x2, weight, lora_A, lora_C, None, 0.0))
    nodes = offered_nodes(node_passes(OP, passes, (fwd, bwd), _PASSES), _NODES, "lora_linear_step")
    memo, key = _step_memo(args)
    hit = cached_pick(OP, ("step", memo))
    if hit is None:
        _validate(*args[:6], args[7], args[8], args[6])  # the candidates may run on these inputs next
        need = tuple(t for t in (x, bias, lora_A, lora_B, lora_C) if t is not None and t.requires_grad)
        hit = whole_call_pick(OP, memo, key, {n or "op": (lambda n=n: _node(args, n)) for n in nodes},
                              lambda: _unfused(*args[:7]), x, need, cold=(weight,), passes=passes,
                              incumbents=nodes)
    return step_way(hit, nodes)


def _unfused_serves(args, recording) -> bool:
    """Whether the unfused formulation, or the C++ node of its products, serves this dropout-free CPU call
    (``_serving``): a traced call then keeps the plain products (for Inductor), not the op."""
    return _serving(args, recording) in ("unfused", UNFUSED_NODE)


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
_VERDICTS: dict = {}  # unfused_verdict's answers by signature


def unfused_verdict(M: int, K: int, N: int, r: int, dtype: str, has_bias: bool, recording: bool, x_grad: bool,
                    b_grad: bool, scaling: float) -> bool:
    """Whether the measured dispatch serves a CPU call of these shapes (every tensor of ``dtype``, a
    DTYPE_NAMES value; dropout off, no core; recording: autograd records, with x / the bias requiring
    grad as given, A and B trainable) with the unfused formulation: made or read by two eager calls on
    synthetic tensors (a local generator: the caller's random state is untouched), then
    ``_unfused_serves``. For calls that are traced, where nothing can be measured: pyhappy.compiler's
    sites and this op under torch.compile, which take the answer as a constant of the graph. False
    with PYHAPPY_TUNE=off or another backend requested. Remembered per signature, tuning mode, cache
    file and thread count."""
    m = _tune_mode()
    if m == "off" or backends.requested(OP) not in (None, "cpp"):
        return False
    from .._tune import cache_path, eager_scope

    key = (M, K, N, r, dtype, has_bias, recording, x_grad, b_grad, scaling, m, cache_path(), torch.get_num_threads())
    if key in _VERDICTS:
        return _VERDICTS[key]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=gen).to(getattr(torch, dtype)).requires_grad_(grad)
    with eager_scope(), torch.enable_grad() if recording else torch.no_grad():
        x = rand(M, K, grad=recording and x_grad)
        weight = rand(N, K)
        bias = rand(N, grad=recording and b_grad) if has_bias else None
        lora_A, lora_B = rand(r, K, grad=recording), rand(N, r, grad=recording)
        need = [t for t in (x, bias, lora_A, lora_B) if t is not None and t.requires_grad]
        for _ in range(2):  # the passes' decisions, then (small layers) the whole step's
            y = lora_linear(x, weight, bias, lora_A, lora_B, scaling)
            if need:
                torch.autograd.grad(y, need, torch.ones_like(y))
        verdict = _unfused_serves((x, weight, bias, lora_A, lora_B, None, scaling, 0.0, None), recording)
    if len(_VERDICTS) > 1024:
        _VERDICTS.clear()
    _VERDICTS[key] = verdict
    return verdict


# A traced call (Dynamo) takes unfused_verdict's result as a constant of the graph instead of tracing
# into it: the mark torch._dynamo.assume_constant_result sets, set here so that importing pyhappy does
# not import Dynamo.
unfused_verdict._dynamo_marked_constant = True


def _traced_unfused(x, weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p) -> bool:
    """Whether a traced call (torch.compile) of static shapes runs as the unfused formulation, as the
    eager dispatch would (unfused_verdict). Only for arguments that pass the op's checks (matching
    shapes, one dtype, one device): anything else goes to the op, whose checks name the argument."""
    if dropout_p != 0.0 or lora_C is not None or x.device.type != "cpu" or type(scaling) is not float:
        return False
    ts = (x, weight, lora_A, lora_B) if bias is None else (x, weight, lora_A, lora_B, bias)
    if weight.requires_grad or x.dim() < 1 or not all(type(d) is int for t in ts for d in t.shape):
        return False
    if x.dtype not in DTYPE_NAMES or any(t.dtype != x.dtype or t.device != x.device for t in ts):
        return False
    K, N, r = x.shape[-1], weight.shape[0], lora_A.shape[0]
    if (weight.dim() != 2 or weight.shape[1] != K or lora_A.dim() != 2 or lora_A.shape[1] != K or r < 1
            or tuple(lora_B.shape) != (N, r) or (bias is not None and tuple(bias.shape) != (N,)) or K == 0):
        return False
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B))
    return unfused_verdict(x.numel() // K, K, N, r, DTYPE_NAMES[x.dtype], bias is not None, recording,
                           x.requires_grad, bias is not None and bias.requires_grad, scaling)


def _register_cpp_fakes():
    """Fake kernels for the C++ ops, so torch.compile can trace the cpp backend."""

    @torch.library.register_fake("pyhappy::lora_linear_cpu")
    def _(x, weight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed):
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])

    @torch.library.register_fake("pyhappy::lora_linear_backward_cpu")
    def _(grad_out, x, weight, lora_A, lora_B, lora_C, lora_hidden, scaling, dropout_p, seed, need_grad_x):
        gx = x.new_empty(x.shape) if need_grad_x else x.new_empty(0)
        gC = x.new_empty(lora_C.shape) if lora_C is not None else x.new_empty(0)
        return gx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), gC

    @torch.library.register_fake("pyhappy::dropout_cpu")
    def _(x, p, seed):
        return x.new_empty(x.shape)
