"""pyhappy::lora_linear_multi (one batch, many adapters) and MultiLoRALinear / adapter_batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import pyhappy
from pyhappy import backends
from pyhappy.nn import LoRALinear, MultiLoRALinear
from pyhappy.ops import lora_linear_multi, stack_adapters

import helpers
from helpers import assert_close_to_oracle

OP = torch.ops.pyhappy.lora_linear_multi


def case(M, K, N, ranks, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    pairs = [((torch.randn(r, K, generator=g) / K**0.5).to(dtype), (torch.randn(N, r, generator=g) / r**0.5).to(dtype))
             for r in ranks]
    A, B = stack_adapters(pairs)
    s = torch.rand(len(ranks), generator=g) + 0.5
    idx = torch.randint(-1, len(ranks), (M,), generator=g)
    return x, W, b, pairs, A, B, s, idx


def loop_oracle(pairs, s, idx):
    """Per row, the plain LoRA formula with that row's adapter (the definition, no stacking)."""
    def f(x, W, b):
        y = x @ W.t()
        if b is not None:
            y = y + b
        rows = []
        for m in range(x.shape[0]):
            a = int(idx[m])
            d = torch.zeros_like(y[m])
            if a >= 0:
                A, B = pairs[a]
                d = (x[m] @ A.to(x.dtype).t()) @ B.to(x.dtype).t() * s[a].to(x.dtype)
            rows.append(d)
        return y + torch.stack(rows) if rows else y
    return f


