"""pyhappy.compiler on real transformers + PEFT models built from tiny configs: GPT-2 (Conv1D addmm),
Falcon (``x @ W.T + b``), BERT and T5 (the model's own dropout right before a LoRA layer), and the
transformers + bitsandbytes 4-bit QLoRA stack. Each: logits and LoRA gradients equal to eager PEFT,
every LoRA layer fused into one pyhappy op, no adapter product left outside pyhappy's ops."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyhappy.compiler as pc

from helpers import HAS_CPP

HAS_PEFT = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_peft = pytest.mark.skipif(not (HAS_PEFT and HAS_CPP), reason="peft + transformers not installed (optional oracles)")
needs_bnb = pytest.mark.skipif(not (HAS_PEFT and HAS_BNB and HAS_CPP),
                               reason="peft + transformers + bitsandbytes not installed (optional oracles)")

_PYHAPPY_OPS = ("lora_linear", "quant_linear")


def _capture():
    """A make_backend inner that keeps the rewritten graph and runs it as is (no Inductor: fast, and the
    graph's own dropout draws the same random numbers as eager under the same seed)."""
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return inner, graphs


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _lora_layers(pm):
    from peft.tuners.lora import LoraLayer

    return [m for m in pm.modules() if isinstance(m, LoraLayer)]


def _check(pm, inputs, out_key="logits", seed=0):
    """Compile pm with pyhappy's backend, compare outputs and LoRA grads with eager PEFT, and check the
    rewritten graph: one pyhappy op per LoRA layer, no lora weight read by anything else."""
    inner, graphs = _capture()
    be = pc.make_backend(inner=inner)
    cm = torch.compile(pm, backend=be, fullgraph=True)
    params = [p for n, p in pm.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    torch.manual_seed(seed)
    got = getattr(cm(**inputs), out_key)
    g_got = torch.autograd.grad(got.float().pow(2).mean(), params)
    torch.manual_seed(seed)
    want = getattr(pm(**inputs), out_key)
    g_want = torch.autograd.grad(want.float().pow(2).mean(), params)
    assert _rel(got, want) < 1e-4, _rel(got, want)
    for a, b in zip(g_got, g_want):
        assert b.abs().max() > 0 and _rel(a, b) < 1e-4, _rel(a, b)
    (rep,) = be.reports
    (gm,) = graphs
    n_layers = len(_lora_layers(pm))
    assert len([s for s in rep.sites if s["kind"] in ("lora", "qlora")]) == n_layers and not rep.near_misses, str(rep)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and
             getattr(n.target, "namespace", None) == "pyhappy" and
             getattr(n.target, "_opname", "") in _PYHAPPY_OPS]
    lora_inputs = {n for n in gm.graph.nodes if n.op == "placeholder" and ("lora_a" in n.name or "lora_b" in n.name)}
    assert len(lora_inputs) == 2 * n_layers
    for n in lora_inputs:  # every adapter weight goes straight into a pyhappy op: no product left outside
        assert all(u in calls for u in n.users), (n.name, list(n.users))
    assert len([c for c in calls if any(a in lora_inputs for a in c.args)]) == n_layers, gm.graph
    return rep


def _perturbed(pm):
    """Trainable LoRA weights as after training (B != 0 with init_lora_weights=False, made explicit)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return pm


def _ids(vocab, shape=(2, 9)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


@needs_peft
def test_gpt2_conv1d_addmm_fuses_and_matches():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    pm = _perturbed(get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                 fan_in_fan_out=True, init_lora_weights=False)))
    pm.train()
    rep = _check(pm, {"input_ids": _ids(64)})
    assert all(s.get("weight") == "[K, N]" for s in rep.sites)  # Conv1D's [K, N] weight, read transposed


@needs_peft
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_falcon_matmul_weight_T_fuses_and_matches(bias):
    from peft import LoraConfig, get_peft_model
    from transformers import FalconConfig, FalconForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       new_decoder_architecture=False, bias=bias, hidden_dropout=0.0,
                                       attention_dropout=0.0))
    pm = _perturbed(get_peft_model(m, LoraConfig(r=4, target_modules=["query_key_value", "dense", "dense_h_to_4h",
                                                                      "dense_4h_to_h"], init_lora_weights=False)))
    pm.train()
    _check(pm, {"input_ids": _ids(64)})


@needs_peft
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bert_classifier_dropout_before_qkv_fuses_and_matches(mode):
    """BERT's embedding dropout (and each layer's output dropout) feeds query / key / value: both the base
    layer and PEFT's lora_A read the dropout's output. In train mode that dropout is active (one draw,
    shared by base and adapter, so the fused op is still exact)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=48,
                                                 max_position_embeddings=32, attention_probs_dropout_prob=0.0,
                                                 classifier_dropout=0.0, hidden_dropout_prob=0.1))
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=["query", "key", "value"], init_lora_weights=False,
                                      task_type="SEQ_CLS"))
    for n, p in pm.named_parameters():  # the classifier PEFT adds to modules_to_save stays out of the comparison
        p.requires_grad_("lora_" in n)
    _perturbed(pm).train(mode == "train")
    _check(pm, {"input_ids": _ids(64)})


