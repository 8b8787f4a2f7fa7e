"""Hardening across op families: bad input named, atomic saves, NaN propagation, bitwise determinism,
concurrency. (Per-op error tests live with each op; this file is the cross-cutting table.)"""

from __future__ import annotations

import json
import os
import re
import threading

import pytest
import torch
from torch import nn

import pyhappy
from pyhappy import backends
from pyhappy.nn import LoRALinear, QLoRALinear, SparseDeltaLinear, TTLinear
from pyhappy.quant import QuantizedWeight

import helpers
from helpers import HAS_CPP

needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="pyhappy._C not built")


def _lora_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    pyhappy.inject(m, ["0", "2"], r=4, alpha=8)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return m


def _state(m):
    import copy

    return copy.deepcopy(m.state_dict())


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _same_state(a, b):
    return _same(dict(a), dict(b))


# ------------------------------------------------------------------------------------------------
# bad input: every public entry point raises a clear error naming what is wrong
# ------------------------------------------------------------------------------------------------

_x, _W = torch.randn(3, 64), torch.randn(16, 64)
_A, _B = torch.randn(4, 64), torch.randn(16, 4)
BAD_INPUTS = [
    ("lora_linear x dtype", lambda: pyhappy.ops.lora_linear(_x.int(), _W, None, _A, _B, 1.0), "x"),
    ("lora_linear rank mismatch", lambda: pyhappy.ops.lora_linear(_x, _W, None, _A, _B[:, :3], 1.0), "lora_B"),
    ("lora_linear bias shape", lambda: pyhappy.ops.lora_linear(_x, _W, torch.randn(5), _A, _B, 1.0), "bias"),
    ("lora_linear dropout", lambda: pyhappy.ops.lora_linear(_x, _W, None, _A, _B, 1.0, dropout_p=1.5), "dropout_p"),
    ("lora_linear device", lambda: pyhappy.ops.lora_linear(_x, _W, None, _A.to("meta"), _B, 1.0), "lora_A"),
    ("LoRALinear r", lambda: LoRALinear.from_linear(nn.Linear(8, 8), r=0), "r"),
    ("LoRALinear not a linear", lambda: LoRALinear.from_linear(nn.Conv1d(2, 2, 1), r=2), "linear"),
    ("quantize format", lambda: pyhappy.quantize(_W, "int5", 32), "format"),
    ("quantize group size", lambda: pyhappy.quantize(_W, "int4", 48), "group_size"),
    ("quantize NaN weight", lambda: pyhappy.quantize(_W.masked_fill(_W > 2, float("nan")), "int4", 32), "weight"),
    ("gptq bits", lambda: QuantizedWeight.from_gptq(torch.zeros(8, 16, dtype=torch.int32), None, None, bits=2),
     "bits"),
    ("bnb quant_state", lambda: QuantizedWeight.from_bnb(torch.zeros(16, 1, dtype=torch.uint8), 3), "quant_state"),
    ("quant_linear qweight", lambda: pyhappy.ops.quant_linear(_x, _W), "qweight"),
    ("quant_linear K", lambda: pyhappy.ops.quant_linear(torch.randn(3, 32), pyhappy.quantize(_W, "int4", 32)), "K"),
    ("sparse unsorted", lambda: pyhappy.ops.sparse_delta_linear(_x, _W, None, torch.randn(2),
                                                                 torch.tensor([9, 3], dtype=torch.int32)), "sorted"),
    ("sparse duplicate", lambda: pyhappy.ops.sparse_delta_linear(_x, _W, None, torch.randn(2),
                                                                  torch.tensor([3, 3], dtype=torch.int32)), "duplicate"),
    ("sparse out of range", lambda: pyhappy.ops.sparse_delta_linear(_x, _W, None, torch.randn(1),
                                                                     torch.tensor([16 * 64], dtype=torch.int32)),
     "out of range"),
    ("sparse int64 indices", lambda: pyhappy.ops.sparse_delta_linear(_x, _W, None, torch.randn(1),
                                                                      torch.tensor([3])), "int32"),
    ("sparse N*K >= 2^31", lambda: pyhappy.ops.sparse_delta_linear(torch.randn(1, 65536), None, None, torch.randn(1),
                                                                    torch.tensor([0], dtype=torch.int32), N=32768),
     "2\\^31"),
    ("SparseDeltaLinear density", lambda: SparseDeltaLinear.from_linear(nn.Linear(8, 8), density=1.5), "density"),
    ("TTLinear form", lambda: TTLinear.from_linear(nn.Linear(16, 16), form="cube"), "form"),
    ("inject no match", lambda: pyhappy.inject(nn.Sequential(nn.Linear(4, 4)), ["nope"]), "target_modules"),
    ("inject adapter", lambda: pyhappy.inject(nn.Sequential(nn.Linear(4, 4)), ["0"], adapter="dora"), "adapter"),
    ("inject quantize", lambda: pyhappy.inject(nn.Sequential(nn.Linear(64, 64)), ["0"], quantize="fp8"), "quantize"),
    ("QLoRA group size", lambda: QLoRALinear.from_linear(nn.Linear(64, 8), "int4", group_size=40), "group_size"),
]


