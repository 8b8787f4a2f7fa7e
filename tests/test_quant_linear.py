"""pyhappy::quant_linear through the op, the functional API and the modules, on every CPU backend.

Kernel-level tests live next to this file: test_quant_linear_cpp.py (C++ GEMM path and backward),
test_quant_gemv.py (C++ decode kernel), test_quant_linear_triton.py (Triton launchers).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyhappy
from pyhappy import backends
from pyhappy.nn import QLoRALinear, QuantLinear
from pyhappy.ops.quant_linear import packed_args
from pyhappy.quant.weight import QuantizedWeight

import helpers
from helpers import HAS_CPP, HAS_TRITON, assert_close_to_oracle

OP = torch.ops.pyhappy.quant_linear
FORMATS = ("nf4", "int4", "int3")


HAS_QL_CPP = helpers.has_cpp_op("quant_linear_cpu")
_no_cpp = pytest.mark.skipif(not HAS_QL_CPP, reason="pyhappy._C without quant_linear")


def cpu_backends():
    return helpers.cpu_backends("quant_linear_cpu")


def make_qweight(fmt, N, K, group_size, seed=0, perm=False):
    g = torch.Generator().manual_seed(seed)
    bits = 3 if fmt == "int3" else 4
    codes = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.uint8)
    scales = torch.rand(N, K // group_size, generator=g) * 0.05 + 0.01
    zeros = None if fmt == "nf4" else torch.randint(0, 2**bits, (N, K // group_size), generator=g)
    p = torch.randperm(K, generator=g) if perm else None
    return QuantizedWeight.from_codes(fmt, codes, scales, zeros, group_size=group_size, perm=p)


def make_lora(N, K, r, dtype, core, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dtype)
    B = (torch.randn(N, r, generator=g) / r**0.5).to(dtype)
    C = (torch.eye(r) + 0.1 * torch.randn(r, r, generator=g)).to(dtype) if core else None
    return A, B, C


def dense_oracle(W):
    """The math with the dequantized weight as a dense tensor (any dtype, for assert_close_to_oracle)."""

    def f(x, bias, A, B, C, s=0.5):
        y = x @ W.to(x.dtype).t()
        if A is not None:
            v = x @ A.t()
            if C is not None:
                v = v @ C.t()
            y = y + s * (v @ B.t())
        if bias is not None:
            y = y + bias
        return y

    return f


def sqnr_db(got, want):
    return (10 * torch.log10(want.double().pow(2).sum() / (got.double() - want.double()).pow(2).sum())).item()


# ------------------------------------------------------------------------------------------------
# forward / backward against the dequantized dense math
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("lora", [False, True])
def test_forward_backward_matches_dense(backend, fmt, lora):
    # M above the C++ decode threshold: exact floating-point path everywhere.
    M, N, K, r, gs = 24, 20, 64, 4, 32
    qw = make_qweight(fmt, N, K, gs)
    W = qw.dequantize(torch.float64)
    x = torch.randn(M, K, dtype=torch.float32, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    A, B, C = make_lora(N, K, r, torch.float32, core=True) if lora else (None, None, None)
    for t in (A, B, C):
        if t is not None:
            t.requires_grad_()
    with backends.force(backend):
        y = pyhappy.ops.quant_linear(x, qw, bias, A, B, 0.5, C)
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, [t for t in (x, bias, A, B, C) if t is not None], dy)
    f = dense_oracle(W)
    assert_close_to_oracle(y, f, [x.detach(), bias.detach(), *(None if t is None else t.detach() for t in (A, B, C))])
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, bias, A, B, C)]
    want = torch.autograd.grad(f(*leaves), [t for t in leaves if t is not None], dy.double())
    for name, g, w in zip(("x", "bias", "A", "B", "C"), grads, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5 * (1 + w.abs().max().item()), rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("fmt", FORMATS)
def test_low_precision(backend, fmt, dtype):
    M, N, K, r, gs = 20, 16, 64, 4, 64
    qw = make_qweight(fmt, N, K, gs, seed=3)
    x = torch.randn(M, K).to(dtype)
    A, B, C = make_lora(N, K, r, dtype, core=False)
    with backends.force(backend):
        y = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5)
    assert y.dtype == dtype
    want = dense_oracle(qw.dequantize(torch.float64))(x.double(), None, A.double(), B.double(), None)
    assert sqnr_db(y, want) > 40


@_no_cpp
@pytest.mark.parametrize("M", [3, 40])  # the decode kernel, the GEMM path
def test_cpp_float16_forward_backward_match_reference(M):
    """float16 runs the C++ kernels (decode, dequantized-slab GEMM, dx through the packed weight)."""
    N, K, r = 24, 128, 4
    qw = make_qweight("int4", N, K, 64, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).half().requires_grad_()
    A, B, _ = make_lora(N, K, r, torch.float16, core=False)
    A.requires_grad_(), B.requires_grad_()
    out = {}
    for b in ("cpp", "reference"):
        with backends.force(b):
            y = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5)
            y.float().square().sum().backward()
        out[b] = (y, *(t.grad for t in (x, A, B)))
        x.grad = A.grad = B.grad = None
    assert all(t.dtype == torch.float16 for t in out["cpp"])
    for got, want in zip(out["cpp"], out["reference"]):
        assert sqnr_db(got, want.double()) > 50  # both exact up to float16 rounding (~65-70 dB here)


def _exact_tolerance(dtype, scale):
    """|got - want| allowed for an exact kernel: fp32 accumulation over K (|terms| summed in
    ``scale``), plus the output's rounding to a 16-bit dtype."""
    eps = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    return (1e-5 + eps) * scale


@_no_cpp
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_decode_path_is_exact_by_default(fmt, dtype):
    """The default CPU decode path (M <= 16) agrees with dequantize-then-matmul within the dtype's
    rounding: odd N (a partial last tile), K of an odd number of blocks, bias and LoRA on top, every
    decode row count (passes of up to four rows: 1-4 rows in one, 5-16 in several)."""
    N, K, r = 27, 160 if fmt != "nf4" else 192, 3
    gs = 32 if fmt != "nf4" else 64
    qw = make_qweight(fmt, N, K, gs, seed=11)
    W = qw.dequantize(torch.float64)
    g = torch.Generator().manual_seed(12)
    bias = torch.randn(N, generator=g).to(dtype)
    A, B, _ = make_lora(N, K, r, dtype, core=False, seed=13)
    for M in (1, 2, 3, 4, 5, 11, 16):
        x = torch.randn(M, K, generator=g).to(dtype)
        with backends.force("cpp"):
            y = pyhappy.ops.quant_linear(x, qw)
            y_full = pyhappy.ops.quant_linear(x, qw, bias, A, B, 0.5)
        assert y.dtype == dtype and y.shape == (M, N)
        xd, Ad, Bd = x.double(), A.double(), B.double()
        want = xd @ W.t()
        scale = xd.abs() @ W.abs().t()
        assert (y.double() - want).abs().le(_exact_tolerance(dtype, scale)).all(), (M, (y.double() - want).abs().max())
        want_full = want + bias.double() + 0.5 * (xd @ Ad.t()) @ Bd.t()
        scale_full = scale + bias.double().abs() + 0.5 * (xd.abs() @ Ad.abs().t()) @ Bd.abs().t()
        # the adapter's own products round in x's dtype (lora_linear's epilogue)
        tol = _exact_tolerance(dtype, scale_full) * (1 if dtype is torch.float32 else 2)
        assert (y_full.double() - want_full).abs().le(tol).all(), (M, (y_full.double() - want_full).abs().max())


@_no_cpp
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("level", ["avx512", "avx2", "portable"])
def test_cpp_exact_decode_kernel_each_level(fmt, level):
    """The exact decode kernel at each SIMD level (portable: the scalar fallback), against float64,
    with blocks of very different scales, an all-zero block and rows above 16 (run in chunks)."""
    N, K, gs = 21, 256, 64
    qw = make_qweight(fmt, N, K, gs, seed=5)
    W = qw.dequantize(torch.float64)
    g = torch.Generator().manual_seed(6)
    for M in (1, 3, 6, 16, 18):
        x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, K)
        x[0, 32:64] = 0.0
        y = _gemv_at_level(level, x, qw)
        want = x.double() @ W.t()
        scale = x.double().abs() @ W.abs().t()
        assert (y.double() - want).abs().le(1e-5 * scale).all(), (M, level)


@_no_cpp
@pytest.mark.parametrize("fmt", ["int4", "int3"])
@pytest.mark.parametrize("level", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("magnitude", [1e-36, 1e-20, 1e-17, 1e30])
def test_cpp_exact_int4_int3_decode_at_extreme_activation_magnitudes(fmt, level, magnitude):
    """The int4 / int3 kernels pre-scale activations by powers of two down to 2^-24: rows whose values
    are so small that this would leave fp32's normal range take the unscaled path, huge ones stay
    finite, and a tiny row next to a normal one is exact too."""
    N, K, gs = 19, 256, 64
    qw = make_qweight(fmt, N, K, gs, seed=7)
    W = qw.dequantize(torch.float64)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, K, generator=g)
    x[0] *= magnitude
    x[2, ::2] *= magnitude
    y = _gemv_at_level(level, x, qw)
    want = x.double() @ W.t()
    scale = x.double().abs() @ W.abs().t()
    assert torch.isfinite(y).all()
    assert (y.double() - want).abs().le(1e-5 * scale).all(), level
