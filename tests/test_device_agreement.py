"""Every kernel against its reference on the device: each Triton op (forward and backward) against the
reference backend, and the CUDA decode kernel against its lane-by-lane emulation, for every dtype
the kernels take and a few shapes each.

On a GPU these run on CUDA tensors (``bash .ci/gpu`` selects them with ``-m "gpu or device_check"``).
Without one they are the GPU check's CPU stand-ins: the Triton kernels under the interpreter and the
decode kernel's emulation, on one small shape each; they then run only when PYHAPPY_DEVICE_CHECK=1
(``bash .ci/gpu --dry-run`` sets it): the per-op test files already cover the same paths on CPU.

Agreement is measured as signal-to-quantization-noise against float64 (the reference backend on
float64 copies of the inputs): a kernel passes when it is within 6 dB of torch doing the same math in
the same dtype, or above the dtype's floor (float32 allows TF32 products on a GPU).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import pyhappy
from pyhappy import backends

import helpers

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
pytestmark = [
    pytest.mark.device_check,
    pytest.mark.skipif(not CUDA and os.environ.get("PYHAPPY_DEVICE_CHECK") != "1",
                       reason="CPU stand-in of the GPU check: runs under bash .ci/gpu --dry-run (PYHAPPY_DEVICE_CHECK=1)"),
]
_TRITON_WHY = backends.unavailable_reason("triton", DEV)
needs_triton = pytest.mark.skipif(_TRITON_WHY is not None, reason=str(_TRITON_WHY))
# The interpreter computes fp16 on the CPU too, but the GPU's three dtypes would triple the dry run.
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32, torch.bfloat16]
FLOOR_DB = {torch.float32: 50.0, torch.bfloat16: 35.0, torch.float16: 45.0}
FORMATS = ("int4", "int3", "nf4")


def shapes(on_gpu, on_cpu):
    """A few shapes on the GPU (decode, ragged, training-sized); one small one on the CPU."""
    return on_gpu if CUDA else on_cpu


def ids(shape):
    return "x".join(str(v) for v in shape)


def sqnr_db(got, want) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    noise = (got - want).pow(2).sum().item()
    signal = want.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def agree(got, same_dtype, truth, names):
    """Each output of the kernel (got) against float64 (truth), judged by torch's own same-dtype error."""
    for g, s, t, name in zip(got, same_dtype, truth, names):
        assert g is not None and g.shape == t.shape and g.device.type == DEV.type, name
        floor = FLOOR_DB[g.dtype]
        got_db, torch_db = sqnr_db(g, t), sqnr_db(s, t)
        assert got_db >= min(floor, torch_db - 6.0), \
            f"{name}: {got_db:.1f} dB against float64 (torch in {g.dtype}: {torch_db:.1f} dB; floor {floor} dB)"


def rand(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def run_three(fn, inputs, grad_of, dtype):
    """fn's outputs (and the gradients of a fixed random cotangent w.r.t. inputs[i] for i in grad_of)
    three times: Triton in dtype, the reference in dtype, the reference in float64."""
    out = []
    for backend, dt in (("triton", dtype), ("reference", dtype), ("reference", torch.float64)):
        ins = [None if t is None else t.detach().to(dt) if t.is_floating_point() else t for t in inputs]
        for i in grad_of:
            ins[i].requires_grad_(True)
        with backends.force(backend):
            y = fn(*ins)
            res = [y]
            if grad_of:
                dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(99)).to(DEV, dt)
                res += list(torch.autograd.grad(y, [ins[i] for i in grad_of], dy))
        out.append(res)
    return out


# ---- lora_linear ---------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", shapes([(1, 4096, 4096, 16), (300, 1000, 777, 8), (2048, 1024, 1536, 64)],
                                         [(5, 48, 40, 4)]), ids=ids)
def test_lora_linear_triton_matches_reference(dtype, shape):
    M, K, N, r = shape
    g = torch.Generator().manual_seed(M + N)
    inputs = [rand(g, M, K), rand(g, N, K, scale=K**-0.5), rand(g, N), rand(g, r, K, scale=K**-0.5),
              rand(g, N, r, scale=r**-0.5), rand(g, r, r, scale=r**-0.5)]
    seed = torch.tensor([5], device=DEV)

    def f(x, W, b, A, B, C):
        return pyhappy.ops.lora_linear(x, W, b, A, B, 0.5, C, 0.2, seed=seed)

    got, same, truth = run_three(f, inputs, (0, 3, 4, 5), dtype)
    agree(got, same, truth, ("y", "grad_x", "grad_A", "grad_B", "grad_C"))


