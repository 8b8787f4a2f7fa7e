"""pyhappy::dora_linear / dora_weight_norm: backends against the reference (PEFT's formulation),
autograd, opcheck, gradcheck, compile, bad input, the module (DoRA LoRALinear) and PEFT parity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import HAS_CPP, cpu_backends
from hypothesis import given
from hypothesis import strategies as st

import pyhappy
from pyhappy import backends, reference
from pyhappy.nn import LoRALinear
from pyhappy.ops import dora_linear, dora_weight_norm, dora_weight_sqnorm

OP = torch.ops.pyhappy.dora_linear
NEEDS_CPP = pytest.mark.skipif(not HAS_CPP, reason="extension not built")


def make(M, K, N, r, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    W = t(N, K, scale=1 / math.sqrt(K))
    return dict(x=t(M, K), weight=W, bias=t(N) if bias else None, lora_A=t(r, K, scale=1 / math.sqrt(K)),
                lora_B=t(N, r, scale=1 / math.sqrt(r)),
                magnitude=(torch.linalg.vector_norm(W.double(), dim=1) * (1 + 0.1 * torch.randn(N, generator=g,
                                                                                                dtype=torch.float64))
                           ).to(dtype))


def _reference(leaves, weight, s, p, seed, dtype):
    ref = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
    W = weight.to(dtype)
    wn = reference.dora_weight_norm(W, ref["lora_A"].detach(), ref["lora_B"].detach(), s)
    y = reference.dora_linear(ref["x"], W, ref.get("bias"), ref["lora_A"], ref["lora_B"], ref["magnitude"], wn, s, p,
                              seed)
    return y, ref


def _grads(a, s, p, seed, backend):
    """(y, truth y, grads, true grads, tolerances): dora_linear on ``backend`` against PEFT's
    formulation (reference.dora_linear, detached norm) in float64. Tolerance from principle: 4x the
    error of the same formulation run in the input dtype, plus 32 eps of the result's scale, eps
    scaled by the norm's condition number."""
    leaves = {k: a[k].clone().requires_grad_() for k in ("x", "lora_A", "lora_B", "magnitude", "bias")
              if a[k] is not None}
    with backends.force(backend):
        y = dora_linear(leaves["x"], a["weight"], leaves.get("bias"), leaves["lora_A"], leaves["lora_B"],
                        leaves["magnitude"], s, p, seed=seed)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    got = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))
    yr, ref = _reference(leaves, a["weight"], s, p, seed, torch.float64)
    want = dict(zip(leaves, torch.autograd.grad(yr, list(ref.values()), dy.double())))
    ys, same = _reference(leaves, a["weight"], s, p, seed, y.dtype)
    same_g = dict(zip(leaves, torch.autograd.grad(ys, list(same.values()), dy)))
    # the norm's condition: ‖W_n + s·B_n A‖ is computed from terms up to ‖W_n‖ + |s|·‖B_n‖·‖A‖, so a row
    # that nearly cancels loses that ratio in relative precision whatever the formula
    W64, A64, B64 = a["weight"].double(), a["lora_A"].double(), a["lora_B"].double()
    terms = W64.norm(dim=1) + abs(s) * B64.norm(dim=1) * A64.norm()
    wn64 = reference.dora_weight_norm(W64, A64, B64, s)
    kappa = (terms / wn64).max().item() if terms.numel() else 1.0
    # The fused norm expands ‖W_n + s·B_n A‖² into ‖W_n‖² + 2s·B_n·(W Aᵀ)_n + s²·B_n (A Aᵀ) B_nᵀ (W + s·BA is
    # never formed): a cancelling row loses the square of that ratio in the squared norm, and every
    # output and gradient scales with 1 / norm.
    eps = torch.finfo(y.dtype).eps * max(1.0, kappa) ** 2

    # The scale of each result's summands: the same float64 reference on absolute values (nothing
    # cancels), for a gradient that is a sum of terms cancelling to a small value (say grad_B at
    # N = r = 1, a sum over every row): its rounding error scales with Σ|terms|, not |Σ terms|.
    yab, refab = _reference({k: v.detach().abs() for k, v in leaves.items()}, a["weight"].abs(), abs(s), p, seed,
                            torch.float64)
    summands = dict(zip(leaves, torch.autograd.grad(yab, list(refab.values()), dy.double().abs())))
    summands["y"] = yab.detach()
    if a["bias"] is not None and a["weight"].shape[0]:
        # The C++ backward takes Σ_m dy ⊙ z from its output, Σ_m dy ⊙ (y - b): the rounding of y - b,
        # which scales with |b|, reaches the magnitude's gradient.
        summands["magnitude"] = summands["magnitude"] + (dy.double().abs() * a["bias"].double().abs()).sum(0) / wn64

    def tol(got_t, truth, same_t, scale):
        if truth.numel() == 0:
            return 0.0
        big = max(truth.abs().max().item(), scale.abs().max().item())
        return 4 * (same_t.double() - truth).abs().max().item() + 32 * eps * big

    tols = {k: tol(got[k], want[k], same_g[k], summands[k]) for k in got}
    tols["y"] = tol(y, yr.detach(), ys.detach(), summands["y"])
    return y, yr.detach(), got, want, tols


