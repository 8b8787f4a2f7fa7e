"""Benchmark family ``lora_linear``: pyhappy's fused LoRA linear against the unfused PEFT
formulation and against the base linear alone, in one process on the same inputs.

Variants (every case):
  pyhappy  ``pyhappy.ops.lora_linear`` on the device's default backend (cpp on CPU, triton on CUDA)
  unfused  PEFT's ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` written with F.linear
           (dropout is the identity when p = 0, as PEFT's nn.Identity)
  base     ``F.linear(x, W, b)``: the frozen base layer alone, the floor the fused op aims at
  base_cpp (CPU, with the extension) the same base linear through the products pyhappy's C++ ops
           run (csrc/cpu/gemm.h: fp32 in column blocks, which MKL runs faster than one call on
           some CPUs; bf16 in fp32 blocks): pyhappy/base_cpp is what the adapter itself costs
Passes: fwd (under torch.no_grad) and fwd+bwd (x, A, B require grad, W and bias frozen;
``y.backward(g)`` with a fixed g; grads reset to None before every call).
Shapes: a 7B model's projections, K = N = 4096 (q/k/v/o) and K = 4096 -> N = 11008 (up/gate).
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from .common import (Case, Rotation, Variant, compare, decode_copies, dtype_name, find_result, json_from_child,
                     seeded_rnd,
                     target)

FAMILY = "lora_linear"
VARIANTS = ("pyhappy", "unfused", "base")  # + "base_cpp" on CPU with the extension
DECODE_M = 64  # at or below this many rows, weights are rotated so the cache does not serve them


def _cpp():
    from pyhappy import _ext

    return _ext.load()


class _CppLinear(torch.autograd.Function):
    """y = x Wᵀ + b through pyhappy's C++ GEMM (gemm.h); W and b frozen, dx = dy W."""

    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(W)
        return _cpp().gemm_addmm(b, x, W.t())

    @staticmethod
    def backward(ctx, g):
        (W,) = ctx.saved_tensors
        return _cpp().gemm_mm(g.contiguous(), W), None, None


def backend_of(device, dtype):
    from pyhappy import backends

    return backends.select(FAMILY, device, dtype)


def _work(M, K, N, r, pass_, elem):
    """(flops, bytes) of the LoRA computation and of the base linear alone (minimal: every operand
    read and every result written once)."""
    base_f = 2 * M * K * N
    lora_f = 2 * M * r * (K + N)
    base_b = M * K + N * K + N + M * N  # x, W, bias, y
    lora_b = r * K + N * r  # A, B
    if pass_ == "fwd+bwd":
        base_f *= 2  # + dx = g W
        lora_f *= 3  # + dB = (s g)^T u, du = s g B, dA = du^T x, dx += du A
        base_b += M * N + M * K  # g, dx
        lora_b *= 2  # dA, dB
    return {
        "pyhappy": (base_f + lora_f, (base_b + lora_b) * elem),
        "unfused": (base_f + lora_f, (base_b + lora_b) * elem),
        "base": (base_f, base_b * elem),
        "base_cpp": (base_f, base_b * elem),
    }


