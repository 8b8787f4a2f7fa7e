"""Interop with the checkpoints and models users already have: PEFT LoRA adapters, and undoing an
injection (merge / unmerge / unload).

PEFT's LoRA format: a directory with ``adapter_config.json`` (peft_type "LORA", r,
lora_alpha, target_modules as a list of names/suffixes or a regex string, use_rslora, rank_pattern /
alpha_pattern, fan_in_fan_out, bias, use_dora) and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
(scaling alpha/r, or alpha/√r with rsLoRA); with ``use_dora`` also ``.lora_magnitude_vector`` [out]
(DoRA's magnitude; PEFT writes the key without the ``.weight`` its module parameter has, and reads
both). VeRA and PVeRA adapters (peft_type "VERA" / "PVERA") are read and written too, in PEFT's
layout (see the VeRA section below). PEFT itself is never imported here except by ``from_peft``
(which receives a live PEFT model).

Every adapter type carries, in the same way, trained biases (config ``bias``: "all" trains and
saves every ``*.bias`` of the model; "lora_only" / "vera_only" / "pvera_only" those of the adapted
layers), saved as ``base_model.model.<path>.bias``, an adapted layer's as
``<layer>.base_layer.bias``; and ``modules_to_save`` copies (trained copies of whole modules such as
a classifier head), each copy's state dict under ``base_model.model.<module path>.<key>`` (with
bias "all" PEFT also writes each copied bias as ``<module path>.original_module.<...>.bias``, the
original module's, and ``<module path>.modules_to_save.<...>.bias``, a duplicate).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from collections import Counter

import torch
from torch import nn

from ._transaction import Transaction
from .ops._checks import finite_number
from .nn import (LoRALinear, MoLoRALinear, MultiLoRALinear, PVeRALinear, QLoRALinear, QuantLinear,
                 SparseDeltaLinear, TTLinear, VeRALinear, VeRAProjections)
from .nn.lora_linear import adapter_to
from ._safetensors import atomic_write, read_safetensors, write_safetensors

_PREFIX = "base_model.model."
_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with re.match((.*\\.)?(k)$, name)."""
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return val
    return default


# ---- adapter_config.json: read, type-checked, PEFT's defaults ----------------------------------------

# Fields pyhappy reads, with PEFT's LoraConfig defaults.
_DEFAULTS = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False,
             "fan_in_fan_out": False, "bias": "none", "target_modules": None, "exclude_modules": None,
             "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
             "modules_to_save": None, "use_dora": False}
# Fields that change what the adapter computes in ways pyhappy does not implement: refused unless they
# hold PEFT's "off" value. (Initialisation-only fields such as init_lora_weights or loftq_config do
# not matter for a trained checkpoint and are ignored.)
_UNSUPPORTED = ("lora_bias", "target_parameters", "trainable_token_indices", "layer_replication",
                "use_qalora", "alora_invocation_tokens", "megatron_config", "use_bdlora", "arrow_config",
                "kasa_config", "velora_config", "monteclora_config", "ensure_weight_tying")
_OFF = (None, False, [], {}, "")


def _str_list(who, key, v, allow_str=True):
    if v is None:
        return None
    if isinstance(v, str) and allow_str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{who}: {key} is not a valid regex ({e}): {v!r}") from None
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(t, str) and t for t in v):
        return list(v)
    kind = "a regex str or a list of names" if allow_str else "a list of names"
    raise TypeError(f"{who}: {key} must be {kind}, got {v!r}")


def _number(who, key, v, integer=False):
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise TypeError(f"{who}: {key} must be {'an int' if integer else 'a number'}, got {v!r}")
    if not integer and not math.isfinite(v):
        raise ValueError(f"{who}: {key} must be finite, got {v!r}")
    return v


def parse_adapter_config(cfg, who: str = "load_peft_adapter", source: str = _CONFIG) -> dict:
    """A PEFT LoRA adapter config (the dict of adapter_config.json) checked field by field, with
    PEFT's defaults filled in (r 8, lora_alpha 8, lora_dropout 0.0, bias "none" ...). Raises
    TypeError / ValueError naming the field and ``source``; NotImplementedError for settings
    pyhappy does not implement (lora_bias, ...)."""
    at = f"{who}: {source}"
    if not isinstance(cfg, dict):
        raise TypeError(f"{at} must hold a JSON object, got {type(cfg).__name__}")
    out = dict(_DEFAULTS)
    out.update({k: v for k, v in cfg.items() if k in _DEFAULTS})
    for key in ("rank_pattern", "alpha_pattern"):  # older PEFT versions wrote null for "none"
        if out[key] is None:
            out[key] = {}
    if out["use_dora"] is None:
        out["use_dora"] = False
    if str(out["peft_type"]).upper() != "LORA":
        raise ValueError(f"{at}: only LoRA adapters are supported here (VeRA / PVeRA: parse_vera_config), got "
                         f"peft_type {cfg.get('peft_type')!r}")
    for key in _UNSUPPORTED:
        if cfg.get(key) not in _OFF:
            raise NotImplementedError(f"{at}: {key}={cfg.get(key)!r} is not supported")
    out["r"] = _number(at, "r", out["r"], integer=True)
    if out["r"] < 1:
        raise ValueError(f"{at}: r must be >= 1, got {out['r']}")
    out["lora_alpha"] = float(_number(at, "lora_alpha", out["lora_alpha"]))
    d = _number(at, "lora_dropout", out["lora_dropout"])
    if not 0.0 <= d < 1.0:
        raise ValueError(f"{at}: lora_dropout must be in [0, 1), got {d!r}")
    out["lora_dropout"] = float(d)
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(out[key], bool):
            raise TypeError(f"{at}: {key} must be true or false, got {out[key]!r}")
    if out["bias"] not in ("none", "all", "lora_only"):
        raise ValueError(f"{at}: bias must be 'none', 'all' or 'lora_only', got {out['bias']!r}")
    if out["target_modules"] is None:
        raise ValueError(f"{at}: target_modules is missing (PEFT's per-architecture defaults are not applied)")
    out["target_modules"] = _str_list(at, "target_modules", out["target_modules"])
    out["exclude_modules"] = _str_list(at, "exclude_modules", out["exclude_modules"])
    out["modules_to_save"] = _str_list(at, "modules_to_save", out["modules_to_save"], allow_str=False)
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pat = out[key]
        if not isinstance(pat, dict):
            raise TypeError(f"{at}: {key} must be an object {{pattern: value}}, got {pat!r}")
        for k, v in pat.items():
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(f"{at}: {key} key {k!r} is not a valid regex ({e})") from None
            _number(at, f"{key}[{k!r}]", v, integer=integer)
            if integer and v < 1:
                raise ValueError(f"{at}: {key}[{k!r}] must be >= 1, got {v}")
    _check_layer_selection(at, out)
    return out


def _check_layer_selection(at, out):
    """(layers_to_transform, layers_pattern) of a parsed config, their types checked as PEFT's
    matching (_peft_target) reads them: an int or a list of ints; a str or a list of str."""
    lt = out["layers_to_transform"]
    if lt is not None and not (isinstance(lt, int) and not isinstance(lt, bool)) and not (
            isinstance(lt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in lt)):
        raise TypeError(f"{at}: layers_to_transform must be an int or a list of ints, got {lt!r}")
    lp = out["layers_pattern"]
    if lp is not None and not isinstance(lp, str) and not (isinstance(lp, list) and all(isinstance(t, str) for t in lp)):
        raise TypeError(f"{at}: layers_pattern must be a str or a list of str, got {lp!r}")
    return lt, lp


def _read_json(path, who):
    """(the parsed adapter_config.json of directory ``path``, its file path), with the directory and
    file errors named."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise NotADirectoryError(f"{who}: {path} is not a directory")
        raise FileNotFoundError(f"{who}: no directory {path}")
    cfg_path = os.path.join(path, _CONFIG)
    if not os.path.isfile(cfg_path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise PermissionError(f"{who}: cannot read the directory {path}")
        raise FileNotFoundError(f"{who}: no {_CONFIG} in {path}")
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OSError(f"{who}: cannot read {cfg_path}: {e.strerror or e}") from None
    if not raw.strip():
        raise ValueError(f"{who}: {cfg_path} is empty")
    try:
        cfg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{who}: {cfg_path} is not valid JSON ({e})") from None
    return cfg, cfg_path


def _read_config(path, who):
    cfg, cfg_path = _read_json(path, who)
    return parse_adapter_config(cfg, who, cfg_path)


def _peft_target(cfg, name: str) -> bool:
    """PEFT's check_target_module_exists for a LoRA config: exclude_modules first, modules_to_save
    never targeted, then target_modules (regex full match, or name / '.'-suffix), then
    layers_to_transform (the first numbered segment after layers_pattern, or after any segment)."""
    ex = cfg["exclude_modules"]
    if ex is not None:
        if isinstance(ex, str):
            if re.fullmatch(ex, name):
                return False
        elif name in ex or any(name.endswith(f".{e}") for e in ex):
            return False
    if cfg["modules_to_save"] and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in cfg["modules_to_save"]):
        return False
    tm = cfg["target_modules"]
    if isinstance(tm, str):
        return re.fullmatch(tm, name) is not None
    if name in tm:
        return True
    if not any(name.endswith(f".{t}") for t in tm):
        return False
    idx = cfg["layers_to_transform"]
    if idx is None or idx == []:
        return True
    pats = cfg["layers_pattern"]
    m = None
    if not pats:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pat in [pats] if isinstance(pats, str) else pats:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    if m is None:
        return False
    i = int(m.group("idx"))
    return i == idx if isinstance(idx, int) else i in idx


# ---- the base layer an adapter wraps, and giving it back ------------------------------------------------


def _is_conv1d(mod) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def _is_bnb4(mod) -> bool:
    return type(mod).__name__ == "Linear4bit" and type(getattr(mod, "weight", None)).__name__ == "Params4bit"


def _base_linear(mod):
    """(nn.Linear, shell) for a layer an adapter is put on. An nn.Linear (or subclass) is used as it
    is, sharing its weight and bias. transformers' Conv1D (GPT-2; weight [in, out]) becomes a new
    nn.Linear holding the weight transposed (the bias shared). ``shell`` is what ``unload`` puts back:
    None for a plain nn.Linear (a new one is made), else the original module, whose weight (and bias)
    are re-attached then, transposed back for Conv1D. The Conv1D shell gives up its weight now, so
    the model does not hold it twice."""
    if _is_conv1d(mod):
        w = mod.weight.detach()
        lin = nn.Linear(w.shape[0], w.shape[1], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())
        lin.bias = mod.bias
        return lin, mod
    if isinstance(mod, nn.Linear):
        return mod, (None if type(mod) is nn.Linear else mod)
    raise TypeError(f"only nn.Linear and Conv1D layers take a LoRA adapter, got {type(mod).__name__}")


def _quant_base(mod):
    """(QuantizedWeight, bias, shell) for a layer with a packed base: pyhappy's QuantLinear, or
    bitsandbytes' Linear4bit (NF4, any double quantization, also after bitsandbytes has repacked it
    into its CPU layout; read bit-exactly through QuantizedWeight.from_bnb). The Linear4bit is the
    shell ``unload`` gives back, its weight rebuilt from the packed copy then (so the model does
    not hold the 4-bit weight twice in between)."""
    if isinstance(mod, QuantLinear):
        return mod.qweight, mod.bias, None
    from .quant import QuantizedWeight

    w = mod.weight
    qs = getattr(w, "quant_state", None)
    if qs is None:
        raise ValueError("the bitsandbytes layer holds no quantized weight (quant_state is None)")
    if getattr(qs, "quant_type", "nf4") != "nf4":
        raise NotImplementedError(f"bitsandbytes {qs.quant_type} weights are not supported (nf4 only)")
    return QuantizedWeight.from_bnb(w.data, qs), mod.bias, mod


def _attach_shell(layer, shell):
    if shell is not None:
        layer.__dict__["base_shell"] = shell
        if _is_conv1d(shell) or _is_bnb4(shell):
            shell.weight = None  # re-attached (transposed / repacked) by _give_back
    return layer


def _give_back(m) -> nn.Module:
    """The module ``unload`` puts in place of adapter module ``m`` (its base weight and bias, merged or
    not): the original module type where one was recorded (Conv1D with its [in, out] layout)."""
    shell = m.__dict__.get("base_shell")
    if isinstance(m, QLoRALinear):
        if shell is None:
            return QuantLinear.from_quantized(m.qweight, m.bias)
        import bitsandbytes as bnb

        packed, stats = m.qweight.to_bnb()
        shell.weight = bnb.nn.Params4bit.from_prequantized(packed, stats, requires_grad=False, device=packed.device,
                                                           module=shell)
        shell.bias = m.bias
        return shell
    if shell is None:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                        dtype=m.weight.dtype)
        lin.weight = m.weight
        lin.bias = m.bias
        return lin
    if type(shell).__name__ == "Conv1D":
        shell.weight = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=m.weight.requires_grad)
    else:
        shell.weight = m.weight
    shell.bias = m.bias
    return shell


def _set(model: nn.Module, name: str, new: nn.Module):
    """Put ``new`` at ``name``, in the train / eval mode of the module it replaces (an adapter put into
    an eval model must not run its dropout)."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    if isinstance(old, nn.Module) and new is not old:
        new.train(old.training)
    setattr(owner, child, new)


