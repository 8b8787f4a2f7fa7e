"""pyhappy::quant_linear — linear layer on a packed 4/3-bit weight, with an optional LoRA on top.

    y = x · deq(Wq)ᵀ + bias + s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ

The packed weight (pyhappy/quant/layout.py) is the only copy of the base weight: the forward
dequantizes it tile by tile inside the kernels and the backward computes dx through it the same
way (QLoRA / ModuLoRA training). Same pattern as lora_linear: one triton_op, its fake is the
function on fake tensors, one autograd formula, backends picked per device (pyhappy/backends.py).

Act-order weights (GPTQ ``g_idx``) carry a column permutation; the functional API gathers x's
columns once (x[..., perm]) so kernels always see contiguous groups.

Numerics: every path is exact by default (agrees with dequantize-then-matmul within the input
dtype's rounding). On CPU the decode path (M <= 16 rows, see csrc/cpu/quant_linear.cpp) reads the
packed weight once for all rows and multiplies its codes, turned into fp32 in registers, with the
activations in fp32 (bfloat16 activations on int4/int3 weights, on CPUs with AVX512-BF16: exact
bf16 products summed in fp32, csrc/cpu/quant_linear_decode_bf16.h). At one or two rows of an int4/int3 weight
on CPUs with AVX512-VNNI the measured dispatch also times "cpp_intdot": the activations as
base-256 digits of per-group 30-bit integers (22-bit for 16-bit dtypes), their exact integer dot
products with the codes by vpdpbusd (csrc/cpu/quant_linear_decode_digits.h); larger M and every backward
product run in floating point on dequantized tiles. ``int8_decode=True`` is an explicit opt-in to
a faster approximation on that CPU decode path: the activations are quantized to int8 per
32-element block for integer dot products, as llama.cpp does (~-40 dB of error on top of the
weight's own); nothing else changes with it.

Measured dispatch on CPU (pyhappy/_tune.py): each pass times the fused kernels against
dequantize-then-matmul ("torch"); a training call of a small layer (passes under
``_tune.WHOLE_CALL_US`` together) also times its whole step against bitsandbytes' and PEFT's
formulation in plain autograd (``_unfused``: the weight dequantized for the forward and again for
dx, nothing dense kept between the passes), which then serves the layer where it wins.

On CUDA, the forward at decode sizes (1 <= M <= 2 rows by default, up to 16 forced; float16/bfloat16) runs the CUDA C++ kernel
``pyhappy::quant_decode`` (csrc/cuda/quant_linear.cu: the packed weight read once for all rows,
LoRA and an optional sparse delta in its epilogue) when the extension was built with CUDA; other
shapes and every backward product run the Triton kernels. ``PYHAPPY_BACKEND_QUANT_LINEAR=triton``
keeps decode on Triton, ``=cuda`` forces the CUDA kernel (an error where it cannot serve). On CPU
tensors ``quant_decode`` is a lane-by-lane emulation of that kernel, for tests.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

from .. import _ext, backends, reference
from .._tune import (arg_signature, bucket, cached_pick, call_signature, hit_stamp, is_traced, node_passes,
                     pick_hit, remember_pick, run_choice, run_pick, whole_call_pick)
from ..backends import getenv
from ..quant import layout
from ..quant.nf4 import from_bnb
from ..quant.weight import QuantizedWeight
from . import lora_linear as _lora
from ._cache import ByTensor
from ._eager import UNFUSED_NODE, eager_function, offered_nodes, step_way
from ._checks import (any_autocast, autocast_args, check_dropout, check_float_input, check_tensor, finite_number, rows,
                       select_backend, unview)

OP = "quant_linear"


def _check_packed(qdata, scales, zeros, fmt, N, K, group_size, device):
    if fmt not in (0, 1, 2):
        raise ValueError(f"pyhappy::{OP}: fmt must be 0 (nf4), 1 (int4) or 2 (int3), got {fmt}")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % layout.BLOCK_K or K % group_size:
        raise ValueError(f"pyhappy::{OP}: group_size must be a positive multiple of {layout.BLOCK_K} dividing "
                         f"K = {K}, got {group_size}")
    if N < 1:
        raise ValueError(f"pyhappy::{OP}: N must be >= 1, got {N}")
    bits = 3 if fmt == 2 else 4
    n8, G = layout.n_tiles(N), K // group_size
    want = (n8 // 2, K // layout.BLOCK_K, 2 * layout.BYTES_PER_BLOCK[bits])
    for name, t, dtype, shape in (
        ("qdata", qdata, torch.uint8, want),
        ("scales", scales, torch.float32 if fmt == 0 else torch.float16, (n8, G, layout.TILE_N)),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"pyhappy::{OP}: {name} must be {dtype} {shape} for N={N}, K={K}, "
                             f"group_size={group_size}, got {got}")
        if t.device != device:
            raise ValueError(f"pyhappy::{OP}: {name} is on {t.device} but x is on {device}")
    if fmt == 0:
        if zeros is not None:
            raise ValueError(f"pyhappy::{OP}: zeros must be None for nf4 (fmt 0)")
    else:
        if not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8 or tuple(zeros.shape) != tuple(scales.shape):
            raise ValueError(f"pyhappy::{OP}: zeros must be uint8 {tuple(scales.shape)} for int formats, got "
                             f"{None if zeros is None else (zeros.dtype, tuple(zeros.shape))}")
        if zeros.device != device:
            raise ValueError(f"pyhappy::{OP}: zeros is on {zeros.device} but x is on {device}")


DECODE_SETTINGS = ("exact", "int8")


def _decode_setting() -> str:
    """``PYHAPPY_DECODE``: "exact" (unset: the default) or "int8" (every CPU decode in inference uses
    int8 activations, as int8_decode=True does for one call)."""
    raw = (getenv("PYHAPPY_DECODE") or "exact").strip().lower() or "exact"
    if raw not in DECODE_SETTINGS:
        raise ValueError(f"PYHAPPY_DECODE must be one of {DECODE_SETTINGS}, got {raw!r}")
    return raw


def _check_int8_decode(int8_decode):
    if not isinstance(int8_decode, bool):
        raise TypeError(f"pyhappy::{OP}: int8_decode must be a bool (True opts the CPU decode path into int8 "
                        f"activations), got {int8_decode!r}")


def _validate(x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, dropout_p, seed,
              packed_checked=False, scaling=1.0, int8_decode=False):
    _check_int8_decode(int8_decode)
    check_float_input(OP, "x", x)
    finite_number(f"pyhappy::{OP}", "scaling", scaling)
    K = x.shape[-1]
    if not packed_checked:
        _check_packed(qdata, scales, zeros, fmt, N, K, group_size, x.device)
    if bias is not None:
        check_tensor(OP, "bias", bias, shape=(N,), like=x)
    if lora_A is None:
        if lora_B is not None or lora_C is not None:
            raise ValueError(f"pyhappy::{OP}: lora_B / lora_C given without lora_A")
    else:
        check_tensor(OP, "lora_A", lora_A, ndim=2, like=x)
        if lora_A.shape[1] != K or lora_A.shape[0] < 1:
            raise ValueError(f"pyhappy::{OP}: lora_A must be [r, K] with r >= 1 and K = {K}, got {tuple(lora_A.shape)}")
        r = lora_A.shape[0]
        if lora_B is None:
            raise ValueError(f"pyhappy::{OP}: lora_A given without lora_B")
        check_tensor(OP, "lora_B", lora_B, shape=(N, r), like=x)
        if lora_C is not None:
            check_tensor(OP, "lora_C", lora_C, shape=(r, r), like=x)
    check_dropout(OP, dropout_p, seed)
    if dropout_p > 0.0 and lora_A is None:
        raise ValueError(f"pyhappy::{OP}: dropout_p applies to the LoRA input; it needs lora_A")
    if seed is not None and seed.device != x.device:
        raise ValueError(f"pyhappy::{OP}: seed is on {seed.device} but x is on {x.device}")


_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the C++ kernels serve; float64: reference


def _backend(x: Tensor) -> str:
    return select_backend(OP, x, "quant_linear_cpu", _CPP_DTYPES)


def _runs_decode_kernel(backend: str, x2: Tensor) -> bool:
    """Whether the forward runs the CUDA decode kernel: when 'cuda' is forced (an error where it
    cannot serve; it takes up to 16 rows), or by default on CUDA for 1 <= M <= 2 float16/bfloat16 rows
    when the kernel is built. Why 2: the kernel does its dot products on CUDA cores in fp32, and its
    compiled main loop (SASS, counted per 512-byte warp step: ~250 instructions at M=1, ~1200 at
    M=16 for int4) is estimated to reach ~59% of H100 HBM bandwidth at M=1, ~31% at M=4 and ~12% at
    M=16 — beyond M=2 Triton's tensor-core tiles are expected to win. Estimates, not measurements:
    no GPU has run either kernel yet; the first GPU run (benchmarks quant_linear) should set this."""
    M = x2.shape[0]
    if backend == "cuda":
        if not 1 <= M <= DECODE_MAX_M:
            raise RuntimeError(f"pyhappy::{OP}: backend 'cuda' was forced but its decode kernel takes 1 to "
                               f"{DECODE_MAX_M} rows of x, got {M} (larger M runs on 'triton')")
        return True
    return (backend == "triton" and x2.is_cuda and 1 <= M <= DECODE_DEFAULT_MAX_M and backends.requested(OP) is None
            and hasattr(torch.ops.pyhappy, "quant_decode")
            and backends.unavailable_reason("cuda", x2.device, x2.dtype) is None)


DECODE_MAX_M = 16  # rows the decode kernel takes (forced)
DECODE_DEFAULT_MAX_M = 2  # rows up to which it runs by default (see _runs_decode_kernel)


def _decode_forward(x2, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p,
                    seed, sparse=None):
    """(y, u) through pyhappy::quant_decode: the adapter's hidden u = dropout(x) Aᵀ by one small
    matmul, then one kernel for x · deq(W)ᵀ + bias + s · (u Cᵀ) Bᵀ (+ the sparse delta
    ``sparse = (layout, values, scale)``). Runs on any device the op has: CUDA (the kernel) or CPU
    (its emulation, which is how the CPU tests reach this glue)."""
    u = x2.new_empty(x2.shape[0], 0)
    v = B = None
    if lora_A is not None:
        u = reference.dropout(x2, dropout_p, seed) @ lora_A.t()
        v = u if lora_C is None else u @ lora_C.t()
        v, B = (v.float() * scaling).contiguous(), lora_B.contiguous()
    lay, vals, ss = sparse if sparse is not None else (None, None, 0.0)
    y = torch.ops.pyhappy.quant_decode(x2.contiguous(), qdata, scales, zeros, fmt, N, group_size,
                                       None if bias is None else bias.contiguous(), v, B, lay,
                                       None if vals is None else vals.contiguous(), float(ss))
    return y, u


@torch.library.triton_op("pyhappy::quant_linear", mutates_args=())
def _quant_linear(
    x: Tensor,
    qdata: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    fmt: int,
    N: int,
    group_size: int,
    bias: Optional[Tensor],
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    lora_C: Optional[Tensor],
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    int8_decode: bool = False,
) -> tuple[Tensor, Tensor]:
    _validate(x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, dropout_p, seed,
              scaling=scaling, int8_decode=int8_decode)
    return _forward(_backend(x), x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C,
                    scaling, dropout_p, seed, int8_decode)


def _tune_key(pass_, x2, N, fmt, group_size, lora_A, lora_C, bias, dropout_p):
    return (pass_, str(x2.dtype).replace("torch.", ""), f"M{bucket(x2.shape[0])}", f"K{x2.shape[1]}", f"N{N}",
            f"fmt{fmt}", f"g{group_size}", f"r{0 if lora_A is None else lora_A.shape[0]}",
            "core" if lora_C is not None else "", "drop" if dropout_p else "", "bias" if bias is not None else "")


def _memo_key(x2, N, fmt, group_size, lora_A, lora_C, bias, dropout_p):
    return (x2.dtype, bucket(x2.shape[0]), x2.shape[1], N, fmt, group_size,
            0 if lora_A is None else lora_A.shape[0], lora_C is None, bias is None, dropout_p > 0)


def _dequantized(x2, qdata, scales, zeros, fmt, N, group_size):
    return torch.ops.pyhappy.quant_dequantize_cpu(qdata, scales, zeros, fmt, N, x2.shape[1], group_size, x2.dtype)


def _torch_forward(x2, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p,
                   seed):
    """The unfused formulation bitsandbytes + PEFT run: the weight dequantized into a dense scratch
    copy, then F.linear and the adapter's products (a candidate of the measured CPU dispatch)."""
    w = _dequantized(x2, qdata, scales, zeros, fmt, N, group_size)
    if lora_A is None:
        return torch.nn.functional.linear(x2, w, bias), x2.new_empty(x2.shape[0], 0)
    return _lora._torch_forward(x2, w, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed)