def make_case(device, M, K, N, r, dtype, pass_, *, dropout_p=0.0, budget_s=4.0, min_rounds=5, max_rounds=25,
              sweeps=(), headline=False, seed=0, extended=False):
    elem = torch.empty((), dtype=dtype).element_size()
    scaling = 2.0  # alpha / r with alpha = 2 r
    copy_bytes = (N * K + N + r * K + N * r) * elem
    n_copies, note = decode_copies(M, DECODE_M, copy_bytes, device, "W,b,A,B")
    train = pass_ == "fwd+bwd"

    def setup():
        rnd = seeded_rnd(device, dtype, seed)

        x = rnd(M, K, grad=train)
        copies = [
            (rnd(N, K, std=K**-0.5), rnd(N, std=0.02), rnd(r, K, std=K**-0.5, grad=train),
             rnd(N, r, std=r**-0.5, grad=train))  # B non-zero (PEFT inits it to 0: same cost)
            for _ in range(n_copies)
        ]
        gout = rnd(M, N) if train else None
        grads = ([x] + [t for c in copies for t in (c[2], c[3])]) if train else []

        from pyhappy.ops import lora_linear

        def fused(W, b, A, B):
            return lora_linear(x, W, b, A, B, scaling, dropout_p=dropout_p)

        def unfused(W, b, A, B):
            xd = x if dropout_p == 0.0 else F.dropout(x, dropout_p, training=True)
            return F.linear(x, W, b) + F.linear(F.linear(xd, A), B) * scaling

        def base(W, b, A, B):
            return F.linear(x, W, b)

        def base_cpp(W, b, A, B):
            return _CppLinear.apply(x, W, b)

        rot = Rotation(copies)  # one cycle for every variant: no call finds the copy the last one read

        def variant(f):
            if not train:
                def fn():
                    with torch.no_grad():
                        return f(*rot.next())
            else:
                def fn():
                    W, b, A, B = rot.next()
                    y = f(W, b, A, B)
                    y.backward(gout)
                    return (y.detach(), x.grad) + ((A.grad, B.grad) if f not in (base, base_cpp) else ())
            return Variant(fn, grads)

        fns = {"pyhappy": fused, "unfused": unfused, "base": base, "base_cpp": base_cpp}
        return {k: variant(fns[k]) for k in variants}

    variants = VARIANTS + (("base_cpp",) if device.type == "cpu" and _cpp() is not None else ())

    shape = f"M={M} K={K} N={N} r={r}" + (f" p={dropout_p}" if dropout_p else "")
    return Case(
        op=FAMILY, shape=shape, params={"M": M, "K": K, "N": N, "r": r, "dropout_p": dropout_p},
        dtype=dtype, pass_=pass_, variants=variants, setup=setup, work=_work(M, K, N, r, pass_, elem),
        same_result=("unfused",) if dropout_p == 0.0 else (), budget_s=budget_s, min_rounds=min_rounds,
        max_rounds=max_rounds, sweeps=tuple(sweeps), headline=headline, note=note, extended=extended,
    )


def _msweep(dtype, pass_, K=4096, N=4096, r=16):
    return (f"M sweep K={K} N={N} r={r} {dtype_name(dtype)} {pass_}", "M")


def _rsweep(dtype, pass_, M, K=4096, N=4096):
    return (f"r sweep M={M} K={K} N={N} {dtype_name(dtype)} {pass_}", "r")