# ---- modules_to_save: trained copies of whole modules (heads, embeddings) --------------------------------


def _saved_copy(original: nn.Module, adapter: str) -> nn.Module:
    copy_ = copy.deepcopy(original)
    copy_.__dict__["peft_modules_to_save"] = {"adapter": adapter, "original": original}
    return copy_


def _saved_copies(model):
    return [(n, m) for n, m in model.named_modules() if n and "peft_modules_to_save" in m.__dict__]


def _to_save_sites(model, names):
    """PEFT's modules_to_save matching (name.endswith(entry)), outermost matches only."""
    out = []
    for n, _ in model.named_modules():
        if n and any(n.endswith(t) for t in names) and not any(n.startswith(o + ".") for o in out):
            out.append(n)
    return out


def _is_bias(pname: str) -> bool:
    """PEFT's rule for what bias="all" trains and saves: a parameter named ``bias`` (key ``*.bias``)."""
    return pname.rpartition(".")[2] == "bias"


def _inside(name: str, owners) -> str | None:
    """The entry of ``owners`` that module / parameter path ``name`` is (or lies inside), else None."""
    return next((o for o in owners if name == o or name.startswith(o + ".")), None)


def _plan_saved_copies(model, to_save, take, who):
    """The modules_to_save part of a load, checked: (name, module, {state-dict key: checkpoint tensor})
    for each site ``to_save`` (see _to_save_sites); PEFT saves a copy's state dict under
    ``base_model.model.<name>.<key>``."""
    saved = []
    for name in to_save:
        mod = model.get_submodule(name)
        if "peft_modules_to_save" in mod.__dict__:
            raise ValueError(f"{who}: {name} already holds a trained copy (modules_to_save)")
        sd = mod.state_dict()
        saved.append((name, mod, {k: take(f"{_PREFIX}{name}.{k}", v.shape, "modules_to_save") for k, v in sd.items()}))
    return saved


def _plan_biases(model, cfg, tensors, take, adapted, saved, who, wpath):
    """The trained biases of a load, checked: (owner module name, parameter, checkpoint tensor,
    trainable).

    PEFT's modes: "all" trains and saves every bias of the model; "<method>_only" ("lora_only",
    "vera_only", "pvera_only") those of the adapted layers (``adapted``: their names), saved as
    ``<layer>.base_layer.bias``. Inside a modules_to_save copy the copy's own key carries the bias;
    PEFT's "all" also writes the wrapper's ``<name>.original_module.<...>.bias`` (PEFT loads it into
    the original module, which stays frozen) and ``<name>.modules_to_save.<...>.bias`` (a duplicate
    that PEFT's load ignores; ``<name>.modules_to_save.<adapter>.<...>.bias`` for a copy with
    sub-modules, such as RoBERTa's classifier head): all are taken when present."""
    if cfg["bias"] == "none":
        return []
    copies = [n for n, *_ in saved]
    out = []
    for pname, p in model.named_parameters():
        if not _is_bias(pname):
            continue
        owner = pname.rpartition(".")[0]
        site = _inside(owner, copies)
        if site is not None:
            for part, keep in (("original_module", True), ("modules_to_save", False)) if cfg["bias"] == "all" else ():
                key = f"{_PREFIX}{site}.{part}{pname[len(site):]}"
                if key in tensors:
                    t = take(key, p.shape, f"bias of the original {site}, bias='all'")
                    if keep:
                        out.append((None, p, t, False))
                elif not keep:  # a copy with sub-modules: PEFT keeps the adapter's name in the key
                    pre, sub = f"{_PREFIX}{site}.{part}.", pname[len(site):]
                    for k in [k for k in tensors if k.startswith(pre) and k.endswith(sub)
                              and "." not in k[len(pre):len(k) - len(sub)]]:
                        take(k, p.shape, f"PEFT's duplicate of the copy's bias in {site}, bias='all'")
            continue
        key = f"{_PREFIX}{owner}.base_layer.bias"
        if owner not in adapted and key not in tensors:
            # (PEFT's save of a model with several adapters writes, with the one adapter that has
            # biases, those of every LoRA layer of the model under this key: it is taken when present.)
            if cfg["bias"] != "all":
                continue
            key = f"{_PREFIX}{pname}"
        if key not in tensors:
            raise KeyError(f"{who}: {wpath} has no tensor {key} (bias={cfg['bias']!r})")
        out.append((owner, p, take(key, p.shape, "trained bias"), True))
    return out


def _finish_load(txn, model, new, saved, biases, adapter_name):
    """The end of a load's apply step (inside its Transaction ``txn``, under no_grad): the
    modules_to_save copies and trained biases that _plan_saved_copies / _plan_biases checked (each
    copy trainable; each bias written in place, protected first so that a rollback restores it),
    then every planned module of ``new`` (name -> module) put in place. A bias of a layer that the
    load replaces goes to the new layer's bias where that is not the same tensor (a quantized base:
    QLoRALinear holds a bias of its own)."""
    txn.protect(*(p for _, p, *_ in biases))  # small tensors: cloned for a rollback
    for name, mod, sd in saved:
        cp = _saved_copy(mod, adapter_name)
        for k, t in sd.items():
            dst = cp.get_parameter(k) if k in dict(cp.named_parameters()) else cp.get_buffer(k)
            dst.copy_(t.to(dst.dtype))
        for p in cp.parameters():
            p.requires_grad_(True)
        new[name] = cp
    copies = {name for name, *_ in saved}
    for owner, p, t, trainable in biases:
        layer = new.get(owner) if owner not in copies else None
        if layer is not None and isinstance(getattr(layer, "bias", None), torch.Tensor):
            p = layer.bias
        p.copy_(t.to(p.dtype))
        p.requires_grad_(trainable)
    for name, layer in new.items():
        _set(model, name, layer)


def _save_copies_and_biases(model, adapter, adapted, only, tensors, with_biases=True):
    """The modules_to_save copies of ``adapter`` and the model's trained biases into ``tensors``
    under PEFT's keys; returns (bias mode, modules_to_save list or None). ``adapted``: the names of
    the adapter's layers; ``only``: PEFT's name for "their biases only" ("lora_only", "vera_only",
    ...), the mode when every trained bias belongs to an adapter layer, else "all" (every bias saved,
    with the two extra keys per bias inside a copy that PEFT's own save writes, see _plan_biases).
    In "<method>_only" mode the biases of every adapter layer of the model are written (PEFT's rule),
    those of other adapters' layers included. ``with_biases`` False: none written, the mode "none" (PEFT
    lets one adapter of a model carry the biases, which every adapter shares)."""
    copies = [(n, m) for n, m in _saved_copies(model) if m.__dict__["peft_modules_to_save"]["adapter"] == adapter]
    for n, m in copies:
        for k, t in m.state_dict().items():
            tensors[f"{_PREFIX}{n}.{k}"] = t
    # Biases: a layer of any adapter holds its bias as PEFT's <layer>.base_layer.bias.
    layers = {n for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear, MultiLoRALinear,
                                                                      *_VERA_TYPES))}
    copy_names = [n for n, _ in copies]
    biases = [(pn, pn.rpartition(".")[0], p) for pn, p in model.named_parameters()
              if _is_bias(pn) and _inside(pn.rpartition(".")[0], copy_names) is None]
    trained = [o for _, o, p in biases if p.requires_grad] if with_biases else []
    mode = "none" if not trained else only if all(o in layers for o in trained) else "all"
    for pname, owner, p in biases if mode != "none" else ():
        if mode == "all" or (mode == only and owner in layers):
            tensors[f"{_PREFIX}{owner}.base_layer.bias" if owner in layers else f"{_PREFIX}{pname}"] = p
    if mode == "all":
        for n, m in copies:
            original = m.__dict__["peft_modules_to_save"]["original"]
            for pn, p in m.named_parameters():
                if _is_bias(pn):
                    tensors[f"{_PREFIX}{n}.modules_to_save.{pn}"] = p
                    tensors[f"{_PREFIX}{n}.original_module.{pn}"] = original.get_parameter(pn)
    return mode, copy_names or None


