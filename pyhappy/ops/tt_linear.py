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
  slab inside the base GEMM (large M) for the forward and dx; the core gradients go through a
  Kronecker split of ΔW at its first core (see the op's notes below). No [N, K] tensor either way.

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
    T = _rest_full(cores, cores[0].shape[0], cores[0])[0]  # leading rank 1
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


# The TT-matrix op, pyhappy::tt_linear. Split ΔW at its first core: with L = G_1 [n_1, k_1, r_1] and
# R [r_1, N', K'] the full TT-matrix of the other cores (a free leading rank index; N = n_1·N',
# K = k_1·K' after padding), ΔW[(a, i), (b, j)] = Σ_t L[a, b, t] R[t, i, j], a sum of r_1 Kronecker
# products. R has r_1·N'·K' entries (262k at 4096², 16³, rank 4): it is built once per call.
#   forward / dx, large M: ΔW generated one row slab (fixed a: [N', K]) at a time from L and R and
#     folded into that slab of W for one GEMM (x·(W_a + s·ΔW_a)ᵀ, dy_a·(W_a + s·ΔW_a)); small M:
#     mode-by-mode contraction (tt_matrix_apply), as the cost model (matrix_plan) picks.
#   core gradients: with X = x as [M, k_1, K'] and D = s·dy as [M, n_1, N'],
#     dL[a, b, t] = Σ_{m,i,j} D[m, a, i] X[m, b, j] R[t, i, j]   (U = D·R: one [M·n_1, N'] x [N', r_1·K'] GEMM)
#     dR[t, i, j] = Σ_{m,a,b} D[m, a, i] L[a, b, t] X[m, b, j]   (T = L·X, then Dᵀ·T: one GEMM)
#     and dR flows into cores 2..d through R's (small) generation chain. Four well-shaped GEMMs,
#     no [N, K] buffer and no permute of an [M, K·r]-sized intermediate: at M=512, 4096², tt_rank 4
#     this replaced autograd through the contraction (~2/3 of whose time went to permute copies).


def _nk_order(d: int) -> tuple:
    """The permutation taking [r, n_1, k_1, ..., n_d, k_d] to [r, n_1..n_d, k_1..k_d]."""
    return (0, *range(1, 2 * d + 1, 2), *range(2, 2 * d + 1, 2))


def _rest_full(rest: Sequence[Tensor], r: int, like: Tensor, keep: list | None = None) -> Tensor:
    """R [r, Π n, Π k] of TT-matrix cores [r_{i-1}, n_i, k_i, r_i] with the leading rank r left free
    (the trailing rank is 1); all ones [1, 1, 1] for no cores. ``keep`` collects the chain's
    intermediates for _rest_full_vjp."""
    if not rest:
        return like.new_ones(1, 1, 1)
    ns = [c.shape[1] for c in rest]
    ks = [c.shape[2] for c in rest]
    T = rest[0].reshape(-1, rest[0].shape[3])
    for c in rest[1:]:
        if keep is not None:
            keep.append(T)
        T = (T @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[3])
    T = T.reshape(r, *[v for nk in zip(ns, ks) for v in nk])
    return T.permute(*_nk_order(len(rest))).reshape(r, math.prod(ns), math.prod(ks))


def _rest_full_vjp(rest: Sequence[Tensor], keep: list, dR: Tensor) -> list:
    """The cores' gradients given dR = d(loss)/dR for R = _rest_full(rest, ...) (written out: the op's
    backward runs below autograd)."""
    d = len(rest)
    ns = [c.shape[1] for c in rest]
    ks = [c.shape[2] for c in rest]
    perm = _nk_order(d)
    inv = [perm.index(i) for i in range(2 * d + 1)]
    dT = dR.reshape(dR.shape[0], *ns, *ks).permute(*inv).reshape(-1, 1)
    grads = [None] * d
    for i in range(d - 1, 0, -1):  # T_i = T_{i-1} @ C_i.reshape(r_{i-1}, -1), reshaped (-1, r_i)
        c, Tp = rest[i], keep[i - 1]
        dP = dT.reshape(Tp.shape[0], -1)
        grads[i] = (Tp.t() @ dP).reshape(c.shape)
        dT = dP @ c.reshape(c.shape[0], -1).t()
    grads[0] = dT.reshape(rest[0].shape)
    return grads


def _split(cores: Sequence[Tensor], keep: list | None = None):
    """(L [n_1, k_1, r_1], R [r_1, N', K']); ``keep`` as in _rest_full."""
    L = cores[0][0]
    return L, _rest_full(cores[1:], L.shape[2], L, keep)


def _slab_weights(weight, L: Tensor, R: Tensor, scaling: float, N: int, K: int):
    """(r0, r1, rows [r0, r1) of W + s·ΔW (of s·ΔW for weight None), columns [0, K)) for each row slab
    of ΔW, where slab a is Σ_t L[a, :, t] ⊗ R[t]: row i of the slab is L[a] · R[:, i] ([k_1, r] x
    [r, K'], laid out [k_1, K']), so a slab is one batched product straight into W's layout (fused
    with the add of W when the slab is not padded)."""
    n1, k1, r = L.shape
    Rp = R.permute(1, 0, 2).contiguous()  # [N', r, K']
    Np_, Kp_ = Rp.shape[0], Rp.shape[2]
    for a in range(n1):
        r0, r1 = a * Np_, min(N, (a + 1) * Np_)
        if r0 >= N:
            break
        La = L[a].expand(Np_, k1, r)
        if weight is not None and r1 - r0 == Np_ and k1 * Kp_ == K:
            w = torch.baddbmm(weight[r0:r1].reshape(Np_, k1, Kp_), La, Rp, alpha=scaling).reshape(Np_, K)
        else:
            d = torch.bmm(La, Rp).reshape(Np_, k1 * Kp_)[: r1 - r0, :K]
            w = d * scaling if weight is None else torch.add(weight[r0:r1], d, alpha=scaling)
        yield r0, r1, w


def _slab_forward(x: Tensor, weight, bias, cores: Sequence[Tensor], scaling: float, N: int) -> Tensor:
    """x·(W + s·ΔW)ᵀ + b with ΔW generated one row slab at a time and folded into that slab of W for
    one GEMM: no [N, K] temporary."""
    M, K = x.shape
    y = x.new_empty(M, N)
    for r0, r1, w in _slab_weights(weight, *_split(cores), scaling, N, K):
        y[:, r0:r1] = torch.addmm(bias[r0:r1], x, w.t()) if bias is not None else x @ w.t()
    return y


def _contract_forward(x: Tensor, weight, bias, cores: Sequence[Tensor], scaling: float, N: int) -> Tensor:
    """x·Wᵀ + b + s·x·ΔWᵀ with the delta by mode-by-mode contraction."""
    y = scaling * tt_matrix_apply(x, cores, N, x.shape[1])
    if weight is not None:
        return y + torch.nn.functional.linear(x, weight, bias)
    return y + bias if bias is not None else y


def _core_grads(x: Tensor, dy: Tensor, cores: Sequence[Tensor], L: Tensor, R: Tensor, keep: list,
                scaling: float) -> list:
    """d(loss)/d(cores) for y = s·x·ΔWᵀ given dy, through the Kronecker split (see above); L, R and
    keep from _split(cores, keep)."""
    M, K = x.shape
    N = dy.shape[1]
    n1, k1, r = L.shape
    Np_, Kp_ = R.shape[1], R.shape[2]
    X = torch.nn.functional.pad(x, (0, k1 * Kp_ - K)).reshape(M, k1, Kp_)
    D = torch.nn.functional.pad(dy * scaling, (0, n1 * Np_ - N)).reshape(M * n1, Np_)
    U = D @ R.permute(1, 0, 2).reshape(Np_, r * Kp_)                      # [(m a), (t j)]
    dL = torch.bmm(U.reshape(M, n1 * r, Kp_), X.transpose(1, 2)).sum(0)   # [(a t), b]
    dL = dL.reshape(n1, r, k1).permute(0, 2, 1).contiguous().reshape(cores[0].shape)
    T = torch.matmul(L.permute(0, 2, 1).reshape(n1 * r, k1), X)           # [m, (a t), j]
    dR = (D.t() @ T.reshape(M * n1, r * Kp_)).reshape(Np_, r, Kp_).permute(1, 0, 2)
    if len(cores) == 1:
        return [dL]
    return [dL, *_rest_full_vjp(cores[1:], keep, dR)]


def _plan(M: int, N: int, K: int, cores) -> str:
    return matrix_plan(M, N, K, [tuple(c.shape) for c in cores])["best"]


@torch.library.custom_op("pyhappy::tt_linear", mutates_args=())
def _tt_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], cores: list[Tensor], N: int,
               scaling: float) -> Tensor:
    """x [M, K] · (W + s·ΔW)ᵀ + b, ΔW the TT-matrix of ``cores`` (W None: s·x·ΔWᵀ + b) -> [M, N]."""
    M, K = x.shape
    if _plan(M, N, K, cores) == "reconstruct":
        return _slab_forward(x, weight, bias, cores, scaling, N)
    return _contract_forward(x, weight, bias, cores, scaling, N)


