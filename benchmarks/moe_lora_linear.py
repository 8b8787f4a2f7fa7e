"""Benchmark family ``moe_lora_linear``: pyhappy's fused mixture of LoRA experts against the per-expert
Python loop every public implementation runs, against the fused LoRA of the same active rank, and
against the base linear alone, in one process on the same inputs.

Variants (every case):
  pyhappy     ``pyhappy.ops.moe_lora_linear`` on the device's default backend (cpp on CPU, triton on CUDA)
  loop        the per-expert loop: ``F.linear`` base, router logits x Rᵀ, softmax in fp32, ``topk``,
              renormalised gates, then per expert ``index_select`` of its tokens, two ``F.linear``
              products, the gate scale and ``index_add`` into y (the MoE-LoRA pattern of MoA / MoSA /
              SEMA code)
  fused_lora  ``pyhappy.ops.lora_linear`` with rank k·r: the dense LoRA whose active rank per token is
              the mixture's (what a token sees), the cost the mixture's routing should add little to
  base        ``F.linear(x, W, b)``: the frozen base layer alone
Passes: fwd (under torch.no_grad) and fwd+bwd (x, the router and the experts require grad, W and b
frozen; ``y.backward(g)`` with a fixed g; grads reset to None before every call).
Shapes: a 7B model's attention projection, K = N = 4096, E = 8 experts, top-2, r = 16 each; the
decode case M = 1 (forward, weights rotated so the cache does not serve them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import Case, Rotation, Variant, compare, decode_copies, find_result, seeded_rnd, target

FAMILY = "moe_lora_linear"
VARIANTS = ("pyhappy", "loop", "fused_lora", "base")
DECODE_M = 64  # at or below this many rows, weights are rotated so the cache does not serve them


def backend_of(device, dtype):
    from pyhappy import backends

    return backends.select(FAMILY, device, dtype)


def _work(M, K, N, E, k, r, pass_, elem):
    """(flops, bytes) of each variant's computation (minimal: operands read and results written once)."""
    base_f = 2 * M * K * N
    router_f = 2 * M * K * E
    adapter_f = 2 * M * k * r * (K + N)
    base_b = M * K + N * K + N + M * N
    moe_b = E * K + E * r * (K + N)
    lora_b = k * r * (K + N)
    if pass_ == "fwd+bwd":
        base_f *= 2
        router_f *= 3
        adapter_f *= 3
        base_b += M * N + M * K
        moe_b *= 2
        lora_b *= 2
    moe = (base_f + router_f + adapter_f, (base_b + moe_b) * elem)
    return {"pyhappy": moe, "loop": moe, "fused_lora": (base_f + adapter_f, (base_b + lora_b) * elem),
            "base": (base_f, base_b * elem)}


def make_case(device, M, K, N, E, k, r, dtype, pass_, *, budget_s=4.0, min_rounds=5, max_rounds=25, headline=False,
              extended=False, seed=0):
    elem = torch.empty((), dtype=dtype).element_size()
    scaling = 2.0  # alpha / r with alpha = 2 r
    copy_bytes = (N * K + N + E * K + E * r * (K + N) + k * r * (K + N)) * elem
    n_copies, note = decode_copies(M, DECODE_M, copy_bytes, device, "W,b,R,A,B (and the LoRA's)")
    train = pass_ == "fwd+bwd"

    def setup():
        rnd = seeded_rnd(device, dtype, seed)

        x = rnd(M, K, grad=train)
        copies = [
            (rnd(N, K, std=K**-0.5), rnd(N, std=0.02), rnd(E, K, std=K**-0.5, grad=train),
             rnd(E, r, K, std=K**-0.5, grad=train), rnd(E, N, r, std=r**-0.5, grad=train),
             rnd(k * r, K, std=K**-0.5, grad=train), rnd(N, k * r, std=r**-0.5, grad=train))
            for _ in range(n_copies)
        ]
        gout = rnd(M, N) if train else None
        trained = [x] + [t for c in copies for t in c[2:]] if train else []

        from pyhappy.ops import lora_linear, moe_lora_linear

        def fused(W, b, R, A, B, LA, LB):
            return moe_lora_linear(x, W, b, R, A, B, k, scaling)

        def loop(W, b, R, A, B, LA, LB):
            y = F.linear(x, W, b)
            probs = torch.softmax(F.linear(x, R).float(), dim=-1)
            gates, idx = probs.topk(k, dim=-1)
            gates = gates / gates.sum(-1, keepdim=True)
            for e in range(E):
                tok, slot = (idx == e).nonzero(as_tuple=True)
                if tok.numel() == 0:
                    continue
                h = F.linear(F.linear(x.index_select(0, tok), A[e]), B[e])
                y = y.index_add(0, tok, h * (scaling * gates[tok, slot]).to(h.dtype)[:, None])
            return y

        def fused_lora(W, b, R, A, B, LA, LB):
            return lora_linear(x, W, b, LA, LB, scaling)

        def base(W, b, R, A, B, LA, LB):
            return F.linear(x, W, b)

        rot = Rotation(copies)  # one cycle for every variant: no call finds the copy the last one read

        def variant(f):
            if not train:
                def fn():
                    with torch.no_grad():
                        return f(*rot.next())
            else:
                def fn():
                    c = rot.next()
                    y = f(*c)
                    y.backward(gout)
                    return y.detach(), x.grad
            return Variant(fn, trained)

        fns = {"pyhappy": fused, "loop": loop, "fused_lora": fused_lora, "base": base}
        return {n: variant(fns[n]) for n in VARIANTS}

    shape = f"M={M} K={K} N={N} E={E} k={k} r={r}"
    return Case(
        op=FAMILY, shape=shape, params={"M": M, "K": K, "N": N, "E": E, "k": k, "r": r}, dtype=dtype, pass_=pass_,
        variants=VARIANTS, setup=setup, work=_work(M, K, N, E, k, r, pass_, elem), same_result=("loop",),
        budget_s=budget_s, min_rounds=min_rounds, max_rounds=max_rounds, headline=headline, note=note,
        extended=extended,
    )


