"""Triton kernels of pyhappy::tt_linear (TT-matrix delta): ΔW generated tile by tile inside the GEMM.

Math (``pyhappy.reference.tt_linear`` is the oracle): split ΔW at its first core (see
pyhappy/ops/tt_linear.py): with L = G_1 [n_1, k_1, r] and R [r, N', K'] the full TT-matrix of the
other cores, ΔW[a·N' + i, b·K' + j] = Σ_t L[a, b, t] · R[t, i, j] (padded sizes n_1·N', k_1·K').

* ``_fwd_kernel``: y = x·(W + s·ΔW)ᵀ + bias. One program per [BLOCK_M, BLOCK_N] output tile; its
  K loop loads the W tile and builds the ΔW tile from r tiles of R (262k entries at 4096², 16³,
  rank 4: it stays in L2) times the scalars L[a, b, :], which are constant over a tile because
  BLOCK_N divides N' and BLOCK_K divides K'. W + s·ΔW never exists outside registers.
* ``_dx_kernel``: dx = dy·(W + s·ΔW), the same tiles with the reduction over N.
The core gradients stay batched products through torch (cuBLAS), pyhappy/ops/tt_linear.py.

Status: tested on CPU under TRITON_INTERPRET=1 only; never run on a GPU yet (no timings claimed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_linear import _dot, _dot_precision

__all__ = ["supports", "tt_linear_forward", "tt_linear_dx"]


@triton.jit
def _w_tile(w_ptr, L_ptr, R_ptr, n0, k0, offs_n, offs_k, N, K, Np_, Kp_, k1, s_wn, s_wk, scale,
            RANK: tl.constexpr, HAS_W: tl.constexpr):
    """[BN, BK] fp32 tile of W + s·ΔW at rows offs_n = n0 + arange, columns offs_k = k0 + arange
    (zero outside [N, K])."""
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    a = n0 // Np_  # one a, one b per tile (BLOCK_N | N', BLOCK_K | K')
    b = k0 // Kp_
    i = offs_n - a * Np_
    j = offs_k - b * Kp_
    d = tl.zeros((offs_n.shape[0], offs_k.shape[0]), dtype=tl.float32)
    for t in tl.static_range(RANK):
        lv = tl.load(L_ptr + (a * k1 + b) * RANK + t).to(tl.float32)
        rt = tl.load(R_ptr + t * Np_ * Kp_ + i[:, None].to(tl.int64) * Kp_ + j[None, :]).to(tl.float32)
        d += lv * rt
    d = d * scale
    if HAS_W:
        d += tl.load(w_ptr + offs_n[:, None].to(tl.int64) * s_wn + offs_k[None, :].to(tl.int64) * s_wk, mask=mask,
                     other=0.0).to(tl.float32)
    return tl.where(mask, d, 0.0)


@triton.jit
def _fwd_kernel(y_ptr, x_ptr, w_ptr, b_ptr, L_ptr, R_ptr, M, N, K, Np_, Kp_, k1, s_xm, s_xk, s_wn, s_wk, s_ym,
                s_yn, scale, RANK: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * s_xm + offs_k[None, :].to(tl.int64) * s_xk,
                     mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
        wt = _w_tile(w_ptr, L_ptr, R_ptr, pn * BLOCK_N, k0, offs_n, offs_k, N, K, Np_, Kp_, k1, s_wn, s_wk, scale,
                     RANK, HAS_W)
        acc = _dot(xt, tl.trans(wt.to(xt.dtype)), acc, PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * s_ym + offs_n[None, :].to(tl.int64) * s_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _dx_kernel(gx_ptr, dy_ptr, w_ptr, L_ptr, R_ptr, M, N, K, Np_, Kp_, k1, s_dm, s_dn, s_wn, s_wk, s_gm, s_gk,
               scale, RANK: tl.constexpr, HAS_W: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pm = tl.program_id(0)
    pk = tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dt = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * s_dm + offs_n[None, :].to(tl.int64) * s_dn,
                     mask=(offs_m < M)[:, None] & (offs_n < N)[None, :], other=0.0)
        wt = _w_tile(w_ptr, L_ptr, R_ptr, n0, pk * BLOCK_K, offs_n, offs_k, N, K, Np_, Kp_, k1, s_wn, s_wk, scale,
                     RANK, HAS_W)
        acc = _dot(dt, wt.to(dt.dtype), acc, PREC)
    tl.store(gx_ptr + offs_m[:, None].to(tl.int64) * s_gm + offs_k[None, :].to(tl.int64) * s_gk, acc.to(gx_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


def _block(n: int, cap: int = 64) -> int:
    """The largest power of two <= cap dividing n (0 when below 16: tl.dot's minimum)."""
    b = cap
    while b >= 16:
        if n % b == 0:
            return b
        b //= 2
    return 0


def supports(R: torch.Tensor) -> bool:
    """Whether the fused kernels serve R [r, N', K']: both of N', K' divisible by 16 (the tiles must
    not straddle a Kronecker block)."""
    return _block(R.shape[1]) > 0 and _block(R.shape[2]) > 0


def _block_m(M: int) -> int:
    return max(16, min(64, triton.next_power_of_2(max(1, M))))


def tt_linear_forward(x, weight, bias, L, R, scale, N):
    """y [M, N] = x·(W + s·ΔW)ᵀ + bias for x [M, K]; ΔW from L [n_1, k_1, r], R [r, N', K']."""
    M, K = x.shape
    y = x.new_empty(M, N)
    if M == 0:
        return y
    Lc, Rc = L.contiguous(), R.contiguous()
    bn, bk, bm = _block(R.shape[1]), _block(R.shape[2]), _block_m(M)
    w = weight if weight is not None else x  # a valid pointer, unused
    _fwd_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        y, x, w, bias.contiguous() if bias is not None else x, Lc, Rc, M, N, K, R.shape[1], R.shape[2], L.shape[1],
        x.stride(0), x.stride(1), w.stride(0) if weight is not None else 0, w.stride(1) if weight is not None else 0,
        y.stride(0), y.stride(1), float(scale), RANK=L.shape[2], HAS_W=weight is not None,
        HAS_BIAS=bias is not None, PREC=_dot_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y


def tt_linear_dx(dy, weight, L, R, scale, K):
    """dx [M, K] = dy·(W + s·ΔW) for dy [M, N]."""
    M, N = dy.shape
    gx = dy.new_empty(M, K)
    if M == 0:
        return gx
    Lc, Rc = L.contiguous(), R.contiguous()
    bn, bk, bm = _block(R.shape[1]), _block(R.shape[2]), _block_m(M)
    w = weight if weight is not None else dy
    _dx_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
        gx, dy, w, Lc, Rc, M, N, K, R.shape[1], R.shape[2], L.shape[1], dy.stride(0), dy.stride(1),
        w.stride(0) if weight is not None else 0, w.stride(1) if weight is not None else 0, gx.stride(0), gx.stride(1),
        float(scale), RANK=L.shape[2], HAS_W=weight is not None, PREC=_dot_precision(dy.dtype), BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk)
    return gx
