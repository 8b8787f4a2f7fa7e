"""Pure-PyTorch reference of every pyhappy op: the oracle for tests and benchmarks.

Everything here is written for clarity, not speed, and uses only ordinary torch ops so that it
runs on any device and under ``torch.compile``. Every backend (C++ CPU, Triton, CUDA) must agree
with these functions; the dropout mask in particular is defined *here*, bit for bit, and each
backend regenerates exactly the same mask from the same seed.
"""

from __future__ import annotations

import math

import torch

from .quant.layout import dequantize_packed

_M32 = 0xFFFFFFFF

# Dropout mask: a counter-based hash of (seed, row, col), so that the forward never stores a mask
# and the backward regenerates it. The same 32-bit arithmetic is written in C++
# (csrc/cpu/dropout_hash.h) and Triton (triton_kernels/lora_linear.py).
#   a    = mix32(seed + row * 0x9E3779B9)      (uint32 wrap-around)
#   h    = mix32(a ^ col)
#   keep = h >= threshold,  threshold = dropout_threshold(p)
# mix32 is Chris Wellons' "lowbias32" integer hash.
_GOLDEN = 0x9E3779B9
_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow."""
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _MIX_1)
    h = h ^ (h >> 15)
    h = _mul32(h, _MIX_2)
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """uint32 threshold: an element is kept when its hash is >= this value. p must be in [0, 1)."""
    return min(int(p * 4294967296.0), _M32)


def dropout_keep_mask(seed, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean [rows, cols] mask of the elements that survive dropout with probability p.

    seed: a Python int or an int64 tensor of one element (read on device, no host sync)."""
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(-1)[:1].to(device=device, dtype=torch.int64) & _M32
    else:
        s = int(seed) & _M32
    r = torch.arange(rows, dtype=torch.int64, device=device)
    c = torch.arange(cols, dtype=torch.int64, device=device)
    a = mix32((s + _mul32(r, _GOLDEN)) & _M32)
    h = mix32(a[:, None] ^ c[None, :])
    return h >= dropout_threshold(p)


def dropout(x2d: torch.Tensor, p: float, seed) -> torch.Tensor:
    """Inverted dropout of a 2-D tensor with the pyhappy hash mask (identity when p == 0)."""
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)
    return torch.where(keep, x2d * (1.0 / (1.0 - p)), torch.zeros((), dtype=x2d.dtype, device=x2d.device))


