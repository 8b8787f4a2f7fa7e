"""MultiLoRALinear: several named LoRA adapters on one frozen linear layer, switched at run time or
mixed within one batch (each row its own adapter: pyhappy::lora_linear_multi)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._transaction import TransactionalLoad, check_local, restores_on_failure
from ..ops._checks import finite_number
from ..ops.lora_linear import lora_linear
from ..ops.lora_linear_multi import lora_linear_multi, stack_adapters
from .lora_linear import adapter_to, in_dtype


class LoRAPair(nn.Module):
    """One named adapter: lora_A [r, in], lora_B [out, r] (nn.Linear, PEFT names), its scaling, its
    dropout probability (applied to this adapter's input in training, as PEFT's per-adapter
    lora_dropout) and run-time ``active`` / ``weight`` (both kept in the state dict)."""

    def __init__(self, in_features, out_features, r, alpha=None, rslora=False, init="peft", device=None, dtype=None,
                 dropout=0.0):
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"MultiLoRALinear.add_adapter: r must be a positive int, got {r!r}")
        alpha = float(r) if alpha is None else finite_number("MultiLoRALinear.add_adapter", "alpha", alpha)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiLoRALinear.add_adapter: dropout must be a number in [0, 1), got {dropout!r}")
        self.r, self.lora_alpha, self.rslora = r, alpha, bool(rslora)
        self.scaling = self.lora_alpha / (math.sqrt(r) if rslora else r)
        self.lora_dropout = float(dropout)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init == "none":
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        elif init == "peft":
            nn.init.zeros_(self.lora_B.weight)
        else:
            raise ValueError(f"MultiLoRALinear.add_adapter: init must be 'peft' or 'none', got {init!r}")
        self.active = True
        self.weight = 1.0

    def adapter_tensors(self, dtype: torch.dtype):
        """lora_A, lora_B weights in the compute ``dtype`` (an adapter kept in float32 on a half
        precision base, as PEFT keeps it, is cast per call; see LoRAAdapter.adapter_tensors)."""
        return in_dtype(dtype, self.lora_A.weight, self.lora_B.weight)

    def delta(self, x, dtype: torch.dtype):
        """This adapter's term weight · s · (x Aᵀ) Bᵀ, computed in ``dtype``."""
        A, B = self.adapter_tensors(dtype)
        return F.linear(F.linear(x, A), B) * (self.scaling * self.weight)

    # The settings the extra state carries so that a load can create the adapter (optional in a state
    # dict: one without them loads into a module that has the adapter).
    _SETTINGS = ("alpha", "rslora", "scaling", "dropout")

    def get_extra_state(self):
        """The run-time switches and the settings a load needs to create this adapter anew."""
        return {"active": self.active, "weight": self.weight, "alpha": self.lora_alpha, "rslora": self.rslora,
                "scaling": self.scaling, "dropout": self.lora_dropout}

    @classmethod
    def check_extra_state(cls, state, who: str = "LoRAPair.set_extra_state") -> dict:
        """``state`` checked whole (the switches, and the settings where present): a bad entry is
        refused by name before anything is set."""
        if not isinstance(state, dict) or set(state) not in ({"active", "weight"},
                                                             {"active", "weight", *cls._SETTINGS}):
            raise ValueError(f"{who}: expected a dict of 'active', 'weight' and optionally all of {cls._SETTINGS}, "
                             f"got {state!r}")
        if not isinstance(state["active"], bool):
            raise TypeError(f"{who}: 'active' must be a bool, got {state['active']!r}")
        for key in ("weight", "alpha", "scaling", "dropout"):
            v = state.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{who}: {key!r} must be a finite number, got {v!r}")
        if not 0.0 <= float(state.get("dropout", 0.0)) < 1.0:
            raise ValueError(f"{who}: 'dropout' must be in [0, 1), got {state['dropout']!r}")
        if not isinstance(state.get("rslora", False), bool):
            raise TypeError(f"{who}: 'rslora' must be a bool, got {state['rslora']!r}")
        return state

    def set_extra_state(self, state):
        state = self.check_extra_state(state)  # (whole: nothing is set unless all of it is good)
        self.active, self.weight = state["active"], float(state["weight"])
        if "scaling" in state:
            self.lora_alpha, self.rslora = float(state["alpha"]), state["rslora"]
            self.scaling, self.lora_dropout = float(state["scaling"]), float(state["dropout"])

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.lora_alpha:g}, rslora={self.rslora}, dropout={self.lora_dropout:g}, "
                f"active={self.active}, weight={self.weight:g}")


