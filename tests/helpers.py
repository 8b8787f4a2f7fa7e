"""Shared test helpers: principled tolerances and device/backend parametrisation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pyhappy import _ext, backends

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CPP = _ext.available()


def has_cpp_op(name: str) -> bool:
    """The extension is loaded and registers torch.ops.pyhappy.<name> (a stale build may not)."""
    return HAS_CPP and hasattr(torch.ops.pyhappy, name)


def cpu_backends(cpp_op: str | None = None):
    """(backend, marks) for every backend that can run on CPU tensors here; ``cpp_op``: the C++ op
    the family needs (skipped, with the reason, when the loaded extension lacks it)."""
    cpp_ok = HAS_CPP if cpp_op is None else has_cpp_op(cpp_op)
    why = str(_ext.problem()) if not HAS_CPP else f"pyhappy._C without {cpp_op}"
    return [
        pytest.param("reference", id="reference"),
        pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not cpp_ok, reason=why)),
        pytest.param("triton", id="triton", marks=pytest.mark.skipif(
            not (HAS_TRITON and backends.triton_interpreting()), reason="triton interpreter unavailable")),
    ]


def assert_close_to_oracle(got, oracle_fn, inputs, *, name="output", slack=2.0, k_eps=8.0):
    """Tolerance from principle, elementwise:

        |got - truth| <= slack * err_torch + k_eps * eps(dtype) * (|f|)(|inputs|)

    truth = oracle_fn on float64 inputs; err_torch = max error of plain PyTorch doing the same math
    in got's dtype; (|f|)(|inputs|) = the oracle on the absolute values of the inputs, i.e. the sum
    of the magnitudes of the terms each output adds up (the classic rounding-error bound of a dot
    product, Higham's |A||B|): it covers results that cancel, where torch's own error can be lucky.
    Every oracle here is multilinear in its inputs, so that bound is valid."""
    if got is None:
        raise AssertionError(f"{name}: got None")

    def f64(ts, fn=lambda t: t):
        return [None if t is None else fn(t.double()) if t.is_floating_point() else t for t in ts]

    truth = oracle_fn(*f64(inputs)).double()
    same = oracle_fn(*inputs).double()
    magnitude = oracle_fn(*f64(inputs, torch.abs)).double().abs()
    err = (got.double() - truth).abs()
    base_err = (same - truth).abs().max().item() if same.numel() else 0.0
    tol = slack * base_err + k_eps * torch.finfo(got.dtype).eps * magnitude
    bad = err > tol
    if bad.any():
        i = bad.flatten().nonzero()[0].item()
        raise AssertionError(
            f"{name}: error {err.flatten()[i].item():.3e} > tolerance {tol.flatten()[i].item():.3e} at flat index {i} "
            f"(torch same-dtype max error {base_err:.3e}; term magnitude {magnitude.flatten()[i].item():.3e})")