# ----------------------------------------------------------------------------------------------
# low-rank: lora_linear
# ----------------------------------------------------------------------------------------------


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, lora_C=None, dropout_p=0.0, seed=0):
    """y = x Wᵀ + bias + s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ.

    x [..., K], weight [N, K], bias [N] or None, lora_A [r, K], lora_B [N, r], lora_C [r, r] or None.
    Returns (y [..., N], u [..., r]) where u = dropout(x) Aᵀ is the low-rank hidden state that the
    backward reuses. Differentiable with ordinary autograd (this is also the gradcheck oracle).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    u = dropout(x2, dropout_p, seed) @ lora_A.t()
    v = u if lora_C is None else u @ lora_C.t()
    y = x2 @ weight.t() + scaling * (v @ lora_B.t())
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[0]), u.reshape(*lead, lora_A.shape[0])


def lora_linear_backward(grad_out, x, weight, lora_A, lora_B, lora_C, lora_hidden, scaling, dropout_p, seed,
                         need_grad_x=True):
    """Explicit backward of :func:`lora_linear` (what every backend's backward must compute).

    grad_out [..., N], lora_hidden u [..., r]. Returns (grad_x [..., K] or None, grad_A [r, K],
    grad_B [N, r], grad_C [r, r] or None). The base weight gets no gradient here.
    """
    K = x.shape[-1]
    N = weight.shape[0]
    r = lora_A.shape[0]
    dy = grad_out.reshape(-1, N)
    x2 = x.reshape(-1, K)
    u = lora_hidden.reshape(-1, r)
    v = u if lora_C is None else u @ lora_C.t()
    dv = scaling * (dy @ lora_B)
    grad_B = scaling * (dy.t() @ v)
    grad_C = None if lora_C is None else dv.t() @ u
    du = dv if lora_C is None else dv @ lora_C
    xd = dropout(x2, dropout_p, seed)
    grad_A = du.t() @ xd
    grad_x = None
    if need_grad_x:
        dlr = du @ lora_A
        dlr = dropout(dlr, dropout_p, seed)
        grad_x = (dy @ weight + dlr).reshape(x.shape)
    return grad_x, grad_A, grad_B, grad_C


# ----------------------------------------------------------------------------------------------
# DoRA: dora_linear (PEFT's formulation, peft/tuners/lora/dora.py and variants.py)
# ----------------------------------------------------------------------------------------------


def dora_weight_norm(weight, lora_A, lora_B, scaling):
    """‖W_n + s·B_n A‖ for every row n, [N] in weight's dtype: PEFT's DoraLinearLayer.get_weight_norm,
    which forms W + s·BA ([N, K]). The oracle; the ops never form it."""
    w = weight + scaling * (lora_B @ lora_A)
    return torch.linalg.vector_norm(w, dim=1).to(weight.dtype)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p=0.0, seed=0):
    """PEFT's DoRA layer with ms = magnitude / weight_norm (the norm an input: DoRA detaches it):

        y = x Wᵀ + b + (ms - 1) ⊙ (xd Wᵀ) + ms ⊙ s · (xd Aᵀ) Bᵀ,    xd = dropout(x)

    With dropout off (xd = x) this is ms ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b. x [..., K], weight [N, K],
    bias [N] or None, lora_A [r, K], lora_B [N, r], magnitude and weight_norm [N]. Returns y [..., N];
    differentiable with ordinary autograd (the gradient oracle, weight_norm included)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xd = dropout(x2, dropout_p, seed)
    ms = magnitude / weight_norm
    base = x2 @ weight.t()
    base_d = base if dropout_p == 0.0 else xd @ weight.t()
    y = base + (ms - 1) * base_d + ms * (scaling * ((xd @ lora_A.t()) @ lora_B.t()))
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[0])


# ----------------------------------------------------------------------------------------------
# VeRA / PVeRA: vera_linear, pvera_linear (PEFT's formulation, peft/tuners/vera, peft/tuners/pvera)
# ----------------------------------------------------------------------------------------------


def gaussian_noise(seed, rows: int, cols: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal [rows, cols] from the dropout hash, a pure function of (seed, row, col) like
    the dropout mask, so a backward regenerates it instead of storing it. Box-Muller on two hashed
    uniforms per pair of columns (2k, 2k + 1): with a = mix32(seed + row·0x9E3779B9),

        h1 = mix32(a ^ 2k),  h2 = mix32(a ^ (2k + 1)),
        u1 = (h1 + 0.5) / 2³²  (never 0),  u2 = h2 / 2³²,  ρ = sqrt(-2 ln u1),  θ = 2π u2,
        ε[row, 2k] = ρ cos θ,  ε[row, 2k + 1] = ρ sin θ

    computed in float64 and rounded to ``dtype`` (the C++ kernel gaussian_noise_cpu computes the same).
    seed: a Python int or an int64 tensor of one element."""
    if isinstance(seed, torch.Tensor):
        s = seed.reshape(-1)[:1].to(device=device, dtype=torch.int64) & _M32
    else:
        s = int(seed) & _M32
    pairs = (cols + 1) // 2
    r = torch.arange(rows, dtype=torch.int64, device=device)
    k2 = 2 * torch.arange(pairs, dtype=torch.int64, device=device)
    a = mix32((s + _mul32(r, _GOLDEN)) & _M32)[:, None]
    u1 = (mix32(a ^ k2[None, :]).double() + 0.5) * (1.0 / 4294967296.0)
    theta = mix32(a ^ (k2 + 1)[None, :]).double() * (2.0 * math.pi / 4294967296.0)
    rho = torch.sqrt(-2.0 * torch.log(u1))
    eps = torch.stack([rho * torch.cos(theta), rho * torch.sin(theta)], dim=-1).reshape(rows, 2 * pairs)
    return eps[:, :cols].to(dtype)


def vera_linear(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, dropout_p=0.0, seed=0):
    """PEFT's VeRA layer: y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (dropout(x) Aᵀ)) Bᵀ).

    x [..., K], weight [N, K], bias [N] or None, vera_A [r, K], vera_B [N, r] (the shared projections,
    already sliced to the layer), lambda_d [r], lambda_b [N]. Returns y [..., N]; differentiable with
    ordinary autograd (the gradient oracle)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    h = lambda_d * (dropout(x2, dropout_p, seed) @ vera_A.t())
    y = x2 @ weight.t() + lambda_b * (h @ vera_B.t())
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[0])


