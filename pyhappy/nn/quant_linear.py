"""QuantLinear (frozen packed weight, inference) and QLoRALinear (packed base + trainable LoRA)."""

from __future__ import annotations

import torch
from torch import nn

from .._transaction import TransactionalLoad, check_local, restores_on_failure
from ..ops._checks import autocast_dtype, finite_number
from ..ops.dora_linear import DoraNormCache, factored_weight_norm
from ..ops.quant_linear import quant_linear, quantized_row_sqnorm
from ..quant import layout
from ..quant.weight import FORMATS, QuantizedWeight, check_finite_scales, check_perm, quantize
from .lora_linear import LoRAAdapter


def _check_int8_decode(who: str, value):
    if not isinstance(value, bool):
        raise TypeError(f"{who}: int8_decode must be a bool (True opts CPU decoding into int8 activations, an "
                        f"approximation), got {value!r}")


ACT_QUANT = (None, "int8")


def _int8(who: str, int8_decode, act_quant) -> bool:
    """The opt-in from either spelling: ``act_quant="int8"`` or ``int8_decode=True`` (checked, named)."""
    _check_int8_decode(who, int8_decode)
    if act_quant not in ACT_QUANT:
        raise ValueError(f"{who}: act_quant must be None (exact, the default) or 'int8' (int8 activations when "
                         f"decoding on CPU, an approximation), got {act_quant!r}")
    return int8_decode or act_quant == "int8"


def _dtype_named(name) -> torch.dtype | None:
    """The floating torch dtype a string like "torch.float16" names, else None."""
    dt = getattr(torch, str(name).replace("torch.", ""), None) if isinstance(name, str) else None
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else None


def _check_dora(cls, use_dora, core):
    if not isinstance(use_dora, bool):
        raise TypeError(f"{cls.__name__}: use_dora must be True or False, got {use_dora!r}")
    if use_dora and core:
        raise ValueError(f"{cls.__name__}: use_dora=True takes no core (lora_C): DoRA is defined on B A")


