"""Benchmark family ``sparse_delta_linear``: a linear layer plus a sparse trainable delta.

Variants (fwd+bwd: x and the delta values take gradients, W is frozen):
  pyhappy        ``pyhappy.ops.sparse_delta_linear`` (layout built once, outside the timing)
  base           ``F.linear`` alone: the cost of the frozen layer without any delta
  clone_scatter  what users do today: W' = W + scatter(values) (a dense [N, K] copy), F.linear(x, W');
                 autograd forms the dense dW and gathers nnz of it
  torch_csr      F.linear(x, W) + (ΔW_csr @ xᵀ)ᵀ with a torch.sparse_csr_tensor built from the values

Peak memory: ``summary`` re-runs the fwd+bwd of each variant of the headline case in a fresh
subprocess and reports the peak resident-memory growth of its second, steady-state step over the
inputs (``common.steady_step_peak_bytes``: VmHWM after a reset; counts everything, including the
C++ kernels' own buffers).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from .common import (Case, Variant, compare, dtype_name, extended, find_result, peak_in_child, steady_step_peak_bytes,
                     target)

FAMILY = "sparse_delta_linear"
VARIANTS = ("pyhappy", "base", "clone_scatter", "torch_csr")


def backend_of(device, dtype):
    from pyhappy import backends

    return backends.select(FAMILY, device, dtype)


def _inputs(M, K, N, density, dtype, device, seed=0):
    from pyhappy import sparse as sp
    from pyhappy.ops import sparse_layout

    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device)
    idx = sp.random_pattern(N, K, density, seed=seed, device=device)
    lay = sparse_layout(idx, N, K)
    v = (torch.randn(idx.numel(), generator=g) * 0.01).to(dtype).to(device).requires_grad_()
    x = torch.randn(M, K, generator=g).to(dtype).to(device).requires_grad_()
    gout = torch.randn(M, N, generator=g).to(dtype).to(device)
    return W, b, idx, lay, v, x, gout


def _fns(M, K, N, W, b, idx, lay, v, x):
    from pyhappy.ops import sparse_delta_linear

    flat = idx.long()
    crow = torch.zeros(N + 1, dtype=torch.long, device=W.device)
    crow[1:] = torch.bincount(flat // K, minlength=N).cumsum(0)
    col = flat % K

    def clone_scatter():
        w = W.reshape(-1).index_add(0, flat, v).view(N, K)
        return F.linear(x, w, b)

    def torch_csr():
        S = torch.sparse_csr_tensor(crow, col, v, (N, K))
        return F.linear(x, W, b) + (S @ x.t()).t()

    return {
        "pyhappy": lambda: sparse_delta_linear(x, W, b, v, idx, lay),
        "base": lambda: F.linear(x, W, b),
        "clone_scatter": clone_scatter,
        "torch_csr": torch_csr,
    }


def train_case(device, M, K, N, density, dtype=torch.float32, *, budget_s=12.0, headline=False, seed=0,
               variants=VARIANTS, extended=False):
    elem = torch.empty((), dtype=dtype).element_size()
    nnz = max(1, int(round(density * N * K)))

    def setup():
        W, b, idx, lay, v, x, gout = _inputs(M, K, N, density, dtype, device, seed)
        fns = _fns(M, K, N, W, b, idx, lay, v, x)

        def run(name):
            f = fns[name]

            def fn():
                y = f()
                y.backward(gout)
                return (y.detach(), x.grad) if name == "base" else (y.detach(), x.grad, v.grad)
            return Variant(fn, [x, v])

        return {k: run(k) for k in variants}

    dense = 2 * (2 * M * K * N)
    sparse = 3 * 2 * M * nnz
    io = (2 * M * K + 2 * M * N) * elem + N * K * elem
    work = {"pyhappy": (dense + sparse, io + nnz * (2 * elem + 4)), "base": (dense, io),
            "clone_scatter": (dense + 2 * M * N * K, io + 3 * N * K * elem),
            "torch_csr": (dense + sparse, io + nnz * (2 * elem + 8))}
    return Case(
        op=FAMILY, shape=f"M={M} K={K} N={N} density={density:g}",
        params={"M": M, "K": K, "N": N, "density": density, "nnz": nnz, "kind": "train"},
        dtype=dtype, pass_="fwd+bwd", variants=tuple(variants), setup=setup, work={k: work[k] for k in variants},
        budget_s=budget_s, min_rounds=5, max_rounds=25, headline=headline, extended=extended,
        sweeps=((f"density sweep M={M} K={K} N={N} {dtype_name(dtype)}", "density"),),
    )


def fwd_case(device, M, K, N, density, dtype=torch.float32, *, budget_s=4.0, seed=0, variants=VARIANTS):
    elem = torch.empty((), dtype=dtype).element_size()
    nnz = max(1, int(round(density * N * K)))
    variants = tuple(variants)

    def setup():
        W, b, idx, lay, v, x, _ = _inputs(M, K, N, density, dtype, device, seed)
        fns = _fns(M, K, N, W, b, idx, lay, v.detach(), x.detach())

        def nograd(f):
            def fn():
                with torch.no_grad():
                    return f()
            return Variant(fn)

        return {k: nograd(fns[k]) for k in variants}

    io = (M * K + M * N) * elem + N * K * elem
    work = {"pyhappy": (2 * M * K * N + 2 * M * nnz, io + nnz * (elem + 4)), "base": (2 * M * K * N, io),
            "clone_scatter": (2 * M * K * N, io + 2 * N * K * elem),
            "torch_csr": (2 * M * K * N + 2 * M * nnz, io + nnz * (elem + 8))}
    return Case(
        op=FAMILY, shape=f"M={M} K={K} N={N} density={density:g}",
        params={"M": M, "K": K, "N": N, "density": density, "nnz": nnz, "kind": "fwd"},
        dtype=dtype, pass_="fwd", variants=variants, setup=setup, work=work, budget_s=budget_s,
        same_result=("clone_scatter",),
    )


def cases(device, quick):
    f32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cuda":  # the Triton kernels; torch_csr (cuSPARSE) with --full
        if quick:
            return [train_case(device, 512, 1024, 1024, 0.01, bf16, headline=True, variants=VARIANTS[:3])]
        out = [train_case(device, 4096, 4096, 4096, d, bf16, headline=(d == 0.01), variants=VARIANTS[:3],
                          extended=(d != 0.01)) for d in (0.001, 0.01, 0.05)]
        out.append(extended(train_case(device, 4096, 4096, 4096, 0.01, bf16)))
        out.append(fwd_case(device, 1, 4096, 4096, 0.01, bf16, variants=VARIANTS[:3]))
        return out
    if device.type != "cpu":
        return []
    if quick:
        return [train_case(device, 64, 512, 512, 0.01, budget_s=0.5, headline=True)]
    out = [train_case(device, 512, 4096, 4096, d, headline=(d == 0.01), extended=(d != 0.01)) for d in (0.001, 0.01, 0.05)]
    out.append(train_case(device, 512, 4096, 4096, 0.01, bf16, variants=("pyhappy", "base", "clone_scatter")))
    out.append(train_case(device, 128, 4096, 4096, 0.01, budget_s=6.0, extended=True))
    out.append(extended(fwd_case(device, 512, 4096, 4096, 0.01)))  # no target: --full (keeps the CPU run short)
    out.append(fwd_case(device, 1, 4096, 4096, 0.01))
    return out


# ---- peak memory, one fwd+bwd per fresh process -------------------------------------------------


def _peak_child(name, M, K, N, density, dtype_name_):
    dtype = getattr(torch, dtype_name_)
    W, b, idx, lay, v, x, gout = _inputs(M, K, N, density, dtype, torch.device("cpu"))
    f = _fns(M, K, N, W, b, idx, lay, v, x)[name]
    leaves = [t for t in (W, b, v, x) if isinstance(t, torch.Tensor) and t.requires_grad]
    print(json.dumps({"extra_bytes": steady_step_peak_bytes(lambda: f().backward(gout), leaves)}))


def peak_extra_bytes(name, M, K, N, density, dtype="float32"):
    """Peak RSS growth of one steady-state fwd+bwd beyond its inputs, in a fresh process.
    Includes the outputs and gradients every variant must produce (y, dx, d(values): 16 MiB here)."""
    return peak_in_child(__name__, name, M, K, N, density, dtype)


def summary(results, device):
    """What this run measured at 1% density, M=512, K=N=4096 (lines), and the target checks (dicts, JSON only)."""
    lines = []
    if device.type == "cuda":
        r = find_result(results, M=4096, K=4096, N=4096, density=0.01, kind="train", dtype="bfloat16")
        if r is not None:
            vb = r["ratios"]["base"]["paired_median"]
            vs = r["ratios"]["clone_scatter"]["paired_median"]
            lines.append(f"CUDA fwd+bwd 1% M=4096 4096² bf16: {compare(vb, 'the base linear alone', 'pyhappy')}, "
                         f"{compare(vs, 'clone+scatter')}")
            lines += [target("CUDA fwd+bwd 1% M=4096 4096² bf16: pyhappy/base", vb, "<=", 1.15),
                      target("CUDA fwd+bwd 1% M=4096 4096² bf16: speed-up over clone+scatter", 1 / vs, ">=", 1.6)]
        return lines
    if device.type != "cpu":
        return lines
    r = find_result(results, M=512, K=4096, N=4096, density=0.01, kind="train", dtype="float32")
    if r is not None:
        vb = r["ratios"]["base"]["paired_median"]
        vs = r["ratios"]["clone_scatter"]["paired_median"]
        lines.append(f"fwd+bwd 1% M=512 4096²: {compare(vb, 'the base linear alone', 'pyhappy')}, "
                     f"{compare(vs, 'clone+scatter')}")
        lines += [target("fwd+bwd 1% M=512 4096²: pyhappy/base", vb, "<=", 1.15),
                  target("fwd+bwd 1% M=512 4096²: speed-up over clone+scatter", 1 / vs, ">=", 1.6)]
        # Peak memory only for the full run's headline shape (it re-runs the case in subprocesses).
        peaks = {k: peak_extra_bytes(k, 512, 4096, 4096, 0.01) for k in VARIANTS}
        nk = 4096 * 4096 * 4
        lines.append("peak extra memory of a steady-state fwd+bwd (fresh process, RSS growth of its second step; "
                     f"one dense [N, K] fp32 = {nk / 2**20:.0f} MiB): " + ", ".join(
                         f"{k} {'n/a' if v is None else f'{v / 2**20:.0f} MiB'}" for k, v in peaks.items()))
    return lines


__all__ = ["FAMILY", "backend_of", "cases", "summary"]