def _cpp_choice(x2, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p,
                seed, int8_decode):
    """(the candidate that ran, (y, u)) on the C++ backend: the int8 opt-in runs its own kernel;
    otherwise the measured dispatch (pyhappy._tune) picks between the fused kernels ("cpp") and the
    dequantize-then-matmul formulation ("torch", the incumbent)."""
    args = (x2.contiguous(), qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling,
            dropout_p, seed)
    if int8_decode:
        return "int8", torch.ops.pyhappy.quant_linear_cpu(*args, True)
    if not hasattr(torch.ops.pyhappy, "quant_dequantize_cpu"):
        return "cpp", torch.ops.pyhappy.quant_linear_cpu(*args, False)
    return run_choice(OP, lambda: _tune_key("fwd", x2, N, fmt, group_size, lora_A, lora_C, bias, dropout_p),
                      lambda: _forward_candidates(args), "cpp", x2,
                      memo=_memo_key(x2, N, fmt, group_size, lora_A, lora_C, bias, dropout_p), cold=(qdata,),
                      direct=_forward_candidates(args, offered_only=False))


def _forward_candidates(args, offered_only=True):
    """The CPU forward's candidates: "cpp" (the fused kernels: at M <= 16 the fp32 decode kernel),
    "torch" (dequantize-then-matmul) and, for one or two rows of an int4 / int3 weight on a CPU with
    AVX512-VNNI, "cpp_intdot": the exact integer decode kernel (csrc/cpu/quant_linear_decode_digits.h;
    where it does not serve, the C++ op runs the fp32 one). All are exact (within the input dtype's
    rounding). ``offered_only=False``: all three without probing the CPU (to run a pick)."""
    c = {"cpp": lambda: torch.ops.pyhappy.quant_linear_cpu(*args, False),
         "torch": lambda: _torch_forward(*args),
         "cpp_intdot": lambda: torch.ops.pyhappy.quant_linear_cpu(*args, False, True)}
    if offered_only and not (args[0].shape[0] <= 2 and args[4] != 0 and "avx512vnni" in _ext.load().simd_level()):
        del c["cpp_intdot"]
    return c


