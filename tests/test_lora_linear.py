"""pyhappy::lora_linear: every backend against the reference, autograd, compile, bad input, module."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import HAS_CPP, HAS_TRITON, assert_close_to_oracle, cpu_backends, output_and_grads
from hypothesis import given
from hypothesis import strategies as st

import pyhappy
from pyhappy import backends, reference
from pyhappy.nn import LoRALinear

OP = torch.ops.pyhappy.lora_linear


def make(M, K, N, r, dtype=torch.float32, core=False, bias=True, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, K) if lead else (M, K)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    return dict(
        x=t(*shape),
        weight=t(N, K, scale=1 / math.sqrt(K)),
        bias=t(N) if bias else None,
        lora_A=t(r, K, scale=1 / math.sqrt(K)),
        lora_B=t(N, r, scale=1 / math.sqrt(r)),
        lora_C=t(r, r, scale=1 / math.sqrt(r)) if core else None,
    )


def ref_y(x, weight, bias, lora_A, lora_B, lora_C, s, p, seed):
    return reference.lora_linear(x, weight, bias, lora_A, lora_B, s, lora_C, p, seed)[0]


def ref_grads(dy, x, weight, lora_A, lora_B, lora_C, u, s, p, seed):
    return reference.lora_linear_backward(dy, x, weight, lora_A, lora_B, lora_C, u, s, p, seed)


# ------------------------------------------------------------------------------------------------
# the reference itself
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("core", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_reference_backward_is_the_gradient_of_reference_forward(core, p):
    a = make(7, 13, 11, 3, torch.float64, core=core)
    seed = torch.tensor([99])
    leaves = {k: v.requires_grad_() for k, v in a.items() if v is not None}
    y, u = reference.lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.7, a["lora_C"], p, seed)
    dy = torch.randn_like(y)
    y.backward(dy)
    gx, gA, gB, gC = reference.lora_linear_backward(dy, a["x"], a["weight"], a["lora_A"], a["lora_B"], a["lora_C"],
                                                    u.detach(), 0.7, p, seed)
    torch.testing.assert_close(gx, leaves["x"].grad)
    torch.testing.assert_close(gA, leaves["lora_A"].grad)
    torch.testing.assert_close(gB, leaves["lora_B"].grad)
    if core:
        torch.testing.assert_close(gC, leaves["lora_C"].grad)


def test_dropout_mask_statistics_and_determinism():
    keep = reference.dropout_keep_mask(7, 256, 512, 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    assert torch.equal(keep, reference.dropout_keep_mask(7, 256, 512, 0.3))
    assert not torch.equal(keep, reference.dropout_keep_mask(8, 256, 512, 0.3))
    # rows and columns are not correlated: per-row and per-column keep rates stay near 0.7
    assert keep.float().mean(0).std() < 0.05 and keep.float().mean(1).std() < 0.05


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
@pytest.mark.parametrize("simd", [True, False], ids=["avx2", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpp_dropout_mask_is_bit_identical_to_reference(simd, dtype):
    from pyhappy import _ext

    C = _ext.load()
    C.set_simd_enabled(simd)
    try:
        x = torch.randn(33, 77).to(dtype)
        seed = torch.tensor([123456789])
        got = torch.ops.pyhappy.dropout_cpu(x, 0.37, seed)
        assert torch.equal(got, reference.dropout(x, 0.37, seed))
    finally:
        C.set_simd_enabled(True)


# ------------------------------------------------------------------------------------------------
# every backend against the reference
# ------------------------------------------------------------------------------------------------

# M >= 64 reaches the C++ skinny kernels (fewer rows take the at::mm schedule)
SHAPES = [(1, 16, 8, 1), (3, 31, 17, 4), (17, 70, 40, 16), (33, 24, 65, 20), (70, 40, 33, 16)]


def _check_backend(backend, M, K, N, r, dtype, core, bias, p, need_x=True, lead=None):
    a = make(M, K, N, r, dtype, core=core, bias=bias, lead=lead)
    seed = torch.tensor([2024])
    s = 0.5
    with backends.force(backend):
        y, u = OP(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["lora_C"], s, p, seed)
        assert y.dtype == dtype and y.shape == (*a["x"].shape[:-1], N) and u.shape == (*a["x"].shape[:-1], r)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(M or 0)).to(dtype)
        gx, gA, gB, gC = torch.ops.pyhappy.lora_linear_backward(
            dy, a["x"], a["weight"], a["lora_A"], a["lora_B"], a["lora_C"], u, s, p, seed, need_x)
    ins = [a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["lora_C"]]
    assert_close_to_oracle(y, lambda *t: ref_y(*t, s, p, seed), ins, name="y")
    u_ref = lambda x, A: reference.lora_linear(x, a["weight"].to(x.dtype), None, A, a["lora_B"].to(x.dtype), s,  # noqa
                                                None, p, seed)[1]
    assert_close_to_oracle(u, u_ref, [a["x"], a["lora_A"]], name="u")
    # the backward is checked with the same saved u (computed in float64 for the truth)
    gins = [dy, a["x"], a["weight"], a["lora_A"], a["lora_B"], a["lora_C"], None]

    def grad(i):
        def f(dy_, x, w, A, B, C, _):
            uu = reference.lora_linear(x, w, None, A, B, s, C, p, seed)[1]
            return ref_grads(dy_, x, w, A, B, C, uu, s, p, seed)[i]
        return f

    if need_x:
        assert_close_to_oracle(gx, grad(0), gins, name="grad_x")
    else:
        assert gx.numel() == 0
    assert_close_to_oracle(gA, grad(1), gins, name="grad_A")
    assert_close_to_oracle(gB, grad(2), gins, name="grad_B")
    if core:
        assert_close_to_oracle(gC, grad(3), gins, name="grad_C")
    else:
        assert gC.numel() == 0


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backend_matches_reference(backend, M, K, N, r, dtype):
    _check_backend(backend, M, K, N, r, dtype, core=False, bias=True, p=0.0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("core,bias,p,need_x", [(True, True, 0.0, True), (False, False, 0.3, True),
                                                (True, False, 0.5, False), (False, True, 0.2, False)])
def test_backend_variants(backend, core, bias, p, need_x):
    _check_backend(backend, 17, 40, 24, 5, torch.float32, core=core, bias=bias, p=p, need_x=need_x)


@pytest.mark.parametrize("backend", cpu_backends())
def test_backend_fp16_and_leading_dims(backend):
    _check_backend(backend, None, 24, 20, 4, torch.float16, core=True, bias=True, p=0.25, lead=(2, 3))


@pytest.mark.parametrize("backend", cpu_backends())
def test_backend_non_contiguous_x(backend):
    a = make(9, 48, 20, 4)
    xt = torch.randn(48, 9).t()  # transposed view
    xs = torch.randn(9, 96)[:, ::2]  # column-strided view
    for x in (xt, xs):
        with backends.force(backend):
            y = OP(x, a["weight"], a["bias"], a["lora_A"], a["lora_B"], None, 0.5, 0.3, torch.tensor([1]))[0]
        want = ref_y(x.contiguous(), a["weight"], a["bias"], a["lora_A"], a["lora_B"], None, 0.5, 0.3, 1)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_batch(backend):
    a = make(0, 16, 8, 2)
    with backends.force(backend):
        y, u = OP(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], None, 1.0, 0.0, None)
    assert y.shape == (0, 8) and u.shape == (0, 2)


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
@given(M=st.integers(1, 140), K=st.integers(1, 90), N=st.integers(1, 90), r=st.integers(1, 40),
       core=st.booleans(), bias=st.booleans(), p=st.sampled_from([0.0, 0.1, 0.6]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_cpp_hypothesis_shapes(M, K, N, r, core, bias, p, dtype):
    _check_backend("cpp", M, K, N, r, dtype, core=core, bias=bias, p=p)


@pytest.mark.skipif(not (HAS_TRITON and backends.triton_interpreting()), reason="triton interpreter unavailable")
@given(M=st.integers(1, 20), K=st.integers(1, 40), N=st.integers(1, 40), r=st.integers(1, 20),
       core=st.booleans(), p=st.sampled_from([0.0, 0.5]))
def test_triton_hypothesis_shapes(M, K, N, r, core, p):
    _check_backend("triton", M, K, N, r, torch.float32, core=core, bias=True, p=p)


# ------------------------------------------------------------------------------------------------
# autograd, opcheck, gradcheck, compile
# ------------------------------------------------------------------------------------------------


def _op_args(requires_grad, core=True, p=0.2, dtype=torch.float32):
    a = make(6, 12, 10, 3, dtype, core=core)
    for k in ("x", "lora_A", "lora_B", "lora_C", "bias"):
        if a[k] is not None:
            a[k].requires_grad_(requires_grad)
    return (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["lora_C"], 0.5, p, torch.tensor([3]))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP,
                                                                                              reason="no ext"))])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    with backends.force(backend):
        torch.library.opcheck(OP, _op_args(requires_grad))
        torch.library.opcheck(OP, _op_args(requires_grad, core=False, p=0.0))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP,
                                                                                              reason="no ext"))])
def test_gradcheck_float64(backend):
    args = _op_args(True, dtype=torch.float64)
    fn = lambda x, b, A, B, C: OP(x, args[1], b, A, B, C, 0.5, 0.3, args[8])[0]  # noqa: E731
    with backends.force(backend):
        assert torch.autograd.gradcheck(fn, (args[0], args[2], args[3], args[4], args[5]))


def test_frozen_weight_gets_no_gradient_buffer_but_trainable_weight_is_exact():
    a = make(5, 8, 6, 2)
    for k in ("x", "lora_A", "lora_B"):
        a[k].requires_grad_()
    y = pyhappy.ops.lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.5)
    y.sum().backward()
    assert a["weight"].grad is None
    w = a["weight"].clone().requires_grad_()
    pyhappy.ops.lora_linear(a["x"], w, None, a["lora_A"], a["lora_B"], 0.5).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(5, 6).t() @ a["x"].detach())


def test_lora_hidden_output_is_not_differentiable():
    x, W, b, A, B, C, s, p, seed = _op_args(True)
    _, u = OP(x, W, b, A, B, C, s, p, seed)
    assert not u.requires_grad


@pytest.mark.skipif(not HAS_CPP, reason="compile tests run through the C++ CPU backend")
def test_compile_fullgraph_forward_backward_one_frame():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    a = make(8, 32, 24, 4, core=True)
    params = [a[k].requires_grad_() for k in ("lora_A", "lora_B", "lora_C")]
    x = a["x"].requires_grad_()
    seed = torch.tensor([11])

    def f(x, A, B, C):
        y = pyhappy.ops.lora_linear(x, a["weight"], a["bias"], A, B, 0.5, C, dropout_p=0.25, seed=seed)
        return (y * y).sum()

    cnt = CompileCounterWithBackend("inductor")
    cf = torch.compile(f, backend=cnt, fullgraph=True)
    loss = cf(x, *params)
    grads = torch.autograd.grad(loss, [x, *params])
    want_loss = f(x, *params)
    want = torch.autograd.grad(want_loss, [x, *params])
    assert cnt.frame_count == 1
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument
# ------------------------------------------------------------------------------------------------


def _bad_cases():
    ok = make(4, 8, 6, 2)
    seed = torch.tensor([1])

    def args(**kw):
        base = dict(x=ok["x"], weight=ok["weight"], bias=ok["bias"], lora_A=ok["lora_A"], lora_B=ok["lora_B"],
                    lora_C=None, scaling=1.0, dropout_p=0.0, seed=None)
        base.update(kw)
        return base

    return [
        ("int x", args(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "x"),
        ("scalar x", args(x=torch.tensor(1.0)), ValueError, "x"),
        ("weight dtype", args(weight=ok["weight"].double()), TypeError, "weight"),
        ("weight rank", args(weight=ok["weight"].reshape(-1)), ValueError, "weight"),
        ("weight K", args(weight=torch.randn(6, 9)), ValueError, "weight"),
        ("lora_A K", args(lora_A=torch.randn(2, 9)), ValueError, "lora_A"),
        ("lora_B shape", args(lora_B=torch.randn(6, 3)), ValueError, "lora_B"),
        ("lora_C shape", args(lora_C=torch.randn(3, 3)), ValueError, "lora_C"),
        ("bias shape", args(bias=torch.randn(7)), ValueError, "bias"),
        ("bias device", args(bias=torch.randn(6, device="meta")), ValueError, "bias"),
        ("dropout_p", args(dropout_p=1.0, seed=seed), ValueError, "dropout_p"),
        ("negative dropout_p", args(dropout_p=-0.1, seed=seed), ValueError, "dropout_p"),
        ("missing seed", args(dropout_p=0.5), ValueError, "seed"),
        ("seed dtype", args(dropout_p=0.5, seed=torch.tensor([1.0])), TypeError, "seed"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, kw, exc, name = case
    with pytest.raises(exc, match=rf"\b{name}\b"):
        OP(**kw)


def test_forced_backend_that_cannot_serve_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = make(2, 8, 6, 2)
    with backends.force("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        OP(a["x"], a["weight"], None, a["lora_A"], a["lora_B"], None, 1.0, 0.0, None)
    with pytest.raises(ValueError, match="backend"):
        with backends.force("cuda-magic"):
            pass


# ------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------


def test_from_linear_shares_and_freezes_the_base():
    lin = torch.nn.Linear(20, 12)
    m = LoRALinear.from_linear(lin, r=4, alpha=8)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert not m.weight.requires_grad and not m.bias.requires_grad
    sd = m.state_dict()
    assert sd["lora_A.weight"].shape == (4, 20) and sd["lora_B.weight"].shape == (12, 4)
    assert m.scaling == 2.0
    assert LoRALinear.from_linear(torch.nn.Linear(20, 12), r=4, alpha=8, rslora=True).scaling == 4.0
    x = torch.randn(3, 20)
    torch.testing.assert_close(m(x), lin(x))  # B = 0 at init: a fresh adapter is the identity
    assert (m.lora_B.weight == 0).all() and m.lora_A.weight.abs().sum() > 0


@pytest.mark.parametrize("core", [False, True])
def test_module_matches_unfused_peft_formulation(core):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    m = LoRALinear.from_linear(lin, r=4, alpha=6, dropout=0.0, init="none", core=core)
    x = torch.randn(2, 5, 24, requires_grad=True)
    y = m(x)
    B = m.lora_B.weight if m.lora_C is None else m.lora_B.weight @ m.lora_C
    want = lin(x) + F.linear(F.linear(x, m.lora_A.weight), B) * m.scaling
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert m.lora_A.weight.grad is not None and m.lora_B.weight.grad is not None and m.weight.grad is None


def test_module_dropout_train_vs_eval_and_reproducible():
    m = LoRALinear.from_linear(torch.nn.Linear(32, 16), r=4, dropout=0.5, init="none")
    x = torch.randn(6, 32)
    torch.manual_seed(1)
    y1 = m(x)
    torch.manual_seed(1)
    y2 = m(x)
    torch.testing.assert_close(y1, y2)
    y3 = m(x)
    assert not torch.allclose(y1, y3)
    m.eval()
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias) + m.scaling * F.linear(
        F.linear(x, m.lora_A.weight), m.lora_B.weight))


@pytest.mark.parametrize("core", [False, True])
def test_merge_unmerge_round_trip(core):
    m = LoRALinear.from_linear(torch.nn.Linear(32, 16), r=4, alpha=8, init="none", core=core).eval()
    x = torch.randn(5, 32)
    w0 = m.weight.detach().clone()
    y = m(x)
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    torch.testing.assert_close(m.weight.detach(), w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), y)


def test_state_dict_round_trip_including_merged_flag():
    m = LoRALinear.from_linear(torch.nn.Linear(16, 8), r=2, init="none").eval()
    x = torch.randn(3, 16)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    m2 = LoRALinear(16, 8, r=2).eval()
    m2.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    torch.testing.assert_close(m2(x), m(x))
    m.merge()
    m3 = LoRALinear(16, 8, r=2).eval()
    m3.load_state_dict(m.state_dict())
    assert m3.merged
    torch.testing.assert_close(m3(x), m2(x), rtol=1e-5, atol=1e-5)


def test_module_autocast_cpu_bf16():
    m = LoRALinear.from_linear(torch.nn.Linear(32, 16), r=4, init="none")
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        want = F.linear(x, m.weight, m.bias) + m.scaling * F.linear(F.linear(x, m.lora_A.weight), m.lora_B.weight)
    assert y.dtype == torch.bfloat16 and want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not HAS_CPP, reason="compile tests run through the C++ CPU backend")
def test_module_under_compile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = LoRALinear.from_linear(torch.nn.Linear(16, 8), r=2, init="none")
    x = torch.randn(3, 16, requires_grad=True)
    cnt = CompileCounterWithBackend("inductor")
    y = torch.compile(m, backend=cnt, fullgraph=True)(x)
    y.sum().backward()
    assert cnt.frame_count == 1
    torch.testing.assert_close(y, m(x))


@pytest.mark.parametrize("kw,match", [(dict(r=0), "r"), (dict(r=2, dropout=1.0), "dropout"),
                                      (dict(r=2, init="xavier"), "init")])
def test_module_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=rf"\b{match}\b"):
        LoRALinear.from_linear(torch.nn.Linear(4, 4), **kw)
    with pytest.raises(TypeError, match="linear"):
        LoRALinear.from_linear(torch.nn.Conv1d(4, 4, 1), r=2)


def test_matches_peft_lora_layer_when_installed():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(24, 16))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    layer = pm.base_model.model.proj
    ours = LoRALinear.from_linear(layer.base_layer, r=4, alpha=8)
    with torch.no_grad():
        ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(layer.lora_B["default"].weight)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), pm(x))


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
@pytest.mark.parametrize("core,bias,p,need_x", [(False, True, 0.0, True), (True, False, 0.4, True),
                                                (False, True, 0.3, False)])
def test_cpp_portable_path_matches_reference(core, bias, p, need_x):
    """fp32 normally runs the AVX2 kernels; with SIMD off the same schedule runs on at::mm."""
    from pyhappy import _ext

    _ext.load().set_simd_enabled(False)
    try:
        _check_backend("cpp", 71, 37, 29, 5, torch.float32, core=core, bias=bias, p=p, need_x=need_x)
    finally:
        _ext.load().set_simd_enabled(True)


def _cpp_at_level(level, fn):
    """fn() with the C++ CPU kernels capped at ``level`` ("avx2": the 8-lane skinny kernels,
    "avx512": the 16-lane ones where the CPU has AVX-512F)."""
    from pyhappy import _ext

    _ext.load().set_simd_level(level)
    try:
        with backends.force("cpp"):
            return fn()
    finally:
        _ext.load().set_simd_level("avx512")


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
@pytest.mark.parametrize("level", ["avx2", "avx512"])
@pytest.mark.parametrize("M,K,N,r", [(64, 16, 16, 16), (77, 47, 50, 5), (89, 100, 97, 17), (70, 200, 33, 33)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpp_simd_levels_match_reference(level, M, K, N, r, p):
    # M >= 64: the skinny kernels (fewer rows take at::mm). Row groups (6 or 8 rows), 48-column
    # panels, 16-column blocks and r padded to 16 all get tails.
    _cpp_at_level(level, lambda: _check_backend("cpp", M, K, N, r, torch.float32, core=True, bias=True, p=p))


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("engine", ["aten", "onednn"])
def test_cpp_column_blocked_gemm_with_fused_epilogues_matches_reference(fp32_engine, engine, p):
    # K = N = 2112 at 64 rows: on ATen both base GEMMs (x Wᵀ, dy W) run in column blocks of 1024
    # plus a 64-wide tail, the adapter's epilogue on each block (the dropout of du A at absolute
    # columns); on oneDNN each is one call and the epilogue runs once over all columns.
    from pyhappy import _ext

    fp32_engine(engine)
    for col_major in (True, False):
        assert _ext.load().gemm_column_block(torch.empty(64, 2112), 2112, col_major) == 1024
    _check_backend("cpp", 64, 2112, 2112, 8, torch.float32, core=True, bias=True, p=p)


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
def test_cpp_avx512_and_avx2_kernels_agree_bit_for_bit():
    # Each output element is the same chain of FMAs in the same order at both widths.
    from pyhappy import _ext

    if "avx512f" not in _ext.load().simd_level():
        pytest.skip(f"this CPU runs {_ext.load().simd_level()}: no AVX-512 kernel to compare")
    a = make(101, 300, 70, 24, core=False)  # >= 64 rows: the skinny kernels
    seed = torch.tensor([5])

    def run():
        y, u = OP(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], None, 0.5, 0.2, seed)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        return (y, u) + tuple(torch.ops.pyhappy.lora_linear_backward(
            dy, a["x"], a["weight"], a["lora_A"], a["lora_B"], None, u, 0.5, 0.2, seed, True))

    for t512, t256 in zip(_cpp_at_level("avx512", run), _cpp_at_level("avx2", run)):
        assert torch.equal(t512, t256)


@pytest.mark.parametrize("backend", cpu_backends())
def test_eager_inference_path_matches_the_op_and_validates(backend):
    """Under no_grad the functional API skips the dispatcher: same result, same checks."""
    a = make(5, 24, 12, 3, core=True)
    args = (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.5, a["lora_C"], 0.3)
    seed = torch.tensor([77])
    with backends.force(backend), torch.no_grad():
        y = pyhappy.ops.lora_linear(*args, seed=seed)
        want = OP(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["lora_C"], 0.5, 0.3, seed)[0]
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        with pytest.raises(TypeError, match=r"\bweight\b"):
            pyhappy.ops.lora_linear(a["x"], a["weight"].double(), None, a["lora_A"], a["lora_B"], 0.5)


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; the Triton backend is the CUDA default)
# ------------------------------------------------------------------------------------------------


def _to_cuda(a):
    return {k: None if v is None else v.cuda() for k, v in a.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 16), (17, 1000, 777, 8), (512, 512, 1536, 64), (300, 96, 80, 128)])
@pytest.mark.parametrize("core,p", [(False, 0.0), (True, 0.2)])
def test_cuda_triton_matches_reference(dtype, M, K, N, r, core, p):
    a = _to_cuda(make(M, K, N, r, dtype, core=core))
    seed = torch.tensor([5], device="cuda")
    s = 0.5
    with backends.force("triton"):
        y, u = OP(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["lora_C"], s, p, seed)
        dy = torch.randn(y.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(dtype)
        gx, gA, gB, gC = torch.ops.pyhappy.lora_linear_backward(
            dy, a["x"], a["weight"], a["lora_A"], a["lora_B"], a["lora_C"], u, s, p, seed, True)
    ins = [a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["lora_C"]]
    assert_close_to_oracle(y, lambda *t: ref_y(*t, s, p, seed), ins, name="y")
    gins = [dy, a["x"], a["weight"], a["lora_A"], a["lora_B"], a["lora_C"]]
    for i, (got, name) in enumerate([(gx, "grad_x"), (gA, "grad_A"), (gB, "grad_B"), (gC, "grad_C")]):
        if name == "grad_C" and not core:
            continue

        def f(dy_, x, w, A, B, C, i=i):
            uu = reference.lora_linear(x, w, None, A, B, s, C, p, seed)[1]
            return ref_grads(dy_, x, w, A, B, C, uu, s, p, seed)[i]

        assert_close_to_oracle(got, f, gins, name=name)


@pytest.mark.gpu
def test_cuda_compile_fullgraph_sees_the_triton_kernels():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    a = _to_cuda(make(64, 128, 96, 8, torch.bfloat16))
    A, B = a["lora_A"].requires_grad_(), a["lora_B"].requires_grad_()
    x = a["x"].requires_grad_()
    f = lambda x, A, B: pyhappy.ops.lora_linear(x, a["weight"], a["bias"], A, B, 0.5).float().square().sum()  # noqa
    cnt = CompileCounterWithBackend("inductor")
    loss = torch.compile(f, backend=cnt, fullgraph=True)(x, A, B)
    grads = torch.autograd.grad(loss, [x, A, B])
    want = torch.autograd.grad(f(x, A, B), [x, A, B])
    assert cnt.frame_count == 1
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("alpha,err", [(float("nan"), ValueError), (float("inf"), ValueError), ("16", TypeError),
                                       (True, TypeError)])
def test_lora_modules_refuse_a_non_finite_alpha_by_name(alpha, err):
    from pyhappy.nn import MultiLoRALinear

    base = torch.nn.Linear(8, 8)
    with pytest.raises(err, match="alpha"):
        LoRALinear.from_linear(base, r=2, alpha=alpha)
    assert base.weight.requires_grad  # refused before the base was touched
    m = MultiLoRALinear.from_linear(torch.nn.Linear(8, 8))
    with pytest.raises(err, match="alpha"):
        m.add_adapter("a", r=2, alpha=alpha)
    assert "a" not in m.adapters


@pytest.mark.parametrize("core,bias,p", [(False, True, 0.0), (True, False, 0.3)])
def test_eager_training_call_matches_the_registered_op(core, bias, p):
    """An eager call that autograd records runs the op's forward and gradient formula through an
    autograd.Function (pyhappy/ops/_eager.py) instead of the dispatcher: the same values and
    gradients, bit for bit, as calling the registered op."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 16, generator=g, requires_grad=True)
    W = torch.randn(8, 16, generator=g)
    b = torch.randn(8, generator=g, requires_grad=True) if bias else None
    A = torch.randn(4, 16, generator=g, requires_grad=True)
    B = torch.randn(8, 4, generator=g, requires_grad=True)
    C = torch.randn(4, 4, generator=g, requires_grad=True) if core else None
    seed = torch.tensor([5])
    params = [t for t in (x, b, A, B, C) if t is not None]
    got = output_and_grads(lambda: pyhappy.ops.lora_linear(x, W, b, A, B, 0.5, C, p, seed=seed), params)
    want = output_and_grads(lambda: torch.ops.pyhappy.lora_linear(x, W, b, A, B, C, 0.5, p, seed)[0], params)
    for a, w in zip(got, want):
        assert torch.equal(a, w)


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("core", [False, True])
def test_cpp_op_at_decode_rows_on_the_auto_engine_matches_reference(M, core):
    # Called directly, outside the tuner's products() scope (which puts the suite's products on
    # ATen under PYHAPPY_TUNE=off), the C++ op runs its products at a few rows on the auto engine:
    # the decode kernels (csrc/cpu/gemv.h) for x Wᵀ, x Aᵀ, the adapter's y += s · v Bᵀ, dy W and
    # dx += du A.
    from pyhappy import _ext

    e = _ext.load()
    a = make(M, 300, 70, 8, core=core)
    if e.fp32_gemm() == "aten" or not e.gemv_serves(a["x"], a["weight"].t()):
        pytest.skip("the decode kernels do not serve these products here")
    args = (a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["lora_C"])
    y, u = torch.ops.pyhappy.lora_linear_cpu(a["x"], *args, 0.5, 0.0, None)
    d = {k: (v.double() if v is not None else None) for k, v in a.items()}
    ry, ru = reference.lora_linear(d["x"], d["weight"], d["bias"], d["lora_A"], d["lora_B"], 0.5, d["lora_C"])
    tol = 8 * math.sqrt(300) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(y.double(), ry, rtol=tol, atol=tol)
    torch.testing.assert_close(u.double(), ru, rtol=tol, atol=tol)
    dy = torch.randn(M, 70, generator=torch.Generator().manual_seed(4))
    got = torch.ops.pyhappy.lora_linear_backward_cpu(dy, a["x"], a["weight"], a["lora_A"], a["lora_B"], a["lora_C"],
                                                      u, 0.5, 0.0, None, True)
    want = reference.lora_linear_backward(dy.double(), d["x"], d["weight"], d["lora_A"], d["lora_B"], d["lora_C"],
                                          u.double(), 0.5, 0.0, None, True)
    for name, g, w in zip(("grad_x", "grad_A", "grad_B", "grad_C"), got, want):
        if w is None or w.numel() == 0:
            continue
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol, msg=name)


