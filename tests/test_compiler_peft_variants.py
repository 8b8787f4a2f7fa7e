"""pyhappy.compiler on PEFT's DoRA, VeRA and PVeRA forwards (tiny transformers models built from
configs): each adapted layer becomes one fused pyhappy op (dora_linear, vera_linear, pvera_linear), the
model compiles into one graph, and logits and the gradients of every trainable tensor equal eager
PEFT's; what does not fit is left unfused with its reason in the report. Skipped without peft +
transformers (optional test oracles)."""

from __future__ import annotations

import importlib.util
import operator

import pytest
import torch

import pyhappy.compiler as pc

from helpers import HAS_CPP

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None
                       or not HAS_CPP, reason="peft + transformers not installed (optional oracles)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

V = 96


def build(arch="llama"):
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    if arch == "qwen2":  # q/k/v with biases
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                          bos_token_id=0, eos_token_id=0))


def peft_model(arch, kind, **kw):
    from peft import LoraConfig, VeraConfig, get_peft_model

    if kind == "dora":
        cfg = LoraConfig(use_dora=True, **kw)
    elif kind == "vera":
        cfg = VeraConfig(**kw)
    else:
        from peft.tuners.pvera import PveraConfig

        cfg = PveraConfig(**kw)
    return trained_like(get_peft_model(build(arch), cfg))


def trained_like(pm):
    """Trained-like adapters (PEFT initialises them to a no-op)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def inputs():
    return {"input_ids": torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(1))}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def compiled(pm, **kw):
    """(compiled model, backend, captured graphs): the rewritten graphs run as they are (no Inductor)."""
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    be = pc.make_backend(inner=inner, **kw)
    torch._dynamo.reset()
    return torch.compile(pm, backend=be, fullgraph=True), be, graphs


def agrees_with_peft(pm, cm, x):
    """Logits and the gradient of every trainable tensor: the compiled cm against eager PEFT's pm."""
    params = [p for p in pm.parameters() if p.requires_grad]
    got = cm(**x).logits
    g_got = torch.autograd.grad(got.float().pow(2).mean(), params)
    want = pm(**x).logits
    g_want = torch.autograd.grad(want.float().pow(2).mean(), params)
    assert _rel(got, want) < 1e-4, _rel(got, want)
    for a, b in zip(g_got, g_want):
        assert b.abs().max() > 0 and _rel(a, b) < 1e-4, _rel(a, b)


def pyhappy_calls(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and
            getattr(n.target, "namespace", None) == "pyhappy" and getattr(n.target, "_opname", "") == name]


