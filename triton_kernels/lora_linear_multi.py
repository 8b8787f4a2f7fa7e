"""Triton kernels of pyhappy::lora_linear_multi (one batch, many LoRA adapters).

Math (``pyhappy.reference.lora_linear_multi`` is the oracle):

    y[m] = x[m] Wᵀ + bias + s_a · (x[m] A_aᵀ) B_aᵀ,   a = adapter_index[m]  (-1: none)

The base product is one torch matmul (cuBLAS). The low-rank part is the gather scheme of
multi-LoRA servers (Punica's BGMV): ``_shrink_kernel`` computes u[m] = x[m]·A[a]ᵀ for every row
(one program per row, A_a gathered by the row's index, K walked in blocks), ``_expand_kernel``
adds s_a·u[m]·B[a]ᵀ into y (one program per (row, N block)). Two launches for the whole batch,
whatever the number of adapters; rows with index -1 are skipped.

Status: tested on CPU under TRITON_INTERPRET=1 only; never run on a GPU yet (no timings claimed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["lora_linear_multi_forward"]


def _identity(fn):
    return fn


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, idx_ptr, u_ptr, K, R, L, s_xm, s_al, s_ar, s_um,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    a = tl.load(idx_ptr + m).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if (a >= 0) & (a < L):
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mk = offs_k < K
            xv = tl.load(x_ptr + m * s_xm + offs_k, mask=mk, other=0.0).to(tl.float32)
            av = tl.load(a_ptr + a * s_al + offs_r[:, None] * s_ar + offs_k[None, :],
                         mask=(offs_r[:, None] < R) & mk[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
    tl.store(u_ptr + m * s_um + offs_r, acc, mask=offs_r < R)


@triton.jit
def _expand_kernel(y_ptr, u_ptr, b_ptr, s_ptr, idx_ptr, N, R, L, s_ym, s_um, s_bl, s_bn,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0)
    pn = tl.program_id(1)
    a = tl.load(idx_ptr + m).to(tl.int64)
    if (a >= 0) & (a < L):
        offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        mn = offs_n < N
        u = tl.load(u_ptr + m * s_um + offs_r, mask=offs_r < R, other=0.0)
        bv = tl.load(b_ptr + a * s_bl + offs_n[:, None] * s_bn + offs_r[None, :],
                     mask=mn[:, None] & (offs_r[None, :] < R), other=0.0).to(tl.float32)
        d = tl.sum(bv * u[None, :], axis=1) * tl.load(s_ptr + a)
        yp = y_ptr + m * s_ym + offs_n
        prev = tl.load(yp, mask=mn, other=0.0).to(tl.float32)
        tl.store(yp, (prev + d).to(y_ptr.dtype.element_ty), mask=mn)


def lora_linear_multi_forward(x, weight, bias, lora_A, lora_B, scalings, adapter_index, *, wrap=None):
    """y [M, N] for x [M, K]."""
    launch = wrap or _identity
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[1]
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    if M == 0:
        return y
    x = x.contiguous()
    A = lora_A.contiguous()
    B = lora_B.contiguous()
    idx = adapter_index.contiguous()
    u = torch.empty(M, R, dtype=torch.float32, device=x.device)
    br = triton.next_power_of_2(R)
    L = A.shape[0]
    launch(_shrink_kernel)[(M,)](x, A, idx, u, K, R, L, x.stride(0), A.stride(0), A.stride(1), u.stride(0),
                                 BLOCK_R=br, BLOCK_K=128)
    bn = 128
    launch(_expand_kernel)[(M, triton.cdiv(N, bn))](y, u, B, scalings, idx, N, R, L, y.stride(0), u.stride(0),
                                                    B.stride(0), B.stride(1), BLOCK_R=br, BLOCK_N=bn)
    return y
