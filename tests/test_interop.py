"""PEFT checkpoint interop (save/load/convert; PEFT and transformers are optional oracles) and
undoing an injection (merge / unmerge / unload)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyhappy
from pyhappy.nn import LoRALinear, QLoRALinear, QuantLinear, SparseDeltaLinear, TTLinear

HAS_PEFT = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None
needs_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft + transformers not installed (optional oracles)")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 16))


def randomize_adapters(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(std=0.2)


def test_save_and_load_peft_format_round_trip_without_peft(tmp_path):
    model = mlp()
    pyhappy.inject(model, ["0", "2"], r=8, alpha=16, rslora=True)
    model[2] = LoRALinear.from_linear(model[2].to_linear(), r=4, alpha=2, rslora=True)  # another rank / alpha
    randomize_adapters(model)
    x = torch.randn(5, 32)
    want = model(x)
    pyhappy.save_peft_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is True and sorted(cfg["target_modules"]) == ["0", "2"]
    assert list(cfg["rank_pattern"].values()) == [4] and list(cfg["alpha_pattern"].values()) == [2]
    fresh = mlp()
    pyhappy.load_peft_adapter(fresh, tmp_path)
    assert isinstance(fresh[0], LoRALinear) and fresh[2].r == 4 and fresh[2].rslora
    torch.testing.assert_close(fresh(x), want)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        "0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]


def test_dora_adapter_round_trip_merge_and_unload(tmp_path):
    """An injected DoRA model saves as a PEFT DoRA adapter (use_dora, lora_magnitude_vector) and
    loads back into a fresh model computing the same; unload(merge=True) keeps that function in
    plain nn.Linear layers, unload() gives the base back."""
    model = mlp()
    base = mlp()
    pyhappy.inject(model, ["0", "2"], r=4, alpha=8, use_dora=True)
    randomize_adapters(model)
    with torch.no_grad():
        model[2].lora_magnitude_vector.mul_(1.5)
    x = torch.randn(5, 32)
    want = model(x)
    pyhappy.save_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    fresh = pyhappy.load_peft_adapter(mlp(), tmp_path)
    assert fresh[0].use_dora and torch.equal(fresh[2].lora_magnitude_vector, model[2].lora_magnitude_vector)
    torch.testing.assert_close(fresh(x), want)
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad)
    merged = pyhappy.unload(fresh, merge=True)
    assert type(merged[0]) is nn.Linear
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pyhappy.unload(model)(x), base(x))


def test_load_peft_adapter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        pyhappy.load_peft_adapter(mlp(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["0"],
                                                              "use_dora": "yes"}))
    with pytest.raises(TypeError, match="use_dora must be true or false"):
        pyhappy.load_peft_adapter(mlp(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 4, "target_modules": ["0"]}))
    with pytest.raises(ValueError, match="LoRA"):
        pyhappy.load_peft_adapter(mlp(), tmp_path)
    model = mlp()
    pyhappy.inject(model, ["0"], r=4)
    pyhappy.save_peft_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = 8  # weights are r=4
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="r=8"):
        pyhappy.load_peft_adapter(mlp(), tmp_path)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@needs_peft
def test_peft_llama_load_convert_and_save_back(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    base_logits = tiny_llama()(ids).logits
    lc = LoraConfig(r=8, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj|down_proj)", use_rslora=True,
                    rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 32}, init_lora_weights=False)
    pm = get_peft_model(tiny_llama(), lc).eval()
    want = pm(ids).logits
    pm.save_pretrained(tmp_path / "peft")
    # 1. a PEFT directory into a plain base model
    plain = pyhappy.load_peft_adapter(tiny_llama(), tmp_path / "peft")
    assert isinstance(plain.model.layers[0].mlp.down_proj, LoRALinear)
    assert plain.model.layers[0].mlp.down_proj.r == 4
    torch.testing.assert_close(plain(ids).logits, want, atol=1e-5, rtol=1e-5)
    # 2. a live PEFT model converted in place
    conv = pyhappy.from_peft(pm)
    assert not any("lora" in type(m).__module__ for m in conv.modules() if not isinstance(m, LoRALinear))
    torch.testing.assert_close(conv(ids).logits, want, atol=1e-5, rtol=1e-5)
    # 3. pyhappy's save loads in PEFT
    pyhappy.save_peft_adapter(conv, tmp_path / "ours")
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(ids).logits, want, atol=1e-5, rtol=1e-5)
    # 4. unload gives the base model back
    pyhappy.unload(conv)
    torch.testing.assert_close(conv(ids).logits, base_logits)


@needs_peft
def test_peft_gpt2_conv1d_fan_in_fan_out(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(2))
    pm = get_peft_model(gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                           init_lora_weights=False)).eval()
    want = pm(ids).logits
    pm.save_pretrained(tmp_path)
    m = pyhappy.load_peft_adapter(gpt2(), tmp_path)
    torch.testing.assert_close(m(ids).logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pyhappy.from_peft(pm)(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_unload_every_family():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
                          nn.ReLU(), nn.Linear(64, 32))
    torch.manual_seed(0)
    w = [model[i].weight.detach().clone() for i in (0, 2, 4, 6)]
    x = torch.randn(3, 64)
    model[0] = LoRALinear.from_linear(model[0], r=4)
    model[2] = SparseDeltaLinear.from_linear(model[2], density=0.05, seed=0)
    model[4] = TTLinear.from_linear(model[4], tt_rank=2)
    model[6] = QLoRALinear.from_linear(model[6], "int4", group_size=32, r=4)
    randomize_adapters(model)
    y = model(x)
    assert pyhappy.merge(model) == 3  # the quantized base cannot absorb its adapter
    torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)
    assert pyhappy.unmerge(model) == 3
    torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="quantized"):
        pyhappy.unload(model, merge=True)
    pyhappy.unload(model)
    assert [type(model[i]) for i in (0, 2, 4, 6)] == [nn.Linear, nn.Linear, nn.Linear, QuantLinear]
    for i, w0 in zip((0, 2, 4), w):
        torch.testing.assert_close(model[i].weight, w0, atol=1e-6, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed (optional)")
def test_tiny_llama_qlora_training_step_compiles_to_one_frame():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tiny_llama()
    model.train()
    rep = pyhappy.inject(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4,
                         quantize="int4", group_size=32, init="none")
    assert len(rep) == 14
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(loss_fn, backend=cnt, fullgraph=True)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # same shapes: no recompile
        ids = torch.randint(0, 128, (2, 12), generator=g)
        loss = compiled(ids)
        grads = torch.autograd.grad(loss, params)
        want = loss_fn(ids)
        want_grads = torch.autograd.grad(want, params)
        torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-4)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, atol=1e-4 * (1 + b.abs().max().item()), rtol=1e-3)
    assert cnt.frame_count == 1


@pytest.mark.parametrize("kind", ["lora", "qlora", "sparse", "tt"])
def test_torch_export_of_an_adapted_model(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    kw = {"lora": dict(r=4, init="none"), "qlora": dict(r=4, init="none", quantize="int4", group_size=32),
          "sparse": dict(adapter="sparse", density=0.05, seed=0), "tt": dict(adapter="tt", tt_rank=2)}[kind]
    pyhappy.inject(model, ["0", "2"], **kw)
    randomize_adapters(model)
    x = torch.randn(3, 64)
    ep = torch.export.export(model, (x,))
    if kind != "tt":  # the TT forms are compositions of aten ops around lora_linear / plain matmuls
        assert "pyhappy" in ep.graph_module.code
    x2 = torch.randn(3, 64)
    torch.testing.assert_close(ep.module()(x2), model(x2), atol=1e-5, rtol=1e-5)


def test_finetune_example_runs_every_family(tmp_path, capsys):
    from pyhappy.examples import finetune

    res = finetune.main(["--steps", "3", "--batch", "2", "--seq", "16", "--out", str(tmp_path)])
    assert set(res) == set(finetune.FAMILIES)
    for fam, r in res.items():
        assert r["tokens_per_s"] > 0 and r["first_loss"] > 0 and "compare" in r
        # the comparison run trains the same model with the same data: the same first loss
        (c,) = r["compare"].values()
        assert abs(c["first_loss"] - r["first_loss"]) < 1e-3
    assert (tmp_path / "lora" / "adapter_config.json").exists() and (tmp_path / "sparse.safetensors").exists()
    assert "tokens/s" in capsys.readouterr().out


def test_load_quantized_state_dict_bnb_and_gptq_layers():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    q0 = pyhappy.quantize(src[0].weight.detach(), "nf4", 64)
    q2 = pyhappy.quantize(src[2].weight.detach(), "int4", 32)
    packed, qs = q0.to_bnb()  # the keys transformers writes for a bitsandbytes Linear4bit
    sd = {"0.weight": packed, **{f"0.weight.{k}": v for k, v in qs.items()}, "0.bias": src[0].bias.detach()}
    sd.update({f"2.{k}": v for k, v in q2.to_gptq().items() if isinstance(v, torch.Tensor)})
    sd["2.bias"] = src[2].bias.detach()
    sd.update({"4.weight": src[4].weight.detach(), "4.bias": src[4].bias.detach()})
    dst = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    rep = pyhappy.load_quantized_state_dict(dst, sd, bits=4, group_size=32)
    assert rep == {"quantized": ["0", "2"], "missing": [], "unexpected": []}
    assert isinstance(dst[0], QuantLinear) and dst[0].format == "nf4" and dst[2].format == "int4"
    x = torch.randn(3, 64)
    h = torch.relu(F.linear(torch.relu(F.linear(x, q0.dequantize(), src[0].bias)), q2.dequantize(), src[2].bias))
    torch.testing.assert_close(dst(x), src[4](h), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="quantized weight"):
        pyhappy.load_quantized_state_dict(nn.Sequential(nn.Linear(64, 48)), {k: v for k, v in sd.items()
                                                                            if k.startswith("0.")})


@pytest.mark.parametrize("bits", [4, 3])
def test_load_quantized_state_dict_keeps_act_order(bits):
    """A GPTQ act-order layer (g_idx) keeps its column permutation through the final non-strict
    load_state_dict of the rest of the model (it once cleared perm: silently wrong outputs)."""
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    fmt = "int4" if bits == 4 else "int3"
    q = pyhappy.quantize(src[0].weight.detach(), fmt, 32, method="gptq", calib=torch.randn(128, 64), act_order=True)
    assert q.perm is not None
    sd = {f"0.{k}": v for k, v in q.to_gptq().items() if isinstance(v, torch.Tensor)}
    sd.update({"0.bias": src[0].bias.detach(), "2.weight": src[2].weight.detach(), "2.bias": src[2].bias.detach()})
    dst = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    pyhappy.load_quantized_state_dict(dst, sd, bits=bits, group_size=32)
    assert dst[0].perm is not None
    x = torch.randn(3, 64)
    want = src[2](torch.relu(F.linear(x, q.dequantize(), src[0].bias)))
    torch.testing.assert_close(dst(x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed (optional)")
def test_load_quantized_state_dict_from_a_bitsandbytes_layer():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(lin.bias.detach().clone())
    q = q.to("cpu")
    q.weight = q.weight._quantize("cpu") if not getattr(q.weight, "bnb_quantized", False) else q.weight
    sd = {f"0.{k}": v for k, v in q.state_dict().items()}
    dst = nn.Sequential(nn.Linear(64, 32))
    pyhappy.load_quantized_state_dict(dst, sd)
    x = torch.randn(4, 64)
    want = F.linear(x, bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float(), lin.bias)
    torch.testing.assert_close(dst(x), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dst[0].dequantize(), bnb.functional.dequantize_4bit(
        q.weight.data, q.weight.quant_state).float(), atol=0, rtol=0)


def test_second_adapter_refused_before_anything_changes_when_a_layer_cannot_hold_two(tmp_path):
    model = mlp()
    pyhappy.inject(model, ["0", "2"], r=4)
    pyhappy.save_peft_adapter(model, tmp_path)
    model[2].merge()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="2 is merged"):
        pyhappy.load_peft_adapter(model, tmp_path, adapter_name="x")
    assert isinstance(model[0], LoRALinear) and model[2].merged  # nothing swapped
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