def _cpp_forward(*args):
    return _cpp_choice(*args)[1]


def _cuda_forward(x2, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p,
                  seed, int8_decode):
    _runs_decode_kernel("cuda", x2)  # raises where the decode kernel cannot take x2's rows
    return _decode_forward(x2, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling,
                           dropout_p, seed)


def _triton_forward(x2, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p,
                    seed, int8_decode):
    args = (x2, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed)
    if _runs_decode_kernel("triton", x2):
        return _decode_forward(*args)
    return backends.triton_module(OP).quant_linear_forward(*args, wrap=torch.library.wrap_triton)


def _reference_forward(x2, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p,
                       seed, int8_decode):
    return reference.quant_linear(x2, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling,
                                  dropout_p, seed)


# (y [M, N], u [M, r]) for x2 [M, K], by backend (see pyhappy/backends.py). int8_decode reaches the
# cpp backend only: the other backends' decode paths are float.
FORWARD = {"cpp": _cpp_forward, "cuda": _cuda_forward, "triton": _triton_forward, "reference": _reference_forward}


def _forward(backend, x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p,
             seed, int8_decode=False):
    lead, K = x.shape[:-1], x.shape[-1]
    r = 0 if lora_A is None else lora_A.shape[0]
    y, u = FORWARD[backend](x.reshape(-1, K), qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C,
                            scaling, dropout_p, seed, int8_decode)
    return unview(y, (*lead, N)), unview(u, (*lead, r))


def _torch_backward(dy, x2, qdata, scales, zeros, fmt, group_size, lora_A, lora_B, lora_C, u, scaling, dropout_p,
                    seed, need_grad_x):
    """What autograd runs for the unfused formulation: the weight dequantized again for dx = dy·W,
    the adapter's products as lora_linear's unfused backward."""
    w = _dequantized(x2, qdata, scales, zeros, fmt, dy.shape[1], group_size)
    if lora_A is None:
        return (dy @ w if need_grad_x else None), None, None, None
    return _lora._torch_backward(dy, x2, w, lora_A, lora_B, lora_C, u, scaling, dropout_p, seed, need_grad_x)


def _cpp_backward(dy, x2, *args):
    dy, x2 = dy.contiguous(), x2.contiguous()
    if not hasattr(torch.ops.pyhappy, "quant_dequantize_cpu"):
        return torch.ops.pyhappy.quant_linear_backward_cpu(dy, x2, *args)
    qdata, _, _, fmt, group_size, lora_A, _, lora_C, _, _, dropout_p, _, need_grad_x = args
    pass_ = "bwd" if need_grad_x else "bwd_nodx"
    return run_pick(OP, lambda: _tune_key(pass_, x2, dy.shape[1], fmt, group_size, lora_A, lora_C, None, dropout_p),
                    lambda: {"cpp": lambda: torch.ops.pyhappy.quant_linear_backward_cpu(dy, x2, *args),
                             "torch": lambda: _torch_backward(dy, x2, *args)}, "cpp", x2,
                    memo=(pass_, *_memo_key(x2, dy.shape[1], fmt, group_size, lora_A, lora_C, None, dropout_p)),
                    cold=(qdata,))


def _triton_backward(*args):
    return backends.triton_module(OP).quant_linear_backward(*args, wrap=torch.library.wrap_triton)


# (grad_x, grad_A, grad_B, grad_C), each None or empty where not needed / not present, for
# (dy [M, N], x2 [M, K], qdata, scales, zeros, fmt, group_size, lora_A, lora_B, lora_C, u [M, r],
# scaling, dropout_p, seed, need_grad_x), by backend. The CUDA C++ kernel is the decode forward: the
# backward products under "cuda" are Triton's.
BACKWARD = {"cpp": _cpp_backward, "cuda": _triton_backward, "triton": _triton_backward,
            "reference": reference.quant_linear_backward}