# ---- adapters in a model -----------------------------------------------------------------------------------


def _lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear))]


def _adapter_names(model) -> list:
    names = []
    for _, m in model.named_modules():
        if isinstance(m, (LoRALinear, QLoRALinear, *_VERA_TYPES)):
            got = [getattr(m, "adapter_name", "default")]
        elif isinstance(m, MultiLoRALinear):
            got = list(m.adapters)
        else:
            continue
        names += [a for a in got if a not in names]
    return names


def _read_adapter_weights(path, who):
    """(file path, tensors) of an adapter directory's weights file; only safetensors is read."""
    wpath = os.path.join(os.fspath(path), _WEIGHTS)
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"{who}: no {_WEIGHTS} in {path} (only the safetensors format is read)")
    tensors, _ = read_safetensors(wpath)
    return wpath, tensors


def _adapter_sites(model, cfg, who, *, skip_saved_copies):
    """The (name, module) pairs a PEFT config targets, outside the modules an adapter already wraps.

    The insides of adapter layers (their base_layer, lora_A, ...) and of quantized / sparse / TT
    layers are not sites: a target name matching there would put an adapter inside an adapter.
    ``skip_saved_copies`` treats PEFT's modules_to_save copies the same way: the LoRA load asks for
    it, since a second LoRA adapter may arrive in a model holding the first one's copies and must not
    put layers inside them; the VeRA load, which only goes into a model without adapters, does not."""
    adapter_types = (LoRALinear, QLoRALinear, MultiLoRALinear, QuantLinear, SparseDeltaLinear, TTLinear, *_VERA_TYPES)
    inside, sites = set(), []
    for name, mod in model.named_modules():
        if not name or name in inside:
            continue
        if isinstance(mod, adapter_types) or (skip_saved_copies and "peft_modules_to_save" in mod.__dict__):
            inside.update(f"{name}.{c}" for c, _ in mod.named_modules() if c)
        if _peft_target(cfg, name):
            sites.append((name, mod))
    if not sites:
        raise ValueError(f"{who}: target_modules={cfg['target_modules']!r} matched no layer of the model")
    return sites


def _tensor_taker(tensors, wpath, who):
    """``(take, used)``: ``take(key, shape, what)`` returns the checkpoint tensor ``key`` after checking
    that it exists, is of a float dtype and (unless ``shape`` is None) has that shape, and records the
    key in the set ``used``, so that the caller can refuse a file holding tensors no site took. Every
    check runs before the model changes, which keeps a failed load from leaving a half-loaded model."""
    used = set()

    def take(key, shape, what):
        if key not in tensors:
            raise KeyError(f"{who}: {wpath} has no tensor {key} ({what})")
        t = tensors[key]
        if not t.is_floating_point():
            raise TypeError(f"{who}: {wpath}: tensor {key} is {t.dtype}, a float dtype is needed")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{who}: {wpath}: tensor {key} is {tuple(t.shape)} but the model needs {tuple(shape)}"
                             f" ({what})")
        used.add(key)
        return t

    return take, used


def _check_peft_layer_live(who, name, mod):
    """A PEFT tuner layer that from_peft converts must run its adapter as it was trained: a merged
    layer's base weight already holds the update (converting would apply it twice), and a layer
    with its adapters disabled runs as the base model, which the converted layer would not."""
    if getattr(mod, "merged", False):
        raise ValueError(f"{who}: {name} is merged; unmerge it in PEFT first")
    if getattr(mod, "disable_adapters", False):
        raise ValueError(f"{who}: {name} has its adapters disabled; enable them in PEFT first")


def _check_adapter_name(who, name):
    if not isinstance(name, str) or not name or "." in name or "/" in name or os.sep in name:
        raise ValueError(f"{who}: adapter_name must be a non-empty str without '.' or '/', got {name!r}")


def _peft_adapter_dtype(dtype):
    """The dtype PEFT gives a loaded adapter on a base layer computing in ``dtype``: float32 for
    float16 / bfloat16 (autocast_adapter_dtype, its default), else the base's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def load_peft_adapter(model: nn.Module, path, adapter_name: str = "default") -> nn.Module:
    """Load a saved PEFT LoRA adapter directory into a model (in place) and return the model.

    Everything a PEFT LoRA checkpoint carries is loaded: the LoRA weights of the layers its config
    targets (target_modules / exclude_modules / layers_to_transform / layers_pattern, as PEFT
    matches them; rank_pattern / alpha_pattern, rsLoRA, dropout), ``modules_to_save`` copies (the
    model gets a trained copy of each such module, trainable; ``unload`` puts the original back) and
    trained biases (``bias="all"`` / ``"lora_only"``: loaded and made trainable as PEFT does), and
    DoRA (``use_dora``: each layer a LoRALinear(use_dora=True) holding the saved
    ``lora_magnitude_vector``), and the base weight PEFT saves next to an adapter on an embedding-type
    layer (``lm_head.base_layer.weight``) written into that layer, as PEFT's load does. The adapters
    keep the checkpoint's values in float32 on a bf16 / fp16 base (PEFT's autocast_adapter_dtype).
    Targeted nn.Linear layers become LoRALinear (GPT-2's Conv1D too,
    given back as Conv1D by ``unload``), QuantLinear layers QLoRALinear; the rest of the model is
    frozen. A config field
    missing from the file takes PEFT's default (lora_alpha 8, ...).

    Several adapters: loading a second ``adapter_name`` into a model that already holds one turns
    its LoRA layers into MultiLoRALinear holding both; the new adapter is added inactive, as PEFT's
    ``load_adapter`` does (``pyhappy.set_adapter(model, name, only=True)`` switches to it).
    MultiLoRALinear has no DoRA, so a DoRA adapter is refused as a second adapter, and so is a second
    adapter into a model with DoRA layers. On a quantized base (QuantLinear, bitsandbytes NF4) a DoRA
    adapter makes QLoRALinear(use_dora=True) layers (QDoRA).

    The whole directory is checked against the model before anything changes (every tensor present,
    of a float dtype and the right shape; no tensor left over): a failed load leaves the model as it
    was.

    VeRA / PVeRA directories (peft_type "VERA" / "PVERA") load into a model without adapters: the
    targeted layers become VeRALinear / PVeRALinear sharing one VeRAProjections, the saved
    ``base_model.vera_A`` / ``vera_B`` (``pvera_A`` / ``pvera_B``) when save_projection is true, else
    redrawn from projection_prng_key at the targeted layers' largest sizes as PEFT does; their
    lambdas trainable. Their ``modules_to_save`` copies and trained biases (``bias="all"`` /
    ``"vera_only"`` / ``"pvera_only"``) load as a LoRA adapter's do."""
    who = "load_peft_adapter"
    _check_adapter_name(who, adapter_name)
    raw, cfg_path = _read_json(path, who)
    if _vera_kind(raw) is not None:
        return _load_vera(model, path, raw, cfg_path, adapter_name, who)
    if isinstance(raw, dict) and str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{who}: {cfg_path}: only LoRA, VeRA and PVeRA adapters are supported, got peft_type "
                         f"{raw.get('peft_type')!r}")
    cfg = parse_adapter_config(raw, who, cfg_path)
    wpath, tensors = _read_adapter_weights(path, who)
    existing = _adapter_names(model)
    if adapter_name in existing:
        raise ValueError(f"{who}: the model already has an adapter named {adapter_name!r}")
    vera = [n for n, m in model.named_modules() if isinstance(m, _VERA_TYPES)]
    if vera:
        raise NotImplementedError(f"{who}: the model holds VeRA / PVeRA layers (e.g. {vera[0]}); a LoRA adapter is "
                                  "not loaded next to them")
    second = bool(existing)

    sites = _adapter_sites(model, cfg, who, skip_saved_copies=True)
    take, used = _tensor_taker(tensors, wpath, who)

    # 1. Validate every piece against the model; nothing is changed yet.
    plan, base_weights = [], []
    dora = cfg["use_dora"]
    for name, mod in sites:
        if isinstance(mod, (SparseDeltaLinear, TTLinear)):
            raise TypeError(f"{who}: {name} is a {type(mod).__name__}; a LoRA adapter cannot be added to it")
        if isinstance(mod, (LoRALinear, QLoRALinear)) and not second:
            raise ValueError(f"{who}: {name} already holds a LoRA adapter")
        if second and (isinstance(mod, (QuantLinear, QLoRALinear)) or _is_bnb4(mod)):
            raise NotImplementedError(f"{who}: {name} has a quantized base; several adapters on one layer need a "
                                      "dense base (MultiLoRALinear)")
        if dora and second:
            raise NotImplementedError(f"{who}: {name}: the adapter uses DoRA (use_dora=true) and the model already "
                                      f"holds adapter(s) {existing}; several adapters on one layer need "
                                      "MultiLoRALinear, which has no DoRA")
        if second and getattr(mod, "use_dora", False):
            raise NotImplementedError(f"{who}: {name} is a DoRA layer; a second adapter would make it a "
                                      "MultiLoRALinear, which has no DoRA")
        if not (isinstance(mod, (nn.Linear, QuantLinear, MultiLoRALinear, LoRALinear)) or _is_conv1d(mod)):
            raise TypeError(f"{who}: {name} is a {type(mod).__name__}; only linear layers (nn.Linear, Conv1D, "
                            "QuantLinear) take a LoRA adapter here")
        N, K = (mod.out_features, mod.in_features) if not _is_conv1d(mod) else (mod.nf, mod.weight.shape[0])
        quant = None
        if isinstance(mod, QuantLinear) or _is_bnb4(mod):
            try:
                quant = _quant_base(mod)
            except (ValueError, NotImplementedError) as e:
                raise type(e)(f"{who}: {name}: {e}") from None
        r = int(_pattern_value(cfg["rank_pattern"], name, cfg["r"]))
        alpha = float(_pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"]))
        A = take(f"{_PREFIX}{name}.lora_A.weight", (r, K), f"r={r}")
        B = take(f"{_PREFIX}{name}.lora_B.weight", (N, r), f"r={r}")
        mag = None
        if dora:  # PEFT's key, or the module parameter's name (with .weight)
            key = f"{_PREFIX}{name}.lora_magnitude_vector"
            mag = take(key + ".weight" if key not in tensors and key + ".weight" in tensors else key, (N,),
                       "DoRA magnitude, use_dora=true")
        plan.append((name, mod, r, alpha, A, B, quant, mag))
        # PEFT saves the base weight of an adapted embedding-type layer (lm_head, embed_tokens:
        # save_embedding_layers="auto") next to its adapter; its load writes it into the base layer.
        key = f"{_PREFIX}{name}.base_layer.weight"
        if key in tensors and quant is None:
            w = take(key, tuple(mod.weight.shape), "the base weight PEFT saves with an embedding layer's adapter")
            if not torch.equal(w.to(mod.weight.dtype), mod.weight.detach()):
                base_weights.append((mod.weight, w))
    to_save = _to_save_sites(model, cfg["modules_to_save"] or [])
    if to_save and second:
        raise NotImplementedError(f"{who}: modules_to_save {to_save} for a second adapter ({adapter_name!r}): "
                                  "pyhappy keeps one trained copy per module")
    saved = _plan_saved_copies(model, to_save, take, who)
    lora_names = {n for n, *_ in plan}
    if cfg["bias"] != "none" and second:
        raise NotImplementedError(f"{who}: bias={cfg['bias']!r} for a second adapter ({adapter_name!r}): the "
                                  "biases are shared by every adapter of the model")
    biases = _plan_biases(model, cfg, tensors, take, lora_names, saved, who, wpath)
    # With a second adapter every LoRA layer of the model becomes a MultiLoRALinear: each must be able to.
    others = []
    if second:
        for name, mod in _lora_modules(model):
            if isinstance(mod, QLoRALinear):
                raise NotImplementedError(f"{who}: {name} has a quantized base; several adapters on one model need "
                                          "dense bases (MultiLoRALinear)")
            if mod.lora_C is not None or mod.merged:
                raise ValueError(f"{who}: {name} is merged or has a LoTR core (lora_C); it cannot hold a second "
                                 "adapter (MultiLoRALinear)")
            if getattr(mod, "use_dora", False):
                raise NotImplementedError(f"{who}: {name} is a DoRA layer; a second adapter would make it a "
                                          "MultiLoRALinear, which has no DoRA")
            if name not in lora_names:
                others.append((name, mod))
    left = sorted(set(tensors) - used)
    if left:
        raise ValueError(f"{who}: {wpath} holds {len(left)} tensors the config does not place in this model, "
                         f"e.g. {left[:3]}")

    # 2. Apply (the Transaction rolls the model back should anything still fail).
    with Transaction(model) as txn, torch.no_grad():
        if not second:
            for p in model.parameters():
                p.requires_grad_(False)
        txn.protect(*(w for w, _ in base_weights))
        for w, t in base_weights:
            w.copy_(t.to(w.dtype))
        new = {}
        for name, mod, r, alpha, A, B, quant, mag in plan:
            kw = dict(r=r, alpha=alpha, dropout=cfg["lora_dropout"], rslora=cfg["use_rslora"])
            if quant is not None:
                qw, bias, shell = quant
                layer = _attach_shell(QLoRALinear.from_quantized(qw, bias, **kw, use_dora=dora), shell)
                if isinstance(mod, QuantLinear):
                    layer.weight_dtype = mod.weight_dtype
            elif isinstance(mod, MultiLoRALinear):
                layer = mod
            elif isinstance(mod, LoRALinear):
                layer = MultiLoRALinear.from_lora(mod, getattr(mod, "adapter_name", "default"))
            else:
                base, shell = _base_linear(mod)
                if second:
                    layer = _attach_shell(MultiLoRALinear.from_linear(base), shell)
                else:
                    layer = _attach_shell(LoRALinear.from_linear(base, **kw, use_dora=dora), shell)
            if isinstance(layer, MultiLoRALinear):
                pair = layer.add_adapter(adapter_name, **kw)
                pair.active = False
                adapter_to(pair, _peft_adapter_dtype(pair.lora_A.weight.dtype))
                dst_A, dst_B = pair.lora_A.weight, pair.lora_B.weight
            else:
                layer.adapter_name = adapter_name
                adapter_to(layer, _peft_adapter_dtype(layer.lora_A.weight.dtype))
                dst_A, dst_B = layer.lora_A.weight, layer.lora_B.weight
            dst_A.copy_(A.to(dst_A.dtype))
            dst_B.copy_(B.to(dst_B.dtype))
            dst_A.requires_grad_(True)
            dst_B.requires_grad_(True)
            if mag is not None:
                layer.lora_magnitude_vector.copy_(mag.to(layer.lora_magnitude_vector.dtype))
                layer.lora_magnitude_vector.requires_grad_(True)
            new[name] = layer
        for name, mod in others:  # every other LoRA layer holds its adapter as a named one too
            new[name] = MultiLoRALinear.from_lora(mod, getattr(mod, "adapter_name", "default"))
        _finish_load(txn, model, new, saved, biases, adapter_name)
    return model


def _representable(model):
    """The model's trainable tensors that its PEFT checkpoints cannot hold: all but the adapter
    layers' weights, modules_to_save copies and biases."""
    ok = set()
    for n, m in model.named_modules():
        if isinstance(m, _VERA_TYPES):
            ok.update((id(m.lambda_b), id(m.lambda_d)))
        elif isinstance(m, (LoRALinear, QLoRALinear)):
            ok.update(id(p) for p in (m.lora_A.weight, m.lora_B.weight))
            if getattr(m, "use_dora", False):
                ok.add(id(m.lora_magnitude_vector))
        elif isinstance(m, MultiLoRALinear):
            ok.update(id(p) for p in m.adapters.parameters())
        elif "peft_modules_to_save" in m.__dict__:
            ok.update(id(p) for p in m.parameters())
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ok and not _is_bias(n)]