def _check(y, yr, got, want, tols):
    _close_abs(y, yr, tols["y"], "y")
    for k in got:
        _close_abs(got[k], want[k], tols[k], k)


def _close_abs(got, want, tol, name):
    assert got.shape == want.shape, name
    if want.numel():
        err = (got.double() - want).abs().max().item()
        assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e}"


def _close(got, want, rtol):
    assert got.shape == want.shape
    if want.numel() == 0:
        return
    scale = want.abs().max().clamp_min(1e-30)
    err = (got.double() - want).abs().max()
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:g} x {scale:.3e}"


# rows >= 64 reach the C++ skinny kernels; M = 150 > 128 columns per block at K = 1600 makes the C++
# backward scale W in column blocks (13 of them); at K = 1280, N = 400 it scales dy's column blocks
# instead (three of 128 columns, one of 16) and accumulates their products; fewer rows than a block form dz whole
SHAPES = [(1, 16, 8, 1), (3, 31, 17, 4), (70, 40, 33, 16), (0, 12, 9, 2), (150, 1600, 24, 3), (150, 1280, 400, 4)]


@pytest.mark.parametrize("backend", cpu_backends("dora_weight_norm_cpu"))
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_backend_matches_reference(backend, M, K, N, r, p):
    _check(*_grads(make(M, K, N, r), 0.7, p, torch.tensor([11]), backend))


@pytest.mark.parametrize("backend", cpu_backends("dora_weight_norm_cpu"))
def test_bf16_and_leading_dims(backend):
    a = make(12, 48, 20, 4, torch.bfloat16)
    a["x"] = a["x"].reshape(3, 4, 48)
    res = _grads(a, 0.5, 0.0, None, backend)
    assert res[0].shape == (3, 4, 20) and res[0].dtype == torch.bfloat16
    _check(*res)


@NEEDS_CPP
@given(M=st.integers(0, 140), K=st.integers(1, 90), N=st.integers(1, 90), r=st.integers(1, 20),
       bias=st.booleans(), p=st.sampled_from([0.0, 0.4]))
def test_cpp_hypothesis_shapes(M, K, N, r, bias, p):
    _check(*_grads(make(M, K, N, r, bias=bias), 1.3, p, torch.tensor([3]), "cpp"))


