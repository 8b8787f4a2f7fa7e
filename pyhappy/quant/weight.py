"""QuantizedWeight: one frozen [N, K] weight in a packed 4- or 3-bit format, and ``quantize``.

Formats (layouts documented in nf4.py and intq.py):
  "nf4"   bitsandbytes NF4: blocks of ``group_size`` (64) consecutive elements of the row-major
          flattened weight, fp32 absmax per block (optionally double-quantized).
  "int4"  group-wise asymmetric 4-bit along K: float16 scale and integer zero per (row, group).
  "int3"  the same with 3 bits (eight codes in three bytes).
The packed kernel layout is in layout.py.
"""

from __future__ import annotations

import torch

from . import layout

FORMATS = ("nf4", "int4", "int3")
_BITS = {"int4": 4, "int3": 3}

# The format modules build QuantizedWeights, so they import this one: nf4.py (bitsandbytes NF4),
# intq.py (round-to-nearest INT4/INT3, GPTQ checkpoints) and gptq.py (OPTQ) register their entry
# points here by name (from_bnb, to_bnb, quantize_nf4, from_gptq, to_gptq, quantize_rtn, quantize_gptq)
# for the methods and ``quantize`` below; pyhappy.quant imports them all, so they are registered by
# the time any of this module can be reached.
_CODECS: dict = {}


def register_codecs(**functions) -> None:
    """Register a format module's entry points (see _CODECS)."""
    _CODECS.update(functions)


def check_perm(perm, K: int, who: str, name: str = "perm") -> None:
    """Raise unless ``perm`` is None or an int64 [K] tensor holding each of 0..K-1 exactly once."""
    if perm is None:
        return
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or tuple(perm.shape) != (K,):
        got = f"{perm.dtype} {tuple(perm.shape)}" if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"{who}: {name} must be an int64 [K] = [{K}] permutation, got {got}")
    if perm.is_meta:
        return
    if K and (int(perm.min()) < 0 or int(perm.max()) >= K):
        raise ValueError(f"{who}: {name} must be a permutation of range(K = {K}), got values in "
                         f"[{int(perm.min())}, {int(perm.max())}]")
    counts = torch.bincount(perm, minlength=K)
    if not bool((counts == 1).all()):
        dup = int((counts > 1).nonzero()[0].item())
        raise ValueError(f"{who}: {name} must be a permutation of range(K = {K}); {dup} appears "
                         f"{int(counts[dup])} times")


