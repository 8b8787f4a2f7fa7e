"""INT4 / INT3, group-wise asymmetric along K: round-to-nearest quantizer and GPTQ checkpoints.

    w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g],   g = group of column k

GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers):
  qweight int32 [K * bits / 32, N]  codes packed along K, least-significant bits first; 3-bit packs
                                    32 values into 3 words, values 10 and 21 straddling word edges
  qzeros  int32 [G, N * bits / 32]  zero points packed the same way along N
  scales  float16 [G, N]
  g_idx   int32 [K]                 the group of each column (act-order: any permutation of groups)
  "gptq" (v1) checkpoints store zero - 1, "gptq_v2" the zero itself.
Act-order columns are reordered so every group is contiguous (QuantizedWeight.perm); export
restores the checkpoint's order exactly.
"""

from __future__ import annotations

import torch

from .weight import QuantizedWeight, register_codecs

FORMAT_OF_BITS = {4: "int4", 3: "int3"}


def rtn_params(w: torch.Tensor, bits: int, sym: bool = False):
    """Grid of one or more groups (last dim = the group): (scale float32 [...], zero float32 [...]).

    Asymmetric: scale = (max - min) / (2^b - 1) rounded to float16 (what is stored), zero =
    round(-min / scale) clamped to the code range (the range always includes 0, so zeros are exact);
    symmetric: zero = 2^(b-1), scale = max|w| / (2^(b-1) - 1). An all-zero group gets scale 1.
    """
    qmax = 2**bits - 1
    w = w.float()
    if sym:
        amax = w.abs().amax(-1)
        scale = amax / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))  # float16 underflow
    if not sym:
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool = False):
    """Round to nearest on the group grid: (codes uint8 [N, K], scales float32 [N, G], zeros [N, G])."""
    if bits not in FORMAT_OF_BITS:
        raise ValueError(f"quantize_rtn: bits must be 3 or 4, got {bits!r}")
    if weight.dim() != 2:
        raise ValueError(f"quantize_rtn: weight must be [N, K], got {tuple(weight.shape)}")
    N, K = weight.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(f"quantize_rtn: group_size must divide K = {K}, got {group_size}")
    wg = weight.detach().float().reshape(N, K // group_size, group_size)
    scale, zero = rtn_params(wg, bits, sym)
    q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
    return q.to(torch.uint8).reshape(N, K), scale, zero.to(torch.uint8)


# ---- GPTQ bit packing ----------------------------------------------------------------------------


def pack_gptq(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along dim 0 ([R, C] with R * bits % 32 == 0) into int32 [R * bits / 32, C], least
    significant bits first (a 3-bit value may straddle two words)."""
    R, C = values.shape
    if (R * bits) % 32:
        raise ValueError(f"pack_gptq: {R} values of {bits} bits do not fill whole 32-bit words")
    v = values.to(torch.int64)
    words = torch.zeros(R * bits // 32, C, dtype=torch.int64, device=values.device)
    for i in range(R):  # R is K or N: a few thousand rows of vectorised work
        bit = i * bits
        w, s = divmod(bit, 32)
        words[w] |= (v[i] << s) & 0xFFFFFFFF
        if s + bits > 32:
            words[w + 1] |= v[i] >> (32 - s)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # as signed int32, like the checkpoints


def unpack_gptq(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_gptq: int32 [W, C] -> int64 codes [count, C]."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(count, words.shape[1], dtype=torch.int64, device=words.device)
    mask = 2**bits - 1
    for i in range(count):
        w, s = divmod(i * bits, 32)
        val = u[w] >> s
        if s + bits > 32:
            val = val | (u[w + 1] << (32 - s))
        out[i] = val & mask
    return out


def from_gptq(qweight, qzeros, scales, g_idx=None, bits=4, group_size=128, sym=False, checkpoint_format="gptq"):
    """QuantizedWeight from one GPTQ checkpoint layer (see the module docstring)."""
    if bits not in FORMAT_OF_BITS:
        raise ValueError(f"from_gptq: bits must be 3 or 4, got {bits!r}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"from_gptq: checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    for name, t, dt in (("qweight", qweight, torch.int32), ("qzeros", qzeros, torch.int32)):
        if not isinstance(t, torch.Tensor) or t.dtype != dt or t.dim() != 2:
            raise ValueError(f"from_gptq: {name} must be a 2-D int32 tensor, got "
                             f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or not scales.is_floating_point():
        raise ValueError("from_gptq: scales must be a 2-D float tensor [groups, N]")
    N = qweight.shape[1]
    K = qweight.shape[0] * 32 // bits
    if qweight.shape[0] * 32 % bits:
        raise ValueError(f"from_gptq: qweight has {qweight.shape[0]} rows, not a whole number of {bits}-bit columns")
    if isinstance(group_size, int) and not isinstance(group_size, bool) and group_size > 0 and scales.shape[0] >= 1:
        # scales [G, N] and group_size fix K on their own: say which tensor disagrees, rather than
        # blaming group_size for a qweight of the wrong height
        K_scales = scales.shape[0] * group_size
        if K_scales != K:
            rows = K_scales * bits / 32
            rows = int(rows) if rows == int(rows) else rows
            G = scales.shape[0]
            alt = f"; or group_size = {K // G}" if K % G == 0 and (K // G) % 32 == 0 else ""
            raise ValueError(f"from_gptq: qweight has {qweight.shape[0]} rows (K = {K} at {bits} bits) but scales "
                             f"{tuple(scales.shape)} with group_size = {group_size} cover K = {K_scales} (qweight "
                             f"would have {rows} rows{alt})")
    if group_size == -1:
        group_size = K
    if not isinstance(group_size, int) or group_size <= 0 or K % group_size:
        raise ValueError(f"from_gptq: group_size must divide K = {K} (or be -1), got {group_size!r}")
    G = K // group_size
    if tuple(scales.shape) != (G, N):
        raise ValueError(f"from_gptq: scales must be [K / group_size, N] = [{G}, {N}], got {tuple(scales.shape)}")
    if tuple(qzeros.shape) != (G, N * bits // 32):
        raise ValueError(f"from_gptq: qzeros must be [{G}, {N * bits // 32}] for {bits}-bit, got {tuple(qzeros.shape)}")
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("from_gptq: scales hold NaN/inf entries; scales must be finite")
    q = unpack_gptq(qweight, bits, K).t()  # [N, K]
    z = unpack_gptq(qzeros.t().contiguous(), bits, N)  # packed along N: [N, G]
    if checkpoint_format == "gptq":
        z = (z + 1) & (2**bits - 1)
    default_gidx = torch.arange(K, device=qweight.device) // group_size
    perm = None
    extra = {"gptq_g_idx": None if g_idx is None else torch.as_tensor(g_idx).clone(),
             "checkpoint_format": checkpoint_format}
    if g_idx is not None:
        g_idx = torch.as_tensor(g_idx).to(torch.int64).to(qweight.device)
        if tuple(g_idx.shape) != (K,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= G:
            raise ValueError(f"from_gptq: g_idx must be [K = {K}] with groups in [0, {G})")
        counts = torch.bincount(g_idx, minlength=G)
        if not bool((counts == group_size).all()):
            raise ValueError("from_gptq: every group of g_idx must hold exactly group_size columns")
        if not torch.equal(g_idx, default_gidx):
            perm = torch.sort(g_idx, stable=True).indices
            q = q[:, perm]
    scales_ng = scales.float().t().contiguous()
    return QuantizedWeight.from_codes(FORMAT_OF_BITS[bits], q.to(torch.uint8).contiguous(), scales_ng,
                                      z.to(torch.uint8), group_size=group_size, dtype=torch.float16, perm=perm,
                                      extra=extra)


def to_gptq(qw: QuantizedWeight, checkpoint_format: str | None = None) -> dict:
    """The GPTQ checkpoint tensors of an int4/int3 weight (dict qweight, qzeros, scales, g_idx, bits,
    group_size); import then export is bit-exact."""
    bits = qw.bits
    fmt = checkpoint_format or qw.data["extra"].get("checkpoint_format", "gptq")
    codes, scales, zeros = qw.codes()
    N, K = qw.shape
    G = K // qw.group_size
    if qw.perm is not None:
        orig = torch.empty_like(codes)
        orig[:, qw.perm] = codes
        codes = orig
        g_idx = torch.empty(K, dtype=torch.int64)
        g_idx[qw.perm.cpu()] = torch.arange(K) // qw.group_size
    else:
        g_idx = torch.arange(K) // qw.group_size
    saved = qw.data["extra"].get("gptq_g_idx")
    if saved is not None:
        g_idx = saved.clone()
    z = zeros.to(torch.int64)
    if fmt == "gptq":
        z = (z - 1) & (2**bits - 1)
    return {
        "qweight": pack_gptq(codes.t(), bits),
        "qzeros": pack_gptq(z, bits).t().contiguous(),
        "scales": scales.t().to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32),
        "bits": bits,
        "group_size": qw.group_size,
    }


register_codecs(from_gptq=from_gptq, to_gptq=to_gptq, quantize_rtn=quantize_rtn)
