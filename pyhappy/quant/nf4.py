"""NF4, bitsandbytes-compatible: quantizer, and bit-exact import/export of bitsandbytes weights.

bitsandbytes' layout: blocks of ``blocksize`` (64) consecutive elements of the row-major
flattened weight, a float32 absmax per block, codes = the nearest of the 16 NF4 values to
w / absmax (ties by the midpoints), two codes a byte with the first element in the high nibble,
stored as uint8 [numel / 2, 1] (or viewed as another ``quant_storage`` dtype). Double
quantization stores absmax - mean(absmax) as 8-bit codes of a dynamic map in blocks of 256 with
a float32 absmax per block (``nested_*``) and the mean as ``nested_offset``.

pyhappy keeps the float32 absmax the kernels read (for a double-quantized import, exactly what
bitsandbytes dequantizes it to) and, for exact export, the double-quantized pieces as imported.
Blocks must lie inside rows (K % blocksize == 0), which every real checkpoint satisfies.
"""

from __future__ import annotations

import json

import torch

from . import layout
from .weight import QuantizedWeight, register_codecs

NF4_TABLE = layout.NF4_TABLE
_STATE_KEY = "quant_state.bitsandbytes__nf4"


def _bounds(device) -> torch.Tensor:
    code = torch.tensor(layout.NF4_VALUES, dtype=torch.float32, device=device)
    return (code[:-1] + code[1:]) / 2


def _check_block(who: str, K: int, blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize % layout.BLOCK_K:
        raise ValueError(f"{who}: blocksize must be a positive multiple of {layout.BLOCK_K}, got {blocksize!r}")
    if K % blocksize:
        raise ValueError(f"{who}: K = {K} must be a multiple of blocksize = {blocksize} (blocks must lie inside rows)")


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64) -> QuantizedWeight:
    """Round-to-nearest NF4 of a [N, K] weight, bit-identical to bitsandbytes' ``quantize_4bit(w,
    blocksize, quant_type="nf4")`` (codes and absmax)."""
    if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_nf4: weight must be a float32/bfloat16/float16 [N, K] tensor, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    _check_block("quantize_nf4", K, blocksize)
    blocks = weight.detach().float().reshape(N, K // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1)
    codes = torch.bucketize(scaled, _bounds(weight.device)).to(torch.uint8).reshape(N, K)
    return QuantizedWeight.from_codes("nf4", codes, absmax, group_size=blocksize, dtype=weight.dtype)


# ---- bitsandbytes interop ------------------------------------------------------------------------


def _state_dict_of(quant_state) -> dict:
    """The packed dict form of a QuantState (or a dict: packed, unpacked, or with "weight." prefixes)."""
    if hasattr(quant_state, "as_dict"):
        return dict(quant_state.as_dict(packed=True))
    if not isinstance(quant_state, dict):
        raise TypeError(f"from_bnb: quant_state must be a bitsandbytes QuantState or its as_dict(packed=True) dict, "
                        f"got {type(quant_state).__name__}")
    d = {}
    for k, v in quant_state.items():
        if k.startswith("quant_state.") or ".quant_state." in k:
            d[_STATE_KEY if k.endswith("bitsandbytes__nf4") else "quant_state." + k.rsplit("quant_state.", 1)[1]] = v
        else:
            d[k.rsplit(".", 1)[-1]] = v
    return d


def _meta(d: dict) -> dict:
    keys = [k for k in d if k.startswith("quant_state.bitsandbytes__")]
    if keys:
        if keys != [_STATE_KEY]:
            raise ValueError(f"from_bnb: only nf4 weights are supported, got quant state {keys}")
        return json.loads(bytes(d[_STATE_KEY].cpu().to(torch.uint8).tolist()).decode("utf-8"))
    if "quant_type" in d:  # an unpacked as_dict()
        return {k: d[k] for k in ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                                  "nested_offset") if k in d}
    raise ValueError("from_bnb: quant_state has no 'quant_state.bitsandbytes__nf4' entry (nor quant_type)")


BNB_CPU_BLOCK_N = 32  # bitsandbytes' _convert_weight_packed_for_cpu default block_n