@pytest.mark.parametrize("backend", cpu_backends("dora_weight_norm_cpu")[1:])
@pytest.mark.parametrize("K", [1, 3, 16])
def test_cancelling_rows_stay_finite_and_bounded(backend, K):
    # W_n = -s·B_n A rounded to fp32: every row cancels to rounding noise. |y_mn - b_n| =
    # |m_n|·|x_m·v_n| / ‖v_n‖ ≤ |m_n|·‖x_m‖ exactly; the computed numerator is noise of size
    # ~K·eps·‖x_m‖·(‖W_n‖ + |s|·‖B_n‖·‖A‖) and the norm is floored at eps·(that sum), so the output
    # stays within a few ‖x_m‖·|m_n| (a norm that expanded to 0 would give inf here). The reference
    # backend is left out: it is PEFT's formula to the letter, which divides by a norm rounded to 0.
    a = make(6, K, 90, 1)
    s = 1.3
    W = -(s * (a["lora_B"].double() @ a["lora_A"].double())).float()
    leaves = {k: a[k].clone().requires_grad_() for k in ("x", "lora_A", "lora_B", "magnitude")}
    with backends.force(backend):
        y = dora_linear(leaves["x"], W, a["bias"], leaves["lora_A"], leaves["lora_B"], leaves["magnitude"], s, 0.0)
        grads = torch.autograd.grad(y.sum(), list(leaves.values()))
    bound = 4 * (K + 2) * a["magnitude"].abs()[None, :] * a["x"].norm(dim=1, keepdim=True)
    assert torch.isfinite(y).all() and ((y - a["bias"]).abs() <= bound).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", cpu_backends("dora_weight_norm_cpu"))
def test_weight_norm_matches_peft_formula_and_clamps_cancellation(backend):
    a = make(5, 64, 70, 4)
    s = 0.9
    with backends.force(backend):
        got = dora_weight_norm(a["weight"], a["lora_A"], a["lora_B"], s)
        _close(got, reference.dora_weight_norm(a["weight"].double(), a["lora_A"].double(), a["lora_B"].double(), s),
               1e-6)
        # W = -s·BA exactly: the true norm is 0; cancellation must not give NaN
        W = -(s * (a["lora_B"].double() @ a["lora_A"].double())).float()
        z = dora_weight_norm(W, a["lora_A"], a["lora_B"], s)
    # fp32 P = W Aᵀ carries ~K·eps relative error of ‖W‖², so what is left of a cancelled norm is
    # ~sqrt(K·eps)·‖W‖ at most
    bound = 4 * math.sqrt(64 * torch.finfo(torch.float32).eps) * W.norm(dim=1).min()
    assert torch.isfinite(z).all() and (z >= 0).all() and z.max() < bound


@pytest.mark.parametrize("backend", cpu_backends("dora_weight_norm_cpu"))
def test_zero_magnitude_rows_get_their_exact_gradient(backend):
    a = make(130, 20, 12, 3)
    a["magnitude"][[0, 5]] = 0.0
    y, yr, got, want, tols = _grads(a, 0.5, 0.0, None, backend)
    _close_abs(got["magnitude"], want["magnitude"], tols["magnitude"], "magnitude")
    assert torch.equal(y[:, 0], a["bias"][0].expand(130))


# ---- autograd, opcheck, gradcheck, compile ------------------------------------------------------------


def _op_args(requires_grad, p=0.2, dtype=torch.float32, bias=True):
    a = make(6, 12, 10, 3, dtype, bias=bias)
    wn = reference.dora_weight_norm(a["weight"], a["lora_A"], a["lora_B"], 0.5)
    for k in ("x", "lora_A", "lora_B", "bias", "magnitude"):
        if a[k] is not None:
            a[k].requires_grad_(requires_grad)
    return (a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["magnitude"], wn.requires_grad_(requires_grad),
            0.5, p, torch.tensor([3]))


CPP_OR_REF = ["reference", pytest.param("cpp", marks=NEEDS_CPP)]


@pytest.mark.parametrize("backend", CPP_OR_REF)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, requires_grad):
    with backends.force(backend):
        torch.library.opcheck(OP, _op_args(requires_grad))
        torch.library.opcheck(OP, _op_args(requires_grad, p=0.0, bias=False))
        a = make(4, 12, 10, 3)
        torch.library.opcheck(torch.ops.pyhappy.dora_weight_norm, (a["weight"], a["lora_A"], a["lora_B"], None, 0.5))
        torch.library.opcheck(torch.ops.pyhappy.dora_weight_norm, (a["weight"], a["lora_A"], a["lora_B"],
                                                                   dora_weight_sqnorm(a["weight"]), 0.5))