class MultiLoRALinear(TransactionalLoad, nn.Module):
    """``y = x Wᵀ + b + Σ_active wᵢ·sᵢ·(x Aᵢᵀ) Bᵢᵀ`` with W, b frozen and adapters at ``adapters[name]``.

    Run time: ``add_adapter``, ``delete_adapter``, ``set_adapter(name, active=..., weight=...)``.
    Mixed batches: inside ``pyhappy.adapter_batch(model, names)`` each batch row uses the adapter
    named for it (None: base only), all rows in one pyhappy::lora_linear_multi call in inference
    (under ``torch.no_grad()`` or with nothing requiring grad); while autograd records, the same
    rows through differentiable per-adapter products.
    Outside it, the active adapters apply to every row (the first through the fused lora_linear op,
    so training one adapter is the usual fused path).
    """

    TRAINABLE_PREFIXES = ("adapters.",)
    _STATE_DICT_OWNS = ("adapters",)  # adapters a load creates: _validate_state_dict checks their keys

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self._setup(nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype))

    @classmethod
    @restores_on_failure
    def from_linear(cls, linear: nn.Linear) -> "MultiLoRALinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear)
        return self

    @classmethod
    def from_lora(cls, layer, name: str = "default") -> "MultiLoRALinear":
        """Take over a LoRALinear (base shared, adapter copied in as ``name`` with its scaling,
        dropout and dtype; the trainability of its A, B and of the bias carried over)."""
        if layer.lora_C is not None or layer.merged:
            raise ValueError("MultiLoRALinear.from_lora: the layer must be unmerged and without a core (lora_C)")
        bias_grad = layer.bias is not None and layer.bias.requires_grad
        self = cls.from_linear(layer.to_linear())
        if bias_grad:
            self.bias.requires_grad_(True)
        pair = self.add_adapter(name, layer.r, layer.lora_alpha, layer.rslora, dropout=layer.lora_dropout)
        pair.scaling = layer.scaling  # as the layer had it (e.g. PEFT's own value)
        adapter_to(pair, layer.lora_A.weight.dtype)  # the adapter's own dtype (float32 on a bf16 base)
        with torch.no_grad():
            pair.lora_A.weight.copy_(layer.lora_A.weight)
            pair.lora_B.weight.copy_(layer.lora_B.weight)
        pair.lora_A.weight.requires_grad_(layer.lora_A.weight.requires_grad)
        pair.lora_B.weight.requires_grad_(layer.lora_B.weight.requires_grad)
        if "base_shell" in layer.__dict__:
            self.__dict__["base_shell"] = layer.__dict__["base_shell"]
        return self

    def _setup(self, base):
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self._batch_names = None

    def add_adapter(self, name: str, r: int = 8, alpha: float | None = None, rslora: bool = False,
                    init: str = "peft", dropout: float = 0.0) -> LoRAPair:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"MultiLoRALinear.add_adapter: name must be a non-empty str without '.', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"MultiLoRALinear.add_adapter: adapter {name!r} exists (delete_adapter first)")
        pair = LoRAPair(self.in_features, self.out_features, r, alpha, rslora, init, self.weight.device,
                        self.weight.dtype, dropout)
        self.adapters[name] = pair
        return pair

    def delete_adapter(self, name: str):
        self._get(name)
        del self.adapters[name]

    def set_adapter(self, name: str, *, active: bool | None = None, weight: float | None = None):
        pair = self._get(name)
        if weight is not None:
            weight = finite_number("MultiLoRALinear.set_adapter", "weight", weight)  # checked before any change
            pair.weight = weight
        if active is not None:
            pair.active = bool(active)

    def _get(self, name) -> LoRAPair:
        if name not in self.adapters:
            raise KeyError(f"MultiLoRALinear: no adapter named {name!r} (have {list(self.adapters)})")
        return self.adapters[name]

    def _state_adapters(self, state_dict, prefix: str) -> dict:
        """{adapter name: its key suffixes} of the adapters ``state_dict`` holds under ``prefix``."""
        ap, names = prefix + "adapters.", {}
        for key in state_dict:
            if key.startswith(ap):
                name, _, rest = key[len(ap):].partition(".")
                names.setdefault(name, []).append(rest)
        return names

    def _validate_state_dict(self, state_dict, prefix: str, who: str):
        """Check this module's keys in ``state_dict`` (see _transaction.check_state_dict): the base
        weight and bias, every adapter the module has, and those the load would create (their
        lora_A / lora_B shapes and their settings in the extra state)."""
        claimed, required = check_local(self, state_dict, prefix, who)
        ap = prefix + "adapters."
        names = self._state_adapters(state_dict, prefix)
        for name in list(self.adapters) + [n for n in names if n not in self.adapters]:
            pp = f"{ap}{name}."
            if name in self.adapters:
                pair = self.adapters[name]
                for sub in ("lora_A", "lora_B"):
                    got, req = check_local(pair._modules[sub], state_dict, f"{pp}{sub}.", who)
                    claimed.update(got)
                    required.extend(req)
                got, req = check_local(pair, state_dict, pp, who)
                claimed.update(got)
                required.extend(req)
                if pp + "_extra_state" in state_dict:
                    LoRAPair.check_extra_state(state_dict[pp + "_extra_state"], f"{who}: {pp}_extra_state")
                continue
            if not self._creatable(state_dict, pp, name):
                continue  # its keys stay unclaimed: reported as unexpected (an error where strict)
            keys = [pp + "lora_A.weight", pp + "lora_B.weight", pp + "_extra_state"]
            A, B, st = (state_dict[k] for k in keys)
            if not (isinstance(A, torch.Tensor) and A.dim() == 2 and A.shape[1] == self.in_features and A.shape[0] >= 1
                    and isinstance(B, torch.Tensor) and tuple(B.shape) == (self.out_features, A.shape[0])):
                got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (A, B)]
                raise ValueError(f"{who}: {pp}lora_A / lora_B must be [r, {self.in_features}] / "
                                 f"[{self.out_features}, r], got {got}")
            LoRAPair.check_extra_state(st, f"{who}: {pp}_extra_state")
            claimed.update(keys)
        return claimed, required

    @staticmethod
    def _creatable(state_dict, pp: str, name: str) -> bool:
        """Whether a load can create adapter ``name`` from ``state_dict`` (keys under ``pp``): its
        lora_A / lora_B weights and an extra state holding its settings (a state dict saved without
        extra state, or whose extra state holds only the switches, loads into a module that has the
        adapter: add it with add_adapter first)."""
        st = state_dict.get(pp + "_extra_state")
        return (bool(name) and "." not in name and pp + "lora_A.weight" in state_dict
                and pp + "lora_B.weight" in state_dict and isinstance(st, dict) and "scaling" in st)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._validate_state_dict(state_dict, prefix, f"{type(self).__name__}.load_state_dict")
        # Adapters saved in the state dict that this module lacks: create them so that they load.
        for name in self._state_adapters(state_dict, prefix):
            pp = f"{prefix}adapters.{name}."
            if name not in self.adapters and self._creatable(state_dict, pp, name):
                st, A = state_dict[pp + "_extra_state"], state_dict[pp + "lora_A.weight"]
                pair = self.add_adapter(name, int(A.shape[0]), float(st["alpha"]), st["rslora"],
                                        dropout=float(st["dropout"]))
                pair.lora_A.to(A.dtype)
                pair.lora_B.to(state_dict[pp + "lora_B.weight"].dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _mixed(self, x):
        names = list(self.adapters)
        pos = {n: i for i, n in enumerate(names)}
        B = x.shape[0] if x.dim() > 1 else 1
        if len(self._batch_names) != B:
            raise ValueError(f"adapter_batch: {len(self._batch_names)} names for a batch of {B} rows")
        for n in self._batch_names:
            if n is not None and n not in pos:
                raise KeyError(f"adapter_batch: no adapter named {n!r} in this layer (have {names})")
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return self._mixed_recorded(x)
        idx = torch.tensor([-1 if n is None else pos[n] for n in self._batch_names], dtype=torch.int64,
                           device=x.device)
        idx = idx.repeat_interleave(math.prod(x.shape[1:-1]) if x.dim() > 1 else 1)
        A, Bs = stack_adapters([(p.lora_A.weight, p.lora_B.weight) for p in self.adapters.values()],
                               dtype=x.dtype, device=x.device)
        s = torch.tensor([p.scaling * p.weight for p in self.adapters.values()], dtype=torch.float32,
                         device=x.device)
        return lora_linear_multi(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                                 A, Bs, s, idx)

    def _mixed_recorded(self, x):
        """A mixed batch while autograd records (lora_linear_multi has no backward): the base product
        for every row, then each named adapter on its own rows, added back by index_add (PEFT's
        mixed-batch formulation), so gradients reach x, the adapters and whatever produced x."""
        rows = x if x.dim() > 1 else x.unsqueeze(0)
        y = F.linear(rows, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        for name in dict.fromkeys(n for n in self._batch_names if n is not None):
            p = self.adapters[name]
            sel = torch.tensor([i for i, n in enumerate(self._batch_names) if n == name], dtype=torch.int64,
                               device=x.device)
            xa = rows.index_select(0, sel)
            if p.lora_dropout:
                xa = F.dropout(xa, p.lora_dropout, self.training)
            y = y.index_add(0, sel, p.delta(xa, y.dtype))
        return y if x.dim() > 1 else y.squeeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._batch_names is not None:
            return self._mixed(x)
        active = [p for p in self.adapters.values() if p.active]
        if not active:
            return F.linear(x, self.weight, self.bias)
        first, rest = active[0], active[1:]
        dt = self.weight.dtype
        y = lora_linear(x, self.weight, self.bias, *first.adapter_tensors(dt), first.scaling * first.weight, None,
                        first.lora_dropout if self.training else 0.0)
        for p in rest:
            xi = F.dropout(x, p.lora_dropout, self.training) if p.lora_dropout else x
            y = y + p.delta(xi, dt)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names):
    """Inside the block, every MultiLoRALinear in ``model`` serves batch row i (the first dim of its
    input) with adapter ``names[i]`` (None: the base model only), in one multi-adapter call."""
    mods = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if not mods:
        raise ValueError("adapter_batch: the model has no MultiLoRALinear")
    names = list(names)
    prev = [m._batch_names for m in mods]
    for m in mods:
        m._batch_names = names
    try:
        yield
    finally:
        for m, p in zip(mods, prev):
            m._batch_names = p
