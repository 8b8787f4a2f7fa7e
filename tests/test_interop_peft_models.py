"""PEFT fidelity on real transformers architectures: every trained tensor of a PEFT LoRA model
(LoRA weights, modules_to_save copies, trained biases, several adapters) survives from_peft,
save_peft_adapter, load_peft_adapter and unload, with PEFT itself as the oracle. Skipped without
peft + transformers (optional test oracles)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re

import pytest
import torch
from helpers import HF_VOCAB as V
from helpers import assert_close_rel as close
from helpers import assert_failed_apply_rolls_back
from helpers import bnb_float_path
from helpers import assert_same_state as assert_same
from helpers import assert_unload_matches_peft
from helpers import hf_inputs as inputs
from helpers import hf_model as build
from helpers import logits_and_grads as grads
from helpers import module_state as state
from helpers import train_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyhappy
from pyhappy.nn import LoRALinear, MultiLoRALinear

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None,
    reason="peft + transformers not installed (optional oracles)")


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ours(name, multi):
    """The name a PEFT parameter has in the converted model."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    if multi:
        return re.sub(r"\.(lora_[AB])\.([^.]+)\.weight$", r".adapters.\2.\1.weight", name)
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)


CASES = {
    "llama-modules_to_save-layers_to_transform": ("llama", dict(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], layers_to_transform=[1],
        layers_pattern="layers")),
    "gpt2-conv1d-bias_all": ("gpt2", dict(r=4, target_modules=["c_attn"], bias="all", fan_in_fan_out=True)),
    "gpt2-lora_only-head": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], bias="lora_only",
                                         fan_in_fan_out=True, modules_to_save=["lm_head"])),
    # bias="all" with a copy that has a bias (ln_f): PEFT's extra original_module / modules_to_save keys
    "gpt2_cls-bias_all-score-ln_f": ("gpt2-cls", dict(r=4, target_modules=["c_attn"], bias="all", fan_in_fan_out=True,
                                                      modules_to_save=["score", "ln_f"])),
    "qwen2-lora_only-patterns": ("qwen2", dict(r=4, target_modules=["q_proj", "k_proj", "v_proj"], bias="lora_only",
                                               rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3})),
    "falcon-rslora-bias_all": ("falcon", dict(r=4, target_modules=["query_key_value", "dense"], use_rslora=True,
                                              bias="all")),
    "bert-seq_cls-dropout": ("bert", dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                          lora_dropout=0.1)),
    # a modules_to_save copy with sub-modules (dense, out_proj) and bias="all": PEFT's extra keys
    "roberta-seq_cls-bias_all": ("roberta", dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                 bias="all")),
    "t5-wo-head": ("t5", dict(r=4, target_modules=["q", "v", "wo"], modules_to_save=["lm_head"])),
    "vit-classifier": ("vit", dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_model_converts_saves_loads_and_unloads_without_loss(case, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    arch, kw = CASES[case]
    x = inputs(arch)
    pm = get_peft_model(build(arch), LoraConfig(**kw))
    train_like(pm)
    pm.eval()
    want, want_g = grads(pm, x)
    n_train = trainable(pm)
    pm.save_pretrained(tmp_path / "peft")

    # from_peft: same logits, same gradients for every trainable tensor, same trainable count.
    conv = pyhappy.from_peft(copy.deepcopy(pm))
    assert not any(type(m).__module__.startswith("peft") for m in conv.modules())
    got, got_g = grads(conv, x)
    close(got, want)
    assert trainable(conv) == n_train
    assert {ours(n, False) for n in want_g} == set(got_g)
    for n, g in want_g.items():
        close(got_g[ours(n, False)], g)

    # pyhappy's save -> PEFT, and PEFT's save -> pyhappy's load.
    pyhappy.save_peft_adapter(conv, tmp_path / "ours")
    close(PeftModel.from_pretrained(build(arch), tmp_path / "ours").eval()(**x).logits, want)
    loaded = pyhappy.load_peft_adapter(build(arch), tmp_path / "peft")
    close(loaded(**x).logits, want)
    assert trainable(loaded) == n_train
    pyhappy.save_peft_adapter(loaded, tmp_path / "again")  # and once more through pyhappy
    close(pyhappy.load_peft_adapter(build(arch), tmp_path / "again")(**x).logits, want)

    assert_unload_matches_peft(conv, pm, arch, x, want)


def test_gpt2_unload_merge_saves_and_reloads_as_gpt2(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    pm = get_peft_model(build("gpt2"), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    train_like(pm)
    x = inputs("gpt2")
    want = pm.eval()(**x).logits
    merged = pyhappy.unload(pyhappy.from_peft(pm), merge=True)
    merged.save_pretrained(tmp_path)
    close(GPT2LMHeadModel.from_pretrained(tmp_path).eval()(**x).logits, want)


@pytest.mark.parametrize("active", ["default", "second"])
def test_two_peft_adapters_on_different_layers(active, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    pm = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    pm.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "q_proj"], lora_dropout=0.1))
    train_like(pm)
    for n, p in pm.named_parameters():
        p.requires_grad_(False)
    pm.set_adapter(active)  # PEFT makes the active adapter (alone) trainable
    pm.eval()
    x = inputs("llama")
    want, want_g = grads(pm, x)
    conv = pyhappy.from_peft(copy.deepcopy(pm))
    lay = conv.model.layers[0].self_attn
    assert isinstance(lay.q_proj, MultiLoRALinear) and list(lay.v_proj.adapters) == ["second"]
    got, got_g = grads(conv, x)
    close(got, want)
    assert {ours(n, True) for n in want_g} == set(got_g)
    for n, g in want_g.items():
        close(got_g[ours(n, True)], g)

    # Both adapters saved in PEFT's layout (default at the root, the other in a sub-directory) and
    # loaded back, by PEFT and by pyhappy, each directory under its name.
    pyhappy.save_peft_adapter(conv, tmp_path / "ours")
    assert os.path.isfile(tmp_path / "ours" / "second" / "adapter_config.json")
    back = PeftModel.from_pretrained(build("llama"), tmp_path / "ours")
    back.load_adapter(str(tmp_path / "ours" / "second"), "second")
    back.set_adapter(active)
    close(back.eval()(**x).logits, want)
    pm.save_pretrained(tmp_path / "peft")
    plain = pyhappy.load_peft_adapter(build("llama"), tmp_path / "peft")
    pyhappy.load_peft_adapter(plain, tmp_path / "peft" / "second", adapter_name="second")
    assert not plain.model.layers[0].self_attn.v_proj.adapters["second"].active  # loaded inactive, as in PEFT
    pyhappy.set_adapter(plain, active, only=True)
    close(plain(**x).logits, want)
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        pyhappy.load_peft_adapter(plain, tmp_path / "peft" / "second", adapter_name="second")


def test_switching_adapters_switches_which_one_trains():
    """pyhappy.set_adapter(model, name, only=True) after from_peft: as PEFT's set_adapter, the adapter
    switched to is the one that trains (its gradients equal PEFT's), the other is frozen."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    train_like(pm)
    pm.eval()
    conv = pyhappy.from_peft(copy.deepcopy(pm))
    x = inputs("llama")
    for a in ("b", "default", "b"):
        pm.set_adapter(a)
        pyhappy.set_adapter(conv, a, only=True)
        want, want_g = grads(pm, x)
        got, got_g = grads(conv, x)
        close(got, want)
        assert {ours(n, True) for n in want_g} == set(got_g), a
        for n, g in want_g.items():
            close(got_g[ours(n, True)], g)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_two_adapters_one_with_trained_biases(arch, tmp_path):
    """The default adapter trains the biases (bias="lora_only"), the second does not (PEFT allows one
    adapter with biases). PEFT's save writes the biases of every LoRA layer of the model with the
    default adapter, those of layers only the second adapter targets included; pyhappy loads that,
    and its own save gives the biases to the adapter in the root directory alone, so that PEFT loads
    both adapters back."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if arch == "qwen2":
        first, second = ["q_proj", "v_proj"], ["q_proj", "k_proj"]
        kw = {}
    else:  # GPT-2's Conv1D layers
        first, second = ["c_attn"], ["c_attn", "c_proj"]
        kw = dict(fan_in_fan_out=True)
    pm = get_peft_model(build(arch), LoraConfig(r=4, target_modules=first, bias="lora_only", **kw))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=second, **kw))
    for n, p in pm.named_parameters():
        if ".b." in n:
            p.requires_grad_(True)
    train_like(pm)
    pm.eval()
    x = inputs(arch)
    want = {}
    with torch.no_grad():
        for a in ("default", "b"):
            pm.set_adapter(a)
            want[a] = pm(**x).logits
    pm.save_pretrained(tmp_path / "peft")

    def check(model, set_active):
        with torch.no_grad():
            for a in ("default", "b"):
                set_active(model, a)
                close(model(**x).logits, want[a])

    loaded = pyhappy.load_peft_adapter(build(arch), tmp_path / "peft")
    pyhappy.load_peft_adapter(loaded, tmp_path / "peft" / "b", adapter_name="b")
    check(loaded, lambda m, a: pyhappy.set_adapter(m, a, only=True))
    pyhappy.save_peft_adapter(loaded, tmp_path / "ours")
    for d, mode in ((tmp_path / "ours", "lora_only"), (tmp_path / "ours" / "b", "none")):
        assert json.loads((d / "adapter_config.json").read_text())["bias"] == mode
    back = PeftModel.from_pretrained(build(arch), tmp_path / "ours")
    back.load_adapter(str(tmp_path / "ours" / "b"), "b")
    check(back.eval(), lambda m, a: m.set_adapter(a))
    again = pyhappy.load_peft_adapter(build(arch), tmp_path / "ours")
    pyhappy.load_peft_adapter(again, tmp_path / "ours" / "b", adapter_name="b")
    check(again, lambda m, a: pyhappy.set_adapter(m, a, only=True))


