"""pyhappy::moe_lora_linear: the reference against a per-token formula, every backend against the
reference (forward, routing and gradients), opcheck, gradcheck, compile, bad input, the module."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from helpers import HAS_TRITON, has_cpp_op
from hypothesis import given
from hypothesis import strategies as st

import pyhappy
from pyhappy import _tune, backends, reference
from pyhappy.nn import MoLoRALinear, load_molora, save_molora
from pyhappy.ops import moe_lora_linear
from pyhappy.ops.moe_lora_linear import rank_mask

OP = torch.ops.pyhappy.moe_lora_linear
HAS_MOE_CPP = has_cpp_op("moe_lora_linear_cpu")


def _triton_ready():
    if not (HAS_TRITON and backends.triton_interpreting()):
        return False
    try:
        return importlib.util.find_spec("pyhappy.triton_kernels.moe_lora_linear") is not None
    except ImportError:
        return False


BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("cpp", id="cpp",
                 marks=pytest.mark.skipif(not HAS_MOE_CPP, reason="pyhappy._C without moe_lora_linear")),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not _triton_ready(), reason="triton interpreter or pyhappy.triton_kernels unavailable")),
]


def make(M, K, N, E, r, dtype=torch.float32, seed=0, bias=True, router_scale=1.0, lead=None):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    return dict(
        x=t(*(lead or (M,)), K),
        weight=t(N, K, scale=1 / math.sqrt(K)),
        bias=t(N) if bias else None,
        router_weight=t(E, K, scale=router_scale / math.sqrt(K)),
        lora_A=t(E, r, K, scale=1 / math.sqrt(K)),
        lora_B=t(E, N, r, scale=1 / math.sqrt(r)),
    )


def run(backend, a, top_k, normalize=True, s=0.5, p=0.0, seed=None, mask=None, weight=True):
    """(y, logits, experts) and the gradients of <y, dy> + <logits, dl> w.r.t. x, R, A, B."""
    leaves = {k: a[k].detach().clone().requires_grad_() for k in ("x", "router_weight", "lora_A", "lora_B")}
    with backends.force(backend):
        y, logits, experts = moe_lora_linear(leaves["x"], a["weight"] if weight else None, a["bias"],
                                             leaves["router_weight"], leaves["lora_A"], leaves["lora_B"], top_k, s,
                                             normalize, p, seed=seed, rank_mask=mask, return_router=True)
        g = torch.Generator().manual_seed(123)
        dy = torch.randn(y.shape, generator=g).to(y.dtype)
        dl = torch.randn(logits.shape, generator=g).to(logits.dtype)
        grads = torch.autograd.grad((y * dy).sum() + (logits * dl).sum(), list(leaves.values()), allow_unused=True)
    return (y.detach(), logits.detach(), experts), grads


def ref_run(a, top_k, normalize=True, s=0.5, p=0.0, seed=None, mask=None, weight=True):
    """The reference loop, differentiated by autograd (in float64 for tolerances)."""
    a64 = {k: (None if v is None else v.double()) for k, v in a.items()}
    leaves = {k: a64[k].clone().requires_grad_() for k in ("x", "router_weight", "lora_A", "lora_B")}
    A, B = leaves["lora_A"], leaves["lora_B"]
    if mask is not None:
        A, B = A * mask.double()[:, :, None], B * mask.double()[:, None, :]
    y, logits, experts = reference.moe_lora_linear(leaves["x"], a64["weight"] if weight else None, a64["bias"],
                                                   leaves["router_weight"], A, B, top_k, normalize, s, p,
                                                   seed if seed is not None else 0)
    g = torch.Generator().manual_seed(123)
    dy = torch.randn(y.shape, generator=g).double()
    dl = torch.randn(logits.shape, generator=g).double()
    grads = torch.autograd.grad((y * dy).sum() + (logits * dl).sum(), list(leaves.values()), allow_unused=True)
    return (y.detach(), logits.detach(), experts), grads


def check(got, want, dtype, what=""):
    (y, logits, experts), grads = got
    (wy, wl, we), wgrads = want
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    assert torch.equal(experts, we), f"{what}: the backends chose different experts"
    torch.testing.assert_close(y.double(), wy, **tol, msg=lambda m: f"{what} y: {m}")
    torch.testing.assert_close(logits.double(), wl, **tol, msg=lambda m: f"{what} logits: {m}")
    for name, g, w in zip(("x", "router_weight", "lora_A", "lora_B"), grads, wgrads):
        w = torch.zeros(g.shape, dtype=torch.float64) if w is None else w  # unused by an empty batch
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m: f"{what} grad {name}: {m}")


# ------------------------------------------------------------------------------------------------
# the reference itself
# ------------------------------------------------------------------------------------------------


def test_reference_matches_a_per_token_formula():
    a = make(9, 12, 7, 5, 3, torch.float64)
    for k, normalize in ((2, True), (3, False), (5, True)):
        y, logits, experts = reference.moe_lora_linear(a["x"], a["weight"], a["bias"], a["router_weight"],
                                                       a["lora_A"], a["lora_B"], k, normalize, 0.7)
        for t in range(9):
            xt = a["x"][t]
            p = torch.softmax(a["router_weight"] @ xt, 0)
            chosen = sorted(range(5), key=lambda e: (-p[e].item(), e))[:k]
            g = p[chosen] / (p[chosen].sum() if normalize else 1.0)
            want = a["weight"] @ xt + a["bias"]
            for gj, e in zip(g, chosen):
                want = want + 0.7 * gj * (a["lora_B"][e] @ (a["lora_A"][e] @ xt))
            assert experts[t].tolist() == chosen
            torch.testing.assert_close(y[t], want)


def test_load_balancing_and_z_loss():
    logits = torch.zeros(6, 4)  # a uniform router
    experts = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 1], [2, 3]])
    assert reference.moe_load_balancing_loss(logits, experts, 4).item() == pytest.approx(1.0)
    skew = torch.tensor([[5.0, 0, 0, 0]]).repeat(6, 1)
    lb = reference.moe_load_balancing_loss(skew, torch.zeros(6, 1, dtype=torch.long), 4)
    assert lb.item() == pytest.approx(4 * torch.softmax(skew[0], 0)[0].item())
    assert reference.moe_z_loss(logits).item() == pytest.approx(math.log(4) ** 2)


# ------------------------------------------------------------------------------------------------
# every backend against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,E,k,normalize,p", [(1, 4, 2, True, 0.0), (13, 5, 2, True, 0.3), (17, 4, 4, False, 0.0),
                                              (6, 3, 1, True, 0.0), (0, 3, 2, True, 0.0),
                                              # segments long enough for the skinny kernels (rows read in
                                              # place through the token list), with and without dropout
                                              (150, 2, 1, True, 0.2), (160, 3, 2, False, 0.0)])
def test_backend_matches_reference(backend, M, E, k, normalize, p):
    a = make(M, 24, 20, E, 3, seed=M + E)
    seed = torch.tensor([7]) if p else None
    check(run(backend, a, k, normalize, p=p, seed=seed), ref_run(a, k, normalize, p=p, seed=seed), torch.float32,
          f"{backend} M={M}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_adapter_only_heterogeneous_ranks_and_leading_dims(backend):
    a = make(0, 16, 12, 4, 4, seed=3, lead=(3, 5))
    mask = rank_mask([4, 1, 3, 2], 4)
    got = run(backend, a, 2, mask=mask, weight=False)
    check(got, ref_run(a, 2, mask=mask, weight=False), torch.float32, backend)
    _, (gx, gR, gA, gB) = got
    assert gA[1, 1:].abs().max() == 0 and gB[1, :, 1:].abs().max() == 0  # padded ranks get no gradient
    assert gA[1, 0].abs().max() > 0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
def test_float64(backend):
    a = make(11, 10, 9, 4, 2, torch.float64, seed=5)
    check(run(backend, a, 2, p=0.2, seed=torch.tensor([3])), ref_run(a, 2, p=0.2, seed=torch.tensor([3])),
          torch.float64, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_expert_index(backend):
    a = make(5, 8, 6, 4, 2, seed=1)
    a["router_weight"] = a["router_weight"][:1].repeat(4, 1)  # four identical experts in the router
    (_, _, experts), _ = run(backend, a, 2)
    assert experts.tolist() == [[0, 1]] * 5


@pytest.mark.skipif(not HAS_MOE_CPP, reason="pyhappy._C without moe_lora_linear")
def test_torch_candidate_matches_reference():
    a = make(21, 16, 12, 6, 3, seed=9)
    with _tune.forced("torch"):
        got = run("cpp", a, 2, p=0.1, seed=torch.tensor([4]))
    check(got, ref_run(a, 2, p=0.1, seed=torch.tensor([4])), torch.float32, "torch candidate")


@given(M=st.integers(0, 40), E=st.integers(1, 6), data=st.data(), hetero=st.booleans(), skew=st.booleans(),
       normalize=st.booleans())
def test_hypothesis_routing_shapes(M, E, data, hetero, skew, normalize):
    backend = "cpp" if HAS_MOE_CPP else "reference"
    k = data.draw(st.integers(1, E))
    ranks = [data.draw(st.integers(1, 4)) for _ in range(E)] if hetero else [3] * E
    a = make(M, 12, 10, E, max(ranks), seed=M * 7 + E)
    if skew:  # every token to one expert (or k of them): the others get empty segments
        a["x"] = a["x"].abs() + 0.1
        a["router_weight"] = torch.zeros(E, 12)
        a["router_weight"][E - 1] = 1.0
    mask = rank_mask(ranks, max(ranks)) if hetero else None
    got = run(backend, a, k, normalize, mask=mask)
    check(got, ref_run(a, k, normalize, mask=mask), torch.float32, f"M={M} E={E} k={k}")
    if skew and M:
        assert (got[0][2][:, 0] == E - 1).all()


# ------------------------------------------------------------------------------------------------
# opcheck, gradcheck, compile
# ------------------------------------------------------------------------------------------------


def _op_args(requires_grad, dtype=torch.float32, p=0.2, small=False):
    a = make(5, 6, 5, 3, 2, dtype, seed=2) if small else make(7, 10, 8, 4, 3, dtype, seed=2)
    for key in ("x", "router_weight", "lora_A", "lora_B"):
        a[key].requires_grad_(requires_grad)
    return (a["x"], a["weight"], a["bias"], a["router_weight"], a["lora_A"], a["lora_B"], 2, True, 0.5, p,
            torch.tensor([3]))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
def test_opcheck(backend):
    with backends.force(backend):
        torch.library.opcheck(OP, _op_args(True))
        if backend == "cpp":
            torch.library.opcheck(OP, _op_args(False, p=0.0))


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(normalize):
    # Continuous random inputs keep every token's k-th and (k+1)-th probabilities apart, so the
    # top-k choice is locally constant and the function is smooth where gradcheck probes it. (The
    # reference backend's backward is checked against autograd of the reference loop above.)
    backend = "cpp" if HAS_MOE_CPP else "reference"
    args = _op_args(True, torch.float64, small=True)

    def fn(x, R, A, B):
        y, logits = OP(x, args[1], args[2], R, A, B, 2, normalize, 0.5, 0.3, args[10])[:2]
        return y, logits

    with backends.force(backend):
        assert torch.autograd.gradcheck(fn, (args[0], args[3], args[4], args[5]))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
def test_compile_fullgraph_forward_backward_one_frame(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    a = make(8, 16, 12, 4, 3, seed=4)
    params = [a[k].requires_grad_() for k in ("router_weight", "lora_A", "lora_B")]
    x = a["x"].requires_grad_()
    seed = torch.tensor([11])

    def f(x, R, A, B):
        y, logits, experts = moe_lora_linear(x, a["weight"], a["bias"], R, A, B, 2, 0.5, dropout_p=0.25, seed=seed,
                                             return_router=True)
        return (y * y).sum() + reference.moe_load_balancing_loss(logits, experts, 4)

    # aot_eager: the op is traced by AOTAutograd as under Inductor (its fake, its backward op), at a
    # fraction of the compile time (tests/test_compiler.py covers Inductor's code generation).
    cnt = CompileCounterWithBackend("aot_eager")
    with backends.force(backend):
        loss = torch.compile(f, backend=cnt, fullgraph=True)(x, *params)
        grads = torch.autograd.grad(loss, [x, *params])
        want_loss = f(x, *params)
        want = torch.autograd.grad(want_loss, [x, *params])
    assert cnt.frame_count == 1
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def _bad(**kw):
    a = make(4, 8, 6, 3, 2)
    args = dict(x=a["x"], weight=a["weight"], bias=a["bias"], router_weight=a["router_weight"], lora_A=a["lora_A"],
                lora_B=a["lora_B"], top_k=2, scaling=1.0)
    args.update(kw)
    return args


@pytest.mark.parametrize("kw,exc,match", [
    (dict(router_weight=torch.randn(3, 5)), ValueError, "router_weight must be"),
    (dict(lora_A=torch.randn(2, 2, 8)), ValueError, "lora_A must be"),
    (dict(lora_A=torch.randn(3, 2, 8, 1)), ValueError, "lora_A must be 3-D"),
    (dict(lora_B=torch.randn(3, 6, 3)), ValueError, "lora_B must be"),
    (dict(weight=torch.randn(6, 7)), ValueError, "weight must have shape"),
    (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=4), ValueError, "top_k"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
    (dict(lora_B=torch.randn(3, 6, 2, dtype=torch.float64)), TypeError, "lora_B has dtype"),
    (dict(rank_mask=torch.ones(3, 3)), ValueError, "rank_mask must be"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
])
def test_bad_input_names_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        moe_lora_linear(**_bad(**kw))
    with pytest.raises(exc, match=match):  # through autograd too
        args = _bad(**kw)
        args["x"] = args["x"].requires_grad_()
        moe_lora_linear(**args)


# ------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------


def test_module_fresh_layer_is_the_base_and_trains_router_and_experts():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 12)
    m = MoLoRALinear.from_linear(lin, num_experts=4, top_k=2, r=3, alpha=6)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(m(x), lin(x))
    assert m.lora_A.shape == (4, 3, 16) and m.lora_B.shape == (4, 12, 3) and m.router.weight.shape == (4, 16)
    assert m.weight is lin.weight and not m.weight.requires_grad
    m.reset_lora_parameters("none")
    y = m(x)
    (y.square().mean() + 0.01 * m.last_aux_loss).backward()
    for p in (m.router.weight, m.lora_A, m.lora_B):
        assert p.grad is not None and p.grad.abs().max() > 0
    # the aux loss is the reference's, on this forward's routing, and reaches the router
    R = m.router.weight.detach().requires_grad_()
    logits = (x.reshape(-1, 16) @ R.t()).float()
    _, _, experts = reference.moe_route(x.reshape(-1, 16), R, 2, True)
    want = reference.moe_load_balancing_loss(logits, experts, 4)
    torch.testing.assert_close(m.last_aux_loss, want)


def test_module_z_loss_and_heterogeneous_ranks():
    m = MoLoRALinear.from_linear(torch.nn.Linear(8, 6), num_experts=3, top_k=3, r=[1, 3, 2], alpha=3, z_loss=True)
    m.reset_lora_parameters("none")
    assert m.lora_A[0, 1:].abs().max() == 0 and m.lora_B[2, :, 2:].abs().max() == 0
    x = torch.randn(4, 8)
    y = m(x)
    (y.sum() + m.last_z_loss).backward()
    assert m.lora_A.grad[0, 1:].abs().max() == 0 and m.lora_B.grad[2, :, 2:].abs().max() == 0
    assert m.last_z_loss.item() > 0


def test_module_merge_refuses_and_unload_gives_the_linear_back():
    lin = torch.nn.Linear(8, 6)
    m = MoLoRALinear.from_linear(lin, num_experts=2, top_k=1, r=2)
    with pytest.raises(RuntimeError, match="cannot be merged"):
        m.merge()
    back = m.unload()
    assert type(back) is torch.nn.Linear and back.weight is lin.weight and back.bias is lin.bias


@pytest.mark.parametrize("kw,match", [(dict(num_experts=0), "num_experts"), (dict(top_k=3, num_experts=2), "top_k"),
                                      (dict(r=[1, 2, 3], num_experts=2), r"\br\b"), (dict(dropout=1.0), "dropout")])
def test_module_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MoLoRALinear.from_linear(torch.nn.Linear(4, 4), **kw)


def test_module_save_load_roundtrip_and_refusal(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    pyhappy.inject(model, ["0", "1"], adapter="molora", num_experts=3, top_k=2, r=2)
    for m in model:
        m.reset_lora_parameters("none")
    path = tmp_path / "experts.safetensors"
    assert save_molora(path, model) == 2
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    fresh.load_state_dict(model.state_dict(), strict=False)
    pyhappy.inject(fresh, ["0", "1"], adapter="molora", num_experts=3, top_k=2, r=2)
    assert load_molora(path, fresh) == 2
    for a, b in zip(model, fresh):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
        assert torch.equal(a.router.weight, b.router.weight)
    other = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    pyhappy.inject(other, ["0", "1"], adapter="molora", num_experts=3, top_k=1, r=2)
    before = other[0].lora_A.detach().clone()
    with pytest.raises(ValueError, match="top_k"):
        load_molora(path, other)
    assert torch.equal(other[0].lora_A, before)


def test_module_quantized_base():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    m = MoLoRALinear.from_linear(lin, num_experts=3, top_k=2, r=2, quantize="int4", group_size=32)
    m.reset_lora_parameters("none")
    assert m.weight is None and m.base is not None
    x = torch.randn(5, 64)
    want = m.base(x) + reference.moe_lora_linear(x, None, None, m.router.weight, m.lora_A, m.lora_B, 2, True,
                                                 m.scaling)[0]
    y = m(x)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert m.lora_A.grad is not None and m.router.weight.grad is not None
    assert isinstance(m.unload(), pyhappy.nn.QuantLinear)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_inject_molora(quantize):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    rep = pyhappy.inject(model, ["0"], adapter="molora", num_experts=4, top_k=2, r=4, quantize=quantize,
                         quantize_skip=())
    assert rep.replaced == ["0"] and isinstance(model[0], MoLoRALinear)
    assert model[0].num_experts == 4 and model[0].top_k == 2 and model[0].scaling == 2.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.router.weight", "0.lora_A", "0.lora_B"}
    assert (quantize is None) == (model[0].base is None)
    model(torch.randn(3, 64)).sum().backward()
    # pyhappy.merge / unload(merge=True) refuse before changing anything (the router is per token);
    # pyhappy.unload drops the experts and gives back the base layer
    before = model[0]
    for call in (lambda: pyhappy.merge(model), lambda: pyhappy.unload(model, merge=True)):
        with pytest.raises(ValueError, match="0 is a MoLoRALinear"):
            call()
        assert model[0] is before
    base_type = torch.nn.Linear if quantize is None else pyhappy.nn.QuantLinear
    pyhappy.unload(model)
    assert type(model[0]) is base_type and not any(isinstance(m, MoLoRALinear) for m in model.modules())


@pytest.mark.skipif(not HAS_MOE_CPP, reason="pyhappy._C without moe_lora_linear")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_half_precision(dtype):
    a = {k: (None if v is None else v.to(dtype)) for k, v in make(40, 64, 48, 4, 8, seed=6, router_scale=4.0).items()}
    with backends.force("cpp"):
        y, _, experts = moe_lora_linear(a["x"], a["weight"], a["bias"], a["router_weight"], a["lora_A"], a["lora_B"],
                                        2, 0.5, return_router=True)
    want, _, want_experts = reference.moe_lora_linear(a["x"], a["weight"], a["bias"], a["router_weight"],
                                                      a["lora_A"], a["lora_B"], 2, True, 0.5)
    assert y.dtype == dtype and torch.equal(experts, want_experts)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), want.float(), atol=16 * eps * want.float().abs().max().item(), rtol=8 * eps)


def test_module_compiles_fullgraph_with_its_aux_loss():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = MoLoRALinear.from_linear(torch.nn.Linear(16, 8), num_experts=3, top_k=2, r=2)
    m.reset_lora_parameters("none")
    x = torch.randn(5, 16)
    cnt = CompileCounterWithBackend("aot_eager")
    y = torch.compile(m, backend=cnt, fullgraph=True)(x)
    (y.sum() + m.last_aux_loss).backward()
    assert cnt.frame_count == 1
    torch.testing.assert_close(y, m(x))
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().max() > 0


def test_a_layer_copies_and_pickles_after_a_training_forward():
    """last_aux_loss / last_z_loss hold the last forward's graph: deepcopy (EMA copies, a "best model")
    and pickle leave them out of the copy and keep the original's."""
    import copy
    import pickle

    torch.manual_seed(0)
    m = MoLoRALinear.from_linear(torch.nn.Linear(32, 24), num_experts=4, top_k=2, r=4, z_loss=True)
    m.train()
    x = torch.randn(6, 32)
    m(x).sum().backward()
    assert m.last_aux_loss.requires_grad and m.last_z_loss is not None
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), copy.deepcopy(torch.nn.Sequential(m))[0]):
        assert c.last_aux_loss is None and c.last_z_loss is None
        c.eval(), m.eval()
        torch.testing.assert_close(c(x), m(x))
        m.train()
    assert m.last_aux_loss is not None