# ---- lora_linear_multi ---------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", shapes([(1, 4096, 4096, 4, 16), (77, 1000, 777, 3, 8), (1024, 2048, 2048, 8, 64)],
                                         [(9, 48, 40, 3, 4)]), ids=ids)
def test_lora_linear_multi_triton_matches_reference(dtype, shape):
    from pyhappy.ops import stack_adapters

    M, K, N, L, r = shape
    g = torch.Generator().manual_seed(M + L)
    pairs = [(rand(g, r - i % 2, K, scale=K**-0.5), rand(g, N, r - i % 2, scale=r**-0.5)) for i in range(L)]
    A, B = stack_adapters(pairs)
    s = (torch.rand(L, generator=g) + 0.5).to(DEV)
    idx = torch.randint(-1, L, (M,), generator=g).to(DEV)

    def f(x, W, b, A_, B_):
        with torch.no_grad():
            return pyhappy.ops.lora_linear_multi(x, W, b, A_, B_, s, idx)

    got, same, truth = run_three(f, [rand(g, M, K), rand(g, N, K, scale=K**-0.5), rand(g, N), A, B], (), dtype)
    agree(got, same, truth, ("y",))


# ---- quant_linear (Triton) -----------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", shapes([(1, 4096, 4096, 128), (16, 1000, 1024, 64), (512, 2048, 2048, 128)],
                                         [(5, 40, 128, 64)]), ids=ids)
def test_quant_linear_triton_matches_reference(fmt, dtype, shape):
    M, N, K, gs = shape
    g = torch.Generator().manual_seed(M + N)
    qw = pyhappy.quantize(torch.randn(N, K, generator=g) * K**-0.5, fmt, gs).to(DEV)
    r = 16 if CUDA else 4
    seed = torch.tensor([3], device=DEV)

    def f(x, b, A, B):
        return pyhappy.ops.quant_linear(x, qw, b, A, B, 0.5, None, 0.1, seed=seed)

    inputs = [rand(g, M, K), rand(g, N), rand(g, r, K, scale=K**-0.5), rand(g, N, r, scale=r**-0.5)]
    got, same, truth = run_three(f, inputs, (0, 2, 3), dtype)
    agree(got, same, truth, ("y", "grad_x", "grad_A", "grad_B"))


# ---- sparse_delta_linear -------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", shapes([(1, 4096, 4096, 0.01), (300, 1000, 777, 0.05), (2048, 2048, 2048, 0.001)],
                                         [(21, 40, 24, 0.1)]), ids=ids)
def test_sparse_delta_linear_triton_matches_reference(dtype, shape):
    from pyhappy import sparse as sp
    from pyhappy.ops import sparse_delta_linear, sparse_layout

    M, K, N, density = shape
    g = torch.Generator().manual_seed(M + N)
    idx = sp.random_pattern(N, K, density, seed=M, device=DEV)
    lay = sparse_layout(idx, N, K)

    def f(x, W, b, v):
        return sparse_delta_linear(x, W, b, v, idx, lay, 0.7)

    inputs = [rand(g, M, K), rand(g, N, K, scale=K**-0.5), rand(g, N), rand(g, idx.numel())]
    got, same, truth = run_three(f, inputs, (0, 3), dtype)
    agree(got, same, truth, ("y", "grad_x", "grad_values"))


# ---- tt_linear -----------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", shapes([(1, (16, 16, 16), (16, 16, 16), 4), (512, (16, 16, 16), (16, 16, 16), 4),
                                          (4096, (8, 16, 32), (16, 16, 16), 8)],
                                         [(5, (2, 4, 4), (3, 4, 8), 3)]), ids=lambda s: str(s).replace(" ", ""))