@torch.library.triton_op("pyhappy::quant_linear_backward", mutates_args=())
def _quant_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    qdata: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    fmt: int,
    group_size: int,
    lora_A: Optional[Tensor],
    lora_B: Optional[Tensor],
    lora_C: Optional[Tensor],
    lora_hidden: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    need_grad_x: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_A, grad_B, grad_C); empty [0] tensors for pieces not needed / not present."""
    K, N = x.shape[-1], grad_out.shape[-1]
    r = lora_hidden.shape[-1]
    dy = grad_out.reshape(rows(x), N)
    x2 = x.reshape(rows(x), K)
    u = lora_hidden.reshape(x2.shape[0], r)
    gx, gA, gB, gC = BACKWARD[_backend(x)](dy, x2, qdata, scales, zeros, fmt, group_size, lora_A, lora_B, lora_C, u,
                                           scaling, dropout_p, seed, need_grad_x)
    empty = x.new_empty(0)
    return (
        gx.reshape(x.shape) if (need_grad_x and gx is not None and gx.numel() == x.numel()) else empty,
        gA if gA is not None else empty.clone(),
        gB if gB is not None else empty.clone(),
        gC if gC is not None else empty.clone(),
    )


def _setup_context(ctx, inputs, output):
    x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed = inputs[:14]
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x, qdata, scales, zeros, lora_A, lora_B, lora_C, u, seed)
    ctx.fmt, ctx.group_size, ctx.scaling, ctx.dropout_p = fmt, group_size, scaling, dropout_p


def _backward(ctx, grad_y, grad_u):
    x, qdata, scales, zeros, lora_A, lora_B, lora_C, u, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    lora = lora_A is not None and (need[8] or need[9] or (lora_C is not None and need[10]))
    gx, gA, gB, gC = getattr(ctx, "backward_op", torch.ops.pyhappy.quant_linear_backward)(
        grad_y, x, qdata, scales, zeros, ctx.fmt, ctx.group_size,
        lora_A if lora else None, lora_B if lora else None, lora_C if lora else None,
        u if lora else u.new_empty(*u.shape[:-1], 0),
        ctx.scaling, ctx.dropout_p, seed, need[0],
    )
    if need[0] and not lora and lora_A is not None:
        # Adapter frozen but present: its contribution to dx still counts.
        dv = ctx.scaling * (grad_y.reshape(rows(grad_y), grad_y.shape[-1]) @ lora_B)
        du = dv if lora_C is None else dv @ lora_C
        gx = gx + reference.dropout(du @ lora_A, ctx.dropout_p, seed).reshape(gx.shape)
    N = grad_y.shape[-1]
    g_bias = grad_y.reshape(rows(grad_y), N).sum(0) if need[7] else None
    return (
        gx if need[0] else None, None, None, None, None, None, None, g_bias,
        gA if lora and need[8] else None,
        gB if lora and need[9] else None,
        gC if lora and lora_C is not None and need[10] else None,
        None, None, None, None,
    )


_quant_linear.register_autograd(_backward, setup_context=_setup_context)
_Eager = eager_function("QuantLinear", _quant_linear, _setup_context, _backward, _quant_linear_backward)


def quant_linear(
    x: Tensor,
    qweight,
    bias: Optional[Tensor] = None,
    lora_A: Optional[Tensor] = None,
    lora_B: Optional[Tensor] = None,
    scaling: float = 1.0,
    lora_C: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    *,
    seed: Optional[Tensor] = None,
    int8_decode: bool = False,
) -> Tensor:
    """``x · deq(qweight)ᵀ + bias + scaling · ((dropout(x) Aᵀ) Cᵀ) Bᵀ`` without a dense copy of the weight.

    Args:
        x: [..., K] input (float32 / bfloat16 / float16 run the C++ kernels on CPU; float64 the reference).
        qweight: a :class:`pyhappy.quant.QuantizedWeight` [N, K] on x's device (see ``pyhappy.quantize``).
        bias: [N] or None. lora_A [r, K], lora_B [N, r], lora_C [r, r] or None: the optional adapter
            (all in x's dtype); scaling its scale (a finite real number); dropout_p/seed as in
        :func:`pyhappy.ops.lora_linear`.
        int8_decode: False (default): exact, the result agrees with ``x @ qweight.dequantize().T`` (+ the
            rest) within the input dtype's rounding on every path. True: an approximate opt-in for CPU
            decoding (the C++ kernel at <= 16 rows of x): the activations are quantized to int8 per
            32-element block (scale max|x|/127) for integer dot products, as llama.cpp does, adding
            ~-40 dB of error (SQNR ~40 dB against the exact product) for a faster memory-bound forward.
            Other paths (larger M, the backward, CUDA, the reference) stay exact with it, and so
            does every call while autograd records (training). ``PYHAPPY_DECODE=int8`` opts every
            inference call in (the modules: ``act_quant="int8"``).
    Returns:
        y [..., N] in x's dtype (or the autocast dtype).
    """
    call = (x, qweight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed, int8_decode)
    sig = None
    if not torch.compiler.is_compiling():  # (traced: nothing to remember)
        y = _decode_hit(*call)
        if y is not None:
            return y
        sig = _decode_signature(*call)
        pick = pick_hit(OP, sig)
        if pick == "unfused":  # a training call of a signature the whole-step decision gave to it
            return _run_unfused(x, qweight, bias, lora_A, lora_B, lora_C, float(scaling))
        if pick in _NODES:  # a training call of a signature checked and served as one C++ node before
            return _run_node(pick, x, qweight, bias, lora_A, lora_B, lora_C, float(scaling))
        if pick is not None:
            _remember_hit(pick, sig, *call)
            return _run_decode(pick, x, qweight, bias, lora_A, lora_B, lora_C, scaling)
    _check_int8_decode(int8_decode)
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"pyhappy::{OP}: qweight must be a pyhappy.quant.QuantizedWeight, got {type(qweight).__name__}")
    N, K = qweight.shape
    scaling = finite_number(f"pyhappy::{OP}", "scaling", scaling)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"pyhappy::{OP}: x must be [..., K] with K = {K} (qweight is [{N}, {K}]), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    x, bias, lora_A, lora_B, lora_C = autocast_args(x, bias, lora_A, lora_B, lora_C)
    compiling = torch.compiler.is_compiling()
    packed = [packed_args(qweight), None] if compiling else _packed(qweight)
    args, checked_on, perm = packed[0], packed[1], qweight.perm
    if perm is not None:
        x = x.index_select(-1, perm)
        if lora_A is not None:
            lora_A = lora_A.index_select(1, perm)
    if dropout_p > 0.0 and seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=x.device)
    recording = torch.is_grad_enabled() and any(a is not None and a.requires_grad
                                                for a in (x, bias, lora_A, lora_B, lora_C))
    # The int8 opt-in (this call's int8_decode, or PYHAPPY_DECODE=int8) serves inference only: while
    # autograd records, the forward is exact.
    int8 = (int8_decode or _decode_setting() == "int8") and not recording
    full = (x, *args, bias, lora_A, lora_B, lora_C, float(scaling), float(dropout_p), seed, int8)
    if not compiling and not recording:
        # Eager inference (decode): skip the custom-op dispatcher's Python layers, as lora_linear does,
        # and the packed tensors' checks once they passed for this device (_packed; the C++ op
        # checks their dtypes, shapes and device again on every call).
        ok = checked_on == x.device
        _validate(x, *args[:3], args[3], args[4], args[5], bias, lora_A, lora_B, lora_C, dropout_p, seed,
                  packed_checked=ok, scaling=scaling, int8_decode=int8)
        packed[1] = x.device
        backend = _backend(x)
        if backend == "cpp":  # the C++ backend straight away: y only (no hidden, no reshape of 2-D x)
            x2 = x.reshape(-1, K)
            pick, (y, _) = _cpp_choice(x2, *full[1:])
            sig = _decode_signature(*call) if sig is None else sig
            remember_pick(OP, sig, pick, None if pick == "int8" else
                          _memo_key(x2, N, args[3], args[5], lora_A, lora_C, bias, dropout_p))
            _remember_hit(pick, sig, *call)
            return y if x.dim() == 2 else unview(y, (*x.shape[:-1], N))
        return _forward(backend, *full)[0]
    way = _serving(full) if not compiling and dropout_p == 0.0 else None
    if way is not None:
        # A training call whose passes and whole step are decided: "unfused", bitsandbytes' and
        # PEFT's formulation in plain autograd, where the step measured faster (small layers, where
        # the autograd layers are a share of the step); else one C++ node (the passes' picks, or the
        # node the step measured fastest).
        # Its checks pass for this signature: later calls take it at once.
        _validate(x, *args, bias, lora_A, lora_B, lora_C, dropout_p, seed, packed_checked=checked_on == x.device,
                  scaling=scaling)
        packed[1] = x.device
        remember_pick(OP, _decode_signature(*call) if sig is None else sig, way)
        if way == "unfused":
            return _unfused(x, args, bias, lora_A, lora_B, lora_C, float(scaling))
        return _node(full, way)
    return _Eager(*full)[0]  # the registered op's forward and gradient, without its dispatcher layers


class _DequantizedLinear(torch.autograd.Function):
    """x2 · deq(W)ᵀ + bias with the weight dequantized for the product and again for dx in the
    backward, nothing dense kept between the passes: bitsandbytes' ``MatMul4Bit``, what a QLoRA
    layer runs without pyhappy."""

    @staticmethod
    def forward(ctx, x2, bias, qdata, scales, zeros, fmt, N, group_size):
        ctx.save_for_backward(qdata, scales, zeros)
        ctx.fmt, ctx.N, ctx.group_size, ctx.K = fmt, N, group_size, x2.shape[1]
        return torch.nn.functional.linear(x2, _dequantized(x2, qdata, scales, zeros, fmt, N, group_size), bias)

    @staticmethod
    def backward(ctx, g):
        qdata, scales, zeros = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ torch.ops.pyhappy.quant_dequantize_cpu(qdata, scales, zeros, ctx.fmt, ctx.N, ctx.K,
                                                            ctx.group_size, g.dtype)
        if ctx.needs_input_grad[1]:
            gb = g.sum(0)
        return gx, gb, None, None, None, None, None, None


def _unfused(x, args, bias, lora_A, lora_B, lora_C, scaling):
    """The unfused formulation of a training call in plain autograd: the base product as
    ``_DequantizedLinear``, the adapter as PEFT's products (x and lora_A in the packed weight's
    column order). ``args``: ``packed_args`` of the weight."""
    qdata, scales, zeros, fmt, N, group_size = args
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = _DequantizedLinear.apply(x2, bias, qdata, scales, zeros, fmt, N, group_size)
    if lora_A is not None:
        y = _lora.plus_adapter(y, x2, lora_A, lora_B, lora_C, scaling)
    return y if x.dim() == 2 else unview(y, (*x.shape[:-1], N))


def _run_unfused(x, qweight, bias, lora_A, lora_B, lora_C, scaling):
    """``_unfused`` for a call whose signature was checked and given to it before (``pick_hit``)."""
    perm = qweight.perm
    if perm is not None:
        x = x.index_select(-1, perm)
        lora_A = None if lora_A is None else lora_A.index_select(1, perm)
    return _unfused(x, qweight.__dict__["_packed"][0], bias, lora_A, lora_B, lora_C, scaling)


# The C++ node's pass kernels by their candidates: (torch_fwd, torch_bwd) of pyhappy._C.quant_linear_step
# ("cpp": pyhappy's kernels, "torch": the dequantized weight's products on ATen; another pick keeps the
# registered op).
_NODES = {f"step:{f}/{b}": (f == "torch", b == "torch") for f in ("cpp", "torch") for b in ("cpp", "torch")}


def _node(full, way):
    """A training call (``full``: the registered op's arguments, x and lora_A in the packed weight's
    column order) as the C++ node ``way`` (an _NODES key), or through the registered op where ``way``
    is None."""
    if way is None:
        return _Eager(*full)[0]
    x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling = full[:12]
    return _ext.load().quant_linear_step(x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C,
                                         float(scaling), *_NODES[way])


def _run_node(way, x, qweight, bias, lora_A, lora_B, lora_C, scaling):
    """``_node`` for a call whose signature was checked and given to ``way`` before (``pick_hit``)."""
    perm = qweight.perm
    if perm is not None:
        x = x.index_select(-1, perm)
        lora_A = None if lora_A is None else lora_A.index_select(1, perm)
    return _ext.load().quant_linear_step(x, *qweight.__dict__["_packed"][0], bias, lora_A, lora_B, lora_C, scaling,
                                         *_NODES[way])


def _serving(full) -> str | None:
    """How a training call (dropout off, not traced) is served: "unfused" (``_unfused``), an _NODES key
    (one C++ node: the two passes' picks, or the node a small layer's step measured fastest), or None
    (the registered op, which measures passes not decided yet); the C++ backend only. Once both passes are decided, a layer whose passes take
    little time has its whole step (forward and backward) timed as the C++ nodes ``offered_nodes``
    names against the unfused formulation (``pyhappy._tune.whole_call_pick``): there the autograd
    layers are a share of the step that no pass's measurement sees; the winner serves. Above that
    time the node of the passes' decisions serves."""
    x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed, int8 = full
    if (x.device.type != "cpu" or _backend(x) != "cpp" or not hasattr(torch.ops.pyhappy, "quant_dequantize_cpu")
            or x.dim() < 1 or x.shape[-1] == 0 or is_traced(x)):
        return None  # (fake tensors: the registered op, which runs them)
    ts = (x, bias, lora_A, lora_B, lora_C)
    flags = tuple(t is not None and t.requires_grad for t in ts)
    x2 = x.reshape(-1, x.shape[-1])
    # The backward's key names the adapter only where it trains (_backward leaves a frozen one out).
    bA, bC = (lora_A, lora_C) if any(flags[2:]) else (None, None)
    bwd_pass = "bwd" if x.requires_grad else "bwd_nodx"
    fwd = cached_pick(OP, _memo_key(x2, N, fmt, group_size, lora_A, lora_C, bias, 0.0))
    bwd = cached_pick(OP, (bwd_pass, *_memo_key(x2, N, fmt, group_size, bA, bC, None, 0.0)))
    passes = (_tune_key("fwd", x2, N, fmt, group_size, lora_A, lora_C, bias, 0.0),
              _tune_key(bwd_pass, x2, N, fmt, group_size, bA, bC, None, 0.0))
    nodes = offered_nodes(node_passes(OP, passes, (fwd, bwd), ("cpp", "torch")), _NODES, "quant_linear_step")
    memo, key = call_signature(x, N, None if lora_A is None else lora_A.shape[0], bias, flags,
                               (fmt, group_size, lora_C is None),
                               (f"fmt{fmt}", f"g{group_size}", "core" if lora_C is not None else ""))
    hit = cached_pick(OP, ("step", memo))
    if hit is None:
        _validate(*full[:11], dropout_p, seed, scaling=scaling)  # the candidates may run on these inputs next
        need = tuple(t for t, f in zip(ts, flags) if f)
        hit = whole_call_pick(OP, memo, key, {n or "op": (lambda n=n: _node(full, n)) for n in nodes},
                              lambda: _unfused(x, full[1:7], bias, lora_A, lora_B, lora_C, scaling), x, need,
                              cold=(qdata,), passes=passes, incumbents=nodes)
    return step_way(hit, nodes)


