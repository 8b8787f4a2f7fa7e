"""Per-call cost of the layers around an op, eager fwd+bwd (``python -m benchmarks._call_overhead``).

Times one lora_linear training step (forward, then backward of a fixed gradient) three ways on the
same inputs, interleaved, medians of per-call times:
  registered  ``torch.ops.pyhappy.lora_linear``: the torch.library op and its autograd wrapper
  front       ``pyhappy.ops.lora_linear``: what users call (an autograd.Function over the same
              forward body and gradient formula, pyhappy/ops/_eager.py)
  node        ``pyhappy._C.lora_linear_step``: the same kernels and gradient formula as one C++
              autograd node (what the front runs once the tuner has decided a layer's passes)
  unfused     ``x Wᵀ + s·(x Aᵀ) Bᵀ`` as plain torch ops (PEFT's formulation)
Run with ``PYHAPPY_TUNE=off`` to time the fused kernels (tuning on lets the front pick the unfused
formulation where it is faster). Arguments: M K N r rounds (default 4 64 64 8 2000).

``python -m benchmarks._call_overhead steps threads rounds`` (default 2 60) times whole training
steps of ``pyhappy.ops.lora_linear`` with tuning on (its decisions made by six untimed calls first)
against PEFT's expression ``F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s``, r=16, M in
(1, 8, 64), K=N in (256, 512, 1024), interleaved, and prints the medians, the median paired ratio
and what served the calls (the remembered pick: "unfused", or "step:<forward>/<backward>", the C++
node with each pass's kernels).

``python -m benchmarks._call_overhead sparse_steps threads rounds`` (default 2 60) does the same for
``pyhappy.ops.sparse_delta_linear`` (1% density, x and the values trained) against what users write
today, ``F.linear(x, W.reshape(-1).index_add(0, idx, v).view(N, K), b)``, M in (1, 8, 64), K=N in
(256, 1024, 4096); what served: "unfused" (the whole step decision) or "op".

``python -m benchmarks._call_overhead decode K N format rounds`` (default 256 256 int4 3000) times one
decode row of a quantized layer in inference instead, the packed weight resident in the caches:
  module      ``QuantLinear`` (group 128; nf4: 64) called on x [1, K]
  front       ``pyhappy.ops.quant_linear(x, qweight, bias)``
  op          the C++ op ``torch.ops.pyhappy.quant_linear_cpu`` on the packed tensors
With tuning on (the default) a call whose signature was served before skips the front's checks.

``python -m benchmarks._call_overhead decode_cold K N format rounds`` (default 4096 4096 int4 300)
times the same decode row with the caches in the state a decode step leaves them: enough copies
of the layer rotated that every call streams its packed weight from memory (and finds the Python
objects it reads evicted by the previous call's stream), the variants in a random order per round:
  module, front  as above
  bare           the C++ function through pybind (``pyhappy._C.quant_linear_eager``), no checks
  stream_read    ``sum()`` over a float32 buffer of as many bytes as the packed weight
  bare_avx2      (CPUs with AVX-512) the bare call with the kernels capped at AVX2
and prints medians, each variant's paired share of the streaming read's bandwidth and its paired
time beyond the bare call.

``python -m benchmarks._call_overhead decode_levels K N format M rounds`` (default 4096 4096 int4 16
100) times ``torch.ops.pyhappy.quant_gemv_cpu`` on M rows at the CPU's SIMD level against the same
call with the kernels capped at AVX2, weight copies rotated past the last-level cache (one rotation
for both), in a random order per round, and prints the medians and the median paired ratio.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def _report(fns, rounds, run):
    for f in fns.values():
        for _ in range(20):
            run(f)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            run(f)
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"{k:<11}{statistics.median(v) * 1e6:9.1f} us")


def _shuffled_rounds(fns, warm, rounds):
    """Seconds per call of each of ``fns`` (name -> zero-argument callable): each called ``warm``
    times untimed, then ``rounds`` rounds calling every one once, in a random order per round."""
    import random

    for f in fns.values():
        for _ in range(warm):
            f()
    names = list(fns)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        random.shuffle(names)
        for k in names:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def _capped(level, fn):
    """``fn()`` with the C++ kernels capped at SIMD ``level`` (``pyhappy.set_simd_level``), the cap
    removed again after it."""
    import pyhappy

    pyhappy.set_simd_level(level)
    try:
        return fn()
    finally:
        pyhappy.set_simd_level(None)


def decode(argv):
    import pyhappy  # noqa: F401
    from pyhappy.nn import QuantLinear
    from pyhappy.ops import quant_linear
    from pyhappy.ops.quant_linear import packed_args

    K, N, fmt, rounds = (list(argv) + ["256", "256", "int4", "3000"][len(argv):])[:4]
    K, N, rounds = int(K), int(N), int(rounds)
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N), fmt, group_size=64 if fmt == "nf4" else 128)
    qw, bias, x = layer.qweight, layer.bias, torch.randn(1, K)
    op = torch.ops.pyhappy.quant_linear_cpu.default
    args = packed_args(qw)
    fns = {"module": lambda: layer(x), "front": lambda: quant_linear(x, qw, bias),
           "op": lambda: op(x, *args, bias, None, None, None, 1.0, 0.0, None, False)}
    with torch.no_grad():
        _report(fns, rounds, lambda f: f())


def decode_cold(argv):
    import pyhappy  # noqa: F401
    from pyhappy import _ext
    from pyhappy.nn import QuantLinear
    from pyhappy.ops import quant_linear
    from pyhappy.ops.quant_linear import packed_args

    from .common import copies_to_exceed_cache
    from .quant_linear import _copies

    K, N, fmt, rounds = (list(argv) + ["4096", "4096", "int4", "300"][len(argv):])[:4]
    K, N, rounds = int(K), int(N), int(rounds)
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N), fmt, group_size=64 if fmt == "nf4" else 128)
    args = packed_args(layer.qweight)
    nbytes = sum(t.numel() * t.element_size() for t in args[:3] if t is not None)
    n = copies_to_exceed_cache(nbytes, torch.device("cpu"))
    layers = [layer] + [QuantLinear.from_quantized(q, layer.bias.detach().clone())
                        for q in _copies(layer.qweight, n)[1:]]
    qws = [m.qweight for m in layers]
    bare_args = [(*packed_args(q), m.bias) for q, m in zip(qws, layers)]
    bufs = [torch.ones(nbytes // 4) for _ in range(n)]
    x = torch.randn(1, K)
    bare = _ext.load().quant_linear_eager
    turn = [0]

    def nxt():
        # one rotation for every variant: each call reads the copy after the previous call's, so
        # none finds in the cache the copy another variant just streamed
        turn[0] = (turn[0] + 1) % n
        return turn[0]

    fns = {"module": lambda: layers[nxt()](x),
           "front": lambda: (lambda i: quant_linear(x, qws[i], layers[i].bias))(nxt()),
           "bare": lambda: bare(x, *bare_args[nxt()], None, None, None, 1.0, 0.0, None, False, False),
           "stream_read": lambda: bufs[nxt()].sum()}
    if "avx512" in _ext.load().simd_level():  # the same call capped at AVX2, for the AVX-512 kernels' gain
        fns["bare_avx2"] = lambda bare_call=fns["bare"]: _capped("avx2", bare_call)
    with torch.no_grad():
        times = _shuffled_rounds(fns, 2 * n, rounds)
    print(f"{fmt} M=1 K={K} N={N}, {n} copies of {nbytes / 2**20:.1f} MiB rotated, {rounds} rounds")
    for k, v in times.items():
        share = 100.0 / statistics.median(a / b for a, b in zip(v, times["stream_read"]))
        beyond = statistics.median(a - b for a, b in zip(v, times["bare"]))
        print(f"{k:<12}{statistics.median(v) * 1e6:9.1f} us   {share:5.1f}% of stream_read   "
              f"{beyond * 1e6:+7.1f} us beyond bare")


def decode_levels(argv):
    import pyhappy  # noqa: F401
    from pyhappy import _ext
    from pyhappy.ops.quant_linear import packed_args

    from .common import copies_to_exceed_cache
    from .quant_linear import _copies, _packed_bytes, _weights

    K, N, fmt, M, rounds = (list(argv) + ["4096", "4096", "int4", "16", "100"][len(argv):])[:5]
    K, N, M, rounds = int(K), int(N), int(M), int(rounds)
    gs = 64 if fmt == "nf4" else 128
    top = "avx512" if "avx512" in _ext.load().simd_level() else "avx2"
    _, qw = _weights(N, K, fmt, gs, 0)
    n = copies_to_exceed_cache(_packed_bytes(N, K, fmt, gs), torch.device("cpu"))
    copies = [packed_args(q) for q in _copies(qw, n)]
    x = torch.randn(M, K)
    turn = [0]

    def run():
        turn[0] = (turn[0] + 1) % n
        return torch.ops.pyhappy.quant_gemv_cpu(x, *copies[turn[0]], False)
    fns = {top: run, "avx2": lambda: _capped("avx2", run)} if top != "avx2" else {"avx2": run}
    times = _shuffled_rounds(fns, 2 * n, rounds)
    print(f"{fmt} M={M} K={K} N={N}, {n} copies rotated, {rounds} rounds: " +
          ", ".join(f"{k} {statistics.median(v) * 1e6:.0f} us" for k, v in times.items()) +
          (f"; paired {top}/avx2 {statistics.median(a / b for a, b in zip(times[top], times['avx2'])):.3f}"
           if top != "avx2" else ""))


def _step_row(M, KN, fns, rounds, served):
    """One row of ``steps`` / ``sparse_steps``: the decisions made by six untimed calls of
    fns["pyhappy"], then the rounds; medians, the median paired ratio against the other variant and
    ``served()``, what served the calls."""
    for _ in range(6):
        fns["pyhappy"]()
    times = _shuffled_rounds(fns, 2, rounds)
    other = next(k for k in fns if k != "pyhappy")
    ratio = statistics.median(a / c for a, c in zip(times["pyhappy"], times[other]))
    print(f"M={M:<3} K=N={KN:<5} pyhappy {statistics.median(times['pyhappy']) * 1e6:9.1f} us   "
          f"{other} {statistics.median(times[other]) * 1e6:9.1f} us   ratio {ratio:.3f}   {served()}")


def steps(argv):
    import pyhappy  # noqa: F401
    from pyhappy import _tune
    from pyhappy.ops import lora_linear

    threads, rounds = [int(a) for a in (list(argv) + ["2", "60"][len(argv):])[:2]]
    torch.set_num_threads(threads)
    F = torch.nn.functional
    print(f"lora_linear fwd+bwd, r=16, fp32, {threads} thread(s), tuning cache {_tune.cache_path()}")
    for M in (1, 8, 64):
        for KN in (256, 512, 1024):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(M, KN, generator=g, requires_grad=True)
            W, b = torch.randn(KN, KN, generator=g) / 32, torch.randn(KN, generator=g)
            A = (torch.randn(16, KN, generator=g) / 32).requires_grad_()
            B = (torch.randn(KN, 16, generator=g) / 32).requires_grad_()
            dy = torch.randn(M, KN, generator=g)
            fns = {"pyhappy": lambda: torch.autograd.grad(lora_linear(x, W, b, A, B, 2.0), [x, A, B], dy),
                   "peft": lambda: torch.autograd.grad(F.linear(x, W, b) + F.linear(F.linear(x, A), B) * 2.0,
                                                       [x, A, B], dy)}
            _step_row(M, KN, fns, rounds,
                      lambda: _tune.pick_hit("lora_linear", _tune.arg_signature(x, W, b, A, B, None)) or "op")


def sparse_steps(argv):
    import pyhappy  # noqa: F401
    from pyhappy import _tune
    from pyhappy import sparse as sp
    from pyhappy.ops import sparse_delta_linear, sparse_layout

    threads, rounds = [int(a) for a in (list(argv) + ["2", "60"][len(argv):])[:2]]
    torch.set_num_threads(threads)
    F = torch.nn.functional
    print(f"sparse_delta_linear fwd+bwd, 1% density, fp32, {threads} thread(s), tuning cache {_tune.cache_path()}")
    for M in (1, 8, 64):
        for KN in (256, 1024, 4096):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(M, KN, generator=g, requires_grad=True)
            W, b = torch.randn(KN, KN, generator=g) / 32, torch.randn(KN, generator=g)
            idx = sp.random_pattern(KN, KN, 0.01, seed=0)
            lay, flat = sparse_layout(idx, KN, KN), idx.long()
            v = (torch.randn(idx.numel(), generator=g) * 0.01).requires_grad_()
            dy = torch.randn(M, KN, generator=g)
            fns = {"pyhappy": lambda: torch.autograd.grad(sparse_delta_linear(x, W, b, v, idx, lay), [x, v], dy),
                   "users": lambda: torch.autograd.grad(
                       F.linear(x, W.reshape(-1).index_add(0, flat, v).view(KN, KN), b), [x, v], dy)}
            _step_row(M, KN, fns, rounds, lambda: "unfused" if _tune.unfused_hit(
                "sparse_delta_linear", (_tune.arg_signature(x, W, b, v, idx, lay), KN, 1.0)) else "op")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["steps"]:
        return steps(argv[1:])
    if argv[:1] == ["sparse_steps"]:
        return sparse_steps(argv[1:])
    if argv[:1] == ["decode"]:
        return decode(argv[1:])
    if argv[:1] == ["decode_cold"]:
        return decode_cold(argv[1:])
    if argv[:1] == ["decode_levels"]:
        return decode_levels(argv[1:])
    import pyhappy  # (registers the ops)
    from pyhappy.ops import lora_linear

    M, K, N, r, rounds = [int(a) for a in argv] or [4, 64, 64, 8, 2000]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W = torch.randn(N, K, generator=g)
    A = torch.randn(r, K, generator=g, requires_grad=True)
    B = torch.randn(N, r, generator=g, requires_grad=True)
    dy = torch.ones(M, N)
    fns = {"registered": lambda: torch.ops.pyhappy.lora_linear(x, W, None, A, B, None, 0.5, 0.0, None)[0],
           "front": lambda: lora_linear(x, W, None, A, B, 0.5),
           "node": lambda: pyhappy._ext.load().lora_linear_step(x, W, None, A, B, None, 0.5, 0, 0),
           "unfused": lambda: x @ W.t() + (x @ A.t()) @ B.t() * 0.5}
    _report(fns, rounds, lambda f: f().backward(dy))


if __name__ == "__main__":
    main()
