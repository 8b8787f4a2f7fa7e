"""pyhappy::sparse_delta_linear — linear layer plus a sparse trainable delta on a fixed pattern.

    y = x · (W + s·ΔW)ᵀ + bias,    ΔW[n, k] = values[i] where indices[i] = n·K + k

Sparse fine-tuning trains ``values`` [nnz] only. The op never forms the dense ΔW (forward) nor the
dense weight gradient (backward): dx = dy·W + s·dy·ΔW through a CSC layout, and
d(values) = s · Σ_m dy[m, n_i] · x[m, k_i], a sampled product (SDDMM) at the pattern only,
accumulated in fp32.

Pattern: ``indices`` int32 [nnz], sorted, unique, each < N·K (so N·K < 2³¹). ``sparse_layout``
builds the kernel layout from it once (CSR by row plus CSC by column, one int32 tensor); the
modules keep it as a buffer. A layout stays tied to the indices it was built from: the functional
API refuses a layout of another pattern (``check_layout``: a lookup of the indices' identity and
version counter recorded when the layout was built; a layout it has not seen, e.g. one moved with
``.to()``, is compared with a fresh build once and then recorded). ``weight`` may be None: the op then computes only the delta part
(used for a quantized base, run by quant_linear, and for extra deltas on one layer).

On CPU each pass picks its schedule by measurement (pyhappy.tune: the kernels or the unfused
products); a training call of a small layer (passes under ``_tune.WHOLE_CALL_US``) is also timed as
a whole step against the unfused formulation users write (W + s·ΔW by index_add, then F.linear),
which serves it where it wins, a repeat of the last such call on a weight without the entry point's
checks (``_tune.LastCalls``).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .. import backends, reference
from ..quant import QuantizedWeight
from ._cache import ByTensor
from .._tune import (LastCalls, arg_signature, bucket, call_signature, remember_unfused, run_pick, unfused_call,
                     unfused_hit)
from ._eager import eager_function
from ._checks import (any_autocast, autocast_args, check_float_input, check_in_features, check_not_meta, check_tensor,
                      finite_number, rows, select_backend, unview)
from .quant_linear import quant_linear, quant_sparse_decode

OP = "sparse_delta_linear"
_INT32_MAX = 2**31 - 1


def check_pattern(indices, N: int, K: int, *, name: str = "indices", op: str = OP, who: str | None = None) -> None:
    """Raise a clear error unless ``indices`` is a valid pattern for an [N, K] weight. Errors start
    with ``who`` (default "pyhappy::<op>")."""
    who = who or f"pyhappy::{op}"
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int32 or indices.dim() != 1:
        got = f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"{who}: {name} must be a 1-D int32 tensor of flat indices row·K + col, got {got}")
    if N * K > _INT32_MAX:
        raise ValueError(f"{who}: an [N, K] = [{N}, {K}] weight has more than 2^31 - 1 entries; int32 flat "
                         f"{name} cannot address it")
    if indices.numel() == 0:
        return
    check_not_meta(op, name, indices, who=who)
    lo, hi = indices.min().item(), indices.max().item()
    if lo < 0 or hi >= N * K:
        raise ValueError(f"{who}: {name} out of range: values must lie in [0, N·K) = [0, {N * K}), got "
                         f"[{lo}, {hi}]")
    if indices.numel() > 1:
        step = indices[1:] - indices[:-1]
        if bool((step == 0).any()):
            i = int((step == 0).nonzero()[0].item())
            raise ValueError(f"{who}: {name} has a duplicate entry {indices[i].item()} at position {i + 1}")
        if bool((step < 0).any()):
            i = int((step < 0).nonzero()[0].item())
            raise ValueError(f"{who}: {name} must be sorted ascending; position {i + 1} "
                             f"({indices[i + 1].item()}) is below position {i} ({indices[i].item()})")


def sparse_layout(indices: Tensor, N: int, K: int) -> Tensor:
    """The kernels' layout of a pattern: one int32 tensor
    ``[row_ptr (N+1) | cols (nnz) | t_ptr (K+1) | t_rows (nnz) | t_perm (nnz)]`` (CSR by output row,
    CSC by input column, t_perm mapping CSC order to positions in ``values``). Built once per pattern."""
    check_pattern(indices, N, K)
    layout = _build_layout(indices, N, K)
    _record_layout(layout, indices, N, K)
    return layout


# layout -> (weak reference to the indices it was built from, their version counter, N, K, the
# layout's own version counter): what check_layout compares in O(1) on every eager call.
_LAYOUT_SOURCE = WeakIdKeyDictionary()


def _record_layout(layout: Tensor, indices: Tensor, N: int, K: int) -> None:
    _LAYOUT_SOURCE[layout] = (weakref.ref(indices), indices._version, N, K, layout._version)


def check_layout(indices: Tensor, layout: Tensor, N: int, K: int, *, op: str = OP) -> None:
    """Raise unless ``layout`` is ``sparse_layout(indices, N, K)``. O(1) when the layout was built
    from these very indices and neither was written since; otherwise the layout is compared with
    a fresh build (once: a match is recorded for the next call)."""
    rec = _LAYOUT_SOURCE.get(layout)
    if rec is not None:
        ref, ver, n, k, lver = rec
        if ref() is indices and ver == indices._version and (n, k) == (N, K) and lver == layout._version:
            return
    check_not_meta(op, "layout", layout)
    check_pattern(indices, N, K, op=op)
    if not torch.equal(layout, _build_layout(indices, N, K)):
        raise ValueError(f"pyhappy::{op}: layout was not built from these indices (another pattern, or indices "
                         "changed since); build it with sparse_layout(indices, N, K)")
    _record_layout(layout, indices, N, K)


def _build_layout(indices: Tensor, N: int, K: int) -> Tensor:
    """sparse_layout without the checks; duplicates are kept (the kernels sum them, as index_add does)."""
    idx = indices.long()
    rows, cols = idx // K, idx % K
    dev = indices.device
    row_ptr = torch.zeros(N + 1, dtype=torch.long, device=dev)
    row_ptr[1:] = torch.bincount(rows, minlength=N).cumsum(0)
    t_perm = torch.argsort(cols * N + rows)
    t_ptr = torch.zeros(K + 1, dtype=torch.long, device=dev)
    t_ptr[1:] = torch.bincount(cols, minlength=K).cumsum(0)
    return torch.cat([row_ptr, cols, t_ptr, rows[t_perm], t_perm]).to(torch.int32)


def layout_size(N: int, K: int, nnz: int) -> int:
    return N + K + 2 + 3 * nnz


_PATTERNS = ByTensor()  # a compiled graph calls sparse_pattern on every step with the same buffer


@torch.library.custom_op("pyhappy::sparse_pattern", mutates_args=())
def sparse_pattern(index: Tensor, N: int, K: int) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices n·K + k in any order, duplicates allowed (int32 or int64 [nnz]) -> (indices int32
    sorted [nnz], perm int64 [nnz] with indices = index[perm], layout for sparse_delta_linear). What
    pyhappy.compiler inserts for ``W.reshape(-1).index_add(0, index, values)`` and its spellings: the
    op then takes ``values[perm]``. Duplicates stay (the kernels sum them, as index_add does)."""
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"pyhappy::sparse_pattern: index must be a 1-D int32/int64 tensor, got {index.dtype} "
                        f"{tuple(index.shape)}")

    def build():
        flat = index.long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= N * K):
            raise IndexError(f"pyhappy::sparse_pattern: index out of range for an [{N}, {K}] weight: values must "
                             f"lie in [0, {N * K}), got [{int(flat.min())}, {int(flat.max())}]")
        srt, perm = torch.sort(flat, stable=True)
        ind = srt.to(torch.int32)
        return ind, perm, _build_layout(ind, N, K)

    return _PATTERNS.get((index,), (N, K), build)


