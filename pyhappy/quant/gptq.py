"""GPTQ / OPTQ (Frantar et al., 2022): quantize a weight column by column, feeding each column's
rounding error forward to the columns not yet quantized through the inverse Hessian of the layer's
reconstruction loss ||X Wᵀ - X Qᵀ||², H = 2 XᵀX / n from calibration inputs X.

Same grid as round-to-nearest (intq.rtn_params: asymmetric, float16 scales, integer zeros), with
group parameters chosen when a group starts, on the error-updated weights. With ``act_order``
columns are processed by decreasing Hessian diagonal and the result is returned in that order with
its permutation (groups are contiguous in it, which is what the kernels want).
"""

from __future__ import annotations

import torch

from .intq import FORMAT_OF_BITS, rtn_params
from .weight import register_codecs


def hessian(calib: torch.Tensor, K: int) -> torch.Tensor:
    """2 XᵀX / n in float64 from calibration inputs [..., K]."""
    if not isinstance(calib, torch.Tensor) or calib.shape[-1] != K or calib.numel() == 0:
        raise ValueError(f"quantize_gptq: calib must be a non-empty tensor [..., K] with K = {K}, got "
                         f"{tuple(calib.shape) if isinstance(calib, torch.Tensor) else type(calib).__name__}")
    X = calib.reshape(-1, K).double()
    return 2.0 * X.t() @ X / X.shape[0]


def quantize_gptq(weight: torch.Tensor, calib: torch.Tensor, bits: int, group_size: int, act_order: bool = False,
                  damp: float = 0.01, block: int = 128, sym: bool = False):
    """OPTQ-quantize a [N, K] weight: (codes uint8 [N, K], scales [N, G], zeros [N, G]) and, with
    act_order, the permutation (kernel column j = original column perm[j])."""
    if bits not in FORMAT_OF_BITS:
        raise ValueError(f"quantize_gptq: bits must be 3 or 4, got {bits!r}")
    if weight.dim() != 2:
        raise ValueError(f"quantize_gptq: weight must be [N, K], got {tuple(weight.shape)}")
    N, K = weight.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(f"quantize_gptq: group_size must divide K = {K}, got {group_size}")
    if not (0.0 < damp < 1.0):
        raise ValueError(f"quantize_gptq: damp must be in (0, 1), got {damp}")
    if block <= 0:
        raise ValueError(f"quantize_gptq: block must be positive, got {block}")
    qmax = 2**bits - 1
    H = hessian(calib, K)
    W = weight.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    G = K // group_size
    codes = torch.zeros(N, K, dtype=torch.uint8)
    scales = torch.zeros(N, G, dtype=torch.float32)
    zeros = torch.zeros(N, G, dtype=torch.float32)
    scale = zero = None
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # group parameters from the error-updated weights of this group
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group_size]
                scale, zero = (t.double() for t in rtn_params(ahead.float(), bits, sym))
                scales[:, col // group_size] = scale.float()
                zeros[:, col // group_size] = zero.float()
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            err = (w - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    out = (codes, scales, zeros.to(torch.uint8))
    return out + (perm,) if perm is not None else out


register_codecs(quantize_gptq=quantize_gptq)
