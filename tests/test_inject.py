"""pyhappy.inject: name matching, freezing, the report, and errors that leave the model unchanged."""

import pytest
import torch
from torch import nn

import pyhappy
from pyhappy.nn import LoRALinear


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.mlp(self.norm(x + self.q_proj(x) * self.v_proj(x)))


def model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


@pytest.mark.parametrize("targets,expected", [
    (["q_proj", "v_proj"], ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]),
    (["1.q_proj"], ["1.q_proj"]),
    (r".*\.mlp\.[02]", ["0.mlp.0", "0.mlp.2", "1.mlp.0", "1.mlp.2"]),
])
def test_inject_matches_like_peft(targets, expected):
    m = model()
    x = torch.randn(3, 16)
    y0 = m(x)
    rep = pyhappy.inject(m, targets, r=4, alpha=8)
    assert list(rep) == expected
    for name in expected:
        assert isinstance(m.get_submodule(name), LoRALinear)
    torch.testing.assert_close(m(x), y0)  # fresh adapters are the identity
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in expected for ab in "AB"}
    assert rep.trainable_params == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert rep.total_params == sum(p.numel() for p in m.parameters())
    assert "trainable params" in str(rep)


def test_inject_trains_only_adapters():
    m = model()
    pyhappy.inject(m, ["q_proj"], r=2, init="none")
    m(torch.randn(4, 16)).sum().backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


def test_inject_twice_does_not_wrap_adapters():
    m = model()
    pyhappy.inject(m, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="GELU|Sequential|LayerNorm|Block"):
        pyhappy.inject(m, r".*", r=2)  # the regex matches non-Linear modules: refused
    rep = pyhappy.inject(m, r".*_proj", r=2)
    assert list(rep) == ["0.v_proj", "1.v_proj"]  # existing adapters and their lora_A/B are skipped


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(target_modules=["nope"]), ValueError, "target_modules"),
    (dict(target_modules=["norm"]), ValueError, "LayerNorm"),
    (dict(target_modules=[]), TypeError, "target_modules"),
    (dict(target_modules="(unclosed"), ValueError, "target_modules"),
    (dict(target_modules=["q_proj"], adapter="magic"), ValueError, "adapter"),
    (dict(target_modules=["q_proj"], r=0), ValueError, r"\br\b"),
])
def test_inject_errors_leave_the_model_unchanged(kwargs, exc, match):
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    with pytest.raises(exc, match=match):
        pyhappy.inject(m, **kwargs)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert grads == {n: p.requires_grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int3"])
def test_inject_quantize_makes_the_whole_model_qlora(fmt):
    from pyhappy.nn import QLoRALinear, QuantLinear

    torch.manual_seed(0)
    m = nn.Sequential(Block(64), Block(64))
    m.lm_head = nn.Linear(64, 10)
    x = torch.randn(3, 64)
    y0 = m[1](m[0](x))
    rep = pyhappy.inject(m, ["q_proj", "v_proj"], r=4, quantize=fmt, group_size=32)
    assert list(rep) == ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]
    assert rep.quantized == ["0.mlp.0", "0.mlp.2", "1.mlp.0", "1.mlp.2"]
    assert isinstance(m.get_submodule("0.q_proj"), QLoRALinear)
    assert type(m.get_submodule("1.mlp.2")) is QuantLinear
    assert type(m.lm_head) is nn.Linear  # skipped by default
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        f"{b}.{p}.lora_{ab}.weight" for b in (0, 1) for p in ("q_proj", "v_proj") for ab in "AB"]
    y = m[1](m[0](x))
    assert torch.nn.functional.cosine_similarity(y.flatten(), y0.flatten(), dim=0) > 0.97
    y.sum().backward()
    assert m.get_submodule("0.q_proj").lora_A.weight.grad is not None


def test_inject_quantize_rejects_unknown_format():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="quantize"):
        pyhappy.inject(m, ["q_proj"], quantize="int8")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