def _decode_signature(x, qweight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed, int8_decode):
    """What the checks of an eager inference call read (the tensors' shapes, dtypes, devices and
    requires_grad, the grad mode, the packed weight's format, shape and devices, scaling, the int8
    setting), for ``pick_hit``: a call whose signature was checked and served before runs its pick
    straight away (``_run_decode``). None where that does not apply: a packed weight not yet
    checked on x's device, dropout, a seed, autocast, an argument of an unexpected type."""
    # One frame of cheap tests, most likely to fail first (this runs on every decode call, where each
    # further Python frame costs microseconds at the caches a weight's stream leaves).
    if (type(int8_decode) is not bool or type(scaling) not in (float, int) or type(dropout_p) not in (float, int)
            or dropout_p != 0 or seed is not None or not isinstance(qweight, QuantizedWeight)
            or not isinstance(x, Tensor)):
        return None
    c = qweight.__dict__.get("_packed")  # (_packed: built and checked by the call's full path)
    if c is None:
        return None
    dev = x.device
    if c[1] != dev or (any_autocast() and torch.is_autocast_enabled(dev.type)):
        return None
    d = qweight.data
    if not all(map(operator.is_, _packed_tensors(d), c[2][0])):  # the tensors _packed checked
        return None
    sig = arg_signature(x, bias, lora_A, lora_B, lora_C)
    if sig is None:
        return None
    return sig, c[2][1], d["format"], tuple(d["shape"]), d["group_size"], scaling, int8_decode, getenv("PYHAPPY_DECODE")