def cases(device, quick):
    f32, bf16 = torch.float32, torch.bfloat16
    if quick:
        K = N = 1024
        sw = (_msweep(f32, "fwd", K, N),)
        return [
            make_case(device, 64, K, N, 16, f32, "fwd", budget_s=0.5, headline=True, sweeps=sw),
            make_case(device, 64, K, N, 16, f32, "fwd+bwd", budget_s=0.8, headline=True),
            make_case(device, 1, K, N, 16, f32, "fwd", budget_s=0.3, sweeps=sw),
        ]
    out = []
    if device.type == "cpu":
        # Headline first (the number): M=512, K=N=4096, r=16, fp32.
        # Per-call noise on a shared 2-core VM is ~10%: many rounds are needed to resolve a few %.
        for p, b in (("fwd", 14.0), ("fwd+bwd", 32.0)):
            out.append(make_case(device, 512, 4096, 4096, 16, f32, p, budget_s=b, min_rounds=9, max_rounds=60,
                                 headline=True, sweeps=(_msweep(f32, p), _rsweep(f32, p, 512))))
        # Decode / small batch (bandwidth-bound; weights rotated out of L3).
        for M in (1, 16):
            for p in ("fwd", "fwd+bwd"):
                out.append(make_case(device, M, 4096, 4096, 16, f32, p, budget_s=2.0, sweeps=(_msweep(f32, p),)))
        out.append(make_case(device, 128, 4096, 4096, 16, f32, "fwd", budget_s=3.0, sweeps=(_msweep(f32, "fwd"),)))
        # Rank sweep at M=512.
        for r in (8, 64):
            out.append(make_case(device, 512, 4096, 4096, r, f32, "fwd", budget_s=5.0,
                                 sweeps=(_rsweep(f32, "fwd", 512),), extended=True))
        out.append(make_case(device, 512, 4096, 4096, 64, f32, "fwd+bwd", budget_s=10.0,
                             sweeps=(_rsweep(f32, "fwd+bwd", 512),), extended=True))
        # Dropout inside the adapter (pyhappy never materialises the mask; PEFT does).
        out.append(make_case(device, 128, 4096, 4096, 16, f32, "fwd+bwd", dropout_p=0.1, budget_s=4.0))
        # MLP up/gate projection.
        out.append(make_case(device, 16, 4096, 11008, 16, f32, "fwd", budget_s=2.0))
        out.append(make_case(device, 16, 4096, 11008, 16, f32, "fwd+bwd", budget_s=2.0, extended=True))
        out.append(make_case(device, 512, 4096, 11008, 16, f32, "fwd", budget_s=8.0, min_rounds=4, extended=True))
        # bf16.
        # bf16 at M=512: torch's baselines take ~0.9 s a call on a CPU without native bf16 dot
        # products (~16 s of the default run on the Zen 3): --full only.
        out.append(make_case(device, 512, 4096, 4096, 16, bf16, "fwd", budget_s=5.0, extended=True))
        out.append(make_case(device, 512, 4096, 4096, 16, bf16, "fwd+bwd", budget_s=8.0))
        out.append(make_case(device, 1, 4096, 4096, 16, bf16, "fwd", budget_s=2.0))
        return out
    # CUDA: the default run keeps to the M sweep of the headline shape (bf16, K=N=4096, r=16) and the
    # fp32 target case, so that it fits the GPU check's time (.ci/gpu); --full runs the whole grid.
    for dtype in (bf16, f32):
        ranks = (8, 16, 64) if dtype is bf16 else (16,)
        for K, N in ((4096, 4096), (4096, 11008)):
            for r in ranks:
                for M in (1, 16, 512, 4096):
                    for p in ("fwd", "fwd+bwd"):
                        sw = []
                        if K == N and r == 16:
                            sw.append(_msweep(dtype, p))
                        if K == N and M == 4096 and dtype is bf16:
                            sw.append(_rsweep(dtype, p, 4096))
                        target_case = M == 4096 and K == N and r == 16 and (dtype is bf16 or p == "fwd+bwd")
                        default = K == N and r == 16 and (dtype is bf16 or target_case)
                        out.append(make_case(device, M, K, N, r, dtype, p, sweeps=sw, headline=target_case,
                                             extended=not default))
    out.append(make_case(device, 4096, 4096, 4096, 16, bf16, "fwd+bwd", dropout_p=0.1, extended=True))
    out.sort(key=lambda c: not c.headline)  # headline first (stable otherwise)
    return out


# ---- first-call tuning cost ----------------------------------------------------------------------
# The seven Linear layer types of a Llama-7B decoder layer (attention's q, k, v, o; the MLP's gate, up,
# down), LoRA r=16 on each, in fresh processes: the first ``pyhappy.tune`` of the block on an empty
# cache, then a process that finds the decisions in the cache file.

_BLOCK_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


class _LlamaLinears(torch.nn.Module):
    """q, k, v, o (hidden -> hidden) and gate, up (hidden -> inter), down (inter -> hidden), chained as
    a decoder layer chains them (residual adds; SiLU-gated MLP), attention itself left out."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        for n in _BLOCK_NAMES:
            i, o = (inter, hidden) if n == "down" else (hidden, inter) if n in ("gate", "up") else (hidden, hidden)
            setattr(self, n, torch.nn.Linear(i, o, bias=False))

    def forward(self, x):
        h = x + self.o(self.q(x) + self.k(x) + self.v(x))
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


def _block(M: int, hidden: int, inter: int):
    import pyhappy

    torch.manual_seed(0)
    block = _LlamaLinears(hidden, inter)
    pyhappy.inject(block, list(_BLOCK_NAMES), r=16, alpha=32)
    x = torch.randn(1, M, hidden)

    def step():
        block.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        block(x).sum().backward()
        return time.perf_counter() - t0
    return block, x, step


def _tune_cost_child(M: int, hidden: int, inter: int, phase: str):
    """One process of the tuning-cost measurement (PYHAPPY_TUNE=on, PYHAPPY_TUNE_CACHE set by the
    parent). ``phase`` "first": time ``pyhappy.tune(block, x)`` on an empty cache, then two plain
    steps; "cached": three steps (the first meets the cache file), nothing should be measured."""
    import json

    import pyhappy
    from pyhappy import _tune

    block, x, step = _block(M, hidden, inter)
    out = {}
    if phase == "first":
        t0 = time.perf_counter()
        pyhappy.tune(block, x, progress=False)
        out["tune_s"] = time.perf_counter() - t0
        out["steady_s"] = min(step() for _ in range(2))
    else:
        out["first_s"] = step()
        out["steady_s"] = min(step() for _ in range(2))
    out["measured_s"] = _tune.tuner().measured_s
    out["keys"] = len(_tune.tuner().log)
    print(json.dumps(out))


def tuning_cost(M: int, hidden: int = 4096, inter: int = 11008):
    """{"first": ..., "cached": ...} of ``_tune_cost_child`` for this row count, or None if a child
    failed."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pyhappy-bench-tune-cost-") as d:
        env = {"PYHAPPY_TUNE": "on", "PYHAPPY_TUNE_CACHE": os.path.join(d, "tune.json")}
        first = json_from_child(__name__, "_tune_cost_child", M, hidden, inter, "first", env=env)
        cached = json_from_child(__name__, "_tune_cost_child", M, hidden, inter, "cached", env=env) if first else None
    return None if cached is None else {"first": first, "cached": cached}