@sparse_pattern.register_fake
def _(index, N, K):
    nnz = index.shape[0]
    return (index.new_empty(nnz, dtype=torch.int32), index.new_empty(nnz, dtype=torch.int64),
            index.new_empty(layout_size(N, K, nnz), dtype=torch.int32))


def _validate(x, weight, bias, values, indices, layout, N, scale):
    check_float_input(OP, "x", x)
    finite_number(f"pyhappy::{OP}", "scale", scale)
    K = x.shape[-1]
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"pyhappy::{OP}: N must be a positive int, got {N!r}")
    if N * K > _INT32_MAX:
        raise ValueError(f"pyhappy::{OP}: an [N, K] = [{N}, {K}] weight has more than 2^31 - 1 entries (int32 indices)")
    if weight is not None:
        check_tensor(OP, "weight", weight, ndim=2, like=x)
        check_in_features(OP, x, weight.shape[1], f"weight is [N, K] = {tuple(weight.shape)}")
        check_tensor(OP, "weight", weight, shape=(N, K), like=x)
    elif isinstance(layout, torch.Tensor) and isinstance(values, torch.Tensor) and layout.dim() == 1:
        k_layout = layout.shape[0] - N - 2 - 3 * values.shape[-1]  # the K the layout was built for
        if k_layout >= 1:
            check_in_features(OP, x, k_layout, f"layout was built for K = {k_layout}")
    if bias is not None:
        check_tensor(OP, "bias", bias, shape=(N,), like=x)
    check_tensor(OP, "values", values, ndim=1, like=x)
    nnz = values.shape[0]
    for name, t, want in (("indices", indices, (nnz,)), ("layout", layout, (layout_size(N, K, nnz),))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != want:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            hint = " (one per entry of values)" if name == "indices" else " (build it with sparse_layout(indices, N, K))"
            raise ValueError(f"pyhappy::{OP}: {name} must be int32 {want}{hint}, got {got}")
        if t.device != x.device:
            raise ValueError(f"pyhappy::{OP}: {name} is on {t.device} but x is on {x.device}")


def _backend(x: Tensor) -> str:
    return select_backend(OP, x, "sparse_delta_linear_cpu")


@torch.library.triton_op("pyhappy::sparse_delta_linear", mutates_args=())
def _sparse_delta_linear(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    values: Tensor,
    indices: Tensor,
    layout: Tensor,
    N: int,
    scale: float,
) -> Tensor:
    _validate(x, weight, bias, values, indices, layout, N, scale)
    return _forward(_backend(x), x, weight, bias, values, indices, layout, N, scale)


def _merged(weight, values, indices, scale):
    """W + s·ΔW as a dense copy [N, K] in W's dtype (for bf16 / fp16 the delta added in float32 and
    rounded once) by an out-of-place index_add: differentiable in the values, so it is both the torch
    candidates' scratch copy and the merge of the unfused training formulation (``_unfused``). At
    s = 1 alpha is left out (index_add then skips scaling the values, forward and backward); the
    result is viewed by ints (a torch.Size argument costs more per training step: benchmarks/README.md,
    "Whole training steps of small layers")."""
    N, K = weight.shape
    if weight.dtype is torch.float32 or weight.dtype is torch.float64:
        flat, src = weight.reshape(-1), values
    else:
        flat, src = weight.reshape(-1).float(), values.float()
    w = flat.index_add(0, indices, src) if scale == 1.0 else flat.index_add(0, indices, src, alpha=scale)
    return (w if w.dtype == weight.dtype else w.to(weight.dtype)).view(N, K)


def _torch_forward(x2, weight, bias, values, indices, N, scale):
    """The unfused PyTorch formulation (a candidate of the measured CPU dispatch, pyhappy.tune): the
    delta merged into a scratch copy of W, then one F.linear."""
    return torch.nn.functional.linear(x2, _merged(weight, values, indices, scale), bias)


def _torch_backward(dy, x2, weight, values, indices, scale, need_grad_x, need_grad_values):
    """What autograd runs for the unfused formulation: dx = dy·(W + s·ΔW) on the merged copy, and the
    values' gradient gathered from the dense s·dyᵀ·x."""
    gx = dy @ _merged(weight, values, indices, scale) if need_grad_x else None
    gv = None
    if need_grad_values:
        acc = torch.float32 if x2.dtype in (torch.bfloat16, torch.float16) else x2.dtype
        gv = (torch.mm(dy.t().to(acc), x2.to(acc)).view(-1)[indices.long()] * scale).to(values.dtype)
    return gx, gv


def _tune_key(pass_, x2, N, values, bias):
    return (pass_, str(x2.dtype).replace("torch.", ""), f"M{bucket(x2.shape[0])}", f"K{x2.shape[1]}", f"N{N}",
            f"nnz{bucket(values.shape[0])}", "bias" if bias is not None else "")


def _cpp_forward(x2, weight, bias, values, indices, layout, N, scale):
    if weight is None:
        return torch.ops.pyhappy.sparse_delta_linear_cpu(x2.contiguous(), weight, bias, values, layout, N, scale)
    cands = {"cpp": lambda: torch.ops.pyhappy.sparse_delta_linear_cpu(x2.contiguous(), weight, bias, values, layout,
                                                                      N, scale),
             "torch": lambda: _torch_forward(x2, weight, bias, values, indices, N, scale)}
    return run_pick(OP, lambda: _tune_key("fwd", x2, N, values, bias), cands, "cpp", x2, cold=(weight,))


def _triton_forward(x2, weight, bias, values, indices, layout, N, scale):
    return backends.triton_module(OP).sparse_delta_linear_forward(x2, weight, bias, values, layout, N, scale,
                                                                  wrap=torch.library.wrap_triton)


def _reference_forward(x2, weight, bias, values, indices, layout, N, scale):
    return reference.sparse_delta_linear(x2, weight, bias, values, indices, N, scale)


# y [M, N] for x2 [M, K], by backend (see pyhappy/backends.py).
FORWARD = {"cpp": _cpp_forward, "triton": _triton_forward, "reference": _reference_forward}


def _forward(backend, x, weight, bias, values, indices, layout, N, scale):
    lead, K = x.shape[:-1], x.shape[-1]
    y = FORWARD[backend](x.reshape(-1, K), weight, bias, values, indices, layout, N, scale)
    return unview(y, (*lead, N))


def _cpp_backward(dy, x2, weight, values, indices, layout, scale, need_grad_x, need_grad_values):
    cands = {"cpp": lambda: torch.ops.pyhappy.sparse_delta_linear_backward_cpu(
        dy.contiguous(), x2.contiguous(), weight, values, layout, scale, need_grad_x, need_grad_values)}
    if weight is not None:
        cands["torch"] = lambda: _torch_backward(dy, x2, weight, values, indices, scale, need_grad_x,
                                                 need_grad_values)
    pass_ = "bwd" + ("_dx" if need_grad_x else "") + ("_dv" if need_grad_values else "")
    return run_pick(OP, lambda: _tune_key(pass_, x2, dy.shape[1], values, None), cands, "cpp", x2,
                    cold=(weight,))


def _triton_backward(dy, x2, weight, values, indices, layout, scale, need_grad_x, need_grad_values):
    return backends.triton_module(OP).sparse_delta_linear_backward(dy, x2, weight, values, indices, layout, scale,
                                                                   need_grad_x, need_grad_values,
                                                                   wrap=torch.library.wrap_triton)


def _reference_backward(dy, x2, weight, values, indices, layout, scale, need_grad_x, need_grad_values):
    return reference.sparse_delta_linear_backward(dy, x2, weight, values, indices, scale, need_grad_x,
                                                  need_grad_values)


# (grad_x [M, K] or None, grad_values or None) for dy [M, N], x2 [M, K], by backend.
BACKWARD = {"cpp": _cpp_backward, "triton": _triton_backward, "reference": _reference_backward}


@torch.library.triton_op("pyhappy::sparse_delta_linear_backward", mutates_args=())
def _sparse_delta_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    values: Tensor,
    indices: Tensor,
    layout: Tensor,
    scale: float,
    need_grad_x: bool,
    need_grad_values: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_values); each an empty [0] tensor when not needed (schemas cannot return None)."""
    K, N = x.shape[-1], grad_out.shape[-1]
    gx, gv = BACKWARD[_backend(x)](grad_out.reshape(rows(x), N), x.reshape(rows(x), K), weight, values, indices, layout, scale,
                                   need_grad_x, need_grad_values)
    return (gx.reshape(x.shape) if need_grad_x else x.new_empty(0)), (gv if need_grad_values else values.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, values, indices, layout, N, scale = inputs
    ctx.save_for_backward(x, weight, values, indices, layout)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, values, indices, layout = ctx.saved_tensors
    need = ctx.needs_input_grad
    bwd = getattr(ctx, "backward_op", torch.ops.pyhappy.sparse_delta_linear_backward)
    gx, gv = bwd(grad_y, x, weight, values, indices, layout, ctx.scale, need[0], need[3])
    N = grad_y.shape[-1]
    dy = grad_y.reshape(rows(x), N)
    # The base weight is frozen in sparse fine-tuning; made trainable, its gradient is still exact.
    g_weight = dy.t() @ x.reshape(rows(x), x.shape[-1]) if (weight is not None and need[1]) else None
    g_bias = dy.sum(0) if (ctx.has_bias and need[2]) else None
    return (gx if need[0] else None, g_weight, g_bias, gv if need[3] else None, None, None, None, None)


_sparse_delta_linear.register_autograd(_backward, setup_context=_setup_context)
_Eager = eager_function("SparseDeltaLinear", _sparse_delta_linear, _setup_context, _backward,
                        _sparse_delta_linear_backward)


# The last training call served unfused on each weight (pyhappy._tune.LastCalls): a call repeating
# it (one delta on a dense weight, no autocast, not traced) skips the entry point's checks and the
# signature.
_LAST = LastCalls(OP)


def _one(x, weight, bias, values, indices, layout, N, scale, repeat=False):
    args = (x, weight, bias, values, indices, layout, N, float(scale))
    if torch.compiler.is_compiling():
        return _Eager(*args)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, values))):
        # Eager inference: no autograd record needed; skip the custom-op dispatcher (as lora_linear).
        # (Its forward's candidates include the unfused formulation: the whole call.)
        _validate(*args)
        return _forward(_backend(x), *args)
    if x.is_cpu and weight is not None and not weight.requires_grad and _unfused_step(*args):
        if repeat:
            _LAST.put("unfused", x, weight, (bias, values, indices, layout), (args[7],))
        return _unfused(*args)
    return _Eager(*args)  # the registered op's forward and gradient, without its dispatcher layers


def _unfused(x, weight, bias, values, indices, layout, N, scale):
    """The unfused formulation of a training call, as users write it: W + s·ΔW formed as a dense copy
    (``_merged``: an index_add, differentiable in the values), then F.linear; autograd keeps the copy
    for the backward, forms the dense dW and gathers the values' gradient from it. The same
    expression as the forward's torch candidate, here recorded by autograd."""
    return _torch_forward(x, weight, bias, values, indices, N, scale)


