"""pyhappy.inject: swap nn.Linear layers of any model for pyhappy adapter modules by name."""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from ._transaction import Transaction, set_submodule
from .nn import LoRALinear, MoLoRALinear, MultiLoRALinear, QLoRALinear, QuantLinear, SparseDeltaLinear, TTLinear
from .nn import PVeRALinear, VeRALinear, VeRAProjections
from .ops._checks import finite_number
from .quant import FORMATS

ADAPTERS = {"lora": LoRALinear, "multi_lora": MultiLoRALinear, "sparse": SparseDeltaLinear, "tt": TTLinear,
            "vera": VeRALinear, "pvera": PVeRALinear, "molora": MoLoRALinear}


@dataclasses.dataclass
class InjectReport:
    """What ``inject`` did: the qualified names it replaced and the parameter counts after it."""

    replaced: list
    trainable_params: int
    total_params: int
    quantized: list = dataclasses.field(default_factory=list)  # other layers made QuantLinear

    def __iter__(self):
        return iter(self.replaced)

    def __len__(self):
        return len(self.replaced)

    def __str__(self):
        pct = 100.0 * self.trainable_params / max(1, self.total_params)
        q = f" (+{len(self.quantized)} quantized without adapter)" if self.quantized else ""
        return (f"replaced {len(self.replaced)} modules{q}; trainable params: {self.trainable_params:,} of "
                f"{self.total_params:,} ({pct:.3f}%)")


def _matcher(target_modules):
    """PEFT's rules: a str is a regex that must match the whole name; a list/tuple/set matches
    names equal to an entry or ending in "." + entry."""
    if isinstance(target_modules, str):
        try:
            rx = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"inject: target_modules is not a valid regex ({e}): {target_modules!r}") from None
        return lambda name: rx.fullmatch(name) is not None
    if isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules:
        targets = list(target_modules)
        for t in targets:
            if not isinstance(t, str) or not t:
                raise TypeError(f"inject: target_modules entries must be non-empty str, got {t!r}")
        return lambda name: any(name == t or name.endswith("." + t) for t in targets)
    raise TypeError(f"inject: target_modules must be a regex str or a non-empty list of names, got {target_modules!r}")