@pytest.mark.parametrize("backend", CPP_OR_REF)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(backend, p):
    """Every input, the norm included (the op's formula is exact; the API detaches the norm)."""
    x, W, b, A, B, m, wn, s, _, seed = _op_args(True, p=p, dtype=torch.float64)
    fn = lambda x, b, A, B, m, wn: OP(x, W, b, A, B, m, wn, s, p, seed)[0]  # noqa: E731
    with backends.force(backend):
        assert torch.autograd.gradcheck(fn, (x, b, A, B, m, wn))


def test_norm_is_detached_and_base_weight_gets_no_buffer():
    a = make(5, 8, 6, 2)
    A, B, m = (a[k].requires_grad_() for k in ("lora_A", "lora_B", "magnitude"))
    assert not dora_weight_norm(a["weight"], A, B, 0.5).requires_grad
    dora_linear(a["x"], a["weight"], a["bias"], A, B, m, 0.5).sum().backward()
    assert a["weight"].grad is None and A.grad is not None and m.grad is not None


@NEEDS_CPP
def test_compile_fullgraph_forward_backward_one_frame():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    a = make(8, 32, 24, 4)
    params = [a[k].requires_grad_() for k in ("lora_A", "lora_B", "magnitude")]
    x = a["x"].requires_grad_()

    def f(x, A, B, m):
        y = dora_linear(x, a["weight"], a["bias"], A, B, m, 0.5)
        return (y * y).sum()

    cnt = CompileCounterWithBackend("inductor")
    loss = torch.compile(f, backend=cnt, fullgraph=True)(x, *params)
    grads = torch.autograd.grad(loss, [x, *params])
    want_loss = f(x, *params)
    want = torch.autograd.grad(want_loss, [x, *params])
    assert cnt.frame_count == 1
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


# ---- bad input ----------------------------------------------------------------------------------------


