"""Benchmark family ``dora_linear``: pyhappy's DoRA layer against PEFT's formulation, fused LoRA
and the base linear alone, in one process on the same inputs.

Variants (every case):
  pyhappy  ``pyhappy.ops.dora_linear`` with ‖W_n‖² cached once (as LoRALinear(use_dora=True) keeps
           it while the frozen W is unchanged): the norm ‖W + s·BA‖_row from one [N, K]·[K, r]
           product, the layer on the fused LoRA kernels. In training every call computes the norm
           (A and B change with every optimizer step); the fwd passes (inference) keep it between
           calls through ``pyhappy.ops.DoraNormCache`` as LoRALinear does (A and B compared by value
           on every call), where PEFT recomputes it per call
  peft     PEFT's formulation (peft/tuners/lora/dora.py, as ``pyhappy.reference``): every step
           forms W + s·BA ([N, K]) for its row norms (detached), then
           ``base(x) + (ms - 1) ⊙ (base(x) - b) + ms ⊙ s · lora_B(lora_A(x))``. PEFT itself forms
           BA by pushing a [K, K] identity through lora_A and lora_B, which costs more than the
           ``B @ A`` used here: this baseline is the cheaper one
  lora     ``pyhappy.ops.lora_linear`` at the same rank: what DoRA's magnitude and norm add
  base     ``F.linear(x, W, b)``: the frozen base layer alone
Passes: fwd (under torch.no_grad) and fwd+bwd (x, A, B and the magnitude require grad, W and bias
frozen; ``y.backward(g)`` with a fixed g; grads reset to None before every call).

Peak memory (CPU, the headline shape): ``summary`` re-runs the fwd+bwd of each variant in a fresh
subprocess and reports the peak resident-memory growth of its second, steady-state step over the
inputs (``common.steady_step_peak_bytes``, as the sparse_delta_linear family measures it);
pyhappy's growth beyond fused LoRA's is the temporary DoRA adds, against the goal of no [N, K]-sized
one (at most a tenth of W's bytes).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from .common import (Case, Rotation, Variant, compare, decode_copies, dtype_name, find_result, peak_in_child,
                     seeded_rnd, steady_step_peak_bytes, target)

FAMILY = "dora_linear"
VARIANTS = ("pyhappy", "peft", "lora", "base")
DECODE_M = 64  # at or below this many rows, weights are rotated so the cache does not serve them


def backend_of(device, dtype):
    from pyhappy import backends

    return backends.select(FAMILY, device, dtype)


def _tensors(device, M, K, N, r, dtype, n_copies, train, seed=0):
    """x, [(W, b, A, B, magnitude, ‖W_n‖², norm cache)] * n_copies, g: magnitude PEFT's initial row
    norms perturbed (as after training), B non-zero (PEFT inits it to 0: same cost)."""
    from pyhappy.ops.dora_linear import DoraNormCache, dora_weight_sqnorm

    rnd = seeded_rnd(device, dtype, seed)

    x = rnd(M, K).requires_grad_(train)
    copies = []
    for _ in range(n_copies):
        W, b, A, B = rnd(N, K, std=K**-0.5), rnd(N, std=0.02), rnd(r, K, std=K**-0.5), rnd(N, r, std=r**-0.5)
        m = torch.linalg.vector_norm(W.float(), dim=1).to(dtype) * (1.0 + rnd(N, std=0.05))
        copies.append((W, b, A.requires_grad_(train), B.requires_grad_(train), m.requires_grad_(train),
                       dora_weight_sqnorm(W), DoraNormCache()))
    gout = rnd(M, N) if train else None
    return x, copies, gout


def _fns(x, scaling, train):
    from pyhappy.ops import dora_linear, dora_weight_norm, lora_linear

    def pyhappy(W, b, A, B, m, sq, cache):
        if train:
            return dora_linear(x, W, b, A, B, m, scaling, weight_sqnorm=sq)
        # LoRALinear's serving path: the norm kept while W (frozen: its version), s, A and B are unchanged
        wn = cache.get((W.data_ptr(), W._version, scaling), A, B, lambda: dora_weight_norm(W, A, B, scaling, sq))
        return dora_linear(x, W, b, A, B, m, scaling, weight_norm=wn)

    def peft(W, b, A, B, m, sq, cache):
        result = F.linear(x, W, b)  # PEFT: self.base_layer(x), bias included
        norm = torch.linalg.vector_norm(W + scaling * (B @ A).detach(), dim=1).to(W.dtype).detach()
        ms = (m / norm).view(1, -1)
        lora = F.linear(F.linear(x, A), B)
        return result + (ms - 1) * (result - b) + ms * lora * scaling

    def lora(W, b, A, B, m, sq, cache):
        return lora_linear(x, W, b, A, B, scaling)

    def base(W, b, A, B, m, sq, cache):
        return F.linear(x, W, b)

    return {"pyhappy": pyhappy, "peft": peft, "lora": lora, "base": base}


def _work(M, K, N, r, pass_, elem):
    """(flops, bytes) of each variant's computation (minimal: every operand read and every result
    written once; PEFT's W + s·BA written and read once more)."""
    base_f = 2 * M * K * N
    lora_f = 2 * M * r * (K + N)
    norm_f = 2 * N * K * r  # W Aᵀ (pyhappy) or B A (peft)
    base_b = M * K + N * K + N + M * N
    lora_b = r * K + N * r
    if pass_ == "fwd+bwd":
        base_f *= 2
        lora_f *= 3
        base_b += M * N + M * K
        lora_b *= 2
    mag_b = 2 * N if pass_ == "fwd+bwd" else N
    return {
        "pyhappy": (base_f + lora_f + norm_f, (base_b + lora_b + mag_b) * elem),
        "peft": (base_f + lora_f + norm_f + 3 * N * K, (base_b + lora_b + mag_b + 2 * N * K) * elem),
        "lora": (base_f + lora_f, (base_b + lora_b) * elem),
        "base": (base_f, base_b * elem),
    }


