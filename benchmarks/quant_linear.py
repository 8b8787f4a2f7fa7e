"""Benchmark family ``quant_linear``: linear layers on packed 4/3-bit weights.

Forward (no grad), per format (int4, int3, nf4), activations fp32 or bf16, M in {1, 4, 16, 512}:
  pyhappy        ``pyhappy.ops.quant_linear`` as it runs by default (cpp on CPU; for M <= 16 the exact
                 decode kernel: codes turned into fp32 in registers, fp32 FMAs)
  int8_decode    (M <= 16) the same call with ``int8_decode=True``: the approximate opt-in that
                 quantizes the activations to int8 per 32-element block (llama.cpp style)
  dense          ``F.linear`` on the dense weight in the activations' dtype
  int4pack_bf16  torch's ``aten._weight_int4pack_mm_for_cpu`` (int4, group 128) with bf16 activations
  int4pack_f32   the same kernel with fp32 activations
  dequant_mm     dequantize the packed weight (pyhappy's fast dequantizer), then ``F.linear``
  stream_read    (M <= 16) ``sum()`` of an fp32 buffer as large as the packed weight: the streaming
                 read bandwidth measured alongside, in the same interleaved rounds (the decode
                 target is a fraction of it; the run's bandwidth limit, measured minutes apart on
                 a shared machine, can differ from it by 30% and more)
Every variant rotates through its own set of weight copies larger than twice the last-level
cache, as decoding a model does (a 4096² 4-bit weight is 8.4 MB and would otherwise sit in L3).

On CUDA (decode, M in {1, 4, 16}, bf16/fp16, weights rotated past L2):
  pyhappy        ``quant_linear`` as it runs by default (the CUDA C++ decode kernel for M <= 2, else Triton)
  cuda           the CUDA C++ decode kernel forced (csrc/cuda/quant_linear.cu)
  triton         the Triton backend forced
  dense          cuBLAS ``F.linear`` on the dense weight in the activations' dtype
  dequant_mm     dequantize (pyhappy's reference dequantizer), then cuBLAS
  with r > 0, every variant carries a LoRA adapter and ``base_only`` is the decode kernel without it.

QLoRA training (fwd+bwd, x, A, B require grad), M=512 fp32 on CPU, M=4096 bf16 on CUDA:
  pyhappy        ``quant_linear`` with the LoRA adapter (dx through the packed weight)
  lora_dense     pyhappy's fused ``lora_linear`` on the dense weight in the activations' dtype (fp32:
                 7x the weight memory)
  dequant_unfused  what bitsandbytes' ``MatMul4Bit`` + PEFT's unfused LoRA do: the weight dequantized for
                 ``F.linear`` in the forward and again for dx in the backward (only the packed weight
                 is kept between them), the adapter as PEFT's products
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import Case, Rotation, Variant, compare, copies_to_exceed_cache, dtype_name, extended, find_result, target
from .common import target as make_target

FAMILY = "quant_linear"
DECODE_VARIANTS = ("pyhappy", "dense", "int4pack_bf16", "int4pack_f32", "dequant_mm")
TRAIN_VARIANTS = ("pyhappy", "lora_dense", "dequant_unfused")


def backend_of(device, dtype):
    from pyhappy.ops.quant_linear import _backend

    return _backend(torch.empty(0, device=device, dtype=dtype))


def _weights(N, K, fmt, group_size, seed):
    import pyhappy

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * K**-0.5
    return w, pyhappy.quantize(w, fmt, group_size)


def _packed_bytes(N: int, K: int, fmt: str, group_size: int) -> int:
    """Bytes of a packed [N, K] weight (pyhappy/quant/layout.py): codes, scales (and zero points)."""
    from pyhappy.quant import layout

    n8 = layout.n_tiles(N)
    codes = n8 * (K // layout.BLOCK_K) * layout.BYTES_PER_BLOCK[layout.FORMAT_BITS[fmt]]
    per_group = 4 if fmt == "nf4" else 2 + 1  # float32 absmax, or float16 scale + uint8 zero point
    return codes + n8 * layout.TILE_N * (K // group_size) * per_group


def _copies(t, n):
    """n distinct copies of a weight (tensor, tuple of tensors or QuantizedWeight): rotation needs
    separate memory, not separate values, and quantizing every copy made setup dominate the run on
    machines with a large last-level cache (260 MiB: ~60 copies of a 4096² 4-bit weight)."""
    from pyhappy.quant import QuantizedWeight

    def one(x):
        if isinstance(x, torch.Tensor):
            return x.clone()
        if isinstance(x, tuple):
            return tuple(one(v) for v in x)
        if isinstance(x, QuantizedWeight):
            return QuantizedWeight({k: one(v) if isinstance(v, torch.Tensor) else v for k, v in x.data.items()})
        raise TypeError(type(x).__name__)

    return [t] + [one(t) for _ in range(n - 1)]


def _int4pack(w, group_size, dtype):
    """torch's CPU int4 packing of ``w`` (asymmetric, its (q - 8) * s + z convention)."""
    N, K = w.shape
    wg = w.view(N, K // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo) / 15).clamp_min(1e-8)
    q = ((wg - lo.unsqueeze(-1)) / s.unsqueeze(-1)).round().clamp(0, 15).to(torch.int32).view(N, K)
    z = lo + 8 * s
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([s.t(), z.t()], dim=-1).contiguous().to(dtype)
    return packed, sz


def decode_case(device, M, K, N, fmt, dtype, *, group_size=None, budget_s=2.0, headline=False, seed=0):
    gs = group_size or (64 if fmt == "nf4" else 128)
    # torch's int4 kernel with fp32 activations takes ~15 ms per row: left out beyond M = 16
    variants = (DECODE_VARIANTS[:1] + ("int8_decode",) + DECODE_VARIANTS[1:] + ("stream_read",) if M <= 16 else
                tuple(v for v in DECODE_VARIANTS if v != "int4pack_f32"))
    elem = torch.empty((), dtype=dtype).element_size()
    qbytes = _packed_bytes(N, K, fmt, gs)
    rot = M <= 64  # bandwidth-bound sizes: weights rotated past the last-level cache
    counts = {
        "pyhappy": copies_to_exceed_cache(qbytes, device) if rot else 1,
        "dense": copies_to_exceed_cache(N * K * elem, device) if rot else 1,
        "int4pack": copies_to_exceed_cache(N * K // 2 + N * K // 128 * 4, device) if rot else 1,
    }

    def setup():
        from pyhappy.ops import quant_linear

        x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        xb, xf = x.bfloat16(), x.float()
        w0, qw0 = _weights(N, K, fmt, gs, seed + 10)
        q = _copies(qw0, counts["pyhappy"])
        dense = _copies(w0.to(dtype), counts["dense"])
        p_bf = _copies(_int4pack(w0, 128, torch.bfloat16), counts["int4pack"])
        p_f = [(p, sz.float()) for p, sz in p_bf]
        # variants reading the same copies (pyhappy, int8_decode and dequant_mm the packed weight; both
        # int4pack variants the packed tensor) share one rotation: each call takes the copy after the
        # previous call's, whichever variant made it, so no variant finds in the cache the copy
        # another one just read
        r_q, r_d = Rotation([(c,) for c in q]), Rotation([(c,) for c in dense])
        r_b = Rotation(list(range(len(p_bf))))
        r_s = Rotation(torch.ones(counts["pyhappy"], qbytes // 4).unbind(0) if "stream_read" in variants else [None])
        from pyhappy.ops.quant_linear import packed_args

        def deq(qw):
            qd, sc, zr, fm, n, g = packed_args(qw)
            return torch.ops.pyhappy.quant_dequantize_cpu(qd, sc, zr, fm, n, K, g, dtype)

        def nograd(f):
            def fn():
                with torch.no_grad():
                    return f()
            return Variant(fn)

        out = {
            "pyhappy": nograd(lambda: quant_linear(x, r_q.next()[0])),
            "int8_decode": nograd(lambda: quant_linear(x, r_q.next()[0], int8_decode=True)),
            "dense": nograd(lambda: F.linear(x, r_d.next()[0])),
            "int4pack_bf16": nograd(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, *_pk(p_bf[r_b.next()]))),
            "int4pack_f32": nograd(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xf, *_pk(p_f[r_b.next()]))),
            "dequant_mm": nograd(lambda: F.linear(x, deq(r_q.next()[0]))),
            "stream_read": nograd(lambda: r_s.next().sum()),
        }
        return {k: out[k] for k in variants}

    def _pk(pair):
        packed, sz = pair
        return packed, 128, sz

    io = (M * K + M * N) * elem
    flops = 2 * M * N * K
    work = {
        "pyhappy": (flops, qbytes + io),
        "int8_decode": (flops, qbytes + io),
        "dense": (flops, N * K * elem + io),
        "int4pack_bf16": (flops, N * K // 2 + N * K // 128 * 4 + io),
        "int4pack_f32": (flops, N * K // 2 + N * K // 128 * 8 + io),
        "dequant_mm": (flops, qbytes + N * K * elem * 2 + io),
        "stream_read": (0, qbytes // 4 * 4),
    }
    note = ("weights rotated: " + ", ".join(f"{k} x{v}" for k, v in counts.items()) +
            f"; pyhappy packed {qbytes / 2**20:.1f} MiB per copy")
    return Case(
        op=FAMILY, shape=f"M={M} K={K} N={N} {fmt} g{gs}", params={"M": M, "K": K, "N": N, "format": fmt,
                                                                   "group_size": gs, "kind": "decode"},
        dtype=dtype, pass_="fwd", variants=variants, setup=setup, work={k: work[k] for k in variants},
        budget_s=budget_s,
        headline=headline, note=note, sweeps=((f"decode M sweep K={K} N={N} {fmt} {dtype_name(dtype)}", "M"),),
        # the share of the streaming read is the decode kernel's figure; its ratio to dequant_mm (the
        # unfused formulation, ~30x slower) is narrow after the planned rounds
        ci_pair=("pyhappy", "stream_read") if "stream_read" in variants else (),
    )


def decode_case_cuda(device, M, K, N, fmt, dtype, *, r=0, headline=False, seed=0):
    gs = 64 if fmt == "nf4" else 128
    elem = torch.empty((), dtype=dtype).element_size()
    qbytes = _packed_bytes(N, K, fmt, gs)
    counts = {"q": copies_to_exceed_cache(qbytes, device), "dense": copies_to_exceed_cache(N * K * elem, device)}
    variants = ("pyhappy", "cuda", "triton", "dense", "dequant_mm") + (("base_only",) if r else ())

    def setup():
        import pyhappy
        from pyhappy.ops import quant_linear

        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
        A = (torch.randn(r, K, generator=g) * K**-0.5).to(device=device, dtype=dtype) if r else None
        B = (torch.randn(N, r, generator=g) * r**-0.5).to(device=device, dtype=dtype) if r else None
        w0, qw0 = _weights(N, K, fmt, gs, seed + 10)
        q = Rotation([(c,) for c in _copies(qw0.to(device), counts["q"])])
        dense = Rotation([(c,) for c in _copies(w0.to(device=device, dtype=dtype), counts["dense"])])

        def nograd(f, backend=None):
            def fn():
                with torch.no_grad(), pyhappy.backends.force(backend):
                    return f()
            return Variant(fn)

        def lora(y):
            return y if not r else y + 2.0 * F.linear(F.linear(x, A), B)

        out = {
            "pyhappy": nograd(lambda: quant_linear(x, q.next()[0], None, A, B, 2.0)),
            "cuda": nograd(lambda: quant_linear(x, q.next()[0], None, A, B, 2.0), "cuda"),
            "triton": nograd(lambda: quant_linear(x, q.next()[0], None, A, B, 2.0), "triton"),
            "dense": nograd(lambda: lora(F.linear(x, dense.next()[0]))),
            "dequant_mm": nograd(lambda: lora(F.linear(x, q.next()[0].dequantize(dtype)))),
            "base_only": nograd(lambda: quant_linear(x, q.next()[0]), "cuda"),
        }
        return {k: out[k] for k in variants}

    io = (M * K + M * N) * elem + (r * (K + N) * elem if r else 0)
    flops = 2 * M * N * K + (2 * M * r * (K + N) if r else 0)
    work = {"pyhappy": (flops, qbytes + io), "cuda": (flops, qbytes + io), "triton": (flops, qbytes + io), "dense": (flops, N * K * elem + io),
            "dequant_mm": (flops, qbytes + 2 * N * K * elem + io), "base_only": (2 * M * N * K, qbytes + io)}
    return Case(
        op=FAMILY, shape=f"M={M} K={K} N={N} {fmt} g{gs}" + (f" +LoRA r={r}" if r else ""),
        params={"M": M, "K": K, "N": N, "format": fmt, "group_size": gs, "kind": "decode", "r": r},
        dtype=dtype, pass_="fwd", variants=variants, setup=setup, work={k: work[k] for k in variants},
        headline=headline, note=f"weights rotated: packed x{counts['q']}, dense x{counts['dense']}",
        sweeps=() if r else ((f"CUDA decode M sweep K={K} N={N} {fmt} {dtype_name(dtype)}", "M"),),
    )


class _MatMulDequantized(torch.autograd.Function):
    """x · deq(W)ᵀ as bitsandbytes' MatMul4Bit computes it: ``dequantized()`` builds the dense weight
    for the forward product and again for dx in the backward; autograd keeps no dense copy between
    the two (the memory QLoRA exists to save)."""

    @staticmethod
    def forward(ctx, x, dequantized):
        ctx.dequantized = dequantized
        return F.linear(x, dequantized())

    @staticmethod
    def backward(ctx, gy):
        return gy @ ctx.dequantized(), None


def train_case(device, M, K, N, r, fmt, dtype=torch.float32, *, budget_s=20.0, headline=False, seed=0):
    gs = 64 if fmt == "nf4" else 128
    elem = torch.empty((), dtype=dtype).element_size()
    scaling = 2.0

    def setup():
        from pyhappy.ops import lora_linear, quant_linear
        from pyhappy.ops.quant_linear import packed_args

        g = torch.Generator().manual_seed(seed)
        w, qw = _weights(N, K, fmt, gs, seed)
        qw = qw.to(device)
        W = w.to(device=device, dtype=dtype)
        x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype).requires_grad_()
        A = (torch.randn(r, K, generator=g) * K**-0.5).to(device=device, dtype=dtype).requires_grad_()
        B = (torch.randn(N, r, generator=g) * r**-0.5).to(device=device, dtype=dtype).requires_grad_()
        gout = torch.randn(M, N, generator=g).to(device=device, dtype=dtype)
        qd, sc, zr, fm, n, gsz = packed_args(qw)

        def run(f):
            def fn():
                y = f()
                y.backward(gout)
                return y.detach(), x.grad, A.grad, B.grad
            return Variant(fn, [x, A, B])

        def dequantized():
            return (torch.ops.pyhappy.quant_dequantize_cpu(qd, sc, zr, fm, n, K, gsz, dtype) if device.type == "cpu"
                    else qw.dequantize(dtype))

        def unfused():
            return _MatMulDequantized.apply(x, dequantized) + F.linear(F.linear(x, A), B) * scaling

        return {
            "pyhappy": run(lambda: quant_linear(x, qw, None, A, B, scaling)),
            "lora_dense": run(lambda: lora_linear(x, W, None, A, B, scaling)),
            "dequant_unfused": run(unfused),
        }

    f = 2 * (2 * M * K * N) + 3 * 2 * M * r * (K + N)
    io = (2 * M * K + 2 * M * N + 2 * r * (K + N)) * elem
    qbytes = N * K * (3 if fmt == "int3" else 4) // 8
    work = {"pyhappy": (f, qbytes + io), "lora_dense": (f, N * K * elem + io),
            "dequant_unfused": (f, 2 * qbytes + 4 * N * K * elem + io)}
    return Case(
        op=FAMILY, shape=f"QLoRA M={M} K={K} N={N} r={r} {fmt}",
        params={"M": M, "K": K, "N": N, "r": r, "format": fmt, "group_size": gs, "kind": "train"},
        dtype=dtype, pass_="fwd+bwd", variants=TRAIN_VARIANTS, setup=setup, work=work, budget_s=budget_s,
        min_rounds=5, max_rounds=30, headline=headline, same_result=(),
    )


def cases(device, quick):
    f32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cuda":
        bf16, f16 = torch.bfloat16, torch.float16
        if quick:
            return [decode_case_cuda(device, 1, 4096, 4096, "int4", f16, headline=True)]
        # Default: the fp16 cases the targets read (M = 1, 16 of every format, int4 also M = 4 and
        # N = 11008, LoRA r=16) and QLoRA training; bf16 decode and M = 4 of int3/nf4 with --full.
        out = [decode_case_cuda(device, M, 4096, 4096, fmt, dt, headline=(dt is f16 and M in (1, 16)))
               for fmt in ("int4", "int3", "nf4") for dt in (f16, bf16) for M in (1, 4, 16)]
        out = [c if c.dtype is f16 and (c.params["M"] != 4 or c.params["format"] == "int4") else extended(c)
               for c in out]
        out += [decode_case_cuda(device, M, 4096, 11008, "int4", f16) for M in (1, 16)]
        out += [decode_case_cuda(device, M, 4096, 4096, "int4", f16, r=16, headline=True) for M in (1, 16)]
        out.append(train_case(device, 4096, 4096, 4096, 16, "nf4", bf16, headline=True))
        out.append(extended(train_case(device, 4096, 4096, 4096, 16, "int4", bf16)))
        return out
    if device.type != "cpu":
        return []
    if quick:
        return [decode_case(device, 1, 1024, 1024, "int4", f32, budget_s=0.3, headline=True),
                train_case(device, 64, 512, 512, 8, "nf4", budget_s=0.5)]
    out = []
    for dtype in (f32, bf16):
        out.append(decode_case(device, 1, 4096, 4096, "int4", dtype, headline=True))
    for fmt in ("int3", "nf4"):
        for dtype in (f32, bf16):
            out.append(decode_case(device, 1, 4096, 4096, fmt, dtype))
    for M in (4, 16):
        out.append(decode_case(device, M, 4096, 4096, "int4", f32))
    out.append(decode_case(device, 512, 4096, 4096, "int4", f32, budget_s=6.0))
    # bf16 at M=512: on a CPU without native bf16 dot products torch's baselines take ~0.9 s a call
    # (~18 s of the default run on the Zen 3): --full only.
    out.append(extended(decode_case(device, 512, 4096, 4096, "int4", bf16, budget_s=6.0)))
    for M in (1, 4, 16):  # no target: --full
        out.append(extended(decode_case(device, M, 4096, 11008, "int4", bf16)))
    out.append(extended(decode_case(device, 512, 4096, 11008, "int4", bf16, budget_s=6.0)))
    for fmt in ("nf4", "int4"):
        out.append(train_case(device, 512, 4096, 4096, 16, fmt, headline=(fmt == "nf4")))
    return out


def summary(results, device):
    """What this run measured at the headline shapes (lines), and the target checks (dicts, JSON only)."""
    lines = []
    if device.type == "cuda":
        return _summary_cuda(results)
    if device.type != "cpu":
        return lines
    med = {}
    for fmt in ("int4", "int3", "nf4"):
        for dt in ("float32", "bfloat16"):
            r = find_result(results, M=1, K=4096, N=4096, format=fmt, dtype=dt, kind="decode")
            if r is None:
                continue
            med[fmt, dt] = r["times"]["pyhappy"]["median_s"]
            if fmt == "int4":
                pct, lim = read_pct(r), r["pct_of_limit"]["pyhappy"]
                sp = 1.0 / r["ratios"]["int4pack_bf16"]["paired_median"]
                got = (f"{pct:.0f}% of the streaming read bandwidth measured alongside "
                       f"({lim:.0f}% of the run's bandwidth limit)"
                       if pct is not None else  # results recorded before the stream_read variant
                       f"{lim:.0f}% of the run's bandwidth limit")
                lines.append(f"M=1 4096² int4 {dt}: {got}; "
                             f"{compare(1.0 / sp, 'torch int4pack (bf16 activations)', 'pyhappy')}")
                if "int8_decode" in r["ratios"]:
                    lines.append(f"M=1 4096² int4 {dt}: the exact default takes "
                                 f"{r['ratios']['int8_decode']['paired_median']:.2f}x the time of the "
                                 "int8_decode opt-in")
                # the share of the streaming read the exact kernel is held to: 80% where the CPU has
                # AVX-512 (torch's capability names it), 60% on AVX2-only CPUs
                goal = 80 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 60
                lines.append(target(f"M=1 4096² int4 {dt}: % of streaming read", pct if pct is not None else lim, ">=",
                                    goal))
                lines.append(target(f"M=1 4096² int4 {dt}: speed-up over torch int4pack bf16", sp, ">=", 1.3))
    for dt in ("float32", "bfloat16"):
        if ("int3", dt) in med and ("int4", dt) in med:
            v = med["int3", dt] / med["int4", dt]
            lines.append(f"M=1 {dt}: int3 takes {v:.2f}x the time of int4")
            lines.append(target(f"M=1 int3/int4 time {dt}", v, "<", 1))
        if ("nf4", dt) in med and ("int4", dt) in med:
            v = med["nf4", dt] / med["int4", dt]
            lines.append(f"M=1 {dt}: nf4 takes {v:.2f}x the time of int4")
            lines.append(target(f"M=1 nf4/int4 time {dt}", v, "<=", 1.2))
    for fmt in ("nf4", "int4"):
        r = find_result(results, M=512, format=fmt, kind="train")
        if r is not None:
            v = r["ratios"]["lora_dense"]["paired_median"]
            lines.append(f"QLoRA fwd+bwd M=512 4096² r=16 {fmt}: "
                         f"{compare(v, 'fp32 LoRA on the dense weight', 'pyhappy')}; "
                         f"{compare(r['ratios']['dequant_unfused']['paired_median'], 'dequantize + unfused LoRA')}")
            lines.append(target(f"QLoRA fwd+bwd M=512 4096² r=16 {fmt}: pyhappy/lora_dense", v, "<=", 1.25))
    return lines


def read_pct(r) -> float:
    """A decode result's pyhappy bandwidth (its compulsory bytes / time) as a % of the streaming read
    timed in the same rounds (paired: per-round time ratios, their median); None without one."""
    w = r["work"]
    if "stream_read" not in w:
        return None
    return 100.0 * (w["pyhappy"]["bytes"] / w["stream_read"]["bytes"]) / r["ratios"]["stream_read"]["paired_median"]


def _summary_cuda(results):
    """What this CUDA run measured (fp16, K=N=4096), and the H100 target checks (dicts, JSON only)."""
    lines = []
    for fmt in ("nf4", "int4"):
        r = find_result(results, M=4096, format=fmt, kind="train", dtype="bfloat16")
        if r is not None:
            v = r["ratios"]["lora_dense"]["paired_median"]
            lines.append(f"CUDA QLoRA fwd+bwd M=4096 4096² r=16 {fmt} bf16: "
                         f"{compare(v, 'bf16 LoRA on the dense weight', 'pyhappy')}; "
                         f"{compare(r['ratios']['dequant_unfused']['paired_median'], 'dequantize + unfused LoRA')}")
            lines.append(make_target(f"CUDA QLoRA fwd+bwd M=4096 4096² r=16 {fmt} bf16: pyhappy/lora_dense", v, "<=", 1.25))
    for fmt, M, target in (("int4", 1, 80), ("nf4", 1, 80), ("int3", 1, 75), ("int4", 16, 70), ("int3", 16, 70)):
        r = find_result(results, M=M, K=4096, N=4096, format=fmt, dtype="float16", kind="decode", r=0)
        if r is None:
            continue
        best = max(("cuda", "triton"), key=lambda v: r["pct_of_limit"][v] or 0.0)
        pct = r["pct_of_limit"][best] or 0.0
        cu_tr = r["times"]["cuda"]["median_s"] / r["times"]["triton"]["median_s"]
        lines.append(f"CUDA M={M} 4096² {fmt} fp16: best kernel ({best}) at {pct:.0f}% of measured HBM bandwidth; "
                     f"cuda takes {cu_tr:.3f}x the time of triton (the default rule runs cuda for M <= 2)")
        lines.append(make_target(f"CUDA M={M} 4096² {fmt} fp16: % of HBM bandwidth", pct, ">=", target))
    for M in (1, 16):
        r = find_result(results, M=M, K=4096, N=4096, format="int4", dtype="float16", kind="decode", r=16)
        if r is not None:
            v = r["times"]["cuda"]["median_s"] / r["times"]["base_only"]["median_s"]
            lines.append(f"CUDA M={M} int4 LoRA r=16: {v:.3f}x the time of the base-only kernel (both cuda)")
            lines.append(make_target(f"CUDA M={M} int4 LoRA r=16 over base-only", v, "<=", 1.05))
    return lines


__all__ = ["FAMILY", "backend_of", "cases", "summary"]
