"""Benchmark family ``lora_linear_multi``: one batch served by many LoRA adapters (inference).

Variants:
  pyhappy    ``pyhappy.ops.lora_linear_multi``: base GEMM shared, low-rank part in one op call
  peft_loop  PEFT's mixed-batch forward: base(x), then per adapter present a masked sub-batch
             through B(A(x_sub))·s added back (what ``model(..., adapter_names=[...])`` runs)
  base       F.linear alone (the floor)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import Case, Variant, compare, find_result

FAMILY = "lora_linear_multi"
VARIANTS = ("pyhappy", "peft_loop", "base")


def case(device, M, K, N, n_adapters, r, dtype=torch.float32, *, budget_s=4.0, headline=False, seed=0):
    elem = torch.empty((), dtype=dtype).element_size()

    def setup():
        from pyhappy.ops import lora_linear_multi, stack_adapters

        g = torch.Generator().manual_seed(seed)
        W = (torch.randn(N, K, generator=g) * K**-0.5).to(dtype).to(device)
        pairs = [((torch.randn(r, K, generator=g) * K**-0.5).to(dtype).to(device),
                  (torch.randn(N, r, generator=g) * 0.01).to(dtype).to(device)) for _ in range(n_adapters)]
        A, B = stack_adapters(pairs, device=device)
        s = torch.full((n_adapters,), 2.0, device=device)
        x = torch.randn(M, K, generator=g).to(dtype).to(device)
        idx = (torch.arange(M) % n_adapters).to(device)  # every adapter present, rows interleaved

        def peft_loop():
            y = F.linear(x, W)
            for a in idx.unique().tolist():
                mask = idx == a
                y[mask] += F.linear(F.linear(x[mask], pairs[a][0]), pairs[a][1]) * 2.0
            return y

        def nograd(f):
            def fn():
                with torch.no_grad():
                    return f()
            return Variant(fn)

        return {"pyhappy": nograd(lambda: lora_linear_multi(x, W, None, A, B, s, idx)),
                "peft_loop": nograd(peft_loop), "base": nograd(lambda: F.linear(x, W))}

    f = 2 * M * K * N + 2 * M * r * (K + N)
    io = (M * K + M * N + N * K) * elem
    ab = n_adapters * r * (K + N) * elem
    work = {"pyhappy": (f, io + ab), "peft_loop": (f, io + ab), "base": (2 * M * K * N, io)}
    return Case(op=FAMILY, shape=f"M={M} K={K} N={N} adapters={n_adapters} r={r}",
                params={"M": M, "K": K, "N": N, "adapters": n_adapters, "r": r}, dtype=dtype, pass_="fwd",
                variants=VARIANTS, setup=setup, work=work, budget_s=budget_s, headline=headline,
                same_result=("peft_loop",))


def cases(device, quick):
    if device.type == "cuda":
        bf16 = torch.bfloat16
        if quick:
            return [case(device, 16, 1024, 1024, 4, 16, bf16, headline=True)]
        return [case(device, 16, 4096, 4096, 16, 16, bf16, headline=True), case(device, 512, 4096, 4096, 8, 16, bf16)]
    if device.type != "cpu":
        return []
    if quick:
        return [case(device, 8, 256, 256, 4, 8, budget_s=0.3, headline=True)]
    return [case(device, 16, 4096, 4096, 16, 16, headline=True), case(device, 64, 4096, 4096, 8, 16),
            case(device, 512, 4096, 4096, 8, 16, budget_s=6.0)]


def summary(results, device):
    lines = []
    for M in (16, 64, 512):
        r = find_result(results, M=M, K=4096)
        if r is not None:
            lines.append(f"M={M}, {r['params']['adapters']} adapters r=16: "
                         f"{compare(r['ratios']['peft_loop']['paired_median'], 'the PEFT-style masked loop', 'pyhappy')}, "
                         f"{compare(r['ratios']['base']['paired_median'], 'the base linear alone')}")
    return lines


__all__ = ["FAMILY", "cases", "summary"]
