"""Shared machinery of the benchmark suite: cases, timing, machine limits, environment, reports.

A family script (benchmarks/<family>.py) only *describes* its cases (``Case``: shapes, how to
build the inputs and the competing variants, how much work each variant does); everything else
lives here and is identical for every family:

* timing. CPU: each variant is warmed up, then timed in *rounds*; one round calls every variant
  once (a call is repeated ``inner`` times when it is shorter than a few ms), the order rotating
  from round to round, so that a drift of the shared machine (another process, frequency change)
  hits all variants alike. Reported: median, IQR and min of the per-call times, and each ratio
  primary/baseline as the median of the per-round *paired* ratios (more robust to drift than the
  ratio of medians) with a distribution-free 95% interval of that median. While the interval of
  pyhappy's ratio to the unfused formulation is too wide, *pair rounds* time those two only.
  CUDA: ``triton.testing.do_bench`` (it flushes L2 before every run and syncs), called
  round-robin over the variants for a few rounds; without triton a torch.cuda.Event loop.
* machine limits, measured in the same run: memory bandwidth (an out-of-cache read and copy) and
  matmul throughput (a large GEMM per dtype). ``% of limit`` of a variant is its roofline time
  max(flops / peak_flops[dtype], bytes / bandwidth) divided by its measured median time.
* the environment record saved with every result, the console table, JSON / markdown / PNG.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import importlib.util
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

PASSES = ("fwd", "fwd+bwd")


# ---- what a family describes -------------------------------------------------------------------


@dataclass
class Variant:
    """One competitor of a case. ``fn()`` runs it once and returns a tensor or a tuple of tensors
    (compared against the primary's for the variants a case lists in ``same_result``).
    ``grads``: tensors whose ``.grad`` is reset to None before every call (as ``zero_grad`` does),
    so that backward passes never accumulate."""

    fn: Callable[[], object]
    grads: Sequence[torch.Tensor] = ()


@dataclass
class Case:
    """One benchmark case: an op at one shape / dtype / pass, with its competing variants.

    variants: names in display order, the primary (pyhappy) first; ``setup()`` builds the inputs
        and returns ``{name: Variant}`` for exactly these names (it is called when the case runs,
        and everything it allocated is freed afterwards).
    work: ``{name: (flops, bytes)}`` the minimal work of each variant's computation, for the
        roofline (bytes: compulsory memory traffic, every operand read and result written once).
    same_result: variants that compute the same function as the primary (checked once).
    budget_s: seconds of timed rounds aimed at on CPU (clamped to [min_rounds, max_rounds]).
    extended: a secondary shape, run by ``--full`` only.
    sweeps: ``(title, param)`` pairs: the case is one point of the sweep ``title`` over ``param``
        (plotted when matplotlib is importable).
    ci_pair: the two variants whose paired ratio full CPU runs narrow with pair rounds
        (``time_variants_cpu``'s ``until_ci``); empty: the first of ``UNFUSED_PAIRS`` the case has.
    """

    op: str
    shape: str
    params: dict
    dtype: torch.dtype
    pass_: str
    variants: tuple
    setup: Callable[[], dict]
    work: dict
    same_result: tuple = ()
    budget_s: float = 4.0
    min_rounds: int = 5
    max_rounds: int = 25
    sweeps: tuple = ()
    headline: bool = False
    note: str = ""
    extended: bool = False  # only in ``pyhappy-bench --full`` (keeps the default run to the headline cases)
    ci_pair: tuple = ()

    @property
    def primary(self) -> str:
        return self.variants[0]

    def label(self) -> str:
        return f"{self.op} {self.shape} {dtype_name(self.dtype)} {self.pass_}"


def extended(case: Case) -> Case:
    """``case`` run only by ``pyhappy-bench --full``."""
    return dataclasses.replace(case, extended=True)


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def zero_grads(tensors):
    for t in tensors:
        t.grad = None


# ---- caches and rotation of inputs -------------------------------------------------------------


def last_level_cache_bytes(device: torch.device) -> int:
    """L3 of the CPU (sysfs, else 32 MiB) or L2 of the GPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in base.glob("index*"):
            size = (idx / "size").read_text().strip()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
            val = int(size[:-1]) * mult if size[-1:] in "KMG" else int(size)
            best = max(best, val)
    except (OSError, ValueError):
        pass
    return best or 32 * 2**20


def copies_to_exceed_cache(bytes_per_copy: int, device: torch.device, factor: float = 2.0, cap: int = 64) -> int:
    """How many copies of a set of operands to rotate through so that their total size is at least
    ``factor`` x the last-level cache: consecutive calls then stream from memory, not the cache."""
    need = math.ceil(factor * last_level_cache_bytes(device) / max(1, bytes_per_copy))
    return int(min(cap, max(2, need)))


def decode_copies(M: int, decode_m: int, copy_bytes: int, device: torch.device, what: str) -> tuple[int, str]:
    """(copies, note): at decode sizes (``M <= decode_m``, where a layer streams its weights) enough
    copies of the operands (``copy_bytes`` each) to rotate through that each call reads them from
    memory, and the note the result rows carry about it (``what``: the operands, e.g. "W,b,A,B");
    above, (1, ""): a large call's own traffic already exceeds the cache."""
    n = copies_to_exceed_cache(copy_bytes, device) if M <= decode_m else 1
    if n == 1:
        return n, ""
    return n, f"M<={decode_m}: {n} copies of {what} rotated ({n * copy_bytes / 2**20:.0f} MiB in total)"


def seeded_rnd(device: torch.device, dtype: torch.dtype, seed: int):
    """``rnd(*shape, std=1.0, grad=False)``: N(0, std²) tensors drawn from one CPU generator seeded
    with ``seed`` (the same numbers on every device), then moved to ``device`` / ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, std=1.0, grad=False):
        t = (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)
    return rnd


class Rotation:
    """Cycles through ``copies``. Variants reading the same copies share one ``Rotation``: each call
    then takes the copy after the one the previous call read, whichever variant made it (with a
    rotation per variant, the next variant's call would read the copy the last call just left in
    the cache)."""

    _live: "weakref.WeakSet[Rotation]" = weakref.WeakSet()

    def __init__(self, copies):
        self.copies = copies
        self.restart()
        Rotation._live.add(self)

    def next(self):
        return next(self._it)

    def restart(self):
        self._it = itertools.cycle(self.copies)


def restart_rotations():
    """Restarts every live ``Rotation`` at its first copy: before each variant's checked first call,
    so that the variants compared for ``same_result`` read the same copies."""
    for r in list(Rotation._live):
        r.restart()


# ---- timing ------------------------------------------------------------------------------------


def _stats(samples_s):
    s = sorted(samples_s)
    n = len(s)

    def q(p):
        if n == 1:
            return s[0]
        pos = p * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return {"median_s": q(0.5), "q1_s": q(0.25), "q3_s": q(0.75), "iqr_s": q(0.75) - q(0.25), "min_s": s[0], "n": n}


def _median(vals):
    return _stats(vals)["median_s"]


def median_ci_ranks(n: int, level: float = 0.95) -> tuple:
    """(lo, hi, coverage): 0-based ranks of the sorted sample whose values bound a distribution-free
    confidence interval of the median of ``n`` independent draws, and the interval's exact coverage.

    The number of draws below the median is Binomial(n, 1/2) whatever the distribution (the sign
    test), so [x_(k), x_(n-1-k)] covers the median with probability 1 - 2 P(B <= k); k is the largest
    rank that keeps this at ``level`` or above. Under 6 draws even [min, max] covers less than 95%
    (1 - 2^(1-n): 94% at 5): the ranks are then 0 and n-1 and ``coverage`` says how much it holds."""
    if n < 1:
        raise ValueError("median_ci_ranks needs at least one value")

    def coverage(k):  # of [x_(k), x_(n-1-k)]: 1 - 2 P(B <= k)
        return 1.0 - 2.0 * sum(math.comb(n, j) for j in range(k + 1)) / 2.0**n

    k = 0
    while k + 1 <= (n - 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return k, n - 1 - k, coverage(k)


def median_ci95(vals):
    """Distribution-free 95% confidence interval of the median of ``vals`` (independent draws): the
    order statistics of ``median_ci_ranks`` (its coverage is below 95% under 6 values)."""
    s = sorted(vals)
    lo, hi, _ = median_ci_ranks(len(s))
    return [s[lo], s[hi]]


def _call(fn, grads):
    zero_grads(grads)
    return fn()


# The fewest paired ratios with a 95% interval of their median (6: [min, max] covers 97%; 5: 94%).
CI_MIN_ROUNDS = next(n for n in itertools.count(1) if median_ci_ranks(n)[2] >= 0.95)


def ci_too_wide(paired: Sequence[float], width: float) -> bool:
    """Whether the 95% interval of the median of the paired ratios ``paired`` is unusable: wider than
    ``width`` times that median, or resting on fewer ratios than a 95% interval needs (6). It reads the
    interval's width only, never which way the ratio lies."""
    if len(paired) < CI_MIN_ROUNDS:
        return True
    lo, hi = median_ci95(paired)
    return hi - lo > width * _median(paired)


def time_variants_cpu(variants: dict, budget_s: float, min_rounds: int, max_rounds: int,
                      warmup_s: float = 0.15, min_sample_s: float = 0.004, until_ci=None, ci_floor_s=0.0,
                      clock=time.perf_counter):
    """Interleaved CPU timing. Returns ({name: [per-call seconds, one per round]}, info).
    The first call of each variant (its warm-up) has already been made by the caller.

    Planned rounds call every variant, the order rotating, as many as fit ``budget_s`` within
    [min_rounds, max_rounds]. ``until_ci`` = (a, b, width): then *pair rounds*, which call only a and b,
    in one order throughout (a b a b ...: every call follows a call of the other variant, as every call
    of a planned round follows another variant's; a call that follows one of its own variant can run
    several % faster, the allocator's and the caches' state being its own), the first of them not the
    variant the planned rounds called last, while ``ci_too_wide`` holds for the paired ratio a/b over all
    rounds so far, up to 3 * max_rounds rounds in all, and while the rounds have taken less than twice
    ``budget_s`` or the pair rounds less than ``ci_floor_s`` seconds. A pair round costs two calls
    instead of one per variant, and puts the two calls whose ratio is judged next to each other in
    time. The samples of a and b from pair rounds come
    after those of the planned rounds: ``samples[n][:info["rounds"]]`` are the planned rounds, the
    same index being the same round for every variant. ``clock``: the timer (tests pass a fake one)."""
    names = list(variants)
    est = {}
    for n in names:
        # Further warm-up: at least two calls, more while under warmup_s; the fastest gives the
        # estimate. A variant's first calls may do one-time work (pyhappy's tuner measures a layer's
        # passes at its first call and a small layer's whole step at its second): planned from such a
        # call, a case would get min_rounds rounds whatever its budget.
        v = variants[n]
        spent, calls, best = 0.0, 0, None
        while calls < 2 or (spent < warmup_s and calls < 50):
            t0 = clock()
            _call(v.fn, v.grads)
            last = clock() - t0
            best = last if best is None else min(best, last)
            spent += last
            calls += 1
        est[n] = best
    inner = {n: max(1, int(round(min_sample_s / max(est[n], 1e-9)))) for n in names}
    round_s = sum(est[n] * inner[n] for n in names)
    rounds = int(min(max_rounds, max(min_rounds, budget_s // max(round_s, 1e-9))))
    samples = {n: [] for n in names}
    last = [None]  # the variant called last
    gc_was = gc.isenabled()
    gc.disable()

    def sample(n):
        last[0] = n
        v, m = variants[n], inner[n]
        if m == 1:
            zero_grads(v.grads)
            t0 = clock()
            v.fn()
            samples[n].append(clock() - t0)
        else:
            t0 = clock()
            for _ in range(m):
                zero_grads(v.grads)
                v.fn()
            samples[n].append((clock() - t0) / m)

    pair_rounds, pair_s = 0, 0.0
    try:
        t_rounds = clock()
        for k in range(rounds):
            if k >= min_rounds and clock() - t_rounds > 1.15 * budget_s:
                rounds = k  # the estimate was optimistic (the machine slowed down): stop here
                break
            for n in names[k % len(names):] + names[: k % len(names)]:
                sample(n)
        if until_ci is not None:
            a, b, width = until_ci
            order = (b, a) if last[0] == a else (a, b)
            t_pairs = clock()
            allowance = max(2 * budget_s - (t_pairs - t_rounds), ci_floor_s)
            while (rounds + pair_rounds < 3 * max_rounds and clock() - t_pairs < allowance
                   and ci_too_wide([x / y for x, y in zip(samples[a], samples[b])], width)):
                for n in order:
                    sample(n)
                pair_rounds += 1
            pair_s = clock() - t_pairs
    finally:
        if gc_was:
            gc.enable()
    info = {"rounds": rounds, "inner": inner, "method": "cpu: perf_counter, interleaved rounds"}
    if pair_rounds:  # added while the interval of until_ci's ratio was unusable
        info.update(pair_rounds=pair_rounds, pair=[until_ci[0], until_ci[1]], pair_s=pair_s)
    return samples, info


def _cuda_bench_all(fn, grads, rep_ms: int, warmup_ms: int = 25):
    """Per-run milliseconds of fn on CUDA: triton.testing.do_bench, else a torch.cuda.Event loop."""
    if importlib.util.find_spec("triton") is not None:
        from triton.testing import do_bench

        try:
            return list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grads) or None, return_mode="all"))
        except AssertionError:  # an older triton without return_mode="all"
            return [do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grads) or None, return_mode="median")]
    # Fallback: events around each call, L2 flushed before each (as do_bench does).
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    _call(fn, grads)
    torch.cuda.synchronize()
    t0 = torch.cuda.Event(enable_timing=True)
    t1 = torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(3):
        _call(fn, grads)
    t1.record()
    torch.cuda.synchronize()
    est = max(t0.elapsed_time(t1) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        _call(fn, grads)
    n = max(1, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        zero_grads(grads)
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_variants_cuda(variants: dict, rounds: int, rep_ms: int):
    """Round-robin do_bench over the variants. Returns ({name: per-run seconds}, {name: per-round
    median seconds}, info)."""
    names = list(variants)
    pooled = {n: [] for n in names}
    per_round = {n: [] for n in names}
    for k in range(rounds):
        order = names[k % len(names):] + names[: k % len(names)]
        for n in order:
            ms = _cuda_bench_all(variants[n].fn, variants[n].grads, rep_ms)
            secs = [m * 1e-3 for m in ms]
            pooled[n].extend(secs)
            per_round[n].append(_median(secs))
    how = "triton.testing.do_bench" if importlib.util.find_spec("triton") else "torch.cuda.Event"
    return pooled, per_round, {"rounds": rounds, "rep_ms": rep_ms, "method": f"cuda: {how}, round-robin"}


# ---- machine limits ----------------------------------------------------------------------------


def _best_time_cpu(fn, min_time_s: float, min_reps: int = 3) -> float:
    """Best (shortest) time of fn over at least min_reps calls and min_time_s seconds: a ceiling of
    what the machine can do, as free as possible of its slow phases."""
    fn()
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or spent < min_time_s:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def _best_time_cuda(fn) -> float:
    if importlib.util.find_spec("triton") is not None:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3
    return _median([m * 1e-3 for m in _cuda_bench_all(fn, (), 200)])


def _cpp_gemm_rate(timer) -> Optional[float]:
    """FLOP/s of pyhappy's C++ fp32 GEMM (csrc/cpu/gemm.h) at a linear layer's shape, x [512, 4096]
    · Wᵀ (W [4096, 4096]): oneDNN on a CPU with AVX-512F (2.3x torch's MKL on AMD's Zen 5), else
    MKL in column blocks (faster than one call on the Zen 3): the machine can do at least that much,
    so it counts towards the limit. None without the extension."""
    from pyhappy import _ext

    e = _ext.load()
    if e is None:
        return None
    x, w = torch.randn(512, 4096), torch.randn(4096, 4096)
    rate = 2 * 512 * 4096 * 4096 / timer(lambda: e.gemm_mm(x, w.t()))
    del x, w
    return rate


def _cpp_gemm_engine() -> Optional[str]:
    from pyhappy import _ext

    e = _ext.load()
    return e.fp32_gemm() if e is not None and hasattr(e, "fp32_gemm") else None


def measure_limits(device: torch.device, quick: bool) -> dict:
    """Memory bandwidth (bytes/s) and GEMM throughput (FLOP/s per dtype) of this machine, measured
    now. Bandwidth: the best of an out-of-cache read (sum: bytes read) and copy (bytes read +
    written) over a buffer of >= 8x the last-level cache. GEMM: square matmul, best (CPU) or
    median (CUDA) time."""
    cuda = device.type == "cuda"
    llc = last_level_cache_bytes(device)
    nbytes = max(8 * llc, (2**30 if cuda else (128 if quick else 256) * 2**20))
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timer = _best_time_cuda if cuda else (lambda f: _best_time_cpu(f, 0.3 if quick else 1.0))
    t_read = timer(lambda: src.sum())
    t_copy = timer(lambda: dst.copy_(src))
    del src, dst
    read_bw, copy_bw = nbytes / t_read, 2 * nbytes / t_copy
    gemm, torch_gemm, torch_n = {}, {}, {}
    n = 8192 if cuda else 2048
    cpp_gemm = None if cuda else _cpp_gemm_rate(timer)
    for dt in (torch.float32, torch.bfloat16):
        # On a CPU without native bf16 dot products torch's bf16 GEMM is ~100x slower than fp32 (a
        # minute for 2048^3): probe it small first. There the hardware limit of a bf16 product is the
        # fp32 rate (convert, multiply in fp32: what pyhappy's CPU ops do), recorded as bf16's peak.
        slow = not cuda and dt is not torch.float32 and torch_gemm_slow(dt)
        m = 512 if slow else n
        a = torch.randn(m, m, device=device).to(dt)
        b = torch.randn(m, m, device=device).to(dt)
        t = (lambda f: _best_time_cpu(f, 0.0, 1)) if slow else timer
        torch_gemm[dtype_name(dt)] = 2 * m**3 / t(lambda: a @ b)
        torch_n[dtype_name(dt)] = m
        gemm[dtype_name(dt)] = max(torch_gemm[dtype_name(dt)], gemm.get("float32", 0.0))
        if dt is torch.float32 and cpp_gemm:  # None on CUDA
            gemm["float32"] = max(gemm["float32"], cpp_gemm)
        del a, b
    gc.collect()
    return {
        "bandwidth_Bps": max(read_bw, copy_bw),
        "read_bandwidth_Bps": read_bw,
        "copy_bandwidth_Bps": copy_bw,
        "bandwidth_buffer_bytes": nbytes,
        "matmul_flops": gemm,
        "torch_matmul_flops": torch_gemm,
        "torch_matmul_n": torch_n,
        "cpp_matmul_flops": cpp_gemm,  # fp32, pyhappy's C++ GEMM at [512, 4096] x [4096, 4096]ᵀ (CPU)
        "cpp_gemm_engine": _cpp_gemm_engine(),
        "matmul_n": n,
        "last_level_cache_bytes": llc,
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
    }


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def torch_gemm_rates(dtype: torch.dtype) -> dict:
    """FLOP/s of torch's CPU GEMM in dtype for the two weight layouts of a linear layer, from a small
    probe ([64, 512] x [512, 512], best of at least 3 calls and 50 ms, once per process): "nt"
    (x·Wᵀ, the forward) and "nn" (dy·W, the backward's grad_input). The best over 50 ms keeps a
    busy moment of the machine from passing for a slow GEMM."""
    x = torch.randn(64, 512).to(dtype)
    w = torch.randn(512, 512).to(dtype)
    flops = 2 * 64 * 512 * 512
    return {"nt": flops / _best_time_cpu(lambda: x @ w.t(), 0.05), "nn": flops / _best_time_cpu(lambda: x @ w, 0.05)}


def torch_gemm_slow(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMM in this reduced-precision dtype is far (> 8x) slower than in fp32 in
    either layout: a CPU without native bf16 / fp16 dot products (AVX2 machines)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    f32, lp = torch_gemm_rates(torch.float32), torch_gemm_rates(dtype)
    return any(lp[k] * 8 < f32[k] for k in f32)


def torch_slow_skip(case, device: torch.device) -> Optional[str]:
    """Why ``case`` is skipped, or None: a reduced-precision CPU case whose torch variants (the
    baselines) would take more than 3 s a call where torch's GEMM in that dtype is slow."""
    if device.type != "cpu" or not torch_gemm_slow(case.dtype):
        return None
    rate = torch_gemm_rates(case.dtype)["nt" if case.pass_ == "fwd" else "nn"]
    est = max(w[0] for w in case.work.values()) / rate
    if est <= 3.0:
        return None
    name = dtype_name(case.dtype)
    return (f"torch's {name} GEMM on this CPU runs at {fmt_rate(rate, 'FLOP/s')} (no native {name} dot products; "
            f"fp32 {fmt_rate(torch_gemm_rates(torch.float32)['nn'], 'FLOP/s')}): one call of the torch baselines "
            f"would take ~{est:.0f} s. pyhappy's CPU ops compute {name} products in fp32 blocks here")


def merge_limits(runs: Sequence[dict]) -> dict:
    """The best of several measurements of the limits (the machine can do at least that much; on a
    shared machine a single measurement may fall in a slow phase). Keeps every measurement."""
    best = dict(runs[0])
    for key in ("bandwidth_Bps", "read_bandwidth_Bps", "copy_bandwidth_Bps"):
        best[key] = max(r[key] for r in runs)
    for key in ("matmul_flops", "torch_matmul_flops"):
        if key in runs[0]:
            best[key] = {k: max(r[key][k] for r in runs) for k in runs[0][key]}
    if any(r.get("cpp_matmul_flops") for r in runs):
        best["cpp_matmul_flops"] = max(r.get("cpp_matmul_flops") or 0.0 for r in runs)
    best["measurements"] = [{k: v for k, v in r.items() if k != "measurements"} for r in runs]
    lo = min(r["matmul_flops"]["float32"] for r in runs)
    best["speed_variation"] = best["matmul_flops"]["float32"] / lo if lo else None
    return best


def roofline_s(flops: float, nbytes: float, dtype: str, limits: dict) -> Optional[float]:
    peak = limits["matmul_flops"].get(dtype)
    if not peak:
        return None
    return max(flops / peak, nbytes / limits["bandwidth_Bps"])


# ---- environment -------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list:
    want = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx_vnni")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in want if f in have]
    except OSError:
        pass
    return []


def _git_rev() -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device, backend_of: Optional[dict] = None) -> dict:
    """The record saved with every result. ``backend_of``: {family: its backend_of hook}."""
    import pyhappy
    from pyhappy import _ext

    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            triton_version = triton.__version__
        except Exception as e:  # noqa: BLE001  (a broken triton must not stop the benchmark)
            triton_version = f"import failed: {e}"
    ext = _ext.load()
    served = {}
    for fam, hook in (backend_of or {}).items():
        try:
            served[fam] = hook(device, None)
        except Exception as e:  # noqa: BLE001
            served[fam] = f"error: {e}"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_num_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "pyhappy": pyhappy.__version__,
        "pyhappy_git": _git_rev(),
        "pyhappy_ext_loaded": ext is not None,
        "pyhappy_cpu_simd": ext.simd_level() if ext is not None and hasattr(ext, "simd_level") else None,
        "pyhappy_fp32_gemm": ext.fp32_gemm() if ext is not None and hasattr(ext, "fp32_gemm") else None,
        "pyhappy_backend": served,
        "env_overrides": {k: v for k, v in os.environ.items() if k.startswith("PYHAPPY_") or k == "TRITON_INTERPRET"},
        "argv": sys.argv,
    }


# ---- running one case --------------------------------------------------------------------------


def _as_tuple(out):
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(t for t in out if isinstance(t, torch.Tensor))


def _rel_err(a, b) -> float:
    worst = 0.0
    for x, y in zip(_as_tuple(a), _as_tuple(b)):
        x, y = x.detach().double(), y.detach().double()
        scale = y.abs().max().item() or 1.0
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst


def paired_ratios(samples: dict, a: str, b: str) -> list:
    """The per-round ratios a/b, over the rounds that timed both: the planned rounds, and the pair
    rounds too when (a, b) is the pair they timed (``time_variants_cpu`` puts them last)."""
    return [x / y for x, y in zip(samples[a], samples[b])]


def run_case(case: Case, device: torch.device, limits: dict, budget_s: float, quick: bool, backend_of=None,
             ci_floor_s: float = 0.0) -> dict:
    """Times every variant of ``case``; returns its result record (plain JSON types). ``ci_floor_s``:
    seconds of pair rounds (``time_variants_cpu``) allowed while the interval of pyhappy's ratio to the
    unfused formulation is unusable, whatever ``budget_s`` is."""
    res = {
        "op": case.op, "shape": case.shape, "params": case.params, "dtype": dtype_name(case.dtype),
        "pass": case.pass_, "variants": list(case.variants), "primary": case.primary,
        "headline": case.headline, "note": case.note, "sweeps": [list(s) for s in case.sweeps],
    }
    if backend_of is not None:
        try:
            res["backend"] = backend_of(device, case.dtype)
        except Exception as e:  # noqa: BLE001
            res["backend"] = f"error: {e}"
    t_case = time.perf_counter()
    variants = case.setup()
    try:
        # First call of each variant: warm-up and the correctness check.
        first = {}
        for n in case.variants:
            restart_rotations()  # every variant's first call reads the same copies
            first[n] = _call(variants[n].fn, variants[n].grads)
        if device.type == "cuda":
            torch.cuda.synchronize()
        res["rel_err_vs_primary"] = {n: _rel_err(first[n], first[case.primary]) for n in case.same_result}
        del first
        t_timed = time.perf_counter()
        if device.type == "cuda":
            pooled, per_round, info = time_variants_cuda(variants, rounds=2 if quick else 3,
                                                         rep_ms=30 if quick else 100)
        else:
            # Until the interval of pyhappy's ratio to the unfused formulation it replaces (or the case's
            # ci_pair) is narrow (full runs): the verdict "faster than unfused" needs its upper end, not
            # only its median.
            pair = case.ci_pair or next((pr for pr in UNFUSED_PAIRS if set(pr) <= set(case.variants)), None)
            ci = (*pair, CI_WIDTH) if pair is not None and not quick else None
            pooled, info = time_variants_cpu(variants, budget_s, 3 if quick else case.min_rounds, case.max_rounds,
                                             until_ci=ci, ci_floor_s=ci_floor_s)
            per_round = pooled
        res["timed_s"] = time.perf_counter() - t_timed
    finally:
        del variants
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    res["timing"] = info
    res["times"] = {n: _stats(pooled[n]) for n in case.variants}
    p = case.primary
    res["ratios"] = {}
    for n in case.variants[1:]:
        paired = paired_ratios(per_round, p, n)
        res["ratios"][n] = {
            "paired_median": _median(paired),
            "of_medians": res["times"][p]["median_s"] / res["times"][n]["median_s"],
            "paired_iqr": _stats(paired)["iqr_s"],
            "paired_ci95": median_ci95(paired),
            "paired_n": len(paired),
            "paired_ci_level": median_ci_ranks(len(paired))[2],  # below 0.95 under CI_MIN_ROUNDS ratios
            "of_mins": res["times"][p]["min_s"] / res["times"][n]["min_s"],
        }
    res["paired"] = {}
    for i, a in enumerate(case.variants):
        for b in case.variants[i + 1:]:
            res["paired"][f"{a}/{b}"] = _median(paired_ratios(per_round, a, b))
    res["samples_s"] = {n: thin(pooled[n]) for n in case.variants}
    if any(len(pooled[n]) > MAX_SAMPLES for n in case.variants):
        res["samples_thinned"] = f"more than {MAX_SAMPLES} samples: {MAX_SAMPLES} evenly spaced order statistics kept"
    res["work"] = {n: {"flops": case.work[n][0], "bytes": case.work[n][1]} for n in case.variants}
    apply_limits(res, limits)
    res["wall_s"] = time.perf_counter() - t_case
    return res


CI_WIDTH = 0.08  # of the median: the widest 95% interval of pyhappy/unfused a full CPU run accepts
MAX_SAMPLES = 1000  # per variant in results.json (do_bench returns one sample per run: thousands on a GPU)


def thin(samples: Sequence[float], k: int = MAX_SAMPLES) -> list:
    """``samples`` as they are when at most ``k``, else ``k`` evenly spaced order statistics of them
    (min and max included): the distribution survives, results.json stays a few MiB."""
    if len(samples) <= k:
        return list(samples)
    s = sorted(samples)
    return [s[round(i * (len(s) - 1) / (k - 1))] for i in range(k)]


def apply_limits(res: dict, limits: dict) -> None:
    """(Re)computes a result's roofline times and % of the machine limit against ``limits``."""
    if "error" in res:
        return
    res["roofline_s"], res["pct_of_limit"] = {}, {}
    for n in res["variants"]:
        rl = roofline_s(res["work"][n]["flops"], res["work"][n]["bytes"], res["dtype"], limits)
        res["roofline_s"][n] = rl
        res["pct_of_limit"][n] = None if rl is None else 100.0 * rl / res["times"][n]["median_s"]


# ---- reports -----------------------------------------------------------------------------------


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_rate(x: float, unit: str) -> str:
    for p, s in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= p:
            return f"{x / p:.1f} {s}{unit}"
    return f"{x:.0f} {unit}"


WIDTH = 120  # terminal lines are wrapped to this many columns

# (pyhappy variant, the unfused formulation it replaces) as the families name them: a case where the
# first is slower than the second is reported as a REGRESSION line.
UNFUSED_PAIRS = (("pyhappy", "unfused"), ("pyhappy", "dequant_unfused"), ("pyhappy", "dequant_mm"),
                 ("pyhappy", "clone_scatter"), ("pyhappy", "peft_loop"), ("pyhappy", "peft"),
                 ("pyhappy_backend", "inductor"), ("pyhappy_lowrank", "tensordot_lowrank"),
                 ("pyhappy_matrix", "tensordot_matrix"))


def wrap(text: str, indent: str = "    ") -> str:
    """``text`` wrapped to WIDTH columns, continuation lines indented."""
    return textwrap.fill(text, WIDTH, subsequent_indent=indent, break_long_words=True, break_on_hyphens=False)


def compare(ratio: float, baseline: str, who: str = "", digits: int = 2) -> str:
    """A time ratio (who's time / baseline's time) in words, the same number the tables print:
    "pyhappy 0.94x the time of base", "1.07x the time of unfused"; "the same time as" where it rounds
    to 1."""
    who = f"{who} " if who else ""
    if round(ratio, digits) == 1.0:
        return f"{who}the same time as {baseline}"
    return f"{who}{ratio:.{digits}f}x the time of {baseline}"


def case_name(res: dict) -> str:
    return f"{res['op']} {res['shape']} {res['dtype']} {res['pass']}"


def unfused_ratios(res: dict) -> list:
    """[(pyhappy variant, unfused variant, paired time ratio)] of a result, for the pairs it has."""
    out = []
    for a, b in UNFUSED_PAIRS:
        v = res.get("paired", {}).get(f"{a}/{b}")
        if v is not None:
            out.append((a, b, v))
    return out


def regressions(results: Sequence[dict]) -> list:
    """One REGRESSION line per case where a pyhappy variant took longer than the unfused
    formulation it replaces (median of paired per-round ratios > 1)."""
    lines = []
    for r in results:
        if "error" in r:
            continue
        for a, b, v in unfused_ratios(r):
            if v > 1.0:
                rt = r["ratios"].get(b) if a == r["primary"] else None
                ci_s = f" (95% CI of the ratio {ci_text(rt)})" if rt and "paired_ci95" in rt else ""
                shown = f"{v:.3f}" if round(v, 3) > 1.0 else f"{v:.5f}"  # never "1.000" for a ratio above 1
                lines.append(f"REGRESSION {case_name(r)}: {a} {shown}x the time of {b}{ci_s}")
    return lines


def progress_line(i: int, total: int, res: dict) -> str:
    head = f"[{i}/{total}] {case_name(res)}"
    if "error" in res:
        return f"{head}: {'skipped: ' if res.get('skipped') else 'ERROR '}{res['error'].removeprefix('skipped: ')}"
    p = res["primary"]
    parts = [f"{p} {fmt_time(res['times'][p]['median_s'])}"]
    pairs = unfused_ratios(res)
    if pairs:
        a, b, v = pairs[0]
        parts.append(compare(v, b, "" if a == p else a))
    elif len(res["variants"]) > 1:
        b = res["variants"][1]
        parts.append(compare(res["ratios"][b]["paired_median"], b))
    bad = [n for n, e in res.get("rel_err_vs_primary", {}).items() if e > tolerance(res["dtype"])]
    warn = f"; MISMATCH vs {','.join(bad)}" if bad else ""
    t = res["timing"]
    rounds = f"{t['rounds']} rounds"
    if t.get("pair_rounds"):
        rounds += f" + {t['pair_rounds']} of {'/'.join(t['pair'])}"
    return f"{head}: " + ", ".join(parts) + f" ({rounds}, {res['wall_s']:.1f} s){warn}"


def ci_text(rt: dict) -> str:
    """A ratio's interval as the tables print it, "0.86-0.92"; its coverage added where it is below 95%
    (fewer than CI_MIN_ROUNDS paired ratios: [min, max] of 5 covers 94%)."""
    lo, hi = rt["paired_ci95"]
    level = rt.get("paired_ci_level")
    return f"{lo:.2f}-{hi:.2f}" + (f" at {100 * level:.0f}%" if level is not None and level < 0.95 else "")


def case_block(res: dict) -> list:
    """A result as terminal lines that fit WIDTH: the case, then one line per variant with its time,
    % of the machine limit and (other variants) how pyhappy compares to it."""
    name = case_name(res) + (" *" if res.get("headline") else "")
    if "error" in res:
        return [wrap(f"{name}: {'skipped: ' if res.get('skipped') else 'ERROR: '}{res['error'].removeprefix('skipped: ')}")]
    p = res["primary"]
    lines = [wrap(name)]
    width = max(len(n) for n in res["variants"])
    for n in res["variants"]:
        t = res["times"][n]
        pct = res.get("pct_of_limit", {}).get(n)
        cells = f"  {n.ljust(width)}  {fmt_time(t['median_s']):>9} ±{fmt_time(t['iqr_s'] / 2):<9}"
        cells += f" {'' if pct is None else f'{pct:3.0f}% of limit':<15}"
        if n != p:
            rt = res["ratios"][n]
            cells += f" {compare(rt['paired_median'], n, p, digits=3)} (CI {ci_text(rt)})"
        lines.append(wrap(cells.rstrip(), indent=" " * 6))
    return lines


def tolerance(dtype: str) -> float:
    return {"float32": 1e-3, "float64": 1e-8}.get(dtype, 3e-2)


def table_rows(results: Sequence[dict]):
    """(header, rows) of one family's table: one column per variant time, one per ratio, and the
    % of the machine limit of every variant."""
    ok = [r for r in results if "error" not in r]
    names = []
    for r in ok:
        for n in r["variants"]:
            if n not in names:
                names.append(n)
    primary = ok[0]["primary"] if ok else "pyhappy"
    others = [n for n in names if n != primary]
    header = ["op", "shape", "dtype", "pass", f"{primary}"] + others
    header += [f"{primary}/{n} (95% CI)" for n in others] + ["% of limit (" + "/".join(names) + ")"]
    rows = []
    for r in results:
        row = [r["op"] + (" *" if r.get("headline") else ""), r["shape"], r["dtype"], r["pass"]]
        if "error" in r:
            rows.append(row + [("" if r.get("skipped") else "ERROR: ") + r["error"][:60]] + [""] * (len(header) - 5))
            continue
        for n in [primary] + others:
            t = r["times"].get(n)
            row.append(f"{fmt_time(t['median_s'])} ±{fmt_time(t['iqr_s'] / 2)}" if t else "-")
        for n in others:
            rt = r["ratios"].get(n)
            row.append(f"{rt['paired_median']:.3f} ({ci_text(rt)})" if rt else "-")
        row.append("/".join("-" if r["pct_of_limit"].get(n) is None else f"{r['pct_of_limit'][n]:.0f}"
                            for n in names))
        rows.append(row)
    return header, rows


def text_table(header, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "-" * len(line)]
    for row in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    return "\n".join(out)


def md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(out)


def limits_lines(limits: dict) -> list:
    raw = limits.get("torch_matmul_flops", {})
    gemm = ", ".join(f"{k} {fmt_rate(v, 'FLOP/s')}" + (
        f" (torch's {k} GEMM {fmt_rate(raw[k], 'FLOP/s')} at {limits.get('torch_matmul_n', {}).get(k, '?')}^3: no native {k} "
        f"dot products, the fp32 rate is the limit)" if k != "float32" and k in raw and 2 * raw[k] < v else "")
        for k, v in limits["matmul_flops"].items())
    cpp = limits.get("cpp_matmul_flops")
    if cpp:
        how = {"onednn": "oneDNN", "aten": "MKL in column blocks"}.get(limits.get("cpp_gemm_engine"), "C++")
        gemm += (f"; pyhappy's fp32 GEMM ({how}) {fmt_rate(cpp, 'FLOP/s')} at 512x4096x4096, "
                 f"torch's {fmt_rate(raw.get('float32', 0.0), 'FLOP/s')} at {limits['matmul_n']}^3: "
                 "the limit is the faster")
    return [
        f"memory bandwidth: {fmt_rate(limits['bandwidth_Bps'], 'B/s')} "
        f"(read {fmt_rate(limits['read_bandwidth_Bps'], 'B/s')}, "
        f"copy {fmt_rate(limits['copy_bandwidth_Bps'], 'B/s')} counting read+write; "
        f"{limits['bandwidth_buffer_bytes'] / 2**20:.0f} MiB buffer, last-level cache "
        f"{limits['last_level_cache_bytes'] / 2**20:.0f} MiB)",
        f"matmul ({limits['matmul_n']}^3): {gemm}",
    ] + ([f"(best of {len(limits['measurements'])} measurements, start and end of the run; fp32 GEMM varied "
          f"{limits['speed_variation']:.2f}x between them)"] if len(limits.get("measurements", [])) > 1 else [])


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not importable."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    return plt


def write_plots(results: Sequence[dict], out: Path) -> list:
    """One PNG per sweep (time per variant and ratios vs the swept parameter); [] when matplotlib
    is not importable."""
    plt = _pyplot()
    if plt is None:
        return []
    groups = {}
    for r in results:
        if "error" in r:
            continue
        for title, param in r.get("sweeps", []):
            groups.setdefault((title, param), []).append(r)
    files = []
    for (title, param), rs in groups.items():
        if len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["params"][param])
        xs = [r["params"][param] for r in rs]
        fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
        for n in rs[0]["variants"]:
            ax_t.plot(xs, [r["times"][n]["median_s"] * 1e3 for r in rs], marker="o", label=n)
        ax_t.set_xscale("log", base=2)
        ax_t.set_yscale("log")
        ax_t.set_xlabel(param)
        ax_t.set_ylabel("median time (ms)")
        ax_t.legend()
        ax_t.grid(True, which="both", alpha=0.3)
        p = rs[0]["primary"]
        for n in rs[0]["variants"][1:]:
            ax_r.plot(xs, [r["ratios"][n]["paired_median"] for r in rs], marker="o", label=f"{p}/{n}")
        ax_r.axhline(1.0, color="gray", lw=0.8)
        ax_r.set_xscale("log", base=2)
        ax_r.set_xlabel(param)
        ax_r.set_ylabel("time ratio (lower is better)")
        ax_r.legend()
        ax_r.grid(True, which="both", alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        name = "".join(c if c.isalnum() else "_" for c in f"{rs[0]['op']}_{title}").strip("_") + ".png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def write_ratio_plots(families: dict, env: dict, out: Path) -> list:
    """One PNG per family: each case's time ratio pyhappy/baseline for every baseline (log scale,
    1 = same time), the machine in the title; [] when matplotlib is not importable."""
    plt = _pyplot()
    if plt is None:
        return []
    files = []
    for fam, rs in families.items():
        ok = [r for r in rs if "error" not in r and r.get("ratios")]
        if not ok:
            continue
        labels, values, colors = [], [], []
        for r in ok:
            for n, rt in r["ratios"].items():
                labels.append(f"{r['shape']} {r['dtype']} {r['pass']}  {r['primary']}/{n}")
                values.append(rt["paired_median"])
                colors.append("tab:green" if rt["paired_median"] <= 1.0 else "tab:red")
        fig, ax = plt.subplots(figsize=(11, 0.28 * len(labels) + 1.4))
        ax.barh(range(len(labels)), values, color=colors, left=0)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("time ratio, median of paired rounds (< 1: pyhappy faster)")
        ax.set_title(f"{fam}: {env.get('device_name', env.get('device'))}, {env.get('torch_num_threads')} threads, "
                     f"torch {env.get('torch')}", fontsize=9)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        fig.tight_layout()
        name = f"{fam}_ratios.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


def write_combined_plots(families: dict, env: dict, out: Path) -> list:
    """At most two PNGs: ratios.png (every family's ratios, one panel each) and sweeps.png (every
    sweep's time ratios, one panel each); [] when matplotlib is not importable. For runs whose
    output folder must stay small (.ci/gpu)."""
    plt = _pyplot()
    if plt is None:
        return []
    files = []
    panels = []
    for fam, rs in families.items():
        bars = [(f"{r['shape']} {r['dtype']} {r['pass']}  {r['primary']}/{n}", rt["paired_median"])
                for r in rs if "error" not in r for n, rt in r.get("ratios", {}).items()]
        if bars:
            panels.append((fam, bars))
    if panels:
        heights = [0.22 * len(b) + 0.9 for _, b in panels]
        fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights) + 0.6),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, (fam, bars) in zip(axes[:, 0], panels):
            vals = [v for _, v in bars]
            ax.barh(range(len(bars)), vals, color=["tab:green" if v <= 1.0 else "tab:red" for v in vals])
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.set_yticks(range(len(bars)), [lab for lab, _ in bars], fontsize=6)
            ax.invert_yaxis()
            ax.set_title(fam, fontsize=9)
            ax.grid(True, axis="x", which="both", alpha=0.3)
        axes[-1, 0].set_xlabel("time ratio, median of paired rounds (< 1: pyhappy faster)")
        fig.suptitle(f"{env.get('device_name', env.get('device'))}, torch {env.get('torch')}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "ratios.png", dpi=90)
        plt.close(fig)
        files.append("ratios.png")
    groups = {}
    for rs in families.values():
        for r in rs:
            if "error" not in r:
                for title, param in r.get("sweeps", []):
                    groups.setdefault((title, param), []).append(r)
    groups = {k: sorted(v, key=lambda r: r["params"][k[1]]) for k, v in groups.items() if len(v) >= 2}
    if groups:
        ncols = 2
        nrows = -(-len(groups) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(11, 3.2 * nrows), squeeze=False)
        for ax, ((title, param), rs) in zip(axes.flat, groups.items()):
            xs = [r["params"][param] for r in rs]
            p = rs[0]["primary"]
            for n in rs[0]["variants"][1:]:
                ax.plot(xs, [r["ratios"][n]["paired_median"] for r in rs], marker="o", label=f"{p}/{n}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(param)
            ax.set_ylabel("time ratio")
            ax.set_title(f"{rs[0]['op']}: {title}", fontsize=8)
            ax.legend(fontsize=6)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "sweeps.png", dpi=90)
        plt.close(fig)
        files.append("sweeps.png")
    return files


def write_reports(out: Path, env: dict, limits: dict, families: dict, summaries: dict, total_s: float,
                  failures: dict, targets: Optional[dict] = None, skipped: Optional[dict] = None,
                  plots: str = "each", stopped: Optional[str] = None) -> list:
    """results.json, results.md and the plots into ``out``; returns the file names written.
    ``targets``: {family: [target checks]} (JSON only); ``skipped``: {family: [why a part did not run]};
    ``plots``: "each" (a PNG per family and per sweep), "combined" (ratios.png and sweeps.png) or
    "none"; ``stopped``: why the run stopped before its last case (time limit, interrupt), or None."""
    out.mkdir(parents=True, exist_ok=True)
    all_results = [r for rs in families.values() for r in rs]
    try:  # a plotting failure must not cost the results
        if plots == "each":
            plots = write_ratio_plots(families, env, out) + write_plots(all_results, out)
        elif plots == "combined":
            plots = write_combined_plots(families, env, out)
        else:
            plots = []
    except Exception as e:  # noqa: BLE001
        print(f"warning: plots not written: {type(e).__name__}: {e}", file=sys.stderr)
        plots = []
    regress = regressions(all_results)
    doc = {"env": env, "limits": limits, "total_s": total_s, "families": families, "summary": summaries,
           "targets": targets or {}, "regressions": regress, "not_run": skipped or {},
           "family_import_errors": failures, "plots": plots, "stopped": stopped}
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    md = [f"# pyhappy benchmarks ({env['device']}: {env['device_name']})", ""]
    md.append(f"{env['date']}; torch {env['torch']}, triton {env['triton']}, pyhappy {env['pyhappy']} "
              f"({env['pyhappy_git']}), {env['torch_num_threads']} threads, backend {env['pyhappy_backend']}, "
              f"CPU {env['cpu_model']} ({', '.join(env['cpu_flags'])}); total run {total_s:.0f} s.")
    md += ["", "## Machine limits (measured in this run)", ""] + [f"- {line}" for line in limits_lines(limits)]
    md += ["", "## Method", "",
           "Times are medians (± half the IQR) of per-call times. On CPU the variants are interleaved: every "
           "round calls each variant once, rotating the order, and a ratio is the median of the per-round "
           "paired ratios, with a distribution-free 95% confidence interval of that median in brackets "
           "(order statistics by the sign test's binomial coverage; marked \"at 94%\" or less where fewer "
           "than 6 rounds allow no 95% interval). While the interval of pyhappy's ratio to the unfused "
           f"formulation is wider than {CI_WIDTH:.0%} of the ratio, pair rounds (pyhappy and unfused only, "
           "called alternately) are added; that ratio uses every round, the others the "
           "rounds of all variants. "
           "On CUDA: triton.testing.do_bench (L2 flushed before each run), round-robin over "
           "the variants. `% of limit` = roofline time max(flops/peak GEMM FLOP/s of the dtype, bytes/"
           "bandwidth) / measured time, with the minimal flops and compulsory bytes of each variant's "
           "computation. Small-M (decode) cases rotate through weight copies larger in total than the "
           "last-level cache. Ratios below 1 mean pyhappy is faster. `*`: headline case."]
    if stopped:
        n_left = sum(1 for r in all_results if r.get("not_run"))
        md += ["", f"**Stopped early**: {n_left} cases {stopped.removeprefix('not run: ')}; they are listed as skipped."]
    if regress:
        md += ["", "## Regressions (pyhappy slower than the unfused formulation)", ""] + [f"- {r}" for r in regress]
    for fam, rs in families.items():
        md += ["", f"## {fam}", ""]
        header, rows = table_rows(rs)
        md.append(md_table(header, rows) if rows else "No case of this family ran.")
        notes = sorted({r["note"] for r in rs if r.get("note")})
        notes += [f"{r['shape']} {r['dtype']} {r['pass']}: {r['error']}" for r in rs if r.get("skipped")]
        notes += [f"not run: {why}" for why in (skipped or {}).get(fam, [])]
        if notes:
            md += [""] + [f"- {n}" for n in notes]
        if summaries.get(fam):
            md += ["", "### Summary", ""] + [f"- {line}" for line in summaries[fam]]
    for fam, err in failures.items():
        md += ["", f"## {fam}: not run", "", f"    {err}"]
    if plots:
        md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    (out / "results.md").write_text("\n".join(md) + "\n")
    return ["results.json", "results.md"] + plots


def target(what: str, value: float, op: str, goal: float) -> dict:
    """A target check for the JSON record (``--check``-style consumers read ``targets``); the
    terminal and results.md say only what was measured."""
    met = value <= goal if op == "<=" else value < goal if op == "<" else value >= goal
    return {"what": what, "value": value, "op": op, "goal": goal, "met": met}


def find_result(results, **want):
    """The first successful result whose params (or top-level fields, e.g. dtype) match ``want``."""
    for r in results:
        if "error" in r:
            continue
        if all((r["params"].get(k) if k in r["params"] else r.get(k)) == v for k, v in want.items()):
            return r
    return None


def status_kb(field: str) -> int:
    """A kB field of /proc/self/status (e.g. VmHWM, the peak resident set)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def steady_step_peak_bytes(step, leaves) -> int:
    """Peak resident-memory growth of a training step in its steady state: ``step()`` (a forward and
    backward whose output it drops) runs once untimed, the ``.grad`` it filled on ``leaves`` is reset
    to None, freed heap memory goes back to the system (glibc's ``malloc_trim``), the kernel's
    high-water mark is reset
    (Linux: "5" > /proc/self/clear_refs), and the growth of VmHWM over the second ``step()`` is
    returned. The first step's one-time costs (the tuner measuring its candidates, oneDNN's primitives,
    thread pools, the chosen kernels' first buffers) are then not counted as the step's own, whichever
    candidate the step runs; what the second step allocates, gradients included, is."""
    import ctypes

    step()
    for t in leaves:
        t.grad = None
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may stay resident (then counted as before)
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = status_kb("VmHWM")
    step()
    return (status_kb("VmHWM") - before) * 1024


def json_from_child(module: str, func: str, *args, env=None):
    """Run ``module.func(*args)`` in a fresh process (environment: this one's updated with ``env``)
    and return the JSON object its last output line holds; None if it failed. ``module`` is the
    family's ``__name__`` (benchmarks.* in a checkout, pyhappy.benchmarks.* installed), importable
    from the folder above the benchmark package."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path.insert(0, {root!r}); from {module} import {func}; {func}(*{args!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=None if env is None else {**os.environ, **env})
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_in_child(module: str, *args):
    """``module._peak_child(*args)`` in a fresh process (its peak RSS is then this one call's): the
    ``extra_bytes`` it prints as JSON; None if it failed. The child's glibc maps every allocation of
    128 KiB or more on its own and unmaps it when freed (``MALLOC_MMAP_THRESHOLD_``, which also
    turns off glibc's moving threshold), so its resident set follows the memory the step holds: with
    the default heap, where a freed buffer sat decided whether its pages stayed resident, and the
    same step's peak moved by a block's size from one process to the next."""
    got = json_from_child(module, "_peak_child", *args, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    return None if got is None else got["extra_bytes"]

