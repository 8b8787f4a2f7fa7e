"""The C++ ops' matrix products (csrc/cpu/gemm.h): bf16/fp16 products in fp32 blocks on CPUs without
native reduced-precision dot products, ATen's GEMM elsewhere; fp32 products on oneDNN or ATen (MKL,
in column blocks). Every mode and engine is forced here, so each path runs on any CPU (oneDNN where
torch has it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyhappy import _ext

pytestmark = pytest.mark.skipif(_ext.load() is None, reason="pyhappy._C not built")


@pytest.fixture
def lowp_mode():
    e = _ext.load()
    before = e.lowp_gemm()
    yield e.set_lowp_gemm
    e.set_lowp_gemm(before)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,ta,tb", [
    (3, 5, 7, False, False), (1, 64, 33, False, True), (37, 1100, 1030, False, True),  # two column blocks
    (2100, 2048, 20, True, False),  # two row blocks, a transposed
    (17, 300, 50, True, True), (0, 8, 4, False, False), (4, 0, 6, False, True), (5, 9, 0, False, False),
])
@pytest.mark.parametrize("mode", ["fp32", "native"])
def test_mm_matches_fp64(lowp_mode, mode, dtype, M, K, N, ta, tb):
    lowp_mode(mode)
    g = torch.Generator().manual_seed(M * 131 + K * 7 + N)
    a = torch.randn(K, M, generator=g).to(dtype).t() if ta else torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, K, generator=g).to(dtype).t() if tb else torch.randn(K, N, generator=g).to(dtype)
    e = _ext.load()
    y = e.gemm_mm(a, b)
    assert y.dtype == dtype and y.shape == (M, N)
    ref = a.double() @ b.double()
    if M * N:
        # one rounding of an fp32 accumulation: within a few units of the dtype's last place
        tol = 8 * torch.finfo(dtype).eps
        assert _rel(y, ref) <= tol
    out = torch.randn(M, N, generator=g).to(dtype)
    ref2 = out.double() + 0.5 * ref
    e.gemm_addmm_(out, a, b, 0.5)
    if M * N:
        assert _rel(out, ref2) <= 8 * torch.finfo(dtype).eps


@pytest.mark.parametrize("M,K,N,tb", [
    (64, 1024, 2112, True),  # x·Wᵀ in column blocks, the last one short (2112 = 2·1024 + 64)
    (16, 1024, 4096, True),  # the forward's layout blocks from 16 rows
    (64, 2048, 1088, False),  # dy·W: row-major b, columns sliced with a row stride
    (256, 2048, 2048, True),
])
def test_fp32_column_blocks_match_fp64(fp32_engine, M, K, N, tb):
    """The fp32 products the CPU ops run on ATen in column blocks of ~8 MiB of b (gemm.cpp): the
    blocked path is taken here (asserted) and agrees with one fp64 product, for mm, addmm and addmm_
    (the fused LoRA epilogues on each block are tested in test_lora_linear.py)."""
    fp32_engine("aten")
    e = _ext.load()
    nb = e.gemm_column_block(torch.empty(M, K), N, tb)
    assert 0 < nb < N and nb % 64 == 0
    g = torch.Generator().manual_seed(M + K + N)
    a = torch.randn(M, K, generator=g)
    b = torch.randn(N, K, generator=g).t() if tb else torch.randn(K, N, generator=g)
    ref = a.double() @ b.double()
    tol = 64 * K**0.5 * torch.finfo(torch.float32).eps
    assert _rel(e.gemm_mm(a, b), ref) <= tol
    bias = torch.randn(N, generator=g)
    assert _rel(e.gemm_addmm(bias, a, b), ref + bias.double()) <= tol
    assert _rel(e.gemm_addmm(None, a, b), ref) <= tol
    out = torch.randn(M, N, generator=g)
    ref2 = out.double() + 0.5 * ref
    assert _rel(e.gemm_addmm_(out, a, b, 0.5), ref2) <= tol


def test_fp32_blocking_rule():
    """Which fp32 products run in column blocks: a at most 8 Mi elements, b at least 2 Mi, from 16
    rows (b column-major) or 64 (row-major); never another dtype."""
    e = _ext.load()
    x = torch.empty(512, 4096)
    assert e.gemm_column_block(x, 4096, True) == 512
    assert e.gemm_column_block(x, 4096, False) == 512
    assert e.gemm_column_block(torch.empty(512, 11008), 4096, True) == 192
    assert e.gemm_column_block(torch.empty(2048, 4096), 4096, True) == 512
    assert e.gemm_column_block(torch.empty(4096, 4096), 4096, True) == 0  # a too large for L3
    assert e.gemm_column_block(torch.empty(512, 1024), 1024, True) == 0  # b fits in cache
    assert e.gemm_column_block(torch.empty(15, 4096), 4096, True) == 0
    assert e.gemm_column_block(torch.empty(32, 4096), 4096, True) == 512
    assert e.gemm_column_block(torch.empty(32, 4096), 4096, False) == 0
    assert e.gemm_column_block(torch.empty(512, 4096, dtype=torch.float64), 4096, True) == 0
    assert e.gemm_column_block(torch.empty(512, 4096, dtype=torch.bfloat16), 4096, True) == 0


def test_mode_errors():
    e = _ext.load()
    with pytest.raises(Exception, match="mode must be 'auto', 'fp32' or 'native'"):
        e.set_lowp_gemm("fast")
    assert e.lowp_gemm() in ("auto", "fp32", "native")


def _modules():
    from pyhappy.nn import LoRALinear, QLoRALinear, SparseDeltaLinear, TTLinear

    torch.manual_seed(0)
    lin = nn.Linear(256, 136)
    lora = LoRALinear.from_linear(lin, r=8, alpha=16)
    qlora = QLoRALinear.from_linear(lin, "int4", 64, r=8, alpha=16)
    sparse = SparseDeltaLinear.from_linear(lin, density=0.05, seed=0)
    tt = TTLinear.from_linear(lin, tt_rank=4, form="matrix")
    with torch.no_grad():
        for m in (lora, qlora):
            m.lora_B.weight.normal_(std=0.1)
        sparse.deltas["default"].values.normal_(std=0.1)
        for c in tt.tt_cores:
            c.normal_(std=0.3)
    return {"lora": lora, "qlora": qlora, "sparse": sparse, "tt": tt}


@pytest.mark.parametrize("name,M", [("lora", 40), ("qlora", 40), ("sparse", 40),
                                    ("tt", 8), ("tt", 40)])  # tt: contraction (M=8) and slab (M=40) forwards
def test_ops_bf16_modes_agree_with_fp64(lowp_mode, name, M):
    """Each op family's bf16 forward and backward (M=40: the GEMM path, not decode) is the same in
    both modes and matches the fp64 run of the same module."""
    m64 = _modules()[name].double()
    torch.manual_seed(1)
    x64 = torch.randn(M, 256, dtype=torch.float64)
    g64 = torch.randn(M, 136, dtype=torch.float64)
    outs = {}
    for mode in ("fp32", "native", "fp64"):
        if mode == "fp64":
            m, x = m64, x64.clone().requires_grad_()
        else:
            lowp_mode(mode)
            m = _modules()[name].bfloat16()
            x = x64.bfloat16().requires_grad_()
        y = m(x)
        y.backward(g64.to(y.dtype))
        trained = [p for p in m.parameters() if p.requires_grad]
        outs[mode] = [y.detach(), x.grad] + [p.grad for p in trained]
    for mode in ("fp32", "native"):
        for got, want in zip(outs[mode], outs["fp64"]):
            assert _rel(got, want) < 2e-2, mode
    for a, b in zip(outs["fp32"], outs["native"]):
        assert _rel(a, b) < 1e-2


def test_tt_runs_bf16_in_fp32_exactly_when_the_products_do(lowp_mode):
    from pyhappy.ops import tt_linear as ttl

    x = torch.randn(40, 256).bfloat16()
    for mode, want in (("fp32", True), ("native", False)):
        lowp_mode(mode)
        assert ttl._lowp_fp32(x, 136, "cpp") is want
        assert ttl._lowp_fp32(x.float(), 136, "cpp") is False
        assert ttl._lowp_fp32(x, 136, "reference") is False


def _strided(kind, rows, cols, g):
    """A [rows, cols] fp32 matrix laid out as kind says."""
    if kind == "contig":
        return torch.randn(rows, cols, generator=g)
    if kind == "transposed":
        return torch.randn(cols, rows, generator=g).t()
    if kind == "row_slice":  # every other row of a wider buffer, columns offset: row stride != cols
        return torch.randn(2 * rows, cols + 5, generator=g)[::2, 3:3 + cols]
    if kind == "slice_of_transposed":  # a column slice of Wᵀ: oneDNN's slow layout, must go to ATen
        return torch.randn(2 * cols, rows, generator=g).t()[:, 7:7 + cols]
    raise AssertionError(kind)


@pytest.mark.parametrize("engine", ["aten", "onednn"])
@pytest.mark.parametrize("M,K,N,ka,kb", [
    (512, 300, 200, "contig", "transposed"),  # x·Wᵀ, the forward's layout
    (64, 200, 300, "row_slice", "contig"),  # dy·W with a strided dy
    (100, 130, 90, "transposed", "contig"),  # a column-major a: ATen
    (70, 160, 120, "contig", "slice_of_transposed"),
    (8, 16, 8, "contig", "transposed"),  # below kOnednnMinMacs: ATen
    (0, 64, 32, "contig", "contig"), (16, 0, 32, "contig", "transposed"),
])
def test_fp32_engines_match_fp64(fp32_engine, engine, M, K, N, ka, kb):
    """mm, addmm (bias fused, broadcast [1, N] bias added after), addmm_ and the fp32 products of
    the quantized ops (mm_into through gemm_mm) on each engine, any layout, against fp64."""
    fp32_engine(engine)
    e = _ext.load()
    g = torch.Generator().manual_seed(M * 7 + K + N)
    a, b = _strided(ka, M, K, g), _strided(kb, K, N, g)
    ref = a.double() @ b.double()
    tol = 64 * max(K, 1) ** 0.5 * torch.finfo(torch.float32).eps

    def close(y, want):
        assert y.shape == want.shape and y.dtype == torch.float32
        if y.numel():
            assert _rel(y, want) <= tol

    close(e.gemm_mm(a, b), ref)
    bias = torch.randn(N, generator=g)
    close(e.gemm_addmm(bias, a, b), ref + bias.double())
    close(e.gemm_addmm(bias[None], a, b), ref + bias.double())
    out = torch.randn(M, N, generator=g)
    want = out.double() - 0.25 * ref
    close(e.gemm_addmm_(out, a, b, -0.25), want)


def test_fp32_engine_setting(fp32_engine):
    e = _ext.load()
    fp32_engine("aten")
    assert e.fp32_gemm() == "aten"
    with pytest.raises(ValueError, match="engine must be 'auto', 'aten' or 'onednn'"):
        e.set_fp32_gemm("mkl")
    assert e.fp32_gemm() == "aten"


def test_fp32_gemm_scope_overrides_the_engine_for_this_thread_only(fp32_engine):
    """fp32_gemm_scope sets the engine of this thread's products while entered (nested scopes
    restore in turn); another thread keeps the process-wide setting; a bad name raises naming the
    argument."""
    import threading

    e = _ext.load()
    fp32_engine("onednn")
    seen = {}

    def other():
        seen["other"] = e.fp32_gemm_setting()

    with e.fp32_gemm_scope("aten"):
        assert (e.fp32_gemm_setting(), e.fp32_gemm()) == ("aten", "aten")
        t = threading.Thread(target=other)
        t.start()
        t.join()
        with e.fp32_gemm_scope(engine="auto"):
            assert e.fp32_gemm_setting() == "auto"
        assert e.fp32_gemm_setting() == "aten"
    assert seen["other"] == "onednn"
    assert (e.fp32_gemm_setting(), e.fp32_gemm()) == ("onednn", "onednn")
    with pytest.raises(ValueError, match=r"fp32_gemm_scope: engine must be 'auto', 'aten' or 'onednn', got 'mkl'"):
        e.fp32_gemm_scope("mkl")
    scope = e.fp32_gemm_scope("aten")
    with scope, pytest.raises(RuntimeError, match="already entered"):
        with scope:
            pass
    assert e.fp32_gemm_setting() == "onednn"


def test_fp32_gemm_scope_reaches_parallel_workers(fp32_engine):
    """Products an op runs inside its at::parallel_for workers use the calling thread's engine: here
    dropout(x)·Aᵀ in row tiles spread over the threads (each tile's product large enough for oneDNN),
    under an ATen scope while the process-wide engine is oneDNN, gives the ATen result bit for bit."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs at least two threads")
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 48, 4096, 64, 16  # M < 64: the tiled schedule, 16-row tiles of K = 4096
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) * K ** -0.5
    A = torch.randn(r, K, generator=g) * K ** -0.5
    B = torch.randn(N, r, generator=g)

    def run():
        return torch.ops.pyhappy.lora_linear_cpu(x, W, None, A, B, None, 1.5, 0.1, torch.tensor([3]))

    e = _ext.load()
    fp32_engine("aten")
    want = run()
    fp32_engine("onednn")
    onednn = run()
    assert not torch.equal(want[1], onednn[1]), "the two engines round alike here: the test cannot tell them apart"
    with e.fp32_gemm_scope("aten"):
        got = run()
    for a, w in zip(got, want):
        assert torch.equal(a, w)


