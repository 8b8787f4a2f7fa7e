"""Interop with the checkpoints and models users already have: PEFT LoRA adapters, and undoing an
injection (merge / unmerge / unload).

PEFT's LoRA format (DESIGN.md): a directory with ``adapter_config.json`` (peft_type "LORA", r,
lora_alpha, target_modules as a list of names/suffixes or a regex string, use_rslora, rank_pattern /
alpha_pattern, fan_in_fan_out, bias) and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
(scaling alpha/r, or alpha/√r with rsLoRA). PEFT itself is never imported here except by
``from_peft`` (which receives a live PEFT model).
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from .inject import _matcher
from .nn import LoRALinear, MultiLoRALinear, QLoRALinear, QuantLinear, SparseDeltaLinear, TTLinear
from .sparse import atomic_write, read_safetensors, write_safetensors

_PREFIX = "base_model.model."
_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with re.match((.*\\.)?(k)$, name)."""
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return val
    return default


def _conv1d_to_linear(mod) -> nn.Linear:
    """transformers' Conv1D (GPT-2; weight [in, out], PEFT's fan_in_fan_out) as an nn.Linear. The
    weight is transposed into a new tensor (Conv1D stores it the other way round)."""
    w = mod.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.t())
        if mod.bias is not None:
            lin.bias.copy_(mod.bias.detach())
    return lin


def _is_conv1d(mod) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def _set(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def load_peft_adapter(model: nn.Module, path, adapter_name: str = "default") -> nn.Module:
    """Load a saved PEFT LoRA adapter directory into a plain base model (in place): the targeted
    layers become LoRALinear with PEFT's weights, rank/alpha patterns and rsLoRA honoured; the base
    is frozen. Returns the model. (GPT-2 Conv1D layers are converted to nn.Linear first.)"""
    if adapter_name != "default":
        raise ValueError("load_peft_adapter: pyhappy LoRALinear holds one adapter per layer; adapter_name must be "
                         f"'default', got {adapter_name!r}")
    cfg_path = os.path.join(path, _CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"load_peft_adapter: no {_CONFIG} in {path}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"load_peft_adapter: only LoRA adapters are supported, got peft_type {cfg.get('peft_type')!r}")
    for key in ("use_dora", "layers_to_transform", "layers_pattern", "modules_to_save"):
        if cfg.get(key) not in (None, False, [], ""):
            raise NotImplementedError(f"load_peft_adapter: {key}={cfg.get(key)!r} is not supported yet")
    if cfg.get("bias", "none") != "none":
        raise NotImplementedError(f"load_peft_adapter: bias={cfg.get('bias')!r} (trained biases) is not supported yet")
    wpath = os.path.join(path, _WEIGHTS)
    if not os.path.isfile(wpath):
        raise FileNotFoundError(f"load_peft_adapter: no {_WEIGHTS} in {path} (only the safetensors format is read)")
    tensors, _ = read_safetensors(wpath)
    match = _matcher(cfg["target_modules"])
    exclude = cfg.get("exclude_modules")
    excluded = _matcher(exclude) if exclude else (lambda n: False)
    r0, a0, rs = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"])), bool(cfg.get("use_rslora", False))
    dropout = float(cfg.get("lora_dropout", 0.0))
    sites = []
    for name, mod in model.named_modules():
        if name and match(name) and not excluded(name) and (isinstance(mod, nn.Linear) or _is_conv1d(mod)):
            sites.append(name)
    if not sites:
        raise ValueError(f"load_peft_adapter: target_modules={cfg['target_modules']!r} matched no linear layer")
    new = {}
    for name in sites:
        mod = model.get_submodule(name)
        base = _conv1d_to_linear(mod) if _is_conv1d(mod) else mod
        r = int(_pattern_value(cfg.get("rank_pattern"), name, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, a0))
        layer = LoRALinear.from_linear(base, r=r, alpha=alpha, dropout=dropout, rslora=rs)
        for part in ("lora_A", "lora_B"):
            key = f"{_PREFIX}{name}.{part}.weight"
            if key not in tensors:
                raise KeyError(f"load_peft_adapter: {wpath} has no {key}")
            t = tensors[key]
            want = getattr(layer, part).weight
            if tuple(t.shape) != tuple(want.shape):
                raise ValueError(f"load_peft_adapter: {key} is {tuple(t.shape)} but the layer needs "
                                 f"{tuple(want.shape)} (r={r})")
            with torch.no_grad():
                want.copy_(t.to(want.dtype))
        new[name] = layer
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in new.items():
        _set(model, name, layer)
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    return model


def _lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear))]