CASES = {
    # q_proj / v_proj with a bias (PEFT's base term is result - bias), o_proj without
    "dora-qwen2": ("qwen2", "dora", "dora_linear", dict(r=4, target_modules=["q_proj", "v_proj", "o_proj"])),
    # GPT-2's Conv1D: the weight stored [K, N] (fan_in_fan_out), PEFT's norm over transpose(W); the ops read W.t()
    "dora-gpt2-conv1d": ("gpt2", "dora", "dora_linear", dict(r=4, target_modules=["c_attn", "c_proj"],
                                                             fan_in_fan_out=True)),
    "vera-gpt2-conv1d": ("gpt2", "vera", "vera_linear", dict(r=8, target_modules=["c_attn", "c_fc"])),
    "pvera-llama-mean": ("llama", "pvera", "pvera_linear", dict(r=4, target_modules=["q_proj", "o_proj"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_variant_compiles_fused_in_one_graph(case):
    """fullgraph=True: the model is one graph (PEFT's DoRA forward broke it once per layer before the
    polyfill pyhappy.compiler registers); every adapted layer one fused op; PEFT's numbers."""
    arch, kind, op, kw = CASES[case]
    pm = peft_model(arch, kind, **kw).eval()  # imports peft, so the polyfill can be registered
    assert pc.register_peft_polyfills()
    cm, be, graphs = compiled(pm)
    agrees_with_peft(pm, cm, inputs())
    (rep,) = be.reports
    (gm,) = graphs
    n_layers = len([m for m in pm.modules() if hasattr(m, "get_base_layer") and hasattr(m, "active_adapters")])
    assert n_layers and [s["kind"] for s in rep.sites] == [kind] * n_layers and not rep.near_misses, str(rep)
    assert len(pyhappy_calls(gm, op)) == n_layers
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "norm" in str(n.target) and
                "linalg" in str(n.target)], "DoRA's [N, K] norm left in the graph"
    for n in gm.graph.nodes:  # every adapter tensor goes straight into the fused op
        if n.op == "placeholder" and any(k in n.name for k in ("lora_a", "lora_b", "magnitude", "lambda")):
            assert n.users and all(u.target == torch.ops.pyhappy.dora_weight_norm.default or u in pyhappy_calls(gm, op)
                                   for u in n.users), (n.name, list(n.users))


def test_active_dropout_is_left_alone_unless_pyhappy_dropout_is_asked_for():
    torch.manual_seed(0)
    for kind, kw in (("dora", dict(lora_dropout=0.2)),):
        pm = peft_model("llama", kind, r=4, target_modules=["q_proj"], **kw).train()
        cm, be, _ = compiled(pm)
        torch.manual_seed(5)
        got = cm(**inputs()).logits
        torch.manual_seed(5)
        want = pm(**inputs()).logits
        assert _rel(got, want) < 1e-4  # unfused: torch's own dropout, the same draw
        (rep,) = be.reports
        assert not rep.sites and len(rep.near_misses) == 1 and \
            all("active dropout (p=0.2)" in why for _, why in rep.near_misses), str(rep)
        cm, be, graphs = compiled(pm, dropout="pyhappy")
        out = cm(**inputs()).logits
        (rep,) = be.reports
        assert [s["dropout"] for s in rep.sites] == [0.2] and not rep.near_misses, str(rep)
        assert torch.isfinite(out).all()


def test_pvera_sampling_is_left_alone_with_its_reason():
    pm = peft_model("llama", "pvera", r=4, target_modules=["q_proj", "v_proj"]).train()
    cm, be, graphs = compiled(pm)
    cm(**inputs())
    (rep,) = be.reports
    assert not rep.sites and len(rep.near_misses) == 2, str(rep)
    assert all("PVeRA sampling" in why for _, why in rep.near_misses), str(rep)


def test_polyfill_returns_what_pefts_function_returns():
    """The traced stand-in for PEFT's dequantize_module_weight: a plain weight as it is, anything else
    through PEFT's own function (run outside the graph)."""
    from peft.utils.integrations import dequantize_module_weight

    assert pc.register_peft_polyfills()

    class Marked(torch.nn.Parameter):
        pass

    plain = torch.nn.Linear(4, 3)
    odd = torch.nn.Linear(4, 3)
    odd.weight = Marked(torch.randn(3, 4))
    torch._dynamo.reset()
    f = torch.compile(lambda m, x: dequantize_module_weight(m) * x, backend="eager")
    x = torch.randn(3, 4)
    for m in (plain, odd):
        torch.testing.assert_close(f(m, x), dequantize_module_weight(m) * x, rtol=0, atol=0)



def test_transpose_polyfill_returns_pefts_values_without_a_path_back_to_the_weight():
    """PEFT's transpose(W, fan_in_fan_out=True) wraps W.T in a fresh Parameter (a constructor Dynamo
    refuses): the stand-in gives the same values and, like that fresh leaf, no gradient back to W."""
    from peft.utils.other import transpose

    assert pc.register_peft_polyfills()
    x = torch.randn(2, 4, requires_grad=True)
    torch._dynamo.reset()
    f = torch.compile(lambda W, x, fifo: torch.nn.functional.linear(x, transpose(W, fifo)), backend="eager",
                      fullgraph=True)
    for W, fifo in ((torch.nn.Parameter(torch.randn(4, 3)), True), (torch.nn.Parameter(torch.randn(3, 4)), False)):
        want = torch.nn.functional.linear(x, transpose(W, fifo))
        got = f(W, x, fifo)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        g_got = torch.autograd.grad(got.sum(), [x, W], allow_unused=True)
        g_want = torch.autograd.grad(want.sum(), [x, W], allow_unused=True)
        torch.testing.assert_close(g_got[0], g_want[0], rtol=0, atol=0)
        assert (g_got[1] is None) == (g_want[1] is None) == fifo


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed (optional)")
@pytest.mark.parametrize("nested", [True, False])
def test_bnb_4bit_qdora_fuses_into_quant_linear_on_the_packed_weight(tmp_path, nested):
    """PEFT's DoRA on a transformers + bitsandbytes NF4 model (QDoRA): PEFT dequantizes the 4-bit weight
    every step to take the norm; the rewrite runs QLoRALinear's QDoRA forward instead (the norm from the
    packed weight, the layer one quant_linear), in one graph, with PEFT's logits and gradients."""
    import transformers as T
    from peft import LoraConfig, get_peft_model

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    q = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=nested,
                             bnb_4bit_compute_dtype=torch.float32)
    m = T.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32, device_map="cpu")
    pm = trained_like(get_peft_model(m, LoraConfig(r=4, use_dora=True,
                                                   target_modules=["q_proj", "v_proj", "down_proj"]))).train()
    assert pc.register_peft_polyfills()
    cm, be, graphs = compiled(pm)
    agrees_with_peft(pm, cm, inputs())
    (rep,) = be.reports
    (gm,) = graphs
    kinds = [s["kind"] for s in rep.sites]
    assert kinds.count("qdora") == 3 and kinds.count("quant") == 4 and not rep.near_misses, str(rep)
    left = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not [t for t in left if "dequantize" in t or "linalg" in t or "gemm_4bit" in t], left
    for n in gm.graph.nodes:  # the adapters feed pyhappy's quant_linear and the QDoRA norm, nothing else
        if n.op == "placeholder" and any(k in n.name for k in ("lora_a", "lora_b", "magnitude")):
            assert n.users and all(u.target in (torch.ops.pyhappy.quant_linear.default, pc._qdora_norm,
                                                operator.truediv) for u in n.users), (n.name, list(n.users))


def test_a_second_dora_adapter_on_one_base_is_left_alone_with_its_reason():
    """Two active DoRA adapters on q_proj: PEFT's second takes the running result (base + the first
    adapter's DoRA term) as its base term, ms2 ⊙ ms1 ⊙ (x Wᵀ + s1·…) + ms2 ⊙ s2·…: the first fuses, the
    second stays PEFT's code with the reason, and the model still computes PEFT's numbers."""
    from peft import LoraConfig

    pm = peft_model("llama", "dora", r=4, target_modules=["q_proj"])
    pm.add_adapter("other", LoraConfig(use_dora=True, r=2, target_modules=["q_proj"]))
    pm.base_model.set_adapter(["default", "other"])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".other." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    cm, be, _ = compiled(pm)
    got = cm(**inputs()).logits
    assert _rel(got, pm(**inputs()).logits) < 1e-4
    (rep,) = be.reports
    assert [s["kind"] for s in rep.sites] == ["dora"] and len(rep.near_misses) == 1, str(rep)
    assert "a further adapter on the same base" in rep.near_misses[0][1], str(rep)