def make_case(device, M, K, N, r, dtype, pass_, *, budget_s=4.0, min_rounds=5, max_rounds=25, sweeps=(),
              headline=False, seed=0, extended=False):
    elem = torch.empty((), dtype=dtype).element_size()
    scaling = 2.0  # alpha / r with alpha = 2 r
    copy_bytes = (N * K + N + r * K + N * r + N) * elem
    n_copies, note = decode_copies(M, DECODE_M, copy_bytes, device, "W,b,A,B,m")
    train = pass_ == "fwd+bwd"

    def setup():
        x, copies, gout = _tensors(device, M, K, N, r, dtype, n_copies, train, seed)
        fns = _fns(x, scaling, train)
        grads = ([x] + [t for c in copies for t in c[2:5]]) if train else []

        rot = Rotation(copies)  # one cycle for every variant: no call finds the copy the last one read

        def variant(name):
            f = fns[name]
            if not train:
                def fn():
                    with torch.no_grad():
                        return f(*rot.next())
            else:
                def fn():
                    W, b, A, B, m, sq, cache = rot.next()
                    y = f(W, b, A, B, m, sq, cache)
                    y.backward(gout)
                    if name in ("pyhappy", "peft"):
                        return y.detach(), x.grad, A.grad, B.grad, m.grad
                    return (y.detach(), x.grad) + ((A.grad, B.grad) if name == "lora" else ())
            return Variant(fn, grads)

        return {k: variant(k) for k in VARIANTS}

    return Case(
        op=FAMILY, shape=f"M={M} K={K} N={N} r={r}", params={"M": M, "K": K, "N": N, "r": r},
        dtype=dtype, pass_=pass_, variants=VARIANTS, setup=setup, work=_work(M, K, N, r, pass_, elem),
        same_result=("peft",), budget_s=budget_s, min_rounds=min_rounds, max_rounds=max_rounds,
        sweeps=tuple(sweeps), headline=headline, note=note, extended=extended,
    )


def _msweep(dtype, pass_, K=4096, N=4096, r=16):
    return (f"M sweep K={K} N={N} r={r} {dtype_name(dtype)} {pass_}", "M")


def cases(device, quick):
    f32, bf16 = torch.float32, torch.bfloat16
    if quick:
        return [make_case(device, 64, 512, 512, 16, f32, "fwd+bwd", budget_s=0.5, headline=True)]
    if device.type == "cpu":
        # Headline first (the targets' shape): M=512, K=N=4096, r=16, fp32, fwd+bwd.
        sw = (_msweep(f32, "fwd+bwd"),)
        return [
            make_case(device, 512, 4096, 4096, 16, f32, "fwd+bwd", budget_s=30.0, min_rounds=9, max_rounds=60,
                      headline=True, sweeps=sw),
            make_case(device, 16, 4096, 4096, 16, f32, "fwd+bwd", budget_s=3.0, sweeps=sw),
            make_case(device, 1, 4096, 4096, 16, f32, "fwd", budget_s=3.0),
            make_case(device, 512, 4096, 4096, 16, f32, "fwd", budget_s=8.0, extended=True),
            make_case(device, 512, 4096, 4096, 16, bf16, "fwd+bwd", budget_s=8.0, extended=True),
        ]
    if device.type != "cuda":
        return []
    # CUDA: one default case (bf16 M=4096, no target: the targets are the CPU's), the rest --full.
    out = []
    for dtype in (bf16, f32):
        for M in (4096, 16):
            main = M == 4096 and dtype is bf16
            out.append(make_case(device, M, 4096, 4096, 16, dtype, "fwd+bwd", sweeps=(_msweep(dtype, "fwd+bwd"),),
                                 headline=main, extended=not main))
    return out