def save_peft_adapter(model: nn.Module, path, adapter_name: str = "default") -> None:
    """Save the model's LoRA adapters (LoRALinear / QLoRALinear) as a PEFT adapter directory that
    ``PeftModel.from_pretrained`` loads (and ``load_peft_adapter`` too). Ranks / alphas that differ
    across layers go to rank_pattern / alpha_pattern (exact module names)."""
    if adapter_name != "default":
        raise ValueError(f"save_peft_adapter: adapter_name must be 'default', got {adapter_name!r}")
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("save_peft_adapter: the model has no LoRALinear / QLoRALinear layers")
    if any(m.lora_C is not None for _, m in mods):
        raise ValueError("save_peft_adapter: layers with a LoTR core (lora_C) have no PEFT LoRA equivalent")
    rs = {m.rslora for _, m in mods}
    if len(rs) != 1:
        raise ValueError("save_peft_adapter: PEFT's use_rslora is one flag per adapter; the layers mix both")
    from collections import Counter

    r0 = Counter(m.r for _, m in mods).most_common(1)[0][0]
    a0 = Counter(m.lora_alpha for _, m in mods).most_common(1)[0][0]
    rank_pattern = {f"^{re.escape(n)}": m.r for n, m in mods if m.r != r0}
    alpha_pattern = {f"^{re.escape(n)}": m.lora_alpha for n, m in mods if m.lora_alpha != a0}
    cfg = {
        "peft_type": "LORA", "task_type": None, "r": r0, "lora_alpha": a0, "lora_dropout": mods[0][1].lora_dropout,
        "target_modules": [n for n, _ in mods], "use_rslora": rs.pop(), "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "fan_in_fan_out": False, "bias": "none", "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": None, "revision": None,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }
    tensors = {}
    for n, m in mods:
        tensors[f"{_PREFIX}{n}.lora_A.weight"] = m.lora_A.weight
        tensors[f"{_PREFIX}{n}.lora_B.weight"] = m.lora_B.weight
    os.makedirs(path, exist_ok=True)
    # Both files are written in full to temporary files first, then renamed: a save that fails midway
    # leaves the previous adapter (config and weights) as it was.
    cfg_tmp = atomic_write(os.path.join(path, _CONFIG), lambda f: f.write(json.dumps(cfg, indent=2).encode()),
                           commit=False)
    try:
        write_safetensors(os.path.join(path, _WEIGHTS), tensors, {"format": "pt"})
    except BaseException:
        os.remove(cfg_tmp)
        raise
    os.replace(cfg_tmp, os.path.join(path, _CONFIG))


def from_peft(peft_model) -> nn.Module:
    """Convert a live PEFT LoRA model: every LoRA layer (its active adapter) becomes a LoRALinear
    sharing the base weight, with PEFT's A, B, scaling and dropout; the PEFT wrappers are removed.
    Returns the underlying base model (now holding pyhappy modules)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as e:  # pragma: no cover - only reachable without peft
        raise ImportError("from_peft needs peft installed") from e
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    new = {}
    for name, mod in base.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        active = list(mod.active_adapters)
        if len(active) != 1:
            raise ValueError(f"from_peft: {name} has {len(active)} active adapters; pyhappy converts exactly one")
        a = active[0]
        if getattr(mod, "merged", False):
            raise ValueError(f"from_peft: {name} is merged; unmerge it in PEFT first")
        if mod.use_dora.get(a, False):
            raise NotImplementedError(f"from_peft: {name} uses DoRA (not supported yet)")
        layer_base = mod.get_base_layer()
        if _is_conv1d(layer_base) or getattr(mod, "fan_in_fan_out", False):
            layer_base = _conv1d_to_linear(layer_base)
        if not isinstance(layer_base, nn.Linear):
            raise NotImplementedError(f"from_peft: {name} wraps a {type(layer_base).__name__}; only linear layers "
                                      "are converted")
        r = int(mod.r[a])
        drop = mod.lora_dropout[a]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        layer = LoRALinear.from_linear(layer_base, r=r, alpha=float(r), dropout=p)
        layer.scaling = float(mod.scaling[a])  # PEFT's own value (alpha/r or alpha/√r, patterns applied)
        layer.lora_alpha = layer.scaling * r
        with torch.no_grad():
            layer.lora_A.weight.copy_(mod.lora_A[a].weight)
            layer.lora_B.weight.copy_(mod.lora_B[a].weight)
        layer.lora_A.weight.requires_grad_(mod.lora_A[a].weight.requires_grad)
        layer.lora_B.weight.requires_grad_(mod.lora_B[a].weight.requires_grad)
        new[name] = layer
    if not new:
        raise ValueError("from_peft: the model has no PEFT LoRA layers")
    for name, layer in new.items():
        _set(base, name, layer)
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
    from .quant import QuantizedWeight

    sd = dict(state_dict)
    quantized = {}
    for key in list(sd):
        if _BNB_SUFFIX in key:
            prefix = key[: key.index(_BNB_SUFFIX)]
            kind = key[key.index(_BNB_SUFFIX) + len(_BNB_SUFFIX):]
            if kind != "nf4":
                raise NotImplementedError(f"load_quantized_state_dict: {prefix} is bitsandbytes {kind}; only nf4 "
                                          "is supported")
            wkey = prefix + ".weight"
            qs = {k[len(wkey) + 1:]: sd.pop(k) for k in list(sd) if k.startswith(wkey + ".")}
            quantized[prefix] = QuantizedWeight.from_bnb(sd.pop(wkey), qs)
        elif key.endswith(".qweight") and key in sd:
            prefix = key[: -len(".qweight")]
            parts = {n: sd.pop(f"{prefix}.{n}", None) for n in ("qweight", "qzeros", "scales", "g_idx")}
            if parts["qzeros"] is None or parts["scales"] is None:
                raise KeyError(f"load_quantized_state_dict: {prefix} has qweight but no qzeros/scales")
            quantized[prefix] = QuantizedWeight.from_gptq(parts["qweight"], parts["qzeros"], parts["scales"],
                                                          g_idx=parts["g_idx"], bits=bits, group_size=group_size,
                                                          sym=sym, checkpoint_format=checkpoint_format)
    for prefix, qw in quantized.items():
        try:
            mod = model.get_submodule(prefix)
        except AttributeError:
            raise KeyError(f"load_quantized_state_dict: the checkpoint quantizes {prefix!r}, which the model lacks")
        N, K = qw.shape
        if not isinstance(mod, (nn.Linear, QuantLinear)) or (mod.out_features, mod.in_features) != (N, K):
            raise ValueError(f"load_quantized_state_dict: {prefix} is {type(mod).__name__} "
                             f"[{getattr(mod, 'out_features', '?')}, {getattr(mod, 'in_features', '?')}] but the "
                             f"checkpoint holds a [{N}, {K}] quantized weight")
        bias = sd.pop(prefix + ".bias", None)
        if bias is None and getattr(mod, "bias", None) is not None:
            bias = mod.bias.detach()
        q = QuantLinear.from_quantized(qw, bias)
        dt = mod.weight.dtype if isinstance(mod, nn.Linear) else mod.weight_dtype  # follow the model's dtype
        q.weight_dtype = dt
        if q.bias is not None:
            q.bias = nn.Parameter(q.bias.detach().to(device=mod.weight.device if isinstance(mod, nn.Linear)
                                                     else q.bias.device, dtype=dt), requires_grad=False)
        _set(model, prefix, q)
    res = model.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not any(k.startswith(p + ".") for p in quantized)]
    if strict and (missing or res.unexpected_keys):
        raise KeyError(f"load_quantized_state_dict: missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}")
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
    """Activate / deactivate / weight adapter ``name`` in every layer; only=True also deactivates the others."""
    for m in _multi(model, "set_adapter"):
        if only:
            for other in m.adapters:
                m.set_adapter(other, active=(other == name))
        m.set_adapter(name, active=active, weight=weight)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer."""
    for m in _multi(model, "delete_adapter"):
        m.delete_adapter(name)


# ---- undoing an injection -----------------------------------------------------------------------------

_MERGEABLE = (LoRALinear, SparseDeltaLinear, TTLinear)


def merge(model: nn.Module) -> int:
    """Fold every (unmerged) adapter with a dense base into its weight; returns how many."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear) and not m.merged:
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
        if isinstance(m, (LoRALinear, TTLinear)) and m.merged:
            m.unmerge()
            n += 1
        elif isinstance(m, SparseDeltaLinear) and m._saved:
            m.unmerge()
            n += 1
    return n


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Replace every adapter module by its base layer (in place; returns the model): dense bases as
    nn.Linear (sharing the weight), packed bases as QuantLinear. merge=True folds the adapters in
    first (dense bases only; a quantized base cannot absorb them). Without merge, merged adapters
    are unmerged so the base weights come back unchanged."""
    todo = [(n, m) for n, m in model.named_modules()
            if n and isinstance(m, (*_MERGEABLE, QLoRALinear, MultiLoRALinear))]
    if merge:  # checked before anything changes: an error leaves the model as it was
        for name, m in todo:
            if isinstance(m, MultiLoRALinear):
                raise ValueError(f"unload: {name} holds several named adapters; merge=True needs one (LoRALinear)")
            if isinstance(m, QLoRALinear) or (isinstance(m, (SparseDeltaLinear, TTLinear)) and m.weight is None):
                raise ValueError(f"unload: {name} has a quantized base; merge=True cannot fold its adapter into it")
    for name, m in todo:
        if isinstance(m, QLoRALinear):
            _set(model, name, QuantLinear.from_quantized(m.qweight, m.bias))
            continue
        if isinstance(m, (SparseDeltaLinear, TTLinear)) and m.weight is None:
            _set(model, name, m.base)
            continue
        if isinstance(m, MultiLoRALinear):
            pass
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
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                        dtype=m.weight.dtype)
        lin.weight = m.weight
        lin.bias = m.bias
        _set(model, name, lin)
    return model


__all__ = ["add_adapter", "delete_adapter", "set_adapter", "from_peft", "load_peft_adapter", "load_quantized_state_dict", "merge", "save_peft_adapter", "unload", "unmerge"]