def _adapter_payload(model, adapter, who, with_biases=True):
    """(config dict, tensors) of one named adapter in PEFT's format (the model's trained biases
    with it unless ``with_biases`` is False)."""
    vera = [(n, m) for n, m in model.named_modules()
            if isinstance(m, _VERA_TYPES) and getattr(m, "adapter_name", "default") == adapter]
    if vera:
        lora = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear, MultiLoRALinear))
                and (adapter in m.adapters if isinstance(m, MultiLoRALinear)
                     else getattr(m, "adapter_name", "default") == adapter)]
        if lora:
            raise ValueError(f"{who}: adapter {adapter!r} has VeRA / PVeRA layers and LoRA layers (e.g. {lora[:3]}); "
                             "a PEFT adapter is of one type")
        return _vera_payload(model, adapter, vera, who)  # (VeRA: one adapter per model)
    layers = []  # (name, module, A, B, r, alpha, rslora, scaling, dropout, DoRA magnitude | None)
    for n, m in model.named_modules():
        if isinstance(m, (LoRALinear, QLoRALinear)) and getattr(m, "adapter_name", "default") == adapter:
            if m.lora_C is not None:
                raise ValueError(f"{who}: {n} has a LoTR core (lora_C), which PEFT's LoRA format cannot hold")
            if getattr(m, "merged", False):
                raise ValueError(f"{who}: {n} is merged; unmerge it first (the saved A, B would be applied twice)")
            layers.append((n, m, m.lora_A.weight, m.lora_B.weight, m.r, m.lora_alpha, m.rslora, m.scaling,
                           m.lora_dropout, m.lora_magnitude_vector if getattr(m, "use_dora", False) else None))
        elif isinstance(m, MultiLoRALinear) and adapter in m.adapters:
            p = m.adapters[adapter]
            layers.append((n, m, p.lora_A.weight, p.lora_B.weight, p.r, p.lora_alpha, p.rslora, p.scaling,
                           p.lora_dropout, None))
    if not layers:
        raise ValueError(f"{who}: the model has no LoRA layers of adapter {adapter!r}")
    rs = {L[6] for L in layers}
    if len(rs) != 1:
        raise ValueError(f"{who}: PEFT's use_rslora is one flag per adapter; the layers of {adapter!r} mix both")
    rs = rs.pop()
    drops = {L[8] for L in layers}
    if len(drops) != 1:
        raise ValueError(f"{who}: PEFT's lora_dropout is one value per adapter; the layers of {adapter!r} have "
                         f"{sorted(drops)}")
    doras = {L[9] is not None for L in layers}
    if len(doras) != 1:
        mixed = [L[0] for L in layers if L[9] is None][:3]
        raise ValueError(f"{who}: PEFT's use_dora is one flag per adapter; adapter {adapter!r} has DoRA layers and "
                         f"plain LoRA layers (e.g. {mixed})")
    dora = doras.pop()
    for n, m, A, B, r, alpha, _, s, *_ in layers:
        want = alpha / (math.sqrt(r) if rs else r)
        if not math.isclose(s, want, rel_tol=1e-12):
            raise ValueError(f"{who}: {n}'s scaling {s!r} is not lora_alpha / {'√r' if rs else 'r'} ({want!r}); "
                             "PEFT's format cannot hold it")
    bad = _representable(model)
    if bad:
        raise ValueError(f"{who}: trainable tensors that a PEFT LoRA checkpoint cannot hold: {bad[:5]} (freeze "
                         "them, or load the module as modules_to_save)")
    r0 = Counter(L[4] for L in layers).most_common(1)[0][0]
    a0 = Counter(L[5] for L in layers).most_common(1)[0][0]
    tensors = {}
    for n, m, A, B, *_, mag in layers:
        tensors[f"{_PREFIX}{n}.lora_A.weight"] = A
        tensors[f"{_PREFIX}{n}.lora_B.weight"] = B
        if mag is not None:  # PEFT's adapter-file key: without the module parameter's ".weight"
            tensors[f"{_PREFIX}{n}.lora_magnitude_vector"] = mag
    mode, to_save = _save_copies_and_biases(model, adapter, {L[0] for L in layers}, "lora_only", tensors,
                                            with_biases)
    cfg = {
        "peft_type": "LORA", "task_type": None, "r": r0, "lora_alpha": a0, "lora_dropout": drops.pop(),
        "target_modules": [L[0] for L in layers], "use_rslora": rs,
        "rank_pattern": {f"^{re.escape(L[0])}": L[4] for L in layers if L[4] != r0},
        "alpha_pattern": {f"^{re.escape(L[0])}": L[5] for L in layers if L[5] != a0},
        "fan_in_fan_out": False, "bias": mode, "use_dora": dora, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": None, "revision": None,
        "modules_to_save": to_save, "layers_to_transform": None, "layers_pattern": None,
    }
    return cfg, tensors