def is_bnb_cpu_layout(quant_state) -> bool:
    """Whether a bitsandbytes QuantState (or a state dict carrying the key) records that bitsandbytes has
    repacked its weight into the CPU kernel layout (``packing_format_for_cpu``; done by Linear4bit's
    no-grad eval forward on CPUs with AVX512-BF16)."""
    if isinstance(quant_state, dict):
        return bool(quant_state.get("packing_format_for_cpu", False))
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def bnb_cpu_layout_to_standard(packed: torch.Tensor, absmax: torch.Tensor, N: int, K: int, blocksize: int,
                               block_n: int = BNB_CPU_BLOCK_N):
    """bitsandbytes' CPU layout -> its standard NF4 packing: (uint8 [N*K/2, 1], float32 absmax [N*K/blocksize]).

    The CPU layout (bitsandbytes.functional._convert_weight_packed_for_cpu) stores the codes as uint8
    [N, K/2]: rows in groups of ``block_n``, each run of 64 bytes holding the codes of ``block_n`` rows
    at two consecutive columns, low nibbles the even column and high nibbles the odd one; absmax is
    bfloat16 [K/blocksize, N] (a double-quantized absmax is dequantized first). The codes come back bit
    exact; absmax comes back as the bfloat16 values bitsandbytes now multiplies by (the float32 values
    before the repack are gone from bitsandbytes' state), widened exactly to float32."""
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    if N % block_n or K % 2 or packed.numel() != N * K // 2:
        raise ValueError(f"bnb_cpu_layout_to_standard: a [{N}, {K}] weight in blocks of {block_n} rows does not "
                         f"fit {packed.numel()} packed bytes")
    if absmax.numel() != N * K // blocksize:
        raise ValueError(f"bnb_cpu_layout_to_standard: absmax holds {absmax.numel()} values, a [{N}, {K}] weight "
                         f"in blocks of {blocksize} needs {N * K // blocksize}")
    p = packed.reshape(-1, 32)
    codes = torch.cat([p & 15, p >> 4], dim=-1)  # [., 64]: low nibbles, then high nibbles
    codes = codes.reshape(N // block_n, K // 2, block_n, 2).transpose(1, 2).reshape(-1)  # row-major [N, K]
    standard = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).unsqueeze(1)
    absmax = absmax.reshape(K // blocksize, N).t().reshape(-1).float()
    return standard, absmax


def _from_cpu_layout(packed_weight: torch.Tensor, quant_state):
    """(packed_weight, state dict) of a CPU-layout bitsandbytes weight, back in the standard packing."""
    qs = quant_state
    get = (lambda k, d=None: qs.get(k, d)) if isinstance(qs, dict) else (lambda k, d=None: getattr(qs, k, d))
    shape, blocksize, absmax = get("shape"), get("blocksize"), get("absmax")
    if shape is None or len(shape) != 2 or not isinstance(absmax, torch.Tensor):
        raise ValueError("from_bnb: a CPU-layout bitsandbytes weight needs its quant state's shape and absmax")
    N, K = (int(v) for v in shape)
    standard, absmax = bnb_cpu_layout_to_standard(packed_weight, absmax, N, K, int(blocksize))
    storage = get("original_storage_type")
    if storage is not None and storage != torch.uint8:
        standard = standard.reshape(-1).view(storage).unsqueeze(1)
    dtype = get("original_dtype", get("dtype", torch.float32))
    return standard, {"quant_type": get("quant_type"), "blocksize": int(blocksize), "shape": (N, K),
                      "dtype": str(dtype).replace("torch.", ""), "absmax": absmax}


def from_bnb(packed_weight: torch.Tensor, quant_state) -> QuantizedWeight:
    """A QuantizedWeight from bitsandbytes' packed NF4 weight and its quant state (a weight bitsandbytes
    has repacked into its CPU layout is read back through ``bnb_cpu_layout_to_standard``)."""
    if is_bnb_cpu_layout(quant_state):
        packed_weight, quant_state = _from_cpu_layout(packed_weight, quant_state)
    d = _state_dict_of(quant_state)
    meta = _meta(d)
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"from_bnb: only quant_type 'nf4' is supported, got {meta.get('quant_type')!r}")
    shape = meta.get("shape")
    if shape is None or len(shape) != 2:
        raise ValueError(f"from_bnb: the quant state must record a 2-D weight shape, got {shape!r}")
    N, K = (int(s) for s in shape)
    blocksize = int(meta["blocksize"])
    _check_block("from_bnb", K, blocksize)
    if not isinstance(packed_weight, torch.Tensor):
        raise TypeError(f"from_bnb: packed_weight must be a tensor, got {type(packed_weight).__name__}")
    storage_dtype = packed_weight.dtype
    raw = packed_weight.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() != N * K // 2:
        raise ValueError(f"from_bnb: packed_weight holds {raw.numel()} bytes, a [{N}, {K}] 4-bit weight needs "
                         f"{N * K // 2}")
    absmax = d.get("absmax")
    G = N * K // blocksize
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != G:
        raise ValueError(f"from_bnb: absmax must hold {G} values (one per block of {blocksize}), got "
                         f"{None if absmax is None else tuple(absmax.shape)}")
    code = d.get("quant_map")
    if code is not None and not torch.equal(code.float().cpu(), NF4_TABLE):
        raise ValueError("from_bnb: quant_map differs from the NF4 table; only standard nf4 is supported")
    extra = {"bnb_storage_dtype": storage_dtype, "bnb_dtype": meta.get("dtype")}
    if "nested_absmax" in d:
        q = absmax.reshape(-1).to(torch.int64)
        nb = int(meta["nested_blocksize"])
        nested_code, nested_absmax = d["nested_quant_map"].float(), d["nested_absmax"].float().reshape(-1)
        vals = nested_code.to(absmax.device)[q]
        pad = (-vals.numel()) % nb
        vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, nb) * nested_absmax.view(-1, 1)
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        real_absmax = vals.reshape(-1)[:G] + offset
        extra["bnb_nested"] = {"absmax": absmax.clone(), "nested_absmax": d["nested_absmax"].clone(),
                               "nested_quant_map": d["nested_quant_map"].clone(), "nested_blocksize": nb,
                               "nested_dtype": meta.get("nested_dtype", "float32"),
                               "nested_offset": meta["nested_offset"]}
    else:
        if absmax.dtype != torch.float32:
            raise ValueError(f"from_bnb: absmax must be float32 (or double-quantized uint8), got {absmax.dtype}")
        real_absmax = absmax.reshape(-1)
    if not bool(torch.isfinite(real_absmax).all()):
        raise ValueError(f"from_bnb: absmax holds {int((~torch.isfinite(real_absmax)).sum())} NaN/inf entries; "
                         "absmax must be finite")
    codes = torch.stack([raw >> 4, raw & 15], dim=1).reshape(N, K)
    dtype = getattr(torch, str(meta.get("dtype", "float32")))
    return QuantizedWeight.from_codes("nf4", codes, real_absmax.float().reshape(N, K // blocksize), group_size=blocksize,
                                      dtype=dtype, extra=extra)


def to_bnb(qw: QuantizedWeight):
    """(packed_weight uint8 [N*K/2, 1], the ``QuantState.as_dict(packed=True)`` dict)."""
    N, K = qw.shape
    codes, absmax, _ = qw.codes()
    flat = codes.reshape(-1)
    packed = ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)
    storage = qw.data["extra"].get("bnb_storage_dtype", torch.uint8)
    if storage != torch.uint8:
        packed = packed.squeeze(1).view(storage).unsqueeze(1)
    dtype = str(qw.dtype).replace("torch.", "")
    meta = {"quant_type": "nf4", "blocksize": qw.group_size, "dtype": dtype, "shape": [N, K]}
    state = {"quant_map": NF4_TABLE.to(absmax.device).clone()}
    nested = qw.data["extra"].get("bnb_nested")
    if nested is not None:
        state["absmax"] = nested["absmax"].clone()
        state["nested_absmax"] = nested["nested_absmax"].clone()
        state["nested_quant_map"] = nested["nested_quant_map"].clone()
        meta.update(nested_blocksize=nested["nested_blocksize"], nested_dtype=nested["nested_dtype"],
                    nested_offset=nested["nested_offset"])
    else:
        state["absmax"] = absmax.reshape(-1).contiguous()
    # bitsandbytes' key order (as_dict): quant_type, absmax, blocksize, quant_map, dtype, shape, nested_*.
    ordered = {"quant_type": "nf4", "blocksize": meta["blocksize"], "dtype": dtype, "shape": [N, K]}
    for k in ("nested_blocksize", "nested_dtype", "nested_offset"):
        if k in meta:
            ordered[k] = meta[k]
    state[_STATE_KEY] = torch.tensor(list(json.dumps(ordered).encode("utf-8")), dtype=torch.uint8)
    order = ["absmax", "quant_map", "nested_absmax", "nested_quant_map", _STATE_KEY]
    return packed, {k: state[k] for k in order if k in state}


def from_bnb_state_dict(state_dict: dict, prefix: str = "") -> QuantizedWeight:
    """From a transformers-style module state dict of a bitsandbytes Linear4bit (keys prefix+"weight",
    prefix+"weight.absmax", prefix+"weight.quant_map", ..., prefix+"weight.quant_state.bitsandbytes__nf4")."""
    wkey = prefix + "weight"
    if wkey not in state_dict:
        raise KeyError(f"from_bnb_state_dict: no {wkey!r} in the state dict")
    qs = {k[len(wkey) + 1:]: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
    return from_bnb(state_dict[wkey], qs)


register_codecs(from_bnb=from_bnb, to_bnb=to_bnb, quantize_nf4=quantize_nf4)