_stamp = hit_stamp(OP, "PYHAPPY_DECODE")


def _decode_hit(x, qweight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed, int8_decode):
    """y for an eager inference call that repeats the last call served through ``_remember_hit`` on
    this weight (the same bias and adapter tensors, scaling, int8 setting and x's shape and dtype on
    the CPU, the weight's packed tensors unchanged, no autograd recording, no autocast) under the same
    settings (``hit_stamp``: where ``pick_hit`` gave that call's pick, it gives it to this one); else
    None. A decode step calls each layer's weight once with the same arguments, and
    this path reads the fewest objects that decide it: the caches are cold at each call (the
    previous layers' weights have streamed through them), so every object read costs a miss."""
    if type(qweight) is not QuantizedWeight:
        return None
    h = qweight.__dict__.get("_hit")
    if (h is None or h[0] is not bias or h[1] is not lora_A or h[2] is not lora_B or h[3] is not lora_C
            or h[4] != scaling or h[5] is not int8_decode or dropout_p or seed is not None
            or type(x) is not Tensor or not x.is_cpu or x.dtype is not h[6] or x.shape != h[7]):
        return None
    d = qweight.data
    if (d is not h[8] or d["qdata"] is not h[9] or d.get("absmax") is not h[10] or d.get("scales") is not h[11]
            or d.get("zeros") is not h[12] or d.get("perm") is not None):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad) or (
            lora_A is not None and (lora_A.requires_grad or lora_B.requires_grad
                                    or (lora_C is not None and lora_C.requires_grad)))):
        return None
    if any_autocast() and torch.is_autocast_enabled("cpu"):
        return None
    if _stamp() != h[13]:
        return None
    if h[16]:  # 2-D x (the C++ function makes it contiguous where it is not)
        return h[15](x, *h[17])
    return unview(h[15](x.reshape(-1, x.shape[-1]), *h[17]), (*x.shape[:-1], h[18]))