def pvera_linear(x, weight, bias, pvera_A, pvera_B, lambda_d, lambda_b, dropout_p=0.0, seed=0, sample=False,
                 noise_seed=0, noise=None):
    """PEFT's PVeRA layer: (μ, log σ²) = chunk(λ_d ⊙ (dropout(x) Aᵀ), 2), h = μ + ε ⊙ exp(½ log σ²)
    when ``sample`` (training, or PEFT's sample_at_inference) else μ, y = x Wᵀ + b + λ_b ⊙ (h Bᵀ).

    pvera_A [2r, K], pvera_B [N, r], lambda_d [2r], lambda_b [N]. ε: ``noise`` [M, r] if given (e.g.
    torch.randn, as PEFT draws it), else gaussian_noise(noise_seed, M, r). Returns y [..., N];
    differentiable with ordinary autograd."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    mu, logvar = (lambda_d * (dropout(x2, dropout_p, seed) @ pvera_A.t())).chunk(2, dim=-1)
    if sample:
        eps = noise if noise is not None else gaussian_noise(noise_seed, x2.shape[0], mu.shape[1], mu.dtype,
                                                             x2.device)
        h = mu + eps * torch.exp(0.5 * logvar)
    else:
        h = mu
    y = x2 @ weight.t() + lambda_b * (h @ pvera_B.t())
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, weight.shape[0])


# ----------------------------------------------------------------------------------------------
# quantized base: quant_linear (packed layout: pyhappy/quant/layout.py)
# ----------------------------------------------------------------------------------------------

_FORMAT_NAMES = ("nf4", "int4", "int3")


def quant_dequantize(qdata, scales, zeros, fmt: int, n: int, k: int, group_size: int) -> torch.Tensor:
    """Float32 [n, k] weight of packed data; ``fmt`` is layout.FORMAT_CODE (0 nf4, 1 int4, 2 int3)."""
    return dequantize_packed(qdata, scales, zeros, _FORMAT_NAMES[fmt], n, k, group_size)


def quant_linear(x, qdata, scales, zeros, fmt, N, group_size, bias, lora_A, lora_B, lora_C, scaling,
                 dropout_p=0.0, seed=0):
    """y = x · deq(Wq)ᵀ + bias + s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ, the LoRA part optional (lora_A None).

    x [M, K] in kernel column order (act-order permutation already applied). The weight is
    dequantized in float32 and cast to x's dtype, so in float32 this is exact to rounding.
    Returns (y [M, N], u [M, r]) with u = dropout(x) Aᵀ ([M, 0] without LoRA).
    """
    w = quant_dequantize(qdata, scales, zeros, fmt, N, x.shape[-1], group_size).to(x.dtype)
    if lora_A is None:
        y = x @ w.t()
        if bias is not None:
            y = y + bias
        return y, x.new_zeros(x.shape[0], 0)
    return lora_linear(x, w, bias, lora_A, lora_B, scaling, lora_C, dropout_p, seed)


def quant_linear_backward(grad_out, x, qdata, scales, zeros, fmt, group_size, lora_A, lora_B, lora_C, lora_hidden,
                          scaling, dropout_p, seed, need_grad_x=True):
    """Explicit backward of :func:`quant_linear`: (grad_x or None, grad_A, grad_B, grad_C), the
    adapter grads None without LoRA. grad_x = dy · deq(Wq) + the adapter's part."""
    N = grad_out.shape[-1]
    w = quant_dequantize(qdata, scales, zeros, fmt, N, x.shape[-1], group_size).to(x.dtype)
    if lora_A is None:
        return (grad_out @ w if need_grad_x else None), None, None, None
    return lora_linear_backward(grad_out, x, w, lora_A, lora_B, lora_C, lora_hidden, scaling, dropout_p, seed,
                                need_grad_x)