DORA_CASES = {
    "llama-dora": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen2-dora-bias_all": ("qwen2", dict(r=4, target_modules=["q_proj", "v_proj"], bias="all")),
    "gpt2-dora-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True)),
}


def ours_dora(name):
    """ours() for a DoRA model: PEFT's lora_magnitude_vector.<adapter>.weight is our lora_magnitude_vector."""
    return re.sub(r"\.lora_magnitude_vector\.[^.]+\.weight$", ".lora_magnitude_vector", ours(name, False))


@pytest.mark.parametrize("case", list(DORA_CASES))
def test_peft_dora_model_converts_saves_loads_and_unloads(case, tmp_path):
    """LoraConfig(use_dora=True): from_peft carries every magnitude exactly and matches PEFT's logits
    and every gradient (A, B, magnitude, trained biases); the adapter files pyhappy writes have
    PEFT's keys and load in PEFT; PEFT's files load in pyhappy; unload merges or gives the base back."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    arch, kw = DORA_CASES[case]
    x = inputs(arch)
    pm = get_peft_model(build(arch), LoraConfig(use_dora=True, lora_dropout=0.0, **kw))
    train_like(pm)  # the magnitudes too: no longer the row norms PEFT initialised them to
    pm.eval()
    want, want_g = grads(pm, x)
    n_train = trainable(pm)
    pm.save_pretrained(tmp_path / "peft")

    conv = pyhappy.from_peft(copy.deepcopy(pm))
    dora = [m for m in conv.modules() if isinstance(m, LoRALinear)]
    assert dora and all(m.use_dora for m in dora)
    mags = {n: p for n, p in pm.named_parameters() if "lora_magnitude_vector" in n}
    assert len(mags) == len(dora)
    assert all(torch.equal(conv.get_parameter(ours_dora(n)), p) for n, p in mags.items())
    got, got_g = grads(conv, x)
    close(got, want)
    assert trainable(conv) == n_train and {ours_dora(n) for n in want_g} == set(got_g)
    for n, g in want_g.items():
        close(got_g[ours_dora(n)], g)

    pyhappy.save_peft_adapter(conv, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    close(PeftModel.from_pretrained(build(arch), tmp_path / "ours").eval()(**x).logits, want)
    loaded = pyhappy.load_peft_adapter(build(arch), tmp_path / "peft")
    got, got_g = grads(loaded, x)
    close(got, want)
    assert trainable(loaded) == n_train
    for n, g in want_g.items():
        close(got_g[ours_dora(n)], g)

    assert_unload_matches_peft(conv, pm, arch, x, want)


def test_unsupported_peft_models_are_refused_before_anything_changes():
    from peft import IA3Config, LoraConfig, get_peft_model

    cases = [
        (IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), NotImplementedError,
         "only LoRA"),
        (LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]), NotImplementedError, "embedding"),
        # LoRA variants that compute something else than LoRA: never converted as plain LoRA
        (LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]), NotImplementedError,
         "layer_replication"),
        (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[5, 6]), NotImplementedError,
         "alora_invocation_tokens"),
    ]
    try:
        from peft import KasaConfig
        cases.append((LoraConfig(r=4, target_modules=["q_proj"], kasa_config=KasaConfig()), NotImplementedError,
                      "kasa_config"))
    except ImportError:  # a PEFT without KaSA
        pass
    for cfg, err, msg in cases:
        pm = get_peft_model(build("llama"), cfg)
        before = state(pm)
        with pytest.raises(err, match=msg):
            pyhappy.from_peft(pm)
        assert_same(state(pm), before)
    # a modules_to_save copy of an adapter that is not the active one
    pm = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    pm.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    before = state(pm)
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        pyhappy.from_peft(pm)
    assert_same(state(pm), before)


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_dora_pyhappy_cannot_represent_is_refused_before_anything_changes(tmp_path):
    """DoRA with several adapters (MultiLoRALinear has no DoRA), on an embedding or a Conv2d: refused
    naming the layer and the reason, the model as it was. The same for load_peft_adapter: a DoRA
    adapter as a second adapter, a second adapter into a DoRA model; and save_peft_adapter for an
    adapter mixing DoRA and LoRA. (DoRA on a quantized base, QDoRA: tests/test_qdora.py.)"""
    from peft import LoraConfig, get_peft_model


    two = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    two.add_adapter("other", LoraConfig(r=4, target_modules=["v_proj"]))
    cases = [
        (two, "q_proj uses DoRA .*several adapters"),
        (get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], use_dora=True)),
         "embed_tokens is a LoRA embedding.*DoRA"),
        (get_peft_model(_ConvNet(), LoraConfig(r=2, target_modules=["conv", "fc"], use_dora=True)),
         "conv wraps a Conv2d.*DoRA"),
    ]
    for pm, msg in cases:
        before = state(pm)
        with pytest.raises(NotImplementedError, match=msg):
            pyhappy.from_peft(pm)
        assert_same(state(pm), before)

    save_peft(tmp_path / "dora", use_dora=True)
    save_peft(tmp_path / "lora")
    refusals = []
    model = build("qwen2")
    pyhappy.inject(model, ["o_proj"], r=2)
    refusals.append((model, tmp_path / "dora", "second", "uses DoRA .*already holds adapter"))
    model = pyhappy.load_peft_adapter(build("qwen2"), tmp_path / "dora")
    refusals.append((model, tmp_path / "lora", "second", "is a DoRA layer"))
    for model, path, name, msg in refusals:
        before = state(model)
        with pytest.raises(NotImplementedError, match=msg):
            pyhappy.load_peft_adapter(model, path, adapter_name=name)
        assert_same(state(model), before)

    model = build("qwen2")
    pyhappy.inject(model, ["q_proj"], r=2, use_dora=True)
    attn = model.model.layers[0].self_attn
    attn.v_proj = LoRALinear.from_linear(attn.v_proj, r=2)
    with pytest.raises(ValueError, match="use_dora is one flag per adapter"):
        pyhappy.save_peft_adapter(model, tmp_path / "mixed")
    assert not os.path.exists(tmp_path / "mixed" / "adapter_config.json")


def save_peft(tmp_path, **kw):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(build("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kw))
    train_like(pm)
    pm.save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_a_late_failure_in_load_peft_adapter_changes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    save_peft(tmp_path, bias="lora_only", modules_to_save=["lm_head"])
    wfile = tmp_path / "adapter_model.safetensors"
    good = load_file(wfile)
    last_q = sorted(k for k in good if "layers.1.self_attn.v_proj.lora_B" in k)[0]
    bad_files = {
        "missing tensor": {k: v for k, v in good.items() if k != last_q},
        "wrong shape": {**good, last_q: torch.zeros(3, 3)},
        "int tensor": {**good, last_q: good[last_q].to(torch.int32)},
        "tensor left over": {**good, "base_model.model.model.nowhere.lora_A.weight": torch.zeros(4, 32)},
        "missing head": {k: v for k, v in good.items() if "lm_head" not in k},
        "missing bias": {k: v for k, v in good.items() if "v_proj.base_layer.bias" not in k},
    }
    for what, tensors in bad_files.items():
        save_file(tensors, wfile)
        model = build("qwen2")
        before = state(model)
        with pytest.raises((KeyError, ValueError, TypeError)):
            pyhappy.load_peft_adapter(model, tmp_path)
        assert_same(state(model), before), what


BAD_CONFIGS = [
    ({"r": "four"}, TypeError, "r must be an int"),
    ({"r": None}, TypeError, "r must be an int"),
    ({"r": [4]}, TypeError, "r must be an int"),
    ({"r": 0}, ValueError, "r must be >= 1"),
    ({"lora_alpha": None}, TypeError, "lora_alpha must be a number"),
    ({"lora_alpha": float("nan")}, ValueError, "lora_alpha must be finite"),
    ({"lora_alpha": "16"}, TypeError, "lora_alpha"),
    ({"lora_dropout": 1.5}, ValueError, "lora_dropout"),
    ({"use_rslora": "false"}, TypeError, "use_rslora must be true or false"),
    ({"rank_pattern": [4]}, TypeError, "rank_pattern must be an object"),
    ({"rank_pattern": {"q_proj": "2"}}, TypeError, "rank_pattern"),
    ({"alpha_pattern": {"(": 2}}, ValueError, "alpha_pattern key '\\(' is not a valid regex"),
    ({"target_modules": "(q_proj"}, ValueError, "target_modules is not a valid regex"),
    ({"target_modules": 5}, TypeError, "target_modules must be"),
    ({"exclude_modules": 5}, TypeError, "exclude_modules must be"),
    ({"modules_to_save": "lm_head"}, TypeError, "modules_to_save must be a list"),
    ({"bias": "some"}, ValueError, "bias must be"),
    ({"layers_to_transform": "1"}, TypeError, "layers_to_transform"),
    ({"use_dora": "true"}, TypeError, "use_dora must be true or false"),
    ({"use_dora": True}, KeyError, "lora_magnitude_vector"),  # a plain LoRA adapter's weights
    ({"lora_bias": True}, NotImplementedError, "lora_bias"),
    ({"peft_type": "IA3"}, ValueError, "only LoRA"),
]


@pytest.mark.parametrize("change,err,msg", BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_bad_adapter_config_fields_are_refused_by_name(change, err, msg, tmp_path):
    cfg = save_peft(tmp_path)
    cfg.update(change)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = build("qwen2")
    before = state(model)
    with pytest.raises(err, match=msg):
        pyhappy.load_peft_adapter(model, tmp_path)
    assert_same(state(model), before)


def test_adapter_config_files_that_are_not_configs(tmp_path):
    save_peft(tmp_path)
    for text, msg in (("", "is empty"), ("{r: 4", "not valid JSON"), ("[1, 2]", "JSON object")):
        (tmp_path / "adapter_config.json").write_text(text)
        with pytest.raises((ValueError, TypeError), match=msg):
            pyhappy.load_peft_adapter(build("qwen2"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no directory"):
        pyhappy.load_peft_adapter(build("qwen2"), tmp_path / "nowhere")


def test_missing_config_fields_take_peft_defaults(tmp_path):
    from peft import PeftModel

    cfg = save_peft(tmp_path, lora_alpha=8)
    del cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    x = inputs("qwen2")
    want = PeftModel.from_pretrained(build("qwen2"), tmp_path).eval()(**x).logits
    model = pyhappy.load_peft_adapter(build("qwen2"), tmp_path)
    assert model.model.layers[0].self_attn.q_proj.scaling == 8 / 4
    close(model(**x).logits, want)


def test_save_refuses_trainable_tensors_peft_cannot_hold(tmp_path):
    model = build("llama")
    pyhappy.inject(model, ["q_proj"], r=4)
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="model.norm.weight"):
        pyhappy.save_peft_adapter(model, tmp_path)
    assert not os.path.exists(tmp_path / "adapter_config.json")
    model.model.norm.weight.requires_grad_(False)
    pyhappy.save_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["bias"] == "none"


def test_loaded_adapters_follow_the_models_eval_mode(tmp_path):
    save_peft(tmp_path, lora_dropout=0.5)
    model = pyhappy.load_peft_adapter(build("qwen2"), tmp_path)
    assert all(not m.training for m in model.modules() if isinstance(m, LoRALinear))
    x = inputs("qwen2")
    torch.testing.assert_close(model(**x).logits, model(**x).logits)


def test_transformers_bitsandbytes_qlora_stack(tmp_path):
    """transformers' BitsAndBytesConfig 4-bit model (NF4, double quantization) + get_peft_model:
    converted to QLoRALinear on the same packed weight, saved and loaded both ways, and unloaded back
    to bitsandbytes' Linear4bit holding the identical bytes."""
    pytest.importorskip("bitsandbytes")
    import transformers as T
    from peft import LoraConfig, PeftModel, get_peft_model

    from pyhappy.nn import QLoRALinear

    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "base")

    def q4():
        bnb_cfg = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32)
        return bnb_float_path(T.LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_cfg,
                                                                 dtype=torch.float32).eval())

    pm = get_peft_model(q4(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                         modules_to_save=["lm_head"]))
    train_like(pm)
    pm.eval()
    # 21 rows: the quantized layers' GEMM path (the decode path, M <= 16, is tested in test_quant_linear)
    x = {"input_ids": torch.randint(1, V, (3, 7), generator=torch.Generator().manual_seed(1))}
    want, want_g = grads(pm, x)
    pm.save_pretrained(tmp_path / "peft")
    conv = pyhappy.from_peft(copy.deepcopy(pm))
    assert isinstance(conv.model.layers[0].mlp.down_proj, QLoRALinear)
    got, got_g = grads(conv, x)
    close(got, want)
    assert trainable(conv) == trainable(pm) and {ours(n, False) for n in want_g} == set(got_g)
    for n, g in want_g.items():
        close(got_g[ours(n, False)], g)
    pyhappy.save_peft_adapter(conv, tmp_path / "ours")
    close(PeftModel.from_pretrained(q4(), tmp_path / "ours").eval()(**x).logits, want)
    close(pyhappy.load_peft_adapter(q4(), tmp_path / "peft")(**x).logits, want)
    plain = pyhappy.unload(conv)
    fresh = q4()
    for name in ("q_proj", "v_proj"):
        a, b = getattr(plain.model.layers[1].self_attn, name), getattr(fresh.model.layers[1].self_attn, name)
        assert type(a) is type(b) and torch.equal(a.weight.data, b.weight.data)
    torch.testing.assert_close(plain(**x).logits, fresh(**x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("bias,dora", [("lora_only", False), ("all", False), ("all", True)])
def test_trained_biases_load_into_a_bitsandbytes_4bit_model(bias, dora, tmp_path):
    """A 4-bit base whose adapted layers have biases (Qwen2's q/k/v): the trained biases land in the
    QLoRALinear layers that replace bitsandbytes' Linear4bit (not in the layers replaced), trainable,
    and survive a save back to PEFT."""
    pytest.importorskip("bitsandbytes")
    import transformers as T
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "base")

    def q4():
        bnb_cfg = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.float32)
        return bnb_float_path(T.Qwen2ForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_cfg,
                                                                 dtype=torch.float32).eval())

    pm = get_peft_model(q4(), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], bias=bias,
                                         use_dora=dora))
    train_like(pm)
    pm.eval()
    x = {"input_ids": torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        want = pm(**x).logits
    pm.save_pretrained(tmp_path / "peft")
    loaded = pyhappy.load_peft_adapter(q4(), tmp_path / "peft")
    with torch.no_grad():
        close(loaded(**x).logits, want)
    q = loaded.model.layers[0].self_attn.q_proj
    trained = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias
    assert q.bias.requires_grad and torch.equal(q.bias.detach(), trained.detach())
    assert trainable(loaded) == trainable(pm)
    pyhappy.save_peft_adapter(loaded, tmp_path / "ours")
    with torch.no_grad():
        close(PeftModel.from_pretrained(q4(), tmp_path / "ours").eval()(**x).logits, want)


@pytest.mark.parametrize("dora", [False, True])
def test_float32_adapters_of_a_bf16_model_are_kept_in_float32(dora, tmp_path):
    """PEFT keeps a bf16 model's adapters in float32 (autocast_adapter_dtype): from_peft, the load and
    the save keep them bit for bit (the base computes in bf16, the adapter is cast per call), the
    gradients land in the float32 parameters, and a second adapter keeps the first's dtype."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    def base():
        return build("llama").to(torch.bfloat16)

    pm = get_peft_model(base(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=dora))
    train_like(pm, scale=0.05)
    pm.eval()
    adapter = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert {p.dtype for p in adapter.values()} == {torch.float32}
    x = inputs("llama")
    with torch.no_grad():
        want = pm(**x).logits.float()
    pm.save_pretrained(tmp_path / "peft")
    peft_saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")

    conv = pyhappy.from_peft(copy.deepcopy(pm))
    loaded = pyhappy.load_peft_adapter(base(), tmp_path / "peft")
    for model in (conv, loaded):
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert {p.dtype for p in trained.values()} == {torch.float32} and len(trained) == len(adapter)
        with torch.no_grad():
            close(model(**x).logits.float(), want, rel=3e-2)
        model(**x).logits.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained.values())
        pyhappy.save_peft_adapter(model, tmp_path / "ours")
        ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        assert set(ours) == set(peft_saved) and all(torch.equal(ours[k], peft_saved[k]) for k in ours)
    if not dora:  # a second adapter makes MultiLoRALinear layers: the first adapter stays float32
        pm.save_pretrained(tmp_path / "two")
        pyhappy.load_peft_adapter(loaded, tmp_path / "two", adapter_name="second")
        layer = loaded.model.layers[0].self_attn.q_proj
        assert isinstance(layer, MultiLoRALinear)
        assert {p.dtype for p in layer.adapters.parameters()} == {torch.float32}
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        assert torch.equal(layer.adapters["default"].lora_A.weight, peft_saved[key])
        with torch.no_grad():
            close(loaded(**x).logits.float(), want, rel=3e-2)


@pytest.mark.parametrize("changed_base", [False, True])
def test_an_adapter_on_lm_head_loads_with_the_base_weight_peft_saves(changed_base, tmp_path):
    """A LoRA on lm_head: PEFT's save also writes lm_head.base_layer.weight (save_embedding_layers
    "auto"), and its load writes that into the base layer; so does load_peft_adapter (a base weight
    that differs from the model's, e.g. after resizing or training the head, included)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    pm = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    train_like(pm)
    if changed_base:
        with torch.no_grad():
            pm.base_model.model.lm_head.base_layer.weight.mul_(1.5)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    x = inputs("llama")
    with torch.no_grad():
        want = PeftModel.from_pretrained(build("llama"), tmp_path / "peft").eval()(**x).logits
        close(pm(**x).logits, want)
        loaded = pyhappy.load_peft_adapter(build("llama"), tmp_path / "peft")
        close(loaded(**x).logits, want)
    assert not loaded.lm_head.weight.requires_grad


@pytest.mark.parametrize("entry", ["load_peft_adapter", "from_peft"])
def test_a_failure_while_applying_rolls_the_model_back(entry, tmp_path, monkeypatch):
    """Validation catches bad input before any change; should the apply step still fail (here: the
    third module swap raises), the model is put back exactly as it was."""
    from peft import LoraConfig, get_peft_model

    if entry == "load_peft_adapter":
        save_peft(tmp_path, bias="lora_only", modules_to_save=["lm_head"])
        model = build("qwen2")
    else:
        model = get_peft_model(build("gpt2"), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], bias="lora_only",
                                                          fan_in_fan_out=True, modules_to_save=["lm_head"]))
        train_like(model)
    assert_failed_apply_rolls_back(monkeypatch, model, pyhappy.from_peft if entry == "from_peft" else
                                   lambda m: pyhappy.load_peft_adapter(m, tmp_path))


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=6), st.lists(st.integers(0, 3), max_size=3),
                  st.dictionaries(st.text(max_size=4), st.integers(-1, 9), max_size=2))
