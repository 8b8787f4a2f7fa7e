"""SparseDeltaLinear: a frozen (dense or quantized) linear plus named sparse trainable deltas."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import sparse as sp
from ..ops.sparse_delta_linear import check_pattern, sparse_delta_linear, sparse_layout
from .quant_linear import QuantLinear

PATTERNS = ("random", "magnitude", "rows", "cols")


class SparseDelta(nn.Module):
    """One delta on an [N, K] weight: parameter ``values`` [nnz] (trainable, zero at init), buffer
    ``indices`` (int32 sorted flat row·K + col), the kernel ``layout`` (non-persistent buffer,
    rebuilt from indices), and run-time ``scale`` / ``enabled``."""

    def __init__(self, indices: torch.Tensor, N: int, K: int, values: torch.Tensor | None = None, scale: float = 1.0,
                 *, device=None, dtype=None):
        super().__init__()
        check_pattern(indices, N, K, op="SparseDelta")
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
        self.scale = float(scale)
        self.enabled = True
        self.merged = False

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
        return {"scale": self.scale, "enabled": self.enabled, "merged": self.merged}

    def set_extra_state(self, state):
        self.scale, self.enabled, self.merged = float(state["scale"]), bool(state["enabled"]), bool(state["merged"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A saved delta may carry another pattern (another nnz): adopt it before the copy.
        idx = state_dict.get(prefix + "indices")
        if idx is not None and idx.shape != self.indices.shape:
            check_pattern(idx.to(torch.int32), self.N, self.K, op="SparseDelta.load_state_dict")
            self.indices = torch.empty_like(idx, dtype=torch.int32, device=self.indices.device)
            self.values = nn.Parameter(torch.empty(idx.numel(), dtype=self.values.dtype, device=self.values.device),
                                       requires_grad=self.values.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.layout = sparse_layout(self.indices, self.N, self.K)
        self._find_slab()

    def extra_repr(self) -> str:
        return (f"nnz={self.nnz}, density={self.nnz / (self.N * self.K):.4g}, scale={self.scale:g}, "
                f"enabled={self.enabled}, merged={self.merged}")


class SparseDeltaLinear(nn.Module):
    """``y = x · (W + Σ_active sᵢ·ΔWᵢ)ᵀ + b`` with W, b frozen and each ΔWᵢ sparse on a fixed pattern.

    W is dense (``weight``, shared with the wrapped nn.Linear) or packed (``base``, a QuantLinear:
    quantize=...). Deltas live at ``deltas[name]`` (default name "default"), each with a trainable
    ``values`` [nnz] and its ``indices`` buffer; several can be active at once (e.g. a language delta
    plus a task delta), switched and weighted at run time with ``set_delta``: the forward adds
    each active delta's own product, so toggling never accumulates rounding drift. ``merge`` folds
    the active deltas into a dense W and keeps W's original entries at the pattern, so ``unmerge``
    restores W bit for bit.
    """

    TRAINABLE_PREFIXES = ("deltas.",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, None)

    @classmethod
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
        self._saved = {}  # name -> W's original entries at the pattern while merged

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
        if enabled is not None:
            d.enabled = bool(enabled)
        if scale is not None:
            d.scale = float(scale)

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
        flat = self.weight.view(-1)
        for n in names:
            d = self._get(n)
            if d.merged:
                raise RuntimeError(f"SparseDeltaLinear.merge: delta {n!r} is already merged")
            idx = d.indices.long()
            self._saved[n] = flat[idx].clone()
            flat[idx] = (flat[idx].float() + d.scale * d.values.float()).to(flat.dtype)
            d.merged = True

    @torch.no_grad()
    def unmerge(self, names=None):
        """Undo merge(): restore W's original entries at each delta's pattern (exact), newest first."""
        names = [n for n in reversed(list(self._saved))] if names is None else list(names)
        if not names:
            raise RuntimeError("SparseDeltaLinear.unmerge: no delta is merged")
        if list(self._saved)[-len(names):][::-1] != names:
            raise RuntimeError(f"SparseDeltaLinear.unmerge: unmerge in reverse merge order, merged: {list(self._saved)}")
        flat = self.weight.view(-1)
        for n in names:
            d = self._get(n)
            flat[d.indices.long()] = self._saved.pop(n)
            d.merged = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
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
