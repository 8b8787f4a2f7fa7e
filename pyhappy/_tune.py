"""Measured dispatch for the CPU ops (``pyhappy.tune(model, ...)``, ``python -m pyhappy.tune``).

A speed rule measured on one CPU is a guess on the next, so the CPU ops do not trust one. Each op
pass (for example lora_linear's forward) offers a few *candidate schedules*, always including the
plain PyTorch formulation the op replaces (what PEFT runs). The first time a key is seen (op, pass,
dtype, the shapes with the row count rounded up to a power of two, whether dropout / a core / a bias
is present, torch's thread count), the candidates run on the call's own inputs, interleaved round
by round within a small time budget; the median times decide. The incumbent keeps the key unless
a challenger is faster by more than ``margin`` (above this kind of machine's run-to-run noise): the
unfused PyTorch formulation ("torch") where the op offers it, so that a fused schedule is used only
where it measurably beats what it replaces, else the op's default candidate. While tracing and
with ``PYHAPPY_TUNE=off`` the op's default candidate runs; with ``PYHAPPY_TUNE=off`` its products
run on torch's own engine (``products()``), so that the defaults follow torch's choice for every
base product and no speed rule of pyhappy's made on another CPU decides.
The winner is written to a JSON cache on disk and reused from then on, so a key is measured once
per machine. A call above the budget runs each candidate once; one of 512 rows or more whose
candidates' costs scale alike with the rows (lora_linear's passes) runs them on a quarter of its
rows and only the winner on the whole call (a near tie is timed on whole calls), so a model's first
step costs a quarter of each losing candidate's run (``Tuner._measure_sliced``).

Some entry points also decide between whole calls (``unfused_call``): the op, with its Python
layers, custom-op dispatch and autograd node, against the unfused formulation as plain torch ops,
timed as a forward, or as a forward and backward when autograd records. Small calls are where the
layers around a kernel can cost more than the kernel saves. ``whole_call_pick`` times several
fused ways against it in the same rounds (lora_linear's and quant_linear's training steps: C++
nodes with different candidates for their passes) and keeps the fastest that beats it. For
inference, lora_linear's entry point reads its forward's decision instead ("torch": plain torch ops).

Every candidate of a pass computes the same function within the input dtype's rounding (the tests
force each one against the reference), so the choice changes speed, not meaning; with a given cache
the choices, and so the results, are reproducible bit for bit.

Settings:
  ``PYHAPPY_TUNE=on`` (default)  measure unseen keys, use the cache for the rest
  ``PYHAPPY_TUNE=cache``         use the cache, measure nothing (unseen keys take the default)
  ``PYHAPPY_TUNE=off``           always the default candidate, its products on torch's engine
                                 (ATen) unless an engine was set explicitly (PYHAPPY_FP32_GEMM,
                                 ``pyhappy.set_gemm_engine``: "aten" or "onednn")
  ``PYHAPPY_TUNE_CACHE=path``    the cache file (default: $XDG_CACHE_HOME or ~/.cache, then
                                 pyhappy/tune.json)

The cache records the machine it was measured on (CPU model and flags, torch and pyhappy
versions); a cache of another machine, or one that cannot be read, is ignored with one warning and
rebuilt. Writes go to a temporary file renamed over the cache, under a lock file, merging what
other processes wrote in between, so concurrent processes never leave a broken or partial file.

Measurement happens in eager calls. Under torch.compile the choice is made while tracing, on fake
tensors that cannot be timed: there the cache decides, and an unseen key takes the default. Run
``pyhappy.tune(model, *example_inputs)`` once before compiling to measure every layer's keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import threading
import time
import warnings
import weakref

import torch

from .backends import Overrides, getenv, requested

MODES = ("on", "cache", "off")
SCHEMA = 1


def mode() -> str:
    """The tuning mode from ``PYHAPPY_TUNE`` ("on" when unset)."""
    return _mode(getenv("PYHAPPY_TUNE"))


@functools.lru_cache(maxsize=8)
def _mode(raw) -> str:
    m = (raw or "on").strip().lower() or "on"
    if m not in MODES:
        raise ValueError(f"PYHAPPY_TUNE must be one of {MODES}, got {raw!r}")
    return m


def cache_path() -> str:
    """The cache file in use (``PYHAPPY_TUNE_CACHE``, else the user's cache directory)."""
    env = os.environ
    return _cache_path(env.get("PYHAPPY_TUNE_CACHE"), env.get("XDG_CACHE_HOME"), env.get("HOME"))


@functools.lru_cache(maxsize=8)
def _cache_path(explicit, xdg, home) -> str:  # memoised on the variables it reads (called on every op call)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    root = xdg or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "pyhappy", "tune.json")


def _cpu() -> tuple[str, str]:
    """(CPU model name, a digest of its feature flags)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and name in ("", platform.machine(), platform.processor()):
                    name = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(val.split()))
    except OSError:
        pass
    return name, hashlib.sha1(flags.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _machine() -> tuple:
    from . import __version__

    name, flags = _cpu()
    return (("cpu", name), ("cpu_flags", flags), ("torch", torch.__version__), ("pyhappy", __version__))


def machine() -> dict:
    """What a cache is valid for: the CPU (model and flags), torch and pyhappy versions (read once
    per process: every read and write of the cache compares or records it)."""
    return dict(_machine())


def bucket(m: int) -> int:
    """Row counts share a key within powers of two (1, 2, 3-4, 5-8, ...)."""
    return 1 if m <= 1 else 1 << (int(m) - 1).bit_length()


@dataclasses.dataclass
class Decision:
    key: str
    choice: str
    medians_s: dict  # candidate -> median seconds (empty for a decision read from the cache)
    default: str


class Tuner:
    """Measures candidates and keeps the winners in a cache file. ``clock`` (seconds, monotonic) is
    injectable so tests can drive the measurement without timing anything real."""

    def __init__(self, path: str | None = None, *, clock=time.perf_counter, budget_s: float = 0.2,
                 margin: float = 0.03, min_rounds: int = 3, max_rounds: int = 15, evict=None,
                 outlier: float = 1.5, far: float = 8.0, far_s: float = 1e-3):
        self.path = path or cache_path()
        self.clock = clock
        self.evict = evict  # tensor -> None, run (untimed) on each ``cold`` tensor before every timed run
        self.budget_s, self.margin, self.outlier = budget_s, margin, outlier
        self.far, self.far_s = far, far_s
        self.min_rounds, self.max_rounds = min_rounds, max_rounds
        self._entries: dict | None = None
        self._lock = threading.RLock()
        self.log: list[Decision] = []  # decisions measured in this process, for pyhappy.tune's report
        self.measured_s = 0.0  # seconds (of ``clock``) spent measuring in this process, flushes included
        self.sliced = None  # the last measurement's share of the rows, where it timed slices

    # ---- the cache file -------------------------------------------------------------------------

    def _read(self) -> dict:
        """The entries of the file on disk (empty, with one warning, if it is unusable)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as e:
            warnings.warn(f"pyhappy.tune: cannot read the tuning cache {self.path} ({e}); measuring anew",
                          stacklevel=3)
            return {}
        why = None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            data, why = None, f"not valid JSON ({e})"
        if why is None and (not isinstance(data, dict) or data.get("schema") != SCHEMA
                            or not isinstance(data.get("entries"), dict)):
            why = "not a pyhappy tuning cache of this version"
        if why is None and data.get("machine") != machine():
            why = f"measured on another machine or version ({data.get('machine')})"
        if why is None:
            ok = {k: v for k, v in data["entries"].items()
                  if isinstance(v, dict) and isinstance(v.get("choice"), str)}
            if len(ok) == len(data["entries"]):
                return ok
            why = "it holds malformed entries"
        warnings.warn(f"pyhappy.tune: ignoring the tuning cache {self.path}: {why}; it is rebuilt", stacklevel=3)
        return {}

    def entries(self) -> dict:
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            return self._entries

    @contextlib.contextmanager
    def _file_lock(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a+") as lf:
            try:
                import fcntl

                fcntl.flock(lf, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - not POSIX: rename alone keeps the file whole
                pass
            yield

    def _store(self, key: str, entry: dict):
        with self._lock:
            self.entries()[key] = entry
            try:
                with self._file_lock():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # a bad file was already reported once
                        merged = self._read()
                    merged.update(self._entries)
                    self._entries = merged
                    tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
                    with open(tmp, "w") as f:
                        json.dump({"schema": SCHEMA, "machine": machine(), "entries": merged}, f, indent=1,
                                  sort_keys=True)
                    os.replace(tmp, self.path)
            except OSError as e:
                warnings.warn(f"pyhappy.tune: cannot write the tuning cache {self.path} ({e}); the choice holds "
                              "for this process only", stacklevel=3)

    def clear(self):
        with self._lock:
            _memo.clear()
            _generation[0] += 1
            self._entries = {}
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    # ---- measuring ------------------------------------------------------------------------------

    def measure(self, candidates: dict, default: str, cold=(), settle: bool = False) -> tuple[str, dict, object]:
        """(winner, median seconds per candidate, the winner's output of its last run): a candidate's
        ``warmup`` attribute, where it has one, run untimed first (a whole call whose first run
        measures the op's own candidates: that cost is not the call's); each candidate once to warm
        up (one that raises drops out), then rounds in rotated order until
        the budget is spent (min_rounds..max_rounds), without the candidates whose first run took
        more than ``far`` times the fastest's (and ``far_s`` more). Where the warm-up round alone took more than
        the budget (large calls, whose first run is representative), its times are the measurement
        (a sample above ``outlier`` times the fastest, and the default's where it lost, taken once
        more, the faster kept) and no further rounds run, except with ``settle`` (whole-call
        decisions, where a wrong pick changes the call's whole path): a near tie there (the fastest
        within twice the margin of the incumbent) takes two more rounds and is decided by medians
        of three. The incumbent (the fastest of the candidates with a true ``incumbent`` attribute,
        else the unfused formulation "torch" where offered, else ``default``) wins unless another is
        faster by more than ``margin``. ``cold``: tensors (a layer's weight) flushed from the caches before every timed
        run, so a candidate is timed reading them from memory, as a model's layer does when the
        other layers' weights have passed through the caches since its last call (a weight read
        from the cache would favour the formulation that is slower in the model). Candidates that
        all carry a run on a slice of the call's rows (``sliced``) are timed on those
        (``_measure_sliced``), except for whole-call decisions (``settle``)."""
        cold = tuple(t for t in cold if t is not None) if self.evict is not None else ()
        self.sliced = None

        def flush():
            for t in cold:
                self.evict(t)
        if not settle and candidates and all(getattr(f, "sliced", None) is not None for f in candidates.values()):
            got = self._measure_sliced(candidates, default, flush)
            if got is not None:
                return got
        names = list(candidates)
        times: dict = {n: [] for n in names}
        outs: dict = {}
        alive = []
        for n in names:  # a candidate's untimed first run (its own tuning), where it has one
            warmup = getattr(candidates[n], "warmup", None)
            if warmup is not None:
                try:
                    warmup()
                except Exception:  # noqa: BLE001 - the timed run below drops it (or raises for the default)
                    pass
        for n in names:
            # A candidate whose ``skip`` predicate rules it out from the first samples of the others
            # (seconds by name) is not run, where those samples already exceed the budget (large
            # calls, whose one sample each is the measurement): see with_aten_engine.
            skip = getattr(candidates[n], "skip", None)
            if (skip is not None and n != default and sum(times[m][0] for m in alive) > self.budget_s
                    and skip({m: times[m][0] for m in alive})):
                continue
            flush()
            s = self.clock()
            try:
                outs[n] = candidates[n]()
            except Exception:  # noqa: BLE001 - a candidate that cannot serve these inputs drops out
                if n == default:
                    raise
                continue
            times[n].append(self.clock() - s)
            alive.append(n)
        # The incumbent: the fastest of the candidates marked ``incumbent`` (by the times given), else
        # "torch", else the default (which never drops out).
        marked = [n for n in alive if getattr(candidates[n], "incumbent", False)]

        def incumbent(t):
            return min(marked, key=t.get) if marked else ("torch" if "torch" in alive else default)
        inc = incumbent({n: times[n][0] for n in alive})
        warm = sum(t for n in alive for t in times[n])
        timed = alive  # the candidates the rounds run
        retaken: set = set()

        def retake(n):
            """Run candidate n once more, keeping the faster of its first two samples (and that run's
            output); one that raises this time keeps its first sample and output."""
            retaken.add(n)
            flush()
            s = self.clock()
            try:
                out = candidates[n]()
            except Exception:  # noqa: BLE001 - its first sample and output stand
                return
            outs[n] = out
            times[n][0] = min(times[n][0], self.clock() - s)

        if warm <= self.budget_s:
            rounds = self.min_rounds
            # A candidate whose first run took more than ``far`` times the fastest first run (and
            # ``far_s`` longer) cannot come within the margin: its first run stands as its time and
            # the rounds leave it out. Besides their cost (a decode's dequantize-then-matmul takes
            # ~50x the kernels' time), its runs would skew the others': a candidate timed right after
            # one that wrote tens of MiB reads while those writes drain to memory, and in rotated
            # rounds some candidates follow it more often than others.
            # A first run far behind is taken once more (the faster kept) before it is left out: the
            # first call into a kernel in a process can carry a one-time cost (thread pool start, page
            # faults: 10 ms against a 30 us steady run, measured), which would hand the key to a rival
            # for good.
            def far(n, fastest):
                return times[n][0] > self.far * fastest and times[n][0] - fastest > self.far_s
            first = min(times[n][0] for n in alive)
            for n in [n for n in alive if far(n, first)]:
                retake(n)
            fastest = min(times[n][0] for n in alive)
            timed = [n for n in alive if not far(n, fastest)]
            for n in timed:
                times[n].clear()  # first runs are cold: not part of the measurement
        else:
            # One sample each. A sample more than ``outlier`` times the fastest one is taken again and
            # the faster of the two kept: on a shared machine a run sometimes loses a core for most of
            # its time (large calls on a 2-core VM: 1.6-1.9x their steady time), and that one sample
            # would decide the key; a candidate that is truly that slow costs one run more.
            fastest = min(times[n][0] for n in alive)
            for n in alive:
                if times[n][0] > self.outlier * fastest:
                    retake(n)
            # The default (the schedule pyhappy's rules expect to be fastest on this machine) is taken
            # once more where its one sample lost: a run slowed by less than ``outlier`` (the machine
            # busy for part of it) would otherwise hand the key to a rival for good; a default that
            # truly loses costs one run more.
            if default in alive and default not in retaken and min(alive, key=lambda n: times[n][0]) != default:
                retake(default)
            # Whole-call decisions (``settle``): where the fastest rival is within twice the margin
            # of the incumbent, a near tie that one sample's noise decides, two more rounds make it
            # a median of three. Per-pass decisions keep one sample each: a rival that did not beat
            # the incumbent by the margin does not win it, and rounds of every candidate at a few
            # hundred milliseconds each would multiply the first call's cost for at most the margin.
            rounds = 0
            if settle and len(alive) > 1:
                rival = min((times[n][0], n) for n in alive if n != inc)[1]
                if abs(times[inc][0] - times[rival][0]) <= 2.0 * self.margin * times[inc][0]:
                    rounds = 2
        spent = 0.0
        r = 0
        while r < self.max_rounds and (r < rounds or (rounds and spent < self.budget_s)):
            order = timed[r % len(timed):] + timed[: r % len(timed)]
            for n in order:
                flush()
                s = self.clock()
                outs[n] = candidates[n]()
                dt = self.clock() - s
                times[n].append(dt)
                spent += dt
            r += 1
        med = {n: statistics.median(times[n]) for n in alive}
        inc = incumbent(med)
        best = min(alive, key=lambda n: med[n])
        if best == inc or med[best] >= med[inc] * (1.0 - self.margin):
            best = inc
        return best, med, outs[best]

    def _measure_sliced(self, candidates: dict, default: str, flush):
        """``measure`` of a large call whose candidates all carry ``sliced`` = (scale, run): ``run``
        computes the candidate on a slice of the call's rows, ``scale`` times fewer (``sliced``).
        Each candidate is timed once on the slice (a sample above ``outlier`` times the fastest,
        and the default's where it lost, taken once more, the faster kept, as for large calls);
        the winner, by the margin over the incumbent as in ``measure``, then runs once on the whole
        call, whose output it returns, and the others' medians are their slice times scaled by the
        winner's whole-call time over its slice time. So a large call costs its candidates' slices
        (a quarter of their runs) and one run of the winner, where ``measure`` runs every
        candidate on the whole call. None (``measure`` then times the whole calls) where a slice
        raises, where the slices scaled up would fit the budget (a call that takes rounds), and
        where the fastest rival is within twice the margin of the incumbent: a near tie that the
        slice's rows alone may not settle."""
        t: dict = {}
        scale = {}
        for n, f in candidates.items():
            scale[n], run = f.sliced
            skip = getattr(f, "skip", None)
            if skip is not None and n != default and skip(dict(t)):
                continue
            flush()
            s = self.clock()
            try:
                run()
            except Exception:  # noqa: BLE001 - the whole-call measurement decides
                return None
            t[n] = self.clock() - s
        if sum(t[n] * scale[n] for n in t) <= self.budget_s:
            return None

        def retake(n):
            flush()
            s = self.clock()
            candidates[n].sliced[1]()
            t[n] = min(t[n], self.clock() - s)
        fastest = min(t.values())
        retaken = [n for n in t if t[n] > self.outlier * fastest]
        for n in retaken:
            retake(n)
        if default in t and default not in retaken and min(t, key=t.get) != default:
            retake(default)
        inc = "torch" if "torch" in t else default
        rival = min((t[n], n) for n in t if n != inc)[1] if len(t) > 1 else inc
        if rival != inc and abs(t[inc] - t[rival]) <= 2.0 * self.margin * t[inc]:
            return None
        # beyond twice the margin a rival faster than the incumbent beats it by the margin
        best = rival if t[rival] < t[inc] else inc
        flush()
        s = self.clock()
        out = candidates[best]()
        whole = self.clock() - s
        ratio = whole / t[best] if t[best] > 0 else float(scale[best])
        self.sliced = 1.0 / scale[best]  # the share of the rows the medians but the winner's come from
        return best, {n: (whole if n == best else t[n] * ratio) for n in t}, out

    def pick(self, key: str, candidates: dict, default: str, *, measure: bool = True, cold=(),
             settle: bool = False) -> str:
        """The candidate for ``key``: from the cache, else measured now (``measure``) and stored."""
        entry = self.entries().get(key)
        if entry is not None and entry["choice"] in candidates:
            return entry["choice"]
        if not measure or len(candidates) < 2:
            return default
        with self._lock:
            entry = self.entries().get(key)
            if entry is not None and entry["choice"] in candidates:
                return entry["choice"]
            s = self.clock()
            try:
                choice, med, out = self.measure(candidates, default, cold, settle)
            finally:
                self.measured_s += self.clock() - s
            entry = {"choice": choice, "default": default, "median_us": {n: round(t * 1e6, 2) for n, t in med.items()}}
            if self.sliced is not None:  # the others' medians: their slice times, scaled (_measure_sliced)
                entry["rows_timed"] = round(self.sliced, 4)
            self._store(key, entry)
            self.log.append(Decision(key, choice, med, default))
            _local.result = (out,)
            return choice


# A call of at least 4 x SLICE_MIN_ROWS rows has its candidates timed on a quarter of its rows
# (Tuner._measure_sliced): large products keep their schedules' relative speeds at a quarter of the
# rows, and the first call then costs a quarter of each losing candidate's run. Only an op whose
# candidates' costs scale alike with the rows offers slices (lora_linear: the same products on both
# sides, each reading the weight once); a candidate with a fixed cost of its own (quant_linear's
# dequantize-then-matmul, sparse_delta_linear's merge into a scratch copy of W) would carry that
# cost whole on a quarter of the rows and be misjudged, so those ops time whole calls.
SLICE_MIN_ROWS = 128


def slice_rows(m: int) -> int | None:
    """The rows a call of ``m`` rows times its candidates on (``sliced``), None for a smaller call."""
    return m // 4 if m >= 4 * SLICE_MIN_ROWS else None


def sliced(candidates: dict, rows: int, small) -> dict:
    """``candidates`` of a call of ``rows`` rows, with each one's run on the call's first
    ``slice_rows(rows)`` rows attached for Tuner._measure_sliced: ``small(m)`` returns those runs
    (zero-argument callables by candidate name) on the first m rows. A call too small to slice keeps
    its candidates as they are, and so does a candidate ``small`` leaves out (the whole-call
    measurement then decides)."""
    m = slice_rows(rows)
    if m is not None:
        for n, f in small(m).items():
            candidates[n].sliced = (rows / m, f)
    return candidates


def with_aten_engine(x: torch.Tensor, candidates: dict, base=None) -> dict:
    """Add ``cpp_aten`` to an op's candidates: its "cpp" kernels with their products on ATen (MKL)
    instead of pyhappy's engine choice, offered where that choice is not ATen for this call: float32
    products on oneDNN (csrc/cpu/gemm.h: CPUs with AVX-512F, where an Intel CPU's MKL has AVX-512
    code of its own and can be the faster engine), or a decode-sized base product ``x · base``
    (``base`` [K, N], e.g. a weight's transpose) that pyhappy's streaming kernels would take
    (csrc/cpu/gemv.h). The engine is overridden for the calling thread only (``fp32_gemm_scope``,
    which reaches the op's worker threads too): other threads' ops keep theirs."""
    if "cpp" not in candidates:
        return candidates
    from . import _ext

    e = _ext.load()
    if e is None or not hasattr(e, "fp32_gemm_scope"):
        return candidates
    onednn = x.dtype == torch.float32 and e.fp32_gemm() == "onednn"
    decode = (base is not None and hasattr(e, "gemv_serves") and x.dim() == 2 and not _is_fake(x)
              and e.gemv_serves(x, base))
    if not (onednn or decode):
        return candidates
    cpp = candidates["cpp"]

    def cpp_aten():
        with e.fp32_gemm_scope("aten"):
            return cpp()

    if getattr(cpp, "sliced", None) is not None:
        scale, small = cpp.sliced

        def small_aten():
            with e.fp32_gemm_scope("aten"):
                return small()
        cpp_aten.sliced = (scale, small_aten)

    def beaten(t: dict) -> bool:
        # cpp_aten runs the base products on torch's engine, as the unfused formulation "torch" does,
        # and saves at most the adapter's unfused passes over it: where "torch" took more than
        # _ATEN_SKIP times "cpp", cpp_aten cannot beat cpp, and a large call is not run again for it.
        return "torch" in t and "cpp" in t and t["torch"] > _ATEN_SKIP * t["cpp"]
    cpp_aten.skip = beaten
    return {**candidates, "cpp_aten": cpp_aten}


# "torch" over "cpp" beyond which cpp_aten is not measured for a large call (with_aten_engine): fusing
# saves ~9% of the unfused LoRA step where both run on MKL (the Zen 2 default run in
# benchmarks/README.md: fused/unfused 0.914 at M=512), so cpp_aten (~0.914 x "torch") beats "cpp" by
# the 3% margin only where "torch" < 0.97 / 0.914 = 1.06 x "cpp"; the rest is room for noise.
_ATEN_SKIP = 1.08


_NO_SCOPE = contextlib.nullcontext()


def products():
    """The scope an op's C++ kernels run in, on this thread: with ``PYHAPPY_TUNE=off``, their
    products on torch's own engine (ATen: MKL for float32, what F.linear and torch.mm run), so that
    no speed rule of pyhappy's made on another CPU (oneDNN on AVX-512, the streaming decode kernels)
    decides; an engine chosen explicitly ("aten" or "onednn": PYHAPPY_FP32_GEMM,
    ``pyhappy.set_gemm_engine``, an enclosing ``fp32_gemm_scope``) is kept. In the other modes
    nothing changes. ``run_choice`` runs its pick in it; an op that calls its C++ kernels outside
    ``run_choice`` wraps the call."""
    if mode() != "off":
        return _NO_SCOPE
    from . import _ext

    e = _ext.load()
    if e is None or not hasattr(e, "fp32_gemm_scope") or e.fp32_gemm_setting() != "auto":
        return _NO_SCOPE
    return e.fp32_gemm_scope("aten")


@contextlib.contextmanager
def eager_scope():
    """Eager execution where a compile is in progress (a compiler backend, a function whose result a
    traced call takes as a constant): no fake-tensor mode, and torch.compiler.is_compiling() false
    (torch holds it true for a whole compile session on versions that keep that flag, the backend's
    own code included, and pyhappy's ops neither measure nor run eagerly while it is)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    flag = getattr(torch.compiler, "_is_compiling_flag", None)
    with unset_fake_temporarily():
        if flag:
            torch.compiler._is_compiling_flag = False
        try:
            yield
        finally:
            if flag:
                torch.compiler._is_compiling_flag = flag


_tuners: dict = {}


def _evict(t: torch.Tensor) -> None:
    """Flush ``t``'s storage from the CPU caches (pyhappy._C's clflush loop; nothing without the
    extension or off x86-64)."""
    from . import _ext

    e = _ext.load()
    if e is not None and hasattr(e, "evict_from_caches") and not _is_fake(t):
        e.evict_from_caches(t)


def tuner() -> Tuner:
    """The process's tuner for the cache file in use."""
    path = cache_path()
    t = _tuners.get(path)
    if t is None:
        t = _tuners[path] = Tuner(path, evict=_evict)
    return t


def _is_fake(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.device.type == "meta" or
                                             isinstance(t, torch._subclasses.fake_tensor.FakeTensor))


def is_traced(t) -> bool:
    """Whether a call on ``t`` is being traced (fake or meta tensors, torch.compile): nothing can
    be measured, and a candidate that reads values cannot run."""
    return _is_fake(t) or torch.compiler.is_compiling()


_local = Overrides()  # forced (a candidate, see forced()) and result (see take_result()), per thread


def forced(candidate: str | None):
    """Inside the block (this thread), every op pass that offers ``candidate`` runs it, without
    measuring or caching anything (tests and benchmarks: e.g. "torch", the unfused formulation, or
    "cpp"). None: no override."""
    from .backends import thread_override

    return thread_override(_local, candidate)


_memo: dict = {}  # (op, call signature, mode, cache file setting) -> pick, for decisions already made
_generation = [0]  # bumped whenever _memo is cleared (hit_stamp)


def _memo_key(op: str, memo, m: str) -> tuple:
    """The key of ``_memo``: a call signature under one tuning mode, cache file and thread count
    (the cache's keys name the thread count: a decision measured on 2 threads is not one for 1)."""
    return (op, memo, m, getenv("PYHAPPY_TUNE_CACHE"), torch.get_num_threads())


def _cache_key(op: str, key_parts) -> str:
    """The cache's key of an op's decision: its parts and the thread count (a decision measured on 2
    threads is not one for 1)."""
    return "|".join([op, *map(str, key_parts), f"t{torch.get_num_threads()}"])


def choose(op: str, key_parts, candidates, default: str, example=None, memo=None, cold=(),
           settle: bool = False) -> str:
    """The candidate an op runs for this call.

    ``candidates`` maps names to zero-argument callables running the pass on the call's inputs
    (side-effect free), or is a zero-argument function returning that dict (built only when a
    decision has to be made); ``key_parts`` is a tuple, or a function returning one (built only
    when the cache is consulted); ``example`` is one of the inputs, checked for fake tensors
    (torch.compile tracing: the cache decides, nothing is measured). ``memo``, a hashable
    signature of the call (e.g. the identities of its weights and the row count), lets a repeated
    call skip building the key and reading the cache: this runs on every op call, and at decode
    sizes its Python work is measurable next to a kernel that streams the weight from DRAM.
    ``cold``: the call's weights, flushed from the caches before each timed run (Tuner.measure);
    ``settle``: near ties of calls above the budget take more rounds (Tuner.measure)."""
    _local.result = None
    f = _local.forced
    if f is not None:
        cands = candidates() if callable(candidates) else candidates
        if f in cands:
            return f
    m = mode()
    if m == "off":
        return default
    if isinstance(example, torch.Tensor) and not all(type(d) is int for d in example.shape):
        return default  # traced with symbolic sizes: one graph serves every size, with the default
    mk = None
    if memo is not None:
        mk = _memo_key(op, memo, m)
        try:
            hit = _memo.get(mk)
        except TypeError:  # a symbolic size among the signature's (tracing): nothing to remember
            hit = mk = None
        if hit is not None:
            return hit
    cands = candidates() if callable(candidates) else candidates
    if len(cands) < 2:
        return default
    if callable(key_parts):
        key_parts = key_parts()
    key = _cache_key(op, key_parts)
    measure = (m == "on" and not _is_fake(example) and not torch.compiler.is_compiling()
               and not torch.jit.is_tracing())
    t = tuner()
    pick = t.pick(key, cands, default, measure=measure, cold=cold, settle=settle)
    if mk is not None and key in t.entries():  # a decision of the cache, not a fallback to the default
        _memo_put(mk, pick)
    return pick


def _memo_put(mk, pick) -> None:
    if len(_memo) > 4096:  # bounded: signatures of calls that never come back do not pile up
        _memo.clear()
        _generation[0] += 1
    _memo[mk] = pick


def arg_signature(*tensors) -> tuple | None:
    """What an op's argument checks read of its tensors (None, or shape, dtype, device and
    requires_grad of each), with the grad mode: two calls of one signature pass or fail the checks
    alike and meet the same whole-call decision (``unfused_hit``). None where an argument is neither
    a plain tensor (a torch.Tensor or nn.Parameter) nor None: the op's checks name a wrong one, and
    a tensor subclass (a fake tensor of a trace, a wrapper) takes the op's full path, whose
    candidates may not read its data."""
    sig = [torch.is_grad_enabled()]
    for t in tensors:
        if t is None:
            sig.append(None)
        elif type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
            sig.append((t.shape, t.dtype, t.device, t.requires_grad))
        else:
            return None
    return tuple(sig)


def pick_hit(op: str, sig) -> str | None:
    """The pick a call of argument signature ``sig`` (``arg_signature`` and whatever else the op's
    checks read) was served by before (``remember_pick``), with nothing since that would change it:
    no candidate forced, tuning on or cache-only, no backend requested for the op, not tracing.
    An entry point that finds one runs that pick at once, its checks and the decision's lookup
    already done for this signature (their Python work costs more than a small call's products,
    and is a measurable share of a decode call that streams its weight). None (no signature) is
    never a hit."""
    if sig is None or _local.forced is not None or torch.compiler.is_compiling():
        return None
    m = mode()
    if m == "off" or requested(op) not in (None, "cpp"):
        return None
    return _memo.get(_memo_key(op, ("sig", sig), m))


def hit_stamp(op: str, *settings: str):
    """A function of no arguments returning what ``pick_hit``'s answer for ``op`` depends on besides
    the call's signature: the tuning settings (``PYHAPPY_TUNE``, ``PYHAPPY_TUNE_CACHE``), the backend
    settings for ``op``, the further environment ``settings`` the op reads, the thread count, this
    thread's forced candidate and backend, and the memo's generation (bumped when it is cleared) and
    size.
    An entry point that keeps, next to a call it served, ``pick_hit``'s answer and this stamp at that
    moment may serve a repeat of the call while the stamp is equal, without the memo's lookup: the
    lookup hashes the whole signature, more objects read than the stamp where each read misses the
    caches (a decode step's weights stream through them between two calls of a layer)."""
    from .backends import _ENV_DATA, _env_keys, _local as backend_local, env_key

    keys = (*map(env_key, ("PYHAPPY_TUNE", "PYHAPPY_TUNE_CACHE")), *_env_keys(op), *map(env_key, settings))
    get = os.environ.get if _ENV_DATA is None else _ENV_DATA.get
    threads = torch.get_num_threads

    def stamp() -> tuple:
        return (_generation[0], len(_memo), _local.forced, backend_local.forced, threads(), *map(get, keys))

    return stamp


class LastCalls:
    """The last call an entry point served through ``pick_hit`` on each weight tensor, so that a call
    repeating it gets the same answer without building and hashing its signature: a small layer's
    call, run as a few torch ops, measurably pays for that work (each object it reads misses the
    caches after the previous layers' products). A record is keyed by the weight's id and holds the
    weight weakly (the record goes with the weight) and the call's other tensors strongly (until the
    weight's next recorded call or its end).

    ``tensors``: the call's other tensors (None allowed), compared by identity, each tensor's shape,
    dtype, grad requirement and device; ``values``: plain values (floats, bools, None) compared by
    ``==``. Besides those: x's type, shape, dtype, grad requirement and device, the weight's shape,
    dtype, grad requirement and device, the grad mode and the settings (``hit_stamp``). That is what
    ``arg_signature`` and ``pick_hit`` read for a CPU call; an entry point keeps here only calls that
    are not traced and run without autocast, and asks only for such calls."""

    def __init__(self, op: str):
        self._last: dict = {}
        self._stamp = hit_stamp(op)

    def put(self, hit, x, weight, tensors: tuple, values: tuple) -> None:
        """Keep a checked CPU call whose signature met ``hit`` through ``pick_hit``."""
        if not x.is_cpu:
            return
        last = self._last
        if len(last) > 65536:
            last.clear()
        key = id(weight)
        wref = weakref.ref(weight, lambda _, key=key, last=last: last.pop(key, None))
        metas = tuple(None if t is None else (t.shape, t.dtype, t.requires_grad) for t in tensors)
        last[key] = (wref, tensors, metas, values, type(x), x.shape, x.dtype, x.requires_grad, torch.is_grad_enabled(),
                     weight.shape, weight.dtype, weight.requires_grad, self._stamp(), hit)

    def get(self, x, weight, tensors: tuple, values: tuple):
        """``pick_hit``'s answer for a call that repeats the one kept for ``weight``, else None."""
        h = self._last.get(id(weight))
        if (h is None or h[0]() is not weight or type(x) is not h[4] or x.shape != h[5] or x.dtype is not h[6]
                or x.requires_grad is not h[7] or not x.is_cpu or torch.is_grad_enabled() is not h[8]
                or weight.shape != h[9] or weight.dtype is not h[10] or weight.requires_grad is not h[11]
                or not weight.is_cpu or h[3] != values):
            return None
        for t, o, m in zip(tensors, h[1], h[2]):
            if t is not o or (t is not None and (t.shape != m[0] or t.dtype is not m[1] or t.requires_grad is not m[2]
                                                 or not t.is_cpu)):
                return None
        return h[13] if self._stamp() == h[12] else None


def remember_pick(op: str, sig, pick: str, memo=None) -> None:
    """Note that a call of signature ``sig``, its arguments checked, was served by ``pick``
    (``pick_hit``). With ``memo`` (the ``choose`` signature the pick came from), only once that
    decision is settled (held by the cache, not a fallback to the default for this call)."""
    m = mode()
    if (sig is None or m == "off" or _local.forced is not None
            or (memo is not None and _memo.get(_memo_key(op, memo, m)) != pick)):
        return  # (a forced candidate is no decision: later calls must not follow it)
    _memo_put(_memo_key(op, ("sig", sig), m), pick)


def unfused_hit(op: str, sig) -> bool:
    """Whether a call of signature ``sig`` was served by the unfused formulation before
    (``remember_unfused``; ``pick_hit``)."""
    return pick_hit(op, sig) == "unfused"


def remember_unfused(op: str, sig) -> None:
    """Note that a call of signature ``sig``, its arguments checked, was served unfused (``unfused_hit``)."""
    remember_pick(op, sig, "unfused")


def cached_pick(op: str, memo) -> str | None:
    """The decision ``choose`` made before for a call of this ``memo`` signature (None when there is
    none, when tuning is off, or while a candidate is forced): lets an op's entry point see, for one
    dictionary lookup, that the plain PyTorch formulation serves this call."""
    if _local.forced is not None:
        return None
    m = mode()
    if m == "off":
        return None
    return _memo.get(_memo_key(op, memo, m))


def take_result():
    """The output of the candidate the last ``choose`` of this thread picked, when that call measured
    the candidates (on the call's own inputs: the winner's output is the call's result), as a
    one-element tuple; None otherwise. A caller takes it instead of running the pick once more."""
    r = _local.result
    _local.result = None
    return r


def run_choice(op: str, key_parts, candidates, default: str, example=None, memo=None, cold=(), direct=None):
    """``choose`` and run the pick on the call's inputs, as (pick, output): the output from the
    measurement when this call measured, else one run of the pick (``default`` where the pick is
    not offered now, e.g. cpp_aten after the fp32 engine was set to ATen; every candidate computes
    the same function). ``direct`` maps some candidate names to callables that run without building
    ``candidates``: an op whose candidate function probes the machine (with_aten_engine) gives its
    usual picks there, so that a call the cache has decided skips the probe. The pick is returned
    for an op whose candidates return their results in different layouts. The pick runs in
    ``products()`` (with ``PYHAPPY_TUNE=off``: on torch's engine) unless it is the forced candidate,
    which runs as it is."""
    pick = choose(op, key_parts, candidates, default, example, memo, cold)
    done = take_result()
    if done is not None:
        return pick, done[0]
    run = direct.get(pick) if direct else None
    if run is None:
        cands = candidates() if callable(candidates) else candidates
        run = cands.get(pick, cands[default])
    if pick == _local.forced:
        return pick, run()
    with products():
        return pick, run()


def run_pick(op: str, key_parts, candidates, default: str, example=None, memo=None, cold=()):
    """``run_choice``'s output alone, for an op whose candidates all return the op's layout."""
    return run_choice(op, key_parts, candidates, default, example, memo, cold)[1]


def call_signature(x: torch.Tensor, N: int, r=None, bias=None, grads=(), memo=(), tags=()):
    """The ``memo`` and ``key_parts`` of a whole call for ``unfused_call``, from its tensors: x's
    dtype, the bucket of its row count (all dimensions but the last), its width K, the output
    width N, the adapter's rank ``r`` (None: none), whether a ``bias`` is present, ``grads`` (which
    of the call's tensors require grad, as booleans; empty when autograd does not record), ``memo``
    (further hashable parts of the signature) and ``tags`` (strings appended to the cache key)."""
    K = x.shape[-1]
    b = bucket(x.numel() // max(K, 1))

    def key():
        return (str(x.dtype).replace("torch.", ""), f"M{b}", f"K{K}", f"N{N}",
                *(() if r is None else (f"r{r}",)), "bias" if bias is not None else "", *tags)
    return (x.dtype, b, K, N, r, bias is None, tuple(grads), *memo), key


# The whole call of an op whose passes are tuned one by one is measured against its unfused
# formulation only where those passes take less than this (microseconds, summed). Each pass is
# timed alone, with the weight flushed; a step adds the Python layers around the kernels (some
# 20-100 us a training call on the CPUs measured) and runs its backward on what its forward left in
# the caches, so passes that each won can lose as a step (benchmarks/README.md, "Whole training
# steps of small layers"). Above ~10 ms both are within the tuner's 3% margin, so a measurement could
# not change the decision and would only add a whole step's rounds to the tuning time.
WHOLE_CALL_US = 10000.0


def decided_us(op: str, key_parts) -> float | None:
    """The measured median (microseconds) of the candidate the cache holds for an op's key (the
    key's parts as ``choose`` takes them), None when the cache holds no decision for it."""
    e = tuner().entries().get(_cache_key(op, key_parts))
    return None if e is None else e.get("median_us", {}).get(e.get("choice"))


_pending: dict = {}  # whole-call decisions waiting for their passes: memo key -> (op, the passes' key parts)


def _passes_us(op: str, passes) -> float | None:
    us = [decided_us(op, kp) for kp in passes]
    return None if any(u is None for u in us) else sum(us)


def node_passes(op: str, passes, picks, offered) -> tuple:
    """The candidates an op's whole-step node runs for its passes (``passes``: their key parts;
    ``picks``: their decisions, or None where undecided; ``offered``: the candidates the node can run).
    Where the passes take less than ``WHOLE_CALL_US`` together, the step is measured against the
    unfused formulation (``whole_call_pick``), and that measurement, which the unfused formulation
    wins where it beats the fused ways by the margin, guards the choice: each pass runs its fastest measured candidate, a pass's own margin
    for its incumbent set aside (two near ties each kept by the margin can add up to a step that
    loses). Otherwise the decisions stand. A candidate the node cannot run keeps the decision."""
    us = _passes_us(op, passes)
    if us is None or us >= WHOLE_CALL_US:
        return tuple(picks)
    entries = tuner().entries()
    out = []
    for kp, pick in zip(passes, picks):
        med = entries.get(_cache_key(op, kp), {}).get("median_us") or {}
        best = min((n for n in med if n in offered), key=med.get, default=None)
        out.append(best if best is not None else pick)
    return tuple(out)


def pending_fast_calls() -> bool:
    """Whether a whole-call decision waits for passes that are now decided and fast (under
    ``WHOLE_CALL_US``): another call of the model would make it (``tune`` runs one)."""
    return any(u is not None and u < WHOLE_CALL_US for u in (_passes_us(op, kps) for op, kps in _pending.values()))


def unfused_call(op: str, memo, key_parts, fused, unfused, example, grad_inputs=(), cold=(),
                 passes=None) -> bool:
    """Whether an op's entry point serves this whole call with the plain PyTorch formulation.

    ``choose`` decides between the schedules of one pass inside an op; this decides between whole
    calls: the op (its entry point's Python layers, the custom-op dispatcher and its autograd node
    included) against the unfused formulation run as plain torch ops, the forward and, when
    ``grad_inputs`` (the call's tensors that require grad) is not empty, the backward to those
    tensors too (``torch.autograd.grad``: nothing accumulates into ``.grad``). At small shapes the
    layers around a kernel can cost more than the kernel saves; only the whole call shows it.

    ``passes``: for an op whose passes are tuned one by one, the key parts of those passes. While
    one is undecided the op serves the call and the question waits for a later call; then the whole
    call is measured only where their measured times (``decided_us``) sum to less than
    ``WHOLE_CALL_US``; above it the op keeps the call without a measurement.

    ``fused`` and ``unfused``: zero-argument callables returning the call's output. The unfused
    formulation is the incumbent (the op must beat it by the margin). ``memo``: the call's signature
    as for ``choose``; ``key_parts``: the op's key parts (a tuple, or a function returning one).
    Forcing "unfused" (``forced``) forces it; any other forced candidate, a backend other than cpp
    requested for the op, ``PYHAPPY_TUNE=off``, tracing and non-CPU tensors keep the op. The
    decision is stored as "torch" (unfused) or "op"."""
    return whole_call_pick(op, memo, key_parts, {"op": fused}, unfused, example, grad_inputs, cold, passes) == "torch"


def whole_call_pick(op: str, memo, key_parts, fused: dict, unfused, example, grad_inputs=(), cold=(),
                    passes=None, incumbents=()) -> str | None:
    """``unfused_call`` with several ways to run the op's call: ``fused`` maps names to zero-argument
    callables returning the call's output (e.g. an op's C++ node with different candidates for its
    passes), the first the default. Returns "torch" where the unfused formulation serves, the name
    of the fused way that serves (one that beat the incumbent by the margin, or the incumbent), "op"
    where the passes take ``WHOLE_CALL_US`` or more (nothing measured: the op serves with its passes'
    decisions), or None where nothing is decided (a pass still undecided, or the conditions under
    which ``unfused_call`` keeps the op). A measured decision is stored under the pass "step"
    (training calls: ``grad_inputs``) or "call" and remembered for ``cached_pick(op, (pass, memo))``.
    Timing every way against the unfused formulation in the same rounds keeps one noisy pass
    measurement from deciding which fused way the step is compared with. ``incumbents``: names of
    fused ways that keep near ties instead of the unfused formulation, the fastest of them (no
    margin among them) the incumbent: ways whose products are the unfused formulation's, or that
    can only be as slow, without its Python autograd layers."""
    f = _local.forced
    if f is not None:
        return "torch" if f == "unfused" else None
    if example.device.type != "cpu" or torch.compiler.is_compiling() or requested(op) not in (None, "cpp"):
        return None
    pass_ = "step" if grad_inputs else "call"
    memo = (pass_, memo)
    m = mode()
    if m == "off":
        return None
    mk = _memo_key(op, memo, m)
    hit = _memo.get(mk)
    if hit is not None:
        return hit
    if passes is not None:
        us = _passes_us(op, passes)
        if us is None:
            if len(_pending) > 4096:
                _pending.clear()
            _pending[mk] = (op, tuple(passes))
            return None
        _pending.pop(mk, None)
        if us >= WHOLE_CALL_US:
            _memo_put(mk, "op")
            return "op"

    def run(fn):
        if not grad_inputs:
            return fn

        def step():
            out = fn()
            torch.autograd.grad(out, grad_inputs, torch.ones_like(out), allow_unused=True)
        return step

    def way(fn):
        step = run(fn)

        def call():
            return step()
        call.warmup = step  # the op's own passes measure their candidates on its first run, untimed
        return call

    def cands():
        c = {**{n: way(fn) for n, fn in fused.items()}, "torch": run(unfused)}
        for n in incumbents:
            if n in fused:
                c[n].incumbent = True
        return c

    def key():
        return (pass_, *(key_parts() if callable(key_parts) else key_parts))
    pick = choose(op, key, cands, next(iter(fused)), example, memo=memo, cold=cold, settle=True)
    take_result()  # a step's output is spent: the caller runs the pick on the call's inputs
    return pick if _memo.get(mk) is not None else None


def _adapter_modules(model):
    from . import nn as pnn

    kinds = tuple(getattr(pnn, n) for n in pnn.__all__ if isinstance(getattr(pnn, n), type))
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def tune(model: torch.nn.Module, *example_args, backward: bool = True, progress: bool = True,
         **example_kwargs) -> list:
    """Measure every key the model's pyhappy layers meet on these inputs (one forward, and one
    backward of the output's sum when ``backward`` and the output requires grad; then the same
    again where a layer's passes turned out fast enough for its whole call to be measured against
    the unfused formulation, which needs its passes decided: ``unfused_call``), store the
    winners in the cache, print progress and a summary table (``progress=False``: silent), and
    return the decisions measured now. Keys already in the cache are not measured again; the model's
    parameters and gradients are left as they were."""
    import sys

    if mode() != "on":
        raise RuntimeError(f"pyhappy.tune: PYHAPPY_TUNE={mode()!r} measures nothing; unset it or set it to 'on'")
    t = tuner()
    first, measured0 = len(t.log), t.measured_s
    mods = _adapter_modules(model)
    hooks = []
    if progress:
        done = {"n": 0}

        def hook(mod, args, out):
            done["n"] += 1
            sys.stderr.write(f"\rpyhappy.tune: {done['n']}/{len(mods)} layers, {len(t.log) - first} keys measured")
            sys.stderr.flush()

        hooks = [m.register_forward_hook(hook) for _, m in mods]
    grads = {p: p.grad for p in model.parameters()}
    t0 = time.perf_counter()
    _pending.clear()

    def step():
        out = model(*example_args, **example_kwargs)
        out = out if isinstance(out, torch.Tensor) else getattr(out, "logits", out[0] if isinstance(out, (list, tuple))
                                                                else None)
        if backward and isinstance(out, torch.Tensor) and out.requires_grad:
            out.float().sum().backward()
    try:
        step()
        if pending_fast_calls():  # whole-call decisions of fast layers, made once their passes are decided
            for h in hooks:
                h.remove()
            hooks = []
            step()
    finally:
        for h in hooks:
            h.remove()
        for p, g in grads.items():
            p.grad = g
    new = t.log[first:]
    if progress:
        sys.stderr.write("\n")
        print(summary(new, time.perf_counter() - t0, t.measured_s - measured0))
    return new


def summary(decisions, seconds: float | None = None, measuring_s: float | None = None) -> str:
    """A table of decisions: key, the pick, and its time against the default's; then how many keys
    were measured in ``seconds`` (of which ``measuring_s`` measuring candidates)."""
    lines = [f"{'key':64s} {'pick':10s} {'default':10s} pick/default"]
    for d in decisions:
        ratio = d.medians_s[d.choice] / d.medians_s[d.default] if d.medians_s.get(d.default) else float("nan")
        lines.append(f"{d.key:64s} {d.choice:10s} {d.default:10s} {ratio:.3f}")
    if seconds is not None:
        spent = "" if measuring_s is None else f" ({measuring_s:.2f} s of it measuring candidates)"
        lines.append(f"{len(decisions)} keys measured in {seconds:.2f} s{spent}; cache: {cache_path()}")
    return "\n".join(lines)


def main(argv=None):
    """``python -m pyhappy.tune``: show the cache in use (``--clear`` empties it)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pyhappy.tune", description=__doc__.split("\n")[0])
    ap.add_argument("--clear", action="store_true", help="delete the cache file in use")
    args = ap.parse_args(argv)
    t = tuner()
    if args.clear:
        t.clear()
        print(f"cleared {t.path}")
        return
    e = t.entries()
    print(f"mode: {mode()}   cache: {t.path}   {len(e)} keys")
    for k, v in sorted(e.items()):
        times = ", ".join(f"{n} {us:g} us" for n, us in v.get("median_us", {}).items())
        part = v.get("rows_timed")
        note = f"; the others timed on {part:.0%} of the rows, scaled" if part else ""
        print(f"  {k:64s} -> {v['choice']:10s} ({times}{note})")

