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
  (for merging and inspection). The op ``pyhappy::tt_linear`` (``tt_matrix_linear``) runs the
  whole layer: ``matrix_plan``, the cost model, picks contraction (small M) or ΔW generated slab by
  slab inside the base GEMM (large M) for the forward; the backward is an environment contraction
  (core gradients and the delta's share of dx together; see the op's notes below), its batched
  products in C++ (csrc/cpu/tt_linear.cpp) for fp32 on the CPU. No [N, K] tensor either way,
  except where the measured CPU dispatch finds the unfused formulation of public TT code (ΔW
  materialised, one GEMM on W + s·ΔW) faster: small layers. (Timing that candidate at a key's
  first call materialises ΔW, and in the backward its gradient, once.) At layers whose passes take
  under ``_tune.WHOLE_CALL_US``, a training call's whole step is also timed against that
  formulation's (the op's Python layers are a share of such a step); where it wins, it serves the
  layer's training calls, and autograd keeps its W + s·ΔW until the backward, as in public TT code.

``factorize(n, d)`` factors any size into d balanced factors, padding n up to the nearest size
that factors well when n itself does not (a prime hidden size, say): inputs are zero-padded and
outputs sliced, so a padded adapter computes exactly the unpadded math.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _ext, backends
from .._tune import (arg_signature, bucket, cached_pick, call_signature, pick_hit, products, remember_pick,
                     run_pick, unfused_call)
from ._checks import (check_float_input, check_grad_out, check_in_features, check_tensor, finite_number,
                      select_backend)
from ._eager import body
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
    T = _rest_full(cores, cores[0].shape[0], cores[0])  # [1, Np, Kp]: the leading rank is 1
    Np, Kp = T.shape[1], T.shape[2]
    T = T.reshape(Np, Kp)
    if (N or Np) < Np or (K or Kp) < Kp:  # padded: slice (a view autograd tracks only where needed)
        T = T[: N or Np, : K or Kp]
    return T


def _backend(x: Tensor) -> str:
    """'cpp' (CPU: the C++ kernels of csrc/cpu/tt_linear.cpp for the batched products, fp32; torch's
    bmm for bf16), 'triton' (the fused kernels of triton_kernels/tt_linear.py where the shapes allow,
    torch ops otherwise) or 'reference' (torch ops), as backends.select picks for tt_linear."""
    return select_backend("tt_linear", x, "tt_env_backward_cpu")


def _lowp_fp32(x: Tensor, N: int, backend: str) -> bool:
    """Whether the op runs a bf16/fp16 x in fp32 under the cpp backend: where the C++ ops' products go
    through fp32 blocks (csrc/cpu/gemm.h: a CPU without native bf16/fp16 dot products, or
    PYHAPPY_LOWP_GEMM=fp32), judged for the base product x·Wᵀ."""
    if backend != "cpp" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    return bool(_ext.load().gemm_via_fp32(x, N, True))


def _cpp(t: Tensor, backend: str) -> bool:
    """Whether the C++ kernels serve the batched products for t (fp32 under the cpp backend). They
    have no autograd: only the op bodies (below autograd) use them."""
    return backend == "cpp" and t.dtype == torch.float32


def _fused(R: Tensor):
    """The Triton kernel module when its kernels serve R's tiles, else None."""
    tk = backends.triton_module("tt_linear")
    return tk if tk.supports(R) else None


def _bapply(Gm: Tensor, V: Tensor) -> Tensor:
    """Gm [P, Q] applied to every [Q, S] matrix of V [B, Q, S] -> [B, P, S] (one GEMM when S is 1)."""
    B, Q, S = V.shape
    if S == 1:
        return (V.reshape(B, Q) @ Gm.t()).reshape(B, Gm.shape[0], 1)
    return torch.bmm(Gm.expand(B, *Gm.shape), V)


def _bpair(F: Tensor, Z: Tensor) -> Tensor:
    """Σ_{b,s} F[b, p, s] Z[b, q, s] -> [P, Q] for F [B, P, S], Z [B, Q, S]."""
    B, P, S = F.shape
    Q = Z.shape[1]
    if S == 1:
        return F.reshape(B, P).t() @ Z.reshape(B, Q)
    if B * P * Q <= F.numel() + Z.numel():  # per-b products, summed: the [B, P, Q] stack is small
        return torch.bmm(F, Z.transpose(1, 2)).sum(0)
    return F.transpose(0, 1).reshape(P, B * S) @ Z.transpose(1, 2).reshape(B * S, Q)