def _bad_cases():
    ok = make(4, 8, 6, 2)

    def args(**kw):
        base = dict(x=ok["x"], weight=ok["weight"], bias=ok["bias"], lora_A=ok["lora_A"], lora_B=ok["lora_B"],
                    magnitude=ok["magnitude"], scaling=1.0, dropout_p=0.0)
        base.update(kw)
        return base

    return [
        ("int x", args(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "x"),
        ("weight K", args(weight=torch.randn(6, 9)), ValueError, "weight"),
        ("lora_B shape", args(lora_B=torch.randn(6, 3)), ValueError, "lora_B"),
        ("magnitude shape", args(magnitude=torch.randn(7)), ValueError, "magnitude"),
        ("magnitude dtype", args(magnitude=ok["magnitude"].double()), TypeError, "magnitude"),
        ("bias shape", args(bias=torch.randn(5)), ValueError, "bias"),
        ("dropout_p", args(dropout_p=1.0), ValueError, "dropout_p"),
        ("scaling", args(scaling=float("nan")), ValueError, "scaling"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, kw, exc, name = case
    with pytest.raises(exc, match=rf"\b{name}\b"):
        dora_linear(**kw)


def test_op_bad_weight_norm_names_it():
    x, W, b, A, B, m, wn, s, p, seed = _op_args(False)
    with pytest.raises(ValueError, match=r"\bweight_norm\b"):
        OP(x, W, b, A, B, m, wn[:-1], s, p, seed)


# ---- the module ---------------------------------------------------------------------------------------


def _peft_pair(in_f=24, out_f=16, r=4, alpha=8, bias=True, dropout=0.0):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    model = torch.nn.Sequential()
    model.add_module("proj", copy.deepcopy(lin))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_dora=True,
                                                    lora_dropout=dropout, init_lora_weights=False))
    L = pm.base_model.model.proj
    ours = LoRALinear.from_linear(lin, r=r, alpha=alpha, dropout=dropout, use_dora=True)
    with torch.no_grad():
        ours.lora_A.weight.copy_(L.lora_A["default"].weight)
        ours.lora_B.weight.copy_(L.lora_B["default"].weight)
        ours.lora_magnitude_vector.copy_(L.lora_magnitude_vector["default"].weight)
    return ours, pm, L


@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_peft_dora_layer_logits_and_grads(bias):
    ours, pm, L = _peft_pair(bias=bias)
    x = torch.randn(2, 5, 24)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), pm(xb)
    _close(ya.detach(), yb.detach().double(), 1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    pairs = [(xa.grad, xb.grad), (ours.lora_A.weight.grad, L.lora_A["default"].weight.grad),
             (ours.lora_B.weight.grad, L.lora_B["default"].weight.grad),
             (ours.lora_magnitude_vector.grad, L.lora_magnitude_vector["default"].weight.grad)]
    for got, want in pairs:
        _close(got, want.double(), 1e-4)


def test_module_init_magnitude_is_peft_row_norm_and_fresh_adapter_is_identity():
    lin = torch.nn.Linear(20, 12)
    m = LoRALinear.from_linear(lin, r=4, alpha=8, use_dora=True)
    torch.testing.assert_close(m.lora_magnitude_vector.detach(), torch.linalg.vector_norm(lin.weight, dim=1))
    assert m.lora_magnitude_vector.requires_grad and "lora_magnitude_vector" in m.state_dict()
    x = torch.randn(3, 20)
    torch.testing.assert_close(m(x), lin(x))


def test_module_merge_unmerge_exact_and_state_dict():
    m = LoRALinear.from_linear(torch.nn.Linear(32, 16), r=4, alpha=8, init="none", use_dora=True).eval()
    with torch.no_grad():
        m.lora_magnitude_vector.mul_(1.3)
    x = torch.randn(5, 32)
    w0 = m.weight.detach().clone()
    y = m(x)
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    sd = m.state_dict()
    m2 = LoRALinear(32, 16, r=4, alpha=8, use_dora=True).eval()
    m2.load_state_dict(sd)
    assert m2.merged
    m.unmerge()
    torch.testing.assert_close(m.weight.detach(), w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), y)
    m2.unmerge()
    torch.testing.assert_close(m2(x), y, rtol=1e-5, atol=1e-5)


def test_weight_sqnorm_cache_follows_weight_changes():
    m = LoRALinear.from_linear(torch.nn.Linear(16, 8), r=2, init="none", use_dora=True).eval()
    x = torch.randn(3, 16)
    first = m.weight_sqnorm()
    assert m.weight_sqnorm() is first
    with torch.no_grad():
        m.weight.mul_(2.0)  # in place: the version counter moves
    assert m.weight_sqnorm() is not first
    ref = reference.dora_linear(x, m.weight, m.bias, m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector,
                                reference.dora_weight_norm(m.weight, m.lora_A.weight, m.lora_B.weight, m.scaling),
                                m.scaling)
    torch.testing.assert_close(m(x), ref)


def _ref_out(m, x):
    return reference.dora_linear(x, m.weight, m.bias, m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector,
                                 reference.dora_weight_norm(m.weight, m.lora_A.weight, m.lora_B.weight, m.scaling),
                                 m.scaling)


def _count_norms(monkeypatch, m):
    calls = []
    inner = m._dora_norm
    monkeypatch.setattr(m, "_dora_norm", lambda: calls.append(1) or inner())
    return calls