class QuantLinear(TransactionalLoad, nn.Module):
    """``y = x · deq(Wq)ᵀ + b`` with the packed weight as the only copy of W.

    Buffers (in the state dict): ``qdata``, ``absmax`` (nf4) or ``scales`` + ``zeros`` (int4/int3),
    ``perm`` (act-order weights only); the bias is a frozen parameter. The format, group size and
    the original dtype travel in the module's extra state, so ``load_state_dict`` into a module
    built with the same (in_features, out_features, format, group_size) restores it exactly.
    ``load_state_dict`` checks the whole state dict (format, group size, shapes and dtypes of the
    packed tensors, finite scales, ``perm`` a permutation) before it changes anything.

    ``act_quant`` (None, the default: exact) or ``act_quant="int8"`` (the same as ``int8_decode=True``;
    both also settable later as attributes): opts CPU decoding (<= 16 rows) into int8 activations, an
    approximation for inference, never used while autograd records (see
    :func:`pyhappy.ops.quant_linear`). A runtime setting, not part of the state dict.
    """

    def __init__(self, in_features: int, out_features: int, format: str = "nf4", group_size: int | None = None,
                 bias: bool = True, device=None, dtype=None, int8_decode: bool = False, act_quant: str | None = None):
        super().__init__()
        int8_decode = _int8(type(self).__name__, int8_decode, act_quant)
        if format not in FORMATS:
            raise ValueError(f"{type(self).__name__}: format must be one of {FORMATS}, got {format!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features), ("group_size", group_size)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise TypeError(f"{type(self).__name__}: {name} must be an int, got {v!r}")
            if v is not None and v < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be positive, got {v!r}")
        gs = group_size if group_size is not None else (64 if format == "nf4" else 128)
        if gs % layout.BLOCK_K or in_features % gs:
            raise ValueError(f"{type(self).__name__}: group_size must be a positive multiple of {layout.BLOCK_K} "
                             f"dividing in_features = {in_features}, got {group_size!r}")
        self.in_features, self.out_features = in_features, out_features
        self.format, self.group_size = format, gs
        self.weight_dtype = dtype or torch.get_default_dtype()
        n8, G = layout.n_tiles(out_features), in_features // gs
        bpb = layout.BYTES_PER_BLOCK[layout.FORMAT_BITS[format]]
        self.register_buffer("qdata", torch.zeros(n8 // 2, in_features // layout.BLOCK_K, 2 * bpb, dtype=torch.uint8,
                                                  device=device))
        if format == "nf4":
            self.register_buffer("absmax", torch.zeros(n8, G, layout.TILE_N, dtype=torch.float32, device=device))
        else:
            self.register_buffer("scales", torch.zeros(n8, G, layout.TILE_N, dtype=torch.float16, device=device))
            self.register_buffer("zeros", torch.zeros(n8, G, layout.TILE_N, dtype=torch.uint8, device=device))
        self.register_buffer("perm", None)
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=self.weight_dtype),
                                  requires_grad=False) if bias else None)
        self.int8_decode = int8_decode

    @property
    def int8_decode(self) -> bool:
        """Whether CPU decoding uses int8 activations (an approximate opt-in; default False, exact)."""
        return self.__dict__.get("_int8_decode", False)

    @int8_decode.setter
    def int8_decode(self, value: bool):
        _check_int8_decode(type(self).__name__, value)
        self.__dict__["_int8_decode"] = value

    @property
    def act_quant(self) -> str | None:
        """The activation quantization of CPU decoding: None (exact, the default) or "int8" (the
        opt-in; the same setting as ``int8_decode``)."""
        return "int8" if self.int8_decode else None

    @act_quant.setter
    def act_quant(self, value: str | None):
        self.int8_decode = _int8(type(self).__name__, False, value)

    @classmethod
    @restores_on_failure
    def from_linear(cls, linear: nn.Linear, format: str = "nf4", group_size: int | None = None, method="rtn",
                    calib=None, *, int8_decode: bool = False, act_quant: str | None = None, **quant_kwargs):
        """Quantize an nn.Linear's weight (``pyhappy.quantize``); the bias is kept (frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        int8_decode = _int8(f"{cls.__name__}.from_linear", int8_decode, act_quant)
        qw = quantize(linear.weight.detach(), format=format, group_size=group_size, method=method, calib=calib,
                      **quant_kwargs)
        return cls.from_quantized(qw, linear.bias, int8_decode=int8_decode)

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None, *, int8_decode: bool = False,
                       act_quant: str | None = None):
        """Wrap an existing QuantizedWeight (e.g. QuantizedWeight.from_bnb / from_gptq)."""
        int8_decode = _int8(f"{cls.__name__}.from_quantized", int8_decode, act_quant)
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"{cls.__name__}.from_quantized: qweight must be a QuantizedWeight, "
                            f"got {type(qweight).__name__}")
        N, K = qweight.shape
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        QuantLinear.__init__(self, K, N, qweight.format, qweight.group_size, bias=bias is not None,
                             device=qweight.device, dtype=qweight.dtype, int8_decode=int8_decode)
        self._load_quantized(qweight, bias)
        return self

    @torch.no_grad()
    def _load_quantized(self, qweight: QuantizedWeight, bias):
        for name, t in qweight.tensors().items():
            setattr(self, name, t)
        if bias is not None:
            self.bias.copy_(bias.detach())

    @property
    def qweight(self) -> QuantizedWeight:
        """The packed weight as a QuantizedWeight (sharing this module's buffers). Eagerly, the same
        object while the buffers are the same tensors (a decode step asks once per layer)."""
        if torch.compiler.is_compiling():
            return self._build_qweight()
        c = self.__dict__.get("_qweight")  # (weight_dtype, buffers as in _PACKED, the QuantizedWeight)
        # (the buffers compared one by one, without building a tuple: a decode step's caches are cold
        # at each layer, and every object this reads costs a miss)
        b = self._buffers
        if (c is None or c[0] is not self.weight_dtype or b.get("qdata") is not c[1][0]
                or b.get("absmax") is not c[1][1] or b.get("scales") is not c[1][2] or b.get("zeros") is not c[1][3]
                or b.get("perm") is not c[1][4]):
            c = (self.weight_dtype, tuple(map(b.get, self._PACKED)), self._build_qweight())
            self.__dict__["_qweight"] = c
        return c[2]

    def _build_qweight(self) -> QuantizedWeight:
        data = {"format": self.format, "shape": (self.out_features, self.in_features), "group_size": self.group_size,
                "dtype": self.weight_dtype, "qdata": self.qdata, "perm": self.perm, "extra": {}}
        if self.format == "nf4":
            data["absmax"] = self.absmax
        else:
            data["scales"], data["zeros"] = self.scales, self.zeros
        return QuantizedWeight(data, validate=False)  # buffers were checked when loaded

    def dequantize(self) -> torch.Tensor:
        return self.qweight.dequantize()

    # Version of the packed layout in the extra state (layout.py, "Layout versions"): a checkpoint of
    # an earlier version is repacked on load; one without the entry is version 1.
    LAYOUT_VERSION = layout.LAYOUT_VERSION

    def get_extra_state(self):
        return {"format": self.format, "group_size": self.group_size, "weight_dtype": str(self.weight_dtype),
                "layout": self.LAYOUT_VERSION}

    def _check_extra_state(self, state, who: str):
        """Raise unless ``state`` (get_extra_state's dict) fits this module; return its weight dtype."""
        if not isinstance(state, dict) or not {"format", "group_size", "weight_dtype"} <= set(state):
            raise ValueError(f"{who}: extra state must be a dict with format, group_size and weight_dtype, got "
                             f"{state!r}")
        gs = state["group_size"]
        if state["format"] != self.format or not isinstance(gs, int) or isinstance(gs, bool) or \
                gs != self.group_size:
            raise ValueError(f"{who}: checkpoint holds format={state['format']} group_size={gs}, this module is "
                             f"format={self.format} group_size={self.group_size}")
        version = state.get("layout", 1)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"{who}: extra state's layout must be an int, got {version!r}")
        if version > self.LAYOUT_VERSION:
            raise ValueError(f"{who}: checkpoint's packed layout version {version} is newer than this pyhappy's "
                             f"({self.LAYOUT_VERSION}); upgrade pyhappy")
        dt = _dtype_named(state["weight_dtype"])
        if dt is None:
            raise ValueError(f"{who}: extra state's weight_dtype must name a floating torch dtype, got "
                             f"{state['weight_dtype']!r}")
        return dt

    def set_extra_state(self, state):
        self.weight_dtype = self._check_extra_state(state, f"{type(self).__name__}.load_state_dict")

    def _packed_specs(self, version: int | None = None):
        """(name, dtype, shape) of each packed buffer a checkpoint of this module holds, in layout
        ``version`` (default: the current one; before 3, tile by tile with N padded to 8 only)."""
        G, KB = self.in_features // self.group_size, self.in_features // layout.BLOCK_K
        bpb = layout.BYTES_PER_BLOCK[layout.FORMAT_BITS[self.format]]
        if version is not None and version < 3:
            n8 = (self.out_features + layout.TILE_N - 1) // layout.TILE_N
            specs = [("qdata", torch.uint8, (n8, KB, bpb))]
        else:
            n8 = layout.n_tiles(self.out_features)
            specs = [("qdata", torch.uint8, (n8 // 2, KB, 2 * bpb))]
        if self.format == "nf4":
            specs.append(("absmax", torch.float32, (n8, G, layout.TILE_N)))
        else:
            specs += [("scales", torch.float16, (n8, G, layout.TILE_N)), ("zeros", torch.uint8, (n8, G, layout.TILE_N))]
        return specs

    def _validate_state_dict(self, state_dict, prefix: str, who: str):
        """Check this module's keys in ``state_dict`` (see _transaction.check_state_dict); change nothing."""
        key = prefix + "_extra_state"
        if key in state_dict:  # first: a checkpoint of another format or group size is named as such
            self._check_extra_state(state_dict[key], who)
        claimed, required = check_local(self, state_dict, prefix, who, skip=self._PACKED)
        specs = self._packed_specs(self._saved_layout(state_dict, prefix))
        present = [n for n, _, _ in specs if prefix + n in state_dict]
        if present and len(present) != len(specs):
            absent = [prefix + n for n, _, _ in specs if n not in present]
            raise KeyError(f"{who}: the state dict holds {prefix + present[0]} but not {absent} (a packed weight "
                           "loads whole or not at all)")
        for name, dtype, shape in specs:
            key = prefix + name
            required.append(key)
            if key not in state_dict:
                continue
            t = state_dict[key]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{who}: {key} must be {dtype} {shape} for {self.format} [{self.out_features}, "
                                 f"{self.in_features}] group_size {self.group_size}, got {got}")
            claimed.add(key)
        if present:
            scales = prefix + ("absmax" if self.format == "nf4" else "scales")
            check_finite_scales(state_dict[scales], who, scales)
            if self.format != "nf4" and not state_dict[prefix + "zeros"].is_meta:
                z = state_dict[prefix + "zeros"]
                top = 2 ** layout.FORMAT_BITS[self.format]
                if z.numel() and int(z.max()) >= top:
                    raise ValueError(f"{who}: {prefix}zeros must lie in [0, {top - 1}] for {self.format}, got "
                                     f"{int(z.max())}")
        key = prefix + "perm"
        if key in state_dict:
            p = state_dict[key]
            if not isinstance(p, torch.Tensor) or p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
                raise ValueError(f"{who}: {key} must be an integer tensor, got "
                                 f"{p.dtype if isinstance(p, torch.Tensor) else type(p).__name__}")
            check_perm(p.to(torch.int64), self.in_features, who, name=key)
            claimed.add(key)
        return claimed, required

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # perm exists only for act-order weights: make room for it when the checkpoint has one; a
        # checkpoint of this layer's packed weight without it is not act-order. A state dict that
        # does not hold this layer's weight (load_quantized_state_dict's, strict=False) leaves it be.
        self._validate_state_dict(state_dict, prefix, f"{type(self).__name__}.load_state_dict")
        key, has_weight = prefix + "perm", prefix + "qdata" in state_dict
        if key in state_dict and self.perm is None:
            self.perm = torch.empty(self.in_features, dtype=torch.int64, device=self.qdata.device)
        elif key not in state_dict and has_weight:
            self.perm = None
        version = self._saved_layout(state_dict, prefix)
        if has_weight and version < layout.LAYOUT_VERSION:
            # a checkpoint of an earlier layout: its packed tensors repacked into new tensors (the
            # checkpoint's own are left as they are), then loaded as a current one would be
            q = state_dict[prefix + "qdata"]
            if self.format == "int3" and version < 2:
                q = layout.int3_from_planes(q)
            names = ("absmax",) if self.format == "nf4" else ("scales", "zeros")
            q, groups = layout.pairs_from_tiles(q, {n: state_dict[prefix + n] for n in names})
            state_dict = dict(state_dict)
            state_dict[prefix + "qdata"] = q
            state_dict.update({prefix + n: t for n, t in groups.items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _saved_layout(self, state_dict, prefix: str) -> int:
        """The packed layout version of this module's entries in ``state_dict``: its extra state's
        (1 where that has none); the current one for a state dict without extra state."""
        extra = state_dict.get(prefix + "_extra_state")
        if not isinstance(extra, dict):
            return layout.LAYOUT_VERSION
        return int(extra.get("layout", 1))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_qweight"}  # the cached QuantizedWeight

    _PACKED = ("qdata", "absmax", "scales", "zeros", "perm")

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.bfloat16()``, ``.half()`` ... move the packed weight's buffers but keep
        their dtypes (a cast would break the format or round its scales); the bias follows, and so
        does ``weight_dtype`` (what dequantize() returns): the cast is read off an empty probe."""
        packed = {n: b for n, b in self._buffers.items() if n in self._PACKED and b is not None}
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.qdata.device))
        self.__dict__.pop("_qweight", None)  # holds the old buffers
        super()._apply(fn, recurse)
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.weight_dtype = probe.dtype
        for n, old in packed.items():
            new = self._buffers[n]
            if new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(device=new.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.qweight, self.bias, int8_decode=self.int8_decode)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}, group_size={self.group_size}, act_order={self.perm is not None}"
                + (", int8_decode=True" if self.int8_decode else ""))


class QLoRALinear(LoRAAdapter, QuantLinear):
    """Quantized frozen base + trainable LoRA (QLoRA / ModuLoRA): ``y = x · deq(Wq)ᵀ + b + s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ``.

    The backward reads the packed weight (dx tile by tile); no full-precision copy of W exists.
    Adapter parameters have PEFT's names (lora_A.weight, lora_B.weight) and the original weight's
    dtype (``adapter_dtype`` overrides); run under torch.autocast for mixed precision.
    ``act_quant`` / ``int8_decode`` as in QuantLinear (default exact; "int8" / True: int8 activations when
    decoding on CPU for inference).

    ``use_dora=True`` (QDoRA): ``y = (m / ‖W + s·BA‖_row) ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b`` with W the
    dequantized weight and m the trainable ``lora_magnitude_vector`` [out] (PEFT's name and
    initialisation ‖W + s·BA‖_row), the norm detached as PEFT does; while dropout is active, PEFT's
    ``(x - xd) Wᵀ + ms ⊙ (xd Wᵀ + s · xd Aᵀ Bᵀ) + b`` with xd = dropout(x). The norm is never formed
    from W + s·BA: ‖W_n + s·B_n A‖² = ‖W_n‖² + 2s·B_n·(W Aᵀ)_n + s²·B_n (A Aᵀ) B_nᵀ, with ‖W_n‖²
    computed once from the packed weight (``quantized_row_sqnorm``, kept while the packed buffers are
    unchanged) and W Aᵀ one quantized product of A's r rows. No dense copy of W exists at any point.
    """

    def __init__(self, in_features: int, out_features: int, format: str = "nf4", group_size: int | None = None,
                 r: int = 8, alpha: float | None = None, dropout: float = 0.0, rslora: bool = False, bias: bool = True,
                 core: bool = False, init: str = "peft", device=None, dtype=None, int8_decode: bool = False,
                 act_quant: str | None = None, use_dora: bool = False):
        _check_dora(type(self), use_dora, core)
        if alpha is not None:
            alpha = finite_number(type(self).__name__, "alpha", alpha)
        QuantLinear.__init__(self, in_features, out_features, format, group_size, bias=bias, device=device,
                             dtype=dtype, int8_decode=int8_decode, act_quant=act_quant)
        self._setup_adapter(r, alpha, dropout, rslora, core, init, device, self.weight_dtype)
        self._setup_dora(use_dora)

    @classmethod
    @restores_on_failure
    def from_linear(cls, linear: nn.Linear, format: str = "nf4", group_size: int | None = None, r: int = 8,
                    alpha: float | None = None, dropout: float = 0.0, rslora: bool = False, init: str = "peft",
                    core: bool = False, method="rtn", calib=None, use_dora: bool = False, *,
                    int8_decode: bool = False, act_quant: str | None = None, **quant_kwargs) -> "QLoRALinear":
        """Quantize ``linear``'s weight and put a fresh LoRA adapter on top; use_dora=True makes it a
        QDoRA layer (adds lora_magnitude_vector, initialised to the dequantized weight's row norms)."""
        _check_dora(cls, use_dora, core)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        int8_decode = _int8(f"{cls.__name__}.from_linear", int8_decode, act_quant)
        qw = quantize(linear.weight.detach(), format=format, group_size=group_size, method=method, calib=calib,
                      **quant_kwargs)
        return cls.from_quantized(qw, linear.bias, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                                  core=core, use_dora=use_dora, int8_decode=int8_decode)

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None, r: int = 8,
                       alpha: float | None = None, dropout: float = 0.0, rslora: bool = False, init: str = "peft",
                       core: bool = False, use_dora: bool = False, *, int8_decode: bool = False,
                       act_quant: str | None = None) -> "QLoRALinear":
        """Put a fresh LoRA (QDoRA with use_dora=True) adapter on an existing packed weight."""
        _check_dora(cls, use_dora, core)
        if alpha is not None:
            alpha = finite_number(cls.__name__, "alpha", alpha)
        self = QuantLinear.from_quantized.__func__(cls, qweight, bias, int8_decode=int8_decode, act_quant=act_quant)
        self._setup_adapter(r, alpha, dropout, rslora, core, init, qweight.device, qweight.dtype)
        self._setup_dora(use_dora)
        return self

    def _setup_dora(self, use_dora: bool):
        self.use_dora = use_dora
        self._dora_sqnorm = None  # (key, ‖W_n‖²): see weight_sqnorm()
        self._dora_norm_cache = DoraNormCache()  # ‖W + s·BA‖_row between calls: see forward
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.dora_norm().to(self.weight_dtype))

    def reset_lora_parameters(self, init: str = "peft"):
        """LoRAAdapter's initialisation; for QDoRA the magnitude is then PEFT's ‖W + s·BA‖_row."""
        super().reset_lora_parameters(init)
        if getattr(self, "use_dora", False):
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.dora_norm())

    def weight_sqnorm(self) -> torch.Tensor:
        """‖W_n‖² [out] (float64) of the dequantized weight, cached while the packed buffers are the
        same tensors at the same version (load_state_dict or a move to another device recomputes it)."""
        key = self._packed_key()
        if self._dora_sqnorm is None or self._dora_sqnorm[0] != key:
            self._dora_sqnorm = (key, quantized_row_sqnorm(self.qweight))
        return self._dora_sqnorm[1]

    def _packed_key(self):
        """The packed buffers' identity: data pointer, version counter and device of each."""
        return tuple((b.data_ptr(), b._version, b.device) for n, b in self._buffers.items()
                     if n in self._PACKED and b is not None)

    def dora_norm(self) -> torch.Tensor:
        """‖W + s·BA‖_row [out] of the dequantized weight, detached, in the adapter's dtype: one quantized
        product W Aᵀ (A's r rows through the packed kernel) and [N, r] work in float64."""
        A, B = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        sq = quantized_row_sqnorm(self.qweight) if torch.compiler.is_compiling() else self.weight_sqnorm()
        with torch.no_grad():
            P = quant_linear(A, self.qweight).t()  # [N, r] = W Aᵀ
            return factored_weight_norm(P, A, B, sq, self.scaling, A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.lora_dropout if self.training else 0.0
        A, B, C = self.adapter_tensors(x.dtype)
        if not self.use_dora:
            return quant_linear(x, self.qweight, self.bias, A, B, self.scaling, C, p, int8_decode=self.int8_decode)
        # The norm is kept between calls while the packed weight, the scaling and A, B are unchanged
        # (pyhappy.ops.DoraNormCache); under torch.compile it is computed in the graph.
        norm = self.dora_norm() if torch.compiler.is_compiling() else self._dora_norm_cache.get(
            (self._packed_key(), float(self.scaling), autocast_dtype(x.device)), self.lora_A.weight, self.lora_B.weight,
            self.dora_norm)
        ms = (self.lora_magnitude_vector / norm).to(x.dtype)
        s = self.scaling
        if p == 0.0:
            y = quant_linear(x, self.qweight, None, A, B, s, int8_decode=self.int8_decode) * ms
        else:  # PEFT's dropout: the scaled base term on the dropped-out input, the rest on x
            xd = torch.nn.functional.dropout(x, p, training=True)
            y = quant_linear(x - xd, self.qweight) + quant_linear(xd, self.qweight, None, A, B, s) * ms
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._adapter_repr()}, use_dora={self.use_dora}"