@needs_peft
def test_t5_wo_and_cross_attention_after_dropout_fuse_and_match():
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                            num_decoder_layers=1, num_heads=2, dropout_rate=0.0))
    pm = _perturbed(get_peft_model(m, LoraConfig(r=4, target_modules=["q", "k", "v", "wo"], init_lora_weights=False)))
    pm.eval()
    ids = _ids(64)
    rep = _check(pm, {"input_ids": ids, "decoder_input_ids": ids})
    assert len(rep.sites) == 2 * 4 + 3  # encoder: self-attn q/k/v + wo; decoder: self + cross q/k/v + wo


# ------------------------------------------------------------------------------------------------
# transformers + bitsandbytes 4-bit (nf4, double quant) + PEFT: the LoRA joins pyhappy::quant_linear
# ------------------------------------------------------------------------------------------------


@needs_bnb
def test_transformers_bnb_4bit_qlora_fuses_lora_into_quant_linear(tmp_path):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    m = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=q, dtype=torch.float32, device_map="cpu")
    targets = ["q_proj", "v_proj", "down_proj"]
    pm = _perturbed(get_peft_model(m, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)))
    layers = _lora_layers(pm)
    assert len(layers) == 3 and all(isinstance(x, PeftLinear4bit) for x in layers)  # PEFT's bnb forward
    assert all(x.get_base_layer().weight.quant_state.nested for x in layers)
    pm.train()
    rep = _check(pm, {"input_ids": _ids(64, (2, 12))})
    kinds = [s["kind"] for s in rep.sites]
    assert kinds.count("qlora") == 3 and kinds.count("quant") == 4, str(rep)  # and the 4 frozen bases alone


