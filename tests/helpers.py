"""Shared test helpers: principled tolerances and device/backend parametrisation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pyhappy import _ext, backends

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CPP = _ext.available()


def cpu_backends():
    """(backend, marks) for every backend that can run on CPU tensors here."""
    return [
        pytest.param("reference", id="reference"),
        pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not HAS_CPP, reason=str(_ext.problem()))),
        pytest.param("triton", id="triton", marks=pytest.mark.skipif(
            not (HAS_TRITON and backends.triton_interpreting()), reason="triton interpreter unavailable")),
    ]


def assert_close_to_oracle(got, oracle_fn, inputs, *, name="output", slack=2.0):
    """Tolerance from principle: the kernel's error against a float64 oracle may be at most
    ``slack`` times the error plain PyTorch makes doing the same math in the same dtype
    (plus a few ulps of the output's magnitude for exact-ish cases).

    oracle_fn(*inputs) is evaluated once in float64 (the truth) and once in got's dtype."""
    if got is None:
        raise AssertionError(f"{name}: got None")
    truth = oracle_fn(*[None if t is None else t.double() if t.is_floating_point() else t for t in inputs])
    same = oracle_fn(*inputs)
    truth, same = truth.double(), same.double()
    err = (got.double() - truth).abs().max().item()
    base_err = (same - truth).abs().max().item()
    ulp = torch.finfo(got.dtype).eps * max(truth.abs().max().item(), 1.0)
    tol = slack * base_err + 4 * ulp
    assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} (torch same-dtype error {base_err:.3e})"