def test_norm_is_kept_between_calls_and_follows_every_change(monkeypatch):
    m = LoRALinear.from_linear(torch.nn.Linear(16, 8), r=2, init="none", use_dora=True).eval()
    calls = _count_norms(monkeypatch, m)
    x = torch.randn(3, 16)
    y = m(x)
    assert m(x).equal(y) and len(calls) == 1  # served from the cache
    # a fused optimizer updates A and B in place without bumping their version counters
    opt = torch.optim.AdamW([m.lora_A.weight, m.lora_B.weight], lr=0.1, fused=True)
    m.train()
    m(x).sum().backward()
    m(x).sum().backward()  # micro-batches of one step: A and B unchanged, the same norm
    assert len(calls) == 1
    v = m.lora_B.weight._version
    opt.step()
    assert m.lora_B.weight._version == v  # the case a version-keyed cache would miss
    m.eval()
    torch.testing.assert_close(m(x), _ref_out(m, x))
    assert len(calls) == 2
    with torch.no_grad():
        m.weight.mul_(2.0)  # W in place: its version counter moves
    torch.testing.assert_close(m(x), _ref_out(m, x))
    m.scaling = 0.5
    torch.testing.assert_close(m(x), _ref_out(m, x))
    m.load_state_dict({k: v * 1.5 if "lora_A" in k else v for k, v in m.state_dict().items()})
    torch.testing.assert_close(m(x), _ref_out(m, x))
    assert len(calls) == 5


def test_a_norm_kept_under_inference_mode_serves_a_training_step(monkeypatch):
    m = LoRALinear.from_linear(torch.nn.Linear(16, 8), r=2, init="none", use_dora=True)
    calls = _count_norms(monkeypatch, m)
    x = torch.randn(3, 16)
    with torch.inference_mode():  # e.g. a validation pass between training steps
        y = m(x)
    out = m(x)  # kept norm, handed out as a normal tensor autograd can save
    out.sum().backward()
    assert len(calls) == 1 and m.lora_B.weight.grad is not None
    torch.testing.assert_close(out.detach(), y)


def test_norm_under_autocast_is_not_served_outside_it(monkeypatch):
    m = LoRALinear.from_linear(torch.nn.Linear(16, 8), r=2, init="none", use_dora=True).eval()
    calls = _count_norms(monkeypatch, m)
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
        m(x)
    assert len(calls) == 1
    torch.testing.assert_close(m(x), _ref_out(m, x))
    assert len(calls) == 2


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("M", [3, 200])  # 200 rows: more than a block of the C++ backward at K=64
def test_no_output_features(M, p):
    x = torch.randn(M, 64, requires_grad=True)
    A, B, m = torch.randn(2, 64, requires_grad=True), torch.randn(0, 2, requires_grad=True), torch.rand(0)
    y = dora_linear(x, torch.randn(0, 64), torch.randn(0), A, B, m.requires_grad_(), 0.5, p)
    assert y.shape == (M, 0)
    y.sum().backward()
    assert x.grad.abs().sum() == 0 and A.grad.abs().sum() == 0 and B.grad.shape == (0, 2)


def test_norm_is_not_kept_for_a_trainable_base_weight(monkeypatch):
    m = LoRALinear.from_linear(torch.nn.Linear(16, 8), r=2, init="none", use_dora=True)
    m.weight.requires_grad_(True)  # a fused optimizer could update it without a version bump
    calls = _count_norms(monkeypatch, m)
    x = torch.randn(3, 16)
    m(x)
    m(x)
    assert len(calls) == 2


def test_op_takes_a_given_norm():
    torch.manual_seed(3)
    x, W, b = torch.randn(4, 12), torch.randn(6, 12), torch.randn(6)
    A, B, mag = torch.randn(2, 12), torch.randn(6, 2), torch.rand(6) + 0.5
    wn = dora_weight_norm(W, A, B, 0.7)
    torch.testing.assert_close(dora_linear(x, W, b, A, B, mag, 0.7, weight_norm=wn), dora_linear(x, W, b, A, B, mag, 0.7))
    with pytest.raises(ValueError, match=r"\bweight_norm\b"):
        dora_linear(x, W, b, A, B, mag, 0.7, weight_norm=wn[:-1])
    with pytest.raises(TypeError, match=r"\bweight_norm\b"):
        dora_linear(x, W, b, A, B, mag, 0.7, weight_norm=wn.tolist())


