"""Triton kernels of pyhappy::moe_lora_linear (a mixture of LoRA experts, forward and backward).

Math (``pyhappy.reference.moe_lora_linear`` is the oracle):

    y = x Wᵀ + b + s · Σ_j g_j · B_{e_j} (A_{e_j} dropout(x)),   (e_j, g_j) the top-k of softmax(x Rᵀ)

The router, top-k and the sort of the (token, slot) assignments by expert are a handful of [M, E]
torch ops (pyhappy.ops.moe_lora_linear.route_and_sort); the base product is one torch matmul. The
adapter is two grouped GEMMs over the experts' contiguous segments of sorted slots:

  ``_seg_mm_kernel``     out[orow(a), :] (+)= scale[a] · src[srow(a), :] · W_e   for the slots a of
                         expert e (one program per (expert, row tile, column tile); rows gathered
                         through an index, results stored per slot or atomically added to a token's row)
  ``_seg_outer_kernel``  G_e = Σ_{a in e} (scale[a] · L[lrow(a), :])ᵀ Rt[rrow(a), :]   (the weight
                         gradients: one program per (expert, tile of G_e), the segment walked in row tiles)

Forward: u = dropout(x)[tok] A_eᵀ (seg_mm, gathered rows), y += s·g·u B_eᵀ (seg_mm, atomic scatter into
an fp32 buffer). Backward: dh = dy[tok] B_e (seg_mm), dA_e and dB_e (seg_outer), dx += du A_e (seg_mm,
atomic scatter), the router's Jacobian in torch. The grid has a row-tile axis sized for every slot in
one expert (no host sync to read the segment sizes); tiles past a segment's end exit at once.

Status: tested on CPU under TRITON_INTERPRET=1 only (no GPU timings claimed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_linear import _dot, _dot_precision

__all__ = ["moe_lora_forward", "moe_lora_backward"]


def _identity(fn):
    return fn


@triton.jit
def _segment(off_ptr):
    """(e, start, end): this program's expert (grid axis 0) and its segment [start, end) of sorted
    slots, read from the offsets the routing sort produced (no host sync for the sizes)."""
    e = tl.program_id(0)
    return e, tl.load(off_ptr + e), tl.load(off_ptr + e + 1)


@triton.jit
def _rows(idx_ptr, a, ma, GATHER: tl.constexpr):
    """The tensor rows that slots ``a`` read: gathered through ``idx`` (e.g. a slot's token) when
    ``GATHER``, else the slots themselves (a tensor already in sorted-slot order)."""
    if GATHER:
        rows = tl.load(idx_ptr + a, mask=ma, other=0)
    else:
        rows = a
    return rows


@triton.jit
def _seg_mm_kernel(src_ptr, srow_ptr, w_ptr, out_ptr, orow_ptr, scale_ptr, off_ptr, P, Q, s_src, s_we, s_wp, s_wq,
                   s_out, GATHER_SRC: tl.constexpr, SCATTER_OUT: tl.constexpr, HAS_SCALE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, PREC: tl.constexpr):
    e, start, end = _segment(off_ptr)
    pm = tl.program_id(1)
    pq = tl.program_id(2)
    if start + pm * BLOCK_M < end:
        a = start + pm * BLOCK_M + tl.arange(0, BLOCK_M)
        ma = a < end
        srow = _rows(srow_ptr, a, ma, GATHER_SRC)
        offs_q = pq * BLOCK_Q + tl.arange(0, BLOCK_Q)
        mq = offs_q < Q
        acc = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            mp = offs_p < P
            xs = tl.load(src_ptr + srow[:, None] * s_src + offs_p[None, :], mask=ma[:, None] & mp[None, :],
                         other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + e * s_we + offs_p[:, None] * s_wp + offs_q[None, :] * s_wq,
                         mask=mp[:, None] & mq[None, :], other=0.0).to(tl.float32)
            acc = _dot(xs, wv, acc, PREC)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + a, mask=ma, other=0.0)[:, None]
        if SCATTER_OUT:
            orow = tl.load(orow_ptr + a, mask=ma, other=0)
            tl.atomic_add(out_ptr + orow[:, None] * s_out + offs_q[None, :], acc, mask=ma[:, None] & mq[None, :])
        else:
            tl.store(out_ptr + a[:, None] * s_out + offs_q[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=ma[:, None] & mq[None, :])


@triton.jit
def _seg_outer_kernel(l_ptr, lrow_ptr, lscale_ptr, r_ptr, rrow_ptr, out_ptr, off_ptr, P, Q, s_l, s_r, s_oe, s_op,
                      s_oq, GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, HAS_SCALE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, PREC: tl.constexpr):
    e, start, end = _segment(off_ptr)
    pp = tl.program_id(1)
    pq = tl.program_id(2)
    offs_p = pp * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mp = offs_p < P
    mq = offs_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        a = m0 + tl.arange(0, BLOCK_M)
        ma = a < end
        lrow = _rows(lrow_ptr, a, ma, GATHER_L)
        rrow = _rows(rrow_ptr, a, ma, GATHER_R)
        lt = tl.load(l_ptr + lrow[None, :] * s_l + offs_p[:, None], mask=mp[:, None] & ma[None, :],
                     other=0.0).to(tl.float32)  # [BLOCK_P, BLOCK_M]
        if HAS_SCALE:
            lt = lt * tl.load(lscale_ptr + a, mask=ma, other=0.0)[None, :]
        rt = tl.load(r_ptr + rrow[:, None] * s_r + offs_q[None, :], mask=ma[:, None] & mq[None, :],
                     other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_Q]
        acc = _dot(lt, rt, acc, PREC)
    tl.store(out_ptr + e * s_oe + offs_p[:, None] * s_op + offs_q[None, :] * s_oq, acc.to(out_ptr.dtype.element_ty),
             mask=mp[:, None] & mq[None, :])


_BM, _BLK = 16, 32


def _seg_mm(launch, src, srow, w, w_strides, out, orow, scale, offsets, P, Q, E, Mk, prec):
    """out[orow(a)] (+)= scale[a] · src[srow(a)] · W_e; W_e[p, q] at w + e·s_we + p·s_wp + q·s_wq."""
    grid = (E, triton.cdiv(max(Mk, 1), _BM), triton.cdiv(Q, _BLK))
    dummy = offsets
    launch(_seg_mm_kernel)[grid](
        src, srow if srow is not None else dummy, w, out, orow if orow is not None else dummy,
        scale if scale is not None else dummy, offsets, P, Q, src.stride(0), *w_strides, out.stride(0),
        GATHER_SRC=srow is not None, SCATTER_OUT=orow is not None, HAS_SCALE=scale is not None,
        BLOCK_M=_BM, BLOCK_P=_BLK, BLOCK_Q=_BLK, PREC=prec)


def _seg_outer(launch, left, lrow, lscale, right, rrow, out, offsets, P, Q, E, prec):
    """out[e] = Σ_{a in e} (lscale[a] · left[lrow(a)])ᵀ right[rrow(a)]  ([P, Q] per expert)."""
    grid = (E, triton.cdiv(P, _BLK), triton.cdiv(Q, _BLK))
    dummy = offsets
    launch(_seg_outer_kernel)[grid](
        left, lrow if lrow is not None else dummy, lscale if lscale is not None else dummy, right,
        rrow if rrow is not None else dummy, out, offsets, P, Q, left.stride(0), right.stride(0), out.stride(0),
        out.stride(1), out.stride(2), GATHER_L=lrow is not None, GATHER_R=rrow is not None,
        HAS_SCALE=lscale is not None, BLOCK_M=_BM, BLOCK_P=_BLK, BLOCK_Q=_BLK, PREC=prec)


def _dropout(x2, p, seed):
    from pyhappy import reference

    return reference.dropout(x2, p, seed)


def moe_lora_forward(x2, weight, bias, router_weight, lora_A, lora_B, top_k, normalize, scaling, dropout_p, seed, *,
                     wrap=None):
    """(y, logits, gates, experts, perm, offsets, hidden) for x2 [M, K], as the op returns them."""
    from pyhappy.ops.moe_lora_linear import _base, route_and_sort

    launch = wrap or _identity
    M, K = x2.shape
    E, r, N = lora_A.shape[0], lora_A.shape[1], lora_B.shape[1]
    logits, gates, experts, perm, offsets = route_and_sort(x2, router_weight, top_k, normalize)
    y = _base(x2, weight, bias, N)
    Mk = perm.shape[0]
    hidden = x2.new_empty(Mk, r)
    if M == 0:
        return y, logits, gates, experts, perm, offsets, hidden
    prec = _dot_precision(x2.dtype)
    x2 = x2.contiguous()
    A, B = lora_A.contiguous(), lora_B.contiguous()
    tok = perm // top_k
    sg = (gates.reshape(-1)[perm] * scaling).float().contiguous()
    xd = _dropout(x2, dropout_p, seed).contiguous()
    _seg_mm(launch, xd, tok, A, (A.stride(0), A.stride(2), A.stride(1)), hidden, None, None, offsets, K, r, E, Mk,
            prec)
    yacc = torch.zeros(M, N, dtype=torch.float32, device=x2.device)
    _seg_mm(launch, hidden, None, B, (B.stride(0), B.stride(2), B.stride(1)), yacc, tok, sg, offsets, r, N, E, Mk,
            prec)
    y = (y.float() + yacc).to(x2.dtype)
    return y, logits, gates, experts, perm, offsets, hidden


def moe_lora_backward(dy, dlogits, x2, weight, router_weight, lora_A, lora_B, logits, gates, experts, perm, offsets,
                      hidden, top_k, normalize, scaling, dropout_p, seed, need_grad_x, *, wrap=None):
    """(gx or None, gR, gA, gB) for dy [M, N], x2 [M, K]."""
    from pyhappy.ops.moe_lora_linear import router_backward

    launch = wrap or _identity
    M, K = x2.shape
    E, r, N = lora_A.shape[0], lora_A.shape[1], lora_B.shape[1]
    Mk = perm.shape[0]
    prec = _dot_precision(x2.dtype)
    x2, dy = x2.contiguous(), dy.contiguous()
    A, B = lora_A.contiguous(), lora_B.contiguous()
    hidden = hidden.contiguous()
    tok = perm // top_k
    sg = (gates.reshape(-1)[perm] * scaling).float().contiguous()
    dh = torch.zeros(Mk, r, dtype=torch.float32, device=x2.device)
    gA = torch.zeros(A.shape, dtype=torch.float32, device=x2.device)
    gB = torch.zeros(B.shape, dtype=torch.float32, device=x2.device)
    dxa = torch.zeros(M, K, dtype=torch.float32, device=x2.device)
    if M > 0:
        xd = _dropout(x2, dropout_p, seed).contiguous()
        _seg_mm(launch, dy, tok, B, (B.stride(0), B.stride(1), B.stride(2)), dh, None, None, offsets, N, r, E, Mk,
                prec)
        du = (dh * sg[:, None]).contiguous()
        _seg_outer(launch, du, None, None, xd, tok, gA, offsets, r, K, E, prec)
        _seg_outer(launch, dy, tok, sg, hidden, None, gB, offsets, N, r, E, prec)
        if need_grad_x:
            _seg_mm(launch, du, None, A, (A.stride(0), A.stride(1), A.stride(2)), dxa, tok, None, offsets, r, K, E,
                    Mk, prec)
    dgate = torch.empty(Mk, dtype=logits.dtype, device=x2.device)
    dgate[perm] = (dh * hidden.float()).sum(1).to(logits.dtype) * scaling
    dl = router_backward(logits, gates, experts, dgate.reshape(M, top_k), normalize)
    if dlogits is not None:
        dl = dl + dlogits
    dl = dl.to(x2.dtype)
    gR = dl.t() @ x2
    gx = None
    if need_grad_x:
        gx = _dropout(dxa.to(x2.dtype), dropout_p, seed).addmm(dl, router_weight)
        if weight is not None:
            gx = gx.addmm(dy, weight)
    return gx, gR, gA.to(x2.dtype), gB.to(x2.dtype)