def _unfused_step(x, weight, bias, values, indices, layout, N, scale) -> bool:
    """Whether the unfused formulation serves this training call (frozen dense weight, CPU): the
    op's step (forward and backward, its Python and autograd layers included) against the unfused
    one's, measured once both passes are decided and fast (``pyhappy._tune.unfused_call``, which
    waits for the passes and keeps the op above ``WHOLE_CALL_US``). The arguments are checked
    (``_validate``, as the op's forward checks them) before the unfused formulation runs."""
    ts = (x, bias, values)
    flags = tuple(t is not None and t.requires_grad for t in ts)
    sig = arg_signature(x, weight, bias, values, indices, layout)
    sig = None if sig is None else (sig, N, scale)
    if unfused_hit(OP, sig):
        return True
    need = tuple(t for t, f in zip(ts, flags) if f)
    x2 = x.reshape(-1, x.shape[-1])
    nnz = values.shape[0]
    memo, key = call_signature(x, N, None, bias, flags, memo=(nnz,), tags=(f"nnz{bucket(nnz)}",))
    bwd = "bwd" + ("_dx" if flags[0] else "") + ("_dv" if flags[2] else "")
    passes = (_tune_key("fwd", x2, N, values, bias), _tune_key(bwd, x2, N, values, None))
    args = (x, weight, bias, values, indices, layout, N, scale)
    if unfused_call(OP, memo, key, lambda: _Eager(*args), lambda: _validate(*args) or _unfused(*args), x, need,
                    cold=(weight,), passes=passes):
        _validate(*args)
        remember_unfused(OP, sig)
        return True
    return False


