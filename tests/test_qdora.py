"""QDoRA: QLoRALinear(use_dora=True) on a packed 4/3-bit base against DoRA on the dequantized weight
(LoRALinear(use_dora=True), itself tested against PEFT): outputs and every gradient, PEFT's dropout
formulation, the magnitude's initialisation, the row norms read from the packed weight in blocks, the
cache following the packed buffers, state dicts, and bad arguments named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers import bnb_float_path

from pyhappy.nn import LoRALinear, QLoRALinear
from pyhappy.nn.quant_linear import quantized_row_sqnorm
from pyhappy.quant import QuantizedWeight


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def pair(fmt="nf4", bias=True, N=72, K=128, r=4):
    """(QDoRA layer with trained-like adapters, DoRA on its dequantized weight with the same adapters)."""
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=bias)
    q = QLoRALinear.from_linear(lin, fmt, r=r, alpha=2 * r, use_dora=True, init="none")
    with torch.no_grad():
        q.lora_magnitude_vector.mul_(torch.rand(N) + 0.5)
    dense = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(q.qweight.dequantize(torch.float32))
        if bias:
            dense.bias.copy_(q.bias)
    ref = LoRALinear.from_linear(dense, r=r, alpha=2 * r, use_dora=True)
    with torch.no_grad():
        for name in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"):
            ref.get_parameter(name).copy_(q.get_parameter(name))
    return q, ref


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int3"])
@pytest.mark.parametrize("bias", [True, False])
def test_qdora_matches_dora_on_the_dequantized_weight(fmt, bias):
    q, ref = pair(fmt, bias)
    x = torch.randn(3, 5, 128, requires_grad=True)
    params = ["lora_A.weight", "lora_B.weight", "lora_magnitude_vector"]
    y, yr = q(x), ref(x)
    assert rel(y, yr) < 1e-5
    g = torch.autograd.grad(y.pow(2).sum(), [x] + [q.get_parameter(n) for n in params])
    gr = torch.autograd.grad(yr.pow(2).sum(), [x] + [ref.get_parameter(n) for n in params])
    for a, b in zip(g, gr):
        assert b.abs().max() > 0 and rel(a, b) < 1e-4, rel(a, b)
    assert rel(q.dora_norm(), ref._dora_norm()) < 1e-6


def test_qdora_dropout_is_pefts_formulation():
    """While dropout is active: (x - xd) Wᵀ + ms ⊙ (xd Wᵀ + s · xd Aᵀ Bᵀ) + b, xd = dropout(x) (torch's
    draw under the same seed), the norm detached."""
    q, _ = pair("int4", True)
    q.lora_dropout = 0.3
    q.train()
    x = torch.randn(6, 128)
    torch.manual_seed(11)
    y = q(x)
    torch.manual_seed(11)
    xd = F.dropout(x, 0.3, training=True)
    W = q.qweight.dequantize(torch.float32)
    A, B, s = q.lora_A.weight.detach(), q.lora_B.weight.detach(), q.scaling
    norm = torch.linalg.vector_norm(W + s * B @ A, dim=1)
    ms = q.lora_magnitude_vector.detach() / norm
    want = (x - xd) @ W.t() + ms * (xd @ W.t() + s * (xd @ A.t()) @ B.t()) + q.bias.detach()
    assert rel(y, want) < 1e-5
    assert not torch.equal(xd, x)


def test_magnitude_starts_at_the_dequantized_row_norms_and_a_fresh_layer_is_the_base():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = QLoRALinear.from_linear(lin, "nf4", group_size=32, r=4, use_dora=True)
    W = q.qweight.dequantize(torch.float32)
    assert rel(q.lora_magnitude_vector.detach(), torch.linalg.vector_norm(W, dim=1)) < 1e-6
    x = torch.randn(4, 96)
    assert rel(q(x), x @ W.t() + q.bias.detach()) < 1e-5


def test_row_sqnorm_from_the_packed_weight_in_blocks():
    """Blocks of row tiles (a tiny chunk forces one tile at a time), a partial last tile, and an
    act-order weight (its column permutation does not change a row's norm)."""
    torch.manual_seed(1)
    N, K = 75, 128
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    scales = torch.rand(N, K // 32) + 0.1
    zeros = torch.randint(0, 16, (N, K // 32), dtype=torch.uint8)
    for perm in (None, torch.randperm(K)):
        qw = QuantizedWeight.from_codes("int4", codes, scales, zeros, group_size=32, perm=perm)
        want = qw.dequantize(torch.float32).double().pow(2).sum(1)
        for chunk in (1, 1 << 24):
            got = quantized_row_sqnorm(qw, chunk_bytes=chunk)
            assert got.dtype == torch.float64 and got.shape == (N,)
            assert rel(got, want) < 1e-6


def test_state_dict_round_trip_and_the_cache_follows_the_packed_weight():
    q, _ = pair("nf4", True)
    torch.manual_seed(5)
    donor = QLoRALinear.from_linear(nn.Linear(128, 72), "nf4", r=4, alpha=8, use_dora=True, init="none")
    x = torch.randn(4, 128)
    before = q.dora_norm().clone()
    q(x)  # fills the ‖W_n‖² cache
    q.load_state_dict(donor.state_dict())
    assert "lora_magnitude_vector" in donor.state_dict()
    assert torch.equal(q.lora_magnitude_vector, donor.lora_magnitude_vector)
    assert rel(q(x), donor(x)) < 1e-6  # the cache was recomputed for the loaded weight
    assert not torch.allclose(q.dora_norm(), before)


def test_norm_is_kept_between_calls_and_follows_a_fused_optimizer(monkeypatch):
    q, ref = pair("int4")
    calls = []
    inner = q.dora_norm
    monkeypatch.setattr(q, "dora_norm", lambda: calls.append(1) or inner())
    x = torch.randn(3, 128)
    with torch.no_grad():
        y = q(x)
        assert q(x).equal(y) and len(calls) == 1
    opt = torch.optim.AdamW([q.lora_A.weight, q.lora_B.weight], lr=0.1, fused=True)  # no version bumps
    q(x).sum().backward()
    opt.step()
    with torch.no_grad():
        for name in ("lora_A.weight", "lora_B.weight"):
            ref.get_parameter(name).copy_(q.get_parameter(name))
        assert rel(q(x), ref(x)) < 1e-5
    assert len(calls) == 2


def test_a_norm_kept_under_inference_mode_serves_a_training_step():
    q, ref = pair("int4")
    x = torch.randn(3, 128)
    with torch.inference_mode():
        q(x)
    q(x).pow(2).sum().backward()  # the kept norm must be a tensor autograd can save
    assert q.lora_magnitude_vector.grad is not None


def test_bad_arguments_are_named():
    lin = nn.Linear(64, 16)
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        QLoRALinear.from_linear(lin, "nf4", use_dora="yes")
    with pytest.raises(ValueError, match="use_dora=True takes no core"):
        QLoRALinear.from_linear(lin, "nf4", use_dora=True, core=True)
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        QLoRALinear(64, 16, use_dora=1)
    q = QLoRALinear(64, 16, use_dora=True)
    assert q.lora_magnitude_vector.shape == (16,) and q.use_dora
    assert not QLoRALinear(64, 16).use_dora


def test_peft_qdora_on_bitsandbytes_converts_saves_and_loads(tmp_path):
    """PEFT's DoRA on transformers' bitsandbytes NF4 model (QDoRA): from_peft gives QLoRALinear(use_dora=True)
    on the same packed weight with PEFT's logits and gradients; the adapter pyhappy saves loads in PEFT,
    PEFT's loads in pyhappy, and onto pyhappy's own QuantLinear bases too."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    T = pytest.importorskip("transformers")
    import copy

    import pyhappy
    from peft import LoraConfig, PeftModel, get_peft_model

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "base")

    def q4():
        cfg = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        return bnb_float_path(T.LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=cfg,
                                                                 dtype=torch.float32).eval())

    def grads(model, x):
        model.zero_grad(set_to_none=True)
        out = model(**x).logits
        out.pow(2).mean().backward()
        names = {n: n.removeprefix("base_model.model.").replace("lora_magnitude_vector.default.weight",
                                                                "lora_magnitude_vector").replace(".default.", ".")
                 for n, _ in model.named_parameters()}
        return out.detach(), {names[n]: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    pm = get_peft_model(q4(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    x = {"input_ids": torch.randint(1, 96, (3, 7), generator=torch.Generator().manual_seed(1))}
    want, want_g = grads(pm, x)
    pm.save_pretrained(tmp_path / "peft")
    conv = pyhappy.from_peft(copy.deepcopy(pm))
    layers = [m for m in conv.modules() if isinstance(m, QLoRALinear)]
    assert len(layers) == 2 and all(m.use_dora for m in layers)
    got, got_g = grads(conv, x)
    assert rel(got, want) < 1e-4
    assert set(got_g) == set(want_g) and any("lora_magnitude_vector" in n for n in got_g)
    for n, gw in want_g.items():
        assert rel(got_g[n], gw) < 1e-4, n
    pyhappy.save_peft_adapter(conv, tmp_path / "ours")
    assert rel(PeftModel.from_pretrained(q4(), tmp_path / "ours").eval()(**x).logits, want) < 1e-4
    assert rel(pyhappy.load_peft_adapter(q4(), tmp_path / "peft")(**x).logits, want) < 1e-4
    # pyhappy's own packed base: the bitsandbytes weights read into QuantLinear layers first
    base = q4()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        parent, _, child = name.rpartition(".")
        from pyhappy.interop import _quant_base

        qw, bias, _ = _quant_base(base.get_submodule(name))
        setattr(base.get_submodule(parent), child, pyhappy.nn.QuantLinear.from_quantized(qw, bias))
    loaded = pyhappy.load_peft_adapter(base, tmp_path / "peft")
    assert all(m.use_dora for m in loaded.modules() if isinstance(m, QLoRALinear))
    assert rel(loaded(**x).logits, want) < 1e-4