def _remember_hit(pick, sig, x, qweight, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed, int8_decode):
    """Keep on the weight what ``_decode_hit`` needs to serve the next call like this one (served by
    the C++ kernel ``pick``, its arguments checked, its signature ``sig`` remembered by the tuner)."""
    if pick == "torch" or sig is None or type(qweight) is not QuantizedWeight or type(x) is not Tensor or not x.is_cpu:
        return
    c = qweight.__dict__.get("_packed")
    d = qweight.data
    # (act-order weights permute x per call: they keep the signature path)
    if c is None or d.get("perm") is not None or pick_hit(OP, sig) != pick:
        return
    args = c[0]
    tail = (*args, bias, lora_A, lora_B, lora_C, float(scaling), 0.0, None, pick == "int8", pick == "cpp_intdot")
    # A plain tuple (each field read by index: _decode_hit touches as few objects as it can).
    qweight.__dict__["_hit"] = (bias, lora_A, lora_B, lora_C, scaling, int8_decode, x.dtype, x.shape,  # 0-7
                                d, *_packed_tensors(d)[:4],  # 8-12: qdata, absmax, scales, zeros
                                _stamp(), pick, _ext.load().quant_linear_eager, x.dim() == 2, tail, args[4])  # 13-18


def _run_decode(pick, x, qweight, bias, lora_A, lora_B, lora_C, scaling):
    """An eager inference call whose signature met ``pick`` before (``_decode_signature``):
    "cpp" / "cpp_intdot" / "int8" the C++ kernel (the fp32 or exact integer decode, or int8 activations),
    "torch" dequantize-then-matmul."""
    perm = qweight.perm
    if perm is not None:
        x = x.index_select(-1, perm)
        if lora_A is not None:
            lora_A = lora_A.index_select(1, perm)
    args = qweight.__dict__["_packed"][0]
    K, N = x.shape[-1], args[4]
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, K).contiguous()
    full = (x2, *args, bias, lora_A, lora_B, lora_C, float(scaling), 0.0, None)
    if pick == "torch":
        y = _torch_forward(*full)[0]
    else:  # the op's C++ function without the dispatcher (csrc/pyhappy.cpp, quant_linear_eager)
        y = _ext.load().quant_linear_eager(*full, pick == "int8", pick == "cpp_intdot")
    return y if x.dim() == 2 else unview(y, (*x.shape[:-1], N))


def quant_sparse_decode(x: Tensor, qweight, bias: Optional[Tensor], values: Tensor, layout: Tensor,
                        scale: float) -> Optional[Tensor]:
    """``x · deq(qweight)ᵀ + bias + scale · x · ΔWᵀ`` as one CUDA decode kernel call (inference on a
    quantized base with one sparse delta, the pattern's ``layout`` from ``sparse_layout``), or None
    where that kernel does not serve (CPU, M > 16, float32, act-order weights, gradients needed)."""
    finite_number("pyhappy::sparse_delta_linear", "scale", scale)
    if (torch.compiler.is_compiling() or qweight.perm is not None or values.dtype != x.dtype
            or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, values)))):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if not _runs_decode_kernel(_backend(x2), x2):
        return None
    args = packed_args(qweight)
    _validate(x2, *args[:3], args[3], args[4], args[5], bias, None, None, None, 0.0, None)
    y, _ = _decode_forward(x2, *args, bias, None, None, None, 1.0, 0.0, None, sparse=(layout, values, scale))
    return unview(y, (*x.shape[:-1], qweight.shape[0]))


def _packed(qweight) -> list:
    """[packed_args(qweight), the device its packed tensors passed _check_packed on (or None), key],
    kept on the weight while its tensors are the same objects, on the same devices, and its metadata
    equal (a decode step calls this per layer, and rebuilding it every call would add a fixed cost to
    every decode step; benchmarks/README.md, "Design measurements", "Cached packed arguments of a
    quantized weight"). Not pickled (QuantizedWeight.__getstate__)."""
    d = qweight.data
    tensors = _packed_tensors(d)
    meta = (d["format"], tuple(d["shape"]), d["group_size"], *(t.device for t in tensors if t is not None))
    c = qweight.__dict__.get("_packed")
    if c is None or c[2][1] != meta or not all(a is b for a, b in zip(c[2][0], tensors)):
        c = [packed_args(qweight), None, (tensors, meta)]
        qweight.__dict__["_packed"] = c
    return c


def _packed_tensors(d: dict) -> tuple:
    """A QuantizedWeight's tensors (its ``data``) that ``_packed`` keeps its arguments for."""
    return d["qdata"], d.get("absmax"), d.get("scales"), d.get("zeros"), d.get("perm")


def packed_args(qweight) -> tuple:
    """(qdata, scales, zeros, fmt, N, group_size): what the op takes for a QuantizedWeight."""
    d = qweight.data
    scales = d["absmax"] if qweight.format == "nf4" else d["scales"]
    return (d["qdata"], scales, d.get("zeros"), layout.FORMAT_CODE[qweight.format], qweight.shape[0],
            qweight.group_size)


def _register_cpp_fakes():
    """Fake kernels for the C++ ops, so torch.compile can trace the cpp backend."""
    ops = torch.ops.pyhappy
    if hasattr(ops, "quant_linear_cpu"):

        @torch.library.register_fake("pyhappy::quant_linear_cpu")
        def _(x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed,
              int8_decode=False, int_dot=False):
            r = 0 if lora_A is None else lora_A.shape[0]
            return x.new_empty(x.shape[0], N), x.new_empty(x.shape[0], r)

        @torch.library.register_fake("pyhappy::quant_linear_backward_cpu")
        def _(grad_out, x, qdata, scales, zeros, fmt, group_size, lora_A, lora_B, lora_C, lora_hidden, scaling,
              dropout_p, seed, need_grad_x):
            gx = x.new_empty(x.shape) if need_grad_x else x.new_empty(0)
            if lora_A is None:
                return gx, x.new_empty(0), x.new_empty(0), x.new_empty(0)
            gC = x.new_empty(lora_C.shape) if lora_C is not None else x.new_empty(0)
            return gx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape), gC

    if hasattr(ops, "quant_decode"):

        @torch.library.register_fake("pyhappy::quant_decode")
        def _(x, qdata, scales, zeros, fmt, N, group_size, bias, lora_v, lora_B, sparse_layout, sparse_values,
              sparse_scale):
            torch._check(x.dim() == 2 and 1 <= x.shape[0] <= DECODE_MAX_M,
                         lambda: f"pyhappy::quant_decode: x must be [M, K] with 1 <= M <= {DECODE_MAX_M}")
            return x.new_empty(x.shape[0], N)

    if hasattr(ops, "quant_dequantize_cpu"):

        @torch.library.register_fake("pyhappy::quant_dequantize_cpu")
        def _(qdata, scales, zeros, fmt, N, K, group_size, dtype):
            return qdata.new_empty(N, K, dtype=dtype)