def sparse_delta_linear(
    x: Tensor,
    weight,
    bias: Optional[Tensor],
    values,
    indices,
    layout=None,
    scale=1.0,
    *,
    N: Optional[int] = None,
) -> Tensor:
    """``x · (W + Σᵢ sᵢ·ΔWᵢ)ᵀ + bias`` with each ΔWᵢ given by (values, indices) on a fixed pattern.

    Args:
        x: [..., K].
        weight: [N, K] dense base weight, a :class:`pyhappy.quant.QuantizedWeight` (its packed
            kernels run the base product), or None (delta only; then pass N).
        bias: [N] or None.
        values: [nnz] trainable delta values in x's dtype, or a sequence of them (several deltas).
        indices: int32 [nnz] sorted flat indices n·K + k (or a sequence, one per delta).
        layout: ``sparse_layout(indices, N, K)`` (or a sequence); built here when None, which costs
            a sort per call: modules keep it as a buffer. A layout of other indices is refused.
        scale: the delta's weight sᵢ (or a sequence), finite real numbers.
    Returns:
        y [..., N] in x's dtype (or the autocast dtype).
    """
    many = isinstance(values, (list, tuple))
    repeat = (not many and type(weight) in (torch.Tensor, torch.nn.Parameter) and type(scale) in (float, int)
              and isinstance(x, torch.Tensor) and not torch.compiler.is_compiling() and not any_autocast())
    if repeat and _LAST.get(x, weight, (bias, values, indices, layout), (scale,)) == "unfused":
        return _unfused(x, weight, bias, values, indices, layout, weight.shape[0], float(scale))
    vs = list(values) if many else [values]
    ids = list(indices) if many else [indices]
    lays = list(layout) if isinstance(layout, (list, tuple)) else [layout] * len(vs)
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(vs)
    if not (len(vs) == len(ids) == len(lays) == len(scales)) or not vs:
        raise ValueError(f"pyhappy::{OP}: values, indices, layout and scale must describe the same number (>= 1) "
                         f"of deltas, got {len(vs)}, {len(ids)}, {len(lays)}, {len(scales)}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pyhappy::{OP}: x must be a torch.Tensor, got {type(x).__name__}")
    K = x.shape[-1] if x.dim() else 0
    if isinstance(weight, QuantizedWeight):
        N = weight.shape[0]
    elif isinstance(weight, torch.Tensor):
        N = weight.shape[0] if weight.dim() == 2 else N
    elif weight is None:
        if N is None:
            raise ValueError(f"pyhappy::{OP}: weight is None: pass N (the output size)")
    else:
        raise TypeError(f"pyhappy::{OP}: weight must be a Tensor, a QuantizedWeight or None, got "
                        f"{type(weight).__name__}")
    scales = [finite_number(f"pyhappy::{OP}", "scale", sc) for sc in scales]
    if x.dim() and x.shape[-1] == 0:
        check_float_input(OP, "x", x)
    if x.dim() and isinstance(weight, (torch.Tensor, QuantizedWeight)) and len(weight.shape) == 2:
        check_in_features(OP, x, weight.shape[1], f"weight is [N, K] = {tuple(weight.shape)}")
    if not torch.compiler.is_compiling() and isinstance(N, int) and N >= 1 and K >= 1:
        for i, lay in zip(ids, lays):
            if lay is not None and isinstance(i, torch.Tensor) and isinstance(lay, torch.Tensor):
                check_layout(i, lay, N, K)
    lays = [sparse_layout(i, N, K) if lay is None else lay for i, lay in zip(ids, lays)]
    x, bias, *vs = autocast_args(x, bias, *vs)
    if isinstance(weight, QuantizedWeight):
        if len(vs) == 1 and x.dim() >= 1 and x.shape[-1] == weight.shape[1]:
            # Inference on CUDA at decode sizes: base, bias and delta in one kernel (None elsewhere).
            y = quant_sparse_decode(x, weight, bias, vs[0], lays[0], float(scales[0]))
            if y is not None:
                return y
        y, base, bias = quant_linear(x, weight, bias), None, None
    else:
        base, y = (autocast_args(x, weight)[1] if weight is not None else None), None
    for v, i, lay, s in zip(vs, ids, lays, scales):
        if y is None:
            y = _one(x, base, bias, v, i, lay, N, s, repeat and lay is layout)
        else:
            y = y + _one(x, None, None, v, i, lay, N, s)
    return y


def _register_cpp_fakes():
    ops = torch.ops.pyhappy
    if hasattr(ops, "sparse_delta_linear_cpu"):
        @torch.library.register_fake("pyhappy::sparse_delta_linear_cpu")
        def _(x, weight, bias, values, layout, N, scale):
            return x.new_empty(x.shape[0], N)

        @torch.library.register_fake("pyhappy::sparse_delta_linear_backward_cpu")
        def _(grad_out, x, weight, values, layout, scale, need_grad_x, need_grad_values):
            return (x.new_empty(x.shape) if need_grad_x else x.new_empty(0),
                    values.new_empty(values.shape) if need_grad_values else values.new_empty(0))