@pytest.mark.parametrize("name,call,names", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(name, call, names):
    with pytest.raises((ValueError, TypeError, RuntimeError, IndexError)) as e:
        call()
    assert re.search(names, str(e.value), re.I), f"{name}: {e.value}"


def test_failed_adapter_loads_change_no_weight(tmp_path):
    m = _lora_model()
    pyhappy.save_peft_adapter(m, tmp_path / "ok")
    base = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    before = _state(base)
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    weights = (tmp_path / "ok" / "adapter_model.safetensors").read_bytes()
    broken = {
        "corrupt config": ("{not json", weights),
        "config r mismatch": (json.dumps({**cfg, "r": 5}), weights),
        "truncated weights": (json.dumps(cfg), weights[: len(weights) // 2]),
        "weights header garbage": (json.dumps(cfg), b"\xff" * 64),
        "targets absent from the model": (json.dumps({**cfg, "target_modules": ["9"]}), weights),
    }
    for what, (c, w) in broken.items():
        d = tmp_path / what.replace(" ", "_")
        d.mkdir()
        (d / "adapter_config.json").write_text(c)
        (d / "adapter_model.safetensors").write_bytes(w)
        with pytest.raises((ValueError, TypeError, RuntimeError, KeyError, json.JSONDecodeError)):
            pyhappy.load_peft_adapter(base, d)
        assert _same_state(before, _state(base)), f"{what}: the failed load changed the model"
        assert all(type(mod) in (nn.Linear, nn.ReLU) for mod in base), what


def test_failed_sparse_delta_load_changes_nothing(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    pyhappy.inject(m, ["0", "2"], adapter="sparse", density=0.05)
    f = tmp_path / "d.safetensors"
    pyhappy.sparse.save_sparse_deltas(f, m)
    raw = f.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 7])
    before = _state(m)
    with pytest.raises((ValueError, RuntimeError)):
        pyhappy.sparse.load_sparse_deltas(tmp_path / "cut.safetensors", m)
    assert _same_state(before, _state(m))


# ------------------------------------------------------------------------------------------------
# saves are atomic: an interrupted save leaves the previous file intact and no temporary behind
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["peft_adapter", "sparse_deltas", "safetensors"])
def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch, what):
    m = _lora_model()
    sp = nn.Sequential(nn.Linear(32, 32))
    pyhappy.inject(sp, ["0"], adapter="sparse", density=0.05)
    target = {"peft_adapter": tmp_path / "adapter", "sparse_deltas": tmp_path / "d.safetensors",
              "safetensors": tmp_path / "t.safetensors"}[what]

    def save():
        if what == "peft_adapter":
            pyhappy.save_peft_adapter(m, target)
        elif what == "sparse_deltas":
            pyhappy.sparse.save_sparse_deltas(target, sp)
        else:
            pyhappy.sparse.write_safetensors(target, {"a": torch.randn(100)})

    save()
    files = sorted(target.rglob("*")) if target.is_dir() else [target]
    old = {p: p.read_bytes() for p in files}
    with torch.no_grad():  # the new save would differ
        for p in list(m.parameters()) + list(sp.parameters()):
            p.add_(1.0)
    calls = []

    def boom(fd):  # fails after the data went to the temporary file, before it replaces the old one
        calls.append(fd)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="injected"):
        save()
    assert calls
    assert {p: p.read_bytes() for p in files} == old
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(p.name for p in files), f"temporary files left behind: {left}"


# ------------------------------------------------------------------------------------------------
# NaN propagates, results are bitwise deterministic, concurrent calls agree
# ------------------------------------------------------------------------------------------------