# ----------------------------------------------------------------------------------------------
# sparse delta: sparse_delta_linear (ΔW[n, k] = values[i] at indices[i] = n·K + k)
# ----------------------------------------------------------------------------------------------


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nnz_chunks(M: int, nnz: int):
    """Chunks of the pattern so that the gathered [M, chunk] operand stays ~16M elements."""
    step = max(1, (1 << 24) // max(1, M))
    return [(i, min(nnz, i + step)) for i in range(0, nnz, step)]


def sparse_delta_product(x, values, indices, N: int):
    """x · ΔWᵀ [M, N] in the accumulation dtype (fp32, or fp64 for fp64), without a dense ΔW."""
    M, K = x.shape
    acc = _acc_dtype(x.dtype)
    idx = indices.long()
    rows, cols = idx // K, idx % K
    out = torch.zeros(M, N, dtype=acc, device=x.device)
    for a, b in _nnz_chunks(M, idx.numel()):
        out.index_add_(1, rows[a:b], x[:, cols[a:b]].to(acc) * values[a:b].to(acc))
    return out


def sparse_delta_linear(x, weight, bias, values, indices, N: int, scale: float):
    """y = x · (W + s·ΔW)ᵀ + bias (W may be None), accumulated in fp32 and returned in x's dtype."""
    acc = _acc_dtype(x.dtype)
    y = scale * sparse_delta_product(x, values, indices, N)
    if weight is not None:
        y = y + x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def sparse_delta_linear_backward(grad_out, x, weight, values, indices, scale: float, need_grad_x=True,
                                 need_grad_values=True):
    """(grad_x or None, grad_values or None) of :func:`sparse_delta_linear`: grad_x = dy·(W + s·ΔW),
    grad_values[i] = s · Σ_m dy[m, n_i] · x[m, k_i] (the sampled product; no dense dW)."""
    M, K = x.shape
    acc = _acc_dtype(x.dtype)
    idx = indices.long()
    rows, cols = idx // K, idx % K
    gx = gv = None
    if need_grad_x:
        d = torch.zeros(M, K, dtype=acc, device=x.device)
        for a, b in _nnz_chunks(M, idx.numel()):
            d.index_add_(1, cols[a:b], grad_out[:, rows[a:b]].to(acc) * values[a:b].to(acc))
        gx = scale * d
        if weight is not None:
            gx = gx + grad_out.to(acc) @ weight.to(acc)
        gx = gx.to(x.dtype)
    if need_grad_values:
        parts = [(grad_out[:, rows[a:b]].to(acc) * x[:, cols[a:b]].to(acc)).sum(0)
                 for a, b in _nnz_chunks(M, idx.numel())]
        gv = (scale * (torch.cat(parts) if parts else values.new_zeros(0, dtype=acc))).to(values.dtype)
    return gx, gv


# ----------------------------------------------------------------------------------------------
# multi-adapter batches: lora_linear_multi
# ----------------------------------------------------------------------------------------------


def lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_index):
    """y[m] = x[m] Wᵀ + bias + s_a (x[m] A_aᵀ) B_aᵀ, a = adapter_index[m] (-1: none), accumulated in fp32
    (fp64 for fp64). Each row gathers its own A_a, B_a (static shapes, so it also runs on fake tensors)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    idx = adapter_index.reshape(-1).long()
    keep = (idx >= 0).to(acc)
    a = idx.clamp(min=0)
    u = torch.einsum("mk,mrk->mr", x.to(acc), lora_A.to(acc)[a])
    d = torch.einsum("mr,mnr->mn", u, lora_B.to(acc)[a])
    return (y + d * (scalings.to(acc)[a] * keep)[:, None]).to(x.dtype)


def tt_matrix_full(cores, N: int, K: int):
    """ΔW [N, K] of TT-matrix cores G_i [r_{i-1}, n_i, k_i, r_i] (r_0 = r_d = 1), by its definition
    ΔW[(n_1..n_d), (k_1..k_d)] = G_1[:, n_1, k_1, :] ··· G_d[:, n_d, k_d, :] (row and column indices
    mixed-radix, the first mode most significant), padding sliced off."""
    T = cores[0].new_ones(1, 1, 1)  # [rows so far, columns so far, trailing rank]
    for G in cores:
        r, n, k, r1 = G.shape
        T = torch.einsum("abr,rnks->anbks", T, G).reshape(T.shape[0] * n, T.shape[1] * k, r1)
    return T[:N, :K, 0]


def tt_linear(x, weight, bias, cores, N: int, scaling: float):
    """pyhappy::tt_linear: x [M, K] · (W + s·ΔW)ᵀ + b with ΔW [N, K] the TT-matrix of ``cores``
    [r_{i-1}, n_i, k_i, r_i] (padding sliced off), formed densely here; W None: s·x·ΔWᵀ + b."""
    delta = scaling * tt_matrix_full(cores, N, x.shape[-1])
    y = x @ (delta if weight is None else weight + delta).t()
    return y + bias if bias is not None else y


# ----------------------------------------------------------------------------------------------
# mixture of LoRA experts: moe_lora_linear
# ----------------------------------------------------------------------------------------------


def moe_route(x2, router_weight, top_k: int, normalize: bool):
    """The router of pyhappy::moe_lora_linear: (logits [M, E], gates [M, k], experts [M, k] int64),
    logits and gates in fp32 (fp64 for fp64 inputs).

    logits = x Rᵀ (in x's dtype, then fp32), probabilities softmax in fp32 (fp64 for fp64), the top_k experts per
    token in order of decreasing probability, equal probabilities taken lower expert index first
    (a stable descending sort; every backend picks the same experts). gates = the chosen
    probabilities, renormalised to sum to 1 over the chosen k when ``normalize`` (Mixtral)."""
    logits = (x2 @ router_weight.t()).to(_acc_dtype(x2.dtype))
    probs = torch.softmax(logits, dim=-1)
    experts = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    gates = probs.gather(1, experts)
    if normalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return logits, gates, experts


def moe_lora_linear(x, weight, bias, router_weight, lora_A, lora_B, top_k: int, normalize: bool, scaling: float,
                    dropout_p: float = 0.0, seed=0):
    """y = x Wᵀ + b + s · Σ_j g_j · B_{e_j} (A_{e_j} dropout(x)) per token, as a loop over experts.

    x [..., K], weight [N, K] or None (the adapter part alone), bias [N] or None, router_weight [E, K],
    lora_A [E, r, K], lora_B [E, N, r]; experts and gates from ``moe_route``; dropout(x) is the
    pyhappy hash dropout of x's rows (one mask per token, shared by its experts). Returns
    (y [..., N], logits [M, E] fp32, experts [M, k]). Differentiable by autograd in every input
    (the gates through the softmax of the chosen experts), which is what the tests compare against."""
    K = x.shape[-1]
    N = lora_B.shape[1]
    x2 = x.reshape(-1, K)
    logits, gates, experts = moe_route(x2, router_weight, top_k, normalize)
    if weight is not None:
        y = torch.nn.functional.linear(x2, weight, bias)
    else:
        y = x2.new_zeros(x2.shape[0], N) if bias is None else bias.expand(x2.shape[0], N).clone()
    xd = dropout(x2, dropout_p, seed)
    for e in range(router_weight.shape[0]):
        tok, slot = (experts == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        u = xd[tok] @ lora_A[e].t()
        h = u * (scaling * gates[tok, slot]).to(u.dtype)[:, None]
        y = y.index_add(0, tok, h @ lora_B[e].t())
    return y.reshape(*x.shape[:-1], N), logits, experts


def moe_load_balancing_loss(logits, experts, num_experts: int):
    """Switch Transformer's load-balancing loss E · Σ_e f_e · P_e: f_e the share of the routed
    (token, slot) assignments that went to expert e (not differentiable), P_e the mean router
    probability of e over the tokens (differentiable in the logits). 1 for a uniform router."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    probs = torch.softmax(logits, dim=-1)
    flat = experts.reshape(-1)
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device).scatter_add_(
        0, flat, torch.ones(flat.shape, dtype=probs.dtype, device=probs.device))
    f = counts / flat.numel()
    return num_experts * (f * probs.mean(0)).sum()


def moe_z_loss(logits):
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)²."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()
