"""PEFT interop for VeRA and PVeRA (VeraConfig / PveraConfig): from_peft, save_peft_adapter and
load_peft_adapter carry every trained tensor (the lambdas, trained biases, modules_to_save copies)
and the shared projections (saved, or redrawn from projection_prng_key), with PEFT itself as the
oracle for logits, gradients and key names; what cannot be carried is refused before anything
changes. Skipped without peft + transformers (optional oracles)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import warnings

import pytest
import torch
from helpers import assert_close_rel as close
from helpers import assert_failed_apply_rolls_back
from helpers import assert_same_state as assert_same
from helpers import assert_unload_matches_peft
from helpers import hf_inputs as inputs
from helpers import hf_model as build
from helpers import logits_and_grads as grads
from helpers import module_state as state
from helpers import train_like as hf_train_like

import pyhappy
from pyhappy.nn import PVeRALinear, VeRALinear

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None,
                       reason="peft + transformers not installed (optional oracles)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # PEFT warns about save_projection=False
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def train_like(model, seed=3):
    """Perturb every trainable tensor by noise of std 0.3 (lambda_b starts at 0: the adapter would be
    a no-op)."""
    hf_train_like(model, seed, scale=0.3)


def ours(name):
    """The name a PEFT VeRA / PVeRA parameter has in the converted model."""
    name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    return name.rsplit(".", 1)[0] if name.endswith(".default") else name


def config(kind, **kw):
    if kind == "vera":
        from peft import VeraConfig

        return VeraConfig(**kw)
    from peft.tuners.pvera import PveraConfig

    return PveraConfig(**kw)


CASES = {
    "vera-saved-projections": ("llama", "vera", dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "vera-redrawn-projections": ("llama", "vera", dict(r=8, target_modules=["q_proj", "up_proj"],
                                                       save_projection=False, projection_prng_key=7)),
    "pvera-saved-projections": ("llama", "pvera", dict(r=4, target_modules=["k_proj", "o_proj", "down_proj"],
                                                       d_initial=0.2)),
    "pvera-redrawn-dropout-sampling": ("llama", "pvera", dict(r=4, target_modules=["q_proj", "v_proj"],
                                                              save_projection=False, pvera_dropout=0.1,
                                                              sample_at_inference=False)),
    "vera-gpt2-conv1d-layers_to_transform": ("gpt2", "vera", dict(r=8, target_modules=["c_attn", "c_fc"],
                                                                  fan_in_fan_out=True, layers_to_transform=[1],
                                                                  layers_pattern="h")),
    # Trained biases and modules_to_save copies. bias="all" runs on GPT-2 (fused qkv bias): a separate
    # key-projection bias (BERT, Qwen2) gets a gradient that is 0 up to rounding, no test of agreement.
    # ln_f is a copy with a bias, for PEFT's extra original_module / modules_to_save bias keys.
    "vera-gpt2_cls-bias_all-score-ln_f": ("gpt2-cls", "vera", dict(r=8, target_modules=["c_attn", "c_fc"],
                                                                   fan_in_fan_out=True, bias="all",
                                                                   modules_to_save=["score", "ln_f"])),
    "pvera-gpt2_cls-bias_all-score-redrawn": ("gpt2-cls", "pvera", dict(r=4, target_modules=["c_attn"],
                                                                        fan_in_fan_out=True, bias="all",
                                                                        modules_to_save=["score"],
                                                                        save_projection=False)),
    "vera-bert-seq_cls-vera_only": ("bert", "vera", dict(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                         bias="vera_only")),
    "pvera-bert-pvera_only-classifier": ("bert", "pvera", dict(r=4, target_modules=["query", "value", "dense"],
                                                               bias="pvera_only", modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_vera_model_converts_saves_loads_and_unloads(case, tmp_path):
    """Logits and the gradient of every trainable tensor (lambdas, trained biases, modules_to_save
    copies) equal PEFT's (PVeRA in eval mode: its mean path); the files pyhappy writes have PEFT's
    keys, values and config and load in PEFT to the same logits and trainable tensors; PEFT's files
    load in pyhappy; unload merges or gives the base model back."""
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file

    arch, kind, kw = CASES[case]
    x = inputs(arch)
    pm = get_peft_model(build(arch), config(kind, **kw))
    train_like(pm)
    pm.eval()
    want, want_g = grads(pm, x)
    lambdas = [n for n in want_g if f"{kind}_lambda_" in n]
    assert lambdas
    assert any(n.endswith(".bias") for n in want_g) == (kw.get("bias", "none") != "none")
    assert any(".modules_to_save." in n for n in want_g) == bool(kw.get("modules_to_save") or kw.get("task_type"))
    pm.save_pretrained(tmp_path / "peft")
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())

    conv = pyhappy.from_peft(copy.deepcopy(pm))
    cls = PVeRALinear if kind == "pvera" else VeRALinear
    layers = [m for m in conv.modules() if isinstance(m, cls)]
    assert len(layers) == len(lambdas) // 2
    assert len({id(m.projections) for m in layers}) == 1
    assert all(m.dropout == kw.get(f"{kind}_dropout", 0.0) for m in layers)
    got, got_g = grads(conv, x)
    close(got, want)
    assert set(got_g) == {ours(n) for n in want_g}
    for n, g in want_g.items():
        close(got_g[ours(n)], g)

    pyhappy.save_peft_adapter(conv, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for field in ("peft_type", "r", "projection_prng_key", "save_projection", "d_initial", f"{kind}_dropout", "bias"):
        assert cfg[field] == peft_cfg[field], field
    # pyhappy's modules_to_save names the copies' full paths, PEFT's the user's suffixes (SEQ_CLS adds
    # "classifier" and "score"): PEFT resolving both to the same copies shows in the trainable tensors.
    assert bool(cfg["modules_to_save"]) == bool(peft_cfg["modules_to_save"])
    saved, theirs = load_file(tmp_path / "ours" / "adapter_model.safetensors"), \
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(saved) == set(theirs)
    assert all(torch.equal(saved[k], theirs[k]) for k in theirs)
    back = PeftModel.from_pretrained(build(arch), tmp_path / "ours", is_trainable=True)
    assert {n for n, p in back.named_parameters() if p.requires_grad} == set(want_g)
    close(back.eval()(**x).logits, want)

    loaded = pyhappy.load_peft_adapter(build(arch), tmp_path / "peft")
    got, got_g = grads(loaded, x)
    close(got, want)
    assert set(got_g) == {ours(n) for n in want_g}
    for n, g in want_g.items():
        close(got_g[ours(n)], g)
    # What the load made trainable decides the bias mode of a save: the same file again.
    pyhappy.save_peft_adapter(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["bias"] == peft_cfg["bias"]
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert set(again) == set(theirs) and all(torch.equal(again[k], theirs[k]) for k in theirs)

    assert_unload_matches_peft(conv, pm, arch, x, want)


def test_pvera_sampling_settings_round_trip(tmp_path):
    """sample_at_inference and generator_seed go through from_peft, save and load; the seed, which
    pyhappy's sampler cannot follow, is announced with a warning; the sampled path then differs per
    draw while the mean path stays PEFT's."""
    from peft import get_peft_model

    pm = get_peft_model(build(), config("pvera", r=4, target_modules=["q_proj"], sample_at_inference=True,
                                        generator_seed=5))
    train_like(pm)
    with pytest.warns(UserWarning, match="generator_seed"):
        conv = pyhappy.from_peft(copy.deepcopy(pm))
    layers = [m for m in conv.modules() if isinstance(m, PVeRALinear)]
    assert layers and all(m.sample_at_inference for m in layers)
    x = inputs()
    assert not torch.equal(conv(**x).logits, conv(**x).logits)  # sampling in eval mode
    pyhappy.save_peft_adapter(conv, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["sample_at_inference"] is True and cfg["generator_seed"] == 5
    with pytest.warns(UserWarning, match="generator_seed"):
        loaded = pyhappy.load_peft_adapter(build(), tmp_path)
    for m in loaded.modules():
        if isinstance(m, PVeRALinear):
            m.sample_at_inference = False
    with torch.no_grad():
        for m in pm.modules():
            if hasattr(m, "sample_at_inference") and isinstance(m.sample_at_inference, dict):
                m.sample_at_inference["default"] = False
        close(loaded(**x).logits, pm.eval()(**x).logits)


PLAIN = ("llama", dict(r=4, target_modules=["q_proj", "v_proj"]))
# A GPT-2 classifier adapter with trained biases and a trained copy of the head.
HEAD = ("gpt2-cls", dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all", modules_to_save=["score"]))


def save_vera(d, kind="vera", setup=PLAIN, _cache={}):
    """A saved, trained PEFT adapter of ``setup`` (arch, config) copied into ``d``; its config returned."""
    import shutil
    import tempfile

    from peft import get_peft_model

    key = (kind, repr(setup))
    if key not in _cache:
        _cache[key] = tempfile.mkdtemp()
        pm = get_peft_model(build(setup[0]), config(kind, **setup[1]))
        train_like(pm)
        pm.save_pretrained(_cache[key])
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(os.path.join(_cache[key], f), d / f)
    return json.loads((d / "adapter_config.json").read_text())


BAD = [
    ("config", {"bias": "lora_only"}, ValueError, "bias must be"),
    ("config", {"modules_to_save": "lm_head"}, TypeError, "modules_to_save must be a list"),
    ("config", {"modules_to_save": ["lm_head"]}, KeyError, r"lm_head.weight \(modules_to_save\)"),
    ("config", {"use_dora": True}, NotImplementedError, "use_dora"),
    ("config", {"r": "4"}, TypeError, "r must be an int"),
    ("config", {"r": 8}, ValueError, "vera_lambda_d"),
    ("config", {"vera_dropout": 1.0}, ValueError, "vera_dropout must be in"),
    ("config", {"save_projection": "yes"}, TypeError, "save_projection must be true or false"),
    ("config", {"projection_prng_key": 1.5}, TypeError, "projection_prng_key must be an int"),
    ("config", {"save_projection": False, "projection_prng_key": 9}, ValueError, "differs from the projection PEFT redraws"),
    ("config", {"target_modules": ["nothing"]}, ValueError, "matched no layer"),
    ("config", {"layers_pattern": "layers"}, ValueError, "layers_pattern"),
    ("config", {"peft_type": "IA3"}, ValueError, "only LoRA, VeRA and PVeRA"),
    ("tensors", "missing lambda", KeyError, "vera_lambda_b"),
    ("tensors", "missing projection", KeyError, "vera_A"),
    ("tensors", "small projection", ValueError, "do not fit"),
    ("tensors", "left over", ValueError, "tensors the config does not place"),
    ("tensors", "int lambda", TypeError, "float dtype"),
    ("head", "missing bias", KeyError, r"h.1.ln_2.bias \(bias='all'\)"),
    ("head", "missing adapted bias", KeyError, r"c_attn.base_layer.bias \(bias='all'\)"),
    ("head", "missing copy", KeyError, r"score.weight \(modules_to_save\)"),
    ("head", "wrong copy shape", ValueError, r"score.weight is \(2, 32\)"),
    ("head", "int bias", TypeError, "float dtype"),
    ("head", "vera_only", ValueError, "tensors the config does not place"),  # then the other biases are left over
]


@pytest.mark.parametrize("where,change,err,msg", BAD, ids=[f"{w}-{c}" for w, c, *_ in BAD])
def test_bad_vera_adapters_are_refused_by_name_before_anything_changes(where, change, err, msg, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = save_vera(tmp_path, setup=HEAD if where == "head" else PLAIN)
    wfile = tmp_path / "adapter_model.safetensors"
    if where == "config" or change == "vera_only":
        cfg.update(change if where == "config" else {"bias": change})
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    elif where == "head":
        t = load_file(wfile)
        base = "base_model.model."
        key = {"missing bias": "transformer.h.1.ln_2.bias", "missing adapted bias": "transformer.h.0.attn.c_attn."
               "base_layer.bias", "missing copy": "score.weight", "wrong copy shape": "score.weight",
               "int bias": "transformer.h.1.ln_2.bias"}[change]
        if change == "wrong copy shape":
            t[base + key] = t[base + key][:2].contiguous()
        elif change == "int bias":
            t[base + key] = t[base + key].to(torch.int32)
        else:
            del t[base + key]
        save_file(t, wfile)
    else:
        t = load_file(wfile)
        key = sorted(k for k in t if k.endswith("v_proj.vera_lambda_b"))[-1]
        if change == "missing lambda":
            del t[key]
        elif change == "missing projection":
            del t["base_model.vera_A"]
        elif change == "small projection":
            t["base_model.vera_A"] = t["base_model.vera_A"][:, :8].contiguous()
        elif change == "left over":
            t["base_model.model.model.nowhere.vera_lambda_b"] = torch.zeros(3)
        else:
            t[key] = t[key].to(torch.int32)
        save_file(t, wfile)
    model = build(HEAD[0] if where == "head" else "llama")
    before = state(model)
    with pytest.raises(err, match=msg):
        pyhappy.load_peft_adapter(model, tmp_path)
    assert_same(state(model), before)


def test_vera_into_a_model_with_adapters_is_refused(tmp_path):
    save_vera(tmp_path)
    model = build()
    pyhappy.inject(model, ["k_proj"], r=2)
    before = state(model)
    with pytest.raises(NotImplementedError, match="already holds adapter"):
        pyhappy.load_peft_adapter(model, tmp_path)
    assert_same(state(model), before)


def test_unsupported_peft_vera_models_are_refused_before_anything_changes():
    from peft import get_peft_model

    two = get_peft_model(build(), config("vera", r=4, target_modules=["q_proj"]))
    two.add_adapter("other", config("vera", r=4, target_modules=["q_proj"]))
    merged = get_peft_model(build(), config("pvera", r=4, target_modules=["q_proj"]))
    train_like(merged)
    merged.merge_adapter()
    for pm, err, msg in ((two, NotImplementedError, "several adapters"), (merged, ValueError, "merged")):
        before = state(pm)
        with pytest.raises(err, match=msg):
            pyhappy.from_peft(pm)
        assert_same(state(pm), before)


@pytest.mark.parametrize("setup", ["plain", "bias_all-score"])
@pytest.mark.parametrize("entry", ["load_peft_adapter", "from_peft"])
def test_a_failure_while_applying_rolls_the_model_back(entry, setup, tmp_path, monkeypatch):
    """Should the apply step fail after validation (here: the third module swap raises), the model is
    put back exactly as it was: trained biases already written into it included."""
    from peft import get_peft_model

    arch, kw = HEAD if setup != "plain" else PLAIN
    if entry == "load_peft_adapter":
        save_vera(tmp_path, kind="pvera", setup=(arch, kw))
        model = build(arch)
    else:
        model = get_peft_model(build(arch), config("pvera", **kw))
        train_like(model)
    assert_failed_apply_rolls_back(monkeypatch, model, pyhappy.from_peft if entry == "from_peft" else
                                   lambda m: pyhappy.load_peft_adapter(m, tmp_path))


def test_save_refuses_what_peft_cannot_hold_and_writes_nothing(tmp_path):
    from peft import PeftModel

    model = build()
    pyhappy.inject(model, ["q_proj", "v_proj", "down_proj"], adapter="vera", r=4, save_projection=False,
                   projection_prng_key=3)
    train_like(model)
    x = inputs()
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="model.norm.weight"):
        pyhappy.save_peft_adapter(model, tmp_path / "a")
    model.model.norm.weight.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj
    q.merge()
    with pytest.raises(ValueError, match="merged"):
        pyhappy.save_peft_adapter(model, tmp_path / "b")
    q.unmerge()
    # Projections drawn for the wider down_proj: once it is gone, PEFT would redraw other numbers for
    # the remaining (narrower) layers, so they must be saved.
    for layer in model.model.layers:
        layer.mlp.down_proj = layer.mlp.down_proj.unload()
    with pytest.raises(ValueError, match="not the ones PEFT redraws"):
        pyhappy.save_peft_adapter(model, tmp_path / "c")
    assert not any(os.path.exists(tmp_path / d) for d in "abc")
    q.projections.save_projection = True
    want = model(**x).logits
    pyhappy.save_peft_adapter(model, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert cfg["save_projection"] is True and cfg["projection_prng_key"] == 3
    close(PeftModel.from_pretrained(build(), tmp_path / "d").eval()(**x).logits, want)