def _k_chain(x: Tensor, cores: Sequence[Tensor], upto: int | None = None) -> list:
    """States Z_0..Z_upto (default all d) of contracting x [M, Kp] with the cores' k modes, first to
    last: Z_i = Σ_{k≤i} x·G_1..G_i laid out [(m, n_1..n_i), r_i, (k_{i+1}..k_d)], so every step is
    one batched product (the contracted (r_i, k_{i+1}) adjacent, no permute of a state) and Z_d is
    x·ΔWᵀ as [(m, n_1..n_d), 1, 1]."""
    Z = [x.reshape(x.shape[0], 1, x.shape[1])]
    for G in cores[: len(cores) if upto is None else upto]:
        r, n, k, r1 = G.shape
        B, _, S = Z[-1].shape
        out = _bapply(G.permute(1, 3, 0, 2).reshape(n * r1, r * k), Z[-1].reshape(B, r * k, S // k))
        Z.append(out.reshape(B * n, r1, S // k))
    return Z


def _n_chain(d: Tensor, cores: Sequence[Tensor], downto: int = 0) -> list:
    """States F_d..F_downto (list indexed by i; None below downto) of contracting d [M, Np] with the
    cores' n modes, last to first: F_i = Σ_{n>i} d·G_{i+1}..G_d laid out like Z_i,
    [(m, n_1..n_i), r_i, (k_{i+1}..k_d)]; F_0 is d·ΔW as [m, 1, Kp]."""
    F = [None] * (len(cores) + 1)
    F[-1] = d.reshape(-1, 1, 1)
    for i in range(len(cores), downto, -1):
        r, n, k, r1 = cores[i - 1].shape
        B, _, S = F[i].shape
        out = _bapply(cores[i - 1].permute(0, 2, 1, 3).reshape(r * k, n * r1), F[i].reshape(B // n, n * r1, S))
        F[i - 1] = out.reshape(B // n, r, k * S)
    return F


def tt_matrix_apply(x: Tensor, cores: Sequence[Tensor], N: int, K: int) -> Tensor:
    """x · ΔWᵀ [M, N] for x [M, K], contracting one mode at a time (ΔW is never formed; see _k_chain).
    torch ops (autograd works); the op's fp32 CPU body runs the same chain in C++ (tt_contract_cpu)."""
    Kp = math.prod([c.shape[2] for c in cores])
    Np = math.prod([c.shape[1] for c in cores])
    if Kp != K:
        x = torch.nn.functional.pad(x, (0, Kp - K))
    return _k_chain(x.contiguous(), cores)[-1].reshape(x.shape[0], Np)[:, :N]


def matrix_plan(M: int, N: int, K: int, cores_shapes, slab_cost: Optional[float] = None) -> dict:
    """Cost model of the TT-matrix forward on top of the base product x·Wᵀ: the extra flops of
    mode-by-mode contraction vs generating ΔW slab by slab and folding it into the base GEMM.
    slab_cost: flop-equivalents of one weight entry's pass in the slab forward (default: what was
    measured for the fp32 GEMM engine in use, _slab_flops_per_entry). Returns both costs and the
    cheaper one's name."""
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
    # plus a memory-bound pass per weight entry (read W, write W + s·ΔW, which the GEMM reads back:
    # ~12 bytes, about the time of _SLAB_FLOPS_PER_ENTRY flops here). Contraction's extra is its flops.
    extra = rebuild + (_slab_flops_per_entry() if slab_cost is None else slab_cost) * N * K
    return {"contract": contract, "reconstruct": extra, "best": "contract" if contract <= extra else "reconstruct"}


# Flop-equivalents of one weight entry's pass in the slab forward (matrix_plan), by the engine of the
# C++ ops' fp32 GEMM (csrc/cpu/gemm.h): they put the crossover between the contraction in C++ and the
# slab forward where each engine's measurements put it (near 200 rows on MKL, near 1024 on oneDNN,
# which runs the GEMM much faster while the slab pass, a read and a write of W, does not get
# faster). Figures: benchmarks/README.md, "Design measurements", "TT-matrix slab forward".
_SLAB_FLOPS_PER_ENTRY = {"aten": 32, "onednn": 192}


def _slab_flops_per_entry() -> float:
    ext = _ext.load()
    return _SLAB_FLOPS_PER_ENTRY["onednn" if ext is not None and ext.fp32_gemm() == "onednn" else "aten"]


# The TT-matrix op, pyhappy::tt_linear.
#   forward, large M: split ΔW at its first core: with L = G_1 [n_1, k_1, r_1] and R [r_1, N', K']
#     the full TT-matrix of the other cores (a free leading rank index; N = n_1·N', K = k_1·K' after
#     padding), ΔW[(a, i), (b, j)] = Σ_t L[a, b, t] R[t, i, j]; R (262k entries at 4096², 16³, rank 4)
#     is built once, and ΔW is generated one row slab (fixed a: [N', K]) at a time and folded into
#     that slab of W for one GEMM, x·(W_a + s·ΔW_a)ᵀ. Small M: mode-by-mode contraction (_k_chain),
#     as the cost model (matrix_plan) picks.
#   backward: dx = dy·W + s·dy·ΔW and the core gradients by environment contraction (_env_backward):
#     the x-side states Z_i (cores 1..i applied to x) and the dy-side states F_i (cores i+1..d
#     applied to s·dy) share one layout, so dG_i is one batched pair product of Z_{i-1} and F_i and
#     F_0 is s·dy·ΔW. ~4.3 GFLOP of small batched products at M=512, 4096², tt_rank 4 (a Kronecker
#     split, [M·n_1, N'] x [N', r·K'] twice, would need 9.1 GFLOP), run in row chunks whose
#     states stay in cache. No [N, K] buffer and no permute of a state.


def _nk_order(d: int) -> tuple:
    """The permutation taking [r, n_1, k_1, ..., n_d, k_d] to [r, n_1..n_d, k_1..k_d]."""
    return (0, *range(1, 2 * d + 1, 2), *range(2, 2 * d + 1, 2))


def _rest_full(rest: Sequence[Tensor], r: int, like: Tensor) -> Tensor:
    """R [r, Π n, Π k] of TT-matrix cores [r_{i-1}, n_i, k_i, r_i] with the leading rank r left free
    (the trailing rank is 1); all ones [1, 1, 1] for no cores."""
    if not rest:
        return like.new_ones(1, 1, 1)
    ns = [c.shape[1] for c in rest]
    ks = [c.shape[2] for c in rest]
    T = rest[0].reshape(-1, rest[0].shape[3])
    for c in rest[1:]:
        T = (T @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[3])
    T = T.reshape(r, *[v for nk in zip(ns, ks) for v in nk])
    return T.permute(*_nk_order(len(rest))).reshape(r, math.prod(ns), math.prod(ks))


def _split(cores: Sequence[Tensor]):
    """(L [n_1, k_1, r_1], R [r_1, N', K'])."""
    L = cores[0][0]
    return L, _rest_full(cores[1:], L.shape[2], L)


def _slab_weights(weight, L: Tensor, R: Tensor, scaling: float, N: int, K: int):
    """(r0, r1, rows [r0, r1) of W + s·ΔW (of s·ΔW for weight None), columns [0, K)) for each row slab
    of ΔW, in L's dtype (a bf16 weight's slab is converted as it is read), where slab a is
    Σ_t L[a, :, t] ⊗ R[t]: row i of the slab is L[a] · R[:, i] ([k_1, r] x [r, K'], laid out
    [k_1, K']), so a slab is one batched product straight into W's layout (fused with the add of W
    when the slab is not padded)."""
    n1, k1, r = L.shape
    Rp = R.permute(1, 0, 2).contiguous()  # [N', r, K']
    Np_, Kp_ = Rp.shape[0], Rp.shape[2]
    for a in range(n1):
        r0, r1 = a * Np_, min(N, (a + 1) * Np_)
        if r0 >= N:
            break
        La = L[a].expand(Np_, k1, r)
        if weight is not None and r1 - r0 == Np_ and k1 * Kp_ == K:
            w = torch.baddbmm(weight[r0:r1].reshape(Np_, k1, Kp_).to(L.dtype), La, Rp, alpha=scaling).reshape(Np_, K)
        else:
            d = torch.bmm(La, Rp).reshape(Np_, k1 * Kp_)[: r1 - r0, :K]
            w = d * scaling if weight is None else torch.add(weight[r0:r1].to(L.dtype), d, alpha=scaling)
        yield r0, r1, w


def _slab_forward(x: Tensor, weight, bias, L: Tensor, R: Tensor, scaling: float, N: int,
                  cpp: bool = False) -> Tensor:
    """x·(W + s·ΔW)ᵀ + b with ΔW generated one row slab at a time and folded into that slab of W for
    one GEMM: no [N, K] temporary. cpp: each slab's product through the C++ ops' GEMM."""
    M, K = x.shape
    y = x.new_empty(M, N)
    for r0, r1, w in _slab_weights(weight, L, R, scaling, N, K):
        if cpp:
            y[:, r0:r1] = _base_linear(x, w, None if bias is None else bias[r0:r1], True)
        elif bias is not None:
            torch.addmm(bias[r0:r1], x, w.t(), out=y[:, r0:r1])
        else:
            torch.mm(x, w.t(), out=y[:, r0:r1])
    return y


def _row_chunk(cores: Sequence[Tensor]) -> int:
    """Rows of x per chunk of a contraction: the widest state of _k_chain / _n_chain (elements per
    row of x) times the chunk stays within _ENV_STATE_ELEMS."""
    width = 1
    nl, kr = 1, math.prod([c.shape[2] for c in cores])
    for c in cores:
        kr //= c.shape[2]
        width = max(width, nl * c.shape[0] * c.shape[2] * kr, nl * c.shape[1] * c.shape[3] * kr)
        nl *= c.shape[1]
    return max(1, _ENV_STATE_ELEMS // width)


def _base_linear(x: Tensor, weight: Tensor, bias, cpp: bool) -> Tensor:
    """x·Wᵀ + b: through the C++ ops' GEMM (column blocks, csrc/cpu/gemm.h) under the cpp backend."""
    if cpp:
        return _ext.load().gemm_addmm(bias, x, weight.t())
    return torch.nn.functional.linear(x, weight, bias)


def _contract_forward(x: Tensor, weight, bias, cores: Sequence[Tensor], scaling: float, N: int,
                      cpp: bool = False, base: Optional[Tensor] = None) -> Tensor:
    """x·Wᵀ + b + s·x·ΔWᵀ with the delta by mode-by-mode contraction in row chunks (cpp: the C++
    kernels; the op's body, no autograd). base: x·Wᵀ already computed (then weight is not read)."""
    if base is not None:
        y = base if bias is None else base.add_(bias)
    elif weight is not None:
        y = _base_linear(x, weight, bias, cpp)
    else:
        y = x.new_zeros(x.shape[0], N) if bias is None else bias.expand(x.shape[0], N).clone()
    step = _row_chunk(cores)
    if cpp:  # the whole chunk loop in C++, chunks in parallel
        torch.ops.pyhappy.tt_contract_cpu(x, list(cores), float(scaling), y, step)
        return y
    for m0 in range(0, x.shape[0], step):
        y[m0:m0 + step].add_(tt_matrix_apply(x[m0:m0 + step], cores, N, x.shape[1]), alpha=scaling)
    return y


def _env_backward(x: Tensor, dy: Tensor, cores: Sequence[Tensor], scaling: float, need_dx: bool, cpp: bool,
                  base: Optional[Tensor] = None):
    """(s·dy·ΔW [M, K] (base + that when base, a contiguous fp32 [M, K], is given: computed in
    place there) or None, d(loss)/d(cores)) for y = s·x·ΔWᵀ: environment contraction, chunked
    over rows. dG_i pairs the x-side state Z_{i-1} with the dy-side state F_i (same layout, see
    _k_chain/_n_chain): Σ over (m, n_{<i}, k_{>i}) of Z_{i-1}[.., (r_{i-1} k_i), ..] F_i[.., (n_i r_i), ..].
    F_0 is dy·ΔW, so the delta's share of dx comes with it. Rows go in chunks whose states stay in
    cache; the core gradients accumulate in fp32."""
    M, K = x.shape
    chunk = _row_chunk(cores)
    if cpp:  # fp32: the whole chunk loop in C++ (tt_env_backward_cpu), chunks in parallel
        gx, *grads = torch.ops.pyhappy.tt_env_backward_cpu(x, dy, list(cores), float(scaling), need_dx, chunk,
                                                           base if need_dx else None)
        return (None if not need_dx else gx if base is None else base), grads
    Kp = math.prod([c.shape[2] for c in cores])
    Np = math.prod([c.shape[1] for c in cores])
    acc = [torch.zeros(c.shape[1] * c.shape[3], c.shape[0] * c.shape[2], dtype=torch.float32, device=x.device)
           for c in cores]
    gx = x.new_empty(M, Kp) if need_dx else None  # base is added after (the reference paths)
    for m0 in range(0, M, chunk):
        xc = torch.nn.functional.pad(x[m0:m0 + chunk], (0, Kp - K))
        dc = torch.nn.functional.pad(dy[m0:m0 + chunk] * scaling, (0, Np - dy.shape[1]))
        Z = _k_chain(xc, cores, upto=len(cores) - 1)
        F = _n_chain(dc, cores, downto=0 if need_dx else 1)
        for i, c in enumerate(cores, start=1):
            r, n, k, r1 = c.shape
            B, _, S = Z[i - 1].shape
            Fi, Zi = F[i].reshape(B, n * r1, S // k), Z[i - 1].reshape(B, r * k, S // k)
            if Fi.dtype != torch.float32:  # the chunk's partial sums in fp32 too, not only their total
                Fi, Zi = Fi.float(), Zi.float()
            acc[i - 1] += _bpair(Fi, Zi)
        if need_dx:
            gx[m0:m0 + chunk] = F[0].reshape(xc.shape[0], Kp)
    grads = [a.reshape(c.shape[1], c.shape[3], c.shape[0], c.shape[2]).permute(2, 0, 3, 1).to(c.dtype).contiguous()
             for a, c in zip(acc, cores)]
    if not need_dx:
        return None, grads
    return (gx[:, :K] if base is None else base.add_(gx[:, :K])), grads


# Elements of the widest contraction state per row chunk in _env_backward (256k fp32 = 1 MiB: the
# half-dozen states of a chunk stay in L2/L3, and blocks this small are reused by malloc instead of
# being mapped fresh, where 8 MiB states page-fault thousands of times a call). Both much smaller
# and much larger chunks are slower; figures: benchmarks/README.md, "Design measurements",
# "TT-matrix backward chunk size".
_ENV_STATE_ELEMS = 1 << 18


def _plan(M: int, N: int, K: int, cores) -> str:
    return matrix_plan(M, N, K, [tuple(c.shape) for c in cores])["best"]


def _torch_forward(x, weight, bias, cores, N, scaling):
    """The forward by torch ops on the cost model's plan (the reference backend: reference.tt_linear
    forms the dense [N, K] delta, which this op does only where the measured dispatch picks the
    "dense" candidate)."""
    if _plan(x.shape[0], N, x.shape[1], cores) == "reconstruct":
        return _slab_forward(x, weight, bias, *_split(cores), scaling, N)
    return _contract_forward(x, weight, bias, cores, scaling, N)


def _triton_forward(x, weight, bias, cores, N, scaling):
    if _plan(x.shape[0], N, x.shape[1], cores) == "reconstruct":
        L, R = _split(cores)
        tk = _fused(R)
        if tk is not None:  # ΔW tiles generated inside the GEMM's K loop
            return tk.tt_linear_forward(x, weight, bias, L, R, scaling, N)
        return _slab_forward(x, weight, bias, L, R, scaling, N)
    return _contract_forward(x, weight, bias, cores, scaling, N)


def _cpp_forward(x, weight, bias, cores, N, scaling):
    M, K = x.shape
    if _lowp_fp32(x, N, "cpp"):  # bf16/fp16 where the CPU has no native dot products: in fp32
        x32, b32, c32 = x.float(), None if bias is None else bias.float(), [c.float() for c in cores]
        with products():
            if _plan(M, N, K, cores) == "reconstruct":  # the weight's slabs are converted as they are read
                y = _slab_forward(x32, weight, b32, *_split(c32), scaling, N)
            else:
                base = None if weight is None else _ext.load().gemm_mm(x, weight.t()).float()
                y = _contract_forward(x32, weight, b32, c32, scaling, N, True, base=base)
        return y.to(x.dtype)
    if not _cpp(x, "cpp"):
        return _torch_forward(x, weight, bias, cores, N, scaling)
    # Measured dispatch (pyhappy._tune): the cost model's plan is the incumbent; the other plan,
    # the contraction by torch ops after torch's base linear, and the unfused formulation of public
    # TT code (ΔW materialised) are challengers (FORWARD_CANDIDATES).
    cands = {n: functools.partial(f, x, weight, bias, cores, N, scaling) for n, f in FORWARD_CANDIDATES.items()}
    return run_pick("tt_linear", lambda: _tune_key("fwd", x, N, weight, bias, cores), cands, _plan(M, N, K, cores), x,
                    memo=_memo_key("fwd", x, weight, bias, cores), cold=(weight,))


def _unfused_matrix(x2, weight, bias, cores, N, scaling):
    """What public TT code runs: ΔW [N, K] formed from the cores, then F.linear(x, W + s·ΔW). The
    measured dispatch offers it as the forward's "dense" candidate (at small layers one GEMM on a
    materialised delta beats the contraction's many small products) and as the whole call's unfused
    formulation (inference; training at small layers, where autograd then keeps W + s·ΔW).

    Where s = 1 (TTLinear's default for this form), the cores cover [N, K] exactly and W is
    contiguous, the chain's product [n_1, k_1, ..., n_d, k_d] is added to W seen as [n_1..n_d,
    k_1..k_d] through a permuted view, so W + ΔW is one pass over [N, K] (the separate copy of ΔW
    into [N, K] layout, and its node in the backward, are left out: at small layers they are a
    measurable share of a training step). The sums are the same numbers; with s ≠ 1 ATen's loop over
    a permuted operand can round s·ΔW apart from its contiguous loop (bf16), so those take the copy."""
    K = x2.shape[1]
    if scaling == 1.0 and weight is not None and weight.is_contiguous():
        ns, ks = [c.shape[1] for c in cores], [c.shape[2] for c in cores]
        if math.prod(ns) == N and math.prod(ks) == K:
            T = cores[0].reshape(-1, cores[0].shape[3])  # the leading rank is 1
            for c in cores[1:]:
                T = (T @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[3])
            T = T.view(*[v for nk in zip(ns, ks) for v in nk]).permute(*range(0, 2 * len(cores), 2),
                                                                         *range(1, 2 * len(cores), 2))
            w = torch.add(weight.view(*ns, *ks), T).view(N, K)
            return torch.nn.functional.linear(x2, w, bias)
    dw = tt_matrix_full(cores, N, K)
    w = dw * scaling if weight is None else torch.add(weight, dw, alpha=scaling)
    return torch.nn.functional.linear(x2, w, bias)


def _dense_backward(grad_out, x, weight, cores, scaling, need_grad_x):
    """The "dense" candidate's backward (_unfused_matrix's, as autograd runs it): the core gradients through the materialised
    ΔW (whose gradient is s·dyᵀx [N, K]), dx = dy·(W + s·ΔW)."""
    N, K = grad_out.shape[1], x.shape[1]
    with torch.enable_grad():
        cs = [c.detach().requires_grad_() for c in cores]
        delta = tt_matrix_full(cs, N, K)
        gc = list(torch.autograd.grad(delta, cs, torch.mm(grad_out.t(), x).mul_(scaling)))
    if not need_grad_x:
        return None, gc
    delta = delta.detach()
    w = delta.mul_(scaling) if weight is None else torch.add(weight, delta, alpha=scaling)
    return grad_out @ w, gc


# The measured CPU dispatch's forward candidates (fp32 under the cpp backend), each
# (x, weight, bias, cores, N, scaling) -> y.
FORWARD_CANDIDATES = {
    "contract": lambda x, weight, bias, cores, N, scaling: _contract_forward(x, weight, bias, cores, scaling, N, True),
    "reconstruct": lambda x, weight, bias, cores, N, scaling: _slab_forward(x, weight, bias, *_split(cores), scaling,
                                                                            N, True),
    "torch": lambda x, weight, bias, cores, N, scaling: _contract_forward(x, weight, bias, cores, scaling, N, False),
    "dense": _unfused_matrix,
}

# y [M, N] for x [M, K], by backend (see pyhappy/backends.py).
FORWARD = {"cpp": _cpp_forward, "triton": _triton_forward, "reference": _torch_forward}


@torch.library.custom_op("pyhappy::tt_linear", mutates_args=())
def _tt_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], cores: list[Tensor], N: int,
               scaling: float) -> Tensor:
    """x [M, K] · (W + s·ΔW)ᵀ + b, ΔW the TT-matrix of ``cores`` (W None: s·x·ΔWᵀ + b) -> [M, N]."""
    return FORWARD[_backend(x)](x, weight, bias, cores, N, scaling)


def _tune_key(pass_: str, x: Tensor, N: int, weight, bias, cores) -> tuple:
    return (pass_, str(x.dtype).replace("torch.", ""), f"M{bucket(x.shape[0])}", f"K{x.shape[1]}", f"N{N}",
            "cores" + "x".join("-".join(map(str, c.shape)) for c in cores),
            "" if weight is not None else "noW", "bias" if bias is not None else "")


def _memo_key(pass_: str, x: Tensor, weight, bias, cores) -> tuple:
    return (pass_, x.dtype, bucket(x.shape[0]), x.shape[1], id(weight), id(bias), *map(id, cores))


@_tt_linear.register_fake
def _(x, weight, bias, cores, N, scaling):
    return x.new_empty(x.shape[0], N)


def _torch_backward(grad_out, x, weight, cores, scaling, need_grad_x):
    """The backward by torch ops (the reference backend): the environment contraction, then dy·W."""
    gx, gc = _env_backward(x, grad_out, cores, scaling, need_grad_x, False)
    if not need_grad_x:
        return [x.new_empty(0), *gc]
    if weight is not None:
        gx = torch.addmm(gx, grad_out, weight)
    return [gx.contiguous(), *gc]


def _triton_backward(grad_out, x, weight, cores, scaling, need_grad_x):
    M, K = x.shape
    if need_grad_x and _plan(M, grad_out.shape[1], K, cores) == "reconstruct":
        L, R = _split(cores)  # built only where a fused dx can use it
        tk = _fused(R)
        if tk is not None:  # dy·(W + s·ΔW) with the ΔW tiles generated in the kernel
            _, gc = _env_backward(x, grad_out, cores, scaling, False, False)
            return [tk.tt_linear_dx(grad_out, weight, L, R, scaling, K), *gc]
    return _torch_backward(grad_out, x, weight, cores, scaling, need_grad_x)


def _cpp_backward(grad_out, x, weight, cores, scaling, need_grad_x):
    grad_out = grad_out.contiguous()
    if _lowp_fp32(x, grad_out.shape[1], "cpp"):  # as in the forward: the contraction in fp32
        # dy·W through the fp32 blocks (rounded to x's dtype there), the delta summed into it in fp32
        with products():
            base = _ext.load().gemm_mm(grad_out, weight).float() if need_grad_x and weight is not None else None
            gx, gc = _env_backward(x.float(), grad_out.float(), [c.float() for c in cores], scaling, need_grad_x,
                                   True, base)
        gc = [g.to(c.dtype) for g, c in zip(gc, cores)]
        if not need_grad_x:
            return [x.new_empty(0), *gc]
        return [gx.to(x.dtype).contiguous(), *gc]
    if not _cpp(x, "cpp"):
        return _torch_backward(grad_out, x, weight, cores, scaling, need_grad_x)
    # Measured dispatch (BACKWARD_CANDIDATES): the C++ environment contraction, the same contraction
    # by torch ops, or the unfused formulation's backward through the materialised ΔW.
    cands = {n: functools.partial(f, grad_out, x, weight, cores, scaling, need_grad_x)
             for n, f in BACKWARD_CANDIDATES.items()}
    gx, gc = run_pick("tt_linear", lambda: _tune_key("bwd" if need_grad_x else "bwd_nodx", x, grad_out.shape[1],
                                                     weight, None, cores), cands, "cpp", x,
                      memo=_memo_key(("bwd", need_grad_x), x, weight, None, cores), cold=(weight,))
    return [gx.contiguous(), *gc] if need_grad_x else [x.new_empty(0), *gc]


def _env_pass(use_cpp: bool):
    """The environment-contraction backward as a candidate: (grad_out, x, weight, cores, scaling,
    need_grad_x) -> (dx or None, core gradients). use_cpp: dy·W by the C++ ops' GEMM with the
    delta's share added into it there, else torch's dy·W after the contraction by torch ops."""
    def run(grad_out, x, weight, cores, scaling, need_grad_x):
        base = (_ext.load().gemm_mm(grad_out, weight)
                if use_cpp and need_grad_x and weight is not None else None)
        gx, gc = _env_backward(x, grad_out, cores, scaling, need_grad_x, use_cpp, base)
        if need_grad_x and weight is not None and base is None:
            gx = torch.addmm(gx, grad_out, weight)
        return gx, gc
    return run


# The measured CPU dispatch's backward candidates (fp32 under the cpp backend), each (grad_out, x,
# weight, cores, scaling, need_grad_x) -> (dx or None, core gradients); grad_out is contiguous.
BACKWARD_CANDIDATES = {"cpp": _env_pass(True), "torch": _env_pass(False), "dense": _dense_backward}


# [grad_x (or an empty tensor), *grad_cores] for dy [M, N], x [M, K], by backend.
BACKWARD = {"cpp": _cpp_backward, "triton": _triton_backward, "reference": _torch_backward}


@torch.library.custom_op("pyhappy::tt_linear_backward", mutates_args=())
def _tt_linear_backward(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], cores: list[Tensor], scaling: float,
                        need_grad_x: bool) -> list[Tensor]:
    """[grad_x (or an empty tensor), *grad_cores]."""
    check_grad_out("tt_linear_backward", grad_out, x, None if weight is None else weight.shape[0])
    return BACKWARD[_backend(x)](grad_out, x, weight, cores, scaling, need_grad_x)


@_tt_linear_backward.register_fake
def _(grad_out, x, weight, cores, scaling, need_grad_x):
    return [x.new_empty(x.shape if need_grad_x else (0,)), *[c.new_empty(c.shape) for c in cores]]


def _tt_setup_context(ctx, inputs, output):
    x, weight, bias, cores, N, scaling = inputs
    ctx.save_for_backward(x, weight, *cores)
    ctx.scaling = scaling


def _tt_grads(ctx, grad_y, backward_op):
    """(grad x, grad W, grad b, [grad cores]) of a call from its context; ``backward_op`` is
    tt_linear_backward (the registered op, or its body for an eager call)."""
    x, weight, *cores = ctx.saved_tensors
    need = ctx.needs_input_grad  # x, weight and bias lead in both argument orders
    grad_y = grad_y.contiguous()
    gx, *gc = backward_op(grad_y, x, weight, cores, ctx.scaling, need[0])
    gw = grad_y.t() @ x if need[1] else None  # a trainable base weight (the modules freeze it)
    gb = grad_y.sum(0) if need[2] else None
    return gx if need[0] else None, gw, gb, gc


def _tt_backward(ctx, grad_y):
    gx, gw, gb, gc = _tt_grads(ctx, grad_y, torch.ops.pyhappy.tt_linear_backward)
    return gx, gw, gb, gc, None, None


_tt_linear.register_autograd(_tt_backward, setup_context=_tt_setup_context)


class _TTEager(torch.autograd.Function):
    """An eager training call of tt_linear without the custom-op dispatcher's autograd wrapper (see
    pyhappy/ops/_eager.py): the op's forward and backward bodies, its context and gradient formula.
    The cores travel as trailing arguments: autograd.Function tracks tensor arguments, not lists.
    ``picks`` (forward, backward): the candidates the measured dispatch settled on for a call of
    this signature, run directly (FORWARD_CANDIDATES, BACKWARD_CANDIDATES); None: the bodies."""

    @staticmethod
    def forward(ctx, x, weight, bias, N, scaling, picks, *cores):
        if picks is None:
            out = body(_tt_linear)(x, weight, bias, list(cores), N, scaling)
        else:
            out = FORWARD_CANDIDATES[picks[0]](x, weight, bias, list(cores), N, scaling)
        _tt_setup_context(ctx, (x, weight, bias, cores, N, scaling), out)
        ctx.picks = picks
        return out

    @staticmethod
    def backward(ctx, grad_y):
        picks = ctx.picks
        if picks is None:
            backward_op = body(_tt_linear_backward)
        else:
            def backward_op(grad_out, x, weight, cores, scaling, need_grad_x):
                gx, gc = BACKWARD_CANDIDATES[picks[1]](grad_out, x, weight, cores, scaling, need_grad_x)
                return [gx if need_grad_x else None, *gc]
        gx, gw, gb, gc = _tt_grads(ctx, grad_y, backward_op)
        return gx, gw, gb, None, None, None, *gc


def tt_matrix_linear(x: Tensor, weight: Tensor | None, bias, cores: Sequence[Tensor], scaling: float,
                     N: int | None = None) -> Tensor:
    """``x Wᵀ + b + s · x ΔWᵀ`` with ΔW in TT-matrix form (cores [r_{i-1}, n_i, k_i, r_i]), through the
    op ``pyhappy::tt_linear``: no [N, K] tensor in forward or backward, except at small layers
    where the measured dispatch runs the unfused formulation (see the module's notes). W None: ``s · x ΔWᵀ + b``
    (then N, the output size, is required). weight and bias must have x's dtype and device; the
    cores are cast to x's dtype. scaling: a finite real number."""
    scaling = finite_number("pyhappy::tt_linear", "scaling", scaling)
    sig = _train_signature(x, weight, bias, cores, N)
    picks = pick_hit("tt_linear", sig)
    if picks is not None:
        # A training call of a signature checked and served before, its decisions settled: run
        # the pick at once (the checks and the decisions' lookups cost, in Python, a share of a
        # small layer's step that its kernels do not).
        n, x2 = weight.shape[0] if weight is not None else N, _rows(x)
        if picks == "unfused":
            y = _unfused_matrix(x2, weight, bias, cores, n, scaling)
        else:
            y = _TTEager.apply(x2, weight, bias, n, float(scaling), tuple(picks.split("/")), *cores)
        return _unrows(y, x)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"pyhappy::tt_linear: x must be a tensor [..., K], got {type(x).__name__}")
    check_float_input("tt_linear", "x", x)
    lead, K = x.shape[:-1], x.shape[-1]
    if weight is not None:
        check_tensor("tt_linear", "weight", weight, ndim=2, like=x)
        kp = 1  # the K the cores cover: where it is weight's, x is the one of the wrong width
        for c in cores if isinstance(cores, (list, tuple)) else ():
            kp = kp * c.shape[2] if isinstance(c, torch.Tensor) and c.dim() == 4 else -1
        if kp == weight.shape[1]:
            check_in_features("tt_linear", x, weight.shape[1], f"weight is [N, K] = {tuple(weight.shape)}")
    N = weight.shape[0] if weight is not None else N
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"pyhappy::tt_linear: N must be a positive int when weight is None, got {N!r}")
    _check_cores(cores, N, K)
    if weight is not None and tuple(weight.shape) != (N, K):
        raise ValueError(f"pyhappy::tt_linear: weight must be [N, K] = [{N}, {K}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"pyhappy::tt_linear: bias must be [N] = [{N}], got {tuple(bias.shape)}")
    if bias is not None:
        check_tensor("tt_linear", "bias", bias, like=x)
    for i, c in enumerate(cores):
        if not c.is_floating_point() or c.device != x.device:
            raise TypeError(f"pyhappy::tt_linear: cores[{i}] must be a floating tensor on x's device ({x.device}), "
                            f"got {c.dtype} on {c.device}")
    cs = [c.to(x.dtype) if c.dtype != x.dtype else c for c in cores]
    x2, scaling = _rows(x), float(scaling)
    if torch.compiler.is_compiling():
        return torch.ops.pyhappy.tt_linear(x2, weight, bias, cs, N, scaling).reshape(*lead, N)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, weight, bias, *cs)):
        # Training. The per-pass "dense" candidates form W + s·ΔW only inside a pass and free it
        # there. The whole step as the unfused formulation (autograd keeps its W + s·ΔW until the
        # backward, as public TT code does) is measured only for layers whose passes are fast
        # (_tune.WHOLE_CALL_US): there the Python layers around the kernels are a share of the step.
        # A trainable base weight keeps the op (no whole-step decision).
        unfused, settled = ((False, True) if weight is not None and weight.requires_grad
                            else _train_step(x2, weight, bias, cs, N, scaling))
        remember = sig is not None and all(c is c0 for c, c0 in zip(cs, cores))  # a fast path takes cores uncast
        if unfused:
            if remember:
                remember_pick("tt_linear", sig, "unfused")
            return _unrows(_unfused_matrix(x2, weight, bias, cs, N, scaling), x)
        if remember and settled:
            fwd = cached_pick("tt_linear", _memo_key("fwd", x2, weight, bias, cs))
            bwd = cached_pick("tt_linear", _memo_key(("bwd", x2.requires_grad), x2, weight, None, cs))
            if fwd in FORWARD_CANDIDATES and bwd in BACKWARD_CANDIDATES:
                remember_pick("tt_linear", sig, f"{fwd}/{bwd}")
        return _unrows(_TTEager.apply(x2, weight, bias, N, scaling, None, *cs), x)
    memo, key = call_signature(x2, N, None, bias, (), (weight is None, *(tuple(c.shape) for c in cs)),
                               _tune_key("", x2, N, weight, bias, cs)[5:7])
    forward = body(_tt_linear)  # inference: the op's body, without the dispatcher (arguments checked above)
    if unfused_call("tt_linear", memo, key, lambda: forward(x2, weight, bias, cs, N, scaling),
                    lambda: _unfused_matrix(x2, weight, bias, cs, N, scaling), x2, cold=(weight,)):
        return _unfused_matrix(x2, weight, bias, cs, N, scaling).reshape(*lead, N)
    return forward(x2, weight, bias, cs, N, scaling).reshape(*lead, N)


def _rows(x: Tensor) -> Tensor:
    """x [..., K] as [M, K]: x itself when it is 2-D (a reshape would add a view node to a training
    call's autograd graph, a cost of its own at small layers)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _unrows(y: Tensor, x: Tensor) -> Tensor:
    """y [M, N] in x's leading dimensions."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _train_step(x2, weight, bias, cores, N, scaling) -> tuple:
    """(whether the unfused formulation serves this training call, whether that whole-step decision
    is settled) by ``unfused_call``: the op's step (forward and backward, its Python layers
    included) against the unfused one's, once both passes are decided and fast."""
    ts = (x2, bias, *cores)
    flags = tuple(t is not None and t.requires_grad for t in ts)
    need = tuple(t for t, f in zip(ts, flags) if f)
    memo, key = call_signature(x2, N, None, bias, flags, (weight is None, *(tuple(c.shape) for c in cores)),
                               _tune_key("", x2, N, weight, bias, cores)[5:7])
    passes = (_tune_key("fwd", x2, N, weight, bias, cores),
              _tune_key("bwd" if x2.requires_grad else "bwd_nodx", x2, N, weight, None, cores))
    unfused = unfused_call("tt_linear", memo, key, lambda: _TTEager.apply(x2, weight, bias, N, scaling, None, *cores),
                           lambda: _unfused_matrix(x2, weight, bias, cores, N, scaling), x2, need, cold=(weight,),
                           passes=passes)
    return unfused, unfused or cached_pick("tt_linear", ("step", memo)) == "op"


def _train_signature(x, weight, bias, cores, N):
    """The signature of a training call of tt_matrix_linear for ``pick_hit`` (None where it is not a
    training call of tensors the fast path can take: those go on to the checks)."""
    if not torch.is_grad_enabled() or not isinstance(cores, (list, tuple)) or torch.compiler.is_compiling():
        return None
    sig = arg_signature(x, weight, bias, *cores)
    if sig is None or not any(t[3] for t in sig[1:] if t is not None):
        return None
    return ("train", N if weight is None else None, sig)


def _check_cores(cores, N: int, K: int) -> None:
    if not isinstance(cores, (list, tuple)) or not cores or not all(isinstance(c, torch.Tensor) and c.dim() == 4
                                                                    for c in cores):
        raise ValueError("pyhappy::tt_linear: cores must be a non-empty list of 4-D tensors [r_{i-1}, n_i, k_i, r_i]")
    for i, c in enumerate(cores):
        prev = 1 if i == 0 else cores[i - 1].shape[3]
        if c.shape[0] != prev:
            raise ValueError(f"pyhappy::tt_linear: cores[{i}] has leading rank {c.shape[0]}, but the previous "
                             f"core's trailing rank is {prev}")
    if cores[-1].shape[3] != 1:
        raise ValueError(f"pyhappy::tt_linear: the last core's trailing rank must be 1, got {cores[-1].shape[3]}")
    Np = Kp = 1
    for c in cores:
        Np, Kp = Np * c.shape[1], Kp * c.shape[2]
    if Np < N or Kp < K:
        raise ValueError(f"pyhappy::tt_linear: the cores cover [{Np}, {Kp}] but the layer is [N, K] = [{N}, {K}]")