def save_peft_adapter(model: nn.Module, path, adapter_name: str | None = None) -> None:
    """Save the model's LoRA adapters as PEFT adapter directories that ``PeftModel.from_pretrained``
    (and ``load_peft_adapter``) load: LoRA weights of LoRALinear / QLoRALinear / MultiLoRALinear
    layers, DoRA magnitudes (``use_dora``: PEFT's ``<layer>.lora_magnitude_vector`` keys),
    ``modules_to_save`` copies under PEFT's key names, and trained biases (a bias that requires
    grad; PEFT's ``bias="lora_only"`` if all of them belong to adapter layers, else ``"all"``).
    Ranks / alphas that differ across layers go to rank_pattern / alpha_pattern.

    adapter_name None saves every adapter as PEFT's ``save_pretrained`` lays them out: "default" in
    ``path``, any other in ``path/<name>``; a name saves that adapter alone, in ``path``. The trained
    biases are saved once, with the adapter in ``path`` (the others' configs say ``bias="none"``):
    PEFT lets one adapter carry them.

    Refused before anything is written: a trainable tensor the format cannot hold (named), LoTR
    cores, merged layers, layers of one adapter that mix rsLoRA, dropout values, or DoRA and plain
    LoRA. Each directory's
    two files are written whole to temporary files and then renamed.

    VeRALinear / PVeRALinear layers are saved as a PEFT VeRA / PVeRA adapter: their lambdas, and the
    shared projections (sliced to the saved layers' largest sizes, which PEFT expects) if the
    projections' ``save_projection`` is set. Without it the projections must be the ones PEFT
    redraws from projection_prng_key for the saved layers, else the save is refused. Also refused:
    layers of one adapter with different projections, r, dropout or PVeRA sampling settings, merged
    layers, and any other trainable tensor. The adapter's ``modules_to_save`` copies and trained
    biases are saved as for LoRA, the mode then PEFT's ``"vera_only"`` / ``"pvera_only"`` if every
    trained bias belongs to an adapter layer, else ``"all"``."""
    who = "save_peft_adapter"
    names = _adapter_names(model)
    if not names:
        raise ValueError(f"{who}: the model has no LoRALinear / QLoRALinear / MultiLoRALinear / VeRALinear / "
                         "PVeRALinear layers")
    if adapter_name is not None:
        _check_adapter_name(who, adapter_name)
        if adapter_name not in names:
            raise ValueError(f"{who}: the model has no adapter named {adapter_name!r} (has {names})")
        jobs = [(adapter_name, os.fspath(path))]
    else:
        jobs = [(a, os.fspath(path) if a == "default" else os.path.join(os.fspath(path), a)) for a in names]
    # The trained biases go with the first adapter saved (the one in ``path``): PEFT refuses a second
    # adapter with biases, and they are the model's, shared by every adapter.
    payloads = [(d, *_adapter_payload(model, a, who, with_biases=i == 0))
                for i, (a, d) in enumerate(sorted(jobs, key=lambda j: j[1] != os.fspath(path)))]
    for d, cfg, tensors in payloads:
        os.makedirs(d, exist_ok=True)
        # Both files are written in full to temporary files first, then renamed: a save that fails
        # midway leaves the previous adapter (config and weights) as it was.
        cfg_tmp = atomic_write(os.path.join(d, _CONFIG), lambda f: f.write(json.dumps(cfg, indent=2).encode()),
                               commit=False)
        try:
            write_safetensors(os.path.join(d, _WEIGHTS), {k: t.detach() for k, t in tensors.items()},
                              {"format": "pt"})
        except BaseException:
            os.remove(cfg_tmp)
            raise
        os.replace(cfg_tmp, os.path.join(d, _CONFIG))


def _peft_parts(base, layer_cls, kind, who):
    """(tuner layers of ``layer_cls``, ModulesToSaveWrappers) of a PEFT model's base model, each as
    (name, module); any other PEFT tuner layer or auxiliary wrapper is refused."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    layers, wrappers = [], []
    for name, mod in base.named_modules():
        if isinstance(mod, layer_cls):
            layers.append((name, mod))
        elif isinstance(mod, BaseTunerLayer):
            raise NotImplementedError(f"{who}: {name} is a {type(mod).__name__}; a {kind} model converts "
                                      f"{layer_cls.__name__} layers only")
        elif isinstance(mod, ModulesToSaveWrapper):
            wrappers.append((name, mod))
        elif isinstance(mod, AuxiliaryTrainingWrapper):
            raise NotImplementedError(f"{who}: {name} is a {type(mod).__name__}, which pyhappy does not convert")
    if not layers:
        raise ValueError(f"{who}: the model has no PEFT {kind} layers")
    return layers, wrappers


def _wrapper_swaps(wrappers, model_active, who, new):
    """from_peft's plan for PEFT's ModulesToSaveWrappers, into ``new`` (name -> (module, shell, saved
    info)): the active adapter's trained copy, recorded as a modules_to_save copy of it, or the
    original module where no active adapter has a copy."""
    for name, w in wrappers:
        have = list(w.modules_to_save.keys())
        active = [a for a in have if a in model_active]
        if set(have) - set(active) or len(active) > 1:
            raise NotImplementedError(f"{who}: {name} holds modules_to_save copies of adapters {have} (active: "
                                      f"{model_active}); pyhappy keeps one trained copy, of the active adapter")
        if getattr(w, "disable_adapters", False) and active:
            raise ValueError(f"{who}: {name} has its adapters disabled; enable them in PEFT first")
        if active:
            new[name] = (w.modules_to_save[active[0]], None, {"adapter": active[0], "original": w.original_module})
        else:
            new[name] = (w.original_module, None, None)


def _swap_in(base, new):
    """from_peft's apply step: each planned (module, shell, saved info) of ``new`` put in place,
    outer modules first."""
    for name, (layer, shell, saved) in sorted(new.items(), key=lambda kv: kv[0].count(".")):
        if saved is not None:
            layer.__dict__["peft_modules_to_save"] = saved
        _set(base, name, _attach_shell(layer, shell))


def from_peft(peft_model) -> nn.Module:
    """Convert a live PEFT LoRA model in place and return the underlying base model, now holding
    pyhappy modules and no PEFT wrapper.

    Each LoRA layer becomes a LoRALinear sharing the base weight, with PEFT's A, B, scaling,
    dropout and trainability; with several adapters in the model, every LoRA layer becomes a
    MultiLoRALinear holding all of its adapters, the active ones active. GPT-2's Conv1D bases are
    held transposed as nn.Linear (``unload`` gives the Conv1D back). ``modules_to_save`` wrappers
    are replaced by the trained copy (trainable; ``unload`` puts the original back), and biases
    keep the trainability PEFT gave them (``bias="all"`` / ``"lora_only"``). A DoRA layer
    (``use_dora``) becomes LoRALinear(use_dora=True) holding PEFT's ``lora_magnitude_vector`` (on a bitsandbytes
    4-bit base QLoRALinear(use_dora=True), QDoRA).

    Refused, with the layer named and before anything changes: DoRA in a model with several
    adapters (MultiLoRALinear has no DoRA), lora_bias, merged layers,
    disabled adapters, LoRA on non-linear layers, other PEFT tuners and trainable-token wrappers,
    ``modules_to_save`` copies of an adapter that is not converted as the active one.

    A PEFT model with one VeRA or PVeRA adapter converts to VeRALinear / PVeRALinear layers sharing
    one VeRAProjections that holds PEFT's vera_A / vera_B (pvera_A / pvera_B) tensors, with the
    lambdas, dropout, d_initial, save_projection / projection_prng_key and PVeRA's
    sample_at_inference (PEFT's generator_seed is kept for saving, with a warning: pyhappy's sampling
    noise comes from its own generator); ``modules_to_save`` copies and trained biases are carried as
    for LoRA. Refused: several adapters, 4-bit bases, merged or disabled layers."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as e:  # pragma: no cover - only reachable without peft
        raise ImportError("from_peft needs peft installed") from e
    who = "from_peft"
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    configs = getattr(peft_model, "peft_config", {}) or {}
    types = {a: str(getattr(c, "peft_type", "LORA")).split(".")[-1].upper() for a, c in configs.items()}
    if types and all(t in _VERA_KINDS for t in types.values()):
        return _from_peft_vera(peft_model, base, configs, who)
    for a, t in types.items():
        if t != "LORA":
            raise NotImplementedError(f"{who}: adapter {a!r} is {configs[a].peft_type}; only LoRA, VeRA and PVeRA "
                                      "adapters are converted (VeRA / PVeRA: one adapter, alone in the model)")
        for key in _UNSUPPORTED:  # what load_peft_adapter refuses in a config, refused here too
            if getattr(configs[a], key, None) not in _OFF:
                raise NotImplementedError(f"{who}: adapter {a!r} sets {key}={getattr(configs[a], key)!r}, which "
                                          "pyhappy does not implement")
    lora_layers, wrappers = _peft_parts(base, LoraLayer, "LoRA", who)
    all_names = []
    for _, mod in lora_layers:
        all_names += [a for a in mod.lora_A.keys() if a not in all_names]
    model_active = list(getattr(peft_model, "active_adapters", None) or lora_layers[0][1].active_adapters)
    multi = len(all_names) > 1

    # 1. Check every layer and build every replacement; the PEFT model is not changed yet (building
    # a LoRALinear freezes the shared base weight and bias: the Transaction restores the flags).
    new = {}
    with Transaction(base):
        for name, mod in lora_layers:
            _check_peft_layer_live(who, name, mod)
            names = list(mod.lora_A.keys())
            dora = [a for a, on in getattr(mod, "use_dora", {}).items() if on]
            with_dora = f" (DoRA, adapter {dora[0]!r}, included)" if dora else ""
            if getattr(mod, "lora_embedding_A", None) and len(mod.lora_embedding_A):
                raise NotImplementedError(f"{who}: {name} is a LoRA embedding; only linear layers are converted"
                                          + with_dora)
            for a in names:
                variant = getattr(mod, "lora_variant", {}).get(a)
                if variant is not None and not type(variant).__name__.startswith("Dora"):
                    raise NotImplementedError(f"{who}: {name} runs adapter {a!r} as PEFT's {type(variant).__name__}, "
                                              "which pyhappy does not implement (only LoRA and DoRA convert)")
                if getattr(mod, "lora_bias", {}).get(a, False):
                    raise NotImplementedError(f"{who}: {name} has lora_bias (adapter {a!r}), which pyhappy does not "
                                              "convert")
            layer_base = mod.get_base_layer()
            bias_grad = getattr(layer_base, "bias", None) is not None and layer_base.bias.requires_grad
            if not (isinstance(layer_base, nn.Linear) or _is_conv1d(layer_base)):
                raise NotImplementedError(f"{who}: {name} wraps a {type(layer_base).__name__}; only linear layers "
                                          "(nn.Linear, Conv1D, bitsandbytes' Linear4bit) are converted" + with_dora)
            if not multi and names[0] not in mod.active_adapters:
                raise ValueError(f"{who}: {name}'s only adapter {names[0]!r} is not active")
            r0 = int(mod.r[names[0]])
            if dora and multi:
                raise NotImplementedError(f"{who}: {name} uses DoRA (adapter {dora[0]!r}) and the model has several "
                                          f"adapters {all_names}; several adapters on one layer need "
                                          "MultiLoRALinear, which has no DoRA")
            if _is_bnb4(layer_base):
                if multi:
                    raise NotImplementedError(f"{who}: {name} has a 4-bit base and the model several adapters; "
                                              "several adapters on one layer need a dense base (MultiLoRALinear)")
                try:
                    qw, bias, shell = _quant_base(layer_base)
                except (ValueError, NotImplementedError) as e:
                    raise type(e)(f"{who}: {name}: {e}") from None
                layer = QLoRALinear.from_quantized(qw, bias, r=r0, alpha=float(r0), use_dora=bool(dora))
            else:
                lin, shell = _base_linear(layer_base)
                layer = MultiLoRALinear.from_linear(lin) if multi else LoRALinear.from_linear(
                    lin, r=r0, alpha=float(r0), use_dora=bool(dora))
            if not multi:
                layer.adapter_name = names[0]
            for a in names:
                r = int(mod.r[a])
                drop = mod.lora_dropout[a]
                p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
                s = float(mod.scaling[a])  # PEFT's own value (alpha/r or alpha/√r, patterns applied)
                if multi:
                    tgt = layer.add_adapter(a, r=r, alpha=s * r, dropout=p)
                    tgt.active = a in mod.active_adapters
                else:
                    tgt = layer
                    tgt.lora_dropout = p
                    tgt.lora_alpha = s * r
                tgt.scaling = s
                adapter_to(tgt, mod.lora_A[a].weight.dtype)  # PEFT's dtype (float32 on a bf16 base)
                with torch.no_grad():
                    tgt.lora_A.weight.copy_(mod.lora_A[a].weight)
                    tgt.lora_B.weight.copy_(mod.lora_B[a].weight)
                tgt.lora_A.weight.requires_grad_(mod.lora_A[a].weight.requires_grad)
                tgt.lora_B.weight.requires_grad_(mod.lora_B[a].weight.requires_grad)
                if dora:
                    mag = mod.lora_magnitude_vector[a].weight
                    with torch.no_grad():
                        tgt.lora_magnitude_vector.copy_(mag)
                    tgt.lora_magnitude_vector.requires_grad_(mag.requires_grad)
            if bias_grad:
                layer.bias.requires_grad_(True)
            new[name] = (layer, shell, None)
        _wrapper_swaps(wrappers, model_active, who, new)
        # 2. Apply.
        _swap_in(base, new)
    return base


