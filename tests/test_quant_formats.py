"""Quantized formats: packed layout, NF4 / bitsandbytes, INT4 / INT3 / GPTQ checkpoints, quantizers, accuracy."""

from __future__ import annotations

import json

import pytest
import torch

import pyhappy
from pyhappy.quant import QuantizedWeight, layout
from pyhappy.quant.intq import from_gptq, to_gptq
from pyhappy.quant.nf4 import from_bnb, from_bnb_state_dict, quantize_nf4


def sqnr_db(got, want):
    return (10 * torch.log10(want.double().pow(2).sum() / (got.double() - want.double()).pow(2).sum())).item()


# ---- layout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("N,K", [(8, 32), (13, 64), (20, 64), (40, 128)])
def test_layout_round_trip_and_spec(bits, N, K):
    codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8)
    q = layout.pack_codes(codes, bits)
    nb, KB = layout.BYTES_PER_BLOCK[bits], K // 32
    assert layout.n_tiles(N) == 2 * ((N + 15) // 16)
    assert q.shape == (layout.n_tiles(N) // 2, KB, 2 * nb)
    assert torch.equal(layout.unpack_codes(q, bits, N, K), codes)
    flat = q.reshape(-1)
    # every element where the layout's docstring says it is: block b of tile t at byte
    # ((t // 2) * KB + b) * 2 * nb + (t % 2) * nb, the pair's two tiles alternating block by block
    for n in range(N):
        for k in range(0, K, 7):
            t, r, b, kr = n // 8, n % 8, k // 32, k % 32
            blk = ((t // 2) * KB + b) * 2 * nb + (t % 2) * nb
            if bits == 4:
                byte = flat[blk + (kr // 8) * 32 + r * 4 + kr % 4]
                got = (byte >> (4 * ((kr % 8) // 4))) & 15
            else:
                p = blk + r * 4 + kr % 4
                u = int(flat[p]) | int(flat[32 + p]) << 8 | int(flat[64 + p]) << 16
                got = (u >> (3 * (kr // 4))) & 7
            assert got == codes[n, k]
    # padding rows (up to a multiple of 16) hold code 0
    assert not layout.unpack_codes(q, bits, layout.n_tiles(N) * 8, K)[N:].any()


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int3"])
def test_checkpoint_in_the_tile_by_tile_layout_is_repacked_on_load(fmt):
    """QuantLinear state dicts of layout version 2 hold the tiles one after another, N padded to a
    multiple of 8 only (20 rows: 3 tiles); loading repacks them into tile pairs (and a tile of
    padding), so outputs are unchanged and the checkpoint's own tensors are left as they were."""
    from pyhappy.nn import QuantLinear

    torch.manual_seed(0)
    m = QuantLinear.from_linear(torch.nn.Linear(64, 20), fmt, group_size=32)
    sd = m.state_dict()
    old = {n: t.clone() for n, t in sd.items() if isinstance(t, torch.Tensor)}
    old["qdata"] = layout._tiles(sd["qdata"])[:3].clone()
    for n in ("absmax",) if fmt == "nf4" else ("scales", "zeros"):
        old[n] = sd[n][:3].clone()
    old["_extra_state"] = dict(sd["_extra_state"], layout=2)
    kept = {n: t.clone() for n, t in old.items() if isinstance(t, torch.Tensor)}
    m2 = QuantLinear(64, 20, fmt, 32)
    m2.load_state_dict(old)
    for n in ("qdata", "absmax", "scales", "zeros"):
        if hasattr(m, n):
            assert torch.equal(getattr(m2, n), getattr(m, n)), n
    assert all(torch.equal(old[n], t) for n, t in kept.items())
    x = torch.randn(3, 64)
    torch.testing.assert_close(m2(x), m(x))
    bad = dict(old, qdata=sd["qdata"])  # the current shape under a version-2 extra state
    with pytest.raises(ValueError, match="qdata must be torch.uint8"):
        QuantLinear(64, 20, fmt, 32).load_state_dict(bad)


def test_int3_checkpoint_in_the_two_plane_layout_is_repacked_on_load():
    """QuantLinear state dicts saved before int3 became byte triples (no "layout" in the extra
    state) hold a 2-bit plane + a 1-bit plane; loading repacks them, so outputs are unchanged."""
    from pyhappy.nn import QuantLinear

    torch.manual_seed(0)
    m = QuantLinear.from_linear(torch.nn.Linear(64, 12), "int3", group_size=32)
    codes = layout.unpack_codes(m.qdata, 3, 12, 64)
    N8, KB = 2, 2  # tiles of 12 rows, padded to a multiple of 8 as that layout did
    c = torch.zeros(N8 * 8, 64, dtype=torch.uint8)
    c[:12] = codes
    c5 = c.view(N8, 8, KB, 8, 4).permute(0, 2, 3, 1, 4)  # [t, b, i, r, kk]: the old packer
    low2 = (c5 & 3).reshape(N8, KB, 2, 4, 8, 4)
    plane2 = sum(low2[:, :, :, i] << (2 * i) for i in range(4))
    plane1 = sum((c5[:, :, i] >> 2) << i for i in range(8))
    old = torch.cat([plane2.reshape(N8, KB, 64), plane1.reshape(N8, KB, 32)], dim=2).to(torch.uint8)
    sd = m.state_dict()
    sd["qdata"] = old
    sd["_extra_state"] = {k: v for k, v in sd["_extra_state"].items() if k != "layout"}
    m2 = QuantLinear(64, 12, "int3", 32)
    m2.load_state_dict(sd)
    assert torch.equal(m2.qdata, m.qdata) and torch.equal(sd["qdata"], old)
    x = torch.randn(3, 64)
    torch.testing.assert_close(m2(x), m(x))
    sd["_extra_state"] = dict(sd["_extra_state"], layout=99)
    with pytest.raises(ValueError, match="layout version 99"):
        QuantLinear(64, 12, "int3", 32).load_state_dict(sd)


def test_from_codes_validates():
    c = torch.zeros(8, 64, dtype=torch.uint8)
    s = torch.ones(8, 2)
    with pytest.raises(ValueError, match="group_size"):
        QuantizedWeight.from_codes("int4", c, s, torch.zeros(8, 2), group_size=48)
    with pytest.raises(ValueError, match="codes must be < 8"):
        QuantizedWeight.from_codes("int3", c + 9, s, torch.zeros(8, 2), group_size=32)
    with pytest.raises(ValueError, match="zeros"):
        QuantizedWeight.from_codes("int4", c, s, None, group_size=32)
    with pytest.raises(ValueError, match="perm"):
        QuantizedWeight.from_codes("int4", c, s, torch.zeros(8, 2), group_size=32, perm=torch.zeros(64))


# ---- NF4 -----------------------------------------------------------------------------------------


def test_nf4_hand_built_bytes_high_nibble_first():
    # 1 row x 64 values; bytes 0x0F 0x70, then zeros: values 0..3 = codes 0, 15, 7, 0
    N, K = 1, 64
    raw = torch.zeros(K // 2, 1, dtype=torch.uint8)
    raw[0, 0], raw[1, 0] = 0x0F, 0x70
    meta = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [N, K]}
    state = {"absmax": torch.tensor([2.0]), "quant_map": layout.NF4_TABLE.clone(),
             "quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}
    w = from_bnb(raw, state).dequantize()
    assert w[0, :4].tolist() == [-2.0, 2.0, 0.0, -2.0]


def test_nf4_quantize_error_bound():
    w = torch.randn(16, 128)
    qw = pyhappy.quantize(w, "nf4")
    gaps = (layout.NF4_TABLE[1:] - layout.NF4_TABLE[:-1]).max()
    absmax = w.view(16, 2, 64).abs().amax(-1, keepdim=True)
    err = (qw.dequantize() - w).view(16, 2, 64).abs()
    assert (err <= gaps / 2 * absmax + 1e-6).all()
    _, state = qw.to_bnb()
    assert from_bnb(*qw.to_bnb()).codes()[0].equal(qw.codes()[0]) and "absmax" in state


def test_nf4_errors():
    with pytest.raises(ValueError, match="multiple of blocksize"):
        quantize_nf4(torch.randn(4, 96))
    qw = pyhappy.quantize(torch.randn(4, 64), "nf4")
    packed, state = qw.to_bnb()
    with pytest.raises(ValueError, match="bytes"):
        from_bnb(packed[:-1], state)
    bad = dict(state)
    meta = json.loads(bytes(bad["quant_state.bitsandbytes__nf4"].tolist()).decode())
    meta["quant_type"] = "fp4"
    del bad["quant_state.bitsandbytes__nf4"]
    bad["quant_state.bitsandbytes__fp4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="nf4"):
        from_bnb(packed, bad)
    with pytest.raises(ValueError, match="not available for nf4"):
        pyhappy.quantize(torch.randn(4, 64), "nf4", method="gptq")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bitsandbytes_bit_exact(dtype, double_quant):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(48, 256).to(dtype)
    packed, st = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    want = bnb_f.dequantize_4bit(packed, st)
    qw = QuantizedWeight.from_bnb(packed, st)
    assert qw.dequantize().dtype == dtype and torch.equal(qw.dequantize(), want)
    if not double_quant:
        mine = quantize_nf4(w)
        assert torch.equal(mine.data["qdata"], qw.data["qdata"]) and torch.equal(mine.data["absmax"], qw.data["absmax"])
    p2, d2 = qw.to_bnb()
    d1 = st.as_dict(packed=True)
    assert torch.equal(p2, packed) and list(d1) == list(d2)
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    st2 = bnb_f.QuantState.from_dict(d2, device="cpu")
    assert torch.equal(bnb_f.dequantize_4bit(p2, st2), want)
    # the keys transformers writes into a model's state dict
    sd = {"proj.weight": packed, **{f"proj.weight.{k}": v for k, v in d1.items()}}
    assert torch.equal(from_bnb_state_dict(sd, "proj.").dequantize(), want)


# ---- INT4 / INT3, GPTQ -----------------------------------------------------------------------------


def bitloop_pack(values, bits):
    """Independent oracle: GPTQ packing one bit at a time (value i of a column -> bits i*b .. i*b+b-1)."""
    R, C = values.shape
    words = [[0] * C for _ in range(R * bits // 32)]
    for i in range(R):
        for c in range(C):
            v = int(values[i, c])
            for j in range(bits):
                pos = i * bits + j
                words[pos // 32][c] |= ((v >> j) & 1) << (pos % 32)
    t = torch.tensor(words, dtype=torch.int64)
    return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)


def make_gptq(bits, K, N, gs, fmt="gptq", act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (K, N), generator=g)
    z = torch.randint(0, 2**bits, (K // gs, N), generator=g)
    stored = (z - 1) % 2**bits if fmt == "gptq" else z
    scales = (torch.rand(K // gs, N, generator=g) * 0.02 + 0.001).half()
    g_idx = (torch.randperm(K, generator=g) // gs if act_order else torch.arange(K) // gs).int()
    ck = {"qweight": bitloop_pack(q, bits), "qzeros": bitloop_pack(stored.t(), bits).t().contiguous(),
          "scales": scales, "g_idx": g_idx}
    dense = ((q - z[g_idx.long()]).float() * scales.float()[g_idx.long()]).t()  # GPTQ formula, [N, K]
    return ck, dense


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_import_matches_formula_and_exports_bit_exact(bits, fmt, act_order):
    K, N, gs = 128, 32, 32
    ck, dense = make_gptq(bits, K, N, gs, fmt, act_order)
    qw = QuantizedWeight.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], ck["g_idx"], bits=bits, group_size=gs,
                                   checkpoint_format=fmt)
    assert qw.format == f"int{bits}" and (qw.perm is not None) == act_order
    assert torch.equal(qw.dequantize(torch.float32), dense)
    out = to_gptq(qw)
    for k in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(out[k], ck[k]), k
    assert out["bits"] == bits and out["group_size"] == gs


def test_gptq_errors():
    ck, _ = make_gptq(4, 128, 32, 32)
    with pytest.raises(ValueError, match="bits"):
        QuantizedWeight.from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], bits=2)
    with pytest.raises(ValueError, match="qweight"):
        from_gptq(ck["qweight"].float(), ck["qzeros"], ck["scales"], group_size=32)
    with pytest.raises(ValueError, match="scales"):
        from_gptq(ck["qweight"], ck["qzeros"], ck["scales"][:2], group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], group_size=48)
    with pytest.raises(ValueError, match="g_idx"):
        from_gptq(ck["qweight"], ck["qzeros"], ck["scales"], torch.zeros(128, dtype=torch.int32), group_size=32)


@pytest.mark.parametrize("fmt", ["int4", "int3"])
def test_rtn_error_bound_and_constant_groups(fmt):
    w = torch.randn(16, 128)
    w[0, :32] = 0.5  # a constant group
    w[1, :32] = 0.0  # an all-zero group
    qw = pyhappy.quantize(w, fmt, group_size=32)
    codes, scales, zeros = qw.codes()
    err = (qw.dequantize() - w).abs().view(16, 4, 32)
    assert (err <= scales.unsqueeze(-1) / 2 + 1e-6).all()
    assert torch.equal(qw.dequantize()[1, :32], torch.zeros(32))
    assert torch.isfinite(qw.dequantize()).all()


def test_custom_quantizer_callable():
    def sign_quantizer(w, bits, group_size, calib):
        N, K = w.shape
        codes = (w > 0).to(torch.uint8) * (2**bits - 1)
        s = w.abs().view(N, -1, group_size).mean(-1) * 2 / (2**bits - 1)
        return codes, s, torch.full_like(s, 2 ** (bits - 1) - 1 if bits == 4 else 3).round()

    qw = pyhappy.quantize(torch.randn(8, 64), "int4", 32, method=sign_quantizer)
    assert qw.format == "int4" and qw.shape == (8, 64)
    with pytest.raises(ValueError, match="quantizer must return"):
        pyhappy.quantize(torch.randn(8, 64), "int4", 32, method=lambda w, **kw: w)


# ---- accuracy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", ["gaussian", "student_t3"])
def test_sqnr_report(dist, capsys):
    torch.manual_seed(0)
    N, K = 256, 512
    if dist == "gaussian":
        w = torch.randn(N, K)
    else:
        w = torch.distributions.StudentT(3.0).sample((N, K))
    got = {}
    for fmt, gs in (("nf4", 64), ("int4", 128), ("int4", 32), ("int3", 128), ("int3", 32)):
        got[f"{fmt}/g{gs}"] = sqnr_db(pyhappy.quantize(w, fmt, gs).dequantize(), w)
    with capsys.disabled():
        print(f"\nSQNR dB ({dist}): " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()))
    # Floors ~1 dB under what this test measured (seed 0): Gaussian nf4/g64 20.7, int4/g128 19.9,
    # int4/g32 21.8, int3/g128 13.3, int3/g32 15.2; Student-t(3) 18.2, 15.6, 19.8, 9.6, 13.5.
    floors = {
        "gaussian": {"nf4/g64": 19.5, "int4/g128": 18.5, "int4/g32": 20.5, "int3/g128": 12.0, "int3/g32": 14.0},
        "student_t3": {"nf4/g64": 17.0, "int4/g128": 14.5, "int4/g32": 18.5, "int3/g128": 8.5, "int3/g32": 12.5},
    }[dist]
    for k, v in got.items():
        assert v > floors[k], (k, v)
    assert got["int4/g32"] > got["int4/g128"] and got["int3/g32"] > got["int3/g128"]
    assert got["int4/g128"] > got["int3/g128"] + 4


# ---- GPTQ / OPTQ -----------------------------------------------------------------------------------


def _calibration(n, K, seed):
    """Correlated inputs with uneven feature scales, as real activations are: X = Z L diag(s)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(K, K, generator=torch.Generator().manual_seed(99)) / K**0.5
    s = torch.exp(torch.randn(K, generator=torch.Generator().manual_seed(98)))
    return (torch.randn(n, K, generator=g) @ L) * s


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_output_error(bits, capsys):
    N, K, gs = 48, 256, 64
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    X, Xtest = _calibration(1024, K, 2), _calibration(1024, K, 3)
    fmt = f"int{bits}"

    def out_err(qw):
        return ((Xtest @ (W - qw.dequantize()).t()) ** 2).mean().item()

    rtn = out_err(pyhappy.quantize(W, fmt, gs))
    gptq = out_err(pyhappy.quantize(W, fmt, gs, method="gptq", calib=X))
    qa = pyhappy.quantize(W, fmt, gs, method="gptq", calib=X, act_order=True)
    gptq_ao = out_err(qa)
    with capsys.disabled():
        print(f"\n{fmt} held-out output MSE: rtn {rtn:.4g}, gptq {gptq:.4g} ({gptq / rtn:.2f}x), "
              f"gptq act-order {gptq_ao:.4g} ({gptq_ao / rtn:.2f}x)")
    # Measured here (seeds fixed): int3 0.76x / 0.32x (act-order), int4 0.68x / 0.30x of RTN's error.
    assert gptq < 0.85 * rtn
    assert gptq_ao < 0.5 * rtn and qa.perm is not None
    # the act-order weight runs through the op like any other (5 rows: the decode path)
    x = Xtest[:5]
    want = x.double() @ qa.dequantize(torch.float64).t()
    with pyhappy.backends.force("reference"):
        torch.testing.assert_close(pyhappy.ops.quant_linear(x, qa).double(), want, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(pyhappy.ops.quant_linear(x, qa).double(), want, atol=1e-3, rtol=1e-4)


def test_gptq_errors():
    W = torch.randn(8, 64)
    with pytest.raises(ValueError, match="calib"):
        pyhappy.quantize(W, "int4", 32, method="gptq")
    with pytest.raises(ValueError, match="calib"):
        pyhappy.quantize(W, "int4", 32, method="gptq", calib=torch.randn(10, 32))
    with pytest.raises(ValueError, match="damp"):
        pyhappy.quantize(W, "int3", 32, method="gptq", calib=torch.randn(10, 64), damp=0.0)