def test_module_dropout_follows_peft_formulation():
    m = LoRALinear.from_linear(torch.nn.Linear(32, 16), r=4, dropout=0.5, init="none", use_dora=True)
    x = torch.randn(6, 32)
    seed = torch.tensor([9])
    y = dora_linear(x, m.weight, m.bias, m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector, m.scaling, 0.5,
                    seed=seed)
    wn = reference.dora_weight_norm(m.weight, m.lora_A.weight, m.lora_B.weight, m.scaling)
    xd = reference.dropout(x, 0.5, seed)
    ms = m.lora_magnitude_vector / wn
    base = x @ m.weight.t()
    want = base + m.bias + (ms - 1) * (xd @ m.weight.t()) + ms * m.scaling * ((xd @ m.lora_A.weight.t()) @ m.lora_B.weight.t())
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@NEEDS_CPP
def test_module_under_compile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = LoRALinear.from_linear(torch.nn.Linear(16, 8), r=2, init="none", use_dora=True)
    x = torch.randn(3, 16, requires_grad=True)
    cnt = CompileCounterWithBackend("inductor")
    y = torch.compile(m, backend=cnt, fullgraph=True)(x)
    y.sum().backward()
    assert cnt.frame_count == 1
    torch.testing.assert_close(y, m(x))


def test_module_bad_arguments_name_use_dora():
    base = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="use_dora"):
        LoRALinear.from_linear(base, r=2, core=True, use_dora=True)
    with pytest.raises(TypeError, match="use_dora"):
        LoRALinear.from_linear(base, r=2, use_dora="yes")
    assert base.weight.requires_grad  # refused before the base was touched
    from pyhappy.nn import QLoRALinear

    with pytest.raises(TypeError, match="use_dora"):
        QLoRALinear.from_linear(torch.nn.Linear(64, 8), "int4", 64, r=2, use_dora="yes")


def test_inject_use_dora():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 16)
    y0 = model(x)
    rep = pyhappy.inject(model, ["0", "2"], r=2, use_dora=True)
    assert all(isinstance(model[i], LoRALinear) and model[i].use_dora for i in (0, 2))
    assert model[0].lora_magnitude_vector.requires_grad and not model[0].weight.requires_grad
    assert rep.trainable_params == sum(2 * 16 + 16 * 2 + 16 for _ in range(1)) + (2 * 16 + 4 * 2 + 4)
    torch.testing.assert_close(model(x), y0)
    with pytest.raises(ValueError, match="use_dora"):
        pyhappy.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"], adapter="tt", use_dora=True)


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_inject_use_dora_on_a_quantized_base(fmt):
    """inject(quantize=..., use_dora=True) makes QDoRA layers: at initialisation (B = 0, magnitude =
    the dequantized weight's row norms) each gives its quantized base's output; the magnitude, A and B
    train, the packed base does not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(5, 64)
    pyhappy.inject(model, ["0"], r=4, quantize=fmt, group_size=64, use_dora=True)
    layer = model[0]
    assert isinstance(layer, pyhappy.nn.QLoRALinear) and layer.use_dora
    assert isinstance(model[2], pyhappy.nn.QuantLinear)  # the other Linear is quantized, without an adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A.weight", "0.lora_B.weight", "0.lora_magnitude_vector"}
    W = layer.dequantize()
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), W.norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), x @ W.t() + layer.bias, rtol=1e-4, atol=1e-5)
    model(x).square().sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0


@NEEDS_CPP
@pytest.mark.parametrize("engine", ["aten", "onednn"])
@pytest.mark.parametrize("M,K,N,r", [(150, 1600, 24, 3), (150, 1280, 400, 4), (300, 640, 100, 2)])
def test_cpp_backward_on_each_gemm_engine(engine, M, K, N, r):
    """The C++ backward's three ways of forming dz W for more rows than one block (dz_split in
    csrc/cpu/dora_linear.cpp): on ATen the first shape takes the reduction split and the others the
    row split; on oneDNN the second takes the row split and the others the column blocks of W."""
    e = pyhappy._ext.load()
    with e.fp32_gemm_scope(engine):
        _check(*_grads(make(M, K, N, r), 0.7, 0.0, None, "cpp"))
