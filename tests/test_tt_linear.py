"""Tensor-train adapters: factorisation, reconstruction (vs tensorly when installed), contraction,
TTLinear (lowrank / matrix forms), TTAdapter, inject(adapter="tt"), compile."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import pyhappy
from pyhappy import backends
from pyhappy.nn import LoRALinear, TTAdapter, TTLinear
from pyhappy.ops.tt_linear import (factorize, matrix_plan, tt_chain, tt_lowrank_factors, tt_matrix_apply,
                                   tt_matrix_full)

from helpers import HAS_CPP, output_and_grads

HAS_TENSORLY = importlib.util.find_spec("tensorly") is not None


def rand_matrix_cores(ns, ks, ranks, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rr = [1, *ranks, 1]
    return [torch.randn(rr[i], ns[i], ks[i], rr[i + 1], generator=g, dtype=dtype) for i in range(len(ns))]


def naive_full(cores):
    """ΔW by explicit index loops over the TT-matrix definition (tiny sizes only)."""
    ns = [c.shape[1] for c in cores]
    ks = [c.shape[2] for c in cores]
    N, K = math.prod(ns), math.prod(ks)
    W = torch.zeros(N, K, dtype=cores[0].dtype)
    import itertools
    for nidx in itertools.product(*[range(n) for n in ns]):
        for kidx in itertools.product(*[range(k) for k in ks]):
            m = torch.ones(1, 1, dtype=cores[0].dtype)
            for c, a, b in zip(cores, nidx, kidx):
                m = m @ c[:, a, b, :]
            row = sum(a * math.prod(ns[i + 1:]) for i, a in enumerate(nidx))
            col = sum(b * math.prod(ks[i + 1:]) for i, b in enumerate(kidx))
            W[row, col] = m.item()
    return W


@given(n=st.integers(1, 5000), d=st.integers(1, 4))
def test_factorize_covers_n_with_balanced_factors(n, d):
    fs = factorize(n, d)
    m = math.prod(fs)
    assert len(fs) == d and n <= m <= n + max(1, int(n * 0.125))
    assert list(fs) == sorted(fs, reverse=True)


def test_factorize_examples_and_errors():
    assert factorize(4096) == (16, 16, 16)
    assert math.prod(factorize(7919)) >= 7919  # a prime: padded
    assert max(factorize(7919)) < 7919
    with pytest.raises(ValueError, match="n must"):
        factorize(0)


def test_tt_matrix_full_matches_definition_and_contraction():
    cores = rand_matrix_cores((3, 2), (2, 4), (3,))
    full = tt_matrix_full(cores)
    torch.testing.assert_close(full, naive_full(cores))
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(tt_matrix_apply(x, cores, 6, 8), x @ full.t())
    # padded: N=5 of 6, K=7 of 8
    torch.testing.assert_close(tt_matrix_apply(x[:, :7], cores, 5, 7), x[:, :7] @ full[:5, :7].t())


@pytest.mark.skipif(not HAS_TENSORLY, reason="tensorly not installed (optional oracle)")
def test_reconstruction_matches_tensorly():
    from tensorly.tt_matrix import tt_matrix_to_tensor
    from tensorly.tt_tensor import tt_to_tensor

    cores = rand_matrix_cores((4, 3, 2), (2, 5, 3), (3, 2), seed=1)
    ref = torch.from_numpy(tt_matrix_to_tensor([c.numpy() for c in cores])).reshape(24, 30)
    torch.testing.assert_close(tt_matrix_full(cores), ref)
    g = torch.Generator().manual_seed(2)
    chain = [torch.randn(1, 4, 3, generator=g, dtype=torch.float64), torch.randn(3, 6, 2, generator=g,
                                                                                   dtype=torch.float64),
             torch.randn(2, 5, 1, generator=g, dtype=torch.float64)]
    ref = torch.from_numpy(tt_to_tensor([c.numpy() for c in chain])).reshape(24, 5)
    torch.testing.assert_close(tt_chain(chain), ref)


def test_cost_model_prefers_contraction_for_small_m_and_counts_flops():
    shapes = [(1, 16, 16, 8), (8, 16, 16, 8), (8, 16, 16, 1)]
    small = matrix_plan(1, 4096, 4096, shapes)
    assert small["best"] == "contract" and small["contract"] < small["reconstruct"] / 10
    # large M: folding ΔW into the base GEMM slab by slab wins
    big = matrix_plan(512, 4096, 4096, shapes, slab_cost=32)
    assert big["best"] == "reconstruct"
    # where the slab pass costs more against the GEMM (the oneDNN engine), contraction goes further
    rank4 = [(1, 16, 16, 4), (4, 16, 16, 4), (4, 16, 16, 1)]
    assert matrix_plan(512, 4096, 4096, rank4, slab_cost=32)["best"] == "reconstruct"
    assert matrix_plan(512, 4096, 4096, rank4, slab_cost=192)["best"] == "contract"
    assert matrix_plan(2048, 4096, 4096, rank4, slab_cost=192)["best"] == "reconstruct"
    # step-by-step count for 2 cores: 2·M·(k2)·(1)·k1·1·n1·r + 2·M·1·n1·k2·r·n2·1
    p = matrix_plan(3, 6, 8, [(1, 3, 2, 5), (5, 2, 4, 1)])
    assert p["contract"] == 2 * 3 * 4 * 2 * 3 * 5 + 2 * 3 * 3 * 4 * 5 * 2


@pytest.mark.parametrize("form", ["lowrank", "matrix"])
@pytest.mark.parametrize("shape", [(64, 48), (70, 33)])  # the second factors badly: padded
def test_ttlinear_zero_init_forward_backward_and_merge(form, shape):
    torch.manual_seed(0)
    K, N = shape
    lin = nn.Linear(K, N)
    m = TTLinear.from_linear(lin, tt_rank=3, form=form, r=4, alpha=8)
    x = torch.randn(2, 5, K, requires_grad=True)
    # fresh adapter: the base output (the matrix form's slab GEMMs may round differently from one
    # whole F.linear: ~1 ulp)
    exact = dict(atol=0, rtol=0) if form == "lowrank" else dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m(x), lin(x), **exact)
    cores = list(m.tt_cores_A) + list(m.tt_cores_B) if form == "lowrank" else list(m.tt_cores)
    with torch.no_grad():
        for c in cores:
            c.normal_(std=0.5)
    y = m(x)
    torch.testing.assert_close(y, F.linear(x, lin.weight + m.delta_weight(), lin.bias), atol=1e-4, rtol=1e-4)
    # gradients into every core match autograd through the dense delta (float64 oracle)
    grads = torch.autograd.grad((y ** 2).sum(), [x, *cores])
    cd = [c.detach().double().requires_grad_() for c in cores]
    xd = x.detach().double().requires_grad_()
    if form == "lowrank":
        nA = len(m.tt_cores_A)
        A, B = tt_lowrank_factors(cd[:nA], cd[nA:], K, N)
        delta = m.scaling * (B @ A)
    else:
        delta = m.scaling * tt_matrix_full(cd, N, K)
    yd = F.linear(xd, lin.weight.double() + delta, lin.bias.double())
    want = torch.autograd.grad((yd ** 2).sum(), [xd, *cd])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w, atol=1e-3 * (1 + w.abs().max().item()), rtol=1e-3)
    assert lin.weight.grad is None
    w0 = lin.weight.detach().clone()
    m.merge()
    torch.testing.assert_close(m(x), y, atol=1e-4, rtol=1e-4)
    m.unmerge()
    torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=0)


def test_lowrank_form_runs_the_fused_lora_op_and_matches_lora_linear():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    m = TTLinear.from_linear(lin, tt_rank=2, r=4, alpha=8)
    with torch.no_grad():
        for c in m.tt_cores_B:
            c.normal_()
    A, B = tt_lowrank_factors(list(m.tt_cores_A), list(m.tt_cores_B), 64, 32)
    ref = LoRALinear.from_linear(nn.Linear(64, 32), r=4, alpha=8)
    ref.weight, ref.bias = lin.weight, lin.bias
    with torch.no_grad():
        ref.lora_A.weight.copy_(A)
        ref.lora_B.weight.copy_(B)
    x = torch.randn(7, 64)
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)


def test_parameter_counts_vs_lora():
    lin = nn.Linear(4096, 4096, device="meta")
    lora = 8 * (4096 + 4096)
    low = TTLinear.from_linear(lin, tt_rank=4, form="lowrank", r=8)
    assert low.num_adapter_parameters() == 2 * (16 * 4 + 2 * 4 * 16 * 4 + 4 * 8)
    assert lora / low.num_adapter_parameters() >= 20
    mat = TTLinear.from_linear(lin, tt_rank=4, form="matrix")
    assert mat.num_adapter_parameters() == 16 * 16 * 4 + 4 * 16 * 16 * 4 + 4 * 16 * 16


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="form"):
        TTLinear.from_linear(nn.Linear(8, 8), form="cp")
    with pytest.raises(ValueError, match="tt_rank"):
        TTLinear.from_linear(nn.Linear(64, 64), tt_rank=[2, 2, 2, 2, 2])
    with pytest.raises(ValueError, match="tt_rank"):
        TTLinear.from_linear(nn.Linear(64, 64), tt_rank=0)
    with pytest.raises(TypeError, match="nn.Linear"):
        TTLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="dropout"):
        TTLinear.from_linear(nn.Linear(64, 64), form="matrix", dropout=0.1)
    with pytest.raises(ValueError, match="act"):
        TTAdapter(64, act="swish2")


def test_tt_adapter_identity_at_init_then_trains():
    torch.manual_seed(0)
    a = TTAdapter(96, bottleneck=16, tt_rank=3)
    h = torch.randn(4, 96)
    torch.testing.assert_close(a(h), h, atol=0, rtol=0)
    with torch.no_grad():
        for c in a.tt_cores_up:
            c.normal_()
    out = a(h)
    down = F.linear(h, tt_matrix_full(list(a.tt_cores_down), 16, 96), a.bias_down)
    want = h + F.linear(F.gelu(down), tt_matrix_full(list(a.tt_cores_up), 96, 16), a.bias_up)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(c.grad is not None for c in a.tt_cores_down) and a.bias_up.grad is not None


def test_inject_tt_freezes_everything_but_the_cores():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 30))
    rep = pyhappy.inject(model, ["0", "2"], adapter="tt", tt_rank=2, form="matrix")
    assert rep.replaced == ["0", "2"] and all(isinstance(model[i], TTLinear) for i in (0, 2))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".tt_cores." in n for n in names)
    assert rep.trainable_params == sum(model[i].num_adapter_parameters() for i in (0, 2))


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
@pytest.mark.parametrize("form,rows", [("lowrank", 6), ("matrix", 6), ("matrix", 40)])
def test_compile_fullgraph_one_frame(form, rows):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = TTLinear.from_linear(nn.Linear(64, 48), tt_rank=3, form=form)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    x = torch.randn(rows, 64, requires_grad=True)
    if form == "matrix":
        # eager: the op's forward and backward bodies through an autograd.Function (no dispatcher)
        assert type(m(x).grad_fn).__name__ == "_TTEagerBackward"

    def f(x):
        return (m(x) ** 2).sum()

    cnt = CompileCounterWithBackend("inductor")
    loss = torch.compile(f, backend=cnt, fullgraph=True)(x)
    params = [x] + [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    want_loss = f(x)
    want = torch.autograd.grad(want_loss, params)
    assert cnt.frame_count == 1
    torch.testing.assert_close(loss, want_loss, atol=1e-3, rtol=1e-4)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-3 * (1 + w.abs().max().item()), rtol=1e-3)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_lowrank_form_on_each_lora_backend(backend):
    if backend == "cpp" and not HAS_CPP:
        pytest.skip("pyhappy._C not built")
    torch.manual_seed(0)
    m = TTLinear.from_linear(nn.Linear(32, 24), tt_rank=2, r=4)
    with torch.no_grad():
        for c in m.tt_cores_B:
            c.normal_()
    x = torch.randn(5, 32)
    with backends.force(backend):
        y = m(x)
    torch.testing.assert_close(y, F.linear(x, m.weight + m.delta_weight(), m.bias), atol=1e-5, rtol=1e-5)


def test_matrix_form_inference_folds_delta_slabs_into_the_gemm(monkeypatch):
    import pyhappy.ops.tt_linear as ttl

    torch.manual_seed(0)
    cores = [torch.randn(1, 8, 8, 4) * 0.3, torch.randn(4, 8, 8, 4) * 0.3, torch.randn(4, 4, 8, 1) * 0.3]
    N, K = 250, 500  # padded from 256 x 512
    W, b, x = torch.randn(N, K), torch.randn(N), torch.randn(300, K)
    calls = []
    real = ttl._slab_forward
    monkeypatch.setattr(ttl, "_slab_forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ttl, "_slab_flops_per_entry", lambda: 32)
    assert matrix_plan(300, N, K, [tuple(c.shape) for c in cores])["best"] == "reconstruct"
    with torch.no_grad():
        y = ttl.tt_matrix_linear(x, W, b, cores, 0.5)
    assert calls
    torch.testing.assert_close(y, F.linear(x, W + 0.5 * tt_matrix_full(cores, N, K), b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["lowrank", "matrix"])
def test_tt_on_a_quantized_base(form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    rep = pyhappy.inject(model, ["0"], adapter="tt", tt_rank=2, form=form, quantize="int4", group_size=32)
    m = model[0]
    assert m.weight is None and rep.quantized == ["2"]
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    x = torch.randn(5, 64, requires_grad=True)
    y = m(x)
    want = F.linear(x, m.base.dequantize() + m.delta_weight(), m.bias)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    y.sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith("tt_cores"))
    with pytest.raises(RuntimeError, match="quantized"):
        m.merge()
    pyhappy.unload(model)
    assert type(model[0]).__name__ == "QuantLinear"


# ---- the op pyhappy::tt_linear -------------------------------------------------------------------


@pytest.mark.parametrize("plan", ["contract", "reconstruct"])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("ns,ks,ranks,N,K", [
    ((3, 4), (4, 2), (3,), 12, 8),             # d = 2, exact sizes
    ((2, 3, 2), (3, 2, 2), (2, 3), 11, 10),    # d = 3, padded on both sides
    ((5,), (6,), (), 5, 6),                    # d = 1: ΔW is the core itself
])
def test_tt_linear_op_gradcheck_both_plans(monkeypatch, plan, with_weight, ns, ks, ranks, N, K):
    import pyhappy.ops.tt_linear as ttl

    monkeypatch.setattr(ttl, "_plan", lambda *a: plan)
    cores = [c.requires_grad_() for c in rand_matrix_cores(ns, ks, ranks, seed=len(ns))]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, K, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(N, K, dtype=torch.float64, generator=g) if with_weight else None
    b = torch.randn(N, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, b, *cs):
        return ttl.tt_matrix_linear(x, W, b, list(cs), 0.7, N=N)

    y = f(x, b, *cores)
    torch.testing.assert_close(y, pyhappy.reference.tt_linear(x, W, b, cores, N, 0.7))
    assert torch.autograd.gradcheck(f, (x, b, *cores))


@pytest.mark.parametrize("plan", ["contract", "reconstruct"])
def test_tt_linear_op_core_grads_match_dense_delta_at_a_large_shape(monkeypatch, plan):
    # the environment-contraction core gradients (the C++ kernels in float32, vector tails at these
    # sizes; either forward) against autograd through the dense ΔW, at a layer wide enough for real
    # GEMM blocking
    torch.manual_seed(0)
    N, K = 1000, 1100  # 10x10x10 and 11x10x10
    ns, ks = factorize(N, 3), factorize(K, 3)
    cores = [c.float().mul_(0.3).requires_grad_() for c in rand_matrix_cores(ns, ks, (4, 4), seed=2)]
    monkeypatch.setattr(pyhappy.ops.tt_linear, "_plan", lambda *a: plan)
    x = torch.randn(40, K, requires_grad=True)
    W = torch.randn(N, K) * 0.02
    g = torch.randn(40, N)
    y = pyhappy.ops.tt_matrix_linear(x, W, None, cores, 0.5)
    got = torch.autograd.grad(y, [x, *cores], g)
    cd = [c.detach().double().requires_grad_() for c in cores]
    xd = x.detach().double().requires_grad_()
    yd = xd @ (W.double() + 0.5 * tt_matrix_full(cd, N, K)).t()
    want = torch.autograd.grad(yd, [xd, *cd], g.double())
    torch.testing.assert_close(y.double(), yd, atol=1e-4, rtol=1e-4)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, atol=1e-4 * (1 + w.abs().max().item()), rtol=1e-4)


def test_tt_linear_opcheck():
    cores = rand_matrix_cores((2, 3), (3, 2), (2,), dtype=torch.float32, seed=5)
    x = torch.randn(4, 6)
    W, b = torch.randn(6, 6), torch.randn(6)
    for args in ((x, W, b, cores, 6, 0.5), (x.requires_grad_(), None, None, [c.requires_grad_() for c in cores], 5, 1.0)):
        torch.library.opcheck(torch.ops.pyhappy.tt_linear.default, args)


def test_tt_linear_errors_name_the_argument():
    cores = rand_matrix_cores((2, 3), (3, 2), (2,), dtype=torch.float32)
    x = torch.randn(4, 6)
    f = pyhappy.ops.tt_matrix_linear
    with pytest.raises(ValueError, match="N must be"):
        f(x, None, None, cores, 1.0)
    with pytest.raises(ValueError, match="weight must be"):
        f(x, torch.randn(6, 5), None, cores, 1.0)
    with pytest.raises(ValueError, match="bias must be"):
        f(x, torch.randn(6, 6), torch.randn(5), cores, 1.0)
    with pytest.raises(ValueError, match="cover"):
        f(torch.randn(4, 7), None, None, cores, 1.0, N=6)
    with pytest.raises(ValueError, match="leading rank"):
        f(x, None, None, [cores[0], cores[1][:1]], 1.0, N=6)
    with pytest.raises(ValueError, match="cores must be"):
        f(x, None, None, [], 1.0, N=6)



# ---- the C++ kernels of the environment contraction (csrc/cpu/tt_linear.cpp) -----------------------

KERNEL_SHAPES = [  # (B, P, Q, S): the 4096² 16³ rank-4 states, and tails of both vector widths
    (33, 64, 64, 16), (9, 64, 16, 256), (300, 16, 64, 1), (1, 1, 1, 1), (3, 5, 7, 1), (9, 13, 11, 5),
    (4, 15, 20, 19), (7, 65, 9, 33), (2, 9, 17, 8), (0, 4, 4, 4),
    # S = 16 (AVX-512: the outer-product pair for Q, the apply for P in {16, 32, 48, 64}): blocks of
    # 64 b with a tail, P not a multiple of the pair's 6-row tile, each P and Q served, others not
    (70, 13, 48, 16), (5, 7, 16, 16), (3, 6, 32, 16), (2, 64, 80, 16), (4, 16, 20, 16), (3, 32, 48, 16),
    (2, 48, 32, 16)]


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
@pytest.mark.parametrize("level", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("B,P,Q,S", KERNEL_SHAPES)
def test_cpp_tt_kernels_match_float64_at_every_simd_level(level, B, P, Q, S):
    from pyhappy import _ext

    C = _ext.load()
    g = torch.Generator().manual_seed(B * 1000 + P * 10 + S)
    G, V = torch.randn(P, Q, generator=g), torch.randn(B, Q, S, generator=g)
    Fm, Z = torch.randn(B, P, S, generator=g), torch.randn(B, Q, S, generator=g)
    C.set_simd_level(level)
    try:
        out = torch.ops.pyhappy.tt_bapply_cpu(G, V)
        pair = torch.ops.pyhappy.tt_bpair_cpu(Fm, Z)
        # non-contiguous inputs are made contiguous, not misread
        out_t = torch.ops.pyhappy.tt_bapply_cpu(G.t().contiguous().t(), V)
    finally:
        C.set_simd_level("avx512")
    assert out.shape == (B, P, S) and pair.shape == (P, Q)
    torch.testing.assert_close(out.double(), G.double() @ V.double(), atol=1e-4 * math.sqrt(Q), rtol=1e-5)
    torch.testing.assert_close(out_t, out)
    want = torch.einsum("bps,bqs->pq", Fm.double(), Z.double())
    torch.testing.assert_close(pair.double(), want, atol=1e-4 * math.sqrt(B * S + 1), rtol=1e-5)


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
def test_cpp_tt_kernels_reject_bad_input_naming_it():
    V = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="g is"):
        torch.ops.pyhappy.tt_bapply_cpu(torch.randn(5, 4), V)
    with pytest.raises(RuntimeError, match="v must be a float32"):
        torch.ops.pyhappy.tt_bapply_cpu(torch.randn(5, 3), V.double())
    with pytest.raises(RuntimeError, match="batch and last sizes"):
        torch.ops.pyhappy.tt_bpair_cpu(V, torch.randn(2, 5, 3))
    with pytest.raises(RuntimeError, match="z must be 3-D"):
        torch.ops.pyhappy.tt_bpair_cpu(V, torch.randn(2, 5))


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
def test_cpp_tt_contraction_ops_reject_bad_input_naming_it():
    cores = [torch.randn(1, 2, 3, 2), torch.randn(2, 2, 3, 1)]
    x, dy = torch.randn(2, 9), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="dy has 3 rows but x has 2"):
        torch.ops.pyhappy.tt_env_backward_cpu(x, torch.randn(3, 4), cores, 1.0, True, 4)
    with pytest.raises(RuntimeError, match=r"cores\[1\] has leading rank 3, expected 2"):
        torch.ops.pyhappy.tt_env_backward_cpu(x, dy, [cores[0], torch.randn(3, 2, 3, 1)], 1.0, True, 4)
    with pytest.raises(RuntimeError, match="cover"):
        torch.ops.pyhappy.tt_env_backward_cpu(torch.randn(2, 10), dy, cores, 1.0, True, 4)
    with pytest.raises(RuntimeError, match="y must be a contiguous"):
        torch.ops.pyhappy.tt_contract_cpu(x, cores, 1.0, torch.zeros(4, 2).t(), 4)
    with pytest.raises(RuntimeError, match="chunk must be >= 1"):
        torch.ops.pyhappy.tt_contract_cpu(x, cores, 1.0, torch.zeros(2, 4), 0)


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
@pytest.mark.parametrize("level", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("N,K", [(90, 84), (96, 80)])  # dy padded, x read in place; and the reverse
def test_tt_linear_op_cpp_kernels_match_the_torch_path(monkeypatch, request, M, level, N, K):
    # fp32 through the C++ kernels (the chunk loops of tt_contract_cpu / tt_env_backward_cpu) vs
    # the same op with tt_linear forced to the reference (torch batched products), several row
    # chunks, both plans of the forward, at each SIMD level (portable: ATen inside the C++ loops)
    import pyhappy.ops.tt_linear as ttl
    from pyhappy import _ext

    request.addfinalizer(lambda: _ext.load().set_simd_level("avx512"))  # no cap: the default
    _ext.load().set_simd_level(level)

    monkeypatch.setattr(ttl, "_ENV_STATE_ELEMS", 4096)  # chunks of a few rows
    torch.manual_seed(M)
    ns, ks = (3, 4, 8), (3, 4, 7)  # the cores cover 96 x 84
    cores = [c.float().requires_grad_() for c in rand_matrix_cores(ns, ks, (3, 2), seed=M)]
    x = torch.randn(M, K, requires_grad=True)
    W, b = torch.randn(N, K), torch.randn(N, requires_grad=True)
    dy = torch.randn(M, N)
    results = []
    for backend in (None, "reference"):
        for plan in ("contract", "reconstruct"):
            monkeypatch.setattr(ttl, "_plan", lambda *a, p=plan: p)
            with backends.force(backend):
                assert ttl._cpp(x, ttl._backend(x)) == (backend is None)
                y = ttl.tt_matrix_linear(x, W, b, cores, 0.8)
                results.append((y, *torch.autograd.grad(y, [x, b, *cores], dy)))
    for got in results[1:]:
        for a, w in zip(got, results[0]):
            torch.testing.assert_close(a, w, atol=2e-5, rtol=1e-4)


# ---- the Triton kernels (triton_kernels/tt_linear.py), under the interpreter on CPU ------------------

needs_triton = pytest.mark.skipif(
    backends.unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")) is not None,
    reason="triton unavailable here (CPU needs TRITON_INTERPRET=1)")


@needs_triton
@pytest.mark.device_check  # on CUDA where present (bash .ci/gpu)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_weight", [True, False])
def test_triton_fused_tiles_match_the_reference(monkeypatch, dtype, with_weight):
    # N' = 16 and K' = 32 (the rest cores), so 16-row and 32-column tiles never straddle a Kronecker
    # block; N, K padded (30 of 32, 90 of 96): the masks at both edges
    import pyhappy.ops.tt_linear as ttl
    from pyhappy.triton_kernels import tt_linear as tk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(ttl, "_plan", lambda *a: "reconstruct")
    launched = []
    for name in ("tt_linear_forward", "tt_linear_dx"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _r=real, _n=name: launched.append(_n) or _r(*a))
    torch.manual_seed(0)
    cores = [c.to(dev, dtype).requires_grad_() for c in rand_matrix_cores((2, 4, 4), (3, 4, 8), (3, 2), seed=3)]
    N, K = 30, 90
    x = torch.randn(5, K, device=dev, dtype=dtype, requires_grad=True)
    W = torch.randn(N, K, device=dev, dtype=dtype) if with_weight else None
    b = torch.randn(N, device=dev, dtype=dtype)
    dy = torch.randn(5, N, device=dev, dtype=dtype)
    with backends.force("triton"):
        y = ttl.tt_matrix_linear(x, W, b, cores, 0.7, N=N)
        got = torch.autograd.grad(y, [x, *cores], dy)
    assert launched == ["tt_linear_forward", "tt_linear_dx"]
    xd, cd = x.detach().double().requires_grad_(), [c.detach().double().requires_grad_() for c in cores]
    Wd = W.double() if with_weight else torch.zeros(N, K, dtype=torch.float64, device=dev)
    yd = xd @ (Wd + 0.7 * tt_matrix_full(cd, N, K)).t() + b.double()
    want = torch.autograd.grad(yd, [xd, *cd], dy.double())
    tol = dict(atol=5e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.double(), yd, **tol)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, **{**tol, "atol": tol["atol"] * (1 + w.abs().max().item())})


@needs_triton
@pytest.mark.device_check
def test_triton_backend_falls_back_to_torch_ops_where_tiles_would_straddle(monkeypatch):
    # N' = 6 (not a multiple of 16): no fused kernel; the op still computes the right thing
    import pyhappy.ops.tt_linear as ttl
    from pyhappy.triton_kernels import tt_linear as tk

    monkeypatch.setattr(ttl, "_plan", lambda *a: "reconstruct")
    monkeypatch.setattr(tk, "tt_linear_forward", lambda *a: pytest.fail("fused kernel on straddling tiles"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cores = [c.to(dev, torch.float32) for c in rand_matrix_cores((2, 2, 3), (2, 4, 4), (2, 2), seed=4)]
    x, W = torch.randn(3, 32, device=dev), torch.randn(12, 32, device=dev)
    with backends.force("triton"):
        y = ttl.tt_matrix_linear(x, W, None, cores, 0.5)
    torch.testing.assert_close(y, x @ (W + 0.5 * tt_matrix_full(cores, 12, 32)).t(), atol=1e-4, rtol=1e-4)


def test_tt_matrix_apply_on_an_empty_batch():
    cores = rand_matrix_cores((2, 3), (2, 4), (3,), dtype=torch.float32, seed=6)
    out = tt_matrix_apply(torch.empty(0, 8), cores, 6, 8)
    assert out.shape == (0, 6)


@pytest.mark.parametrize("with_weight,bias,grad_x", [(True, True, True), (False, False, True), (True, False, False)])
def test_eager_training_call_matches_the_registered_op(with_weight, bias, grad_x):
    """An eager training call runs the op's bodies through an autograd.Function (the cores as
    trailing arguments) instead of the dispatcher: the same values and gradients, bit for bit, as
    calling the registered op; under torch.compile the registered op is traced (test above)."""
    from pyhappy.ops import tt_matrix_linear

    g = torch.Generator().manual_seed(3)
    N, K = 12, 16
    x = torch.randn(5, K, generator=g, requires_grad=grad_x)
    W = torch.randn(N, K, generator=g) if with_weight else None
    b = torch.randn(N, generator=g, requires_grad=True) if bias else None
    cores = [torch.randn(1, 3, 4, 2, generator=g, requires_grad=True),
             torch.randn(2, 4, 4, 1, generator=g, requires_grad=True)]
    params = [t for t in (x, b, *cores) if t is not None and t.requires_grad]
    got = output_and_grads(lambda: tt_matrix_linear(x, W, b, cores, 0.5, N=N), params)
    want = output_and_grads(lambda: torch.ops.pyhappy.tt_linear(x, W, b, cores, N, 0.5), params)
    assert len(got) == len(want) == 1 + len(params)
    for a, w in zip(got, want):
        assert torch.equal(a, w)


def test_tt_linear_dense_candidate_agrees_with_the_contraction(monkeypatch):
    """The measured CPU dispatch's "dense" candidate (the unfused formulation of public TT code: ΔW
    materialised, one GEMM; the backward through autograd on ΔW), forced, against the default path:
    the output and every gradient, with and without a base weight, padded cores, x with and without
    a gradient (the backward with and without dx)."""
    import pyhappy.ops.tt_linear as ttl
    from pyhappy import _tune

    ran = []
    for table in (ttl.FORWARD_CANDIDATES, ttl.BACKWARD_CANDIDATES):
        f, name = table["dense"], "forward" if table is ttl.FORWARD_CANDIDATES else "backward"
        monkeypatch.setitem(table, "dense", lambda *a, f=f, name=name: (ran.append(name), f(*a))[1])
    N, K = 90, 80  # the cores cover 96 x 84
    cores = [c.float().requires_grad_() for c in rand_matrix_cores((3, 4, 8), (3, 4, 7), (3, 2), seed=7)]
    g = torch.Generator().manual_seed(8)
    for with_weight in (True, False):
        for x_grad in (True, False):
            x = torch.randn(6, K, generator=g).requires_grad_(x_grad)
            W = torch.randn(N, K, generator=g) if with_weight else None
            b = torch.randn(N, generator=g, requires_grad=True)
            dy = torch.randn(6, N, generator=g)
            wrt = [x, b, *cores] if x_grad else [b, *cores]
            results = []
            for cand in (None, "dense"):
                ran.clear()
                with _tune.forced(cand):
                    y = ttl.tt_matrix_linear(x, W, b, cores, 0.8, N=N)
                    results.append((y, *torch.autograd.grad(y, wrt, dy)))
                if cand == "dense":
                    assert ran == ["forward", "backward"], ran
            for a, w in zip(results[1], results[0]):
                torch.testing.assert_close(a, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ns,ks,ranks,N,K,scaling", [
    ((4, 4), (8, 4), (3,), 16, 32, 1.0),  # cover [N, K] exactly, s = 1: ΔW added through a permuted view
    ((2, 3, 4), (4, 2, 3), (2, 3), 24, 24, 1.0),
    ((4, 4), (8, 4), (3,), 16, 32, 0.37),  # s != 1: the copied ΔW
    ((4, 4), (8, 4), (3,), 15, 30, 1.0),  # padded: the copied, sliced ΔW
])
def test_the_unfused_matrix_formulation_equals_public_tt_codes_bit_for_bit(dtype, ns, ks, ranks, N, K, scaling):
    """The TT-matrix unfused formulation (the "dense" forward candidate and the small layers' whole
    step) gives the numbers of F.linear(x, W + s·ΔW) with ΔW materialised [N, K] (public TT code),
    output and every gradient bit for bit, also where it adds ΔW to W through a permuted view with
    no copy of ΔW (one autograd node fewer, asserted)."""
    from pyhappy.ops.tt_linear import _unfused_matrix

    g = torch.Generator().manual_seed(1)
    cores = [c.to(dtype).requires_grad_() for c in rand_matrix_cores(ns, ks, ranks, torch.float32, seed=2)]
    W = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    x = torch.randn(5, K, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(5, N, generator=g).to(dtype)
    y = _unfused_matrix(x, W, b, cores, N, scaling)
    want = F.linear(x, torch.add(W, tt_matrix_full(cores, N, K), alpha=scaling), b)
    assert torch.equal(y, want)
    for a, e in zip(torch.autograd.grad(y, [x, *cores], dy), torch.autograd.grad(want, [x, *cores], dy)):
        assert torch.equal(a, e)
    names, seen, todo = set(), set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            names.add(fn.name())
            todo.extend(f for f, _ in fn.next_functions)
    fused = scaling == 1.0 and (N, K) == (math.prod(ns), math.prod(ks))
    assert ("CloneBackward0" not in names) == fused, names


def test_ttlinear_reads_its_cores_in_order_and_any_entry_a_parameterlist_holds():
    """TTLinear's forward reads a ParameterList's entries by index from its parameter dict (cheaper
    than list()): in index order also where the dict's order differs (entries filled out of order, a
    parametrization removed), and through list() where an entry is not a Parameter."""
    from pyhappy.nn.tt_linear import _entries

    pl = nn.ParameterList([nn.Parameter(torch.full((2,), float(i))) for i in range(3)])
    pl[1] = nn.Parameter(torch.zeros(2))
    pl.append(torch.ones(3))
    assert len(_entries(pl)) == 4 and all(a is b for a, b in zip(_entries(pl), list(pl)))
    mixed = nn.ParameterList([nn.Parameter(torch.ones(2)), "not a tensor"])
    assert _entries(mixed) == list(mixed)
    late = nn.ParameterList([None, None])  # filled in reverse: the dict's order is not the index order
    late[1], late[0] = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))
    assert list(late._parameters) == ["1", "0"] and [p.item() for p in _entries(late)] == [0.0, 1.0]
    torch.manual_seed(0)
    m = TTLinear.from_linear(nn.Linear(16, 12), tt_rank=2, form="matrix")
    with torch.no_grad():
        for c in m.tt_cores:
            c.normal_()
    x = torch.randn(3, 16)
    want = m(x)
    from torch.nn.utils import parametrize  # re-registers the core last: dict order ['1', '0']
    parametrize.register_parametrization(m.tt_cores, "0", nn.Identity())
    parametrize.remove_parametrizations(m.tt_cores, "0", leave_parametrized=True)
    assert list(m.tt_cores._parameters)[0] != "0"
    torch.testing.assert_close(m(x), want)