# ---- VeRA and PVeRA: PEFT's VeraConfig / PveraConfig adapters ----------------------------------------------
#
# PEFT's format: adapter_config.json with peft_type "VERA" / "PVERA", r, target_modules,
# projection_prng_key, save_projection, vera_dropout / pvera_dropout, d_initial (PVeRA also
# sample_at_inference, generator_seed); adapter_model.safetensors with per layer
# ``base_model.model.<path>.{vera,pvera}_lambda_b`` [out] and ``..._lambda_d`` [r] ([2r] for PVeRA),
# and, iff save_projection, the shared projections ``base_model.{vera,pvera}_A`` [r or 2r, max in]
# and ``base_model.{vera,pvera}_B`` [max out, r] (max over the targeted layers). Without them the
# projections are redrawn from projection_prng_key at those sizes (VeRAProjections draws PEFT's numbers).
# Trained biases (bias "all" / "vera_only" / "pvera_only") and modules_to_save copies use the LoRA
# path's keys and helpers (_plan_saved_copies, _plan_biases, _finish_load, _save_copies_and_biases).

_VERA_KINDS = {"VERA": "vera", "PVERA": "pvera"}
_VERA_DEFAULTS = {"r": 256, "target_modules": None, "exclude_modules": None, "projection_prng_key": 0,
                  "save_projection": True, "d_initial": 0.1, "fan_in_fan_out": False, "bias": "none",
                  "modules_to_save": None, "init_weights": True, "layers_to_transform": None, "layers_pattern": None}
# PeftConfig's own fields: bookkeeping, no effect on what the adapter computes.
_PEFT_COMMON = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                "peft_version")


def _vera_kind(cfg) -> str | None:
    """"vera" / "pvera" for a VeRA / PVeRA config dict, else None."""
    return _VERA_KINDS.get(str(cfg.get("peft_type")).upper()) if isinstance(cfg, dict) else None


def parse_vera_config(cfg, who: str = "load_peft_adapter", source: str = _CONFIG) -> dict:
    """A PEFT VeRA / PVeRA adapter config (the dict of adapter_config.json) checked field by field,
    PEFT's VeraConfig / PveraConfig defaults filled in (r 256, projection_prng_key 0,
    save_projection true, dropout 0, d_initial 0.1, sample_at_inference false). The result has
    ``kind`` ("vera" | "pvera") and ``dropout`` (from vera_dropout / pvera_dropout). Raises
    TypeError / ValueError naming the field and ``source`` (bias is "none", "all" or
    "vera_only" / "pvera_only"; modules_to_save a list of names); NotImplementedError for any field
    pyhappy does not know set to something other than PEFT's "off" value."""
    at = f"{who}: {source}"
    if not isinstance(cfg, dict):
        raise TypeError(f"{at} must hold a JSON object, got {type(cfg).__name__}")
    kind = _vera_kind(cfg)
    if kind is None:
        raise ValueError(f"{at}: peft_type must be 'VERA' or 'PVERA', got {cfg.get('peft_type')!r}")
    drop_key = f"{kind}_dropout"
    defaults = dict(_VERA_DEFAULTS, **{drop_key: 0.0})
    if kind == "pvera":
        defaults.update(sample_at_inference=False, generator_seed=None)
    for key, v in cfg.items():
        if key not in defaults and key not in _PEFT_COMMON and v not in _OFF:
            raise NotImplementedError(f"{at}: {key}={v!r} is not supported for {kind.upper()} adapters")
    out = dict(defaults)
    out.update({k: v for k, v in cfg.items() if k in defaults})
    out["kind"] = kind
    out["r"] = _number(at, "r", out["r"], integer=True)
    if out["r"] < 1:
        raise ValueError(f"{at}: r must be >= 1, got {out['r']}")
    out["projection_prng_key"] = _number(at, "projection_prng_key", out["projection_prng_key"], integer=True)
    d = _number(at, drop_key, out[drop_key])
    if not 0.0 <= d < 1.0:
        raise ValueError(f"{at}: {drop_key} must be in [0, 1), got {d!r}")
    out["dropout"] = float(d)
    out["d_initial"] = float(_number(at, "d_initial", out["d_initial"]))
    bools = ["save_projection", "fan_in_fan_out", "init_weights"] + (["sample_at_inference"] if kind == "pvera" else [])
    for key in bools:
        if not isinstance(out[key], bool):
            raise TypeError(f"{at}: {key} must be true or false, got {out[key]!r}")
    if kind == "pvera" and out["generator_seed"] is not None:
        out["generator_seed"] = _number(at, "generator_seed", out["generator_seed"], integer=True)
    if out["bias"] not in ("none", "all", f"{kind}_only"):
        raise ValueError(f"{at}: bias must be 'none', 'all' or '{kind}_only', got {out['bias']!r}")
    out["modules_to_save"] = _str_list(at, "modules_to_save", out["modules_to_save"], allow_str=False)
    if out["target_modules"] is None:
        raise ValueError(f"{at}: target_modules is missing (PEFT's per-architecture defaults are not applied)")
    out["target_modules"] = _str_list(at, "target_modules", out["target_modules"])
    out["exclude_modules"] = _str_list(at, "exclude_modules", out["exclude_modules"])
    lt, lp = _check_layer_selection(at, out)
    if lp and lt is None:
        raise ValueError(f"{at}: layers_pattern is set but layers_to_transform is not (PEFT refuses this too)")
    return out


_VERA_TYPES = (VeRALinear, PVeRALinear)


def _vera_layer_dims(mod):
    """(out, in) of a layer a VeRA adapter can go on (nn.Linear or transformers' Conv1D), else None."""
    if _is_conv1d(mod):
        return mod.nf, mod.weight.shape[0]
    if isinstance(mod, nn.Linear) and not isinstance(mod, QuantLinear):
        return mod.out_features, mod.in_features
    return None


def _warn_generator_seed(who, seed):
    if seed is not None:
        warnings.warn(f"{who}: PVeRA's generator_seed={seed} is kept for saving, but pyhappy draws the sampling "
                      "noise from its own counter-based hash seeded by torch's generator (torch.manual_seed), so "
                      "the sampled steps differ from PEFT's seeded stream (the mean path is unaffected)",
                      stacklevel=3)