def test_tt_linear_triton_matches_reference(dtype, shape):
    from pyhappy.ops.tt_linear import tt_matrix_linear

    M, ns, ks, rank = shape
    N, K = math.prod(ns), math.prod(ks)
    g = torch.Generator().manual_seed(M + N)
    rr = [1] + [rank] * (len(ns) - 1) + [1]
    cores = [rand(g, rr[i], ns[i], ks[i], rr[i + 1], scale=0.3) for i in range(len(ns))]

    def f(x, W, b, *cs):
        return tt_matrix_linear(x, W, b, list(cs), 0.8)

    inputs = [rand(g, M, K), rand(g, N, K, scale=K**-0.5), rand(g, N), *cores]
    got, same, truth = run_three(f, inputs, tuple(range(3, 3 + len(cores))) + (0,), dtype)
    agree(got, same, truth, ("y", *[f"grad_core{i}" for i in range(len(cores))], "grad_x"))


# ---- the CUDA decode kernel against its lane-by-lane emulation -----------------------------------

HAS_DECODE = helpers.has_cpp_op("quant_decode")
_CUDA_BUILD = bool((pyhappy._ext.build_info() or {}).get("with_cuda")) if helpers.HAS_CPP else False


@pytest.mark.skipif(not HAS_DECODE, reason="pyhappy._C without quant_decode")
@pytest.mark.skipif(CUDA and not _CUDA_BUILD, reason="pyhappy._C built without CUDA kernels")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extras", ["plain", "lora+sparse"])
@pytest.mark.parametrize("shape", shapes([(1, 4096, 4096, 128), (2, 1000, 1024, 64), (16, 300, 2048, 128)],
                                         [(3, 40, 128, 64)]), ids=ids)
def test_decode_kernel_matches_lane_emulation(fmt, dtype, extras, shape):
    """The CUDA kernel (on a GPU) and its emulation (on the CPU) on the same inputs: the same per-lane
    code, so they agree to the output's rounding; both against the dense float64 product."""
    from pyhappy import reference
    from pyhappy.ops import sparse_layout
    from pyhappy.ops.quant_linear import _decode_forward, packed_args

    M, N, K, gs = shape
    g = torch.Generator().manual_seed(M + N + K)
    qw = pyhappy.quantize(torch.randn(N, K, generator=g) * K**-0.5, fmt, gs)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    lora = sparse = None
    want = x.double() @ qw.dequantize().double().t() + bias.double()
    if extras != "plain":
        r = 8
        A = (torch.randn(r, K, generator=g) * K**-0.5).to(dtype)
        B = (torch.randn(N, r, generator=g) * r**-0.5).to(dtype)
        idx = torch.randperm(N * K, generator=g)[: max(1, N * K // 100)].sort().values.to(torch.int32)
        vals = (torch.randn(idx.numel(), generator=g) * 0.1).to(dtype)
        lora, sparse = (A, B), (sparse_layout(idx, N, K), vals, 0.75)
        dW = torch.zeros(N * K, dtype=torch.float64)
        dW[idx.long()] = vals.double()
        want = want + 0.75 * x.double() @ dW.view(N, K).t() + 0.5 * (x.double() @ A.double().t()) @ B.double().t()

    def run(dev):
        to = (lambda t: t.to(dev))
        lo = (None, None) if lora is None else tuple(map(to, lora))
        sp = None if sparse is None else (to(sparse[0]), to(sparse[1]), sparse[2])
        y, _ = _decode_forward(to(x), *packed_args(qw.to(dev)), to(bias), lo[0], lo[1], None, 0.5, 0.0, None,
                               sparse=sp)
        return y

    emulated = run(torch.device("cpu"))
    got = run(DEV)
    assert got.dtype == dtype and got.device.type == DEV.type
    err = (got.cpu().double() - emulated.double()).abs().max().item()
    ulp = torch.finfo(dtype).eps * emulated.double().abs().max().item()
    assert err <= 2 * ulp, f"kernel vs emulation: max difference {err:.3e} > 2 ulp of the largest output ({ulp:.3e})"
    # Both against float64: the output's rounding alone is ~52 dB (bf16) / ~70 dB (fp16).
    assert sqnr_db(got, want) > (40 if dtype is torch.bfloat16 else 55)
    if not CUDA:  # the stand-in: the emulation is the "kernel" itself; the float64 check above is what it proves
        assert torch.equal(got, emulated)
    _ = reference  # the dense formula above is reference.quant_linear's, written out in float64
