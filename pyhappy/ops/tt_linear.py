"""Tensor-train adapters (TT-LoRA / LoRETTA): factorisation, reconstruction, contraction, cost model.

Two forms of the delta on an [N, K] linear layer:

* ``lowrank`` (TT-LoRA, LoRETTA-rep): ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` with A [r, K] and B [N, r]
  each a TT tensor: A viewed as [k_1, ..., k_d, r] (K = Π k_i after padding) with cores
  [t_{i-1}, k_i, t_i] (t_0 = t_{d+1} = 1; the last core's mode is r), B likewise over N. A and B
  are tiny (r·K, N·r), so the forward rebuilds them with one chain of small matmuls and runs the
  fused ``pyhappy::lora_linear`` op: gradients flow into A/B there and into the cores through the
  chain. No [N, K] tensor exists in forward or backward.
* ``matrix`` (TT-matrix delta): ΔW[(n_1..n_d), (k_1..k_d)] = Π_i G_i[:, n_i, k_i, :] with cores
  G_i [r_{i-1}, n_i, k_i, r_i] (tensorly's TT-matrix convention). ``tt_matrix_apply`` contracts the
  input with the cores one mode at a time (never forming ΔW); ``tt_matrix_full`` reconstructs ΔW
  (for merging and inspection). ``matrix_plan`` is the cost model choosing between contraction and
  reconstruct-then-GEMM for a shape (flops of each; the reconstruction path forms [N, K], so the
  modules use it only without gradients).

``factorize(n, d)`` factors any size into d balanced factors, padding n up to the nearest size
that factors well when n itself does not (a prime hidden size, say): inputs are zero-padded and
outputs sliced, so a padded adapter computes exactly the unpadded math.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor

from .lora_linear import lora_linear

# ---- factorisation --------------------------------------------------------------------------------


def _prime_factors(n: int) -> list:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def _balanced(n: int, d: int) -> tuple:
    """n as d factors, primes placed largest-first onto the smallest running product."""
    fs = [1] * d
    for p in sorted(_prime_factors(n), reverse=True):
        i = min(range(d), key=lambda j: fs[j])
        fs[i] *= p
    return tuple(sorted(fs, reverse=True))


@functools.lru_cache(maxsize=None)
def factorize(n: int, d: int | None = None, *, max_pad: float = 0.125) -> tuple:
    """d factors (descending) of n or of the smallest m >= n (at most n·(1 + max_pad)) whose most
    balanced d-factorisation has max factor <= 2·m^(1/d) (any factorisation of m if none does).
    d defaults to round(log2(n) / 4) (factors near 16), at least 2. Returns the factors; their
    product is the padded size."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"factorize: n must be a positive int, got {n!r}")
    if d is None:
        d = max(2, round(math.log2(max(n, 2)) / 4))
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"factorize: d must be a positive int, got {d!r}")
    best, best_score = None, math.inf
    for m in range(n, n + max(1, int(n * max_pad)) + 1):
        fs = _balanced(m, d)
        score = fs[0] / m ** (1.0 / d)
        if score <= 2.0:
            return fs
        if score < best_score:
            best, best_score = fs, score
    return best


# ---- low-rank form ---------------------------------------------------------------------------------


def tt_chain(cores: Sequence[Tensor]) -> Tensor:
    """Full tensor of TT cores [t_{i-1}, m_i, t_i] (t_0 = t_d = 1), reshaped [Π m_{<d}, m_d]: the last
    mode stays a separate axis. One chain of small matmuls, left to right."""
    T = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for c in cores[1:]:
        T = (T @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[2])
    # T is [Π m_i, 1] now; split off the last mode
    return T.reshape(-1, cores[-1].shape[1])


def tt_lowrank_factors(cores_A: Sequence[Tensor], cores_B: Sequence[Tensor], K: int, N: int):
    """(A [r, K], B [N, r]) from the low-rank form's cores (padding sliced off)."""
    A = tt_chain(cores_A)[:K].t()
    B = tt_chain(cores_B)[:N]
    return A, B


def tt_lowrank_linear(x: Tensor, weight: Tensor, bias, cores_A, cores_B, scaling: float, dropout_p: float = 0.0,
                      *, seed=None) -> Tensor:
    """``x Wᵀ + b + s · ((dropout(x) Aᵀ)) Bᵀ`` with A, B rebuilt from TT cores, then the fused
    pyhappy::lora_linear op (its backward gives dA, dB; the chain carries them into the cores)."""
    N, K = weight.shape
    A, B = tt_lowrank_factors(cores_A, cores_B, K, N)
    return lora_linear(x, weight, bias, A, B, scaling, None, dropout_p, seed=seed)


# ---- TT-matrix form ----------------------------------------------------------------------------------


def tt_matrix_full(cores: Sequence[Tensor], N: int | None = None, K: int | None = None) -> Tensor:
    """Dense ΔW [N, K] of TT-matrix cores [r_{i-1}, n_i, k_i, r_i] (padding sliced off)."""
    d = len(cores)
    ns = [c.shape[1] for c in cores]
    ks = [c.shape[2] for c in cores]
    T = cores[0].reshape(ns[0] * ks[0], cores[0].shape[3])
    for c in cores[1:]:
        T = (T @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[3])
    T = T.reshape(*[v for nk in zip(ns, ks) for v in nk])  # n1 k1 n2 k2 ...
    T = T.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2)).reshape(math.prod(ns), math.prod(ks))
    return T[: N or T.shape[0], : K or T.shape[1]]