def inject(model: nn.Module, target_modules, adapter: str = "lora", r: int = 8, alpha: float | None = None,
           dropout: float = 0.0, rslora: bool = False, init: str = "peft", core: bool = False,
           quantize: str | None = None, group_size: int | None = None, quant_method="rtn",
           quantize_skip=("lm_head",), density: float = 0.01, pattern="random",
           seed: int | None = None, tt_rank=4, form: str = "lowrank", use_dora: bool = False,
           projection_prng_key: int = 0, d_initial: float = 0.1, save_projection: bool = True,
           sample_at_inference: bool = False, num_experts: int = 8, top_k: int = 2) -> InjectReport:
    """Replace the nn.Linear layers of ``model`` whose names match ``target_modules`` by adapter
    modules (in place), and freeze every parameter that is not an adapter's.

    target_modules: exact names or name suffixes (list), or a regex matched against the whole
    qualified name (str). Raises ValueError if nothing matches or a match is not an nn.Linear;
    on error the model is left unchanged (every replacement is built first; the swap runs inside
    a Transaction). Adapters made by an earlier inject keep their trainability: only parameters
    outside existing adapter modules are frozen.

    quantize: "nf4" | "int4" | "int3" makes it QLoRA for the whole model: the targets become
    QLoRALinear (packed base + LoRA) and every other nn.Linear a frozen QuantLinear, except those
    named in ``quantize_skip`` (matched like a target list; the output head by default) and those
    whose in_features the group size does not divide (left dense). group_size / quant_method as in
    ``pyhappy.quantize`` (method "rtn" or a callable quantizer).

    adapter="sparse": the targets become SparseDeltaLinear with one delta "default" of the given
    ``density`` and ``pattern`` ("random" | "magnitude" | "rows" | "cols"; see
    SparseDeltaLinear.from_linear), on a quantized base when ``quantize`` is set. ``seed`` makes
    random patterns reproducible (each layer's pattern is drawn from seed + its position).
    adapter="multi_lora": the targets become MultiLoRALinear holding one adapter named "default"
    (r, alpha, rslora, init as for LoRA); add more with pyhappy.add_adapter(model, name, ...), switch
    them with set_adapter / delete_adapter, or mix them per batch row with pyhappy.adapter_batch.

    adapter="tt": the targets become TTLinear(tt_rank, form="lowrank" | "matrix"; r, alpha, dropout
    as for LoRA where the form has them), on a quantized base when ``quantize`` is set.
    rslora/init/core apply to adapter="lora" only.

    use_dora=True (adapter="lora"): DoRA layers, LoRALinear with a trainable lora_magnitude_vector
    (PEFT's LoraConfig(use_dora=True)); with quantize, QDoRA layers (QLoRALinear(use_dora=True)).

    adapter="vera" | "pvera": the targets become VeRALinear / PVeRALinear (r, dropout, d_initial;
    PVeRA's sample_at_inference) sharing one VeRAProjections sized to the largest target's dims and
    drawn from ``projection_prng_key``, as PEFT's VeraConfig / PveraConfig do (same key and targets:
    the same projections bit for bit); dense base only.

    adapter="molora": the targets become MoLoRALinear, a mixture of ``num_experts`` LoRA experts of
    rank r (alpha default 2r, dropout) with a trainable router sending each token to its ``top_k``
    experts; on a quantized base when ``quantize`` is set.
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"inject: adapter must be one of {sorted(ADAPTERS)}, got {adapter!r}")
    if quantize is not None and quantize not in FORMATS:
        raise ValueError(f"inject: quantize must be None or one of {FORMATS}, got {quantize!r}")
    if alpha is not None:
        alpha = finite_number("inject", "alpha", alpha)
    if not isinstance(use_dora, bool):
        raise TypeError(f"inject: use_dora must be True or False, got {use_dora!r}")
    if use_dora and adapter != "lora":
        raise ValueError(f"inject: use_dora=True needs adapter='lora', got adapter={adapter!r}")
    if adapter in ("vera", "pvera") and quantize is not None:
        raise NotImplementedError(f"inject: adapter={adapter!r} with quantize is not supported yet; use a dense base")
    match = _matcher(target_modules)
    adapter_types = (*ADAPTERS.values(), QuantLinear)
    inside_adapter = set()
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, adapter_types):
            inside_adapter.update(f"{name}.{c}" if name else c for c, _ in module.named_modules() if c)
            continue
        if not name or name in inside_adapter or not match(name):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"inject: target_modules matched {name!r}, a {type(module).__name__}; only nn.Linear "
                             "layers can take an adapter (narrow target_modules)")
        sites.append(name)
    if not sites:
        raise ValueError(f"inject: target_modules={target_modules!r} matched no nn.Linear in the model")
    # Build every replacement before touching the model, so a bad argument leaves it unchanged.
    lora_kw = dict(r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init, core=core)
    if use_dora:
        lora_kw["use_dora"] = True
    if adapter == "sparse":
        new = {n: SparseDeltaLinear.from_linear(model.get_submodule(n), density, pattern,
                                                seed=None if seed is None else seed + i, quantize=quantize,
                                                group_size=group_size, method=quant_method)
               for i, n in enumerate(sites)}
    elif adapter == "multi_lora":
        if quantize is not None or core or dropout:
            raise ValueError("inject: adapter='multi_lora' takes no quantize, core or dropout yet")
        new = {}
        for n in sites:
            m = MultiLoRALinear.from_linear(model.get_submodule(n))
            m.add_adapter("default", r=r, alpha=alpha, rslora=rslora, init=init)
            new[n] = m
    elif adapter == "tt":
        new = {n: TTLinear.from_linear(model.get_submodule(n), tt_rank=tt_rank, form=form, r=r, alpha=alpha,
                                       dropout=dropout, quantize=quantize, group_size=group_size,
                                       method=quant_method) for n in sites}
    elif adapter in ("vera", "pvera"):
        mods = [model.get_submodule(n) for n in sites]
        proj = VeRAProjections(r, max(m.in_features for m in mods), max(m.out_features for m in mods),
                               projection_prng_key, save_projection, kind=adapter)
        extra = {"sample_at_inference": sample_at_inference} if adapter == "pvera" else {}
        new = {n: ADAPTERS[adapter].from_linear(m, r=r, dropout=dropout, d_initial=d_initial, projections=proj,
                                                **extra) for n, m in zip(sites, mods)}
    elif adapter == "molora":
        new = {n: MoLoRALinear.from_linear(model.get_submodule(n), num_experts=num_experts, top_k=top_k, r=r,
                                           alpha=2 * r if alpha is None else alpha, dropout=dropout,
                                           quantize=quantize, group_size=group_size, method=quant_method)
               for n in sites}
    elif quantize is None:
        new = {n: ADAPTERS[adapter].from_linear(model.get_submodule(n), **lora_kw) for n in sites}
    else:
        new = {n: QLoRALinear.from_linear(model.get_submodule(n), quantize, group_size, method=quant_method, **lora_kw)
               for n in sites}
    quantized = []
    if quantize is not None:
        skip = _matcher(list(quantize_skip)) if quantize_skip else (lambda name: False)
        gs = group_size or (64 if quantize == "nf4" else 128)
        for name, module in model.named_modules():
            if (name and name not in new and name not in inside_adapter and type(module) is nn.Linear
                    and not skip(name) and module.in_features % gs == 0):
                new[name] = QuantLinear.from_linear(module, quantize, group_size, method=quant_method)
                quantized.append(name)
    # Parameters inside adapter modules made before keep their trainability; every other one is frozen.
    earlier = {id(p) for mod in model.modules() if isinstance(mod, adapter_types) for p in mod.parameters()}
    with Transaction(model):
        for p in model.parameters():
            if id(p) not in earlier:
                p.requires_grad_(False)
        for name, mod in new.items():
            set_submodule(model, name, mod)
            for pn, p in mod.named_parameters():
                p.requires_grad_(pn.startswith(getattr(mod, "TRAINABLE_PREFIXES", ())))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return InjectReport(replaced=sites, trainable_params=trainable, total_params=total, quantized=quantized)
