"""Benchmark family ``vera_linear``: pyhappy's VeRA / PVeRA linear against PEFT's formulation and the
base linear alone, in one process on the same inputs.

Variants (every case):
  pyhappy  ``pyhappy.ops.vera_linear`` (VeRA) or ``pyhappy.ops.pvera_linear`` (PVeRA, sample=True in
           fwd+bwd, PEFT's training mode; sample=False in fwd, its eval mode)
  peft     PEFT's layer math in torch ops: ``base(x) + λ_b * F.linear(λ_d * F.linear(x, A), B)``, and
           for PVeRA the chunk into (μ, log σ²) with ``μ + randn * exp(½ log σ²)`` in training
  base     ``F.linear(x, W, b)``: the frozen base layer alone
Passes: fwd (torch.no_grad) and fwd+bwd (x, λ_d, λ_b require grad; W, b, A, B frozen).
Shape: a 7B model's projection, M=512, K = N = 4096, r = 256 (VeraConfig's default rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import Case, Variant, compare, find_result, target

FAMILY = "vera_linear"
VARIANTS = ("pyhappy", "peft", "base")


def backend_of(device, dtype):
    from pyhappy import backends

    return backends.select(FAMILY, device, dtype)


def _work(M, K, N, r, pass_, elem, pvera):
    """(flops, bytes): base linear, plus the adapter's products (fwd: x Aᵀ over rows r or 2r, h Bᵀ;
    bwd adds dy B, dyᵀ h and du A: the frozen projections need no [r, K] gradient)."""
    rows = 2 * r if pvera else r
    base_f = 2 * M * K * N
    ad_f = 2 * M * (rows * K + r * N)
    base_b = M * K + N * K + N + M * N
    ad_b = rows * K + N * r + rows + N
    if pass_ == "fwd+bwd":
        base_f *= 2
        ad_f += 2 * M * (2 * r * N + rows * K)
        base_b += M * N + M * K
        ad_b += rows + N
    both = (base_f + ad_f, (base_b + ad_b) * elem)
    return {"pyhappy": both, "peft": both, "base": (base_f, base_b * elem)}


def make_case(device, M, K, N, r, dtype, pass_, *, pvera=False, budget_s=4.0, min_rounds=5, max_rounds=25,
              headline=False, seed=0, extended=False):
    elem = torch.empty((), dtype=dtype).element_size()
    train = pass_ == "fwd+bwd"
    sample = pvera and train
    rows = 2 * r if pvera else r

    def setup():
        g = torch.Generator(device="cpu").manual_seed(seed)

        def rnd(*shape, std=1.0, grad=False):
            return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype).requires_grad_(grad)

        x = rnd(M, K, grad=train)
        W, b = rnd(N, K, std=K ** -0.5), rnd(N, std=0.02)
        A, B = rnd(rows, K, std=K ** -0.5), rnd(N, r, std=r ** -0.5)
        ld, lb = rnd(rows, std=0.1, grad=train), rnd(N, grad=train)  # λ_b non-zero (PEFT inits it to 0: same cost)
        gout = rnd(M, N) if train else None
        grads = [x, ld, lb] if train else []

        from pyhappy.ops import pvera_linear, vera_linear

        def ours():
            if pvera:
                return pvera_linear(x, W, b, A, B, ld, lb, sample=sample)
            return vera_linear(x, W, b, A, B, ld, lb)

        def peft():
            if not pvera:
                return F.linear(x, W, b) + lb * F.linear(ld * F.linear(x, A), B)
            mu, logvar = (ld * F.linear(x, A)).chunk(2, dim=-1)
            h = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
            return F.linear(x, W, b) + lb * F.linear(h, B)

        def base():
            return F.linear(x, W, b)

        def variant(f):
            if not train:
                def fn():
                    with torch.no_grad():
                        return f()
            else:
                def fn():
                    y = f()
                    y.backward(gout)
                    return (y.detach(), x.grad) + ((ld.grad, lb.grad) if f is not base else ())
            return Variant(fn, grads)

        fns = {"pyhappy": ours, "peft": peft, "base": base}
        return {k: variant(fns[k]) for k in VARIANTS}

    kind = "pvera" if pvera else "vera"
    shape = f"{kind} M={M} K={K} N={N} r={r}"
    return Case(
        op=FAMILY, shape=shape, params={"kind": kind, "M": M, "K": K, "N": N, "r": r},
        dtype=dtype, pass_=pass_, variants=VARIANTS, setup=setup, work=_work(M, K, N, r, pass_, elem, pvera),
        same_result=() if sample else ("peft",), budget_s=budget_s, min_rounds=min_rounds, max_rounds=max_rounds,
        headline=headline, extended=extended,
    )


def cases(device, quick):
    f32 = torch.float32
    if quick:
        return [make_case(device, 64, 1024, 1024, 64, f32, "fwd+bwd", budget_s=0.5, headline=True),
                make_case(device, 64, 1024, 1024, 64, f32, "fwd+bwd", pvera=True, budget_s=0.5, headline=True)]
    M = 512 if device.type == "cpu" else 4096
    out = []
    for pvera in (False, True):
        out.append(make_case(device, M, 4096, 4096, 256, f32, "fwd+bwd", pvera=pvera, budget_s=24.0, min_rounds=9,
                             max_rounds=60, headline=True))
        out.append(make_case(device, M, 4096, 4096, 256, f32, "fwd", pvera=pvera, budget_s=6.0))
    out.append(make_case(device, 1, 4096, 4096, 256, f32, "fwd", budget_s=2.0, extended=True))
    return out


def summary(results, device):
    """What this run measured at the headline shapes (lines), and the target checks (dicts, JSON only)."""
    lines = []
    M = 512 if device.type == "cpu" else 4096
    for kind, goal in (("vera", 1.10), ("pvera", 1.12)):
        r = find_result(results, kind=kind, M=M, K=4096, N=4096, r=256, dtype="float32", **{"pass": "fwd+bwd"})
        if r is None:
            continue
        v = r["ratios"]["base"]["paired_median"]
        what = f"{device.type.upper()} {kind} fwd+bwd M={M} K=N=4096 r=256 fp32"
        lines.append(f"{what}: {compare(v, 'the base linear alone', 'pyhappy')}; "
                     f"{compare(r['paired']['pyhappy/peft'], 'peft')}")
        lines.append(target(f"{what}: pyhappy/base", v, "<=", goal))
    return lines


__all__ = ["FAMILY", "backend_of", "cases", "make_case", "summary"]