def _every_code_weight(N, K, gs, seed, fmt="int4"):
    """An int4 (int3) weight whose codes take every value at every position of the packed words
    (k % 8) and whose zero points include 0 and the largest code."""
    levels = 16 if fmt == "int4" else 8
    g = torch.Generator().manual_seed(seed)
    codes = ((torch.arange(N).view(-1, 1) + 3 * torch.arange(K).view(1, -1)) % levels).to(torch.uint8)
    codes[N // 2:] = torch.randint(0, levels, (N - N // 2, K), generator=g, dtype=torch.uint8)
    scales = torch.rand(N, K // gs, generator=g) * 0.05 + 0.01
    zeros = torch.randint(0, levels, (N, K // gs), generator=g)
    zeros[0], zeros[1] = 0, levels - 1
    return QuantizedWeight.from_codes(fmt, codes, scales, zeros, group_size=gs)


@_no_cpp
@pytest.mark.parametrize("fmt", ["int4", "int3"])
@pytest.mark.parametrize("level", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("gs", [32, 96])
def test_cpp_exact_int4_int3_decode_scaled_activations(fmt, level, gs):
    """The int4 / int3 kernels read each code in place in its packed word (int3: in block_codes' bytes)
    as a subnormal float and multiply it with its activation scaled by a power of two chosen per row
    (quant_linear_decode_float.h): every code at every position, zero points 0 and the largest code,
    groups of one and of three blocks, K of an odd number of blocks, every decode row count, rows of
    very different magnitudes side by side (from 2^-60 up), an all-zero row, a row that spans more
    binades than the scaled kernel allows (it takes the portable kernel) and a NaN, which stays in
    its row."""
    N, K = 21, 288
    qw = _every_code_weight(N, K, gs, seed=21, fmt=fmt)
    W = qw.dequantize(torch.float64)
    g = torch.Generator().manual_seed(22)
    mags = [1.0, 2.0**-57, 1e-17, 3e-5, 7e4, 1e25, 2.0**97]
    for M in range(1, 17):
        x = torch.randn(M, K, generator=g)
        for m in range(M):
            x[m] *= mags[m % len(mags)]
        if M >= 3:
            x[2] = 0.0
        if M >= 4:
            x[3, 5] = 1e-30 * x[3, 6]  # 2^-100 below the row's largest value
        if M == 6:
            x[4, 17] = 1e-35  # more than 2^103 below it: the call takes the portable kernel
        y = _gemv_at_level(level, x, qw)
        want = x.double() @ W.t()
        scale = x.double().abs() @ W.abs().t()
        assert torch.isfinite(y).all(), (M, level)
        assert (y.double() - want).abs().le(1e-5 * scale).all(), (M, level, (y.double() - want).abs().max())
    x = torch.randn(3, K, generator=g)
    x[1, 40] = float("nan")
    y = _gemv_at_level(level, x, qw)
    assert y[1].isnan().all() and torch.isfinite(y[[0, 2]]).all()
    want = x[[0, 2]].double() @ W.t()
    assert (y[[0, 2]].double() - want).abs().le(1e-5 * (x[[0, 2]].double().abs() @ W.abs().t())).all()


@_no_cpp
@pytest.mark.parametrize("fmt", ["int4", "int3"])
@pytest.mark.parametrize("level", ["avx512", "avx2"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpp_exact_int4_int3_single_row_decode_in_tile_pairs(fmt, level, threads):
    """At one row of x the int4 / int3 kernels take two 8-row tiles side by side (quant_linear_decode_float.h,
    tile_pair_int4, tile_pair_int3; on AVX-512 in one register) and an odd tile left in a thread's share
    alone: 37 tiles with a partial last one, split over 1 to 3 threads (shares of odd and even tile
    counts), every code at every position, zero points 0 and the largest code, groups of three
    blocks, rows of x at very different magnitudes and one with a zero. The tiles of a pair hold
    different codes and parameters, so a tile read, combined or stored for its neighbour shows."""
    N, K, gs = 8 * 36 + 5, 384, 96
    qw = _every_code_weight(N, K, gs, seed=31, fmt=fmt)
    W = qw.dequantize(torch.float64)
    g = torch.Generator().manual_seed(32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for mag in (1.0, 3e-20, 2.0**90):
            x = torch.randn(1, K, generator=g) * mag
            x[0, 7] = 0.0
            y = _gemv_at_level(level, x, qw)
            want = x.double() @ W.t()
            scale = x.double().abs() @ W.abs().t()
            assert torch.isfinite(y).all(), (threads, mag)
            assert (y.double() - want).abs().le(1e-5 * scale).all(), (threads, mag, (y.double() - want).abs().max())
    finally:
        torch.set_num_threads(before)


@_no_cpp
@pytest.mark.parametrize("fmt", ["int4", "int3"])
def test_cpp_exact_int4_int3_decode_with_denormals_flushed(fmt):
    """torch.set_flush_denormal(True) (FTZ and DAZ) must not zero the int4 / int3 kernels' subnormal
    code operands: the kernel clears DAZ while it runs and restores it after."""
    qw = make_qweight(fmt, 19, 256, 64, seed=23)
    W = qw.dequantize(torch.float64)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(24))
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        y = _gemv_at_level("avx2", x, qw)
        assert torch.tensor([2.0**-140]).item() == 0.0  # still set afterwards
    finally:
        torch.set_flush_denormal(False)
    want = x.double() @ W.t()
    assert (y.double() - want).abs().le(1e-5 * (x.double().abs() @ W.abs().t())).all()


@_no_cpp
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("gs", [32, 96])
def test_cpp_exact_nf4_decode_every_code_rows_and_tiles(threads, gs):
    """The nf4 kernel assembles each table value from its four bytes by lookups and unpacks, in a lane
    order of rows and k of its own (quant_linear_decode_float.h, nf4_values): every code at every
    nibble of the packed words, groups of one and of three blocks, K of an odd number of blocks, 37
    tiles with a partial last one split over 1 to 3 threads, every decode row count (two or more
    rows: through the block buffer, rows in pairs and an odd one alone), rows of x at very different
    magnitudes, in fp32, bf16 and fp16, and a NaN, which stays in its row."""
    N, K = 8 * 36 + 5, 288
    g = torch.Generator().manual_seed(41)
    codes = ((torch.arange(N).view(-1, 1) + 3 * torch.arange(K).view(1, -1)) % 16).to(torch.uint8)
    codes[N // 2:] = torch.randint(0, 16, (N - N // 2, K), generator=g, dtype=torch.uint8)
    absmax = torch.rand(N, K // gs, generator=g) * 2.0 + 0.01
    qw = QuantizedWeight.from_codes("nf4", codes, absmax, None, group_size=gs)
    W = qw.dequantize(torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for M in range(1, 17):
                x = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, M).view(-1, 1)
                x[:, 33] = 0.0
                x = x.to(dtype)
                y = _gemv_at_level("avx2", x, qw)
                want = x.double() @ W.t()
                scale = x.double().abs() @ W.abs().t()
                err = (y.double() - want).abs()
                assert err.le(1e-5 * scale).all(), (threads, gs, dtype, M, err.max())
        for M in (1, 2, 5):
            x = torch.randn(M, K, generator=g)
            x[M // 2, 70] = float("nan")
            y = _gemv_at_level("avx2", x, qw)
            rest = [m for m in range(M) if m != M // 2]
            assert y[M // 2].isnan().all() and torch.isfinite(y[rest]).all(), M
            want = x[rest].double() @ W.t()
            assert (y[rest].double() - want).abs().le(1e-5 * (x[rest].double().abs() @ W.abs().t())).all(), M
    finally:
        torch.set_num_threads(before)


@_no_cpp
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_decode_int8_opt_in_sqnr(fmt, M, dtype):
    # int8_decode=True runs the int8-activation kernel: approximate, but far below the 4-bit weight
    # error. Seeded: its SQNR varies with the draw (~36-45 dB).
    N, K, gs = 72, 256, 64
    qw = make_qweight(fmt, N, K, gs, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(100 + M)).to(dtype)
    with backends.force("cpp"):
        y = pyhappy.ops.quant_linear(x, qw, int8_decode=True)
        y_exact = pyhappy.ops.quant_linear(x, qw)
    want = x.double() @ qw.dequantize(torch.float64).t()
    assert y.dtype == dtype and y.shape == (M, N)
    assert 30 < sqnr_db(y, want) < sqnr_db(y_exact, want)


@_no_cpp
def test_int8_decode_is_validated_and_reaches_the_modules():
    qw = make_qweight("int4", 16, 64, 32)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    for bad in (1, "yes", None, torch.tensor(True)):
        with pytest.raises(TypeError, match="int8_decode must be a bool"):
            pyhappy.ops.quant_linear(x, qw, int8_decode=bad)
    # the op's schema: the argument is optional (callers written before it still work)
    with backends.force("cpp"):
        exact = OP(x, *packed_args(qw), None, None, None, None, 1.0, 0.0, None)[0]
        approx = OP(x, *packed_args(qw), None, None, None, None, 1.0, 0.0, None, True)[0]
        torch.testing.assert_close(exact, pyhappy.ops.quant_linear(x, qw), atol=0, rtol=0)
        torch.testing.assert_close(approx, pyhappy.ops.quant_linear(x, qw, int8_decode=True), atol=0, rtol=0)
    lin = nn.Linear(64, 16)
    for cls in (QuantLinear, QLoRALinear):
        with pytest.raises(TypeError, match="int8_decode"):
            cls(64, 16, "int4", 32, int8_decode="on")
        with pytest.raises(TypeError, match="int8_decode"):
            cls.from_linear(lin, "int4", 32, int8_decode=0)
        m = cls.from_linear(lin, "int4", 32)
        assert m.int8_decode is False and "int8_decode" not in repr(m)
        with pytest.raises(TypeError, match="int8_decode"):
            m.int8_decode = 1
        assert m.int8_decode is False  # unchanged by the refused value
        with torch.no_grad():
            exact = m(x)
            m.int8_decode = True
            approx = m(x)
            assert "int8_decode=True" in repr(m) and "_int8_decode" not in m.state_dict()
            want = pyhappy.ops.quant_linear(x, m.qweight, m.bias, int8_decode=True)
            if cls is QLoRALinear:
                want = want + m.scaling * (x @ m.lora_A.weight.t()) @ m.lora_B.weight.t()
        torch.testing.assert_close(approx, want)
        assert not torch.equal(approx, exact) and sqnr_db(approx, exact) > 30
        assert cls.from_linear(lin, "int4", 32, int8_decode=True).int8_decode is True


@pytest.mark.parametrize("backend", cpu_backends())
def test_act_order_permutation(backend):
    M, N, K, gs = 18, 12, 64, 32
    qw = make_qweight("int4", N, K, gs, perm=True)
    assert qw.perm is not None
    x = torch.randn(M, K, requires_grad=True)
    A, B, _ = make_lora(N, K, 2, torch.float32, core=False)
    A.requires_grad_()
    with backends.force(backend):
        y = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5)
        gx, gA = torch.autograd.grad(y.sum(), [x, A])
    W = qw.dequantize()  # original column order
    x2, A2 = x.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
    y2 = x2 @ W.t() + 0.5 * (x2 @ A2.t()) @ B.t()
    gx2, gA2 = torch.autograd.grad(y2.sum(), [x2, A2])
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, gx2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gA, gA2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_dropout_matches_lora_linear_on_dequantized_weight(backend):
    # Same hash mask as lora_linear: with the dense dequantized weight both ops agree.
    M, N, K, r = 20, 16, 64, 4
    qw = make_qweight("nf4", N, K, 64)
    x = torch.randn(M, K)
    A, B, C = make_lora(N, K, r, torch.float32, core=True)
    seed = torch.tensor([42])
    with backends.force(backend):
        y = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5, C, 0.3, seed=seed)
    with backends.force("reference"):
        want = pyhappy.ops.lora_linear(x, qw.dequantize(), None, A, B, 0.5, C, 0.3, seed=seed)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_frozen_adapter_still_contributes_to_grad_x():
    M, N, K = 20, 16, 64
    qw = make_qweight("int4", N, K, 32)
    A, B, _ = make_lora(N, K, 3, torch.float32, core=False)
    x = torch.randn(M, K, requires_grad=True)
    gx = torch.autograd.grad(pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5).sum(), x)[0]
    W = qw.dequantize()
    x2 = x.detach().clone().requires_grad_()
    gx2 = torch.autograd.grad((x2 @ W.t() + 0.5 * (x2 @ A.t()) @ B.t()).sum(), x2)[0]
    torch.testing.assert_close(gx, gx2, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# opcheck, gradcheck, compile
# ------------------------------------------------------------------------------------------------


def _op_args(requires_grad, fmt="int4", lora=True, dtype=torch.float32, p=0.2):
    N, K, M = 12, 64, 20
    qw = make_qweight(fmt, N, K, 32)
    x = torch.randn(M, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype)
    A, B, C = make_lora(N, K, 3, dtype, core=True) if lora else (None, None, None)
    for t in (x, bias, A, B, C):
        if t is not None:
            t.requires_grad_(requires_grad)
    return (x, *packed_args(qw), bias, A, B, C, 0.5, p if lora else 0.0, torch.tensor([5]))


@pytest.mark.parametrize("backend", cpu_backends()[:2])  # Triton on CPU (the interpreter) needs real data, not fake tensors
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(backend, requires_grad, fmt):
    with backends.force(backend):
        torch.library.opcheck(OP, _op_args(requires_grad, fmt))
        torch.library.opcheck(OP, _op_args(requires_grad, fmt, lora=False))


def test_gradcheck_float64_reference():
    args = _op_args(True, "nf4", dtype=torch.float64)

    def fn(x, b, A, B, C):
        return OP(x, *args[1:7], b, A, B, C, 0.5, 0.3, args[13])[0]

    with backends.force("reference"):
        assert torch.autograd.gradcheck(fn, (args[0], args[7], args[8], args[9], args[10]))


@_no_cpp
def test_compile_fullgraph_forward_backward_one_frame():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = QLoRALinear.from_quantized(make_qweight("int4", 24, 64, 32, perm=True), torch.zeros(24), r=4, init="none",
                                   dropout=0.1)
    x = torch.randn(20, 64, requires_grad=True)
    torch.manual_seed(0)

    def f(x):
        return (m(x) ** 2).sum()

    cnt = CompileCounterWithBackend("inductor")
    cf = torch.compile(f, backend=cnt, fullgraph=True)
    m.eval()  # deterministic (no dropout); Inductor may still order the float sums around the op differently
    loss = cf(x)
    params = [x, m.lora_A.weight, m.lora_B.weight]
    grads = torch.autograd.grad(loss, params)
    want_loss = f(x)
    want = torch.autograd.grad(want_loss, params)
    assert cnt.frame_count == 1
    torch.testing.assert_close(loss, want_loss, atol=1e-4, rtol=1e-5)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-4 * w.abs().max().item(), rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_module_from_linear_and_state_dict(fmt):
    lin = nn.Linear(128, 40)
    m = QuantLinear.from_linear(lin, fmt, group_size=64)
    assert not any(t.dtype.is_floating_point and t.numel() == 128 * 40 for t in m.state_dict().values()
                   if isinstance(t, torch.Tensor))
    x = torch.randn(3, 5, 128)
    y = m(x)
    assert y.shape == (3, 5, 40)
    torch.testing.assert_close(y, x @ m.dequantize().t() + lin.bias, atol=2e-2, rtol=2e-2)
    m2 = QuantLinear(128, 40, fmt, 64)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(x), y)
    with pytest.raises(ValueError, match="format"):
        QuantLinear(128, 40, "int4" if fmt != "int4" else "int3", 64).load_state_dict(m.state_dict())


def test_eager_caches_follow_the_buffers():
    """The eager decode path keeps the module's QuantizedWeight and the packed tensors' checks
    between calls; replacing a buffer (or the weight's tensors) must be seen on the next call."""
    torch.manual_seed(0)
    a, b = nn.Linear(64, 16, bias=False), nn.Linear(64, 16, bias=False)
    m = QuantLinear.from_linear(a, "int4", group_size=32)
    other = QuantLinear.from_linear(b, "int4", group_size=32)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert m.qweight is m.qweight
        torch.testing.assert_close(m(x), x @ m.dequantize().t(), atol=1e-5, rtol=1e-5)
        m.qdata, m.scales, m.zeros = other.qdata, other.scales, other.zeros  # a buffer swap
        torch.testing.assert_close(m(x), other(x))
        qw = m.qweight
        pyhappy.ops.quant_linear(x, qw)
        qw.data["scales"] = qw.data["scales"][:, :1].contiguous()  # wrong shape: checked again, not cached
        with pytest.raises(ValueError, match="scales must be"):
            pyhappy.ops.quant_linear(x, qw)
    m.to(torch.bfloat16)  # _apply drops the cached weight with the old buffers
    assert "_qweight" not in m.__dict__ and m.qdata.dtype == torch.uint8


def test_eager_caches_are_not_pickled(tmp_path):
    """A saved module does not carry the eager caches: loaded onto another device (here meta), the
    packed tensors are checked again and the call fails with the argument named."""
    m = QuantLinear.from_linear(nn.Linear(64, 16), "int4", group_size=32)
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = m(x)
    torch.save(m, tmp_path / "m.pt")
    m2 = torch.load(tmp_path / "m.pt", weights_only=False)
    assert "_qweight" not in m2.__dict__
    with torch.no_grad():
        torch.testing.assert_close(m2(x), y)
    m3 = torch.load(tmp_path / "m.pt", weights_only=False, map_location="meta")
    with torch.no_grad(), pytest.raises(ValueError, match="is on meta but x is on cpu"):
        m3(x)


def test_qlora_module_trains_only_the_adapter():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    m = QLoRALinear.from_linear(lin, "nf4", 64, r=4, alpha=8, dropout=0.1)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(32, 64), torch.randn(32, 32)
    losses = []
    for _ in range(5):
        loss = ((m(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert m.qdata.grad is None and m.bias.grad is None
    m.eval()
    torch.testing.assert_close(m(x), x @ (m.dequantize() + m.delta_weight()).t() + lin.bias, atol=1e-3, rtol=1e-3)


def test_qlora_state_dict_round_trip_with_act_order():
    m = QLoRALinear.from_quantized(make_qweight("int3", 16, 64, 32, perm=True), torch.randn(16), r=2, init="none")
    fresh = QLoRALinear(64, 16, "int3", 32, r=2)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(4, 64)
    torch.testing.assert_close(fresh(x), m(x))
    # and back to a plain one without act-order
    plain = QLoRALinear.from_quantized(make_qweight("int3", 16, 64, 32), None, r=2)
    m2 = QLoRALinear(64, 16, "int3", 32, r=2, bias=False)
    m2.load_state_dict(plain.state_dict())
    assert m2.perm is None


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    qw = make_qweight("int4", 12, 64, 32)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="x must be"):
        pyhappy.ops.quant_linear(torch.randn(3, 60), qw)
    with pytest.raises(TypeError, match="qweight"):
        pyhappy.ops.quant_linear(x, torch.randn(12, 64))
    with pytest.raises(ValueError, match="bias"):
        pyhappy.ops.quant_linear(x, qw, torch.randn(11))
    with pytest.raises(ValueError, match="lora_B"):
        pyhappy.ops.quant_linear(x, qw, None, torch.randn(2, 64), None)
    with pytest.raises(TypeError, match="lora_A has dtype"):
        pyhappy.ops.quant_linear(x, qw, None, torch.randn(2, 64).double(), torch.randn(12, 2))
    with pytest.raises(ValueError, match="dropout_p applies to the LoRA input"):
        pyhappy.ops.quant_linear(x, qw, dropout_p=0.1)
    args = list(packed_args(qw))
    bad = [(0, torch.zeros(3, 2, 128, dtype=torch.uint8), "qdata"),
           (1, args[1].float(), "scales"),
           (2, None, "zeros"),
           (3, 7, "fmt"),
           (5, 48, "group_size")]
    for i, v, name in bad:
        a = list(args)
        a[i] = v
        with pytest.raises(ValueError, match=name):
            OP(x, *a, None, None, None, None, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(100, 10, "int4", 64)
    with pytest.raises(ValueError, match="format"):
        QuantLinear(64, 10, "int5")


# ------------------------------------------------------------------------------------------------
# C++ kernels directly: dequantizer, decode kernels (exact and int8_decode; AVX2 and portable)
# ------------------------------------------------------------------------------------------------


@_no_cpp
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpp_dequantize_is_bit_exact(fmt, dtype):
    qw = make_qweight(fmt, 21, 128, 32, seed=4)
    qd, sc, zr, fm, n, gs = packed_args(qw)
    got = torch.ops.pyhappy.quant_dequantize_cpu(qd, sc, zr, fm, n, 128, gs, dtype)
    assert torch.equal(got, qw.dequantize(torch.float32).to(dtype))


def _quantized_activation_reference(x, qw):
    """What the int8_decode kernel computes, in float64: int8 activations per 32-block (scale max|x|/127,
    round half to even) times the weight (NF4 through round(63·NF4)/63)."""
    M, K = x.shape
    xb = x.float().view(M, K // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    # the kernel's float32 ops: codes round(x · (127/max)) (ties decided by the float32 product, which
    # matters for bfloat16 inputs), scale max/127
    # (a tensor divide: ``127.0 / t`` is reciprocal(t) · 127 in torch, rounded differently)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / torch.where(amax > 0, amax, torch.ones_like(amax)), 0.0)
    xq = torch.round(xb * inv).double()
    xa = (xq * (amax / 127).double()).view(M, K)
    W = qw.dequantize(torch.float64)
    if qw.format == "nf4":
        codes, absmax, _ = qw.codes()
        t = torch.round(63 * pyhappy.quant.layout.NF4_TABLE.double()) / 63
        W = (t[codes.long()].view(qw.shape[0], -1, qw.group_size) * absmax.double().unsqueeze(-1)).view(qw.shape)
    return xa @ W.t()


def _gemv_at_level(level, x, qw, int8_decode=False):
    """quant_gemv_cpu with the CPU kernels capped at ``level``."""
    from pyhappy import _C

    _C.set_simd_level(level)
    try:
        return torch.ops.pyhappy.quant_gemv_cpu(x, *packed_args(qw), int8_decode)
    finally:
        _C.set_simd_level("avx512")


@_no_cpp
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("level", ["avxvnni", "avx2", "portable"])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_int8_decode_kernel_matches_quantized_activation_math(fmt, level, M, dtype):
    N, K, gs = 27, 256, 64
    qw = make_qweight(fmt, N, K, gs, seed=M)
    x = torch.randn(M, K).to(dtype)
    x[0, 32:64] = 0.0  # an all-zero activation block
    if M > 1:
        x[1] *= 1e4  # large magnitudes
    y = _gemv_at_level(level, x, qw, int8_decode=True)
    want = _quantized_activation_reference(x.float(), qw)
    torch.testing.assert_close(y.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


@_no_cpp
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpp_int8_decode_simd_levels_agree_bit_for_bit(fmt):
    # The AVX-VNNI and AVX2 kernels differ only in how they form exact integer dot products (and
    # the SIMD activation quantizer replays the portable one's float ops), so their outputs are equal.
    from pyhappy import _C

    if "avxvnni" not in _C.simd_level():
        pytest.skip(f"this CPU runs {_C.simd_level()}: no AVX-VNNI kernel to compare")
    qw = make_qweight(fmt, 40, 512, 128 if fmt != "nf4" else 64, seed=3)
    for M in (1, 3, 4, 7):
        x = torch.randn(M, 512) * torch.logspace(-3, 3, 512)  # blocks of very different scales
        assert torch.equal(_gemv_at_level("avxvnni", x, qw, True), _gemv_at_level("avx2", x, qw, True)), M


@_no_cpp
def test_cpp_exact_int4_decode_avx512_and_avx2_agree_bit_for_bit():
    # At one row the AVX-512 kernel runs the AVX2 tile pair's FMAs, per lane and in the same order,
    # on two tiles in one register: the outputs are equal (pairs and the odd last tile of 5 tiles).
    from pyhappy import _C

    if "avx512" not in _C.simd_level():
        pytest.skip(f"this CPU runs {_C.simd_level()}: no AVX-512 kernel to compare")
    qw = make_qweight("int4", 40, 512, 128, seed=4)
    g = torch.Generator().manual_seed(9)
    for scale in (1.0, 1e-20, 1e30):
        x = torch.randn(1, 512, generator=g) * torch.logspace(-3, 3, 512) * scale
        assert torch.equal(_gemv_at_level("avx512", x, qw), _gemv_at_level("avx2", x, qw)), scale


@_no_cpp
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 16])
def test_cpp_exact_decode_of_several_rows_on_avx512(fmt, M):
    # On AVX-512 the decode kernels take a tile pair's 16 rows in 512-bit registers: int4 / int3
    # straight from registers in passes of up to 4 rows (pair_direct_avx512; 5, 8, 9 and 16 rows:
    # passes of 3 + 2, 4 + 4, 4 + 3 + 2 and four of 4), nf4 above 1 row through the block pair's
    # values stored k-major and multiplied with the rows 4 at a time. int4 / int3 run the AVX2
    # kernels' FMAs per lane in their order, in the same passes: equal outputs; nf4 sums in another
    # order than the AVX2 kernel's byte-lookup lanes. Both agree with the float64 product within fp32
    # rounding of the sums (pairs, a partial last tile).
    from pyhappy import _C

    if "avx512" not in _C.simd_level():
        pytest.skip(f"this CPU runs {_C.simd_level()}: no AVX-512 kernel to test")
    g = torch.Generator().manual_seed(M)
    for N, K, gs in ((40, 512, 128), (27, 256, 64), (16, 96, 32)):
        qw = make_qweight(fmt, N, K, gs, seed=M + N)
        w = qw.dequantize().double()
        x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, K)
        x[0, :gs] = 0.0
        x[-1] *= 1e-4
        y = _gemv_at_level("avx512", x, qw)
        want = x.double() @ w.T
        bound = 4 * K * 2.0**-24 * (x.double().abs() @ w.abs().T)
        assert ((y.double() - want).abs() <= bound).all() and torch.isfinite(y).all(), (N, K)
        if fmt != "nf4":
            assert torch.equal(y, _gemv_at_level("avx2", x, qw)), (N, K)


@_no_cpp
@pytest.mark.parametrize("N,K,gs", [(40, 512, 128), (27, 256, 64), (16, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_exact_nf4_decode_row_on_avx512_matches_avx2_bit_for_bit(N, K, gs, dtype):
    # At one row on AVX-512 the nf4 kernel looks each code up in the 16-value table held in one
    # register (vpermps on the shifted word) for both tiles of a pair: the values are the table's
    # exactly and each lane runs the AVX2 pair's FMAs in the same order (partial sums by k mod 4,
    # added pairwise, then the group's absmax), so the outputs are equal, and within fp32 rounding of
    # the sums of the float64 product of the dequantized weight (pairs, a partial last tile, groups
    # of 32..128, activations of very different scales, an all-zero group).
    from pyhappy import _C

    if "avx512" not in _C.simd_level():
        pytest.skip(f"this CPU runs {_C.simd_level()}: no AVX-512 kernel to test")
    qw = make_qweight("nf4", N, K, gs, seed=N + K)
    g = torch.Generator().manual_seed(N)
    w = qw.dequantize().double()
    for scale in (1.0, 1e-20, 1e30):
        x = (torch.randn(1, K, generator=g) * torch.logspace(-3, 3, K) * scale).to(dtype)
        x[0, :gs] = 0.0
        want = x.double() @ w.T
        bound = 4 * K * 2.0**-24 * (x.double().abs() @ w.abs().T)  # fp32 sums of K products
        y = _gemv_at_level("avx512", x, qw)
        assert torch.equal(y, _gemv_at_level("avx2", x, qw)), scale
        assert ((y.double() - want).abs() <= bound).all() and torch.isfinite(y).all(), scale


@_no_cpp
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("N,K,gs", [(40, 512, 128), (27, 256, 64), (8, 96, 32)])
@pytest.mark.parametrize("fmt", ["int4", "int3"])
def test_cpp_exact_int_decode_of_bf16_activations_on_avx512_bf16(fmt, M, N, K, gs):
    # bf16 activations at decode rows on AVX512-BF16 CPUs: vdpbf16ps over codes formed as the bf16
    # numbers 128 + c, the offset removed with the zero point. Every product is exact and the sums
    # are fp32, so the result agrees with the float64 product within fp32 rounding of the sums of
    # x · s · (128 + c) and of the zero-point term (tiles in pairs and an odd last tile: N = 40 is
    # 5 tiles, 27 ends in a partial tile, 8 is a single one; rows one at a time up to 4, then in
    # chunks of 8, the last one padded; int3's codes straddle bytes of its three code planes).
    from pyhappy import _C

    if "avx512bf16" not in _C.simd_level():
        pytest.skip(f"this CPU runs {_C.simd_level()}: no AVX512-BF16 kernel to test")
    qw = make_qweight(fmt, N, K, gs, seed=M + N)
    levels = 8 if fmt == "int3" else 16
    g = torch.Generator().manual_seed(M)
    x = (torch.randn(M, K, generator=g) * torch.logspace(-4, 4, K)[torch.randperm(K, generator=g)]).bfloat16()
    x[0, :gs] = 0.0  # an all-zero group
    if M > 1:
        x[1] *= 1e25  # large magnitudes
    if M > 2:
        x[2] *= 1e-15  # small ones
    if M > 3:
        x[3] = 0.0  # an all-zero row
    y = _gemv_at_level("avx512", x, qw)
    w = qw.dequantize().double()
    want = x.double() @ w.T
    gen = torch.Generator().manual_seed(M + N)  # make_qweight's draws: codes, scales, zeros
    codes = torch.randint(0, levels, (N, K), generator=gen, dtype=torch.uint8).double()
    s = (torch.rand(N, K // gs, generator=gen) * 0.05 + 0.01).half().double().repeat_interleave(gs, 1)  # [N, K], fp16 as stored
    z = torch.randint(0, levels, (N, K // gs), generator=gen).double().repeat_interleave(gs, 1)
    torch.testing.assert_close(w, s * (codes - z))
    bound = 4 * K * 2.0**-24 * (x.double().abs() @ (s * (128 + levels + 128 + z)).T)  # the sums' terms
    assert (y.double() - want).abs().le(bound).all()
    assert torch.equal(y, _gemv_at_level("avx512", x, qw))  # deterministic
    # The fp32 kernel (capped below AVX-512) agrees with it to the same bound, and not bit for bit
    # (the two form different sums): this call did run the bf16 kernel.
    other = _gemv_at_level("avxvnni", x, qw)
    assert (other.double() - want).abs().le(bound).all()
    assert not torch.equal(y, other)


@_no_cpp
def test_cpp_exact_int4_decode_of_bf16_activations_outside_its_range_takes_the_fp32_kernel():
    # A row the bf16 kernel cannot scale exactly (max|x| below 2^-60 or above 2^100, a nonzero
    # |x| 2^-120 below the row's largest, an infinity) sends the call to the fp32 kernel: the
    # result is that kernel's, bit for bit. NaN is carried through by the bf16 kernel.
    from pyhappy import _C

    if "avx512bf16" not in _C.simd_level():
        pytest.skip(f"this CPU runs {_C.simd_level()}: no AVX512-BF16 kernel to test")
    qw = make_qweight("int4", 40, 256, 64, seed=5)
    base = torch.randn(2, 256, generator=torch.Generator().manual_seed(1))
    cases = {"tiny": base * 1e-20, "huge": base * 1e32, "inf": base.clone(), "range": base.clone()}
    cases["inf"][1, 7] = float("inf")
    cases["range"][0, 3] = 1e-37
    for name, x in cases.items():
        xb = x.bfloat16()
        torch.testing.assert_close(_gemv_at_level("avx512", xb, qw), _gemv_at_level("avxvnni", xb, qw), rtol=0, atol=0,
                                   equal_nan=True, msg=name)
    xb = base.bfloat16()
    xb[1, 9] = float("nan")
    y = _gemv_at_level("avx512", xb, qw)
    assert y[1].isnan().all() and not y[0].isnan().any()
    assert not torch.equal(y[0], _gemv_at_level("avxvnni", xb, qw)[0])  # the bf16 kernel ran


def _intdot(x, qw, level="avx512"):
    """quant_gemv_cpu asking for the exact integer kernel (one row, int4 / int3, AVX512-VNNI),
    with the CPU kernels capped at ``level``."""
    from pyhappy import _C

    _C.set_simd_level(level)
    try:
        return torch.ops.pyhappy.quant_gemv_cpu(x, *packed_args(qw), False, True)
    finally:
        _C.set_simd_level("avx512")


def _needs_avx512vnni():
    from pyhappy import _C

    if "avx512vnni" not in _C.simd_level():
        pytest.skip(f"this CPU runs {_C.simd_level()}: no AVX512-VNNI kernel to test")


@_no_cpp
@pytest.mark.parametrize("fmt", ["int4", "int3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,gs", [(27, 160, 32), (40, 512, 128), (8 * 36 + 5, 384, 96)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpp_exact_integer_decode_agrees_with_float64(fmt, dtype, N, K, gs, threads):
    """The exact integer decode (csrc/cpu/quant_linear_decode_digits.h): codes times the activations'
    base-256 digits by vpdpbusd, one row or two. Against the float64 product within the exact kernels' tolerance and
    no less accurate than the fp32 kernel: every code at every position (int4), zero points 0 and
    15, groups of one to four blocks, partial last tiles, shares of odd and even tile counts over 1-3
    threads, activations spanning six decades at magnitudes from 1e-15 to 2^90 (fp16: its own
    range), a zero group, a row of zeros."""
    _needs_avx512vnni()
    qw = _every_code_weight(N, K, gs, seed=N) if fmt == "int4" else make_qweight(fmt, N, K, gs, seed=N)
    W = qw.dequantize(torch.float64)
    g = torch.Generator().manual_seed(K + threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for mag in ((1.0, 3e-15, 2.0**90) if dtype is not torch.float16 else (1.0, 2.0**-8, 16.0)):
            x = (torch.randn(2, K, generator=g) * torch.logspace(-3, 3, K) * mag).to(dtype)
            x[0, gs:2 * gs] = 0.0
            x[1] *= 0.125  # the second row at its own scale
            x = x[:1] if mag == 1.0 else x  # one row, and two
            y = _intdot(x, qw)
            want = x.double() @ W.t()
            scale = x.double().abs() @ W.abs().t()
            err = (y.double() - want).abs()
            assert torch.isfinite(y).all() and err.le(1e-5 * scale).all(), (mag, err.max())
            fp32_err = (_gemv_at_level("avx512", x, qw).double() - want).abs()
            assert (err / scale).max() <= max(2 * (fp32_err / scale).max(), 2.0**-24), mag
        assert torch.equal(_intdot(torch.zeros(2, K, dtype=dtype), qw), torch.zeros(2, N))
    finally:
        torch.set_num_threads(before)


@_no_cpp
def test_cpp_exact_integer_decode_outside_its_range_takes_the_fp32_kernel():
    """Rows the integer kernel declines (a NaN or Inf, max|x| outside [2^-60, 2^100), a group more
    than 2^90 below the row's largest; in a two-row call, either row) take the fp32 kernel, bit for
    bit; with more than two rows, an nf4 weight or below AVX-512, int_dot changes nothing; a row inside the range gives a result of
    its own (the integer kernel ran)."""
    _needs_avx512vnni()
    N, K, gs = 24, 256, 64
    qw = make_qweight("int4", N, K, gs, seed=3)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(1, K, generator=g)
    cases = {"nan": base.clone(), "inf": base.clone(), "huge": base * 2.0**101, "tiny": base * 2.0**-62,
             "span": base.clone()}
    cases["nan"][0, 9] = float("nan")
    cases["inf"][0, 70] = float("inf")
    cases["span"][0, gs:2 * gs] *= 2.0**-95
    for name, x in cases.items():
        torch.testing.assert_close(_intdot(x, qw), _gemv_at_level("avx512", x, qw), rtol=0, atol=0, equal_nan=True,
                                   msg=name)
    three = torch.randn(3, K, generator=g)
    assert torch.equal(_intdot(three, qw), _gemv_at_level("avx512", three, qw))
    two = torch.cat([base, cases["inf"]])  # one row out of range: the whole call takes the fp32 kernel
    torch.testing.assert_close(_intdot(two, qw), _gemv_at_level("avx512", two, qw), rtol=0, atol=0, equal_nan=True)
    nf4 = make_qweight("nf4", N, K, gs, seed=5)
    assert torch.equal(_intdot(base, nf4), _gemv_at_level("avx512", base, nf4))
    assert torch.equal(_intdot(base, qw, level="avx2"), _gemv_at_level("avx2", base, qw))
    assert not torch.equal(_intdot(base, qw), _gemv_at_level("avx512", base, qw))


@_no_cpp
def test_integer_decode_compiles_fullgraph_with_the_eager_values():
    """The "cpp_intdot" pick traced by torch.compile (the C++ op's int_dot argument through its fake):
    one frame, the eager kernel's values at one and two rows, with a LoRA adapter on top."""
    from torch._dynamo.testing import CompileCounter

    from pyhappy import _tune

    _needs_avx512vnni()
    qw = make_qweight("int3", 40, 128, 32, seed=9)
    A, B, _ = make_lora(40, 128, 4, torch.float32, core=False)
    for m in (1, 2):
        x = torch.randn(m, 128)
        with torch.no_grad(), _tune.forced("cpp_intdot"), backends.force("cpp"):
            cnt = CompileCounter()
            torch._dynamo.reset()
            f = torch.compile(lambda x: pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5), backend=cnt, fullgraph=True)
            got, want = f(x), pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5)
        with torch.no_grad(), _tune.forced("cpp"), backends.force("cpp"):
            fp32_kernel = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5)
        assert cnt.frame_count == 1
        assert torch.equal(got, want), m
        assert not torch.equal(want, fp32_kernel)  # the integer kernel ran, in both
        torch.testing.assert_close(want, fp32_kernel, rtol=1e-5, atol=1e-5)


@_no_cpp
@pytest.mark.parametrize("fmt", ["int4", "int3", "nf4"])
def test_integer_decode_is_a_candidate_of_one_row_where_it_serves(fmt, monkeypatch, tmp_path):
    """The measured dispatch offers "cpp_intdot" for one or two rows of an int4 / int3 weight on an
    AVX512-VNNI CPU (and only there); forced, the functional op runs it, exact; as a cached pick, eager
    inference calls run it too."""
    from pyhappy import _C, _tune

    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    qw = make_qweight(fmt, 44, 320, 64, seed=6)  # a shape no other test tunes
    W = qw.dequantize(torch.float64)
    x = torch.randn(1, 320)
    with torch.no_grad(), backends.force("cpp"):
        for m in (1, 2, 3):
            pyhappy.ops.quant_linear(x.repeat(m, 1), qw)
    offered = {k.split("|")[3]: set(e["median_us"]) for k, e in _tune.tuner().entries().items()
               if k.startswith("quant_linear|fwd|float32|") and "|K320|N44|" in k}
    serves = fmt != "nf4" and "avx512vnni" in _C.simd_level()
    for m in ("M1", "M2"):
        assert offered[m] == ({"cpp", "torch", "cpp_intdot"} if serves else {"cpp", "torch"})
    assert offered["M4"] == {"cpp", "torch"}
    if not serves:
        return
    with torch.no_grad(), _tune.forced("cpp_intdot"):
        y = pyhappy.ops.quant_linear(x, qw)
    assert torch.equal(y, _intdot(x, qw))
    assert (y.double() - x.double() @ W.t()).abs().le(1e-5 * (x.double().abs() @ W.abs().t())).all()


@_no_cpp
def test_cpp_simd_level_control():
    from pyhappy import _C

    best = _C.simd_level()
    try:
        _C.set_simd_level("portable")
        assert _C.simd_level() == "portable"
        _C.set_simd_level("avx2")
        assert _C.simd_level() in ("avx2+fma", "portable")
        _C.set_simd_level("avxvnni")
        assert "avx512f" not in _C.simd_level()
        with pytest.raises(ValueError, match="level must be"):
            _C.set_simd_level("avx1024")
    finally:
        _C.set_simd_level("avx512")
    assert _C.simd_level() == best


@_no_cpp
def test_cpp_decode_kernel_errors():
    qw = make_qweight("int4", 32, 64, 32)  # two tile pairs: qdata[:1] is half the weight
    qd, sc, zr, fm, n, gs = packed_args(qw)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="qdata"):
        torch.ops.pyhappy.quant_gemv_cpu(x, qd[:1], sc, zr, fm, n, gs)
    with pytest.raises(RuntimeError, match="zeros"):
        torch.ops.pyhappy.quant_gemv_cpu(x, qd, sc, None, fm, n, gs)
    with pytest.raises(RuntimeError, match="fmt"):
        torch.ops.pyhappy.quant_gemv_cpu(x, qd, sc, zr, 5, n, gs)
    with pytest.raises(RuntimeError, match="group_size"):
        torch.ops.pyhappy.quant_gemv_cpu(x, qd, sc, zr, fm, n, 48)


@_no_cpp
def test_cpp_multithreaded_slabs_with_inputs_requiring_grad():
    # Regression: ATen ops inside at::parallel_for workers saw x.requires_grad (the worker threads
    # do not inherit the below-autograd dispatch state). Needs several slabs: N=1024, K=512.
    qw = make_qweight("int4", 1024, 512, 64)
    x = torch.randn(32, 512, requires_grad=True)
    A, B, _ = make_lora(1024, 512, 4, torch.float32, core=False)
    A.requires_grad_()
    y = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5)
    gx, gA = torch.autograd.grad(y.sum(), [x, A])
    W = qw.dequantize()
    torch.testing.assert_close(y, x @ W.t() + 0.5 * (x @ A.t()) @ B.t(), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(gx, torch.ones(32, 1024) @ (W + 0.5 * B @ A), atol=1e-3, rtol=1e-4)
    # lora_linear's tiled dropout path (bf16, several row tiles)
    xb = torch.randn(64, 4096, dtype=torch.bfloat16, requires_grad=True)
    Wb = torch.randn(16, 4096, dtype=torch.bfloat16)
    Ab, Bb = torch.randn(4, 4096, dtype=torch.bfloat16, requires_grad=True), torch.randn(16, 4, dtype=torch.bfloat16)
    yb = pyhappy.ops.lora_linear(xb, Wb, None, Ab, Bb, 0.5, dropout_p=0.1, seed=torch.tensor([1]))
    yb.float().sum().backward()
    assert xb.grad is not None and Ab.grad is not None


@pytest.mark.skipif(not (HAS_TRITON and backends.triton_interpreting()), reason="triton interpreter unavailable")
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_decode_shapes_and_no_grad_x(fmt):
    # M=1 (decode tiles), N not a multiple of the tile, K > BLOCK_K, a frozen x (need_grad_x False).
    N, K, gs = 40, 256, 64
    qw = make_qweight(fmt, N, K, gs, seed=7)
    A, B, C = make_lora(N, K, 3, torch.float32, core=True)
    A.requires_grad_()
    x = torch.randn(1, K)
    with backends.force("triton"):
        y = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5, C, 0.2, seed=torch.tensor([9]))
        (gA,) = torch.autograd.grad(y.sum(), [A])
    with backends.force("reference"):
        y2 = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5, C, 0.2, seed=torch.tensor([9]))
        (gA2,) = torch.autograd.grad(y2.sum(), [A])
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gA, gA2, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 16, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_triton_matches_reference(fmt, M, dtype):
    N, K, gs = 1024, 2048, 64
    qw = make_qweight(fmt, N, K, gs, seed=M).to("cuda")
    A, B, C = (t.cuda() for t in make_lora(N, K, 16, dtype, core=True))
    x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
    A.requires_grad_()
    outs = {}
    for backend in ("triton", "reference"):
        with backends.force(backend):
            y = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5, C, 0.1, seed=torch.tensor([3], device="cuda"))
            outs[backend] = (y, *torch.autograd.grad(y.float().square().sum(), [x, A]))
    for got, want in zip(outs["triton"], outs["reference"]):
        assert sqnr_db(got, want) > (40 if dtype is torch.bfloat16 else 60)


# ------------------------------------------------------------------------------------------------
# CUDA decode kernel (pyhappy::quant_decode): on CPU tensors its lane-by-lane emulation, which runs
# the kernel's own per-lane code (csrc/quant_linear_common.h); on a GPU the kernel itself.
# ------------------------------------------------------------------------------------------------

HAS_DECODE = helpers.has_cpp_op("quant_decode")
_HAS_CUDA_BUILD = HAS_CPP and bool((pyhappy._ext.build_info() or {}).get("with_cuda"))
DECODE_DEVICES = [
    pytest.param("cpu", id="emulated", marks=pytest.mark.skipif(not HAS_DECODE, reason="pyhappy._C without quant_decode")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not (HAS_DECODE and _HAS_CUDA_BUILD), reason="pyhappy._C built without CUDA kernels")]),
]
# (M, N, K, group_size): ragged tiles (N % 8), K whose block count is not a multiple of a warp
# step (4 blocks for 4-bit, 2 for 3-bit), M in every register bucket of the kernel (1, 2, 4, 8, 16).
DECODE_SHAPES = [(1, 13, 160, 32), (2, 129, 96, 32), (3, 8, 32, 32), (7, 40, 288, 96), (16, 64, 256, 128)]


def decode_parts(qw):
    """(Wc, Wz), float32, with deq(W) = Wc + Wz: the code term s·c and the zero term -s·z that the
    decode kernel sums separately (Σ s·c·x - s·z·Σ x), so the rounding-error bound of
    assert_close_to_oracle counts the magnitude of both (|Wc| + |Wz|), not of their difference."""
    codes, scales, zeros = qw.codes()
    s = scales.float().repeat_interleave(qw.group_size, dim=1)
    if zeros is None:
        return qw.dequantize().float(), torch.zeros(qw.shape)
    return codes.float() * s, -zeros.float().repeat_interleave(qw.group_size, dim=1) * s


def decode_oracle(x, bias, A, B, C, Wc, Wz):
    return dense_oracle(Wc + Wz)(x, bias, A, B, C)


def _decode(x, qw, bias=None, A=None, B=None, C=None, s=0.5, p=0.0, seed=None, sparse=None):
    from pyhappy.ops.quant_linear import _decode_forward

    return _decode_forward(x, *packed_args(qw), bias, A, B, C, s, p, seed, sparse=sparse)


@pytest.mark.parametrize("device", DECODE_DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_kernel_matches_dense(device, fmt, dtype, shape):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA decode kernel takes float16/bfloat16 (float32 runs on Triton)")
    M, N, K, gs = shape
    qw = make_qweight(fmt, N, K, gs, seed=M + N)
    A, B, C = make_lora(N, K, 5, dtype, core=True)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    dev = torch.device(device)
    y, u = _decode(x.to(dev), qw.to(dev), *(t.to(dev) for t in (bias, A, B, C)))
    assert y.dtype == dtype and y.shape == (M, N) and y.device.type == device
    assert_close_to_oracle(y.cpu(), decode_oracle, (x, bias, A, B, C, *decode_parts(qw)))
    torch.testing.assert_close(u.cpu(), x @ A.t())


@pytest.mark.parametrize("device", DECODE_DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_kernel_sparse_delta_and_dropout(device, fmt):
    from pyhappy.ops.sparse_delta_linear import sparse_layout

    dev, dtype = torch.device(device), torch.bfloat16
    M, N, K, gs = 4, 37, 192, 64
    qw = make_qweight(fmt, N, K, gs, seed=3)
    g = torch.Generator().manual_seed(5)
    idx = torch.randperm(N * K, generator=g)[: N * K // 20].sort().values.to(torch.int32)
    vals = torch.randn(idx.numel(), generator=g).to(dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    A, B, _ = make_lora(N, K, 4, dtype, core=False)
    seed = torch.tensor([11])
    y, u = _decode(x.to(dev), qw.to(dev), None, A.to(dev), B.to(dev), None, 0.5, 0.25, seed.to(dev),
                   sparse=(sparse_layout(idx, N, K).to(dev), vals.to(dev), 0.75))
    dW = torch.zeros(N * K, dtype=torch.float64)
    dW[idx.long()] = vals.double()
    from pyhappy import reference

    xd = x.double()
    want_u = reference.dropout(x, 0.25, seed).double() @ A.double().t()
    want = xd @ (qw.dequantize().double() + 0.75 * dW.view(N, K)).t() + 0.5 * want_u @ B.double().t()
    torch.testing.assert_close(u.cpu().double(), want_u, atol=2e-2, rtol=2e-2)
    assert sqnr_db(y.cpu(), want) > 45  # bf16 output rounding alone is ~52 dB


@pytest.mark.skipif(not HAS_DECODE, reason="pyhappy._C without quant_decode")
@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_kernel_hypothesis_shapes(fmt):
    from hypothesis import given, strategies as st

    @given(M=st.integers(1, 16), N=st.integers(1, 41), KB=st.integers(1, 11), gmul=st.sampled_from([1, 2, 3]),
           seed=st.integers(0, 2**16))
    def run(M, N, KB, gmul, seed):
        K = 32 * KB * gmul
        qw = make_qweight(fmt, N, K, 32 * gmul, seed=seed)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
        y, _ = _decode(x, qw)
        assert_close_to_oracle(y, decode_oracle, (x, None, None, None, None, *decode_parts(qw)))

    run()


@pytest.mark.skipif(not HAS_DECODE, reason="pyhappy._C without quant_decode")
def test_decode_kernel_opcheck_and_errors():
    qw = make_qweight("int4", 24, 64, 32)
    qd, sc, zr, fm, n, gs = packed_args(qw)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    op = torch.ops.pyhappy.quant_decode
    torch.library.opcheck(op, (x, qd, sc, zr, fm, n, gs, None, None, None, None, None, 0.0))
    cases = [
        ((torch.randn(17, 64), qd, sc, zr, fm, n, gs), "1 to 16 rows"),
        ((x.double(), qd, sc, zr, fm, n, gs), "x must be float16, bfloat16 or float32"),
        ((x, qd[:, :1], sc, zr, fm, n, gs), "qdata must be"),
        ((x, qd, sc.float(), zr, fm, n, gs), "scales must be"),
        ((x, qd, sc, None, fm, n, gs), "zeros must be"),
        ((x, qd, sc, zr, 3, n, gs), "fmt must be"),
        ((x, qd, sc, zr, fm, n, 48), "group_size must be"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args, None, None, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="lora_v and lora_B"):
        op(x, qd, sc, zr, fm, n, gs, None, torch.zeros(3, 2), None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="lora_v must be"):
        op(x, qd, sc, zr, fm, n, gs, None, torch.zeros(4, 2), torch.zeros(24, 2, dtype=x.dtype), None, None, 0.0)
    with pytest.raises(RuntimeError, match="sparse_layout must be"):
        op(x, qd, sc, zr, fm, n, gs, None, None, None, torch.zeros(5, dtype=torch.int32),
           torch.zeros(2, dtype=x.dtype), 0.0)


def test_cuda_arch_rule(monkeypatch):
    """Which GPUs the built CUDA kernels run on (capability and arch list; no GPU needed)."""
    build = {"cuda_arch_list": "8.0;9.0+PTX"}
    monkeypatch.setattr(pyhappy._ext, "build_info", lambda: build)
    for cap, ok in (((7, 5), False), ((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True),
                    ((10, 0), True), ((12, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        assert (backends._cuda_arch_reason(torch.device("cuda")) is None) == ok, cap
    build["cuda_arch_list"] = "8.0;9.0a"  # no PTX: nothing newer than sm_90a runs it
    for cap, ok in (((8, 6), True), ((9, 0), True), ((10, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        why = backends._cuda_arch_reason(torch.device("cuda"))
        assert (why is None) == ok, cap
    assert "TORCH_CUDA_ARCH_LIST" in why


def test_forced_cuda_backend_says_why(monkeypatch):
    qw = make_qweight("int4", 16, 64, 32)
    with backends.force("cuda"), pytest.raises(RuntimeError, match="serves CUDA tensors only"):
        pyhappy.ops.quant_linear(torch.randn(2, 64), qw)
    # As if on a CUDA machine: an op without a CUDA C++ kernel, and a shape the decode kernel does not take.
    real = backends.unavailable_reason
    monkeypatch.setattr(backends, "unavailable_reason", lambda b, d, t=None: None if b == "cuda" else real(b, d, t))
    with backends.force("cuda"), pytest.raises(RuntimeError, match="lora_linear has no CUDA C.. kernel"):
        pyhappy.ops.lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0)
    if HAS_DECODE:
        with backends.force("cuda"), pytest.raises(RuntimeError, match="takes 1 to 16 rows of x, got 17"):
            pyhappy.ops.quant_linear(torch.randn(17, 64), qw)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_DECODE and _HAS_CUDA_BUILD), reason="pyhappy._C built without CUDA kernels")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_default_decode_path_matches_triton_forward_backward_and_compiles(fmt, dtype):
    from pyhappy.ops import quant_linear as ql

    N, K, gs = 1000, 1024, 64
    qw = make_qweight(fmt, N, K, gs, seed=1).to("cuda")
    A, B, C = (t.cuda().requires_grad_() for t in make_lora(N, K, 16, dtype, core=True))
    for M, first in ((2, None), (16, "cuda")):  # the default rule's range, and forced up to 16 rows
        x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
        assert ql._runs_decode_kernel(ql._backend(x), x) == (M <= ql.DECODE_DEFAULT_MAX_M)
        outs = {}
        for backend in (first, "triton"):
            with backends.force(backend):
                y = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5, C, 0.1, seed=torch.tensor([3], device="cuda"))
                outs[backend] = (y, *torch.autograd.grad(y.float().square().sum(), [x, A, B, C]))
        for got, want in zip(outs[first], outs["triton"]):
            assert sqnr_db(got, want) > 40
    layer = QuantLinear.from_quantized(qw).cuda()
    torch._dynamo.reset()
    f = torch.compile(layer, fullgraph=True)
    xi = torch.randn(1, K, device="cuda", dtype=dtype)
    torch.testing.assert_close(f(xi), layer(xi), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_DECODE and _HAS_CUDA_BUILD), reason="pyhappy._C built without CUDA kernels")
def test_cuda_sparse_delta_on_quantized_base_runs_one_kernel():
    from pyhappy.nn import SparseDeltaLinear

    lin = nn.Linear(512, 300).cuda().to(torch.bfloat16)
    m = SparseDeltaLinear.from_linear(lin, density=0.01, seed=0, quantize="int4", group_size=64)
    with torch.no_grad():
        m.deltas["default"].values.normal_()
    x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused = m(x)
        with backends.force("triton"):
            unfused = m(x)
    assert sqnr_db(fused, unfused) > 40


@pytest.mark.skipif(not HAS_DECODE, reason="pyhappy._C without quant_decode")
def test_decode_kernel_compiles_fullgraph_one_frame():
    from torch._dynamo.testing import CompileCounter

    qw = make_qweight("int4", 40, 96, 32)
    A, B, _ = make_lora(40, 96, 4, torch.float32, core=False)
    x = torch.randn(3, 96)
    cnt = CompileCounter()
    f = torch.compile(lambda x: _decode(x, qw, None, A, B)[0], backend=cnt, fullgraph=True)
    torch._dynamo.reset()
    torch.testing.assert_close(f(x), _decode(x, qw, None, A, B)[0])
    assert cnt.frame_count == 1


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_module_dtype_cast_keeps_packed_buffers(fmt):
    """model.bfloat16() / .double() on a quantized layer casts the bias and leaves the packed weight
    (codes and scales) exactly as it was, so the layer still runs and dequantizes to the same W."""
    lin = nn.Linear(128, 40)
    m = QuantLinear.from_linear(lin, fmt, group_size=64)
    before = {n: b.clone() for n, b in m.named_buffers() if b is not None}
    W = m.dequantize().float()
    for cast, dt in ((m.bfloat16, torch.bfloat16), (m.double, torch.float64)):
        cast()
        for n, b in m.named_buffers():
            if b is not None:
                assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
        assert m.bias.dtype == dt
        x = torch.randn(3, 128).to(dt)
        ref = x.double() @ W.double().t() + m.bias.double()
        assert ((m(x).double() - ref).norm() / ref.norm()).item() < (1e-2 if dt == torch.bfloat16 else 1e-6)


def test_int8_opt_in_spellings_and_never_while_autograd_records(monkeypatch):
    """act_quant="int8" on the modules, int8_decode=True on the functional op and PYHAPPY_DECODE=int8
    for every call select the int8-activation decode for inference; while autograd records, the
    forward stays exact; a bad value is refused naming the setting."""
    from pyhappy.nn import QLoRALinear, QuantLinear
    from pyhappy.ops import quant_linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 40)
    x = torch.randn(3, 256)
    q = QuantLinear.from_linear(lin, "int4")
    exact = q(x).detach()
    ref = x @ q.qweight.dequantize().t() + lin.bias.detach()
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5)
    if not (q.qweight.device.type == "cpu" and pyhappy.backends.select("quant_linear", x.device, x.dtype) == "cpp"):
        pytest.skip("the int8 decode is the C++ CPU kernel's")
    q8 = QuantLinear.from_linear(lin, "int4", act_quant="int8")
    assert q8.int8_decode and q8.act_quant == "int8" and "int8_decode=True" in repr(q8)
    approx = q8(x)
    assert not torch.equal(approx, exact) and torch.allclose(approx, exact, rtol=0.05, atol=0.05)
    assert torch.equal(quant_linear(x, q.qweight, q.bias, int8_decode=True), approx)
    monkeypatch.setenv("PYHAPPY_DECODE", "int8")
    assert torch.equal(q(x), approx)
    xg = x.clone().requires_grad_()
    assert torch.equal(q(xg).detach(), exact)  # autograd records: exact
    ql = QLoRALinear.from_linear(lin, "int4", r=4, act_quant="int8")
    with torch.no_grad():
        ql.lora_B.weight.normal_()
    y_train = ql(x)
    assert y_train.requires_grad
    ql_exact = QLoRALinear.from_linear(lin, "int4", r=4)
    ql_exact.load_state_dict(ql.state_dict())
    monkeypatch.setenv("PYHAPPY_DECODE", "exact")
    torch.testing.assert_close(y_train, ql_exact(x), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("PYHAPPY_DECODE", "fast")
    with pytest.raises(ValueError, match="PYHAPPY_DECODE"):
        q(x)
    with pytest.raises(ValueError, match="act_quant"):
        QuantLinear.from_linear(lin, "int4", act_quant="int4")


@_no_cpp
@pytest.mark.parametrize("perm", [True, False], ids=["act_order", "plain"])
@pytest.mark.parametrize("winner", ["cpp", "torch", "int8"])
def test_a_decode_signature_served_before_runs_its_pick_without_checks(tmp_path, monkeypatch, winner, perm):
    """An eager inference call whose signature (shapes, dtypes, devices, grad mode, the packed
    weight, scaling, the int8 setting) was checked and served before runs the same pick at once:
    the same values, no argument checks, no decision lookup. A new signature, a replaced packed
    tensor, a forced candidate or backend, tuning off and autograd recording go through the checks."""
    import importlib

    from pyhappy import _tune as T

    Q = importlib.import_module("pyhappy.ops.quant_linear")
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.delenv("PYHAPPY_DECODE", raising=False)
    pick = "torch" if winner == "torch" else "cpp"
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: (pick, {n: 1.0 for n in c},
                                                                                       c[pick]()))
    checks, unfused = [], []
    real_validate, real_torch = Q._validate, Q._torch_forward
    monkeypatch.setattr(Q, "_validate", lambda *a, **k: checks.append(1) or real_validate(*a, **k))
    monkeypatch.setattr(Q, "_torch_forward", lambda *a, **k: unfused.append(1) or real_torch(*a, **k))
    N, K, r = 24, 64, 4
    qw = make_qweight("int4", N, K, 32, perm=perm)
    x = torch.randn(2, 3, K)
    A, B, _ = make_lora(N, K, r, torch.float32, core=False)
    bias = torch.randn(N)
    int8 = winner == "int8"

    def call(**kw):
        args = {"bias": bias, "lora_A": A, "lora_B": B, "scaling": 0.5, "int8_decode": int8, **kw}
        return pyhappy.ops.quant_linear(x, qw, **args)

    with torch.no_grad():
        y0 = call()
        n, u = len(checks), len(unfused)
        assert n > 0
        y1 = call()
        assert len(checks) == n and torch.equal(y1, y0)  # the remembered signature: no checks
        assert len(unfused) - u == (winner == "torch")  # the pick that served the first call
        if not int8:  # exact: the dequantized weight times the float activations
            want = x @ qw.dequantize().t() + bias + 0.5 * (x @ A.t()) @ B.t()
            torch.testing.assert_close(y1, want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="bias"):  # a new signature is checked, and refused by name
            call(bias=torch.ones(N + 1))
        n = len(checks)
        qw.data["scales"] = qw.data["scales"].clone()  # a replaced packed tensor: checked again
        torch.testing.assert_close(call(), y0, atol=0, rtol=0)
        assert len(checks) > n
        helpers.assert_settings_take_the_full_path(call, checks, monkeypatch)
    n = len(checks)
    y = call()  # grad mode on, nothing requires grad: nothing recorded, the same values
    assert torch.equal(y, y0) and not y.requires_grad
    # another signature (it holds the grad mode), except for the call kept on the weight, which
    # serves it at once (the C++ picks of a weight without act-order: _decode_hit)
    assert (len(checks) > n) == (perm or winner == "torch")


@_no_cpp
def test_a_repeated_decode_call_is_served_from_the_weight_until_anything_it_read_changes(tmp_path, monkeypatch):
    """The last eager inference call served by the C++ kernels is kept on the weight (``_hit``); a
    call with the same tensors, scaling, int8 setting and x's shape and dtype runs the kernel at
    once, with the same values, and anything else that decided the call (autograd recording, x's
    dtype, the int8 setting, tuning settings, the memo, the thread count, a replaced packed tensor)
    sends it back through the checks."""
    import importlib
    import pickle

    from pyhappy import _tune as T

    Q = importlib.import_module("pyhappy.ops.quant_linear")
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.delenv("PYHAPPY_DECODE", raising=False)
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: ("cpp", {n: 1.0 for n in c},
                                                                                      c["cpp"]()))
    checks, hits = [], []
    real_validate, real_hit = Q._validate, Q._decode_hit
    monkeypatch.setattr(Q, "_validate", lambda *a, **k: checks.append(1) or real_validate(*a, **k))
    monkeypatch.setattr(Q, "_decode_hit", lambda *a: (lambda y: hits.append(y is not None) or y)(real_hit(*a)))
    layer = QuantLinear.from_quantized(make_qweight("int4", 24, 64, 32))
    x = torch.randn(1, 64)
    want = x @ layer.qweight.dequantize().t()

    def served_at_once(f=lambda: layer(x)):
        n, k = len(checks), len(hits)
        y = f()
        return y, len(checks) == n and hits[k:] == [True]

    with torch.no_grad():
        y0 = layer(x)
        torch.testing.assert_close(y0, want, atol=1e-5, rtol=1e-5)
        y1, fast = served_at_once()
        assert fast and torch.equal(y1, y0) and "_hit" in layer.qweight.__dict__
        x3 = x.view(1, 1, 64)  # another shape: checked, then remembered in its turn
        y3, fast = served_at_once(lambda: layer(x3))
        assert not fast and torch.equal(y3.view(1, 24), y0)
        y3, fast = served_at_once(lambda: layer(x3))
        assert fast and y3.shape == (1, 1, 24) and torch.equal(y3.view(1, 24), y0)
        layer(x)
        yb, fast = served_at_once(lambda: layer(x.bfloat16()))
        assert not fast and yb.dtype == torch.bfloat16
        layer(x)
        monkeypatch.setenv("PYHAPPY_DECODE", "int8")
        y8, fast = served_at_once()
        assert not fast and not torch.equal(y8, y0)
        torch.testing.assert_close(y8, y0, atol=0.05, rtol=0.05)
        monkeypatch.delenv("PYHAPPY_DECODE")
        assert torch.equal(layer(x), y0)
        T._memo.clear()  # the memo emptied (not through the tuner): checked again
        assert not served_at_once()[1]
        assert served_at_once()[1]
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1 if threads > 1 else 2)
            assert not served_at_once()[1]
        finally:
            torch.set_num_threads(threads)
        layer(x)
        qw = layer.qweight
        qw.data["zeros"] = qw.data["zeros"].clone()  # a replaced packed tensor
        assert not served_at_once()[1]
        assert "_hit" not in pickle.loads(pickle.dumps(qw)).__dict__
    layer(x)
    y, fast = served_at_once(lambda: layer(x.requires_grad_()))  # autograd records
    assert not fast and y.requires_grad
    torch.testing.assert_close(y.detach(), y0, atol=1e-6, rtol=1e-6)


@_no_cpp
def test_compiled_decode_after_eager_calls_is_one_frame_with_the_eager_values():
    """Eager decode calls that left a remembered signature behind do not change what torch.compile
    traces: one frame, fullgraph, the eager values."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    layer = QuantLinear.from_quantized(make_qweight("int4", 24, 64, 32), torch.randn(24))
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = [layer(x) for _ in range(3)][-1]
        cnt = CompileCounterWithBackend("inductor")
        got = torch.compile(layer, backend=cnt, fullgraph=True)(x)
    assert cnt.frame_count == 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_CPP, reason="the unfused training formulation serves the C++ backend")
@pytest.mark.parametrize("case", ["lora_bias", "core_3d", "act_order", "no_adapter", "frozen_adapter"])
def test_unfused_training_formulation_matches_the_op(case):
    """The whole-step candidate of a training call (the weight dequantized in the forward and again
    for dx, the adapter as PEFT's products: bitsandbytes' + PEFT's formulation in plain autograd)
    gives the op's output and gradients: x, bias, lora_A/B/C, a 3-D x, an act-order weight."""
    from pyhappy import _tune

    N, K, r = 12, 64, 3
    qw = make_qweight("int4" if case == "act_order" else "nf4", N, K, 32, perm=case == "act_order")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*((2, 5) if case == "core_3d" else (9,)), K, generator=g, requires_grad=True)
    bias = torch.randn(N, generator=g, requires_grad=case == "lora_bias")
    A, B, C = make_lora(N, K, r, torch.float32, core=case == "core_3d")
    lora = case != "no_adapter"
    for t in (A, B, C):
        if t is not None and lora:
            t.requires_grad_(case != "frozen_adapter")
    params = [t for t in (x, bias, A, B, C) if t is not None and t.requires_grad]

    def step():
        y = pyhappy.ops.quant_linear(x, qw, bias, *((A, B, 0.7, C) if lora else ()))
        return [y.detach(), *torch.autograd.grad((y * y).sum(), params)], type(y.grad_fn).__name__
    with _tune.forced("cpp"):
        want, node = step()
    with _tune.forced("unfused"):
        got, unfused_node = step()
    assert node == "QuantLinearBackward" and unfused_node != node
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ training node serves the C++ backend")
@pytest.mark.parametrize("fwd,bwd", [("cpp", "cpp"), ("torch", "torch"), ("cpp", "torch"), ("torch", "cpp")])
@pytest.mark.parametrize("case", ["lora_bias", "core_3d", "act_order", "no_adapter", "frozen_adapter", "bf16",
                                  "decode_rows", "int3_zeros"])
@pytest.mark.parametrize("only_x", [False, True])
def test_the_cpp_training_node_equals_the_registered_ops_autograd_bit_for_bit(case, fwd, bwd, only_x):
    """The C++ node that serves a training call whose passes are decided (pyhappy._C.quant_linear_step)
    runs, for each pass, the candidate the registered op runs for that pick (the fused kernels, "cpp",
    or the dequantized weight's products, "torch") with the op's gradient formula: output and every
    gradient equal bit for bit (a trained bias, a core and 3-D x, an act-order weight, no adapter, a
    frozen adapter's share of dx, bf16, decode-sized rows, int3 with zero points; the gradient of x
    alone asked for: the backward follows what required grad at the forward, as the op's does)."""
    from pyhappy import _tune
    from pyhappy.ops.quant_linear import _Eager, _node, packed_args

    N, K, r = 12, 64, 3
    fmt = {"act_order": "int4", "int3_zeros": "int3"}.get(case, "nf4")
    qw = make_qweight(fmt, N, K, 32, perm=case == "act_order")
    dt = torch.bfloat16 if case == "bf16" else torch.float32
    g = torch.Generator().manual_seed(7)
    lead = {"core_3d": (2, 5), "decode_rows": (2,)}.get(case, (9,))
    x = torch.randn(*lead, K, generator=g).to(dt).requires_grad_()
    bias = torch.randn(N, generator=g).to(dt).requires_grad_(case in ("lora_bias", "bf16"))
    A, B, C = make_lora(N, K, r, dt, core=case == "core_3d")
    lora = case != "no_adapter"
    for t in (A, B, C):
        if t is not None and lora:
            t.requires_grad_(case != "frozen_adapter")
    params = [t for t in (x, bias, A, B, C) if t is not None and t.requires_grad]
    params = params[:1] if only_x else params
    xp, Ap = x, A
    if qw.perm is not None:  # (the entry point permutes x and lora_A before the op)
        xp, Ap = x.index_select(-1, qw.perm), A.index_select(1, qw.perm)
    full = (xp, *packed_args(qw), bias, *((Ap, B, C) if lora else (None, None, None)), 0.7, 0.0, None, False)
    dy = torch.randn(*lead, N, generator=g).to(dt)

    def grads(y):
        return [y.detach(), *torch.autograd.grad(y, params, dy, retain_graph=True)]
    with _tune.forced(fwd):
        y = _Eager(*full)[0]
    with _tune.forced(bwd):
        want = grads(y)
    got = grads(_node(full, f"step:{fwd}/{bwd}"))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ training node serves the C++ backend")
@pytest.mark.parametrize("pass_pick", ["cpp", "torch"])
@pytest.mark.parametrize("act_order", [False, True])
def test_training_calls_whose_passes_are_decided_run_as_one_cpp_node(tmp_path, monkeypatch, pass_pick, act_order):
    """Once the tuner decided both passes of a QLoRA layer and its whole step for the op, its training
    calls run as one C++ autograd node with the first call's values and gradients (an act-order
    weight too); a bad argument is still named, and a forced candidate takes its own path."""
    from pyhappy import _tune as T

    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))

    def measure(self, c, d, cold=(), settle=False):  # 100 us a candidate: a small layer's step is measured
        pick = d if d.startswith("step:") else pass_pick  # (a whole step: its first C++ node)
        return pick, {n: 1e-4 * (0.5 if n == pick else 1.0) for n in c}, c[pick]()
    monkeypatch.setattr(T.Tuner, "measure", measure)
    qw = make_qweight("int4", 12, 64, 32, perm=act_order)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 64, generator=g, requires_grad=True)
    bias = torch.randn(12, generator=g, requires_grad=True)
    A, B, _ = make_lora(12, 64, 4, torch.float32, core=False)
    A.requires_grad_(), B.requires_grad_()
    dy = torch.randn(6, 12, generator=g)
    names, results = [], []
    for _ in range(4):
        y = pyhappy.ops.quant_linear(x, qw, bias, A, B, 0.5)
        names.append(y.grad_fn.name())
        results.append((y.detach(), *torch.autograd.grad(y, [x, bias, A, B], dy)))
    assert names[0] == "QuantLinearBackward" and all(n.endswith("QuantLinearStep>") for n in names[2:]), names
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lora_B"):
        pyhappy.ops.quant_linear(x, qw, bias, A, B[:, :3], 0.5)
    with T.forced("unfused"):
        assert not pyhappy.ops.quant_linear(x, qw, bias, A, B, 0.5).grad_fn.name().endswith("QuantLinearStep>")


@pytest.mark.skipif(not HAS_CPP, reason="the C++ training node serves the C++ backend")
def test_a_decided_qlora_training_call_on_fake_tensors_runs_the_registered_op(tmp_path, monkeypatch):
    """Fake tensors never reach the QLoRA C++ node (its kernels read data): the registered op runs them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyhappy import _tune as T

    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: (  # a step: its first node
        d if d.startswith("step:") else "cpp", {n: 1e-4 for n in c}, c[d if d.startswith("step:") else "cpp"]()))
    qw = make_qweight("nf4", 12, 64, 32)
    x = torch.randn(6, 64, requires_grad=True)
    A, B, _ = make_lora(12, 64, 4, torch.float32, core=False)
    A.requires_grad_(), B.requires_grad_()
    for _ in range(3):  # the passes' decisions, the whole step's, then the node
        y = pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5)
        y.sum().backward()
    assert y.grad_fn.name().endswith("QuantLinearStep>")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx, fA, fB = (mode.from_tensor(t).requires_grad_() for t in (x, A, B))
        y = pyhappy.ops.quant_linear(fx, qw, None, fA, fB, 0.5)
        gx, gA = torch.autograd.grad(y.sum(), [fx, fA])
    assert y.grad_fn.name() == "QuantLinearBackward" and gx.shape == (6, 64) and gA.shape == (4, 64)


@pytest.mark.skipif(not HAS_CPP, reason="the C++ training node serves the C++ backend")
def test_the_qlora_cpp_training_node_refuses_a_gradient_of_its_gradient():
    """create_graph=True through the QLoRA C++ node: a clear error, not a silently wrong second-order
    gradient."""
    from pyhappy.ops.quant_linear import _node

    qw = make_qweight("nf4", 12, 64, 32)
    x = torch.randn(6, 64, requires_grad=True)
    A, B, _ = make_lora(12, 64, 4, torch.float32, core=False)
    full = (x, *packed_args(qw), None, A.requires_grad_(), B.requires_grad_(), None, 0.5, 0.0, None, False)
    for way in ("step:cpp/cpp", "step:torch/torch"):
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(_node(full, way).square().sum(), [x], create_graph=True)
