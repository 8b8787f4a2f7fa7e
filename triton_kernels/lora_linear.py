"""Triton kernels of the fused LoRA linear op (forward and backward).

Math (see ``pyhappy.reference.lora_linear`` / ``lora_linear_backward``, the oracle):

    xd = dropout(x)            (hash mask of (seed, row, col), kept values scaled by 1/(1-p))
    u  = xd Aᵀ                 [M, r]   (returned, saved for the backward)
    v  = u Cᵀ  (or u)          [M, r]
    y  = x Wᵀ + s · v Bᵀ + bias

    dv = s · dy B ;  dB = s · dyᵀ v ;  dC = dvᵀ u ;  du = dv C (or dv)
    dA = duᵀ xd ;    dx = dy W + dropout(du A)

Kernels
-------
* ``_lora_fwd_kernel``: one K-loop that accumulates x·Wᵀ ([BM, BN]) and dropout(x)·Aᵀ ([BM, R]) from
  the same x tile; the epilogue does v = u Cᵀ (in RC-wide chunks), adds s·v·Bᵀ and the bias, stores y;
  the programs with pid_n == 0 store u.  Constexpr modes: COMPUTE_Y=False gives the skinny "u only"
  kernel (grid over M tiles), U_GIVEN=True gives the GEMM whose epilogue reads a precomputed u.
* ``_lora_bwd_dx_kernel``: one N-loop that accumulates dy·W ([BM, BK]) and dy·B ([BM, R]); the
  epilogue makes dv = s·acc_v, du = dv C, dx = acc + dropout(du A); pid_k == 0 stores dv and du (fp32).
  COMPUTE_DX=False gives the skinny "dv/du only" kernel (need_grad_x=False), DU_GIVEN=True the GEMM
  whose epilogue reads a precomputed du.
* ``_lora_bwd_dA_kernel``: dA = duᵀ dropout(x), grid over K tiles (x split-M for parallelism), loop
  over M.  ``_lora_bwd_dB_kernel``: dB = s dyᵀ u Cᵀ, grid over N tiles (x split-M), loop over M.
  Split-M partials are written in fp32 to a workspace and summed with torch (deterministic).
* dC = dvᵀ u is a tiny torch.mm.

Dispatch (launchers): the fused single-kernel forward / dx paths are used for small M (decode, M <= 64)
and for large M with small r and no dropout. For large M with dropout or r >= 64 the low-rank state
goes through memory instead (``_fwd_two_pass`` / ``_bwd_two_pass``): a skinny kernel computes u (or
dv, du) once, then the GEMM kernel reads it in its epilogue, because the fused loop would redo the
x·Aᵀ (dy·B) product and the dropout hash for every N (K) tile. fp32 with r > 64 always takes the
two-pass route (``_fp32_big_rank``). dv / du are kept in fp32.

The dropout mask is regenerated on the fly from the (row, col) indices of each tile by
``_dropout_keep`` (bit-exact copy of ``reference.dropout_keep_mask``); dropout(x) is never stored.

Launchers use only torch ops and kernel launches, so they can run under
``torch.library.wrap_triton`` (passed as ``wrap``) and torch.compile.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["lora_linear_forward", "lora_linear_backward", "lora_hidden"]


# ----------------------------------------------------------------------------------------------
# dropout hash (must match pyhappy.reference.dropout_keep_mask bit for bit)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mix32(h):
    """lowbias32 on uint32 tensors (wrap-around multiply, logical shifts)."""
    h = h ^ (h >> 16)
    h = h * tl.full((), 0x7FEB352D, tl.uint32)
    h = h ^ (h >> 15)
    h = h * tl.full((), 0x846CA68B, tl.uint32)
    h = h ^ (h >> 16)
    return h


@triton.jit
def _row_hash(seed, rows):
    """a = mix32(seed + row * 0x9E3779B9) for a vector of (int32) row indices; seed is uint32."""
    return _mix32(seed + rows.to(tl.uint32) * tl.full((), 0x9E3779B9, tl.uint32))


@triton.jit
def _dropout_keep(row_hash, cols, thr):
    """keep = mix32(row_hash ^ col) >= thr; row_hash and cols broadcast against each other."""
    return _mix32(row_hash ^ cols.to(tl.uint32)) >= thr


# The Triton interpreter (TRITON_INTERPRET=1, triton 3.9) multiplies the raw uint16 bit patterns of
# bf16 tl.dot operands; under the interpreter only, _dot upcasts bf16 operands to fp32 first. On a GPU
# this constexpr is False and _dot is exactly tl.dot.
_INTERPRETER_BF16_DOT_FIX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation (acc may be None) and the given fp32 input precision."""
    if _INTERPRETER_BF16_DOT_FIX:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ("super-row") ordering of a 1-D launch grid for L2 reuse."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, c_ptr, bias_ptr, seed_ptr, y_ptr, u_ptr,
    M, N, K, rank,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_ci, stride_cj, stride_ym, stride_yn, stride_um, stride_ur,
    scaling, drop_scale, threshold,
    HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    COMPUTE_Y: tl.constexpr, U_GIVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    R: tl.constexpr, RC: tl.constexpr, GROUP_M: tl.constexpr, PREC: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    if COMPUTE_Y:
        pid_m, pid_n = _grouped_pid(pid, num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    else:
        pid_m = pid
        pid_n = 0

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_m = rows % M  # always in bounds: loads need no row mask; rows >= M are never stored
    offs_m64 = offs_m.to(tl.int64)
    offs_kk = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R)
    mask_r = offs_r < rank

    x_ptrs = x_ptr + offs_m64[:, None] * stride_xm + offs_kk[None, :] * stride_xk
    if COMPUTE_Y:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = cols % N
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_kk[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not U_GIVEN:
        a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_kk[:, None] * stride_ak
        acc_u = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr).to(tl.uint32)  # low 32 bits of the int64 seed
            thr = threshold.to(tl.uint32, bitcast=True)
            row_hash = _row_hash(seed, offs_m)

    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_kk < K - k0
        x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)
        if COMPUTE_Y:
            w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
            acc = _dot(x, w, acc, PREC=PREC)
            w_ptrs += BLOCK_K * stride_wk
        if not U_GIVEN:
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = _dropout_keep(row_hash[:, None], (k0 + offs_kk)[None, :], thr)
                x = tl.where(keep, x, tl.zeros_like(x))
            acc_u = _dot(x, a, acc_u, PREC=PREC)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk

    if U_GIVEN:
        if COMPUTE_Y:
            # u comes from memory: every low-rank product is chunked RC-wide along its reduction dim
            # too (keeps the operands small; matters for the fp32 FMA path with large R). Runtime
            # (not unrolled) loops: unrolled, ptxas spills massively on the FMA path for R = 256.
            if HAS_C:
                for i0 in range(0, R, RC):
                    offs_i = i0 + tl.arange(0, RC)
                    mask_i = offs_i < rank
                    v = tl.zeros((BLOCK_M, RC), dtype=tl.float32)
                    for j0 in range(0, R, RC):
                        offs_j = j0 + tl.arange(0, RC)
                        mask_j = offs_j < rank
                        u_c = tl.load(u_ptr + offs_m64[:, None] * stride_um + offs_j[None, :] * stride_ur,
                                      mask=mask_j[None, :], other=0.0)
                        ct = tl.load(c_ptr + offs_j[:, None] * stride_cj + offs_i[None, :] * stride_ci,
                                     mask=mask_j[:, None] & mask_i[None, :], other=0.0)
                        v = _dot(u_c, ct, v, PREC=PREC)
                    bt = tl.load(b_ptr + offs_i[:, None] * stride_br + offs_n[None, :] * stride_bn,
                                 mask=mask_i[:, None], other=0.0)
                    acc = _dot((v * scaling).to(dtype), bt, acc, PREC=PREC)
            else:
                for j0 in range(0, R, RC):
                    offs_j = j0 + tl.arange(0, RC)
                    mask_j = offs_j < rank
                    u_c = tl.load(u_ptr + offs_m64[:, None] * stride_um + offs_j[None, :] * stride_ur,
                                  mask=mask_j[None, :], other=0.0)
                    bt = tl.load(b_ptr + offs_j[:, None] * stride_br + offs_n[None, :] * stride_bn,
                                 mask=mask_j[:, None], other=0.0)
                    acc = _dot((u_c.to(tl.float32) * scaling).to(dtype), bt, acc, PREC=PREC)
    else:
        if HAS_DROPOUT:
            acc_u = acc_u * drop_scale
        u_op = acc_u.to(dtype)
        if pid_n == 0:
            tl.store(u_ptr + offs_m64[:, None] * stride_um + offs_r[None, :] * stride_ur, u_op,
                     mask=row_ok[:, None] & mask_r[None, :])
        if COMPUTE_Y:
            if HAS_C:
                # v[:, i-chunk] = u · Cᵀ[:, i-chunk];  y += (s v[:, i-chunk]) · Bᵀ[i-chunk, :]
                for i0 in tl.static_range(0, R, RC):
                    offs_i = i0 + tl.arange(0, RC)
                    mask_i = offs_i < rank
                    ct = tl.load(c_ptr + offs_r[:, None] * stride_cj + offs_i[None, :] * stride_ci,
                                 mask=mask_r[:, None] & mask_i[None, :], other=0.0)
                    v = _dot(u_op, ct, None, PREC=PREC)
                    bt = tl.load(b_ptr + offs_i[:, None] * stride_br + offs_n[None, :] * stride_bn,
                                 mask=mask_i[:, None], other=0.0)
                    acc = _dot((v * scaling).to(dtype), bt, acc, PREC=PREC)
            else:
                bt = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                             mask=mask_r[:, None], other=0.0)
                acc = _dot((u_op.to(tl.float32) * scaling).to(dtype), bt, acc, PREC=PREC)

    if COMPUTE_Y:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n).to(tl.float32)
            acc = acc + bias[None, :]
        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, c_ptr, seed_ptr, dx_ptr, dv_ptr, du_ptr,
    M, N, K, rank,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ci, stride_cj, stride_dxm, stride_dxk, stride_dvm, stride_dvr, stride_dum, stride_dur,
    scaling, drop_scale, threshold,
    HAS_C: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DX: tl.constexpr, DU_GIVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    R: tl.constexpr, RC: tl.constexpr, GROUP_M: tl.constexpr, PREC: tl.constexpr,
):
    dtype = dy_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    if COMPUTE_DX:
        pid_m, pid_k = _grouped_pid(pid, num_pid_m, tl.cdiv(K, BLOCK_K), GROUP_M)
    else:
        pid_m = pid
        pid_k = 0

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_m = rows % M
    offs_m64 = offs_m.to(tl.int64)
    offs_nn = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    mask_r = offs_r < rank

    dy_ptrs = dy_ptr + offs_m64[:, None] * stride_dym + offs_nn[None, :] * stride_dyn
    if COMPUTE_DX:
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_k = cols % K
        w_ptrs = w_ptr + offs_nn[:, None] * stride_wn + offs_k.to(tl.int64)[None, :] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if not DU_GIVEN:
        b_ptrs = b_ptr + offs_nn[:, None] * stride_bn + offs_r[None, :] * stride_br
        acc_v = tl.zeros((BLOCK_M, R), dtype=tl.float32)

    for n0 in range(0, N, BLOCK_N):
        mask_n = offs_nn < N - n0
        dy = tl.load(dy_ptrs, mask=mask_n[None, :], other=0.0)
        if COMPUTE_DX:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            acc = _dot(dy, w, acc, PREC=PREC)
            w_ptrs += BLOCK_N * stride_wn
        if not DU_GIVEN:
            b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            acc_v = _dot(dy, b, acc_v, PREC=PREC)
            b_ptrs += BLOCK_N * stride_bn
        dy_ptrs += BLOCK_N * stride_dyn

    if COMPUTE_DX:
        # lr accumulates du·A; without dropout it goes straight into acc
        if HAS_DROPOUT:
            lr = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        else:
            lr = acc

    if DU_GIVEN:
        for j0 in range(0, R, RC):  # runtime loop: see the U_GIVEN epilogue of the forward
            offs_j = j0 + tl.arange(0, RC)
            mask_j = offs_j < rank
            du_c = tl.load(du_ptr + offs_m64[:, None] * stride_dum + offs_j[None, :] * stride_dur,
                           mask=mask_j[None, :], other=0.0)
            a = tl.load(a_ptr + offs_j[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=mask_j[:, None], other=0.0)
            lr = _dot(du_c.to(dtype), a, lr, PREC=PREC)
    else:
        dv = acc_v * scaling
        if pid_k == 0:
            tl.store(dv_ptr + offs_m64[:, None] * stride_dvm + offs_r[None, :] * stride_dvr, dv,
                     mask=row_ok[:, None] & mask_r[None, :])
        if HAS_C:
            dv_op = dv.to(dtype)
            # du[:, j-chunk] = dv · C[:, j-chunk];  lr += du[:, j-chunk] · A[j-chunk, :]
            for j0 in tl.static_range(0, R, RC):
                offs_j = j0 + tl.arange(0, RC)
                mask_j = offs_j < rank
                c = tl.load(c_ptr + offs_r[:, None] * stride_ci + offs_j[None, :] * stride_cj,
                            mask=mask_r[:, None] & mask_j[None, :], other=0.0)
                du_c = _dot(dv_op, c, None, PREC=PREC)
                if pid_k == 0:
                    tl.store(du_ptr + offs_m64[:, None] * stride_dum + offs_j[None, :] * stride_dur, du_c,
                             mask=row_ok[:, None] & mask_j[None, :])
                if COMPUTE_DX:
                    a = tl.load(a_ptr + offs_j[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                                mask=mask_j[:, None], other=0.0)
                    lr = _dot(du_c.to(dtype), a, lr, PREC=PREC)
        else:
            if COMPUTE_DX:
                a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                            mask=mask_r[:, None], other=0.0)
                lr = _dot(dv.to(dtype), a, lr, PREC=PREC)

    if COMPUTE_DX:
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr).to(tl.uint32)
            thr = threshold.to(tl.uint32, bitcast=True)
            keep = _dropout_keep(_row_hash(seed, offs_m)[:, None], offs_k[None, :], thr)
            acc = acc + tl.where(keep, lr * drop_scale, tl.zeros_like(lr))
        else:
            acc = lr
        dx_ptrs = dx_ptr + rows.to(tl.int64)[:, None] * stride_dxm + cols[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def _lora_bwd_dA_kernel(
    x_ptr, du_ptr, seed_ptr, out_ptr,
    M, K, rank, m_per_split,
    stride_xm, stride_xk, stride_dum, stride_dur, stride_os, stride_or, stride_ok,
    drop_scale, threshold,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr,
    PREC: tl.constexpr,
):
    """out[pid_s] (= dA, or a split-M fp32 partial of it): dAᵀ tile [BK, R] = dropout(x)ᵀ · du."""
    dtype = x_ptr.dtype.element_ty
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_k = cols % K
    offs_r = tl.arange(0, R)
    mask_r = offs_r < rank
    offs_mm = tl.arange(0, BLOCK_M)
    m_start = pid_s * m_per_split
    m_end = tl.minimum(M, m_start + m_per_split)

    x_ptrs = x_ptr + offs_k.to(tl.int64)[:, None] * stride_xk + (m_start + offs_mm).to(tl.int64)[None, :] * stride_xm
    du_ptrs = du_ptr + (m_start + offs_mm).to(tl.int64)[:, None] * stride_dum + offs_r[None, :] * stride_dur
    acc = tl.zeros((BLOCK_K, R), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)
        thr = threshold.to(tl.uint32, bitcast=True)
    for m0 in range(m_start, m_end, BLOCK_M):
        mrow = m0 + offs_mm
        mask_m = mrow < m_end
        xt = tl.load(x_ptrs, mask=mask_m[None, :], other=0.0)  # [BK, BM]
        if HAS_DROPOUT:
            keep = _dropout_keep(_row_hash(seed, mrow)[None, :], offs_k[:, None], thr)
            xt = tl.where(keep, xt, tl.zeros_like(xt))
        du = tl.load(du_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # [BM, R] fp32
        acc = _dot(xt, du.to(dtype), acc, PREC=PREC)
        x_ptrs += BLOCK_M * stride_xm
        du_ptrs += BLOCK_M * stride_dum
    if HAS_DROPOUT:
        acc = acc * drop_scale
    out_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + offs_r[None, :] * stride_or
                + cols.to(tl.int64)[:, None] * stride_ok)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(cols < K)[:, None] & mask_r[None, :])