def _op_cases():
    g = torch.Generator().manual_seed(0)
    K, N = 64, 24
    W, A, B = torch.randn(N, K, generator=g), torch.randn(4, K, generator=g), torch.randn(N, 4, generator=g)
    qw = pyhappy.quantize(W, "nf4", 32)
    qi = pyhappy.quantize(W, "int3", 32)
    q4 = pyhappy.quantize(W, "int4", 32)
    idx = torch.arange(0, N * K, 7, dtype=torch.int32)
    v = torch.randn(idx.numel(), generator=g)
    seed = torch.tensor([5])
    cores = [c for c in TTLinear.from_linear(nn.Linear(K, N), form="matrix").tt_cores]
    return {
        "lora_linear": lambda x: pyhappy.ops.lora_linear(x, W, None, A, B, 0.5, dropout_p=0.2, seed=seed),
        "quant_linear nf4": lambda x: pyhappy.ops.quant_linear(x, qw, None, A, B, 0.5),
        "quant_linear int4 base only": lambda x: pyhappy.ops.quant_linear(x, q4),
        "quant_linear int3": lambda x: pyhappy.ops.quant_linear(x, qi, None, A, B, 0.5, dropout_p=0.1, seed=seed),
        "sparse_delta_linear": lambda x: pyhappy.ops.sparse_delta_linear(x, W, None, v, idx),
        "lora_linear_multi": lambda x: pyhappy.ops.lora_linear_multi(
            x, W, None, *pyhappy.ops.stack_adapters([(A, B), (A[:2], B[:, :2])]),
            torch.tensor([1.0, 2.0]), torch.arange(x.shape[0]) % 3 - 1),
        "tt_matrix_linear": lambda x: pyhappy.ops.tt_matrix_linear(x, W, None, cores, 0.5),
    }


OPS = list(_op_cases())


@needs_cpp
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("M", [4, 40], ids=["decode", "gemm"])
@pytest.mark.parametrize("backend", ["cpp", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    not (helpers.HAS_TRITON and backends.triton_interpreting()), reason="triton interpreter unavailable"))])
def test_nan_in_the_input_reaches_the_output(op, M, backend):
    f = _op_cases()[op]
    x = torch.randn(M, 64)
    x[1, 5] = float("nan")
    with torch.no_grad(), backends.force(backend if op != "tt_matrix_linear" else None):
        y = f(x)
    assert torch.isnan(y[1]).any(), f"{op}: a NaN in x row 1 vanished"
    keep = [i for i in range(M) if i != 1]
    assert torch.isfinite(y[keep]).all(), f"{op}: the NaN leaked into other rows"


@needs_cpp
@pytest.mark.parametrize("op", OPS)
def test_cpp_results_are_bitwise_deterministic(op):
    f = _op_cases()[op]

    def step():
        x = torch.randn(33, 64, generator=torch.Generator().manual_seed(1))
        if op == "lora_linear_multi":  # inference-only op
            with torch.no_grad():
                return (f(x),)
        x.requires_grad_()
        y = f(x)
        (g,) = torch.autograd.grad(y.square().sum(), [x])
        return y.detach(), g

    a, b = step(), step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@needs_cpp
def test_ops_called_from_two_threads_agree_with_serial():
    cases = _op_cases()
    xs = [torch.randn(m, 64, generator=torch.Generator().manual_seed(m)) for m in (3, 17, 40)]
    with torch.no_grad():
        want = {(op, i): f(x) for op, f in cases.items() for i, x in enumerate(xs)}
    errors, got = [], {}

    def worker(tid):
        try:
            with torch.no_grad():
                for _ in range(10):
                    for op, f in cases.items():
                        for i, x in enumerate(xs):
                            y = f(x)
                            if not torch.equal(y, want[op, i]):
                                got[(tid, op, i)] = (y - want[op, i]).abs().max().item()
        except Exception as e:  # surfaced below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert not got, got


# ------------------------------------------------------------------------------------------------
# long runs: 1000 training steps per adapter family, resident memory flat after warm-up
# ------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.slow
@pytest.mark.parametrize("family", ["lora", "qlora", "sparse", "tt"])
def test_training_soak_has_flat_memory_and_finite_loss(family):
    from pyhappy.examples.soak import soak

    r = soak(family, steps=1000, warmup=100)
    assert r["finite"] and r["steps"] == 1000, r
    assert r["last_loss"] < r["first_loss"], r
    assert r["rss_growth_mib"] <= 8.0, f"{family}: RSS grew {r['rss_growth_mib']:.1f} MiB over 900 steps"


