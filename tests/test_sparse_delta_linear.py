"""pyhappy::sparse_delta_linear: op on every CPU backend, SparseDeltaLinear, pattern tools, delta files."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import pyhappy
from pyhappy import backends, reference
from pyhappy import sparse as sp
from pyhappy.nn import SparseDeltaLinear
from pyhappy.ops import sparse_delta_linear, sparse_layout

import helpers
from helpers import HAS_CPP, HAS_TRITON, assert_close_to_oracle

OP = torch.ops.pyhappy.sparse_delta_linear
HAS_SD_CPP = helpers.has_cpp_op("sparse_delta_linear_cpu")
_no_cpp = pytest.mark.skipif(not HAS_SD_CPP, reason="pyhappy._C without sparse_delta_linear")


def cpu_backends():
    return helpers.cpu_backends("sparse_delta_linear_cpu")


def make_pattern(N, K, nnz, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(N * K, generator=g)[:nnz].sort().values.to(torch.int32)


def scatter(values, indices, N, K):
    w = torch.zeros(N * K, dtype=values.dtype)
    w = w.index_put((indices.long(),), values)
    return w.view(N, K)


def dense_oracle(indices, N, K, scale):
    def f(x, W, bias, values):
        w = scale * scatter(values, indices, N, K)
        if W is not None:
            w = W + w
        y = x @ w.t()
        return y + bias if bias is not None else y
    return f


def case(M, K, N, nnz, dtype, seed=0, weight=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = torch.randn(N, K, generator=g).to(dtype) / K**0.5 if weight else None
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    idx = make_pattern(N, K, nnz, seed)
    v = torch.randn(nnz, generator=g).to(dtype)
    return x, W, b, v, idx, sparse_layout(idx, N, K)


# ------------------------------------------------------------------------------------------------
# layout and pattern validation
# ------------------------------------------------------------------------------------------------


def test_layout_is_csr_and_csc_of_the_pattern():
    N, K = 7, 9
    idx = make_pattern(N, K, 20, seed=3)
    lay = sparse_layout(idx, N, K)
    from pyhappy.triton_kernels.sparse_delta_linear import split_layout  # pure slicing, no kernel launch

    row_ptr, cols, t_ptr, t_rows, t_perm = (t.long() for t in split_layout(lay, N, K, 20))
    rows, cs = idx.long() // K, idx.long() % K
    for n in range(N):
        assert cols[row_ptr[n]:row_ptr[n + 1]].tolist() == cs[rows == n].tolist()
    for k in range(K):
        sel = t_perm[t_ptr[k]:t_ptr[k + 1]]
        assert (cs[sel] == k).all() and t_rows[t_ptr[k]:t_ptr[k + 1]].tolist() == rows[sel].tolist()
        assert rows[sel].tolist() == sorted(rows[sel].tolist())
    assert sorted(t_perm.tolist()) == list(range(20))


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([3, 1, 5], dtype=torch.int32), "sorted"),
    (torch.tensor([1, 3, 3], dtype=torch.int32), "duplicate"),
    (torch.tensor([0, 63], dtype=torch.int32), "out of range"),
    (torch.tensor([-1, 2], dtype=torch.int32), "out of range"),
    (torch.tensor([1, 2], dtype=torch.int64), "int32"),
])
def test_bad_patterns_are_rejected_by_name(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sparse_layout(bad, 7, 9)
    with pytest.raises((ValueError, TypeError), match=match):
        SparseDeltaLinear.from_linear(nn.Linear(9, 7), pattern=bad)


def test_op_errors_name_the_argument():
    x, W, b, v, idx, lay = case(4, 16, 8, 10, torch.float32)
    with pytest.raises(TypeError, match="values"):
        sparse_delta_linear(x, W, b, v.double(), idx, lay)
    with pytest.raises(ValueError, match="indices"):
        sparse_delta_linear(x, W, b, v, idx[:-1], lay)
    with pytest.raises(ValueError, match="layout"):
        sparse_delta_linear(x, W, b, v, idx, lay[:-1])
    with pytest.raises(ValueError, match="weight"):
        sparse_delta_linear(x, W[:, :-1].contiguous(), b, v, idx, lay)
    with pytest.raises(ValueError, match="bias"):
        sparse_delta_linear(x, W, b[:-1], v, idx, lay)
    with pytest.raises(ValueError, match="pass N"):
        sparse_delta_linear(x, None, None, v, idx, lay)
    with pytest.raises(ValueError, match="2\\^31"):
        sparse_layout(torch.tensor([0], dtype=torch.int32), 2**16, 2**16)


@_no_cpp
def test_cpp_rejects_a_corrupt_layout_instead_of_reading_out_of_bounds():
    x, W, b, v, idx, lay = case(4, 16, 8, 10, torch.float32)
    bad = lay.clone()
    bad[8 + 1] = 999  # a column index >= K
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.pyhappy.sparse_delta_linear_cpu(x, W, b, v, bad, 8, 1.0)
    bad = lay.clone()
    bad[3] = 0  # row_ptr no longer monotone
    with pytest.raises(RuntimeError, match="monotone"):
        torch.ops.pyhappy.sparse_delta_linear_cpu(x, W, b, v, bad, 8, 1.0)


# ------------------------------------------------------------------------------------------------
# forward / backward against the dense formulation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight, bias", [(True, True), (True, False), (False, True), (False, False)])
def test_forward_backward_match_dense(backend, dtype, weight, bias):
    M, K, N, nnz = 21, 40, 24, 97  # odd sizes: partial panels and column groups
    x, W, b, v, idx, lay = case(M, K, N, nnz, dtype, weight=weight, bias=bias)
    oracle = dense_oracle(idx, N, K, 0.7)
    x.requires_grad_(True)
    v.requires_grad_(True)
    with backends.force(backend):
        y = sparse_delta_linear(x, W, b, v, idx, lay, 0.7, N=N)
        dy = torch.randn(M, N, generator=torch.Generator().manual_seed(9)).to(dtype)
        gx, gv = torch.autograd.grad(y, (x, v), dy)
    assert y.dtype == dtype
    assert_close_to_oracle(y, oracle, (x.detach(), W, b, v.detach()), name="y")

    def dx_oracle(dy_, W_, v_):
        w = 0.7 * scatter(v_, idx, N, K)
        return dy_ @ (w if W_ is None else W_ + w)

    def dv_oracle(dy_, x_):
        return 0.7 * (dy_.t() @ x_).flatten()[idx.long()]

    assert_close_to_oracle(gx, dx_oracle, (dy, W, v.detach()), name="grad_x")
    assert_close_to_oracle(gv, dv_oracle, (dy, x.detach()), name="grad_values")


@pytest.mark.parametrize("backend", cpu_backends())
def test_leading_dims_and_decode_shapes(backend):
    K, N = 32, 20
    idx = make_pattern(N, K, 30)
    lay = sparse_layout(idx, N, K)
    W, v = torch.randn(N, K), torch.randn(30)
    for shape in ((1, K), (2, 3, K), (0, K)):
        x = torch.randn(*shape)
        with backends.force(backend):
            y = sparse_delta_linear(x, W, None, v, idx, lay)
        want = x @ (W + scatter(v, idx, N, K)).t()
        assert y.shape == want.shape
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_float64_runs_the_reference_path_and_gradchecks():
    x, W, b, v, idx, lay = case(5, 12, 6, 15, torch.float64)
    x.requires_grad_(True)
    v.requires_grad_(True)
    b.requires_grad_(True)

    def fn(x, b, v):
        return OP(x, W, b, v, idx, lay, 6, 0.5)

    assert torch.autograd.gradcheck(fn, (x, b, v))


@_no_cpp
@pytest.mark.parametrize("simd", [True, False])
@given(M=st.integers(1, 40), K=st.integers(1, 48), N=st.integers(1, 40), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16))
def test_cpp_kernels_random_shapes_and_densities(simd, M, K, N, density, seed):
    nnz = int(density * N * K)
    x, W, b, v, idx, lay = case(M, K, N, nnz, torch.float32, seed=seed)
    dy = torch.randn(M, N)
    pyhappy._C.set_simd_enabled(simd)
    try:
        y = torch.ops.pyhappy.sparse_delta_linear_cpu(x, W, b, v, lay, N, 1.5)
        gx, gv = torch.ops.pyhappy.sparse_delta_linear_backward_cpu(dy, x, W, v, lay, 1.5, True, True)
    finally:
        pyhappy._C.set_simd_enabled(True)
    assert_close_to_oracle(y, dense_oracle(idx, N, K, 1.5), (x, W, b, v), name="y")
    ry, rv = reference.sparse_delta_linear_backward(dy.double(), x.double(), W.double(), v.double(), idx, 1.5)
    torch.testing.assert_close(gx.double(), ry, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gv.double(), rv, atol=1e-4, rtol=1e-4)


@_no_cpp
def test_cpp_multithreaded_with_inputs_requiring_grad():
    # Large enough to split over threads (parallel_for workers must not see autograd state).
    x, W, b, v, idx, lay = case(70, 256, 300, 3000, torch.float32)
    x.requires_grad_(True)
    v.requires_grad_(True)
    y = sparse_delta_linear(x, W, b, v, idx, lay)
    gx, gv = torch.autograd.grad(y.sum(), (x, v))
    with backends.force("reference"):
        ry = sparse_delta_linear(x, W, b, v, idx, lay)
        rx, rv = torch.autograd.grad(ry.sum(), (x, v))
    torch.testing.assert_close(y, ry, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gv, rv, atol=1e-3, rtol=1e-4)


def test_frozen_weight_gets_no_dense_gradient_and_trainable_weight_gets_exact_one():
    x, W, b, v, idx, lay = case(6, 16, 8, 12, torch.float32)
    v.requires_grad_(True)
    y = sparse_delta_linear(x, W, b, v, idx, lay)
    y.sum().backward()
    assert W.grad is None and v.grad is not None
    W.requires_grad_(True)
    y = sparse_delta_linear(x, W, b, v, idx, lay)
    (gw,) = torch.autograd.grad(y.sum(), (W,))
    torch.testing.assert_close(gw, torch.ones(6, 8).t() @ x)


# ------------------------------------------------------------------------------------------------
# opcheck and compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends()[:2])  # Triton on CPU (the interpreter) needs real data, not fake tensors
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("weight", [True, False])
def test_opcheck(backend, requires_grad, weight):
    x, W, b, v, idx, lay = case(9, 24, 10, 30, torch.float32, weight=weight)
    for t in (x, b, v):
        t.requires_grad_(requires_grad)
    with backends.force(backend):
        torch.library.opcheck(OP, (x, W, b, v, idx, lay, 10, 0.5))


@_no_cpp
def test_compile_fullgraph_forward_backward_one_frame():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = SparseDeltaLinear.from_linear(nn.Linear(32, 24), density=0.1, seed=0)
    m.add_delta("task", density=0.05, seed=1, scale=0.5)
    with torch.no_grad():
        for d in m.deltas.values():
            d.values.normal_()
    x = torch.randn(10, 32, requires_grad=True)

    def f(x):
        return (m(x) ** 2).sum()

    cnt = CompileCounterWithBackend("inductor")
    cf = torch.compile(f, backend=cnt, fullgraph=True)
    loss = cf(x)
    params = [x, m.deltas["default"].values, m.deltas["task"].values]
    grads = torch.autograd.grad(loss, params)
    want_loss = f(x)
    want = torch.autograd.grad(want_loss, params)
    assert cnt.frame_count == 1
    torch.testing.assert_close(loss, want_loss, atol=1e-4, rtol=1e-5)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-4 * w.abs().max().item(), rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# module
# ------------------------------------------------------------------------------------------------


def test_module_zero_init_composition_toggling_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    m = SparseDeltaLinear.from_linear(lin, density=0.05, seed=1)
    x = torch.randn(6, 48)
    torch.testing.assert_close(m(x), lin(x), atol=0, rtol=0)  # zero values: the base output, exactly
    assert m.weight is lin.weight and not m.weight.requires_grad
    m.add_delta("task", density=0.02, seed=2, scale=0.5)
    with torch.no_grad():
        m.deltas["default"].values.normal_()
        m.deltas["task"].values.normal_()
    both = m(x)
    want = F.linear(x, lin.weight + m.delta_weight() + m.delta_weight("task"), lin.bias)
    torch.testing.assert_close(both, want, atol=1e-5, rtol=1e-5)
    m.set_delta("task", enabled=False)
    only = m(x)
    torch.testing.assert_close(only, F.linear(x, lin.weight + m.delta_weight(), lin.bias), atol=1e-5, rtol=1e-5)
    m.set_delta("task", enabled=True)
    assert torch.equal(m(x), both)  # toggling leaves no drift
    m.set_delta("task", scale=0.25)
    torch.testing.assert_close(m(x), F.linear(x, lin.weight + m.delta_weight() + m.delta_weight("task"), lin.bias),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="nope"):
        m.set_delta("nope", enabled=False)
    with pytest.raises(ValueError, match="exists"):
        m.add_delta("task", density=0.01)


def test_merge_unmerge_restores_the_weight_bit_for_bit():
    lin = nn.Linear(32, 16)
    m = SparseDeltaLinear.from_linear(lin, density=0.1, seed=0)
    m.add_delta("b", density=0.1, seed=1, scale=0.3)  # overlapping patterns
    with torch.no_grad():
        for d in m.deltas.values():
            d.values.normal_()
    w0 = lin.weight.detach().clone()
    x = torch.randn(5, 32)
    y = m(x)
    m.merge()
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    assert all(d.merged for d in m.deltas.values())
    with pytest.raises(RuntimeError, match="merged"):
        m.set_delta("b", scale=1.0)
    m.unmerge()
    assert torch.equal(lin.weight, w0)
    assert torch.equal(m(x), y)


def test_training_updates_only_values_and_matches_dense_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(24, 12)
    m = SparseDeltaLinear.from_linear(lin, density=0.2, seed=3)
    x = torch.randn(8, 24)
    loss = (m(x) ** 2).sum()
    loss.backward()
    g = m.deltas["default"].values.grad
    wd = lin.weight.detach().clone().requires_grad_(True)
    ((F.linear(x, wd, lin.bias) ** 2).sum()).backward()
    torch.testing.assert_close(g, wd.grad.flatten()[m.deltas["default"].indices.long()], atol=1e-5, rtol=1e-5)
    assert lin.weight.grad is None and lin.bias.grad is None


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int3"])
def test_quantized_base(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    m = SparseDeltaLinear.from_linear(lin, density=0.05, pattern="magnitude", quantize=fmt, group_size=32)
    assert m.weight is None
    with torch.no_grad():
        m.deltas["default"].values.normal_()
    x = torch.randn(5, 64, requires_grad=True)
    y = m(x)
    w = m.base.dequantize() + m.delta_weight()
    torch.testing.assert_close(y, F.linear(x, w, lin.bias), atol=1e-4, rtol=1e-4)
    y.sum().backward()
    assert m.deltas["default"].values.grad is not None and x.grad is not None
    with pytest.raises(RuntimeError, match="quantized"):
        m.merge()


def test_patterns():
    w = torch.randn(20, 30)
    r1 = sp.random_pattern(20, 30, 0.1, seed=4)
    assert torch.equal(r1, sp.random_pattern(20, 30, 0.1, seed=4)) and r1.numel() == 60
    top = sp.topk_pattern(w, nnz=25)
    thresh = w.abs().flatten().sort(descending=True).values[24]
    assert (w.abs().flatten()[top.long()] >= thresh).all()
    m = SparseDeltaLinear.from_linear(nn.Linear(30, 20), density=0.1, pattern="rows", scores=w)
    idx = m.deltas["default"].indices.long()
    rows = (idx // 30).unique()
    assert rows.numel() == 2 and idx.numel() == 60
    assert set(rows.tolist()) == set(w.norm(dim=1).topk(2).indices.tolist())
    m = SparseDeltaLinear.from_linear(nn.Linear(30, 20), density=0.1, pattern="cols", seed=0)
    assert (m.deltas["default"].indices.long() % 30).unique().numel() == 3
    with pytest.raises(ValueError, match="pattern"):
        SparseDeltaLinear.from_linear(nn.Linear(30, 20), pattern="bogus")
    with pytest.raises(ValueError, match="density"):
        sp.random_pattern(20, 30, 1.5)


def test_gradient_scorer_accumulates_abs_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    for p in model.parameters():
        p.requires_grad_(False)
    scorer = sp.GradientScorer(model, ["0"])
    want = torch.zeros(6, 8)
    for _ in range(3):
        x = torch.randn(5, 8)
        model(x).sum().backward()
        w = model[0].weight.detach().clone().requires_grad_(True)
        y = model[2](torch.tanh(F.linear(x, w, model[0].bias))).sum()
        (g,) = torch.autograd.grad(y, (w,))
        want += g.abs()
    torch.testing.assert_close(scorer.scores["0"], want)
    assert model[0].weight.grad is None
    scorer.remove()
    assert not model[0].weight.requires_grad


def test_extract_sparse_delta_and_lora():
    torch.manual_seed(0)
    base = torch.randn(32, 48)
    low = torch.randn(32, 3) @ torch.randn(3, 48)
    v, idx = sp.extract_sparse_delta(base + low, base, density=0.1)
    dense = base.clone().view(-1)
    dense[idx.long()] += v
    diff = (low.flatten().abs())
    assert torch.equal(idx, idx.sort().values) and v.numel() == int(round(0.1 * 32 * 48))
    assert diff[idx.long()].min() >= diff.sort(descending=True).values[v.numel() - 1] - 1e-6
    A, B = sp.extract_lora(base + low, base, 3)
    torch.testing.assert_close(B @ A, low, atol=1e-4, rtol=1e-4)  # exact rank-3 difference recovered
    noisy = low + 0.01 * torch.randn(32, 48)
    A, B = sp.extract_lora(base + noisy, base, 2)
    S = torch.linalg.svdvals(noisy.double())
    err = torch.linalg.matrix_norm((noisy - B @ A).double())
    torch.testing.assert_close(err, S[2:].pow(2).sum().sqrt(), atol=1e-4, rtol=1e-4)  # Eckart–Young optimum
    with pytest.raises(ValueError, match="r must"):
        sp.extract_lora(base, base, 100)


def test_save_load_deltas_and_state_dict_with_another_pattern(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    rep = pyhappy.inject(model, ["0", "2"], adapter="sparse", density=0.1, seed=0)
    assert rep.replaced == ["0", "2"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.deltas.default.values",
                                                                           "2.deltas.default.values"]
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.deltas["default"].values.normal_()
    x = torch.randn(3, 16)
    y = model(x)
    path = tmp_path / "delta.safetensors"
    assert sp.save_sparse_deltas(path, model) == 2
    fresh = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "deltas" not in k}, strict=False)
    pyhappy.inject(fresh, ["0", "2"], adapter="sparse", density=0.3, seed=7)  # another pattern
    assert sp.load_sparse_deltas(path, fresh) == 2
    assert torch.equal(fresh(x), y)
    # state dict round trip into modules built with another pattern
    other = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    pyhappy.inject(other, ["0", "2"], adapter="sparse", density=0.02, seed=3)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x), y)
    if importlib.util.find_spec("safetensors") is not None:  # optional oracle: the reference reader
        from safetensors.torch import load_file

        t = load_file(os.fspath(path))
        assert torch.equal(t["0.indices"], model[0].deltas["default"].indices)
        assert torch.equal(t["2.values"], model[2].deltas["default"].values.detach())
    with pytest.raises(ValueError, match="shape"):
        wrong = nn.Sequential(nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 8))
        pyhappy.inject(wrong, ["0", "2"], adapter="sparse", density=0.1)
        sp.load_sparse_deltas(path, wrong)


def test_inject_sparse_on_quantized_base():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    rep = pyhappy.inject(model, ["0"], adapter="sparse", density=0.01, quantize="int4", group_size=32)
    assert isinstance(model[0], SparseDeltaLinear) and model[0].weight is None
    assert rep.quantized == ["2"]
    model(torch.randn(2, 64)).sum().backward()
    assert model[0].deltas["default"].values.grad is not None


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_structured_slabs_run_as_dense_subgemms_with_the_same_result(axis):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    m = SparseDeltaLinear.from_linear(lin, density=0.25, pattern=axis, seed=2)
    d = m.deltas["default"]
    assert d.slab == axis
    with torch.no_grad():
        d.values.normal_()
    d.scale = 0.5
    x = torch.randn(2, 3, 40, requires_grad=True)
    y = m(x)
    gx, gv = torch.autograd.grad((y ** 2).sum(), (x, d.values))
    want = F.linear(x, lin.weight + m.delta_weight(), lin.bias)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    d.slab = None  # the general sparse kernel on the same pattern
    y2 = m(x)
    gx2, gv2 = torch.autograd.grad((y2 ** 2).sum(), (x, d.values))
    torch.testing.assert_close(y2, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx2, gx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gv2, gv, atol=1e-4, rtol=1e-4)
    # a pattern that is almost a slab (one entry missing) is not taken for one
    idx = d.indices[1:]
    assert m.add_delta("partial", idx).slab is None


@_no_cpp
@pytest.mark.parametrize("level", ["avx2", "avx512"])
@pytest.mark.parametrize("M,K,N", [(33, 64, 40), (64, 48, 24), (100, 56, 70), (96, 128, 128), (17, 32, 16)])
def test_cpp_bf16_products_equal_the_fp32_products_of_the_same_values_bit_for_bit(level, M, K, N):
    """bf16 operands of more than one panel of rows take bf16 panels of 32 rows (csrc
    sparse_delta_linear.cpp, panel32: built vectorised where K % 16 == 0, else portably, rows past M
    zero; the AVX2 or the AVX-512 kernel); the products are the fp32 ones of the same (exactly
    widened) values, so y and dx equal the fp32 op's on those values, rounded once to bf16."""
    x, _, _, v, idx, lay = case(M, K, N, K * N // 5, torch.bfloat16, seed=M, weight=False, bias=False)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(M, N, generator=g).bfloat16()
    # Magnitudes spread over 2^±12, so that the fp32 sums round and the order of the additions shows.
    x, v, dy = (t * torch.exp2(torch.randint(-12, 13, t.shape, generator=g).float()).bfloat16() for t in (x, v, dy))
    before = torch.get_num_threads()
    pyhappy._C.set_simd_level(level)
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = torch.ops.pyhappy.sparse_delta_linear_cpu(x, None, None, v, lay, N, 0.75)
            y32 = torch.ops.pyhappy.sparse_delta_linear_cpu(x.float(), None, None, v.float(), lay, N, 0.75)
            gx, _ = torch.ops.pyhappy.sparse_delta_linear_backward_cpu(dy, x, None, v, lay, 0.75, True, False)
            gx32, _ = torch.ops.pyhappy.sparse_delta_linear_backward_cpu(dy.float(), x.float(), None, v.float(), lay,
                                                                         0.75, True, False)
            assert torch.equal(y, y32.bfloat16()) and torch.equal(gx, gx32.bfloat16())
    finally:
        torch.set_num_threads(before)
        pyhappy._C.set_simd_level("avx512")
    assert_close_to_oracle(y, dense_oracle(idx, N, K, 0.75), (x, None, None, v), name="y")