# ---- peak memory, one fwd+bwd per fresh process -------------------------------------------------


def _peak_child(name, M, K, N, r):
    x, copies, g = _tensors(torch.device("cpu"), M, K, N, r, torch.float32, 1, True)
    f = _fns(x, 2.0, True)[name]
    leaves = [t for t in (x, *copies[0]) if isinstance(t, torch.Tensor) and t.requires_grad]
    print(json.dumps({"extra_bytes": steady_step_peak_bytes(lambda: f(*copies[0]).backward(g), leaves)}))


def peak_extra_bytes(name, M, K, N, r, runs=1):
    """Peak RSS growth of one steady-state fp32 fwd+bwd beyond its inputs (``steady_step_peak_bytes``),
    in a fresh process (None if it failed); the median of ``runs`` processes. Includes the outputs and
    gradients every variant produces (y, dx, ...)."""
    got = [peak_in_child(__name__, name, M, K, N, r) for _ in range(runs)]
    got = sorted(b for b in got if b is not None)
    return got[len(got) // 2] if got else None


def summary(results, device):
    """What this run measured at the headline shape (lines), and the target checks (dicts, JSON only)."""
    lines = []
    if device.type == "cuda":
        for dt in ("bfloat16", "float32"):
            r = find_result(results, M=4096, K=4096, N=4096, r=16, dtype=dt, **{"pass": "fwd+bwd"})
            if r is not None:
                lines.append(f"CUDA fwd+bwd M=4096 K=N=4096 r=16 {dt}: "
                             f"{compare(r['ratios']['lora']['paired_median'], 'fused LoRA', 'pyhappy')}; "
                             f"{compare(r['ratios']['peft']['paired_median'], 'PEFT')}")
        return lines
    if device.type != "cpu":
        return lines
    what = "CPU fwd+bwd M=512 K=N=4096 r=16 fp32"
    r = find_result(results, M=512, K=4096, N=4096, r=16, dtype="float32", **{"pass": "fwd+bwd"})
    if r is None:
        return lines
    vl = r["ratios"]["lora"]["paired_median"]
    vp = r["ratios"]["peft"]["paired_median"]
    vb = r["ratios"]["base"]["paired_median"]
    lines.append(f"{what}: {compare(vl, 'fused LoRA r=16', 'pyhappy')}; {compare(vp, 'PEFT')}; "
                 f"{compare(vb, 'the base linear alone')}")
    lines += [target(f"{what}: pyhappy/lora", vl, "<=", 1.05),
              target(f"{what}: speed-up over peft", 1.0 / vp, ">=", 1.5)]
    d = find_result(results, M=1, K=4096, N=4096, r=16, dtype="float32", **{"pass": "fwd"})
    if d is not None:
        lines.append(f"CPU decode fwd M=1 K=N=4096 r=16 fp32 (norm kept between calls): "
                     f"{compare(d['ratios']['lora']['paired_median'], 'fused LoRA r=16', 'pyhappy')}; "
                     f"{compare(d['ratios']['peft']['paired_median'], 'PEFT')}")
    # Peak memory (re-runs the headline step in subprocesses, so only for its full-size shape).
    # The two variants compared take the median of three processes: a process's RSS growth varies by a
    # few MiB with where the allocator places the step's buffers.
    peaks = {k: peak_extra_bytes(k, 512, 4096, 4096, 16, runs=3 if k in ("pyhappy", "lora") else 1)
             for k in VARIANTS}
    w_bytes = 4096 * 4096 * 4
    lines.append("peak extra memory of a steady-state fwd+bwd (fresh process, RSS growth of its second "
                 f"step; W = {w_bytes / 2**20:.0f} MiB): " + ", ".join(
                     f"{k} {'n/a' if v is None else f'{v / 2**20:.0f} MiB'}" for k, v in peaks.items()))
    if peaks["pyhappy"] is not None and peaks["lora"] is not None:
        extra = (peaks["pyhappy"] - peaks["lora"]) / w_bytes
        lines.append(f"DoRA's peak beyond fused LoRA's: {100 * extra:.1f}% of W's bytes")
        lines.append(target(f"{what}: peak memory beyond lora / W bytes", extra, "<=", 0.10))
    return lines


__all__ = ["FAMILY", "backend_of", "cases", "make_case", "summary"]