def tt_matrix_apply(x: Tensor, cores: Sequence[Tensor], N: int, K: int) -> Tensor:
    """x · ΔWᵀ [M, N] for x [M, K], contracting one mode at a time (ΔW is never formed).

    State after step i: [M, k_{i+1}..k_d, n_1..n_i, r_i] kept as [M, Π k_{>i}, Π n_{≤i}, r_i];
    step i+1 contracts (k_{i+1}, r_i) with G_{i+1} [r_i, n_{i+1}, k_{i+1}, r_{i+1}]."""
    ns = [c.shape[1] for c in cores]
    ks = [c.shape[2] for c in cores]
    Kp, Np = math.prod(ks), math.prod(ns)
    M = x.shape[0]
    if Kp != K:
        x = torch.nn.functional.pad(x, (0, Kp - K))
    # [M, k1, rest, n(=1), r0=1]
    Z = x.reshape(M, ks[0], Kp // ks[0], 1, 1)
    for i, G in enumerate(cores):
        r0, n, k, r1 = G.shape
        M_, kk, rest, nn_, rr = Z.shape  # kk == k (the mode to contract), rr == r0
        # contract (k, r0): Z [M, k, rest, nn, r0] x G [r0, n, k, r1] -> [M, rest, nn, n, r1]
        Zt = Z.permute(0, 2, 3, 1, 4).reshape(M * rest * nn_, k * r0)
        Gt = G.permute(2, 0, 1, 3).reshape(k * r0, n * r1)
        Y = (Zt @ Gt).reshape(M, rest, nn_ * n, r1)
        if i + 1 < len(cores):
            k_next = ks[i + 1]
            Z = Y.reshape(M, k_next, rest // k_next, nn_ * n, r1)
        else:
            Z = Y
    out = Z.reshape(M, Np)
    return out[:, :N]


def matrix_plan(M: int, N: int, K: int, cores_shapes) -> dict:
    """Cost model of the TT-matrix forward on top of the base product x·Wᵀ: the extra flops of
    mode-by-mode contraction vs generating ΔW slab by slab and folding it into the base GEMM.
    Returns both and the cheaper one's name."""
    ns = [s[1] for s in cores_shapes]
    ks = [s[2] for s in cores_shapes]
    Kp, Np = math.prod(ks), math.prod(ns)
    contract, rest, done = 0, Kp, 1
    for (r0, n, k, r1) in cores_shapes:
        rest //= k
        contract += 2 * M * rest * done * k * r0 * n * r1
        done *= n
    rebuild, acc = 0, 1
    for (r0, n, k, r1) in cores_shapes:
        rebuild += 2 * acc * r0 * n * k * r1
        acc *= n * k
    # The reconstruct path folds ΔW into the base GEMM slab by slab: its extra work is the rebuild
    # plus one add per weight entry (the GEMM is the base's own). Contraction's extra is its flops.
    extra = rebuild + N * K
    return {"contract": contract, "reconstruct": extra, "best": "contract" if contract <= extra else "reconstruct"}


def _slab_forward(x: Tensor, weight: Tensor, bias, cores: Sequence[Tensor], scaling: float) -> Tensor:
    """x·(W + s·ΔW)ᵀ + b with ΔW generated one row slab (fixed n_1: [N/n_1, K]) at a time and folded
    into that slab of W for one GEMM: no [N, K] temporary (inference path for large M)."""
    M, K = x.shape
    N = weight.shape[0]
    n1 = cores[0].shape[1]
    per = math.prod(c.shape[1] for c in cores) // n1
    y = x.new_empty(M, N)
    for a in range(n1):
        r0, r1 = a * per, min(N, (a + 1) * per)
        if r0 >= N:
            break
        w = weight[r0:r1] + scaling * tt_matrix_full([cores[0][:, a:a + 1], *cores[1:]])[: r1 - r0, :K]
        y[:, r0:r1] = torch.addmm(bias[r0:r1], x, w.t()) if bias is not None else x @ w.t()
    return y


def tt_matrix_linear(x: Tensor, weight: Tensor | None, bias, cores: Sequence[Tensor], scaling: float,
                     N: int | None = None) -> Tensor:
    """``x Wᵀ + b + s · x ΔWᵀ`` with ΔW in TT-matrix form. With gradients: contraction (no [N, K]
    tensor in forward or backward). Without: the cost model's cheaper path (large M: ΔW generated
    slab by slab inside the base GEMM, _slab_forward).

    Measured on CPU and left as is (M=512, 4096², tt_rank 4): a slab-GEMM backward (dL/dΔW per slab
    back through the slab's generation chain) and a partial-contraction backward (left/right
    contractions meeting at each core) were both no faster than autograd through the contraction
    (permute copies of the [M, K·r]-sized intermediates dominate); a fused kernel is the way on."""
    lead, K = x.shape[:-1], x.shape[-1]
    N = weight.shape[0] if weight is not None else N
    x2 = x.reshape(-1, K)
    cs = [c.to(x.dtype) if c.dtype != x.dtype else c for c in cores]
    grads = torch.is_grad_enabled() and (x.requires_grad or any(c.requires_grad for c in cores))
    if not grads and weight is not None and \
            matrix_plan(x2.shape[0], N, K, [tuple(c.shape) for c in cs])["best"] == "reconstruct":
        y = _slab_forward(x2, weight, bias, cs, scaling)
    else:
        d = scaling * tt_matrix_apply(x2, cs, N, K)
        if weight is not None:
            y = torch.nn.functional.linear(x2, weight, bias) + d
        else:
            y = d + bias if bias is not None else d
    return y.reshape(*lead, N)