def _load_vera(model, path, raw, cfg_path, adapter_name, who):
    cfg = parse_vera_config(raw, who, cfg_path)
    kind, r = cfg["kind"], cfg["r"]
    rows = 2 * r if kind == "pvera" else r
    cls = PVeRALinear if kind == "pvera" else VeRALinear
    wpath, tensors = _read_adapter_weights(path, who)
    existing = _adapter_names(model)
    if existing:
        raise NotImplementedError(f"{who}: the model already holds adapter(s) {existing}; a {kind.upper()} adapter "
                                  "is loaded into a model without adapters")
    sites = _adapter_sites(model, cfg, who, skip_saved_copies=False)
    take, used = _tensor_taker(tensors, wpath, who)

    # 1. Validate every piece against the model; nothing is changed yet.
    plan = []
    for name, mod in sites:
        if isinstance(mod, QuantLinear) or _is_bnb4(mod):
            raise NotImplementedError(f"{who}: {name} has a quantized base; {kind.upper()} on a quantized base is "
                                      "not supported")
        dims = _vera_layer_dims(mod)
        if dims is None:
            raise TypeError(f"{who}: {name} is a {type(mod).__name__}; only linear layers (nn.Linear, Conv1D) take "
                            f"a {kind.upper()} adapter")
        N, K = dims
        lb = take(f"{_PREFIX}{name}.{kind}_lambda_b", (N,), f"{kind}_lambda_b [out]")
        ld = take(f"{_PREFIX}{name}.{kind}_lambda_d", (rows,), f"{kind}_lambda_d, r={r}")
        plan.append((name, mod, lb, ld))
    max_n = max(_vera_layer_dims(mod)[0] for _, mod, *_ in plan)
    max_k = max(_vera_layer_dims(mod)[1] for _, mod, *_ in plan)
    keys = (f"base_model.{kind}_A", f"base_model.{kind}_B")
    drawn = VeRAProjections(r, max_k, max_n, cfg["projection_prng_key"], cfg["save_projection"], kind) \
        if not cfg["save_projection"] else None
    if cfg["save_projection"]:
        A = take(keys[0], None, f"the shared projection, save_projection=true")
        B = take(keys[1], None, f"the shared projection, save_projection=true")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != rows or B.shape[1] != r or A.shape[1] < max_k or \
                B.shape[0] < max_n:
            raise ValueError(f"{who}: {wpath}: {keys[0]} {tuple(A.shape)} / {keys[1]} {tuple(B.shape)} do not fit "
                             f"r={r} and the targeted layers (A [{rows}, >= {max_k}], B [>= {max_n}, {r}])")
        proj = VeRAProjections.from_tensors(A.float(), B.float(), cfg["projection_prng_key"], True, kind)
    else:
        proj = drawn
        for key, want in zip(keys, (proj.A, proj.B)):
            if key in tensors:  # PEFT ignores them and redraws; only the same numbers are accepted
                if tuple(tensors[key].shape) != tuple(want.shape) or not torch.equal(tensors[key].float(), want):
                    raise ValueError(f"{who}: {wpath} holds {key}, but save_projection is false and it differs "
                                     "from the projection PEFT redraws from projection_prng_key (PEFT would ignore "
                                     "the stored one)")
                used.add(key)
    saved = _plan_saved_copies(model, _to_save_sites(model, cfg["modules_to_save"] or []), take, who)
    biases = _plan_biases(model, cfg, tensors, take, {n for n, *_ in plan}, saved, who, wpath)
    left = sorted(set(tensors) - used)
    if left:
        raise ValueError(f"{who}: {wpath} holds {len(left)} tensors the config does not place in this model, "
                         f"e.g. {left[:3]}")
    extra = {"sample_at_inference": cfg["sample_at_inference"]} if kind == "pvera" else {}
    if kind == "pvera":
        _warn_generator_seed(who, cfg["generator_seed"])

    # 2. Apply (the Transaction rolls the model back should anything still fail).
    with Transaction(model) as txn, torch.no_grad():
        for p in model.parameters():
            p.requires_grad_(False)
        new = {}
        for name, mod, lb, ld in plan:
            base, shell = _base_linear(mod)
            layer = cls.from_linear(base, r=r, dropout=cfg["dropout"], d_initial=cfg["d_initial"], projections=proj,
                                    init_weights=False, **extra)
            layer.lambda_b.copy_(lb.to(layer.lambda_b.dtype))
            layer.lambda_d.copy_(ld.to(layer.lambda_d.dtype))
            layer.lambda_b.requires_grad_(True)
            layer.lambda_d.requires_grad_(True)
            layer.adapter_name = adapter_name
            if kind == "pvera":
                layer.peft_generator_seed = cfg["generator_seed"]
            new[name] = _attach_shell(layer, shell)
        _finish_load(txn, model, new, saved, biases, adapter_name)
    return model


def _vera_payload(model, adapter, layers, who):
    """(config dict, tensors) of one named VeRA / PVeRA adapter in PEFT's format; ``layers`` its
    (name, module) pairs."""
    kinds = {m.KIND for _, m in layers}
    if len(kinds) != 1:
        raise ValueError(f"{who}: adapter {adapter!r} mixes VeRA and PVeRA layers; PEFT's format holds one kind")
    kind = kinds.pop()
    for n, m in layers:
        if m.merged:
            raise ValueError(f"{who}: {n} is merged; unmerge it first (the saved lambdas would be applied twice)")
    if len({id(m.projections) for _, m in layers}) != 1:
        raise ValueError(f"{who}: the layers of {adapter!r} hold different projections; PEFT's format shares one "
                         "pair across the model")
    for field, vals in (("r", {m.r for _, m in layers}), (f"{kind}_dropout", {m.dropout for _, m in layers})) + (
            (("sample_at_inference", {m.sample_at_inference for _, m in layers}),
             ("generator_seed", {getattr(m, "peft_generator_seed", None) for _, m in layers}))
            if kind == "pvera" else ()):
        if len(vals) != 1:
            raise ValueError(f"{who}: PEFT's {field} is one value per adapter; the layers of {adapter!r} have "
                             f"{sorted(vals, key=repr)}")
    bad = _representable(model)
    if bad:
        raise ValueError(f"{who}: trainable tensors that a PEFT {kind.upper()} checkpoint cannot hold: {bad[:5]} "
                         "(freeze them, or load the module as modules_to_save)")
    m0 = layers[0][1]
    proj, r = m0.projections, m0.r
    rows = 2 * r if kind == "pvera" else r
    max_n = max(m.out_features for _, m in layers)
    max_k = max(m.in_features for _, m in layers)
    A = proj.A[:rows, :max_k].contiguous()
    B = proj.B[:max_n, :r].contiguous()
    tensors = {}
    if proj.save_projection:
        tensors[f"base_model.{kind}_A"] = A
        tensors[f"base_model.{kind}_B"] = B
    else:
        drawn = VeRAProjections(r, max_k, max_n, proj.projection_prng_key, False, kind)
        if not (torch.equal(drawn.A, A.float().cpu()) and torch.equal(drawn.B, B.float().cpu())):
            raise ValueError(f"{who}: the projections of {adapter!r} (save_projection=False) are not the ones PEFT "
                             f"redraws from projection_prng_key={proj.projection_prng_key} for these layers; save "
                             "them with the checkpoint (projections.save_projection = True)")
    for n, m in layers:
        tensors[f"{_PREFIX}{n}.{kind}_lambda_b"] = m.lambda_b
        tensors[f"{_PREFIX}{n}.{kind}_lambda_d"] = m.lambda_d
    mode, to_save = _save_copies_and_biases(model, adapter, {n for n, _ in layers}, f"{kind}_only", tensors)
    cfg = {
        "peft_type": kind.upper(), "task_type": None, "r": r, "target_modules": [n for n, _ in layers],
        "projection_prng_key": proj.projection_prng_key, "save_projection": proj.save_projection,
        f"{kind}_dropout": m0.dropout, "d_initial": Counter(m.d_initial for _, m in layers).most_common(1)[0][0],
        "fan_in_fan_out": False, "bias": mode, "modules_to_save": to_save, "init_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
        "base_model_name_or_path": None, "revision": None,
    }
    if kind == "pvera":
        cfg["sample_at_inference"] = m0.sample_at_inference
        cfg["generator_seed"] = getattr(m0, "peft_generator_seed", None)
    return cfg, tensors


def _from_peft_vera(peft_model, base, configs, who):
    """from_peft for a PEFT model holding one VeRA or PVeRA adapter."""
    if len(configs) != 1:
        raise NotImplementedError(f"{who}: the model has several adapters {list(configs)}; VeRA / PVeRA are "
                                  "converted one adapter per model")
    (a, c), = configs.items()
    kind = _vera_kind({"peft_type": str(c.peft_type).split(".")[-1]})
    if kind == "pvera":
        from peft.tuners.pvera import PveraLayer as Layer
    else:
        from peft.tuners.vera import VeraLayer as Layer
    cls = PVeRALinear if kind == "pvera" else VeRALinear
    layers, wrappers = _peft_parts(base, Layer, kind.upper(), who)
    if kind == "pvera":
        _warn_generator_seed(who, getattr(c, "generator_seed", None))
    new, proj = {}, None
    with Transaction(base):
        # 1. Check every layer and build every replacement (building freezes the shared base weight
        # and bias: the Transaction restores the flags should a later layer be refused).
        for name, mod in layers:
            _check_peft_layer_live(who, name, mod)
            lam_d, lam_b = getattr(mod, f"{kind}_lambda_d"), getattr(mod, f"{kind}_lambda_b")
            if list(lam_d.keys()) != [a] or a not in mod.active_adapters:
                raise ValueError(f"{who}: {name} holds adapters {list(lam_d.keys())} (active {mod.active_adapters}); "
                                 f"one active adapter {a!r} is converted")
            layer_base = mod.get_base_layer()
            if _is_bnb4(layer_base) or _vera_layer_dims(layer_base) is None:
                raise NotImplementedError(f"{who}: {name} wraps a {type(layer_base).__name__}; only dense linear "
                                          f"layers (nn.Linear, Conv1D) are converted for {kind.upper()}")
            bias_grad = getattr(layer_base, "bias", None) is not None and layer_base.bias.requires_grad
            A, B = getattr(mod, f"{kind}_A")[a], getattr(mod, f"{kind}_B")[a]
            if proj is None:
                proj = VeRAProjections.from_tensors(A, B, int(c.projection_prng_key), bool(c.save_projection), kind)
            elif A is not proj.A or B is not proj.B:
                raise ValueError(f"{who}: {name}'s projections are not the model's shared ones")
            drop = getattr(mod, f"{kind}_dropout")[a]
            extra = {"sample_at_inference": bool(mod.sample_at_inference[a])} if kind == "pvera" else {}
            lin, shell = _base_linear(layer_base)
            layer = cls.from_linear(lin, r=int(mod.r[a]), dropout=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
                                    d_initial=float(c.d_initial), projections=proj, init_weights=False, **extra)
            with torch.no_grad():
                for dst, src in ((layer.lambda_b, lam_b[a]), (layer.lambda_d, lam_d[a])):
                    dst.copy_(src)
                    dst.requires_grad_(src.requires_grad)
            if bias_grad:
                layer.bias.requires_grad_(True)
            layer.adapter_name = a
            if kind == "pvera":
                layer.peft_generator_seed = getattr(c, "generator_seed", None)
            new[name] = (layer, shell, None)
        _wrapper_swaps(wrappers, list(getattr(peft_model, "active_adapters", None) or [a]), who, new)
        # 2. Apply.
        _swap_in(base, new)
    return base


# ---- quantized checkpoints (bitsandbytes 4-bit, GPTQ) into a model built from its config ---------------

_BNB_SUFFIX = ".weight.quant_state.bitsandbytes__"