@triton.jit
def _lora_bwd_dB_kernel(
    dy_ptr, u_ptr, c_ptr, out_ptr,
    M, N, rank, m_per_split,
    stride_dym, stride_dyn, stride_um, stride_ur, stride_ci, stride_cj, stride_os, stride_on, stride_or,
    scaling,
    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr, RC: tl.constexpr,
    PREC: tl.constexpr,
):
    """out[pid_s] (= dB, or a split-M fp32 partial): tile [BN, R] = s · (dyᵀ u) · Cᵀ  (= s · dyᵀ v)."""
    dtype = dy_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = cols % N
    offs_r = tl.arange(0, R)
    mask_r = offs_r < rank
    offs_mm = tl.arange(0, BLOCK_M)
    m_start = pid_s * m_per_split
    m_end = tl.minimum(M, m_start + m_per_split)

    dyt_ptrs = (dy_ptr + offs_n.to(tl.int64)[:, None] * stride_dyn
                + (m_start + offs_mm).to(tl.int64)[None, :] * stride_dym)
    u_ptrs = u_ptr + (m_start + offs_mm).to(tl.int64)[:, None] * stride_um + offs_r[None, :] * stride_ur
    acc = tl.zeros((BLOCK_N, R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        mask_m = (m0 + offs_mm) < m_end
        dyt = tl.load(dyt_ptrs, mask=mask_m[None, :], other=0.0)  # [BN, BM]
        u = tl.load(u_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # [BM, R]
        acc = _dot(dyt, u, acc, PREC=PREC)
        dyt_ptrs += BLOCK_M * stride_dym
        u_ptrs += BLOCK_M * stride_um
    g = acc * scaling
    out_base = out_ptr + pid_s.to(tl.int64) * stride_os + cols.to(tl.int64)[:, None] * stride_on
    col_ok = cols < N
    if HAS_C:
        g_op = g.to(dtype)
        for i0 in tl.static_range(0, R, RC):
            offs_i = i0 + tl.arange(0, RC)
            mask_i = offs_i < rank
            ct = tl.load(c_ptr + offs_r[:, None] * stride_cj + offs_i[None, :] * stride_ci,
                         mask=mask_r[:, None] & mask_i[None, :], other=0.0)
            o = _dot(g_op, ct, None, PREC=PREC)
            tl.store(out_base + offs_i[None, :] * stride_or, o.to(out_ptr.dtype.element_ty),
                     mask=col_ok[:, None] & mask_i[None, :])
    else:
        tl.store(out_base + offs_r[None, :] * stride_or, g.to(out_ptr.dtype.element_ty),
                 mask=col_ok[:, None] & mask_r[None, :])


# ----------------------------------------------------------------------------------------------
# launch heuristics
# ----------------------------------------------------------------------------------------------

_SMEM_BUDGET = 192 * 1024  # bytes of shared memory the software pipeline may use (H100: 227 KB/block)
_TARGET_PROGRAMS = 264  # ~2 waves on an H100 (132 SMs) for the split-M reductions of dA / dB
_MIN_TILES_PER_SPLIT = 4  # each split-M program reduces at least this many M tiles
_GROUP_M = 8


def _identity(kernel):
    return kernel


def _cdiv(a, b):
    return (a + b - 1) // b


def _pow2_at_least(n, lo):
    p = lo
    while p < n:
        p *= 2
    return p


def _pad_rank(r):
    """Rank padded to a power of two >= 16 (tl.dot needs every tile dimension >= 16)."""
    return _pow2_at_least(r, 16)


def _allow_tf32():
    m = torch.backends.cuda.matmul
    try:
        return bool(m.allow_tf32)
    except RuntimeError:  # the new fp32_precision API was used: reading the legacy flag raises
        return getattr(m, "fp32_precision", "ieee") == "tf32"


def _dot_precision(dtype):
    # only matters for fp32 operands; 16-bit operands always use the tensor cores
    if dtype == torch.float32 and not _allow_tf32():
        return "ieee"
    return "tf32"


def _threshold_i32(p):
    """reference.dropout_threshold(p) (uint32), reinterpreted as int32 so the kernel arg is always i32."""
    t = min(int(p * 4294967296.0), 0xFFFFFFFF)
    return t - (1 << 32) if t >= (1 << 31) else t


def _stages(per_stage_bytes, want):
    return max(2, min(want, _SMEM_BUDGET // max(per_stage_bytes, 1)))


def _main_gemm_config(M, N_out, R, esize, with_lowrank, fma=False):
    """Tiles of the big GEMM (forward: out [M, N], reduction K; dx: out [M, K], reduction N).

    fma: fp32 with IEEE precision, i.e. tl.dot on the CUDA cores, where each thread holds its operand
    slices over the whole reduction tile in registers: smaller tiles and a short reduction tile.
    Returns (BLOCK_M, BLOCK_OUT, BLOCK_RED, num_warps, num_stages)."""
    if M <= 64:  # decode / small batch: bound by reading W; more, narrower column tiles
        bm = _pow2_at_least(M, 16)
        bo = 64 if _cdiv(N_out, 64) >= 128 else 32
        bred = 128 if esize == 2 else (32 if fma else 64)
        warps, want = (4 if R <= 64 else 8), 4
    elif fma:
        bm, bo, bred, warps, want = 64, 128, 16, 8, 3
    else:  # Hopper-friendly 128x128 tile, 2 warpgroups (wgmma m64 per warpgroup)
        bm, bo = 128, 128
        bred = 64 if esize == 2 else 32
        warps, want = 8, 3
    per_stage = (bm * bred + bred * bo + (bred * R if with_lowrank else 0)) * esize
    return bm, bo, bred, warps, _stages(per_stage, want)


def _skinny_config(M, R, esize):
    """Tiles of the skinny [M, red] x [red, R] kernels (u only / dv only)."""
    bm = 64 if _cdiv(M, 64) >= 132 else 32
    bred = 64 if esize == 2 else 32
    warps = 4 if R <= 64 else 8
    per_stage = (bm * bred + bred * R) * esize
    return bm, bred, warps, _stages(per_stage, 3)


def _split_m(M, block_m, n_tiles_out):
    """Split the M reduction of dA / dB so that about _TARGET_PROGRAMS programs run."""
    tiles_m = _cdiv(M, block_m)
    split = max(1, min(_cdiv(_TARGET_PROGRAMS, max(n_tiles_out, 1)), tiles_m // _MIN_TILES_PER_SPLIT))
    tiles_per_split = _cdiv(tiles_m, split)
    split = _cdiv(tiles_m, tiles_per_split)
    return split, tiles_per_split * block_m


def _fwd_two_pass(M, R, has_dropout):
    """Compute u with a separate skinny kernel (then the GEMM reads u) instead of fusing xd·Aᵀ.

    The fused K-loop repeats the x·Aᵀ product and the dropout hash once per N tile: for large M this
    costs R/BLOCK_N extra tensor-core work and ~11 integer ops per x element per N tile (more than the
    MMA itself), while the separate pass reads x once more (~200/N of the GEMM time on H100)."""
    return M > 64 and (has_dropout or R >= 64)


def _bwd_two_pass(M, R):
    """Compute dv/du with the skinny kernel first when the fused dy·B costs R/BLOCK_K >= 1/2."""
    return M > 64 and R >= 64


def _fp32_big_rank(esize, R):
    """fp32 operands with R >= 128: a register-resident [rows, R] fp32 operand of a tl.dot whose
    reduction dim is R spills (badly on the FMA path used for IEEE precision, mildly with TF32; seen
    in sm_90 builds). Then the low-rank state always goes through memory (two-pass), where the
    kernels chunk every reduction RC-wide, and the two [*, r] x [r, r] products with C that would
    have a register operand (du = dv C, dB = (s dyᵀu) Cᵀ) are done by torch.mm (tiny)."""
    return esize == 4 and R >= 128


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def lora_hidden(x, lora_A, dropout_p: float, seed, *, wrap=None):
    """u = dropout(x) Aᵀ [M, r] in x.dtype with the skinny kernel (x 2-D [M, K])."""
    launch = wrap or _identity
    M, K = x.shape
    r = lora_A.shape[0]
    u = torch.empty((M, r), device=x.device, dtype=x.dtype)
    if M == 0:
        return u
    esize = x.element_size()
    R = _pad_rank(r)
    has_drop = float(dropout_p) > 0.0
    bm, bk, warps, stages = _skinny_config(M, R, esize)
    launch(_lora_fwd_kernel)[(_cdiv(M, bm),)](
        x, x, lora_A, x, x, x, seed if has_drop else x, x, u,
        M, 0, K, r,
        x.stride(0), x.stride(1), 0, 0, lora_A.stride(0), lora_A.stride(1), 0, 0, 0, 0, 0, 0, u.stride(0), u.stride(1),
        1.0, 1.0 / (1.0 - float(dropout_p)) if has_drop else 1.0, _threshold_i32(float(dropout_p)) if has_drop else 0,
        HAS_BIAS=False, HAS_C=False, HAS_DROPOUT=has_drop, COMPUTE_Y=False, U_GIVEN=False,
        BLOCK_M=bm, BLOCK_N=16, BLOCK_K=bk, R=R, RC=min(R, 64), GROUP_M=_GROUP_M, PREC=_dot_precision(x.dtype),
        num_warps=warps, num_stages=stages,
    )
    return u


def lora_linear_forward(x, weight, bias, lora_A, lora_B, lora_C, scaling: float, dropout_p: float, seed, *,
                        wrap=None):
    """x is 2-D [M, K] (any strides, last dim need not be contiguous); returns (y [M, N], u [M, r]) in x.dtype"""
    launch = wrap or _identity
    M, K = x.shape
    N = weight.shape[0]
    r = lora_A.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    u = torch.empty((M, r), device=x.device, dtype=x.dtype)
    if M == 0:
        return y, u

    esize = x.element_size()
    R = _pad_rank(r)
    RC = min(R, 64)
    prec = _dot_precision(x.dtype)
    has_drop = float(dropout_p) > 0.0
    has_c = lora_C is not None
    has_bias = bias is not None
    drop_scale = 1.0 / (1.0 - float(dropout_p)) if has_drop else 1.0
    thr = _threshold_i32(float(dropout_p)) if has_drop else 0
    seed_t = seed if has_drop else x
    c_t = lora_C if has_c else x
    c_s0, c_s1 = (lora_C.stride(0), lora_C.stride(1)) if has_c else (0, 0)
    bias_t = bias if has_bias else x
    two_pass = N == 0 or _fwd_two_pass(M, R, has_drop) or _fp32_big_rank(esize, R)

    common_strides = (
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), c_s0, c_s1, y.stride(0), y.stride(1), u.stride(0), u.stride(1),
    )
    if two_pass:
        bm, bk, warps, stages = _skinny_config(M, R, esize)
        launch(_lora_fwd_kernel)[(_cdiv(M, bm),)](
            x, weight, lora_A, lora_B, c_t, bias_t, seed_t, y, u,
            M, N, K, r, *common_strides,
            float(scaling), drop_scale, thr,
            HAS_BIAS=False, HAS_C=False, HAS_DROPOUT=has_drop, COMPUTE_Y=False, U_GIVEN=False,
            BLOCK_M=bm, BLOCK_N=16, BLOCK_K=bk, R=R, RC=RC, GROUP_M=_GROUP_M, PREC=prec,
            num_warps=warps, num_stages=stages,
        )
    if N > 0:
        bm, bn, bk, warps, stages = _main_gemm_config(M, N, R, esize, not two_pass, prec == "ieee")
        grid = (_cdiv(M, bm) * _cdiv(N, bn),)
        launch(_lora_fwd_kernel)[grid](
            x, weight, lora_A, lora_B, c_t, bias_t, seed_t, y, u,
            M, N, K, r, *common_strides,
            float(scaling), drop_scale, thr,
            HAS_BIAS=has_bias, HAS_C=has_c, HAS_DROPOUT=has_drop, COMPUTE_Y=True, U_GIVEN=two_pass,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, R=R, RC=RC, GROUP_M=_GROUP_M, PREC=prec,
            num_warps=warps, num_stages=stages,
        )
    return y, u


def lora_linear_backward(grad_out, x, weight, lora_A, lora_B, lora_C, lora_hidden, scaling: float,
                         dropout_p: float, seed, need_grad_x: bool, *, wrap=None):
    """grad_out 2-D [M, N], x 2-D [M, K], lora_hidden = u [M, r]; returns (grad_x or None, grad_A, grad_B, grad_C or None).

    ``weight`` may be None with need_grad_x=False: then only the adapter's gradients are computed
    (what a base layer of another kind, e.g. quant_linear's packed weight, reuses)."""
    launch = wrap or _identity
    M, K = x.shape
    N = grad_out.shape[1]
    if weight is None:
        if need_grad_x:
            raise ValueError("lora_linear_backward: weight=None needs need_grad_x=False")
        weight = grad_out.new_empty(1).as_strided((N, K), (0, 0))  # never read: COMPUTE_DX is off
    r = lora_A.shape[0]
    dev = x.device
    has_c = lora_C is not None
    grad_x = torch.empty((M, K), device=dev, dtype=x.dtype) if need_grad_x else None
    if M == 0:
        return (grad_x,
                torch.zeros((r, K), device=dev, dtype=lora_A.dtype),
                torch.zeros((N, r), device=dev, dtype=lora_B.dtype),
                torch.zeros((r, r), device=dev, dtype=lora_C.dtype) if has_c else None)

    dy = grad_out
    u = lora_hidden
    esize = x.element_size()
    R = _pad_rank(r)
    RC = min(R, 64)
    prec = _dot_precision(x.dtype)
    has_drop = float(dropout_p) > 0.0
    drop_scale = 1.0 / (1.0 - float(dropout_p)) if has_drop else 1.0
    thr = _threshold_i32(float(dropout_p)) if has_drop else 0
    seed_t = seed if has_drop else x
    c_t = lora_C if has_c else x
    c_s0, c_s1 = (lora_C.stride(0), lora_C.stride(1)) if has_c else (0, 0)

    # dv = s dy B and du = dv C, fp32, written by the dx kernel (pid_k == 0) or the skinny dv kernel
    dv = torch.empty((M, r), device=dev, dtype=torch.float32)
    du = torch.empty((M, r), device=dev, dtype=torch.float32) if has_c else dv
    compute_dx = bool(need_grad_x) and K > 0
    big_fp32 = _fp32_big_rank(esize, R)
    two_pass = (not compute_dx) or _bwd_two_pass(M, R) or big_fp32
    gx_t = grad_x if compute_dx else dv
    gx_s0, gx_s1 = (grad_x.stride(0), grad_x.stride(1)) if compute_dx else (0, 0)
    dx_args = (
        dy, weight, lora_A, lora_B, c_t, seed_t, gx_t, dv, du,
        M, N, K, r,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), c_s0, c_s1, gx_s0, gx_s1,
        dv.stride(0), dv.stride(1), du.stride(0), du.stride(1),
        float(scaling), drop_scale, thr,
    )
    if two_pass:
        bm, bn, warps, stages = _skinny_config(M, R, esize)
        launch(_lora_bwd_dx_kernel)[(_cdiv(M, bm),)](
            *dx_args,
            HAS_C=has_c and not big_fp32, HAS_DROPOUT=has_drop, COMPUTE_DX=False, DU_GIVEN=False,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=16, R=R, RC=RC, GROUP_M=_GROUP_M, PREC=prec,
            num_warps=warps, num_stages=stages,
        )
        if has_c and big_fp32:  # fp32 inputs here; du is already bound into dx_args: fill it in place
            du.copy_(torch.mm(dv, lora_C.to(torch.float32)))
    if compute_dx:
        bm, bk, bn, warps, stages = _main_gemm_config(M, K, R, esize, not two_pass, prec == "ieee")
        launch(_lora_bwd_dx_kernel)[(_cdiv(M, bm) * _cdiv(K, bk),)](
            *dx_args,
            HAS_C=has_c, HAS_DROPOUT=has_drop, COMPUTE_DX=True, DU_GIVEN=two_pass,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, R=R, RC=RC, GROUP_M=_GROUP_M, PREC=prec,
            num_warps=warps, num_stages=stages,
        )

    # dA [r, K] = duᵀ dropout(x)
    if K > 0:
        bk = 128 if R <= 64 else 64
        bm = 64 if esize == 2 else 32
        warps = 4 if R <= 64 else 8
        stages = _stages(bk * bm * esize + bm * R * 4, 3)
        split, m_per_split = _split_m(M, bm, _cdiv(K, bk))
        if split == 1:
            grad_A = torch.empty((r, K), device=dev, dtype=lora_A.dtype)
            out, o_s = grad_A, (0, grad_A.stride(0), grad_A.stride(1))
        else:
            out = torch.empty((split, r, K), device=dev, dtype=torch.float32)
            o_s = out.stride()
        launch(_lora_bwd_dA_kernel)[(_cdiv(K, bk), split)](
            x, du, seed_t, out,
            M, K, r, m_per_split,
            x.stride(0), x.stride(1), du.stride(0), du.stride(1), o_s[0], o_s[1], o_s[2],
            drop_scale, thr,
            HAS_DROPOUT=has_drop, BLOCK_M=bm, BLOCK_K=bk, R=R, PREC=prec,
            num_warps=warps, num_stages=stages,
        )
        if split > 1:
            grad_A = out.sum(dim=0).to(lora_A.dtype)
    else:
        grad_A = torch.zeros((r, K), device=dev, dtype=lora_A.dtype)

    # dB [N, r] = s dyᵀ v = s (dyᵀ u) Cᵀ
    if N > 0:
        bn = 128 if R <= 64 else 64
        bm = 64 if esize == 2 else 32
        warps = 4 if R <= 64 else 8
        stages = _stages((bn * bm + bm * R) * esize, 3)
        split, m_per_split = _split_m(M, bm, _cdiv(N, bn))
        c_in_kernel = has_c and not big_fp32
        if split == 1 and (c_in_kernel or not has_c):
            grad_B = torch.empty((N, r), device=dev, dtype=lora_B.dtype)
            out, o_s = grad_B, (0, grad_B.stride(0), grad_B.stride(1))
        else:
            out = torch.empty((split, N, r), device=dev, dtype=torch.float32)
            o_s = out.stride()
        launch(_lora_bwd_dB_kernel)[(_cdiv(N, bn), split)](
            dy, u, c_t, out,
            M, N, r, m_per_split,
            dy.stride(0), dy.stride(1), u.stride(0), u.stride(1), c_s0, c_s1, o_s[0], o_s[1], o_s[2],
            float(scaling),
            HAS_C=c_in_kernel, BLOCK_M=bm, BLOCK_N=bn, R=R, RC=RC, PREC=prec,
            num_warps=warps, num_stages=stages,
        )
        if has_c and not c_in_kernel:  # out holds s·dyᵀu (fp32): dB = (s dyᵀu) Cᵀ
            grad_B = torch.mm(out.sum(dim=0), lora_C.to(torch.float32).t()).to(lora_B.dtype)
        elif split > 1:
            grad_B = out.sum(dim=0).to(lora_B.dtype)
    else:
        grad_B = torch.zeros((N, r), device=dev, dtype=lora_B.dtype)

    # dC [r, r] = dvᵀ u (tiny)
    grad_C = torch.mm(dv.t(), u.to(torch.float32)).to(lora_C.dtype) if has_c else None
    return grad_x, grad_A, grad_B, grad_C