def _decode_operands(dtype, M, K, N, layout, g):
    a = torch.randn(M, K + 3, generator=g).to(dtype)[:, :K]  # rows with a leading dimension > K
    if layout == "wt":  # x·Wᵀ: b = Wᵀ of a row-major W [N, K] (the forward)
        b = torch.randn(N, K + 5, generator=g).to(dtype)[:, :K].t()
    else:  # dy·W: b = W [K, N] row-major (the backward)
        b = torch.randn(K, N + 5, generator=g).to(dtype)[:, :N]
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["wt", "w"])
@pytest.mark.parametrize("M,K,N", [(1, 4096, 300), (2, 1000, 37), (3, 67, 129), (4, 8, 8), (1, 1, 9), (4, 13, 1),
                                   (2, 5000, 3)])
def test_decode_kernels_match_fp64(fp32_engine, dtype, layout, M, K, N):
    """pyhappy's decode kernels (csrc/cpu/gemv.h: 1-4 rows against a weight, either layout, weight
    rows longer than K, K and N not multiples of the vector width) agree with an fp64 product within
    one rounding of an fp32 accumulation, for mm and addmm; with the engine set to 'aten' the same
    products run on ATen and agree too. addmm leaves its bias alone (with one row, a bias expanded
    to [1, N] is contiguous: a path that accumulated into it in place once wrote the layer's bias)."""
    e = _ext.load()
    g = torch.Generator().manual_seed(M * 7 + K + N)
    a, b = _decode_operands(dtype, M, K, N, layout, g)
    if not e.gemv_serves(a, b):
        pytest.skip("the decode kernels need AVX2+FMA (and F16C for float16)")
    ref = a.double() @ b.double()
    bias = torch.randn(N, generator=g).to(dtype)
    tol = (4 * K**0.5 * torch.finfo(torch.float32).eps) if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    for engine in ("auto", "aten"):
        if engine == "aten":
            fp32_engine("aten")
        y = e.gemm_mm(a, b)
        assert y.dtype == dtype and y.shape == (M, N) and y.is_contiguous()
        assert _rel(y, ref) <= tol, engine
        bias_before = bias.clone()
        assert _rel(e.gemm_addmm(bias, a, b), ref + bias.double()) <= tol + 2 * torch.finfo(dtype).eps, engine
        assert torch.equal(bias, bias_before), "the bias must not be written"
        # addmm_ in place with alpha (the adapter's y += s · v Bᵀ at decode; fp32 through these kernels)
        out = torch.randn(M, N, generator=g).to(dtype)
        want = out.double() - 0.75 * ref
        assert _rel(e.gemm_addmm_(out, a, b, -0.75), want) <= tol + 2 * torch.finfo(dtype).eps, engine


def test_decode_kernels_serve_what_they_claim():
    """The decode kernels take 1-4 rows of a with unit column stride, one dtype, b with a unit stride
    on one side; anything else (5 rows, float64, mixed dtypes, a strided column) goes elsewhere."""
    e = _ext.load()
    if not e.gemv_serves(torch.empty(1, 8), torch.empty(8, 8).t()):
        pytest.skip("no AVX2+FMA")
    W = torch.empty(16, 8)
    assert e.gemv_serves(torch.empty(4, 8), W.t()) and e.gemv_serves(torch.empty(4, 16), W)
    assert not e.gemv_serves(torch.empty(5, 8), W.t())
    assert not e.gemv_serves(torch.empty(0, 8), W.t())
    assert not e.gemv_serves(torch.empty(1, 8, dtype=torch.float64), W.double().t())
    assert not e.gemv_serves(torch.empty(1, 8, dtype=torch.bfloat16), W.t())
    assert not e.gemv_serves(torch.empty(8, 2).t(), W.t())  # a with a column stride of 2
    assert not e.gemv_serves(torch.empty(1, 8), torch.empty(8, 32)[:, ::2])  # b strided both ways