def load_quantized_state_dict(model: nn.Module, state_dict: dict, *, bits: int = 4, group_size: int = 128,
                              sym: bool = False, checkpoint_format: str = "gptq", strict: bool = True) -> dict:
    """Load a quantized checkpoint's state dict into a model built from its config (in place): every
    layer stored in bitsandbytes NF4 form (transformers' keys: ``<m>.weight``, ``<m>.weight.absmax``,
    ..., ``<m>.weight.quant_state.bitsandbytes__nf4``) or GPTQ form (``<m>.qweight``, ``qzeros``,
    ``scales``, ``g_idx``; bits / group_size / sym / checkpoint_format as in the checkpoint's
    quantization config) becomes a QuantLinear holding the packed weight; everything else loads
    as usual. Wrap the result with ``inject(..., quantize=None)`` targets for QLoRA, or use
    QLoRALinear.from_quantized. Returns {"quantized": [...], "missing": [...], "unexpected": [...]}."""
    from ._transaction import check_state_dict
    from .quant import QuantizedWeight

    # Everything is parsed, checked and built first; the model changes only inside the Transaction
    # at the end, after the remaining state dict passed check_state_dict: a failure changes nothing.
    who = "load_quantized_state_dict"
    sd = dict(state_dict)
    quantized = {}
    for key in list(sd):
        if _BNB_SUFFIX in key:
            prefix = key[: key.index(_BNB_SUFFIX)]
            kind = key[key.index(_BNB_SUFFIX) + len(_BNB_SUFFIX):]
            if kind != "nf4":
                raise NotImplementedError(f"{who}: {prefix} is bitsandbytes {kind}; only nf4 is supported")
            wkey = prefix + ".weight"
            if wkey not in sd:
                raise KeyError(f"{who}: {prefix} has a bitsandbytes quant state but no {wkey}")
            qs = {k[len(wkey) + 1:]: sd.pop(k) for k in list(sd) if k.startswith(wkey + ".")}
            try:
                quantized[prefix] = QuantizedWeight.from_bnb(sd.pop(wkey), qs)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{who}: {prefix}: {e}") from None
        elif key.endswith(".qweight") and key in sd:
            prefix = key[: -len(".qweight")]
            parts = {n: sd.pop(f"{prefix}.{n}", None) for n in ("qweight", "qzeros", "scales", "g_idx")}
            if parts["qzeros"] is None or parts["scales"] is None:
                raise KeyError(f"{who}: {prefix} has qweight but no qzeros/scales")
            try:
                quantized[prefix] = QuantizedWeight.from_gptq(parts["qweight"], parts["qzeros"], parts["scales"],
                                                              g_idx=parts["g_idx"], bits=bits, group_size=group_size,
                                                              sym=sym, checkpoint_format=checkpoint_format)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{who}: {prefix}: {e}") from None
    new = {}
    for prefix, qw in quantized.items():
        try:
            mod = model.get_submodule(prefix)
        except AttributeError:
            raise KeyError(f"{who}: the checkpoint quantizes {prefix!r}, which the model lacks") from None
        N, K = qw.shape
        if not isinstance(mod, (nn.Linear, QuantLinear)) or (mod.out_features, mod.in_features) != (N, K):
            raise ValueError(f"{who}: {prefix} is {type(mod).__name__} "
                             f"[{getattr(mod, 'out_features', '?')}, {getattr(mod, 'in_features', '?')}] but the "
                             f"checkpoint holds a [{N}, {K}] quantized weight")
        bias = sd.pop(prefix + ".bias", None)
        if bias is None and getattr(mod, "bias", None) is not None:
            bias = mod.bias.detach()
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,)):
            raise ValueError(f"{who}: {prefix}.bias must be a [{N}] tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        q = QuantLinear.from_quantized(qw, bias)
        dt = mod.weight.dtype if isinstance(mod, nn.Linear) else mod.weight_dtype  # follow the model's dtype
        q.weight_dtype = dt
        if q.bias is not None:
            q.bias = nn.Parameter(q.bias.detach().to(device=mod.weight.device if isinstance(mod, nn.Linear)
                                                     else q.bias.device, dtype=dt), requires_grad=False)
        new[prefix] = q
    with Transaction(model):
        for prefix, q in new.items():
            _set(model, prefix, q)
        missing, unexpected = check_state_dict(model, sd, strict=False, who=who)
        missing = [k for k in missing if not any(k.startswith(p + ".") for p in quantized)]
        if strict and (missing or unexpected):
            raise KeyError(f"{who}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not any(k.startswith(p + ".") for p in quantized)]
    return {"quantized": sorted(quantized), "missing": missing, "unexpected": list(res.unexpected_keys)}


# ---- named adapters across a model (MultiLoRALinear layers) -------------------------------------------


def _multi(model, who):
    mods = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if not mods:
        raise ValueError(f"{who}: the model has no MultiLoRALinear (inject(..., adapter='multi_lora') first)")
    return mods


def add_adapter(model: nn.Module, name: str, r: int = 8, alpha: float | None = None, rslora: bool = False,
                init: str = "peft") -> int:
    """Add adapter ``name`` to every MultiLoRALinear of the model (trainable; the base stays frozen).
    Returns the number of layers."""
    mods = _multi(model, "add_adapter")
    for m in mods:
        m.add_adapter(name, r=r, alpha=alpha, rslora=rslora, init=init)
    return len(mods)


def set_adapter(model: nn.Module, name: str, *, active: bool | None = None, weight: float | None = None,
                only: bool = False) -> None:
    """Activate / deactivate / weight adapter ``name`` in every layer that has it; only=True also
    deactivates the other adapters in every layer (those without ``name`` then run the base alone)
    and, where the model's adapters train (any of their parameters requires grad), makes ``name``'s
    lora_A / lora_B trainable and freezes the others', as PEFT's ``set_adapter`` does, so that
    training goes on with the adapter switched to; a model whose adapters are all frozen (serving)
    stays frozen. An adapter no layer has, or a bad weight, is refused before anything changes."""
    mods = _multi(model, "set_adapter")
    if not any(name in m.adapters for m in mods):
        raise KeyError(f"set_adapter: no layer has an adapter named {name!r}")
    if weight is not None:
        weight = finite_number("set_adapter", "weight", weight)
    training = only and any(p.requires_grad for m in mods for p in m.adapters.parameters())
    for m in mods:
        if only:
            for other, pair in m.adapters.items():
                m.set_adapter(other, active=(other == name))
                for p in pair.parameters() if training else ():
                    p.requires_grad_(other == name)
        if name in m.adapters:
            m.set_adapter(name, active=active, weight=weight)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer."""
    for m in _multi(model, "delete_adapter"):
        m.delete_adapter(name)


# ---- undoing an injection -----------------------------------------------------------------------------

_MERGEABLE = (LoRALinear, SparseDeltaLinear, TTLinear, VeRALinear, PVeRALinear)


def _refuse_router_merge(who: str, model: nn.Module) -> None:
    """A mixture of LoRA experts has no merged form (its experts and gates depend on each token)."""
    for name, m in model.named_modules():
        if isinstance(m, MoLoRALinear):
            raise ValueError(f"{who}: {name} is a MoLoRALinear: a mixture of LoRA experts cannot be merged into its "
                             "base weight (the router picks experts per token); nothing was changed")


def merge(model: nn.Module) -> int:
    """Fold every (unmerged) adapter with a dense base into its weight; returns how many. A model with
    a mixture of LoRA experts (MoLoRALinear) is refused before anything changes."""
    _refuse_router_merge("merge", model)
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, (LoRALinear, *_VERA_TYPES)) and not m.merged:
            m.merge()
            n += 1
        elif isinstance(m, TTLinear) and m.weight is not None and not m.merged:
            m.merge()
            n += 1
        elif isinstance(m, SparseDeltaLinear) and m.weight is not None and \
                any(d.enabled and not d.merged for d in m.deltas.values()):
            m.merge()
            n += 1
    return n


def unmerge(model: nn.Module) -> int:
    """Undo ``merge`` on every merged adapter; returns how many."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, (LoRALinear, TTLinear, *_VERA_TYPES)) and m.merged:
            m.unmerge()
            n += 1
        elif isinstance(m, SparseDeltaLinear) and m._saved:
            m.unmerge()
            n += 1
    return n


def _merge_multi(m):
    """Fold the active adapters of a MultiLoRALinear into its weight (float32, one rounding)."""
    w = m.weight.float()
    for p in m.adapters.values():
        if p.active:
            w.addmm_(p.lora_B.weight.float(), p.lora_A.weight.float(), alpha=p.scaling * p.weight)
    m.weight.copy_(w)


@torch.no_grad()
def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Replace every adapter module by the layer it was put on (in place; returns the model) and
    undo PEFT's modules_to_save: the original module type comes back (nn.Linear sharing the weight,
    or the recorded original such as GPT-2's Conv1D in its [in, out] layout, FalconLinear, ...;
    QuantLinear for a packed base), and each trained modules_to_save copy gives way to the original
    module. merge=True folds the adapters in first (dense bases only: a quantized base cannot absorb
    them; MultiLoRALinear folds its active adapters) and keeps the trained modules_to_save copies,
    as PEFT's merge_and_unload does. Without merge, merged adapters are unmerged so the base weights
    come back unchanged. Checked before anything changes: an error leaves the model as it was."""
    todo = [(n, m) for n, m in model.named_modules()
            if n and isinstance(m, (*_MERGEABLE, QLoRALinear, MultiLoRALinear, MoLoRALinear))]
    if merge:
        _refuse_router_merge("unload(merge=True)", model)
        for name, m in todo:
            if isinstance(m, QLoRALinear) or (isinstance(m, (SparseDeltaLinear, TTLinear)) and m.weight is None):
                raise ValueError(f"unload: {name} has a quantized base; merge=True cannot fold its adapter into it")
    for name, m in todo:
        if isinstance(m, MoLoRALinear):  # the experts are dropped, the base layer comes back
            _set(model, name, m.unload())
            continue
        if isinstance(m, QLoRALinear):
            _set(model, name, _give_back(m))
            continue
        if isinstance(m, (SparseDeltaLinear, TTLinear)) and m.weight is None:
            _set(model, name, m.base)
            continue
        if isinstance(m, MultiLoRALinear):
            if merge:
                _merge_multi(m)
        elif merge:
            if isinstance(m, SparseDeltaLinear):
                if any(d.enabled and not d.merged for d in m.deltas.values()):
                    m.merge()
            elif not m.merged:
                m.merge()
        elif isinstance(m, SparseDeltaLinear):
            if m._saved:
                m.unmerge()
        elif m.merged:
            m.unmerge()
        _set(model, name, _give_back(m))
    for name, m in _saved_copies(model):
        info = m.__dict__.pop("peft_modules_to_save")
        if not merge:
            _set(model, name, info["original"])
    return model


__all__ = ["add_adapter", "delete_adapter", "set_adapter", "from_peft", "load_peft_adapter", "load_quantized_state_dict", "merge", "save_peft_adapter", "parse_adapter_config", "parse_vera_config", "unload", "unmerge"]
