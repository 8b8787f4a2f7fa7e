"""Argument checks shared by every op family. Each error names the argument at fault.

They run inside the registered ops (eagerly, and on fake tensors at trace time), so a bad call
is rejected the same way through the functional API, the modules and torch.ops.pyhappy.*.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import backends

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, shape=None, like: torch.Tensor | None = None):
    """``t`` is a tensor of ``ndim`` dims / ``shape``, with the dtype and device of ``like``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pyhappy::{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"pyhappy::{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"pyhappy::{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(
                f"pyhappy::{op}: {name} has dtype {t.dtype} but x has {like.dtype}; cast them to one dtype "
                "(or run under torch.autocast)"
            )
        if t.device != like.device:
            raise ValueError(f"pyhappy::{op}: {name} is on {t.device} but x is on {like.device}")


def check_float_input(op: str, name: str, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pyhappy::{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"pyhappy::{op}: {name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"pyhappy::{op}: {name} must have at least 1 dimension [..., K], got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"pyhappy::{op}: {name} must have K >= 1 features (its last dimension), got shape "
                         f"{tuple(x.shape)}")


def finite_number(who: str, name: str, value) -> float:
    """``value`` as a float if it is a finite real number (a Python int/float, a numpy scalar or a
    one-element tensor outside torch.compile); otherwise a TypeError (None, str, bool, ...) or a
    ValueError (NaN, inf) naming ``name``. ``who`` is the error's prefix (e.g. "pyhappy::lora_linear",
    "LoRALinear"). A check on a Python number, so compiled graphs keep it as a trace-time check
    (a symbolic float under torch.compile is passed through unchecked)."""
    if type(value) is float and math.isfinite(value):
        return value  # the common case first: an op's entry checks its scale on every call
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not torch.compiler.is_compiling():
        if value.is_meta:
            raise ValueError(f"{who}: {name} is a meta tensor (no value)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a finite real number, got {type(value).__name__} {value!r}")
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"{who}: {name} must be finite, got {f!r}")
    return f


def check_not_meta(op: str, name: str, t, *, who: str | None = None) -> None:
    """Data-dependent checks (a pattern's order and range) need values: refuse a meta tensor by name."""
    if isinstance(t, torch.Tensor) and t.is_meta:
        raise ValueError(f"{who or 'pyhappy::' + op}: {name} is a meta tensor; its values must be known to check and lay out "
                         "the pattern (build the pattern on a real device, then move it)")


def check_dropout(op: str, dropout_p: float, seed):
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"pyhappy::{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError(f"pyhappy::{op}: dropout_p > 0 needs seed (an int64 tensor of one element)")
        if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"pyhappy::{op}: seed must be an int64 tensor with one element")


# Whether autocast is on for any device type: one call that spares the entry points the device
# lookups of the exact check on every call where it is off (torch.compile folds it to a constant).
any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def autocast_dtype(device: torch.device):
    """The dtype of the autocast region in force for ``device``'s type, None when autocast is off
    there (only CPU and CUDA autocast are mirrored)."""
    if not any_autocast():
        return None
    dev = device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def autocast_args(x, *params):
    """Mirror torch.autocast for a custom op (they are not cast automatically): under an enabled
    autocast region every floating input is cast to the region's dtype, as F.linear's are."""
    dt = autocast_dtype(x.device) if any_autocast() else None
    if dt is not None:
        return [None if p is None else p.to(dt) for p in (x, *params)]
    return [x, *params]


def rows(t: torch.Tensor):
    """The number of rows of ``t`` seen as a [rows, t.shape[-1]] matrix: the product of its leading
    dims. ``reshape(-1, n)`` cannot say it when a dim is 0 (out_features = 0 makes it ambiguous)."""
    return math.prod(t.shape[:-1])


_CPP_DTYPES = (torch.float32, torch.bfloat16)


def select_backend(op: str, x: torch.Tensor, cpp_op: str, dtypes: tuple = _CPP_DTYPES) -> str:
    """backends.select for ``op``, except that the C++ backend falls back to the reference where it
    cannot serve the input (an extension built before ``cpp_op`` existed, a dtype not in ``dtypes``,
    float32/bfloat16 by default); a forced 'cpp' that cannot serve raises, naming why."""
    b = backends.select(op, x.device, x.dtype)
    if b != "cpp":
        return b
    if not hasattr(torch.ops.pyhappy, cpp_op):
        why = f"the loaded pyhappy._C predates {op} (rebuild: pip install --no-build-isolation -e .)"
    elif x.dtype not in dtypes:
        why = f"it serves {'/'.join(str(d).replace('torch.', '') for d in dtypes)} only, got {x.dtype}"
    else:
        return b
    if backends.requested(op) == "cpp":
        raise RuntimeError(f"pyhappy::{op}: backend 'cpp' was forced but cannot serve this input: {why}")
    return "reference"


def check_in_features(op: str, x: torch.Tensor, K: int, what: str) -> None:
    """x's last dimension against the K that ``what`` (an argument, e.g. "weight is [N, K] = (48, 64)")
    fixes: a mismatch is the input's fault, so the error names x first."""
    if x.shape[-1] != K:
        raise ValueError(f"pyhappy::{op}: x has {x.shape[-1]} features (its last dimension) but {what}: x must "
                         f"be [..., {K}]")


def check_grad_out(op: str, grad_out, x: torch.Tensor, N: int | None) -> None:
    """A backward op's grad_out: a tensor of x's leading shape and N outputs (N None: any), x's dtype."""
    if not isinstance(grad_out, torch.Tensor):
        raise TypeError(f"pyhappy::{op}: grad_out must be a tensor, got {type(grad_out).__name__}")
    if grad_out.shape[:-1] != x.shape[:-1] or grad_out.dim() != x.dim() or (N is not None and grad_out.shape[-1] != N):
        raise ValueError(f"pyhappy::{op}: grad_out must be [{', '.join(map(str, x.shape[:-1]))}, "
                         f"{'N' if N is None else N}] (x's leading shape, the op's outputs), got {tuple(grad_out.shape)}")
    if grad_out.dtype != x.dtype:
        raise ValueError(f"pyhappy::{op}: grad_out has dtype {grad_out.dtype} but x has {x.dtype}")


def unview(t: torch.Tensor, shape) -> torch.Tensor:
    """t reshaped to ``shape`` as a fresh (non-view) tensor without a copy when t is contiguous, as
    aten's own linear does (_unsafe_view): an op's output must not look like a view to autograd or
    to FSDP2's hooks (an in-place op on a view output would skip them). Under torch.compile the
    reshape is always traced (Dynamo cannot trace ``_is_view``; Inductor removes the no-op)."""
    shape = tuple(shape)
    if not torch.compiler.is_compiling() and t.shape == shape and not t._is_view() and t.is_contiguous():
        return t  # already a fresh tensor of that shape (a kernel's own output): nothing to do
    return torch.ops.aten._unsafe_view(t.contiguous(), shape)