# ------------------------------------------------------------------------------------------------
# training calls as one C++ autograd node (pyhappy._C.lora_linear_step)
# ------------------------------------------------------------------------------------------------


def _step_grads(fn, a, dy, wrt, fwd=None, bwd=None):
    from pyhappy import _tune

    with _tune.forced(fwd):
        y = fn()
    with _tune.forced(bwd):
        return (y, *torch.autograd.grad(y, [a[k] for k in wrt], dy))


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 24, 20, 4, None), (64, 96, 80, 8, None), (70, 64, 48, 4, (2, 35)),
                                   (128, 512, 384, 8, None)])
@pytest.mark.parametrize("core,bias", [(False, "frozen"), (True, "trained"), (False, None)])
@pytest.mark.parametrize("wrt", [("x", "lora_A", "lora_B"), ("lora_A",), ("x", "weight", "lora_B")])
@pytest.mark.parametrize("fwd,bwd", [("cpp", "cpp"), ("torch", "torch"), ("cpp", "torch"), ("torch", "cpp"),
                                     ("cpp_aten", "cpp"), ("torch", "cpp_aten")])
def test_the_cpp_training_node_equals_the_registered_ops_autograd_bit_for_bit(dtype, shape, core, bias, wrt, fwd,
                                                                               bwd, tmp_path, monkeypatch):
    """The C++ node that serves a training call whose passes are decided runs, for each pass, the
    candidate the registered op runs for that pick (pyhappy's kernels, "cpp"; the same with their
    products on ATen, "cpp_aten"; or the unfused ATen products, "torch") with the op's gradient
    formula: output and every requested gradient equal bit for bit (fast fp32 path at >= 64 rows and
    the general path, N-D x, a core, a frozen or trained bias, a trainable base weight, a subset of
    the inputs asked for)."""
    from pyhappy import _ext
    from pyhappy.ops.lora_linear import _NODES, _Eager

    monkeypatch.setenv("PYHAPPY_TUNE", "on")  # (the engines as users get them: "off" moves products to ATen)
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    M, K, N, r, lead = shape
    a = make(M, K, N, r, dtype, core=core, bias=bias is not None, seed=M, lead=lead)
    if core:
        wrt = (*wrt, "lora_C")
    if bias == "trained":
        wrt = (*wrt, "bias")
    for k in wrt:
        a[k].requires_grad_()
    args = (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["lora_C"], 0.7)
    dy = torch.randn(*a["x"].shape[:-1], N, generator=torch.Generator().manual_seed(1)).to(dtype)
    # A "cpp_aten" pass where the op does not offer that candidate (bf16 beyond decode sizes) runs the
    # op's default, the kernels as they are (as the registered op does with a cached pick not offered).
    x2, e = a["x"].reshape(-1, K), pyhappy._ext.load()
    offered = (lambda t, base: (t.dtype == torch.float32 and e.fp32_gemm() == "onednn")
               or (base is not None and e.gemv_serves(t, base)))
    efwd = "cpp" if fwd == "cpp_aten" and not offered(x2, a["weight"].t()) else fwd
    ebwd = "cpp" if bwd == "cpp_aten" and not offered(dy.reshape(-1, N), a["weight"]) else bwd
    expect = _step_grads(lambda: _Eager(*args, 0.0, None)[0], a, dy, wrt, efwd, ebwd)
    got = _step_grads(lambda: _ext.load().lora_linear_step(*args, *_NODES[f"step:{fwd}/{bwd}"]), a, dy, wrt)
    assert got[0].shape == expect[0].shape and not got[0]._is_view()
    for g, e in zip(got, expect):
        assert g.dtype == e.dtype and torch.equal(g, e)


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
@pytest.mark.parametrize("pass_pick", ["cpp", "torch"])
@pytest.mark.parametrize("seconds", [1.0, 1e-4])
def test_training_calls_whose_passes_are_decided_run_as_one_cpp_node(tmp_path, monkeypatch, pass_pick, seconds):
    """Once the tuner decided both passes of a layer (pyhappy's kernels or the unfused products)
    and its whole step for the op (measured for a small layer, 1e-4 s a candidate; a large layer's,
    1 s, is not measured), the functional op's training calls run as one C++ autograd node, with
    the values and gradients of the first call; the signature's checks still name a bad argument,
    a forced candidate takes its own path, the output takes in-place ops, and a saved input
    changed in place is caught."""
    from pyhappy import _tune as T
    from pyhappy.ops import lora_linear

    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))

    def measure(self, c, d, cold=(), settle=False):
        pick = d if d.startswith("step:") else pass_pick  # (a whole step: its first C++ node)
        return pick, {n: seconds * (0.5 if n == pick else 1.0) for n in c}, c[pick]()
    monkeypatch.setattr(T.Tuner, "measure", measure)
    a = make(6, 32, 24, 4, core=False, seed=3)
    x, W, b, A, B = a["x"].requires_grad_(), a["weight"], a["bias"], a["lora_A"], a["lora_B"]
    A.requires_grad_(), B.requires_grad_()
    dy = torch.randn(6, 24, generator=torch.Generator().manual_seed(4))
    names, results = [], []
    for _ in range(4):
        y = lora_linear(x, W, b, A, B, 0.5)
        names.append(y.grad_fn.name())
        results.append((y.detach(), *torch.autograd.grad(y, [x, A, B], dy)))
    assert names[0] == "LoraLinearBackward" and all(n.endswith("LoraLinearStep>") for n in names[2:]), names
    for r in results[1:]:
        for g, e in zip(r, results[0]):
            assert torch.equal(g, e)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, W, b, A, B[:, :3], 0.5)
    with T.forced("torch"):  # the op's passes as their torch candidates, through the registered op
        assert lora_linear(x, W, b, A, B, 0.5).grad_fn.name() == "LoraLinearBackward"
    with T.forced("unfused"):
        assert lora_linear(x, W, b, A, B, 0.5).grad_fn.name() == "AddmmBackward0"
    y = lora_linear(x, W, b, A, B, 0.5)
    y.mul_(2.0)  # a fresh output, not a view: autograd records the in-place op
    assert torch.equal(torch.autograd.grad(y, A, dy)[0], 2.0 * results[0][2])
    y = lora_linear(x, W, b, A, B, 0.5)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, A, dy)


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
@pytest.mark.parametrize("fwd,bwd", [("cpp_aten", "cpp_aten"), ("cpp", "cpp")])
def test_the_cpp_training_node_runs_cpp_aten_only_where_the_op_offers_it(fwd, bwd, tmp_path, monkeypatch):
    """A decode-sized bf16 call offers "cpp_aten" only where pyhappy's streaming kernels would take its
    product (which depends on x's layout); elsewhere the registered op runs its default, and so does
    the C++ node: a column-major x equals the op bit for bit. (A forced candidate the call does not
    offer leaves the pick to the tuner: its measurement is made to keep the default here, as it does
    where the kernels win; with kernels slowed down, e.g. by a sanitizer build, it could pick the
    unfused products.)"""
    from pyhappy import _ext
    from pyhappy import _tune as T
    from pyhappy.ops.lora_linear import _NODES, _Eager

    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: (d, {n: 1.0 for n in c}, c[d]()))
    a = make(3, 256, 192, 8, torch.bfloat16, seed=5)
    for x in (a["x"], a["x"].t().contiguous().t()):  # row-major and column-major [3, 256]
        x = x.detach().requires_grad_()
        A, B = a["lora_A"].requires_grad_(), a["lora_B"].requires_grad_()
        args = (x, a["weight"], a["bias"], A, B, None, 0.7)
        dy = torch.randn(3, 192, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
        b = dict(a, x=x)
        expect = _step_grads(lambda: _Eager(*args, 0.0, None)[0], b, dy, ("x", "lora_A", "lora_B"), fwd, bwd)
        got = _step_grads(lambda: _ext.load().lora_linear_step(*args, *_NODES[f"step:{fwd}/{bwd}"]), b, dy,
                          ("x", "lora_A", "lora_B"))
        for g, e in zip(got, expect):
            assert torch.equal(g, e)


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
def test_a_decided_training_call_on_fake_tensors_runs_the_registered_op(tmp_path, monkeypatch):
    """Fake tensors (FakeTensorMode outside torch.compile) never reach the C++ node, whose kernels read
    data: a layer whose real calls the node serves takes the registered op on fake ones (forward and
    backward)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyhappy import _tune as T
    from pyhappy.ops import lora_linear

    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: (  # a step: its first node
        d if d.startswith("step:") else "cpp", {n: 1e-4 for n in c}, c[d if d.startswith("step:") else "cpp"]()))
    mk = lambda: make(70, 96, 80, 8, seed=1)  # noqa: E731
    a = mk()
    for k in ("x", "lora_A", "lora_B"):
        a[k].requires_grad_()
    for _ in range(3):  # the passes' decisions, the whole step's, then the node
        y = lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], 0.5)
        y.sum().backward()
    assert y.grad_fn.name().endswith("LoraLinearStep>")
    with FakeTensorMode() as mode:
        f = {k: (mode.from_tensor(v).requires_grad_(v.requires_grad) if v is not None else None) for k, v in a.items()}
        y = lora_linear(f["x"], f["weight"], f["bias"], f["lora_A"], f["lora_B"], 0.5)
        gx, gA = torch.autograd.grad(y.sum(), [f["x"], f["lora_A"]])
    assert y.grad_fn.name() == "LoraLinearBackward" and gx.shape == (70, 96) and gA.shape == (8, 96)


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
def test_the_cpp_training_node_refuses_a_gradient_of_its_gradient():
    """create_graph=True through the C++ node: a clear error (its kernels have no autograd of their own,
    so a second-order gradient would be silently wrong)."""
    from pyhappy import _ext

    a = make(5, 24, 20, 4, seed=2)
    x, A, B = a["x"].requires_grad_(), a["lora_A"].requires_grad_(), a["lora_B"].requires_grad_()
    for passes in ((0, 0), (1, 1)):
        y = _ext.load().lora_linear_step(x, a["weight"], a["bias"], A, B, None, 0.5, *passes)
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(y.square().sum(), [x], create_graph=True)
