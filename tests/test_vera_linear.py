"""pyhappy::vera_linear / pvera_linear: backends against the reference (PEFT's formulation), autograd,
opcheck, gradcheck, compile, bad input, the noise, the modules (VeRALinear, PVeRALinear), inject and
PEFT parity (VeraConfig, PveraConfig)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import HAS_CPP, cpu_backends, has_cpp_op
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyhappy
from pyhappy import backends, reference
from pyhappy.nn import PVeRALinear, VeRALinear, VeRAProjections
from pyhappy.ops import pvera_linear, vera_linear

NEEDS_CPP = pytest.mark.skipif(not HAS_CPP, reason="extension not built")


def make(M, K, N, r, dtype=torch.float32, bias=True, seed=0, pvera=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    rows = 2 * r if pvera else r
    return dict(x=t(M, K), weight=t(N, K, scale=K ** -0.5), bias=t(N) if bias else None, A=t(rows, K, scale=K ** -0.5),
                B=t(N, r, scale=r ** -0.5), lambda_d=t(rows, scale=0.5), lambda_b=t(N))


LEAVES = ("x", "bias", "lambda_d", "lambda_b", "A", "B")


def _run(fn, a, backend, **kw):
    leaves = {k: a[k].clone().requires_grad_() for k in LEAVES if a[k] is not None}
    args = [leaves.get(k, a[k]) for k in ("x", "weight", "bias", "A", "B", "lambda_d", "lambda_b")]
    if backend is None:
        y = fn(*args, **kw)
    else:
        with backends.force(backend):
            y = fn(*args, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    return y, dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))


def _close(got, want, name, rtol=2e-5):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


def _ref_vera(x, W, b, A, B, ld, lb, p=0.0, seed=None):
    return reference.vera_linear(x, W, b, A, B, ld, lb, p, 0 if seed is None else seed)


def _ref_pvera(x, W, b, A, B, ld, lb, p=0.0, *, sample=False, seed=None, noise_seed=None):
    return reference.pvera_linear(x, W, b, A, B, ld, lb, p, 0 if seed is None else seed, sample,
                                  0 if noise_seed is None else noise_seed)


CASES = [  # (pvera, sample, dropout_p)
    (False, False, 0.0), (False, False, 0.25), (True, False, 0.0), (True, True, 0.0), (True, True, 0.25),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("pvera,sample,p", CASES)
def test_backends_match_reference(backend, pvera, sample, p):
    a = make(13, 40, 24, 6, pvera=pvera)
    kw = {"seed": torch.tensor([5])} if p else {}
    if pvera:
        kw.update(sample=sample, noise_seed=torch.tensor([9]))
        fn, ref = pvera_linear, _ref_pvera
    else:
        fn, ref = vera_linear, _ref_vera
    y, g = _run(lambda *t, **k: fn(*t, p, **k), a, backend, **kw)
    yr, gr = _run(lambda *t, **k: ref(*t, p, **k), a, None, **kw)
    _close(y, yr, "y")
    for k in g:
        _close(g[k], gr[k], k)


@pytest.mark.parametrize("pvera,sample,p", CASES)
def test_gradcheck_float64(pvera, sample, p):
    a = make(5, 7, 6, 3, torch.float64, pvera=pvera)
    ins = [a[k].clone().requires_grad_() if k in LEAVES else a[k]
           for k in ("x", "weight", "bias", "A", "B", "lambda_d", "lambda_b")]
    ins[1].requires_grad_()  # the base weight's (exact) gradient too
    seed, ns = torch.tensor([3]), torch.tensor([4])
    if pvera:
        f = lambda *t: pvera_linear(*t, p, sample=sample, seed=seed, noise_seed=ns)  # noqa: E731
    else:
        f = lambda *t: vera_linear(*t, p, seed=seed)  # noqa: E731
    assert torch.autograd.gradcheck(f, ins)


@settings(max_examples=12, deadline=None)
@given(M=st.sampled_from([0, 1, 3, 17]), K=st.integers(1, 33), N=st.integers(1, 21), r=st.integers(1, 9),
       bias=st.booleans(), pvera=st.booleans(), sample=st.booleans())
def test_shapes_hypothesis(M, K, N, r, bias, pvera, sample):
    a = make(M, K, N, r, bias=bias, pvera=pvera)
    if pvera:
        kw = dict(sample=sample, noise_seed=torch.tensor([2]))
        y, g = _run(lambda *t, **k: pvera_linear(*t, **k), a, None, **kw)
        yr, gr = _run(lambda *t, **k: _ref_pvera(*t, **k), a, None, **kw)
    else:
        y, g = _run(vera_linear, a, None)
        yr, gr = _run(_ref_vera, a, None)
    assert y.shape == (M, N)
    _close(y, yr, "y")
    for k in g:
        _close(g[k], gr[k], k)


def test_leading_dims_and_inference_path():
    a = make(6, 8, 5, 2)
    x = a["x"].reshape(2, 3, 8)
    with torch.no_grad():
        y = vera_linear(x, a["weight"], a["bias"], a["A"], a["B"], a["lambda_d"], a["lambda_b"])
    yr = _ref_vera(a["x"], a["weight"], a["bias"], a["A"], a["B"], a["lambda_d"], a["lambda_b"])
    assert y.shape == (2, 3, 5)
    _close(y.reshape(6, 5), yr, "y")


def test_opcheck():
    a = make(4, 8, 6, 2, pvera=True)
    args = (a["x"], a["weight"], a["bias"], a["A"][:2], a["B"], a["lambda_d"][:2], a["lambda_b"])
    torch.library.opcheck(torch.ops.pyhappy.vera_linear, (*args, 0.0, None))
    pargs = (a["x"], a["weight"], a["bias"], a["A"], a["B"], a["lambda_d"], a["lambda_b"])
    torch.library.opcheck(torch.ops.pyhappy.pvera_linear, (*pargs, 0.0, True, None, torch.tensor([1])))
    torch.library.opcheck(torch.ops.pyhappy.pvera_linear, (*pargs, 0.0, False, None, None))
    # save_z: the adapter's output before λ_b comes back as the third output (λ_b's gradient reads it)
    torch.library.opcheck(torch.ops.pyhappy.vera_linear, (*args, 0.25, torch.tensor([3]), True))
    torch.library.opcheck(torch.ops.pyhappy.pvera_linear, (*pargs, 0.0, True, None, torch.tensor([1]), True))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("pvera,sample", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("save_z", [False, True])
def test_lambda_b_gradient_with_and_without_the_saved_output(backend, pvera, sample, save_z):
    """The op called directly, with or without z saved: λ_b's gradient from Σ dy ⊙ z, or from dyᵀ v
    when z is absent; y and every gradient agree with the reference either way."""
    a = make(11, 24, 20, 5, pvera=pvera)
    leaves = {k: a[k].clone().requires_grad_() for k in LEAVES if a[k] is not None}
    args = [leaves.get(k, a[k]) for k in ("x", "weight", "bias", "A", "B", "lambda_d", "lambda_b")]
    seed, ns = torch.tensor([6]), torch.tensor([2])
    with backends.force(backend):
        if pvera:
            out = torch.ops.pyhappy.pvera_linear(*args, 0.25, sample, seed, ns, save_z)
        else:
            out = torch.ops.pyhappy.vera_linear(*args, 0.25, seed, save_z)
    y, z = out[0], out[2]
    assert z.numel() == 0 or (save_z and z.shape == y.shape)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    g = torch.autograd.grad(y, list(leaves.values()), dy)
    leaves_r = {k: a[k].clone().requires_grad_() for k in LEAVES if a[k] is not None}
    args_r = [leaves_r.get(k, a[k]) for k in ("x", "weight", "bias", "A", "B", "lambda_d", "lambda_b")]
    if pvera:
        yr = _ref_pvera(*args_r, 0.25, sample=sample, seed=seed, noise_seed=ns)
    else:
        yr = _ref_vera(*args_r, 0.25, seed=seed)
    gr = torch.autograd.grad(yr, list(leaves_r.values()), dy)
    _close(y, yr, "y")
    for k, got, want in zip(leaves, g, gr):
        _close(got, want, k)


def test_compile_fullgraph():
    torch._dynamo.reset()
    a = make(8, 16, 12, 4, pvera=True)
    ld = a["lambda_d"].clone().requires_grad_()
    lb = a["lambda_b"].clone().requires_grad_()
    ns = torch.tensor([6])

    def f(x):
        y1 = vera_linear(x, a["weight"], a["bias"], a["A"][:4], a["B"], ld[:4], lb)
        y2 = pvera_linear(x, a["weight"], a["bias"], a["A"], a["B"], ld, lb, sample=True, noise_seed=ns)
        return y1 + y2

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = cf(a["x"])
    ye = f(a["x"])
    _close(y, ye, "y")
    g = torch.autograd.grad(y.sum(), [ld, lb])
    ge = torch.autograd.grad(ye.sum(), [ld, lb])
    for u, v in zip(g, ge):
        _close(u, v, "grad")


def test_bad_input_names_the_argument():
    a = make(4, 8, 6, 2)
    args = [a["x"], a["weight"], a["bias"], a["A"], a["B"], a["lambda_d"], a["lambda_b"]]
    for i, name in ((3, "vera_A"), (4, "vera_B"), (5, "lambda_d"), (6, "lambda_b")):
        bad = list(args)
        bad[i] = bad[i][..., :1] if i in (3, 4) else bad[i][:1]
        with pytest.raises(ValueError, match=name):
            vera_linear(*bad)
    with pytest.raises(ValueError, match="pvera_A"):  # 2r rows: an odd count is refused
        pvera_linear(a["x"], a["weight"], a["bias"], a["A"][:1], a["B"][:, :1], a["lambda_d"][:1], a["lambda_b"])
    with pytest.raises(TypeError, match="sample"):
        pvera_linear(*args, sample=1)
    with pytest.raises(ValueError, match="r must be"):
        VeRALinear.from_linear(nn.Linear(4, 4), r=0)
    small = VeRAProjections(2, 4, 4)
    with pytest.raises(ValueError, match="projections"):
        VeRALinear.from_linear(nn.Linear(8, 4), r=2, projections=small)


# ---- noise ---------------------------------------------------------------------------------------


def test_noise_is_standard_normal_and_reproducible():
    e = reference.gaussian_noise(torch.tensor([11]), 2048, 33)
    assert torch.equal(e, reference.gaussian_noise(11, 2048, 33))
    assert abs(e.mean().item()) < 0.01 and abs(e.std().item() - 1) < 0.01
    assert abs((e[:, 0:32:2] * e[:, 1:32:2]).mean().item()) < 0.01  # the cos / sin pair is uncorrelated
    assert not torch.equal(e, reference.gaussian_noise(12, 2048, 33))


@pytest.mark.skipif(not has_cpp_op("gaussian_noise_cpu"), reason="pyhappy._C without gaussian_noise_cpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_noise_cpp_matches_reference(dtype):
    s = torch.tensor([123456789012])
    got = torch.ops.pyhappy.gaussian_noise_cpu(s, 37, 31, dtype)
    want = reference.gaussian_noise(s, 37, 31, dtype)
    tol = 0 if dtype != torch.float64 else 1e-15
    assert (got.double() - want.double()).abs().max().item() <= tol * 10


def test_pvera_step_is_reproducible():
    lin = nn.Linear(16, 12)
    m = PVeRALinear.from_linear(lin, r=4, dropout=0.1)
    with torch.no_grad():
        m.pvera_lambda_b.normal_()
    x = torch.randn(5, 16)
    out = []
    for _ in range(2):
        torch.manual_seed(42)
        y = m(x)
        (g,) = torch.autograd.grad(y.square().sum(), [m.pvera_lambda_d])
        out.append((y.detach(), g))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    torch.manual_seed(43)
    assert not torch.equal(m(x), out[0][0])
    m.eval()  # μ only: deterministic without a seed
    assert torch.equal(m(x), m(x))


# ---- modules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [VeRALinear, PVeRALinear])
def test_module_init_merge_unmerge_unload(cls):
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    w0 = lin.weight.detach().clone()
    m = cls.from_linear(lin, r=6)
    x = torch.randn(7, 24)
    assert torch.equal(m(x), lin(x))  # λ_b = 0 at init: the base output
    assert (m.lambda_d == 0.1).all() and m.lambda_b.abs().sum() == 0
    with torch.no_grad():
        m.lambda_b.normal_()
        m.lambda_d.normal_()
    m.eval()
    y = m(x)
    m.merge()
    _close(m(x), y, "merged", rtol=1e-5)
    m.unmerge()
    _close(m.weight, w0, "unmerged", rtol=1e-6)
    m.merge()
    base = m.unload()
    assert isinstance(base, nn.Linear) and not m.merged
    _close(base.weight, w0, "unloaded", rtol=1e-6)
    assert base.weight.data_ptr() == lin.weight.data_ptr()


def test_module_state_dict_and_trainable():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    rep = pyhappy.inject(model, ["0", "2"], adapter="vera", r=4)
    assert len(rep) == 2
    assert model[0].projections is model[2].projections
    assert model[0].projections.A.shape == (4, 32) and model[0].projections.B.shape == (32, 4)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"0.vera_lambda_b", "0.vera_lambda_d", "2.vera_lambda_b", "2.vera_lambda_d"}
    sd = model.state_dict()
    assert sd["0.projections.vera_A"].data_ptr() == sd["2.projections.vera_A"].data_ptr()  # stored once
    model2 = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    pyhappy.inject(model2, ["0", "2"], adapter="vera", r=4)
    model2.load_state_dict(sd)
    x = torch.randn(3, 16)
    assert torch.equal(model(x), model2(x))
    with pytest.raises(NotImplementedError):
        pyhappy.inject(nn.Sequential(nn.Linear(128, 128)), ["0"], adapter="pvera", r=2, quantize="nf4")


# ---- PEFT parity ---------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 24), nn.Linear(24, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _pair(kind, r=8, key=3, **cfg_kw):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Net()
    ours = copy.deepcopy(base)
    if kind == "vera":
        cfg = peft.VeraConfig(r=r, target_modules=["a", "b"], projection_prng_key=key, **cfg_kw)
    else:
        from peft.tuners.pvera import PveraConfig

        cfg = PveraConfig(r=r, target_modules=["a", "b"], projection_prng_key=key, **cfg_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    pyhappy.inject(ours, ["a", "b"], adapter=kind, r=r, projection_prng_key=key)
    store = pm.base_model
    assert torch.equal(getattr(store, f"{kind}_A")["default"], ours.a.projections.A)  # bit for bit
    assert torch.equal(getattr(store, f"{kind}_B")["default"], ours.a.projections.B)
    g = torch.Generator().manual_seed(1)
    for n in ("a", "b"):
        pl, ol = pm.base_model.model.get_submodule(n), ours.get_submodule(n)
        assert torch.equal(getattr(pl, f"{kind}_lambda_d")["default"], ol.lambda_d)  # same init
        with torch.no_grad():
            ol.lambda_d.copy_(torch.randn(ol.lambda_d.shape, generator=g) * 0.5)
            ol.lambda_b.copy_(torch.randn(ol.lambda_b.shape, generator=g))
            getattr(pl, f"{kind}_lambda_d")["default"].copy_(ol.lambda_d)
            getattr(pl, f"{kind}_lambda_b")["default"].copy_(ol.lambda_b)
    return pm, ours


@pytest.mark.parametrize("kind", ["vera", "pvera"])
def test_peft_parity_logits_and_grads(kind):
    pm, ours = _pair(kind)
    pm.eval()
    ours.eval()
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    yp, yo = pm(x), ours(x)
    _close(yo, yp, "logits", rtol=1e-4)
    gp = torch.autograd.grad(yp.square().sum(), [x] + [getattr(pm.base_model.model.get_submodule(n),
                                                               f"{kind}_lambda_{w}")["default"]
                                                       for n in ("a", "b") for w in ("d", "b")])
    go = torch.autograd.grad(yo.square().sum(), [x] + [getattr(ours.get_submodule(n), f"{kind}_lambda_{w}")
                                                       for n in ("a", "b") for w in ("d", "b")])
    for u, v in zip(go, gp):
        _close(u, v, "grad", rtol=1e-4)


def test_peft_parity_pvera_train_distribution():
    """Training samples h = μ + ε σ: PEFT's ε is torch.randn, pyhappy's the hash Gaussian. Over many
    seeds the sampled output's mean and variance agree (the same distribution)."""
    pm, ours = _pair("pvera", r=4)
    pm.train()
    ours.train()
    pl, ol = pm.base_model.model.a, ours.a
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    n = 400
    with torch.no_grad():
        torch.manual_seed(0)
        yp = torch.stack([pl(x) for _ in range(n)])
        yo = torch.stack([ol(x) for _ in range(n)])
    mp, mo, vp, vo = yp.mean(0), yo.mean(0), yp.var(0), yo.var(0)
    se = (vp / n).sqrt()
    assert ((mp - mo).abs() <= 5 * se + 1e-5).all()
    assert ((vp - vo).abs() <= 0.35 * vp + 1e-6).all()
    assert vo.mean() > 0  # it does sample


def test_pvera_sample_at_inference():
    m = PVeRALinear.from_linear(nn.Linear(8, 6), r=3, sample_at_inference=True).eval()
    with torch.no_grad():
        m.pvera_lambda_b.normal_()
    x = torch.randn(2, 8)
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.equal(a, m(x))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("pvera", [False, True])
@pytest.mark.parametrize("M,p", [(3, 0.0), (150, 0.3)])
def test_no_output_features(backend, pvera, M, p):
    x = torch.randn(M, 40, requires_grad=True)
    r = 6
    A, B = torch.randn(2 * r if pvera else r, 40), torch.randn(0, r)
    d, b = torch.randn(A.shape[0], requires_grad=True), torch.randn(0, requires_grad=True)
    kw = {"seed": torch.tensor([5])} if p else {}
    if pvera:
        kw.update(sample=True, noise_seed=torch.tensor([9]))
    with backends.force(backend):
        y = (pvera_linear if pvera else vera_linear)(x, torch.randn(0, 40), torch.randn(0), A, B, d, b, p, **kw)
        assert y.shape == (M, 0)
        y.sum().backward()
    assert x.grad.abs().sum() == 0 and d.grad.abs().sum() == 0 and b.grad.shape == (0,)