def cases(device, quick):
    f32, bf16 = torch.float32, torch.bfloat16
    if quick:
        K = N = 1024
        return [
            make_case(device, 64, K, N, 8, 2, 16, f32, "fwd", budget_s=0.5, headline=True),
            make_case(device, 64, K, N, 8, 2, 16, f32, "fwd+bwd", budget_s=0.8, headline=True),
            make_case(device, 1, K, N, 8, 2, 16, f32, "fwd", budget_s=0.3),
        ]
    out = []
    if device.type == "cpu":
        # The target case first: M=512, K=N=4096, E=8, top-2, r=16, fp32, fwd+bwd.
        out.append(make_case(device, 512, 4096, 4096, 8, 2, 16, f32, "fwd+bwd", budget_s=16.0, min_rounds=9,
                             max_rounds=60, headline=True))
        out.append(make_case(device, 512, 4096, 4096, 8, 2, 16, f32, "fwd", budget_s=6.0, min_rounds=5))
        # Decode: one token, forward (bandwidth-bound; weights rotated out of the cache).
        out.append(make_case(device, 1, 4096, 4096, 8, 2, 16, f32, "fwd", budget_s=2.0, headline=True))
        out.append(make_case(device, 16, 4096, 4096, 8, 2, 16, f32, "fwd+bwd", budget_s=3.0, extended=True))
        # The soft mixture (top_k = E) and bf16.
        out.append(make_case(device, 512, 4096, 4096, 4, 4, 8, f32, "fwd+bwd", budget_s=10.0, extended=True))
        out.append(make_case(device, 512, 4096, 4096, 8, 2, 16, bf16, "fwd+bwd", budget_s=8.0, extended=True))
        return out
    for dtype in (bf16, f32):
        for M in (1, 512, 4096):
            for p in ("fwd", "fwd+bwd"):
                out.append(make_case(device, M, 4096, 4096, 8, 2, 16, dtype, p, headline=(M == 4096),
                                     extended=(dtype is f32 and M != 4096)))
    return out


def summary(results, device):
    """What this run measured at the target shapes (lines), and the target checks (dicts, JSON only)."""
    lines = []
    M = 512 if device.type == "cpu" else 4096
    r = find_result(results, M=M, K=4096, N=4096, E=8, k=2, r=16, dtype="float32", **{"pass": "fwd+bwd"})
    if r is not None:
        what = f"{device.type.upper()} fwd+bwd M={M} K=N=4096 E=8 top-2 r=16 fp32"
        v = r["ratios"]["fused_lora"]["paired_median"]
        speedup = 1.0 / r["ratios"]["loop"]["paired_median"]
        lines.append(f"{what}: {compare(v, 'the fused LoRA of rank 32', 'pyhappy')}; "
                     f"{compare(r['ratios']['loop']['paired_median'], 'the per-expert loop', 'pyhappy')}; "
                     f"{compare(r['ratios']['base']['paired_median'], 'the base linear alone', 'pyhappy')}")
        lines.append(target(f"{what}: pyhappy/fused_lora", v, "<=", 1.05))
        lines.append(target(f"{what}: speed-up over the per-expert loop", speedup, ">=", 1.25))
    d = find_result(results, M=1, K=4096, N=4096, E=8, k=2, r=16, dtype="float32", **{"pass": "fwd"})
    if d is not None:
        what = f"{device.type.upper()} decode fwd M=1 K=N=4096 E=8 top-2 r=16 fp32"
        v = d["ratios"]["base"]["paired_median"]
        lines.append(f"{what}: {compare(v, 'the base linear alone', 'pyhappy')}")
        lines.append(target(f"{what}: pyhappy/base", v, "<=", 1.10))
    return lines


__all__ = ["FAMILY", "backend_of", "cases", "make_case", "summary"]