@_tt_linear.register_fake
def _(x, weight, bias, cores, N, scaling):
    return x.new_empty(x.shape[0], N)


@torch.library.custom_op("pyhappy::tt_linear_backward", mutates_args=())
def _tt_linear_backward(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], cores: list[Tensor], scaling: float,
                        need_grad_x: bool) -> list[Tensor]:
    """[grad_x (or an empty tensor), *grad_cores]."""
    M, K = x.shape
    N = grad_out.shape[1]
    keep = []
    L, R = _split(cores, keep)  # built once, for the core gradients and the slab dx
    gc = _core_grads(x, grad_out, cores, L, R, keep, scaling)
    if not need_grad_x:
        return [x.new_empty(0), *gc]
    if _plan(M, N, K, cores) == "reconstruct":  # dy·(W + s·ΔW) slab by slab
        gx = grad_out.new_zeros(M, K)
        for r0, r1, w in _slab_weights(weight, L, R, scaling, N, K):
            gx.addmm_(grad_out[:, r0:r1], w)
    else:  # dy·ΔW: the contraction with every core's n and k swapped
        gx = scaling * tt_matrix_apply(grad_out, [c.permute(0, 2, 1, 3) for c in cores], K, N)
        if weight is not None:
            gx = gx + grad_out @ weight
    return [gx, *gc]


