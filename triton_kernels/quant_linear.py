"""Triton kernels of pyhappy::quant_linear: a linear layer on a packed 4/3-bit weight (+ LoRA).

Math (``pyhappy.reference.quant_linear`` / ``quant_linear_backward`` are the oracle):

    y  = x · deq(Wq)ᵀ + bias + s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ
    dx = dy · deq(Wq) + dropout(du A),   du = s (dy B) C   (or without C);   dA, dB, dC as lora_linear

The packed layout (8-row tiles x 32-k blocks, see pyhappy/quant/layout.py) is decoded inside the
K-loop (forward) and N-loop (dx): every element's byte address and bit shift follow from its
(n, k); a tile's bytes come from whole 128 / 96-byte blocks, so the loads coalesce. The weight is
dequantized exactly as the reference does it (float32 (q - z)·s or NF4[q]·absmax), cast to the
activations' dtype and fed to tl.dot; no [N, K] dense copy exists.

Kernels
-------
* ``_quant_fwd_kernel``: [BLOCK_M, BLOCK_N] output tiles; the epilogue adds the low-rank term
  s·v·Bᵀ (v = u Cᵀ precomputed, [M, r]) and the bias.
* ``_quant_dx_kernel``: [BLOCK_M, BLOCK_K] tiles of dx, loop over N; the epilogue adds
  dropout(du·A) with the same hash mask as lora_linear.
* The adapter's own pieces reuse triton_kernels.lora_linear: ``lora_hidden`` (u = dropout(x) Aᵀ,
  skinny kernel) and ``lora_linear_backward(weight=None)`` (dA, dB, dC).
Small M (decode) uses narrow N tiles so that many programs stream the weight (bandwidth-bound).

Status: tested on CPU under TRITON_INTERPRET=1 only; never run on a GPU yet (no timings claimed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lora_linear as _lora
from .lora_linear import _cdiv, _dot, _dot_precision, _dropout_keep, _grouped_pid, _identity, _pad_rank, _row_hash

__all__ = ["quant_linear_forward", "quant_linear_backward"]

_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
_GROUP_M = 8


@triton.jit
def _load_w(q_ptr, s_ptr, z_ptr, t_ptr, offs_n, offs_k, KB, G, GS: tl.constexpr, FMT: tl.constexpr):
    """Dequantized weight tile, transposed: w[k, n] float32 for offs_k [BK] x offs_n [BN] (in bounds).
    Block b of 8-row tile t starts at byte ((t // 2) · KB + b) · 2 · bytes + (t % 2) · bytes: the two
    tiles of a pair alternate block by block (pyhappy/quant/layout.py)."""
    t = (offs_n // 8).to(tl.int64)
    r = offs_n % 8
    b = offs_k // 32
    kr = offs_k % 32
    kk = kr % 4
    blk = ((t[None, :] // 2) * KB + b[:, None]) * 2 + t[None, :] % 2  # the block's index in qdata
    if FMT == 2:
        # bits b0 .. b0+2 of the byte triple (layout.py): from the vectors holding b0 and b0 + 2
        base = blk * 96 + r[None, :] * 4 + kk[:, None]
        b0 = 3 * (kr // 4)
        lo = tl.load(q_ptr + base + ((b0 // 8) * 32)[:, None]).to(tl.int32)
        hi = tl.load(q_ptr + base + (((b0 + 2) // 8) * 32)[:, None]).to(tl.int32)
        code = ((lo | (hi << 8)) >> (b0 % 8)[:, None]) & 7
    else:
        base = blk * 128 + r[None, :] * 4 + kk[:, None]
        byte = tl.load(q_ptr + base + ((kr // 8) * 32)[:, None]).to(tl.int32)
        code = (byte >> (4 * ((kr % 8) // 4))[:, None]) & 15
    pidx = (t[None, :] * G + (offs_k // GS)[:, None]) * 8 + r[None, :]
    s = tl.load(s_ptr + pidx).to(tl.float32)
    if FMT == 0:
        w = tl.load(t_ptr + code) * s
    else:
        z = tl.load(z_ptr + pidx).to(tl.float32)
        w = (code.to(tl.float32) - z) * s
    return w


@triton.jit
def _quant_fwd_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, t_ptr, bias_ptr, v_ptr, b_ptr, y_ptr,
    M, N, K, KB, G, rank,
    stride_xm, stride_xk, stride_vm, stride_vr, stride_bn, stride_br, stride_ym, stride_yn,
    GS: tl.constexpr, FMT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr,
    GROUP_M: tl.constexpr, PREC: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m64 = (rows % M).to(tl.int64)
    offs_n = cols % N  # in bounds; columns >= N are never stored
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_k[None, :],
                    other=0.0)
        w = _load_w(q_ptr, s_ptr, z_ptr, t_ptr, offs_n, offs_k % K, KB, G, GS, FMT)
        w = tl.where(mask_k[:, None], w, 0.0)
        acc = _dot(x, w.to(dtype), acc, PREC=PREC)
    if HAS_LORA:  # v_ptr holds s · u Cᵀ [M, r] in x's dtype
        offs_r = tl.arange(0, R)
        mask_r = offs_r < rank
        v = tl.load(v_ptr + offs_m64[:, None] * stride_vm + offs_r[None, :] * stride_vr, mask=mask_r[None, :],
                    other=0.0)
        bt = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn, mask=mask_r[:, None],
                     other=0.0)
        acc = _dot(v, bt, acc, PREC=PREC)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(dtype),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _quant_dx_kernel(
    dy_ptr, q_ptr, s_ptr, z_ptr, t_ptr, du_ptr, a_ptr, seed_ptr, dx_ptr,
    M, N, K, KB, G, rank,
    stride_dym, stride_dyn, stride_dum, stride_dur, stride_ar, stride_ak, stride_dxm, stride_dxk,
    drop_scale, threshold,
    GS: tl.constexpr, FMT: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr,
    GROUP_M: tl.constexpr, PREC: tl.constexpr,
):
    dtype = dy_ptr.dtype.element_ty
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kcols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = rows % M
    offs_m64 = offs_m.to(tl.int64)
    offs_k = kcols % K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_nn = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_nn < N
        dy = tl.load(dy_ptr + offs_m64[:, None] * stride_dym + offs_nn[None, :] * stride_dyn, mask=mask_n[None, :],
                     other=0.0)
        wt = _load_w(q_ptr, s_ptr, z_ptr, t_ptr, offs_nn % N, offs_k, KB, G, GS, FMT)  # [BK, BN]
        wt = tl.where(mask_n[None, :], wt, 0.0)
        acc = _dot(dy, tl.trans(wt).to(dtype), acc, PREC=PREC)
    if HAS_LORA:
        offs_r = tl.arange(0, R)
        mask_r = offs_r < rank
        du = tl.load(du_ptr + offs_m64[:, None] * stride_dum + offs_r[None, :] * stride_dur, mask=mask_r[None, :],
                     other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak,
                    mask=mask_r[:, None], other=0.0)
        lr = _dot(du.to(dtype), a, None, PREC=PREC)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr).to(tl.uint32)
            thr = threshold.to(tl.uint32, bitcast=True)
            keep = _dropout_keep(_row_hash(seed, offs_m)[:, None], offs_k[None, :], thr)
            lr = tl.where(keep, lr * drop_scale, tl.zeros_like(lr))
        acc = acc + lr
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm + kcols[None, :] * stride_dxk, acc.to(dtype),
             mask=(rows < M)[:, None] & (kcols < K)[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _table(device):
    return torch.tensor(_NF4, dtype=torch.float32, device=device)


def _packed(qdata, scales, zeros, fmt, K, group_size):
    KB, G = K // 32, K // group_size
    return qdata, scales, (zeros if zeros is not None else qdata), KB, G


def _tiles(M, out_dim, esize, prec):
    """(BLOCK_M, BLOCK_OUT, BLOCK_RED, num_warps, num_stages)."""
    if M <= 64:  # decode / small batch: bandwidth-bound on the packed weight; many narrow programs
        return max(16, triton.next_power_of_2(M)), 32 if out_dim <= 4096 else 64, 128 if esize == 2 else 64, 4, 3
    if prec == "ieee":
        return 64, 64, 32, 8, 2
    return 128, 128, 64 if esize == 2 else 32, 8, 3


def quant_linear_forward(x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling,
                         dropout_p, seed, *, wrap=None):
    """x 2-D [M, K]; returns (y [M, N] in x.dtype, u [M, r] or [M, 0])."""
    launch = wrap or _identity
    M, K = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    has_lora = lora_A is not None
    r = lora_A.shape[0] if has_lora else 0
    if has_lora:
        u = _lora.lora_hidden(x, lora_A, dropout_p, seed, wrap=wrap)
        v = u if lora_C is None else torch.mm(u.float(), lora_C.float().t()).to(x.dtype)
        v = (v.float() * float(scaling)).to(x.dtype)
    else:
        u = torch.empty((M, 0), device=x.device, dtype=x.dtype)
        v = u
    if M == 0:
        return y, u
    q, s, z, KB, G = _packed(qdata, scales, zeros, fmt, K, group_size)
    prec = _dot_precision(x.dtype)
    bm, bn, bk, warps, stages = _tiles(M, N, x.element_size(), prec)
    b_t = lora_B if has_lora else x
    launch(_quant_fwd_kernel)[(_cdiv(M, bm) * _cdiv(N, bn),)](
        x, q, s, z, _table(x.device), bias if bias is not None else x, v if has_lora else x, b_t, y,
        M, N, K, KB, G, r,
        x.stride(0), x.stride(1), v.stride(0) if has_lora else 0, v.stride(1) if has_lora else 0,
        b_t.stride(0) if has_lora else 0, b_t.stride(1) if has_lora else 0, y.stride(0), y.stride(1),
        GS=group_size, FMT=fmt, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, R=_pad_rank(max(r, 1)), GROUP_M=_GROUP_M, PREC=prec,
        num_warps=warps, num_stages=stages,
    )
    return y, u


def quant_linear_backward(dy, x, qdata, scales, zeros, fmt, group_size, lora_A, lora_B, lora_C, u, scaling,
                          dropout_p, seed, need_grad_x, *, wrap=None):
    """dy 2-D [M, N], x 2-D [M, K]; returns (grad_x or None, grad_A, grad_B, grad_C) (None when absent)."""
    launch = wrap or _identity
    M, K = x.shape
    N = dy.shape[1]
    has_lora = lora_A is not None
    gA = gB = gC = None
    if has_lora:
        _, gA, gB, gC = _lora.lora_linear_backward(dy, x, None, lora_A, lora_B, lora_C, u, scaling, dropout_p, seed,
                                                   False, wrap=wrap)
    if not need_grad_x:
        return None, gA, gB, gC
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
    if M == 0:
        return dx, gA, gB, gC
    r = lora_A.shape[0] if has_lora else 0
    if has_lora:  # du = s (dy B) C, fp32 (tiny next to the dx GEMM)
        du = float(scaling) * torch.mm(dy.float(), lora_B.float())
        if lora_C is not None:
            du = torch.mm(du, lora_C.float())
    else:
        du = dx
    has_drop = has_lora and float(dropout_p) > 0.0
    q, s, z, KB, G = _packed(qdata, scales, zeros, fmt, K, group_size)
    prec = _dot_precision(x.dtype)
    bm, bk, bn, warps, stages = _tiles(M, K, x.element_size(), prec)
    a_t = lora_A if has_lora else x
    launch(_quant_dx_kernel)[(_cdiv(M, bm) * _cdiv(K, bk),)](
        dy, q, s, z, _table(x.device), du, a_t, seed if has_drop else x, dx,
        M, N, K, KB, G, r,
        dy.stride(0), dy.stride(1), du.stride(0) if has_lora else 0, du.stride(1) if has_lora else 0,
        a_t.stride(0) if has_lora else 0, a_t.stride(1) if has_lora else 0, dx.stride(0), dx.stride(1),
        1.0 / (1.0 - float(dropout_p)) if has_drop else 1.0, _lora._threshold_i32(float(dropout_p)) if has_drop else 0,
        GS=group_size, FMT=fmt, HAS_LORA=has_lora, HAS_DROPOUT=has_drop,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, R=_pad_rank(max(r, 1)), GROUP_M=_GROUP_M, PREC=prec,
        num_warps=warps, num_stages=stages,
    )
    return dx, gA, gB, gC