_BNB_PACKED = ByTensor()  # a compiled graph calls bnb_nf4_pack on every step with the same weight


@torch.library.custom_op("pyhappy::bnb_nf4_pack", mutates_args=())
def bnb_nf4_pack(packed: Tensor, absmax: Tensor, absmax_8bit: Optional[Tensor], absmax_code: Optional[Tensor],
                 absmax_offset: Optional[Tensor], N: int, K: int, blocksize: int,
                 nested_blocksize: int, layout_version: int) -> tuple[Tensor, Tensor]:
    """bitsandbytes NF4 (packed codes, fp32 absmax — or the double-quantized absmax_8bit with its code,
    offset and fp32 ``absmax`` of blocks of ``nested_blocksize``, as bitsandbytes' gemm_4bit takes
    them) -> (qdata, absmax) in pyhappy's kernel layout, for pyhappy::quant_linear with fmt 0.
    ``layout_version`` must be this pyhappy's (layout.LAYOUT_VERSION): it is in the graph, so a
    compiled graph cached on disk for another packed layout is not reused for this one."""
    check_layout_version("bnb_nf4_pack", layout_version)
    _check_nested("bnb_nf4_pack", absmax_8bit, absmax_code, absmax_offset)

    def build():
        qw = _bnb_nf4_weight(packed, absmax, absmax_8bit, absmax_code, absmax_offset, N, K, blocksize,
                             nested_blocksize)
        return qw.data["qdata"], qw.data["absmax"]

    held = [t for t in (packed, absmax, absmax_8bit, absmax_code, absmax_offset) if t is not None]
    return _BNB_PACKED.get(held, (N, K, blocksize, nested_blocksize, len(held)), build)


def check_layout_version(op: str, layout_version) -> None:
    if layout_version != layout.LAYOUT_VERSION:
        raise ValueError(f"pyhappy::{op}: layout_version must be {layout.LAYOUT_VERSION} (the packed layout this "
                         f"pyhappy writes), got {layout_version!r}")


def _check_nested(op, absmax_8bit, absmax_code, absmax_offset):
    if absmax_8bit is not None and (absmax_code is None or absmax_offset is None):
        raise ValueError(f"pyhappy::{op}: double-quantized absmax needs absmax_code and absmax_offset")


def _bnb_nf4_weight(packed, absmax, absmax_8bit, absmax_code, absmax_offset, N, K, blocksize,
                    nested_blocksize) -> QuantizedWeight:
    """The QuantizedWeight of a bitsandbytes NF4 weight given as bnb_nf4_pack takes it."""
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float32", "shape": (N, K)}
    if absmax_8bit is not None:
        state.update(absmax=absmax_8bit, nested_absmax=absmax, nested_quant_map=absmax_code,
                     nested_blocksize=nested_blocksize, nested_offset=float(absmax_offset))
    else:
        state["absmax"] = absmax
    return from_bnb(packed, state)


def quantized_row_sqnorm(qweight: QuantizedWeight, chunk_bytes: int = 1 << 24) -> torch.Tensor:
    """‖W_n‖² [N] (float64) of the dequantized weight, reduced in float32 as dora_weight_sqnorm does,
    dequantizing a block of row tiles at a time (at most ``chunk_bytes`` of float32): no [N, K]
    copy of W. Column order does not change a row norm, so act-order weights need no un-permuting."""
    N, K = qweight.shape
    d = qweight.data
    scales = d["absmax"] if qweight.format == "nf4" else d["scales"]
    zeros = d.get("zeros")
    tiles = layout.n_tiles(N)
    step = max(2, chunk_bytes // (4 * K * layout.TILE_N) // 2 * 2)  # whole tile pairs (qdata's rows)
    out = []
    with torch.no_grad():
        for t0 in range(0, tiles, step):
            t1 = min(tiles, t0 + step)
            n = min(N, t1 * layout.TILE_N) - t0 * layout.TILE_N
            w = layout.dequantize_packed(d["qdata"][t0 // 2:t1 // 2], scales[t0:t1],
                                         None if zeros is None else zeros[t0:t1],
                                         qweight.format, n, K, qweight.group_size)
            out.append(torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).double().square())
    return torch.cat(out)


_BNB_SQNORM = ByTensor()  # the weight is frozen: its row norms are computed once, not every step


@torch.library.custom_op("pyhappy::bnb_nf4_row_sqnorm", mutates_args=())
def bnb_nf4_row_sqnorm(packed: Tensor, absmax: Tensor, absmax_8bit: Optional[Tensor],
                       absmax_code: Optional[Tensor], absmax_offset: Optional[Tensor], N: int, K: int,
                       blocksize: int, nested_blocksize: int) -> Tensor:
    """‖W_n‖² [N] (float64) of a bitsandbytes NF4 weight (arguments as bnb_nf4_pack), reduced from the
    packed weight a block of rows at a time (quantized_row_sqnorm, QDoRA's):
    the norm pyhappy.compiler's QDoRA rewrite needs. Kept per weight like bnb_nf4_pack's result."""
    _check_nested("bnb_nf4_row_sqnorm", absmax_8bit, absmax_code, absmax_offset)

    def build():
        return (quantized_row_sqnorm(_bnb_nf4_weight(packed, absmax, absmax_8bit, absmax_code, absmax_offset, N, K,
                                                     blocksize, nested_blocksize)),)

    held = [t for t in (packed, absmax, absmax_8bit, absmax_code, absmax_offset) if t is not None]
    return _BNB_SQNORM.get(held, (N, K, blocksize, nested_blocksize, len(held)), build)[0]


@bnb_nf4_row_sqnorm.register_fake
def _(packed, absmax, absmax_8bit, absmax_code, absmax_offset, N, K, blocksize, nested_blocksize):
    return packed.new_empty(N, dtype=torch.float64)


@bnb_nf4_pack.register_fake
def _(packed, absmax, absmax_8bit, absmax_code, absmax_offset, N, K, blocksize, nested_blocksize, layout_version):
    check_layout_version("bnb_nf4_pack", layout_version)
    n8 = layout.n_tiles(N)
    return (packed.new_empty(n8 // 2, K // layout.BLOCK_K, 2 * layout.BYTES_PER_BLOCK[4], dtype=torch.uint8),
            packed.new_empty(n8, K // blocksize, layout.TILE_N, dtype=torch.float32))