@_tt_linear_backward.register_fake
def _(grad_out, x, weight, cores, scaling, need_grad_x):
    return [x.new_empty(x.shape if need_grad_x else (0,)), *[torch.empty_like(c) for c in cores]]


def _tt_setup_context(ctx, inputs, output):
    x, weight, bias, cores, N, scaling = inputs
    ctx.save_for_backward(x, weight, *cores)
    ctx.scaling = scaling


def _tt_backward(ctx, grad_y):
    x, weight, *cores = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_y = grad_y.contiguous()
    gx, *gc = torch.ops.pyhappy.tt_linear_backward(grad_y, x, weight, cores, ctx.scaling, need[0])
    gw = grad_y.t() @ x if need[1] else None  # a trainable base weight (the modules freeze it)
    gb = grad_y.sum(0) if need[2] else None
    return gx if need[0] else None, gw, gb, gc, None, None


_tt_linear.register_autograd(_tt_backward, setup_context=_tt_setup_context)


def tt_matrix_linear(x: Tensor, weight: Tensor | None, bias, cores: Sequence[Tensor], scaling: float,
                     N: int | None = None) -> Tensor:
    """``x Wᵀ + b + s · x ΔWᵀ`` with ΔW in TT-matrix form (cores [r_{i-1}, n_i, k_i, r_i]), through the
    op ``pyhappy::tt_linear`` (training below TRAIN_OP_MIN_M rows: autograd through the contraction,
    which is faster there): no [N, K] tensor in forward or backward. W None: ``s · x ΔWᵀ + b``
    (then N, the output size, is required). The cores are cast to x's dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"pyhappy::tt_linear: x must be a tensor [..., K], got {type(x).__name__}")
    lead, K = x.shape[:-1], x.shape[-1]
    N = weight.shape[0] if weight is not None else N
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"pyhappy::tt_linear: N must be a positive int when weight is None, got {N!r}")
    _check_cores(cores, N, K)
    if weight is not None and tuple(weight.shape) != (N, K):
        raise ValueError(f"pyhappy::tt_linear: weight must be [N, K] = [{N}, {K}], got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"pyhappy::tt_linear: bias must be [N] = [{N}], got {tuple(bias.shape)}")
    cs = [c.to(x.dtype) if c.dtype != x.dtype else c for c in cores]
    x2 = x.reshape(-1, K)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, *cs))
    if grads and x2.shape[0] < TRAIN_OP_MIN_M:
        # Training at small M: autograd through the contraction is faster than the op's backward.
        y = _contract_forward(x2, weight, bias, cs, scaling, N)
    else:
        y = torch.ops.pyhappy.tt_linear(x2, weight, bias, cs, N, float(scaling))
    return y.reshape(*lead, N)


# Rows of x from which training goes through pyhappy::tt_linear (its slab GEMMs and Kronecker-split
# core gradients) rather than autograd through the contraction; inference always uses the op. Measured
# crossover, fwd+bwd at K=N=4096 (16x16x16), tt_rank 4, 2-core EPYC (autograd contraction / op):
# M=64 45.5 / 59.6 ms, M=128 67.2 / 74.4, M=256 141 / 148, M=512 339 / 298.
TRAIN_OP_MIN_M = 384


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