# ------------------------------------------------------------------------------------------------
# odd inputs every op takes: empty batch, non-contiguous x, leading batch dims, misaligned packed data
# ------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("op", OPS)
def test_empty_batch_non_contiguous_and_batched_inputs(op):
    f = _op_cases()[op]
    with torch.no_grad():
        y0 = f(torch.randn(0, 64))
        assert y0.shape == (0, 24)
        xt = torch.randn(64, 9).t()  # non-contiguous [9, 64]
        torch.testing.assert_close(f(xt), f(xt.contiguous()), atol=1e-5, rtol=1e-5)
        if op != "lora_linear_multi":  # per-row adapter indices are 1-D
            xb = torch.randn(2, 5, 64)
            torch.testing.assert_close(f(xb), f(xb.reshape(10, 64)).reshape(2, 5, 24), atol=1e-5, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("fmt", ["nf4", "int4", "int3"])
def test_misaligned_packed_buffers(fmt):
    from pyhappy.ops.quant_linear import packed_args

    qw = pyhappy.quantize(torch.randn(24, 128), fmt, 32)
    qd, sc, zr, fm, n, gs = packed_args(qw)
    raw = torch.empty(qd.numel() + 1, dtype=torch.uint8)
    odd = raw[1:].view(qd.shape)  # contiguous, one byte off any alignment
    odd.copy_(qd)
    assert odd.data_ptr() % 2 == 1
    for M in (3, 40):  # decode kernel and GEMM path
        x = torch.randn(M, 128)
        want = torch.ops.pyhappy.quant_linear_cpu(x, qd, sc, zr, fm, n, gs, None, None, None, None, 1.0, 0.0, None)[0]
        got = torch.ops.pyhappy.quant_linear_cpu(x, odd, sc, zr, fm, n, gs, None, None, None, None, 1.0, 0.0, None)[0]
        assert torch.equal(got, want)
    if helpers.has_cpp_op("quant_decode"):
        x = torch.randn(3, 128)
        assert torch.equal(torch.ops.pyhappy.quant_decode(x, odd, sc, zr, fm, n, gs, None, None, None, None, None, 0.0),
                           torch.ops.pyhappy.quant_decode(x, qd, sc, zr, fm, n, gs, None, None, None, None, None, 0.0))


@needs_cpp
def test_quant_linear_property_backends_agree():
    from hypothesis import example, given, strategies as st

    # A single output that cancels (found by hypothesis in CI): its error must be judged against the
    # magnitude of the terms it sums, not against its own small value.
    @example(M=1, N=1, KB=1, gmul=2, fmt="nf4", bf16=False, lora=False, grads=set(), transposed=False, seed=0,
             triton=False)
    @given(M=st.integers(0, 40), N=st.integers(1, 40), KB=st.integers(1, 6), gmul=st.sampled_from([1, 2]),
           fmt=st.sampled_from(["nf4", "int4", "int3"]), bf16=st.booleans(), lora=st.booleans(),
           grads=st.sets(st.sampled_from(["x", "A", "B"])), transposed=st.booleans(), seed=st.integers(0, 999),
           triton=st.booleans() if helpers.HAS_TRITON and backends.triton_interpreting() else st.just(False))
    def run(M, N, KB, gmul, fmt, bf16, lora, grads, transposed, seed, triton):
        K = 32 * KB * gmul
        dt = torch.bfloat16 if bf16 else torch.float32
        g = torch.Generator().manual_seed(seed)
        qw = pyhappy.quantize(torch.randn(N, K, generator=g), fmt, 32 * gmul)
        x = (torch.randn(K, M, generator=g).t() if transposed else torch.randn(M, K, generator=g)).to(dt)
        A = (torch.randn(3, K, generator=g) / K**0.5).to(dt) if lora else None
        B = torch.randn(N, 3, generator=g).to(dt) if lora else None
        gout = torch.randn(M, N, generator=g)  # a fixed upstream gradient: the backends' backward math alone
        Wd = qw.dequantize().double()
        mag = x.double().abs() @ Wd.abs().t()
        if lora:
            mag = mag + 0.5 * (x.double().abs() @ A.double().abs().t()) @ B.double().abs().t()
        outs = {}
        # Triton in fp32 only here: its bf16 products round differently (tested by SQNR in test_quant_linear)
        for be in ("cpp", "reference") + (("triton",) if triton and not bf16 else ()):
            xi = x.clone().requires_grad_("x" in grads)
            Ai = None if A is None else A.clone().requires_grad_("A" in grads)
            Bi = None if B is None else B.clone().requires_grad_("B" in grads)
            with backends.force(be):
                y = pyhappy.ops.quant_linear(xi, qw, None, Ai, Bi, 0.5)
                leaves = [t for t in (xi, Ai, Bi) if t is not None and t.requires_grad]
                gr = torch.autograd.grad((y.float() * gout).sum(), leaves) if leaves and M else []
            outs[be] = [y.detach(), *gr]
        for be in outs:
            for i, (a, b) in enumerate(zip(outs[be], outs["reference"])):
                assert a.shape == b.shape and a.dtype == b.dtype, be
                if a.numel():
                    # y against the magnitude of its terms (|x||W|ᵀ, the rounding-error bound of the design
                    # notes); the gradients, fed the same upstream gradient, against their own norm
                    ref = mag.norm() if i == 0 else b.double().norm()
                    err = (a.double() - b.double()).norm() / ref.clamp_min(1e-12)
                    # cpp decode (M <= 16) uses int8 activations (~-40 dB); bf16 rounding ~-50 dB
                    assert err < (3e-2 if M <= 16 and be == "cpp" else 1e-2), (be, a.shape, err.item())

    run()
