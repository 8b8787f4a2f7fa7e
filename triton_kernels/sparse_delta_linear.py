"""Triton kernels of pyhappy::sparse_delta_linear: y = x · (W + s·ΔW)ᵀ + bias, ΔW sparse.

Math (``pyhappy.reference.sparse_delta_linear`` / ``sparse_delta_linear_backward`` are the oracle):

    y   = x·Wᵀ + bias + s · x·ΔWᵀ        dx = dy·W + s · dy·ΔW        dv_i = s · Σ_m dy[m, n_i] x[m, k_i]

The dense products run as torch matmuls (cuBLAS); the kernels do the sparse parts over the layout
built by ``sparse_layout`` (one int32 tensor: CSR by row, CSC by column):

* ``_spmm_add_kernel``: out[m, c] += s · Σ_{i ∈ ptr[c]..ptr[c+1]} v_i · in[m, idx_i]. One program
  per (BLOCK_M rows, output column c) walks the column's nonzeros BLOCK_NZ at a time, gathering a
  [BLOCK_M, BLOCK_NZ] tile of ``in``; forward: in = x, CSR over rows n; dx: in = dy, CSC over k.
* ``_sddmm_kernel``: BLOCK_NZ nonzeros per program, loop over M in BLOCK_M chunks, fp32 sums.
No dense ΔW and no dense dW is ever formed.

Status: tested on CPU under TRITON_INTERPRET=1 only; never run on a GPU yet (no timings claimed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["sparse_delta_linear_forward", "sparse_delta_linear_backward", "split_layout"]


def _identity(fn):
    return fn


@triton.jit
def _spmm_add_kernel(out_ptr, in_ptr, ptr_ptr, idx_ptr, val_ptr, M, s_om, s_oc, s_im, s_ik, scale,
                     BLOCK_M: tl.constexpr, BLOCK_NZ: tl.constexpr):
    pm = tl.program_id(0)
    c = tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    start = tl.load(ptr_ptr + c)
    end = tl.load(ptr_ptr + c + 1)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i0 in range(start, end, BLOCK_NZ):
        offs = i0 + tl.arange(0, BLOCK_NZ)
        mask_z = offs < end
        ks = tl.load(idx_ptr + offs, mask=mask_z, other=0).to(tl.int64)
        vs = tl.load(val_ptr + offs, mask=mask_z, other=0.0).to(tl.float32)
        tile = tl.load(in_ptr + offs_m[:, None].to(tl.int64) * s_im + ks[None, :] * s_ik,
                       mask=mask_m[:, None] & mask_z[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile * vs[None, :], axis=1)
    o = out_ptr + offs_m.to(tl.int64) * s_om + c * s_oc
    prev = tl.load(o, mask=mask_m, other=0.0).to(tl.float32)
    tl.store(o, (prev + scale * acc).to(out_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _sddmm_kernel(dv_ptr, dy_ptr, x_ptr, idx_ptr, M, nnz, K, s_dm, s_dn, s_xm, s_xk, scale,
                  BLOCK_M: tl.constexpr, BLOCK_NZ: tl.constexpr):
    pz = tl.program_id(0)
    offs = pz * BLOCK_NZ + tl.arange(0, BLOCK_NZ)
    mask_z = offs < nnz
    flat = tl.load(idx_ptr + offs, mask=mask_z, other=0).to(tl.int64)
    n = flat // K
    k = flat % K
    acc = tl.zeros((BLOCK_NZ,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & mask_z[None, :]
        om = offs_m[:, None].to(tl.int64)
        d = tl.load(dy_ptr + om * s_dm + n[None, :] * s_dn, mask=mask, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + om * s_xm + k[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(d * xv, axis=0)
    tl.store(dv_ptr + offs, acc * scale, mask=mask_z)


def split_layout(layout, N, K, nnz):
    """(row_ptr, cols, t_ptr, t_rows, t_perm) views of a ``sparse_layout`` tensor."""
    a = N + 1
    b = a + nnz
    c = b + K + 1
    d = c + nnz
    return layout[:a], layout[a:b], layout[b:c], layout[c:d], layout[d:d + nnz]


def _block_m(M):
    return max(16, min(64, triton.next_power_of_2(max(1, M))))


def _spmm_add(out, inp, ptr, idx, vals, C, scale, launch):
    M = inp.shape[0]
    if M == 0 or C == 0 or vals.numel() == 0:
        return
    bm = _block_m(M)
    launch(_spmm_add_kernel)[(triton.cdiv(M, bm), C)](
        out, inp, ptr, idx, vals, M, out.stride(0), out.stride(1), inp.stride(0), inp.stride(1), float(scale),
        BLOCK_M=bm, BLOCK_NZ=32)


def sparse_delta_linear_forward(x, weight, bias, values, layout, N, scale, *, wrap=None):
    """y [M, N] for x [M, K]."""
    launch = wrap or _identity
    M, K = x.shape
    if weight is not None:
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    elif bias is not None:
        y = bias.expand(M, N).contiguous()
    else:
        y = x.new_zeros(M, N)
    row_ptr, cols, _, _, _ = split_layout(layout, N, K, values.numel())
    _spmm_add(y, x, row_ptr, cols, values, N, scale, launch)
    return y


def sparse_delta_linear_backward(dy, x, weight, values, indices, layout, scale, need_grad_x, need_grad_values, *,
                                 wrap=None):
    """(grad_x [M, K] or empty, grad_values [nnz] or empty)."""
    launch = wrap or _identity
    M, K = x.shape
    N, nnz = dy.shape[1], values.numel()
    gx, gv = x.new_empty(0), values.new_empty(0)
    if need_grad_x:
        gx = dy @ weight if weight is not None else x.new_zeros(M, K)
        _, _, t_ptr, t_rows, t_perm = split_layout(layout, N, K, nnz)
        _spmm_add(gx, dy, t_ptr, t_rows, values[t_perm.long()], K, scale, launch)
    if need_grad_values:
        dv = torch.zeros(nnz, dtype=torch.float32, device=x.device)
        if nnz and M:
            launch(_sddmm_kernel)[(triton.cdiv(nnz, 64),)](
                dv, dy, x, indices, M, nnz, K, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), float(scale),
                BLOCK_M=_block_m(M), BLOCK_NZ=64)
        gv = dv.to(values.dtype)
    return gx, gv