@pytest.mark.parametrize("backend", helpers.cpu_backends("lora_linear_multi_cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_per_row_lora(backend, dtype, bias):
    x, W, b, pairs, A, B, s, idx = case(23, 48, 40, (2, 7, 4), dtype, bias=bias)
    with backends.force(backend), torch.no_grad():
        y = lora_linear_multi(x, W, b, A, B, s, idx)
    assert y.dtype == dtype
    assert_close_to_oracle(y, loop_oracle(pairs, s, idx), (x, W, b), name="y")


@pytest.mark.parametrize("backend", helpers.cpu_backends("lora_linear_multi_cpu"))
def test_decode_all_rows_distinct_and_all_none(backend):
    x, W, b, pairs, A, B, s, _ = case(4, 32, 24, (3, 3, 3, 3))
    with backends.force(backend), torch.no_grad():
        y = lora_linear_multi(x, W, b, A, B, s, torch.arange(4))
        y0 = lora_linear_multi(x, W, b, A, B, s, torch.full((4,), -1))
    torch.testing.assert_close(y, loop_oracle(pairs, s, torch.arange(4))(x, W, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y0, F.linear(x, W, b), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not helpers.has_cpp_op("lora_linear_multi_cpu"), reason="pyhappy._C without lora_linear_multi")
@given(M=st.integers(0, 30), L=st.integers(1, 5), seed=st.integers(0, 1000))
def test_cpp_random_batches(M, L, seed):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, 6, (L,), generator=g).tolist()
    x, W, b, pairs, A, B, s, idx = case(M, 16, 12, ranks, seed=seed)
    with torch.no_grad():
        y = lora_linear_multi(x, W, b, A, B, s, idx)
    torch.testing.assert_close(y, loop_oracle(pairs, s, idx)(x, W, b), atol=1e-5, rtol=1e-5)


def test_errors_name_the_argument():
    x, W, b, pairs, A, B, s, idx = case(5, 16, 8, (2, 3))
    with torch.no_grad():
        with pytest.raises(ValueError, match="adapter_index"):
            lora_linear_multi(x, W, b, A, B, s, torch.tensor([0, 1, 2, 0, 0]))
        with pytest.raises(ValueError, match="adapter_index"):
            lora_linear_multi(x, W, b, A, B, s, idx[:-1])
        with pytest.raises(ValueError, match="scalings"):
            lora_linear_multi(x, W, b, A, B, s.double(), idx)
        with pytest.raises(ValueError, match="lora_B"):
            lora_linear_multi(x, W, b, A, B[:, :-1], s, idx)
    with pytest.raises(RuntimeError, match="inference-only"):
        lora_linear_multi(x.requires_grad_(), W, b, A, B, s, idx)


@pytest.mark.parametrize("backend", helpers.cpu_backends("lora_linear_multi_cpu")[:2])
def test_opcheck(backend):
    x, W, b, pairs, A, B, s, idx = case(7, 16, 8, (2, 3))
    with backends.force(backend):
        torch.library.opcheck(OP, (x, W, b, A, B, s, idx), test_utils=("test_schema", "test_faketensor"))


def test_module_runtime_switching_and_mixed_batch():
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    m = MultiLoRALinear.from_linear(lin)
    m.add_adapter("fr", r=4, alpha=8, init="none")
    m.add_adapter("de", r=2, alpha=2, rslora=True, init="none")
    x = torch.randn(3, 5, 32)

    def one(name):
        p = m.adapters[name]
        return F.linear(x, lin.weight, lin.bias) + p.lora_B(p.lora_A(x)) * p.scaling * p.weight

    with torch.no_grad():
        torch.testing.assert_close(m(x), one("fr") + one("de") - F.linear(x, lin.weight, lin.bias), atol=1e-5,
                                   rtol=1e-5)
        m.set_adapter("de", active=False)
        torch.testing.assert_close(m(x), one("fr"), atol=1e-5, rtol=1e-5)
        m.set_adapter("fr", weight=0.5)
        torch.testing.assert_close(m(x), one("fr"), atol=1e-5, rtol=1e-5)
        model = nn.Sequential(m)
        with pyhappy.adapter_batch(model, ["de", None, "fr"]):
            y = model(x)
        torch.testing.assert_close(y[0], one("de")[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[1], lin(x[1]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[2], one("fr")[2], atol=1e-5, rtol=1e-5)
        with pytest.raises(KeyError, match="it"):
            with pyhappy.adapter_batch(model, ["it", None, None]):
                model(x)
    m.delete_adapter("de")
    assert list(m.adapters) == ["fr"]
    # training the active adapter runs the fused op with autograd
    m.set_adapter("fr", weight=1.0)
    m(x).sum().backward()
    assert m.adapters["fr"].lora_A.weight.grad is not None and lin.weight.grad is None


def test_mixed_batch_while_autograd_records_gives_every_gradient():
    """adapter_batch in grad mode: the same outputs as under no_grad, and gradients for x (so for the
    layers before), for the adapters named in the batch and none for the frozen base; an empty batch
    and a bad adapter weight are handled."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    m = MultiLoRALinear.from_linear(lin)
    m.add_adapter("fr", r=4, init="none")
    m.add_adapter("de", r=2, alpha=4, init="none")
    m.add_adapter("it", r=2, init="none")
    model = nn.Sequential(nn.Linear(16, 16), m)
    x = torch.randn(4, 3, 16)
    names = ["de", None, "fr", "de"]
    with pyhappy.adapter_batch(model, names):
        with torch.no_grad():
            want = model(x)
        y = model(x)
    assert y.requires_grad
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    h = model[0](x).detach().requires_grad_(True)
    ref = F.linear(h, lin.weight, lin.bias)
    for i, n in enumerate(names):
        if n is not None:
            p = m.adapters[n]
            ref = ref.index_add(0, torch.tensor([i]), p.lora_B(p.lora_A(h[i:i + 1])) * p.scaling)
    gA = torch.autograd.grad((ref * g).sum(), [h, m.adapters["fr"].lora_A.weight, m.adapters["de"].lora_B.weight])
    torch.testing.assert_close(m.adapters["fr"].lora_A.weight.grad, gA[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.adapters["de"].lora_B.weight.grad, gA[2], atol=1e-5, rtol=1e-5)
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert m.adapters["it"].lora_A.weight.grad is None and lin.weight.grad is None
    with torch.no_grad(), pyhappy.adapter_batch(model, []):
        assert model(torch.randn(0, 16)).shape == (0, 8)
    with pyhappy.adapter_batch(model, []):
        assert model(torch.randn(0, 16)).shape == (0, 8)
    with pytest.raises(ValueError, match="weight"):
        m.set_adapter("fr", weight=float("nan"))


def test_from_lora_keeps_the_output():
    layer = LoRALinear.from_linear(nn.Linear(16, 8), r=4, alpha=8, init="none")
    x = torch.randn(3, 16)
    m = MultiLoRALinear.from_lora(layer, "task")
    torch.testing.assert_close(m(x), layer(x), atol=1e-6, rtol=1e-6)


def test_model_level_named_adapters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    base = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    x = torch.randn(4, 32)
    y0 = model(x)
    rep = pyhappy.inject(model, ["0", "2"], adapter="multi_lora", r=4, init="none")
    assert len(rep) == 2 and all(isinstance(model[i], MultiLoRALinear) for i in (0, 2))
    assert pyhappy.add_adapter(model, "task", r=2, init="none") == 2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n in trainable) and len(trainable) == 8
    pyhappy.set_adapter(model, "task", only=True)
    assert [m.adapters["default"].active for m in (model[0], model[2])] == [False, False]
    y_task = model(x)
    pyhappy.set_adapter(model, "task", active=False)
    torch.testing.assert_close(model(x), y0)  # nothing active: the base model
    with torch.no_grad(), pyhappy.adapter_batch(model, ["task", None, "default", "task"]):
        mixed = model(x)
    torch.testing.assert_close(mixed[[0, 3]], y_task[[0, 3]].detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], y0[1], atol=1e-5, rtol=1e-5)
    pyhappy.delete_adapter(model, "task")
    assert list(model[0].adapters) == ["default"]
    merged = copy.deepcopy(model)
    pyhappy.set_adapter(merged, "default", active=True, weight=0.5)
    y_def = merged(x)
    pyhappy.unload(merged, merge=True)  # folds the active adapters, as PEFT's merge_and_unload
    assert type(merged[0]) is nn.Linear
    torch.testing.assert_close(merged(x), y_def, atol=1e-5, rtol=1e-5)
    pyhappy.unload(model)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, base[0])


def test_adapter_state_and_dropout_survive_a_state_dict_round_trip():
    torch.manual_seed(0)
    m = MultiLoRALinear.from_linear(nn.Linear(16, 8))
    m.add_adapter("a", r=2, init="none")
    m.add_adapter("b", r=3, init="none", dropout=0.25)
    m.set_adapter("a", active=False)
    m.set_adapter("b", weight=0.3)
    fresh = MultiLoRALinear.from_linear(nn.Linear(16, 8))
    fresh.add_adapter("a", r=2)
    fresh.add_adapter("b", r=3, dropout=0.25)
    fresh.load_state_dict(m.state_dict())
    assert not fresh.adapters["a"].active and fresh.adapters["b"].weight == 0.3
    x = torch.randn(5, 16)
    torch.testing.assert_close(fresh.eval()(x), m.eval()(x))
    m.train()
    torch.manual_seed(1)
    y1 = m(x)
    torch.manual_seed(1)
    y2 = m(x)
    torch.testing.assert_close(y1, y2)  # dropout draws follow the seed
    assert not torch.allclose(y1, m.eval()(x))  # and adapter b's dropout acts in training
    bad = m.state_dict()
    bad["adapters.a._extra_state"] = {"active": "yes", "weight": 1.0}
    with pytest.raises(TypeError, match="active"):
        fresh.load_state_dict(bad)
    assert not fresh.adapters["a"].active
    with pytest.raises(ValueError, match="dropout"):
        m.add_adapter("c", r=2, dropout=1.5)


def test_a_state_dict_loads_into_a_fresh_module_creating_its_adapters():
    """MultiLoRALinear's state dict carries each adapter's settings: a fresh module (also inside a
    model loaded with torch's own load_state_dict) creates the adapters and computes the same; a bad
    adapter tensor is refused by name before anything changes."""
    torch.manual_seed(0)
    m = MultiLoRALinear.from_linear(nn.Linear(16, 8))
    m.add_adapter("fr", r=4, alpha=8, init="none")
    m.add_adapter("de", r=2, rslora=True, init="none", dropout=0.1)
    m.set_adapter("de", active=False, weight=0.5)
    m.adapters["fr"].scaling = 1.7  # e.g. PEFT's own value
    x = torch.randn(3, 16)
    for fresh in (MultiLoRALinear(16, 8), nn.Sequential(MultiLoRALinear(16, 8))):
        src = m if isinstance(fresh, MultiLoRALinear) else nn.Sequential(m)
        fresh.load_state_dict(src.state_dict())
        f = fresh if isinstance(fresh, MultiLoRALinear) else fresh[0]
        assert list(f.adapters) == ["fr", "de"] and not f.adapters["de"].active and f.adapters["de"].weight == 0.5
        assert f.adapters["fr"].scaling == 1.7 and f.adapters["de"].lora_dropout == 0.1 and f.adapters["de"].rslora
        with torch.no_grad():
            torch.testing.assert_close(f(x), m(x), rtol=0, atol=0)
            f.set_adapter("de", active=True)
            m.set_adapter("de", active=True)
            with pyhappy.adapter_batch(f, ["de", None, "fr"]), pyhappy.adapter_batch(m, ["de", None, "fr"]):
                torch.testing.assert_close(f(x), m(x), rtol=0, atol=0)
            m.set_adapter("de", active=False)
    bad = dict(m.state_dict())
    bad["adapters.de.lora_B.weight"] = torch.randn(8, 3)
    g = MultiLoRALinear(16, 8)
    with pytest.raises(ValueError, match="adapters.de.lora_A / lora_B"):
        g.load_state_dict(bad)
    assert list(g.adapters) == []
    # an adapter the state dict cannot create (no settings: a state dict from safetensors, or an
    # older pyhappy's): its keys are unexpected, an error where strict, reported where not
    old = dict(m.state_dict())
    old["adapters.fr._extra_state"] = {"active": True, "weight": 1.0}
    del old["adapters.de._extra_state"]
    with pytest.raises(KeyError, match="unexpected keys"):
        MultiLoRALinear(16, 8).load_state_dict(old)
    h = MultiLoRALinear(16, 8)
    got = h.load_state_dict(old, strict=False)
    assert list(h.adapters) == [] and set(got.unexpected_keys) == {k for k in old if k.startswith("adapters.")}
    half = dict(m.state_dict())
    half["adapters.fr._extra_state"] = {"active": True, "weight": 1.0, "scaling": 2.0}  # part of the settings
    w0 = m.weight.clone()
    with pytest.raises(ValueError, match="all of"):
        m.load_state_dict(half)
    assert torch.equal(m.weight, w0) and m.adapters["fr"].scaling == 1.7
    with pytest.raises(ValueError, match="all of"):
        m.adapters["fr"].set_extra_state(half["adapters.fr._extra_state"])
    assert m.adapters["fr"].active and m.adapters["fr"].weight == 1.0


def test_switching_adapters_keeps_a_frozen_model_frozen_and_checks_first():
    """pyhappy.set_adapter(only=True) moves trainability to the adapter switched to only where the
    adapters train; a served (frozen) model stays frozen; a bad weight changes nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(MultiLoRALinear.from_linear(nn.Linear(8, 8)), MultiLoRALinear.from_linear(nn.Linear(8, 8)))
    for m in model:
        m.add_adapter("a", r=2)
        m.add_adapter("b", r=2)
    model.requires_grad_(False)
    pyhappy.set_adapter(model, "b", only=True)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(m.adapters["b"].active and not m.adapters["a"].active for m in model)

    def flags():
        return [(n, p.active, p.weight, [q.requires_grad for q in p.parameters()]) for m in model
                for n, p in m.adapters.items()]

    for p in model[0].adapters["b"].parameters():
        p.requires_grad_(True)
    pyhappy.set_adapter(model, "a", only=True)
    assert all(q.requires_grad for m in model for q in m.adapters["a"].parameters())
    assert not any(q.requires_grad for m in model for q in m.adapters["b"].parameters())
    before = flags()
    for bad in (float("nan"), "x"):
        with pytest.raises((ValueError, TypeError), match="weight"):
            pyhappy.set_adapter(model, "b", only=True, weight=bad)
        with pytest.raises((ValueError, TypeError), match="weight"):
            model[0].set_adapter("b", active=True, weight=bad)
        assert flags() == before