def check_finite_scales(t, who: str, name: str) -> None:
    """Raise if the per-group scales / absmax ``t`` hold NaN or inf (a packed weight cannot carry
    them: kernels and reference would disagree on what NaN·0 and inf·0 give)."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta and t.numel():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            raise ValueError(f"{who}: {name} holds {int(bad.sum())} NaN/inf entries; scales must be finite")


class QuantizedWeight:
    """A frozen [N, K] weight in a packed 4- or 3-bit format: the only copy of the weight.

    ``data`` holds the packed tensors in the kernel layout (layout.py) and the metadata:
      format        "nf4" | "int4" | "int3"
      shape         (N, K)
      group_size    NF4 block size / integer group along K (a multiple of 32 dividing K)
      dtype         the dtype of the weight it was made from (dequantize's default)
      qdata         uint8 codes, layout.pack_codes
      scales, zeros int formats: float16 / uint8 [N8, G, 8]   (w = (code - zero) * scale)
      absmax        nf4: float32 [N8, G, 8]                   (w = NF4[code] * absmax)
      perm          None, or int64 [K] (act-order): kernel column j holds original column perm[j]
      extra         format-specific metadata for exact export (e.g. the bitsandbytes
                    double-quantized absmax as imported); never read by kernels
    Build one with ``from_codes`` from the logical form; read it back with ``codes()``. The
    constructor refuses a ``perm`` that is not a permutation of range(K) and NaN/inf scales (a
    module that validated its buffers at load passes validate=False: its forward rebuilds this
    object, also under torch.compile, where data-dependent checks cannot run).
    """

    def __init__(self, data: dict, *, validate: bool = True):
        fmt = data.get("format")
        if fmt not in FORMATS:
            raise ValueError(f"QuantizedWeight: format must be one of {FORMATS}, got {fmt!r}")
        if validate:
            check_perm(data.get("perm"), int(data["shape"][1]), "QuantizedWeight")
            for key in ("absmax", "scales"):
                check_finite_scales(data.get(key), "QuantizedWeight", key)
        self.data = data

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_hit")}  # ops.quant_linear's caches

    @classmethod
    def from_codes(cls, format: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                   *, group_size: int, dtype: torch.dtype = torch.float32, perm: torch.Tensor | None = None,
                   extra: dict | None = None) -> "QuantizedWeight":
        """From the logical form: codes uint8 [N, K] (< 2**bits), and per (row, group) [N, K/group_size]
        scales (int: the step; nf4: absmax) and zeros (int formats: integer zero points, in codes).
        With ``perm`` (act-order), column j of ``codes`` is column perm[j] of the original weight."""
        if format not in FORMATS:
            raise ValueError(f"QuantizedWeight.from_codes: format must be one of {FORMATS}, got {format!r}")
        bits = 4 if format == "nf4" else _BITS[format]
        if codes.dim() != 2 or codes.dtype != torch.uint8:
            raise ValueError(f"QuantizedWeight.from_codes: codes must be uint8 [N, K], got {codes.dtype} {tuple(codes.shape)}")
        N, K = codes.shape
        if not isinstance(group_size, int) or group_size <= 0 or group_size % layout.BLOCK_K or K % group_size:
            raise ValueError(f"QuantizedWeight.from_codes: group_size must be a positive multiple of "
                             f"{layout.BLOCK_K} dividing K = {K}, got {group_size!r}")
        G = K // group_size
        if int(codes.max()) >= 2**bits if codes.numel() else False:
            raise ValueError(f"QuantizedWeight.from_codes: codes must be < {2**bits} for {format}")
        if tuple(scales.shape) != (N, G):
            raise ValueError(f"QuantizedWeight.from_codes: scales must be [N, K/group_size] = [{N}, {G}], "
                             f"got {tuple(scales.shape)}")
        check_finite_scales(torch.as_tensor(scales), "QuantizedWeight.from_codes", "scales")
        data = {"format": format, "shape": (N, K), "group_size": group_size, "dtype": dtype,
                "qdata": layout.pack_codes(codes, bits), "perm": None, "extra": dict(extra or {})}
        if format == "nf4":
            if zeros is not None:
                raise ValueError("QuantizedWeight.from_codes: nf4 has no zeros")
            data["absmax"] = layout.pack_groups(scales.to(torch.float32))
        else:
            if zeros is None or tuple(zeros.shape) != (N, G):
                raise ValueError(f"QuantizedWeight.from_codes: zeros must be [N, K/group_size] = [{N}, {G}] "
                                 f"for {format}, got {None if zeros is None else tuple(zeros.shape)}")
            z = torch.as_tensor(zeros)
            if z.is_floating_point() and not torch.equal(z, z.round()):
                raise ValueError("QuantizedWeight.from_codes: zeros must be integers (zero points in code units)")
            if z.numel() and (int(z.min()) < 0 or int(z.max()) >= 2**bits):
                raise ValueError(f"QuantizedWeight.from_codes: zeros must lie in [0, {2**bits - 1}] for {format}")
            data["scales"] = layout.pack_groups(scales.to(torch.float16))
            data["zeros"] = layout.pack_groups(z.to(torch.uint8))
        if perm is not None:
            perm = torch.as_tensor(perm, dtype=torch.int64)
            check_perm(perm, K, "QuantizedWeight.from_codes")
            if not torch.equal(perm, torch.arange(K, device=perm.device)):
                data["perm"] = perm
        return cls(data)

    def codes(self):
        """The logical form: (codes uint8 [N, K], scales [N, G] float32, zeros [N, G] uint8 or None),
        in kernel column order (see ``perm``)."""
        N, K = self.shape
        codes = layout.unpack_codes(self.data["qdata"], self.bits, N, K)
        if self.format == "nf4":
            return codes, layout.unpack_groups(self.data["absmax"], N), None
        return (codes, layout.unpack_groups(self.data["scales"], N).float(),
                layout.unpack_groups(self.data["zeros"], N))

    # -- properties -------------------------------------------------------------------------------
    @property
    def format(self) -> str:
        return self.data["format"]

    @property
    def shape(self) -> tuple:
        return tuple(self.data["shape"])

    @property
    def dtype(self) -> torch.dtype:
        return self.data["dtype"]

    @property
    def group_size(self) -> int:
        return int(self.data["group_size"])

    @property
    def bits(self) -> int:
        return 4 if self.format == "nf4" else _BITS[self.format]

    @property
    def perm(self):
        return self.data.get("perm")

    @property
    def device(self) -> torch.device:
        return self.data["qdata"].device

    def tensors(self) -> dict:
        """The packed tensors the kernels read, by name (what a module keeps as buffers)."""
        names = ("qdata", "absmax") if self.format == "nf4" else ("qdata", "scales", "zeros")
        out = {k: self.data[k] for k in names}
        if self.perm is not None:
            out["perm"] = self.perm
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "QuantizedWeight":
        data = dict(self.data)
        for k, v in self.data.items():
            if isinstance(v, torch.Tensor):
                data[k] = v.to(device)
        return QuantizedWeight(data, validate=False)  # the same values as this (validated) weight

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [N, K] weight the packed data stands for, in original column order (computed in
        float32, returned in ``dtype``, default the original weight's dtype)."""
        N, K = self.shape
        d = self.data
        scales = d["absmax"] if self.format == "nf4" else d["scales"]
        w = layout.dequantize_packed(d["qdata"], scales, d.get("zeros"), self.format, N, K, self.group_size)
        if self.perm is not None:
            out = torch.empty_like(w)
            out[:, self.perm] = w
            w = out
        return w.to(dtype or self.dtype)

    # -- interop ----------------------------------------------------------------------------------
    @classmethod
    def from_bnb(cls, packed_weight, quant_state) -> "QuantizedWeight":
        """From a bitsandbytes 4-bit weight: the packed uint8 tensor and its QuantState (or the
        dict of ``QuantState.as_dict(packed=True)``). NF4 only."""
        return _CODECS["from_bnb"](packed_weight, quant_state)

    def to_bnb(self):
        """(packed_weight, quant_state dict as ``QuantState.as_dict(packed=True)`` writes it)."""
        if self.format != "nf4":
            raise ValueError(f"QuantizedWeight.to_bnb: only nf4 weights export to bitsandbytes, this is {self.format}")
        return _CODECS["to_bnb"](self)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, bits=4, group_size=128, sym=False,
                  **kwargs) -> "QuantizedWeight":
        """From a GPTQ checkpoint layer (qweight/qzeros/scales/g_idx; 4- or 3-bit; act-order)."""
        if bits not in (3, 4):
            raise ValueError(f"QuantizedWeight.from_gptq: bits must be 3 or 4, got {bits!r}")
        return _CODECS["from_gptq"](qweight, qzeros, scales, g_idx=g_idx, bits=bits, group_size=group_size, sym=sym,
                                    **kwargs)

    def to_gptq(self) -> dict:
        if self.format == "nf4":
            raise ValueError("QuantizedWeight.to_gptq: nf4 weights have no GPTQ form (use int4/int3)")
        return _CODECS["to_gptq"](self)

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"QuantizedWeight(format={self.format}, shape=({n}, {k}), group_size={self.group_size}, "
                f"dtype={self.dtype}, {self.nbytes / 2**20:.2f} MiB packed)")


