"""Benchmark family ``tt_linear``: tensor-train adapters against LoRA and the materialising approach.

fwd+bwd (x and the adapter take gradients, W frozen), K=N=4096 factored 16x16x16:
  pyhappy_lowrank   TTLinear form="lowrank" (TT-LoRA / LoRETTA-rep), tt_rank 4, r=8: A/B rebuilt by
                    one chain of small matmuls, then the fused pyhappy::lora_linear op
  pyhappy_matrix    TTLinear form="matrix", tt_rank 4 (the op pyhappy::tt_linear): forward by mode-by-mode
                    contraction (small M) or ΔW slabs folded into the base GEMM (large M); backward by
                    environment contraction in the C++ kernels; no [N, K] tensor
  lora_r8           pyhappy LoRALinear r=8 (fused; the reference point for "within 1.2x")
  tensordot_lowrank what public TT-LoRA code does: A, B materialised with tensordot chains, then
                    base(x) + (x Aᵀ) Bᵀ unfused
  tensordot_matrix  ΔW materialised from the TT-matrix cores (tensordot chain, [N, K]), F.linear(x, W + ΔW)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Case, Variant, compare, target

FAMILY = "tt_linear"
VARIANTS = ("pyhappy_lowrank", "pyhappy_matrix", "lora_r8", "tensordot_lowrank", "tensordot_matrix")


def _tensordot_chain(cores):
    T = cores[0]
    for c in cores[1:]:
        T = torch.tensordot(T, c, dims=([T.dim() - 1], [0]))
    return T


def _tensordot_matrix(cores, N, K):
    d = len(cores)
    T = _tensordot_chain(cores)  # [1, n1, k1, n2, k2, ..., 1]
    T = T.reshape(*T.shape[1:-1])
    return T.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2)).reshape(N, K)


def train_case(device, M, K, N, dtype=torch.float32, *, budget_s=12.0, headline=False, seed=0):
    elem = torch.empty((), dtype=dtype).element_size()

    def setup():
        from pyhappy.nn import LoRALinear, TTLinear

        torch.manual_seed(seed)
        lin = nn.Linear(K, N, device=device, dtype=dtype)
        low = TTLinear.from_linear(lin, tt_rank=4, form="lowrank", r=8, alpha=16)
        mat = TTLinear.from_linear(lin, tt_rank=4, form="matrix")
        lora = LoRALinear.from_linear(lin, r=8, alpha=16)
        with torch.no_grad():
            for p in [*low.tt_cores_B, *mat.tt_cores, lora.lora_B.weight]:
                p.normal_(std=0.02)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(M, K, generator=g).to(dtype).to(device).requires_grad_()
        gout = torch.randn(M, N, generator=g).to(dtype).to(device)

        def tensordot_lowrank():
            A = _tensordot_chain(list(low.tt_cores_A)).reshape(K, 8).t()
            B = _tensordot_chain(list(low.tt_cores_B)).reshape(N, 8)
            return F.linear(x, lin.weight, lin.bias) + F.linear(F.linear(x, A), B) * low.scaling

        def tensordot_matrix():
            return F.linear(x, lin.weight + _tensordot_matrix(list(mat.tt_cores), N, K), lin.bias)

        def run(f, params):
            def fn():
                y = f()
                y.backward(gout)
                return (y.detach(), x.grad)
            return Variant(fn, [x, *params])

        return {
            "pyhappy_lowrank": run(lambda: low(x), list(low.tt_cores_A) + list(low.tt_cores_B)),
            "pyhappy_matrix": run(lambda: mat(x), list(mat.tt_cores)),
            "lora_r8": run(lambda: lora(x), [lora.lora_A.weight, lora.lora_B.weight]),
            "tensordot_lowrank": run(tensordot_lowrank, list(low.tt_cores_A) + list(low.tt_cores_B)),
            "tensordot_matrix": run(tensordot_matrix, list(mat.tt_cores)),
        }

    dense = 2 * (2 * M * K * N)
    io = (2 * M * K + 2 * M * N + N * K) * elem
    lo = dense + 3 * 2 * M * 8 * (K + N)
    work = {"pyhappy_lowrank": (lo, io), "pyhappy_matrix": (dense, io), "lora_r8": (lo, io),
            "tensordot_lowrank": (lo, io), "tensordot_matrix": (dense + 2 * M * N * K, io + 2 * N * K * elem)}
    return Case(op=FAMILY, shape=f"M={M} K={K} N={N} tt_rank=4", params={"M": M, "K": K, "N": N, "kind": "train"},
                dtype=dtype, pass_="fwd+bwd", variants=VARIANTS, setup=setup, work=work, budget_s=budget_s,
                min_rounds=5, max_rounds=25, headline=headline)


def cases(device, quick):
    if device.type == "cuda":
        if quick:
            return [train_case(device, 512, 1024, 1024, torch.bfloat16, headline=True)]
        return [train_case(device, 4096, 4096, 4096, torch.bfloat16, headline=True),
                train_case(device, 512, 4096, 4096, torch.bfloat16)]
    if device.type != "cpu":
        return []
    if quick:
        return [train_case(device, 32, 256, 256, budget_s=0.5, headline=True)]
    return [train_case(device, 512, 4096, 4096, headline=True), train_case(device, 64, 4096, 4096, budget_s=6.0)]


def summary(results, device):
    lines = []
    for r in results:
        if "error" in r or r["params"].get("K") != 4096:
            continue
        rt = r["ratios"]
        lines.append(
            f"{r['shape']}: TT lowrank {compare(rt['lora_r8']['paired_median'], 'LoRA r=8')}, "
            f"{compare(rt['tensordot_lowrank']['paired_median'], 'tensordot_lowrank')}; TT matrix "
            f"{compare(r['paired']['pyhappy_matrix/lora_r8'], 'LoRA r=8')}, "
            f"{compare(r['paired']['pyhappy_matrix/tensordot_matrix'], 'tensordot_matrix')}")
        lines += [target(f"{'CUDA ' if device.type == 'cuda' else ''}{r['shape']} {r['dtype']}: lowrank/lora_r8", rt["lora_r8"]["paired_median"], "<=", 1.2),
                  target(f"{'CUDA ' if device.type == 'cuda' else ''}{r['shape']} {r['dtype']}: lowrank speed-up over tensordot", 1 / rt["tensordot_lowrank"]["paired_median"], ">=", 2)]
    from pyhappy.nn import TTLinear

    lin = nn.Linear(4096, 4096, device="meta")
    low = TTLinear.from_linear(lin, tt_rank=4, form="lowrank", r=8).num_adapter_parameters()
    mat = TTLinear.from_linear(lin, tt_rank=4, form="matrix").num_adapter_parameters()
    lines.append(f"trainable parameters at 4096²: LoRA r=8 {8 * 8192:,}; TT lowrank (tt_rank 4, r=8) {low:,} "
                 f"({8 * 8192 / low:.0f}x fewer); TT matrix (tt_rank 4) {mat:,} "
                 f"({8 * 8192 / mat:.1f}x fewer)")
    return lines


__all__ = ["FAMILY", "cases", "summary"]