_FIELDS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out", "bias", "target_modules",
           "exclude_modules", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
           "modules_to_save", "use_dora", "peft_type"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _JUNK, min_size=1, max_size=3))
def test_malformed_adapter_configs_load_or_are_refused_by_name_leaving_the_model_as_it_was(changes, tmp_path_factory):
    """Any adapter_config.json either loads (a valid config) or is refused with an error that names
    a config field (or the tensor the config does not fit), and a refused load changes nothing."""
    d = tmp_path_factory.mktemp("cfg")
    cfg = _QWEN_SAVED(d)
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    model = build("qwen2")
    before = state(model)
    try:
        pyhappy.load_peft_adapter(model, d)
    except (TypeError, ValueError, KeyError, NotImplementedError) as e:
        msg = str(e)
        assert "load_peft_adapter" in msg and (any(f in msg for f in _FIELDS) or "tensor" in msg or "matched no" in msg
                                               or "layer" in msg), msg
        assert_same(state(model), before)


def _QWEN_SAVED(d, _cache={}):
    """A saved qwen2 LoRA directory's config (the weights copied once per directory)."""
    import shutil

    if "dir" not in _cache:
        import tempfile

        src = tempfile.mkdtemp()
        save_peft(__import__("pathlib").Path(src))
        _cache["dir"] = src
    shutil.copy(os.path.join(_cache["dir"], "adapter_model.safetensors"), d / "adapter_model.safetensors")
    return json.loads(open(os.path.join(_cache["dir"], "adapter_config.json")).read())