def quantize(weight: torch.Tensor, format: str = "nf4", group_size: int | None = None, method="rtn", calib=None,
             **kwargs) -> QuantizedWeight:
    """Quantize a dense [N, K] weight.

    format: "nf4" | "int4" | "int3". group_size: NF4 block size (default 64) or the integer group
    along K (default 128); a multiple of 32 dividing K.
    method: "rtn" (round to nearest), "gptq" (int4/int3; OPTQ with Hessian from ``calib``, inputs
    [..., K]; kwargs: act_order, damp, block) or any callable
    ``f(weight, bits=..., group_size=..., calib=..., **kwargs) -> (codes, scales, zeros[, perm])`` in
    the logical form of ``QuantizedWeight.from_codes`` (ModuLoRA's point: any quantizer, one kernel
    and one backward).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize: weight must be a floating 2-D tensor [N, K], got {getattr(weight, 'shape', weight)!r}")
    if format not in FORMATS:
        raise ValueError(f"quantize: format must be one of {FORMATS}, got {format!r}")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"quantize: weight has {bad} NaN/Inf entries; a quantized weight cannot represent them")
    K = weight.shape[1]
    gs = group_size if group_size is not None else (64 if format == "nf4" else 128)
    if not isinstance(gs, int) or gs <= 0 or gs % layout.BLOCK_K or K % gs:
        raise ValueError(f"quantize: group_size must be a positive multiple of {layout.BLOCK_K} dividing "
                         f"K = {K}, got {group_size!r}")
    if format == "nf4":
        if method != "rtn":
            raise ValueError(f"quantize: method={method!r} is not available for nf4 (use method='rtn', or int4/int3)")
        return _CODECS["quantize_nf4"](weight, blocksize=gs, **kwargs)
    bits = _BITS[format]
    if callable(method):
        out = method(weight, bits=bits, group_size=gs, calib=calib, **kwargs)
    elif method == "rtn":
        out = _CODECS["quantize_rtn"](weight, bits=bits, group_size=gs, **kwargs)
    elif method == "gptq":
        if calib is None:
            raise ValueError("quantize: method='gptq' needs calib, calibration inputs [..., K]")
        out = _CODECS["quantize_gptq"](weight, calib, bits=bits, group_size=gs, **kwargs)
    else:
        raise ValueError(f"quantize: method must be 'rtn', 'gptq' or a callable, got {method!r}")
    if not isinstance(out, tuple) or len(out) not in (3, 4):
        raise ValueError("quantize: a quantizer must return (codes, scales, zeros) or (codes, scales, zeros, perm)")
    codes, scales, zeros = out[:3]
    perm = out[3] if len(out) == 4 else None
    return QuantizedWeight.from_codes(format, codes, scales, zeros, group_size=gs, dtype=weight.dtype, perm=perm)