def _repacked_linear4bit(quant_type="nf4", nested=True):
    """A bitsandbytes Linear4bit whose weight bitsandbytes has repacked into its CPU layout (what its no-grad
    eval forward does on CPUs with AVX512-BF16), done here by calling bitsandbytes' repack directly."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(64, 32, bias=True, quant_type=quant_type, compute_dtype=torch.float32,
                            compress_statistics=nested)
    lin.load_state_dict(nn.Linear(64, 32).state_dict())
    lin = lin.to("cpu")
    lin.bias.requires_grad_(False)
    import copy

    # the weight as bitsandbytes multiplies by after the repack: the same codes, absmax rounded to bfloat16
    w, qs = lin.weight.data, copy.deepcopy(lin.weight.quant_state)
    if qs.nested:
        qs.absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        qs.nested = False
    qs.absmax = qs.absmax.float().bfloat16().float()
    dense = bnb.functional.dequantize_4bit(w, qs)
    lin.weight.data, lin.weight.quant_state = _convert_weight_packed_for_cpu(lin.weight.data, lin.weight.quant_state)
    assert lin.weight.quant_state.packing_format_for_cpu and lin.weight.shape == (32, 32)
    return lin, dense


@needs_bnb
def test_nf4_reads_bitsandbytes_cpu_layout_back_bit_exactly():
    import bitsandbytes.functional as bF
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from pyhappy.quant import QuantizedWeight
    from pyhappy.quant.nf4 import bnb_cpu_layout_to_standard, is_bnb_cpu_layout

    for nested in (False, True):
        w = torch.randn(64, 128)
        p, st = bF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        absmax = (bF.dequantize_blockwise(st.absmax, st.state2) + st.offset) if nested else st.absmax
        p0 = p.clone()
        pc_, st_c = _convert_weight_packed_for_cpu(p, st)
        assert is_bnb_cpu_layout(st_c)
        std, am = bnb_cpu_layout_to_standard(pc_, st_c.absmax, 64, 128, 64)
        assert torch.equal(std, p0) and torch.equal(am, absmax.float().bfloat16().float())
        qw = QuantizedWeight.from_bnb(pc_, st_c)
        codes, qabs, _ = qw.codes()
        assert torch.equal(((codes.reshape(-1)[0::2] << 4) | codes.reshape(-1)[1::2]).unsqueeze(1), p0)
        assert torch.equal(qabs.reshape(-1), am)
        # the compiler's op over the same conversion: the packed weight pyhappy's kernels read, its fake
        # kernel and schema checked by opcheck
        cpu_pack = pc._bnb_cpu_pack_op()
        args = (pc_, st_c.absmax, 64, 128, 64, 3)
        qd, qa = cpu_pack(*args)
        assert torch.equal(qd, qw.data["qdata"]) and torch.equal(qa, qw.data["absmax"])
        torch.library.opcheck(torch.ops.pyhappy.bnb_nf4_cpu_pack, args)


@needs_bnb
def test_bnb_cpu_layout_weight_fuses_with_its_lora():
    from peft import LoraConfig, get_peft_model

    lin, dense = _repacked_linear4bit()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = lin

        def forward(self, x):
            return self.proj(x)

    pm = _perturbed(get_peft_model(Net(), LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False)))
    pm.eval()
    layer = _lora_layers(pm)[0]
    x = torch.randn(40, 64)
    torch._dynamo.reset()
    inner, graphs = _capture()
    be = pc.make_backend(inner=inner)
    with torch.no_grad():
        got = torch.compile(pm, backend=be, fullgraph=True)(x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = F.linear(x, dense, lin.bias) + F.linear(F.linear(x, A), B) * layer.scaling["default"]
    assert _rel(got, want) < 1e-5, _rel(got, want)
    rep = be.reports[0]
    assert [s["kind"] for s in rep.sites] == ["qlora"] and not rep.near_misses, str(rep)
    assert not any("bitsandbytes" in str(n.target) for n in graphs[0].graph.nodes)
    torch._dynamo.reset()
    with torch.no_grad():  # and through Inductor
        got = torch.compile(pm, backend=pc.make_backend(), fullgraph=True)(x)
    assert _rel(got, want) < 1e-5, _rel(got, want)


@needs_bnb
def test_bnb_cpu_layout_near_misses_are_reported_not_skipped():
    import bitsandbytes as bnb

    lin, _ = _repacked_linear4bit(quant_type="fp4", nested=False)
    torch._dynamo.reset()
    inner, _ = _capture()
    be = pc.make_backend(inner=inner)
    with torch.no_grad():
        torch.compile(lin, backend=be, fullgraph=True)(torch.randn(40, 64))
    rep = be.reports[0]
    assert len(rep) == 0 and any("fp4" in why for _, why in rep.near_misses), str(rep)
    # The repack itself traced into the graph (the first no-grad eval forward on an AVX512-BF16 CPU; forced
    # here through the module's flag): the graph reads the weight from before the repack, so it is left alone.
    torch.manual_seed(0)
    fresh = bnb.nn.Linear4bit(64, 32, bias=True, quant_type="nf4", compute_dtype=torch.float32).to("cpu").eval()
    fresh.bias.requires_grad_(False)
    fresh.support_avx512bf16_for_cpu = True
    torch._dynamo.reset()
    be = pc.make_backend(inner=inner)
    with torch.no_grad():
        torch.compile(fresh, backend=be, fullgraph=True)(torch.randn(40, 64))
    rep = be.reports[0]
    assert len(rep) == 0 and len(rep.near_misses) == 1 and "inside the compiled graph" in rep.near_misses[0][1], str(rep)


# ------------------------------------------------------------------------------------------------
# sites left alone are all in the report; a graph with nothing fused says why, once
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")
def test_every_unfused_low_rank_product_is_reported_and_nothing_fused_warns_once(caplog):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(3, 24, 32))
            self.A, self.B = nn.Linear(32, 4, bias=False), nn.Linear(4, 24, bias=False)
            self.A2, self.B2 = nn.Linear(32, 4, bias=False), nn.Linear(4, 24, bias=False)

        def forward(self, x):
            base = torch.bmm(x, self.W.transpose(1, 2))  # a base pyhappy does not know
            y = base + self.B(self.A(x)) * 2.0
            return y, torch.tanh(self.B2(self.A2(x)))  # a low-rank product not added to anything

    torch._dynamo.reset()
    m = Odd()
    x = torch.randn(3, 5, 32)
    inner, _ = _capture()
    be = pc.make_backend(inner=inner)
    cm = torch.compile(m, backend=be, fullgraph=True)
    with caplog.at_level(logging.WARNING, logger="pyhappy.compiler"):
        for a, b in zip(cm(x), m(x)):
            torch.testing.assert_close(a, b)
        cm(x)
        torch._dynamo.reset()
        cm = torch.compile(m, backend=be, fullgraph=True)
        cm(x)  # compiled again: the same message is not repeated
    rep = be.reports[0]
    reasons = [why for _, why in rep.near_misses]
    assert len(rep) == 0 and len(reasons) == 2, str(rep)
    assert any("bmm" in r and "not a base layer" in r for r in reasons), reasons
    assert any("tanh" in r for r in reasons), reasons
    warnings = [r for r in caplog.records if r.name == "pyhappy.compiler"]
    assert len(warnings) == 1 and "nothing fused" in warnings[0].getMessage(), warnings
    assert "bmm" in warnings[0].getMessage()