def _tuning_cost_lines(M: int) -> list:
    got = tuning_cost(M)
    what = f"first-call tuning cost, Llama-7B layer types (q k v o gate up down, LoRA r=16), M={M}"
    if got is None:
        return [f"{what}: the measurement failed (a child process exited with an error)"]
    f, c = got["first"], got["cached"]
    beyond = f["tune_s"] - f["steady_s"]
    return [f"{what}: pyhappy.tune took {f['tune_s']:.2f} s on an empty cache where a step takes "
            f"{f['steady_s']:.2f} s, {beyond:.2f} s beyond the step ({f['keys']} keys, {f['measured_s']:.2f} s "
            f"measuring); a fresh process reading the cache: first step {c['first_s']:.2f} s, then "
            f"{c['steady_s']:.2f} s, {c['keys']} keys measured ({c['measured_s']:.2f} s)",
            target(f"{what}: seconds beyond one step", beyond, "<=", 3.0),
            target(f"{what}: keys measured with the cache", c["keys"], "<=", 0)]


def summary(results, device):
    """What this run measured at the headline shapes (lines), and the target checks (dicts, JSON only)."""
    lines = []

    def line(r, baseline, op, goal, what):
        if r is None:
            return
        v = r["ratios"][baseline]["paired_median"]
        lines.append(f"{what}: {compare(v, 'the base linear alone', 'pyhappy')}; "
                     f"{compare(r['paired']['pyhappy/unfused'], 'unfused')}; "
                     f"unfused {r['paired']['unfused/base']:.3f}x the base linear's time")
        lines.append(target(f"{what}: pyhappy/{baseline}", v, op, goal))

    if device.type == "cpu":
        r = find_result(results, M=512, K=4096, N=4096, r=16, dtype="float32", dropout_p=0.0, **{"pass": "fwd+bwd"})
        line(r, "base", "<=", 1.02, "CPU fwd+bwd M=512 K=N=4096 r=16 fp32")
        if r is not None and "base_cpp" in r["ratios"]:
            lines.append("the adapter's own cost there: "
                         f"{compare(r['ratios']['base_cpp']['paired_median'], 'base_cpp', 'pyhappy')} "
                         "(the base linear through pyhappy's C++ GEMM)")
        if r is not None:  # a full run (the headline shape ran): the tuning cost of a model's layer types
            for m in (512, 1):
                lines += _tuning_cost_lines(m)
    else:
        for dt in ("bfloat16", "float32"):
            r = find_result(results, M=4096, K=4096, N=4096, r=16, dtype=dt, dropout_p=0.0, **{"pass": "fwd+bwd"})
            line(r, "base", "<=", 1.03, f"CUDA fwd+bwd M=4096 K=N=4096 r=16 {dt}")
            if r is not None:
                speedup = 1.0 / r["ratios"]["unfused"]["paired_median"]
                lines.append(target(f"CUDA fwd+bwd M=4096 K=N=4096 r=16 {dt}: speed-up over unfused", speedup, ">=", 1.15))
    return lines


__all__ = ["FAMILY", "backend_of", "cases", "make_case", "summary"]
