"""SparseDeltaLinear: a frozen (dense or quantized) linear plus named sparse trainable deltas."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _patterns as sp
from .._transaction import TransactionalLoad, check_local, restores_on_failure
from ..ops._checks import finite_number
from ..ops.sparse_delta_linear import check_pattern, sparse_delta_linear, sparse_layout
from .quant_linear import QuantLinear

PATTERNS = ("random", "magnitude", "rows", "cols")


def _check_flag(who: str, key: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{who}: {key}[{name!r}] must be a bool, got {v!r}")
    return v


class SparseDelta(TransactionalLoad, nn.Module):
    """One delta on an [N, K] weight: parameter ``values`` [nnz] (trainable, zero at init), buffer
    ``indices`` (int32 sorted flat row·K + col), the kernel ``layout`` (non-persistent buffer,
    rebuilt from indices), and run-time ``scale`` / ``enabled``. While merged into a dense weight,
    ``saved`` holds the weight's original entries at the pattern and ``merge_seq`` the merge order;
    both travel in the extra state, so a merged checkpoint can be unmerged after loading."""

    def __init__(self, indices: torch.Tensor, N: int, K: int, values: torch.Tensor | None = None, scale: float = 1.0,
                 *, device=None, dtype=None):
        super().__init__()
        check_pattern(indices, N, K, op="SparseDelta")
        scale = finite_number("SparseDelta", "scale", scale)
        self.N, self.K = N, K
        device = device if device is not None else indices.device
        nnz = indices.numel()
        if values is None:
            values = torch.zeros(nnz, device=device, dtype=dtype)
        elif values.shape != (nnz,):
            raise ValueError(f"SparseDelta: values must be [nnz] = [{nnz}] (one per index), got {tuple(values.shape)}")
        self.values = nn.Parameter(values.detach().to(device=device, dtype=dtype or values.dtype).clone())
        self.register_buffer("indices", indices.to(device=device, dtype=torch.int32).contiguous())
        self.register_buffer("layout", sparse_layout(self.indices, N, K), persistent=False)
        self._find_slab()
        self.scale = scale
        self.enabled = True
        self.merged = False
        self.saved = None
        self.merge_seq = None

    def _find_slab(self):
        """Whole rows or whole columns (S2FT-style): then ``values`` is a dense block in row-major
        order (rows R: [|R|, K]; columns C: [N, |C|]) and the delta runs as dense sub-GEMMs."""
        self.slab = None
        self.register_buffer("slab_index", None, persistent=False)
        idx = self.indices.long()
        nnz = idx.numel()
        if nnz == 0:
            return
        for kind, key, size, full in (("rows", idx // self.K, self.N, self.K), ("cols", idx % self.K, self.K, self.N)):
            if nnz % full:
                continue
            counts = torch.bincount(key, minlength=size)
            sel = counts.nonzero().flatten()
            if sel.numel() * full == nnz and bool((counts[sel] == full).all()):
                self.slab, self.slab_index = kind, sel
                return

    def slab_product(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + scale · x·ΔWᵀ for a slab delta, as dense sub-GEMMs (autograd through torch ops:
        d(values) is the [|R|, K] or [N, |C|] block gradient, no [N, K] tensor)."""
        if self.slab == "rows":
            V = self.values.view(-1, self.K)
            return y.index_add(-1, self.slab_index, F.linear(x, V), alpha=self.scale)
        V = self.values.view(self.N, -1)
        return torch.add(y, F.linear(x.index_select(-1, self.slab_index), V), alpha=self.scale)

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def dense(self) -> torch.Tensor:
        """scale · ΔW as a dense [N, K] tensor in the values' dtype (for inspection and merging)."""
        w = torch.zeros(self.N * self.K, dtype=self.values.dtype, device=self.values.device)
        w.index_put_((self.indices.long(),), self.values.detach() * self.scale)
        return w.view(self.N, self.K)

    def get_extra_state(self):
        state = {"scale": self.scale, "enabled": self.enabled, "merged": self.merged}
        if self.merged:
            state.update(saved=self.saved, merge_seq=self.merge_seq)
        return state

    @staticmethod
    def _check_extra_state(state, nnz: int, who: str, key: str):
        """Raise unless ``state`` is a delta's extra state for ``nnz`` entries; return its values."""
        if not isinstance(state, dict) or not {"scale", "enabled", "merged"} <= set(state):
            raise ValueError(f"{who}: {key} must be a dict with scale, enabled and merged, got {state!r}")
        scale = finite_number(who, f"{key}['scale']", state["scale"])
        enabled = _check_flag(who, key, "enabled", state["enabled"])
        merged = _check_flag(who, key, "merged", state["merged"])
        saved, seq = state.get("saved"), state.get("merge_seq")
        if merged:
            if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != (nnz,) or not saved.is_floating_point():
                got = f"{saved.dtype} {tuple(saved.shape)}" if isinstance(saved, torch.Tensor) else repr(saved)
                raise ValueError(f"{who}: {key} says merged but its 'saved' entries (the weight's originals at the "
                                 f"pattern, needed to unmerge) are not a floating [{nnz}] tensor: got {got}")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                raise ValueError(f"{who}: {key}['merge_seq'] must be a positive int for a merged delta, got {seq!r}")
        return scale, enabled, merged, (saved if merged else None), (seq if merged else None)

    def set_extra_state(self, state):
        scale, enabled, merged, saved, seq = self._check_extra_state(
            state, self.nnz, f"{type(self).__name__}.load_state_dict", "_extra_state")
        self.scale, self.enabled, self.merged, self.merge_seq = scale, enabled, merged, seq
        self.saved = None if saved is None else saved.detach().to(self.values.device).clone()

    @classmethod
    def _check_state(cls, state_dict, prefix: str, N: int, K: int, who: str, strict_keys: bool = True):
        """Check a delta's keys (indices, values, extra state) under ``prefix``; return (claimed, required)."""
        ikey, vkey, ekey = prefix + "indices", prefix + "values", prefix + "_extra_state"
        claimed = set()
        idx = state_dict.get(ikey)
        if idx is not None:
            if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
                got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
                raise ValueError(f"{who}: {ikey} must be a 1-D int32 tensor of flat indices, got {got}")
            check_pattern(idx.to(torch.int32), N, K, name=ikey, who=who)
            claimed.add(ikey)
        v = state_dict.get(vkey)
        if v is not None:
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 1:
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{who}: {vkey} must be a 1-D floating tensor, got {got}")
            if idx is not None and v.shape != idx.shape:
                raise ValueError(f"{who}: {vkey} has {v.numel()} entries but {ikey} has {idx.numel()} (one value per "
                                 "index)")
            claimed.add(vkey)
        if ekey in state_dict:
            nnz = idx.numel() if idx is not None else (v.numel() if v is not None else None)
            if nnz is not None:
                cls._check_extra_state(state_dict[ekey], nnz, who, ekey)
            claimed.add(ekey)
        return claimed, [ikey, vkey, ekey]

    def _validate_state_dict(self, state_dict, prefix: str, who: str):
        claimed, required = self._check_state(state_dict, prefix, self.N, self.K, who)
        idx, v = state_dict.get(prefix + "indices"), state_dict.get(prefix + "values")
        if idx is None and v is not None and v.shape != self.values.shape:
            raise ValueError(f"{who}: {prefix}values has {v.numel()} entries but this delta's pattern has {self.nnz}")
        ekey = prefix + "_extra_state"
        if ekey in state_dict and idx is None and v is None:
            self._check_extra_state(state_dict[ekey], self.nnz, who, ekey)
        return claimed, required

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._validate_state_dict(state_dict, prefix, f"{type(self).__name__}.load_state_dict")
        # A saved delta may carry another pattern (another nnz): adopt it before the copy.
        idx = state_dict.get(prefix + "indices")
        if idx is not None and idx.shape != self.indices.shape:
            self.indices = torch.empty_like(idx, dtype=torch.int32, device=self.indices.device)
            self.values = nn.Parameter(torch.empty(idx.numel(), dtype=self.values.dtype, device=self.values.device),
                                       requires_grad=self.values.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.layout = sparse_layout(self.indices, self.N, self.K)
        self._find_slab()

    def extra_repr(self) -> str:
        return (f"nnz={self.nnz}, density={self.nnz / (self.N * self.K):.4g}, scale={self.scale:g}, "
                f"enabled={self.enabled}, merged={self.merged}")


class SparseDeltaLinear(TransactionalLoad, nn.Module):
    """``y = x · (W + Σ_active sᵢ·ΔWᵢ)ᵀ + b`` with W, b frozen and each ΔWᵢ sparse on a fixed pattern.

    W is dense (``weight``, shared with the wrapped nn.Linear) or packed (``base``, a QuantLinear:
    quantize=...). Deltas live at ``deltas[name]`` (default name "default"), each with a trainable
    ``values`` [nnz] and its ``indices`` buffer; several can be active at once (e.g. a language delta
    plus a task delta), switched and weighted at run time with ``set_delta``: the forward adds
    each active delta's own product, so toggling never accumulates rounding drift. ``merge`` folds
    the active deltas into a dense W and keeps W's original entries at the pattern, so ``unmerge``
    restores W bit for bit (also after a state-dict round trip: they travel with each delta).
    ``load_state_dict`` checks every delta (pattern, sizes, extra state) before it changes anything.
    """

    TRAINABLE_PREFIXES = ("deltas.",)
    _STATE_DICT_OWNS = ("deltas",)  # deltas a load creates: _validate_state_dict checks their keys

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, None)

    @classmethod
    @restores_on_failure
    def from_linear(cls, linear: nn.Linear, density: float | None = 0.01, pattern="random", *, nnz: int | None = None,
                    scores: torch.Tensor | None = None, name: str = "default", seed: int | None = None,
                    quantize: str | None = None, group_size: int | None = None, method="rtn",
                    calib=None) -> "SparseDeltaLinear":
        """Wrap an nn.Linear (weight and bias shared, frozen) and add delta ``name``.

        pattern: "random" (seeded by ``seed``); "magnitude": top-k of |scores| — pass
            scores = W_finetuned − W_base (lottery-ticket SFT) or accumulated gradients
            (``pyhappy.sparse.GradientScorer``); without scores, the base weight's own magnitudes;
            "rows" / "cols": whole rows / columns with the largest score norms (random without
            scores), density of them (S2FT-style slabs); or an int32 tensor of flat indices.
        quantize: "nf4" | "int4" | "int3" packs the base (QuantLinear) and drops the dense copy.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        N, K = linear.out_features, linear.in_features
        indices = cls._pattern(linear.weight, density, nnz, pattern, scores, seed)
        qbase = None
        if quantize is not None:
            qbase = QuantLinear.from_linear(linear, quantize, group_size, method=method, calib=calib)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, qbase)
        self.add_delta(name, indices)
        assert (self.out_features, self.in_features) == (N, K)
        return self

    @staticmethod
    def _pattern(weight, density, nnz, pattern, scores, seed):
        N, K = weight.shape
        if isinstance(pattern, torch.Tensor):
            return pattern
        if pattern not in PATTERNS:
            raise ValueError(f"SparseDeltaLinear: pattern must be one of {PATTERNS} or an int32 index tensor, "
                             f"got {pattern!r}")
        if scores is not None and tuple(scores.shape) != (N, K):
            raise ValueError(f"SparseDeltaLinear: scores must be [N, K] = [{N}, {K}], got {tuple(scores.shape)}")
        if pattern == "random":
            return sp.random_pattern(N, K, density, nnz=nnz, seed=seed, device=weight.device)
        if pattern == "magnitude":
            return sp.topk_pattern(weight if scores is None else scores, density, nnz=nnz).to(weight.device)
        if density is None:
            raise ValueError(f"SparseDeltaLinear: pattern={pattern!r} takes density (the share of rows/columns)")
        if scores is None:
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            scores = torch.rand(N, K, generator=g)
        sel = sp.pick_slabs(scores, density, pattern)
        kw = {"rows": sel} if pattern == "rows" else {"cols": sel}
        return sp.structured_pattern(N, K, **kw, device=weight.device)

    def _setup(self, base: nn.Linear, qbase: QuantLinear | None):
        self.in_features, self.out_features = base.in_features, base.out_features
        if qbase is None:
            self.weight = base.weight
            self.weight.requires_grad_(False)
            self.base = None
        else:
            self.weight = None
            self.base = qbase
        self.bias = base.bias if qbase is None else qbase.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.deltas = nn.ModuleDict()

    @property
    def _saved(self) -> dict:
        """{name: W's original entries at the pattern} of the merged deltas, in merge order."""
        merged = sorted((d.merge_seq, n) for n, d in self.deltas.items() if d.merged)
        return {n: self.deltas[n].saved for _, n in merged}

    @property
    def _wdtype(self):
        return self.weight.dtype if self.weight is not None else self.base.weight_dtype

    @property
    def _wdevice(self):
        return self.weight.device if self.weight is not None else self.base.qdata.device

    def add_delta(self, name: str, indices=None, *, density: float | None = None, pattern="random",
                  scores=None, seed=None, values=None, scale: float = 1.0, replace: bool = False) -> SparseDelta:
        """Add (or with replace=True, replace) delta ``name`` on the given indices or a pattern
        chosen as in from_linear; values default to zeros (the layer's output is unchanged)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"SparseDeltaLinear.add_delta: name must be a non-empty str without '.', got {name!r}")
        if name in self.deltas:
            if not replace:
                raise ValueError(f"SparseDeltaLinear.add_delta: a delta named {name!r} exists (replace=True "
                                 "to overwrite)")
            if self.deltas[name].merged:
                raise RuntimeError(f"SparseDeltaLinear.add_delta: delta {name!r} is merged; unmerge it first")
        if indices is None:
            ref = self.weight if self.weight is not None else torch.empty(self.out_features, self.in_features)
            indices = self._pattern(ref, density, None, pattern, scores, seed)
        d = SparseDelta(indices.to(self._wdevice), self.out_features, self.in_features,
                        values=None if values is None else values.to(self._wdevice, self._wdtype), scale=scale,
                        device=self._wdevice, dtype=self._wdtype)
        self.deltas[name] = d
        return d

    def set_delta(self, name: str, *, enabled: bool | None = None, scale: float | None = None):
        """Switch delta ``name`` on/off and/or set its weight (takes effect on the next forward)."""
        d = self._get(name)
        if d.merged:
            raise RuntimeError(f"SparseDeltaLinear.set_delta: delta {name!r} is merged; unmerge it first")
        if scale is not None:
            scale = finite_number("SparseDeltaLinear.set_delta", "scale", scale)
        if enabled is not None:
            d.enabled = bool(enabled)
        if scale is not None:
            d.scale = scale

    def _get(self, name) -> SparseDelta:
        if name not in self.deltas:
            raise KeyError(f"SparseDeltaLinear: no delta named {name!r} (have {list(self.deltas)})")
        return self.deltas[name]

    def delta_weight(self, name: str = "default") -> torch.Tensor:
        """The dense update delta ``name`` adds, scale included: [out, in]."""
        return self._get(name).dense()

    @torch.no_grad()
    def merge(self, names=None):
        """Fold the given (default: all enabled) deltas into the dense weight; forward then skips them."""
        if self.weight is None:
            raise RuntimeError("SparseDeltaLinear.merge: the base is quantized; merging needs a dense weight")
        names = [n for n, d in self.deltas.items() if d.enabled and not d.merged] if names is None else list(names)
        for n in names:  # all checked before the weight changes
            if self._get(n).merged:
                raise RuntimeError(f"SparseDeltaLinear.merge: delta {n!r} is already merged")
        if len(set(names)) != len(names):
            raise ValueError(f"SparseDeltaLinear.merge: names holds a delta twice: {names}")
        flat = self.weight.view(-1)
        seq = max((d.merge_seq for d in self.deltas.values() if d.merged), default=0)
        for n in names:
            d = self._get(n)
            idx = d.indices.long()
            seq += 1
            d.saved, d.merge_seq = flat[idx].clone(), seq
            flat[idx] = (flat[idx].float() + d.scale * d.values.float()).to(flat.dtype)
            d.merged = True

    @torch.no_grad()
    def unmerge(self, names=None):
        """Undo merge(): restore W's original entries at each delta's pattern (exact), newest first."""
        saved = self._saved
        names = [n for n in reversed(list(saved))] if names is None else list(names)
        if not names:
            raise RuntimeError("SparseDeltaLinear.unmerge: no delta is merged")
        if list(saved)[-len(names):][::-1] != names:
            raise RuntimeError(f"SparseDeltaLinear.unmerge: unmerge in reverse merge order, merged: {list(saved)}")
        flat = self.weight.view(-1)
        for n in names:
            d = self._get(n)
            flat[d.indices.long()] = d.saved.to(flat.dtype)
            d.saved, d.merge_seq, d.merged = None, None, False

    def _validate_state_dict(self, state_dict, prefix: str, who: str):
        """Check this module's keys in ``state_dict`` (see _transaction.check_state_dict): the dense
        weight and bias, and every delta under ``deltas.`` (those it would create included)."""
        claimed, required = check_local(self, state_dict, prefix, who)
        dp = prefix + "deltas."
        names = {}
        for key in state_dict:
            if key.startswith(dp):
                name, _, rest = key[len(dp):].partition(".")
                if rest in ("indices", "values", "_extra_state"):
                    names.setdefault(name, []).append(rest)
        for name in names:
            if name in self.deltas:
                got, req = self.deltas[name]._validate_state_dict(state_dict, f"{dp}{name}.", who)
            else:
                if not name:
                    raise ValueError(f"{who}: {dp}.* holds a delta with an empty name")
                if dp + name + ".indices" not in state_dict:
                    raise KeyError(f"{who}: the state dict holds {dp}{name}.* but no {dp}{name}.indices: delta "
                                   f"{name!r} is not in this module and cannot be created without its pattern")
                got, req = SparseDelta._check_state(state_dict, f"{dp}{name}.", self.out_features,
                                                    self.in_features, who)
            claimed.update(got)
            required.extend(req)
            ekey = f"{dp}{name}._extra_state"
            st = state_dict.get(ekey)
            if isinstance(st, dict) and st.get("merged"):
                if self.weight is None:
                    raise ValueError(f"{who}: {ekey} says merged, but this module's base is quantized (no dense "
                                     "weight to merge into)")
                sv = st["saved"]
                if sv.dtype != self.weight.dtype:
                    raise ValueError(f"{who}: {ekey}['saved'] is {sv.dtype}, the weight is {self.weight.dtype}")
        for name, d in self.deltas.items():  # deltas the module has and the state dict lacks
            if name not in names:
                required.extend(f"{dp}{name}.{k}" for k in ("indices", "values", "_extra_state"))
        return claimed, required

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._validate_state_dict(state_dict, prefix, f"{type(self).__name__}.load_state_dict")
        # Deltas saved in the state dict that this module lacks: create them so they load.
        for key in list(state_dict):
            if key.startswith(prefix + "deltas.") and key.endswith(".indices"):
                name = key[len(prefix + "deltas."):-len(".indices")]
                if "." not in name and name not in self.deltas:
                    self.add_delta(name, state_dict[key].to(torch.int32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = [d for d in self.deltas.values() if d.enabled and not d.merged]
        general = [d for d in active if d.slab is None]
        w = self.weight if self.weight is not None else self.base.qweight
        if general:
            y = sparse_delta_linear(x, w, self.bias, [d.values for d in general], [d.indices for d in general],
                                    [d.layout for d in general], [d.scale for d in general])
        else:
            y = F.linear(x, self.weight, self.bias) if self.weight is not None else self.base(x)
        for d in active:
            if d.slab is not None:
                y = d.slab_product(x, y)
        return y

    def extra_repr(self) -> str:
        base = "dense" if self.weight is not None else f"{self.base.format}/g{self.base.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"base={base}"
