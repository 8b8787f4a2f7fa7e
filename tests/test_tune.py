"""pyhappy.tune, the measured CPU dispatch: the tuner (cache, modes, corruption, concurrent writers)
driven by a fake clock, so nothing real is timed; and every candidate schedule of each tuned op
against the reference."""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import os
import warnings

import pytest
import torch

import pyhappy
from pyhappy import reference
from pyhappy.ops import lora_linear

import helpers
from helpers import HAS_CPP, compiled_agrees, run_in_threads

T = importlib.import_module("pyhappy._tune")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def cands(clock, costs, calls=None):
    """Candidates that 'take' costs[name] seconds on the fake clock and count their calls; each run
    returns (name, its call count), which tells which run an output came from."""
    calls = {} if calls is None else calls

    def make(n):
        def run():
            calls[n] = calls.get(n, 0) + 1
            clock.t += costs[n]
            return (n, calls[n])
        return run
    return {n: make(n) for n in costs}, calls


def runs(clock, calls, name, costs):
    """A candidate whose successive runs take costs[0], costs[1], ... (the last repeated) on the fake
    clock, counted in calls[name]; each returns "<name>-out"."""
    def run():
        clock.t += costs[min(calls[name], len(costs) - 1)]
        calls[name] += 1
        return f"{name}-out"
    return run


def test_challenger_must_win_by_the_margin(tmp_path):
    """The unfused formulation ("torch") is the incumbent where offered: a fused schedule must beat it
    by more than the margin; without it, the op's default is the incumbent."""
    clock = Clock()
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock, margin=0.03)
    c, calls = cands(clock, {"cpp": 0.6, "torch": 0.5})
    assert t.pick("k1", c, "cpp") == "torch"
    # a warm-up round longer than the budget is the measurement (the default, which lost, taken again)
    assert calls == {"cpp": 2, "torch": 1}
    c, _ = cands(clock, {"cpp": 0.98, "torch": 1.0})  # fused 2% faster: inside the margin, unfused stays
    assert t.pick("k2", c, "cpp") == "torch"
    c, _ = cands(clock, {"cpp": 1.0, "torch": 0.99})  # fused 1% slower: never kept over the unfused
    assert t.pick("k3", c, "cpp") == "torch"
    c, _ = cands(clock, {"cpp": 0.9, "torch": 1.0})
    assert t.pick("k4", c, "cpp") == "cpp"
    c, _ = cands(clock, {"cpp": 1.0, "cpp_aten": 0.98})  # no unfused candidate: the default is incumbent
    assert t.pick("k5", c, "cpp") == "cpp"
    c, _ = cands(clock, {"cpp": 1.0, "cpp_aten": 0.9, "torch": 0.95})
    assert t.pick("k6", c, "cpp") == "cpp_aten"


def test_short_calls_are_measured_in_rounds_after_a_warm_up(tmp_path):
    clock = Clock()
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock, budget_s=0.2)
    c, calls = cands(clock, {"cpp": 0.010, "torch": 0.009, "cpp_aten": 0.005})
    assert t.pick("k", c, "cpp") == "cpp_aten"
    # a warm-up each, then rotated rounds until the budget is spent (0.024 s a round), at most max_rounds
    assert calls["cpp"] == calls["torch"] == calls["cpp_aten"] == 1 + 9
    d = t.log[-1]
    assert d.medians_s == pytest.approx({"cpp": 0.010, "torch": 0.009, "cpp_aten": 0.005})


def test_a_candidate_far_slower_than_the_fastest_is_left_out_of_the_rounds(tmp_path):
    """A short call whose unfused formulation takes ~50x the kernels' time (a decode's
    dequantize-then-matmul): after the warm-up round it is taken once more (a first run can carry a
    one-time cost), then not run again, its time standing, and the close candidates take the rounds
    (each following the other as often). Slower by less than ``far`` times, or by less than
    ``far_s`` seconds, a candidate stays in the rounds."""
    clock = Clock()
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock, budget_s=0.2, far=8.0, far_s=1e-3)
    c, calls = cands(clock, {"cpp": 0.0005, "torch": 0.025, "cpp_intdot": 0.00045})
    assert t.pick("k", c, "cpp") == "cpp_intdot"
    assert calls == {"cpp": 1 + 15, "torch": 2, "cpp_intdot": 1 + 15}  # max_rounds: the budget is not spent
    assert t.log[-1].medians_s == pytest.approx({"cpp": 0.0005, "torch": 0.025, "cpp_intdot": 0.00045})
    c, calls = cands(clock, {"cpp": 0.0001, "torch": 0.0009})  # 9x, but 0.8 ms: stays
    assert t.pick("k2", c, "cpp") == "cpp" and calls["torch"] > 1
    c, calls = cands(clock, {"cpp": 0.001, "torch": 0.0075})  # 7.5x: stays
    assert t.pick("k3", c, "cpp") == "cpp" and calls["torch"] > 1
    c, calls = cands(clock, {"cpp": 0.006, "torch": 0.0005})  # the default itself far behind: left out
    assert t.pick("k4", c, "cpp") == "torch" and calls["cpp"] == 2
    # A first run that paid a one-time cost (the process's first call into the kernel, 10 ms) is
    # taken again, and the candidate measured in the rounds at its steady 30 us.
    calls = {"cpp": 0, "torch": 0}
    c = {"cpp": runs(clock, calls, "cpp", [0.010, 0.00003]), "torch": runs(clock, calls, "torch", [0.00009])}
    assert t.pick("k5", c, "cpp") == "cpp" and calls["cpp"] > 2
    assert t.log[-1].medians_s["cpp"] == pytest.approx(0.00003)


def _sliced_cands(clock, costs, raises=()):
    """cands() of a 512-row call whose members carry a slice run (a quarter of the rows) taking
    costs[name] / 4 (or the second entry of a (whole, slice) pair), counted apart in the second
    dict; a name in ``raises`` fails on its slice."""
    scale = 4.0
    whole = {n: (c if isinstance(c, float) else c[0]) for n, c in costs.items()}
    part = {n: (c / scale if isinstance(c, float) else c[1]) for n, c in costs.items()}
    c, calls = cands(clock, whole)
    slices: dict = {}

    def small(n):
        def run():
            slices[n] = slices.get(n, 0) + 1
            if n in raises:
                raise RuntimeError("no slice")
            clock.t += part[n] if not isinstance(part[n], list) else part[n][min(slices[n] - 1, len(part[n]) - 1)]
        return run
    return T.sliced(c, 512, lambda m: {n: small(n) for n in costs}), calls, slices


def test_a_large_call_times_its_candidates_on_a_slice_of_its_rows(tmp_path):
    """A call above the budget whose candidates carry a slice of its rows: each candidate runs once on
    the slice, the winner (by the margin over the incumbent) once on the whole call, whose output the
    call gets; the losers never run whole, their medians are their slice times scaled by the
    winner's whole-call time over its slice's. Near ties, slices that fail, and calls whose slices
    scaled up fit the budget are measured on the whole call as before."""
    clock = Clock()
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock, budget_s=0.2, margin=0.03)
    c, calls, slices = _sliced_cands(clock, {"cpp": (0.44, 0.1), "torch": (0.6, 0.15)})
    assert t.pick("k1", c, "cpp") == "cpp"
    assert slices == {"cpp": 1, "torch": 1} and calls == {"cpp": 1}
    assert T.take_result() == (("cpp", 1),)  # the winner's whole run is the call's output
    assert t.log[-1].medians_s == pytest.approx({"cpp": 0.44, "torch": 0.15 * 4.4})
    assert t.entries()["k1"]["rows_timed"] == 0.25  # the cache says the losers' times are scaled
    # beyond twice the margin the slice decides either way: the fused schedule 7% faster, or slower
    c, calls, slices = _sliced_cands(clock, {"cpp": (0.5, 0.1), "torch": (0.6, 0.1075)})
    assert t.pick("k2", c, "cpp") == "cpp" and calls == {"cpp": 1}
    c, calls, slices = _sliced_cands(clock, {"cpp": (0.5, 0.1), "torch": (0.6, 0.09)})
    assert t.pick("k3", c, "cpp") == "torch" and calls == {"torch": 1}
    # a near tie (within twice the margin of the unfused incumbent) on the slice: the whole calls
    # decide, where the incumbent keeps the key unless beaten by the margin
    c, calls, slices = _sliced_cands(clock, {"cpp": (0.59, 0.1), "torch": (0.6, 0.104)})
    assert t.pick("k4", c, "cpp") == "torch" and calls["torch"] >= 1 and calls["cpp"] >= 1
    assert t.log[-1].medians_s == pytest.approx({"cpp": 0.59, "torch": 0.6})
    assert "rows_timed" not in t.entries()["k4"]
    # a slice that raises: the whole calls decide
    c, calls, slices = _sliced_cands(clock, {"cpp": 0.5, "torch": 0.8}, raises=("torch",))
    assert t.pick("k5", c, "cpp") == "cpp" and calls["torch"] >= 1
    # slices that scaled up fit the budget: the whole call's rounds decide
    c, calls, slices = _sliced_cands(clock, {"cpp": 0.02, "torch": 0.03})
    assert t.pick("k6", c, "cpp") == "cpp" and calls["cpp"] > 1 and calls["torch"] > 1
    # a slice sample above ``outlier`` times the fastest is taken again, the faster kept; the
    # default, where its one sample lost, too
    c, calls, slices = _sliced_cands(clock, {"cpp": (0.4, 0.1), "torch": (0.6, [0.5, 0.15])})
    assert t.pick("k7", c, "cpp") == "cpp" and slices == {"cpp": 1, "torch": 2}
    assert t.log[-1].medians_s["torch"] == pytest.approx(0.6)
    c, calls, slices = _sliced_cands(clock, {"cpp": (0.4, [0.14, 0.1]), "torch": (0.6, 0.13)})
    assert t.pick("k8", c, "cpp") == "cpp" and slices == {"cpp": 2, "torch": 1} and calls == {"cpp": 1}
    # whole-call decisions (settle) are never sliced
    c, calls, slices = _sliced_cands(clock, {"cpp": (0.4, 0.1), "torch": (0.6, 0.15)})
    assert t.pick("k9", c, "cpp", settle=True) == "cpp" and not slices and calls["torch"] >= 1
    assert T.slice_rows(511) is None and T.slice_rows(512) == 128 and T.slice_rows(1000) == 250


@pytest.mark.skipif(not HAS_CPP, reason="needs the C++ extension")
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_a_large_lora_call_decided_on_a_slice_computes_the_whole_call(tmp_path, monkeypatch, dropout_p):
    """lora_linear at 512 rows, each pass decided on a quarter of the rows (a tuner whose budget any
    call exceeds): the call's output and gradients are the whole call's, equal to the reference's,
    and each pass's candidates were offered on a quarter of the rows."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    t = T.Tuner(T.cache_path(), budget_s=0.0)
    monkeypatch.setitem(T._tuners, T.cache_path(), t)
    seen = []
    real = T.Tuner._measure_sliced

    def spy(self, candidates, default, flush):
        got = real(self, candidates, default, flush)
        seen.append({n: f.sliced[0] for n, f in candidates.items()})
        return got
    monkeypatch.setattr(T.Tuner, "_measure_sliced", spy)
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 512, 64, 48, 4
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    A = (torch.randn(r, K, generator=g) * 0.1).requires_grad_()
    B = (torch.randn(N, r, generator=g) * 0.1).requires_grad_()
    seed = torch.tensor([7])
    y = lora_linear(x, W, b, A, B, 0.5, dropout_p=dropout_p, seed=seed)
    y.backward(torch.ones_like(y))
    ref = reference.lora_linear(x.detach(), W, b, A.detach(), B.detach(), 0.5, None, dropout_p, seed)[0]
    torch.testing.assert_close(y.detach(), ref)
    xr, Ar, Br = (v.detach().clone().requires_grad_() for v in (x, A, B))
    reference.lora_linear(xr, W, b, Ar, Br, 0.5, None, dropout_p, seed)[0].backward(torch.ones_like(y))
    for got, want in ((x.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad)):
        torch.testing.assert_close(got, want)
    assert len(seen) == 2 and all({"cpp", "torch"} <= set(k) and set(k.values()) == {4.0} for k in seen)
    assert len(t.log) == 2


def test_cold_tensors_are_evicted_before_every_timed_run(tmp_path):
    """A layer's weight is flushed from the caches before each candidate's run, outside the timed
    span, so candidates are timed as a model's layer meets its weight (read from memory): an eviction
    that took clock time would be charged to the candidate."""
    clock = Clock()
    w, b = torch.zeros(4), torch.zeros(2)
    order = []

    def evict(t):
        order.append(("evict", id(t)))
        clock.t += 5.0  # not charged to any candidate
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock, budget_s=0.2, evict=evict)
    costs = {"cpp": 0.010, "torch": 0.009}

    def make(n):
        def run():
            order.append(("run", n))
            clock.t += costs[n]
        return run
    assert t.pick("k", {n: make(n) for n in costs}, "cpp", cold=(w, None, b)) == "torch"
    runs = [i for i, e in enumerate(order) if e[0] == "run"]
    assert len(runs) == 2 * (1 + 11)  # a warm-up each, then 11 rounds of 0.019 s fill the 0.2 s budget
    for i in runs:  # each run preceded by the eviction of both tensors (None skipped)
        assert order[i - 2:i] == [("evict", id(w)), ("evict", id(b))]
    assert t.log[-1].medians_s == pytest.approx(costs)
    # without an evict function (tests, other devices) nothing is flushed
    order.clear()
    t2 = T.Tuner(str(tmp_path / "c2.json"), clock=clock, budget_s=0.2)
    t2.pick("k", {n: make(n) for n in costs}, "cpp", cold=(w,))
    assert all(e[0] == "run" for e in order)


@pytest.mark.skipif(not pyhappy._ext.available(), reason="needs the C++ extension")
def test_evict_from_caches_accepts_cpu_tensors_of_any_layout():
    e = pyhappy._ext.load()
    x = torch.randn(64, 33)
    before = x.clone()
    assert e.evict_from_caches(x.t()) in (True, False)
    assert e.evict_from_caches(torch.empty(0)) is False
    assert torch.equal(x, before)  # flushing writes back, never changes values
    T._evict(x[1:, 3:])  # a view: its whole storage


def test_the_pick_of_a_measuring_call_is_not_run_again(tmp_path, monkeypatch):
    """The candidates run on the call's own inputs, so the winner's output of its last measured run
    is the call's result: run_pick returns it without another run; a cached decision runs the pick
    once."""
    clock = Clock()
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    c, calls = cands(clock, {"cpp": 0.6, "torch": 0.5})
    monkeypatch.setitem(T._tuners, T.cache_path(), T.Tuner(T.cache_path(), clock=clock))
    assert T.run_pick("op", ("a",), c, "cpp") == ("torch", 1) and calls == {"cpp": 2, "torch": 1}
    assert T.take_result() is None
    assert T.run_pick("op", ("a",), c, "cpp") == ("torch", 2) and calls == {"cpp": 2, "torch": 2}


def test_run_choice_runs_a_direct_pick_without_building_the_candidates(tmp_path, monkeypatch):
    """run_choice returns (pick, output); a decided call whose pick ``direct`` holds runs it without
    building the candidates (an op's candidate function may probe the machine), any other pick is
    taken from the candidates, and a pick no longer offered falls back to the default."""
    clock = Clock()
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    run, calls = cands(clock, {"cpp": 0.5, "torch": 1.0})
    built = []

    def build():
        built.append(1)
        return run
    monkeypatch.setitem(T._tuners, T.cache_path(), T.Tuner(T.cache_path(), clock=clock))
    assert T.run_choice("op", ("a",), build, "torch", direct={"cpp": run["cpp"]}) == ("cpp", ("cpp", calls["cpp"]))
    n = len(built)
    assert T.run_choice("op", ("a",), build, "torch", direct={"cpp": run["cpp"]})[0] == "cpp"
    assert len(built) == n + 1  # choose builds them to check the cached pick is offered; run_choice does not
    assert T.run_choice("op", ("a",), build, "torch", direct={"torch": run["torch"]})[0] == "cpp"
    assert len(built) == n + 3  # cpp is not direct: taken from the candidates
    with T.forced("torch"):
        assert T.run_choice("op", ("a",), run, "cpp", direct={}) == ("torch", ("torch", calls["torch"]))
    # A pick offered when choose built the candidates but not when they are built again to run it
    # (with_aten_engine's cpp_aten after the fp32 engine changed): the default serves.
    offers = [{**run, **cands(clock, {"aten": 0.1}, calls)[0]}, run]
    before = calls["cpp"]
    with T.forced("aten"):
        assert T.run_choice("op", ("a",), lambda: offers.pop(0), "cpp") == ("aten", ("cpp", before + 1))
    assert "aten" not in calls


def test_cache_hit_measures_nothing_and_persists(tmp_path):
    clock = Clock()
    path = str(tmp_path / "c.json")
    t = T.Tuner(path, clock=clock)
    c, calls = cands(clock, {"cpp": 0.001, "torch": 0.002})
    assert t.pick("k", c, "torch") == "cpp"
    n = dict(calls)
    assert t.pick("k", c, "torch") == "cpp" and calls == n  # hit: no call
    data = json.load(open(path))
    assert data["machine"] == T.machine() and data["entries"]["k"]["choice"] == "cpp"
    t2 = T.Tuner(path, clock=clock)
    c2, calls2 = cands(clock, {"cpp": 5.0, "torch": 0.001})
    assert t2.pick("k", c2, "torch") == "cpp" and calls2 == {}  # a new process reads the file
    assert t2.pick("k", {"torch": c2["torch"], "other": c2["cpp"]}, "torch") in ("torch", "other")  # stale choice


@pytest.mark.parametrize("content", [b"{not json", b"[]", json.dumps({"schema": 1, "machine": {"cpu": "elsewhere"},
                                                                      "entries": {"k": {"choice": "torch"}}}).encode(),
                                     json.dumps({"schema": 1, "machine": None, "entries": {"k": 3}}).encode()])
def test_a_corrupt_or_foreign_cache_is_ignored_with_one_warning_and_rebuilt(tmp_path, content):
    path = tmp_path / "c.json"
    path.write_bytes(content)
    clock = Clock()
    t = T.Tuner(str(path), clock=clock)
    c, _ = cands(clock, {"cpp": 1.0, "torch": 2.0})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert t.pick("k", c, "torch") == "cpp"
        assert t.pick("k2", c, "torch") == "cpp"
    assert len([x for x in w if "ignoring the tuning cache" in str(x.message)]) == 1
    data = json.loads(path.read_text())
    assert data["machine"] == T.machine() and set(data["entries"]) == {"k", "k2"}


def test_a_candidate_that_raises_drops_out_but_the_default_may_not(tmp_path):
    clock = Clock()
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock)
    c, _ = cands(clock, {"cpp": 1.0})

    def boom():
        raise RuntimeError("cannot serve")
    assert t.pick("k", {"cpp": c["cpp"], "torch": boom}, "cpp") == "cpp"
    with pytest.raises(RuntimeError, match="cannot serve"):
        t.pick("k2", {"cpp": boom, "torch": c["cpp"]}, "cpp")


def _writer(path, prefix, n):
    t = T.Tuner(path, clock=Clock())
    for i in range(n):
        clock = t.clock
        c, _ = cands(clock, {"a": 1.0, "b": 2.0})
        t.pick(f"{prefix}{i}", c, "b")


def test_concurrent_writers_leave_a_whole_file_with_every_key(tmp_path):
    path = str(tmp_path / "c.json")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, p, 25)) for p in ("x", "y", "z")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.load(open(path))
    assert set(data["entries"]) == {f"{p}{i}" for p in "xyz" for i in range(25)}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    clock = Clock()
    t = T.tuner()
    t.clock = clock
    c, calls = cands(clock, {"cpp": 1.0, "torch": 0.1})
    monkeypatch.setenv("PYHAPPY_TUNE", "off")
    assert T.choose("op", ("k",), c, "cpp") == "cpp" and calls == {}
    monkeypatch.setenv("PYHAPPY_TUNE", "cache")
    assert T.choose("op", ("k",), c, "cpp") == "cpp" and calls == {}  # unseen: default, nothing measured
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    assert T.choose("op", ("k",), c, "cpp") == "torch" and calls
    n = dict(calls)
    monkeypatch.setenv("PYHAPPY_TUNE", "cache")
    assert T.choose("op", ("k",), c, "cpp") == "torch" and calls == n
    with T.forced("cpp"):
        assert T.choose("op", ("k",), c, "torch") == "cpp"
    monkeypatch.setenv("PYHAPPY_TUNE", "sometimes")
    with pytest.raises(ValueError, match="PYHAPPY_TUNE"):
        T.choose("op", ("k",), c, "cpp")


def test_fake_tensors_are_never_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    clock = Clock()
    T.tuner().clock = clock
    c, calls = cands(clock, {"cpp": 1.0, "torch": 0.1})
    assert T.choose("op", ("k",), c, "cpp", torch.empty(2, 2, device="meta")) == "cpp" and calls == {}


def test_bucket():
    assert [T.bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 512, 513)] == [1, 2, 4, 4, 8, 8, 16, 512, 1024]


# ---- every candidate of each tuned op against the reference ------------------------------------

needs_cpp = pytest.mark.skipif(not pyhappy.backends.unavailable_reason("cpp", torch.device("cpu")) is None,
                               reason="pyhappy._C not built")


def _decode_kernels():
    from pyhappy import _ext

    e = _ext.load()
    return e is not None and e.gemv_serves(torch.empty(1, 8), torch.empty(8, 8).t())


def _onednn():
    from pyhappy import _ext

    return _ext.load() is not None and _ext.load().fp32_gemm() == "onednn"


@needs_cpp
@pytest.mark.parametrize("candidate", ["cpp", "torch", "cpp_aten"])
@pytest.mark.parametrize("M,core,p,bias", [(1, False, 0.0, True), (17, True, 0.0, False), (64, False, 0.25, True),
                                           (5, False, 0.0, False)])
def test_lora_linear_every_candidate_matches_the_reference(candidate, M, core, p, bias):
    g = torch.Generator().manual_seed(M)
    K, N, r = 48, 40, 6
    if candidate == "cpp_aten" and not (_onednn() or (M <= 4 and _decode_kernels())):
        pytest.skip("cpp_aten is offered where the products would not run on ATen: fp32 on oneDNN (AVX-512F), "
                    "or a decode-sized base product on pyhappy's streaming kernels (AVX2)")
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g) if bias else None
    A = torch.randn(r, K, generator=g, requires_grad=True)
    B = torch.randn(N, r, generator=g, requires_grad=True)
    C = torch.randn(r, r, generator=g, requires_grad=True) if core else None
    seed = torch.tensor([7])
    dy = torch.randn(M, N, generator=g)
    with T.forced(candidate):
        y = lora_linear(x, W, b, A, B, 1.5, C, p, seed=seed)
        y.backward(dy)
    got = [y.detach(), x.grad, A.grad, B.grad] + ([C.grad] if core else [])
    for t in (x, A, B) + ((C,) if core else ()):
        t.grad = None
    ref, _ = reference.lora_linear(x, W, b, A, B, 1.5, C, p, seed)
    ref.backward(dy)
    want = [ref.detach(), x.grad, A.grad, B.grad] + ([C.grad] if core else [])
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-4)


@needs_cpp
def test_lora_linear_tunes_once_per_key_and_follows_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    tuner = T.tuner()
    x, W = torch.randn(9, 32), torch.randn(24, 32)
    A, B = torch.randn(4, 32), torch.randn(24, 4)
    y = lora_linear(x, W, None, A, B, 2.0)
    keys = [k for k in tuner.entries() if k.startswith("lora_linear|fwd|float32|M16|K32|N24|r4")]
    assert len(keys) == 1
    tuner.entries()[keys[0]]["choice"] = "torch"  # whatever the cache says is what runs
    T._memo.clear()  # (the per-call memo of decisions already made is rebuilt from the cache)
    calls = []
    monkeypatch.setattr(importlib.import_module("pyhappy.ops.lora_linear"), "_torch_forward",
                        lambda *a: calls.append(1) or reference.lora_linear(*a[:5], a[6], a[5], a[7], a[8]))
    torch.testing.assert_close(lora_linear(x, W, None, A, B, 2.0), y)
    assert calls == [1]
    picks = []
    monkeypatch.setattr(tuner, "pick", lambda *a, **k: picks.append(a) or "cpp")
    # the same call again: decided by the memo, the cache is not read, and the unfused pick runs as
    # plain torch ops at the op's entry (not through the op's candidate)
    torch.testing.assert_close(lora_linear(x, W, None, A, B, 2.0), y)
    assert calls == [1] and picks == []


@needs_cpp
def test_tune_a_model_reports_its_layers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    pyhappy.inject(model, ["0", "2"], r=4)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = pyhappy.tune(model, torch.randn(6, 32))
    out = capsys.readouterr()
    passes = [d for d in new if "|step|" not in d.key]
    assert len(passes) == 4  # fwd + bwd of two shapes
    # layers this small take a whole-step decision too (their passes are fast; none where both passes
    # already picked the unfused formulation), made inside tune(): a training step after it measures nothing
    assert len(new) - len(passes) <= 2 and all(d.key.split("|")[1] == "step" for d in new if d not in passes)
    logged = len(T.tuner().log)
    model(torch.randn(6, 32)).sum().backward()
    assert len(T.tuner().log) == logged
    model.zero_grad(set_to_none=True)
    # which candidate wins depends on this machine's timings: each pick is one of the candidates the
    # tuner measured, and the unfused formulation was among them
    assert all(d.choice in d.medians_s and "torch" in d.medians_s for d in new)
    assert "2/2 layers" in out.err and "keys measured" in out.out
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert pyhappy.tune(model, torch.randn(6, 32), progress=False) == []  # all cached now


@needs_cpp
@pytest.mark.parametrize("candidate", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 17, 64])
def test_sparse_delta_linear_every_candidate_matches_the_reference(candidate, dtype, M):
    from pyhappy.ops import sparse_delta_linear, sparse_layout

    g = torch.Generator().manual_seed(M)
    K, N, nnz = 40, 24, 60
    idx = torch.randperm(N * K, generator=g)[:nnz].sort().values.to(torch.int32)
    layout = sparse_layout(idx, N, K)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    W, b = torch.randn(N, K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    v = torch.randn(nnz, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(dtype)
    with T.forced(candidate):
        y = sparse_delta_linear(x, W, b, v, idx, layout, 0.7)
        y.backward(dy)
    got = [y.detach().float(), x.grad.float(), v.grad.float()]
    x64, v64 = x.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    ref = reference.sparse_delta_linear(x64, W.double(), b.double(), v64, idx, N, 0.7)
    ref.backward(dy.double())
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    for a, w in zip(got, [ref.detach(), x64.grad, v64.grad]):
        torch.testing.assert_close(a, w.float(), **tol)


@needs_cpp
@pytest.mark.parametrize("candidate", ["cpp", "torch"])
def test_lora_linear_multi_every_candidate_matches_the_reference(candidate):
    from pyhappy.ops import lora_linear_multi, stack_adapters

    g = torch.Generator().manual_seed(0)
    K, N = 32, 24
    pairs = [(torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)) for r in (2, 5, 3)]
    A, B = stack_adapters(pairs)
    s = torch.tensor([0.5, 2.0, -1.0])
    x, W, b = torch.randn(13, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    idx = torch.tensor([0, 1, 2, -1, 2, 2, 0, 1, -1, 0, 1, 1, 2])
    with T.forced(candidate), torch.no_grad():
        y = lora_linear_multi(x, W, b, A, B, s, idx)
    torch.testing.assert_close(y, reference.lora_linear_multi(x, W, b, A, B, s, idx), rtol=1e-5, atol=1e-4)


@needs_cpp
def test_ops_trace_with_tuning_on_and_the_unfused_pick_cached(tmp_path, monkeypatch):
    """With tuning on and a cache that picked the unfused formulation, the ops still pass opcheck
    (fake tensors, dynamic shapes: a symbolic row count takes the default; a candidate that reads
    values is not offered while tracing)."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: ("torch", {n: 1.0 for n in c}, c["torch"]()))
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(5, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    A, B = torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g)
    with pyhappy.backends.force("cpp"):
        lora_linear(x, W, b, A, B, 0.5)  # measures (the patched tuner picks "torch") and caches
        torch.library.opcheck(torch.ops.pyhappy.lora_linear, (x, W, b, A, B, None, 0.5, 0.0, None))
        xm, Wm, bm = torch.randn(7, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
        Am, Bm = torch.randn(2, 3, 16, generator=g), torch.randn(2, 8, 3, generator=g)
        s, idx = torch.tensor([0.5, 1.5]), torch.tensor([0, 1, -1, 1, 0, 0, 1])
        torch.ops.pyhappy.lora_linear_multi(xm, Wm, bm, Am, Bm, s, idx)
        torch.library.opcheck(torch.ops.pyhappy.lora_linear_multi, (xm, Wm, bm, Am, Bm, s, idx),
                              test_utils=("test_schema", "test_faketensor"))
    assert any(k.startswith("lora_linear|") for k in T.tuner().entries())
    assert any(k.startswith("lora_linear_multi|") for k in T.tuner().entries())


@needs_cpp
@pytest.mark.parametrize("core", [False, True])
def test_lora_linear_runs_plain_torch_ops_where_the_unfused_pick_is_cached(tmp_path, monkeypatch, core):
    """Once the tuner picked the unfused formulation for a layer's forward and backward, and for
    its whole step (a small layer), the functional op runs it as plain torch ops (no custom op
    call), with the same values and gradients; a fused pick, a forced backend, a forced candidate
    or dropout keep the op."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    picks = {"choice": "torch"}

    def measure(self, c, d, cold=(), settle=False):  # every candidate 100 us: the passes are a small layer's
        pick = picks["choice"] if picks["choice"] in c else d
        return pick, {n: 1e-4 for n in c}, c[pick]()
    monkeypatch.setattr(T.Tuner, "measure", measure)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    W, b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    A = torch.randn(4, 16, generator=g, requires_grad=True)
    B = torch.randn(8, 4, generator=g, requires_grad=True)
    C = torch.randn(4, 4, generator=g, requires_grad=True) if core else None
    params = [x, A, B] + ([C] if core else [])

    def step(**kw):
        for p in params:
            p.grad = None
        y = lora_linear(x, W, b, A, B, 0.5, C, **kw)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in params]
    calls = []
    eager = importlib.import_module("pyhappy.ops.lora_linear")._Eager  # what an eager training call runs
    real = eager.apply
    monkeypatch.setattr(eager, "apply", lambda *a: calls.append(1) or real(*a))
    ext = pyhappy._ext.load()  # a fused training call whose passes the C++ kernels serve: one C++ node
    real_step = ext.lora_linear_step
    monkeypatch.setattr(ext, "lora_linear_step", lambda *a: calls.append(1) or real_step(*a))
    y0, g0 = step()  # measures forward and backward, both "torch"
    assert len(calls) == 1
    y1, g1 = step()
    assert len(calls) == 1  # served by plain torch ops
    torch.testing.assert_close(y1, y0)
    for a, e in zip(g1, g0):
        torch.testing.assert_close(a, e)
    with torch.no_grad():
        torch.testing.assert_close(lora_linear(x, W, b, A, B, 0.5, C), y0)
    assert len(calls) == 1
    step(dropout_p=0.1)
    assert len(calls) == 2
    with pyhappy.backends.force("reference"):
        step()
    assert len(calls) == 3
    with T.forced("cpp"):
        step()
    assert len(calls) == 4
    # a fused pick (another shape: a new tuning key) keeps the custom op
    picks["choice"] = "cpp"
    W2, b2, B2 = torch.randn(12, 16, generator=g), torch.randn(12, generator=g), torch.randn(12, 4, generator=g)
    lora_linear(x, W2, b2, A, B2, 0.5, C).sum().backward()  # measures the passes (the registered op)
    lora_linear(x, W2, b2, A, B2, 0.5, C).sum().backward()  # measures the whole step, then runs the op's pick
    assert len(calls) == 7


@needs_cpp
@pytest.mark.parametrize("candidate", ["contract", "reconstruct", "torch", "cpp"])
@pytest.mark.parametrize("M,with_weight,bias", [(3, True, True), (40, True, False), (9, False, True)])
def test_tt_linear_every_candidate_matches_the_reference(candidate, M, with_weight, bias):
    """tt_linear's forward candidates (the two plans and the unfused torch formulation) and backward
    candidates (C++ or torch environment contraction), each forced, agree with the reference."""
    from pyhappy.ops.tt_linear import tt_matrix_linear

    g = torch.Generator().manual_seed(M)
    N, K = 24, 36  # 2·3·4 and 3·3·4
    cores = [torch.randn(1, 2, 3, 3, generator=g), torch.randn(3, 3, 3, 2, generator=g),
             torch.randn(2, 4, 4, 1, generator=g)]
    cores = [c.requires_grad_() for c in cores]
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W = torch.randn(N, K, generator=g) if with_weight else None
    b = torch.randn(N, generator=g) if bias else None
    dy = torch.randn(M, N, generator=g)

    def run():
        y = tt_matrix_linear(x, W, b, cores, 0.7, N=N)
        y.backward(dy)
        out = [y.detach(), x.grad.clone()] + [c.grad.clone() for c in cores]
        for t in (x, *cores):
            t.grad = None
        return out

    with T.forced(candidate), pyhappy.backends.force("cpp"):
        got = run()
    with pyhappy.backends.force("reference"):
        want = run()
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-4)


def _whole_call_measure(monkeypatch, choice):
    """Tuner.measure stand-in: the whole-call decision ("op" against "torch") goes to ``choice``,
    each pass inside an op to its default; the candidates run once, as a measurement runs them."""
    def measure(self, c, d, cold=(), settle=False):
        pick = choice["whole"] if set(c) == {"op", "torch"} else d
        for f in c.values():
            f()
        return pick, {n: 1.0 for n in c}, c[pick]()
    monkeypatch.setattr(T.Tuner, "measure", measure)


def _unfused_agrees(call, params, tol):
    """The call's output and the params' gradients of a loss on it: the same with the whole call
    forced to the unfused formulation as with the op. Returns the op's output."""
    def step():
        for p in params:
            p.grad = None
        y = call()
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in params]
    want = step()
    with T.forced("unfused"):
        got = step()
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=tol, atol=tol)
    return want[0]


def _dora_inputs(g, bias):
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    W = torch.randn(8, 16, generator=g) / 4
    b = torch.randn(8, generator=g) if bias else None
    A = (torch.randn(4, 16, generator=g) / 4).requires_grad_()
    B = (torch.randn(8, 4, generator=g) / 2).requires_grad_()
    m = (torch.linalg.vector_norm(W, dim=1) * 1.1).requires_grad_()
    return x, W, b, A, B, m


@pytest.mark.parametrize("bias", [False, True])
def test_dora_linear_unfused_formulation_matches_the_op(bias):
    """The whole-call candidate of dora_linear (PEFT's formulation by torch ops: the detached norm of
    the formed W + s·BA) gives the op's values and gradients (x, A, B, magnitude, bias)."""
    from pyhappy.ops import dora_linear, dora_weight_sqnorm

    x, W, b, A, B, m = _dora_inputs(torch.Generator().manual_seed(3), bias)
    if bias:
        b.requires_grad_()
    params = [t for t in (x, b, A, B, m) if t is not None]

    y = _unfused_agrees(lambda: dora_linear(x, W, b, A, B, m, 0.75, weight_sqnorm=dora_weight_sqnorm(W)), params,
                        1e-5)
    with torch.no_grad(), T.forced("unfused"):
        torch.testing.assert_close(dora_linear(x, W, b, A, B, m, 0.75), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("whole", ["torch", "op"])
def test_dora_linear_whole_call_pick_is_measured_once_and_followed(tmp_path, monkeypatch, whole):
    """A training call of dora_linear measures the op against the unfused formulation as whole
    steps (forward and backward), stores the decision under its own key and follows it: with
    "torch" later calls run no custom op; with "op" they do. Tuning off always keeps the op."""
    from pyhappy.ops import dora_linear

    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    _whole_call_measure(monkeypatch, {"whole": whole})
    x, W, b, A, B, m = _dora_inputs(torch.Generator().manual_seed(4), True)
    calls = []
    eager = importlib.import_module("pyhappy.ops.dora_linear")._Eager  # what an eager training call runs
    real = eager.apply
    monkeypatch.setattr(eager, "apply", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        for p in (x, A, B, m):
            p.grad = None
        dora_linear(x, W, b, A, B, m, 0.5).sum().backward()
    assert all(p.grad is not None for p in (x, A, B, m))
    keys = [k for k in json.load(open(tmp_path / "c.json"))["entries"] if k.startswith("dora_linear|step|")]
    assert len(keys) == 1 and json.load(open(tmp_path / "c.json"))["entries"][keys[0]]["choice"] == whole
    n = len(calls)
    dora_linear(x, W, b, A, B, m, 0.5).sum().backward()
    assert len(calls) == n + (whole == "op")
    monkeypatch.setenv("PYHAPPY_TUNE", "off")
    dora_linear(x, W, b, A, B, m, 0.5).sum().backward()
    assert len(calls) == n + (whole == "op") + 1


def test_unfused_call_modes_and_tracing(tmp_path, monkeypatch):
    """unfused_call keeps the op with tuning off, on non-CPU devices, under a requested backend
    other than cpp and on fake tensors; forced("unfused") forces the unfused formulation."""
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    _whole_call_measure(monkeypatch, {"whole": "torch"})
    x = torch.ones(2, 3)

    def call(example=x):
        return T.unfused_call("some_op", ("m",), ("k",), lambda: x, lambda: x, example)
    monkeypatch.setenv("PYHAPPY_TUNE", "off")
    assert not call()
    with T.forced("unfused"):
        assert call()
    with T.forced("cpp"):
        assert not call()
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    assert not call(torch.empty(2, 3, device="meta"))
    with pyhappy.backends.force("reference"):
        assert not call()
    assert call()
    assert json.load(open(tmp_path / "c.json"))["entries"]["some_op|call|k|t%d" % torch.get_num_threads()][
        "choice"] == "torch"


@needs_cpp
def test_tt_matrix_linear_unfused_inference_matches_the_op(tmp_path, monkeypatch):
    """tt_matrix_linear's whole-call candidate for inference (ΔW formed, then F.linear) gives the op's
    output and is followed once picked; a training call whose passes are not decided yet runs the op
    (the whole training step is measured only once they are, and only where they are fast)."""
    from pyhappy.ops.tt_linear import tt_matrix_linear

    g = torch.Generator().manual_seed(5)
    N, K = 24, 36
    cores = [torch.randn(1, 2, 3, 3, generator=g), torch.randn(3, 3, 3, 2, generator=g),
             torch.randn(2, 4, 4, 1, generator=g)]
    x, W, b = torch.randn(7, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    want = tt_matrix_linear(x, W, b, cores, 0.7)
    with T.forced("unfused"):
        torch.testing.assert_close(tt_matrix_linear(x, W, b, cores, 0.7), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tt_matrix_linear(x, None, b, cores, 0.7, N=N),
                                   tt_matrix_linear(x, W, b, cores, 0.7) - x @ W.t(), rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    _whole_call_measure(monkeypatch, {"whole": "torch"})
    tt = importlib.import_module("pyhappy.ops.tt_linear")
    unfused, trained = [], []
    real_unfused, real_apply = tt._unfused_matrix, tt._TTEager.apply
    monkeypatch.setattr(tt, "_unfused_matrix", lambda *a: unfused.append(1) or real_unfused(*a))
    monkeypatch.setattr(tt._TTEager, "apply", lambda *a: trained.append(1) or real_apply(*a))
    tt_matrix_linear(x, W, b, cores, 0.7)  # measures (both candidates run)
    n = len(unfused)
    torch.testing.assert_close(tt_matrix_linear(x, W, b, cores, 0.7), want, rtol=1e-5, atol=1e-5)
    assert len(unfused) == n + 1 and not trained  # the pick followed
    cores[0].requires_grad_()
    tt_matrix_linear(x, W, b, cores, 0.7).sum().backward()
    assert len(unfused) == n + 1 and len(trained) == 1 and cores[0].grad is not None  # training keeps the op


def test_lora_linear_decisions_are_remembered_by_shape_not_identity(tmp_path, monkeypatch):
    """Factors rebuilt every call (TT-LoRA's A and B) reuse the in-process decision of their
    shapes: a call with new tensors of the same shapes consults neither the tuner nor its cache."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: ("torch", {n: 1.0 for n in c}, c["torch"]()))
    g = torch.Generator().manual_seed(6)
    x, W = torch.randn(5, 16, generator=g), torch.randn(8, 16, generator=g)
    lora_linear(x, W, None, torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 0.5)
    consulted = []
    real = T.Tuner.pick
    monkeypatch.setattr(T.Tuner, "pick", lambda self, *a, **k: consulted.append(a[0]) or real(self, *a, **k))
    lora_linear(x, W, None, torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 0.5)
    assert consulted == []
    lora_linear(x, W, None, torch.randn(3, 16, generator=g), torch.randn(8, 3, generator=g), 0.5)  # another rank
    assert len(consulted) == 1


def test_a_remembered_decision_is_per_thread_count(tmp_path, monkeypatch):
    """The cache's keys name the thread count, and so do the in-process decisions: after
    torch.set_num_threads a call is decided for the new count, and the old count's decision
    is still remembered when it comes back."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    measured = []
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: (
        measured.append(torch.get_num_threads()) or "torch", {n: 1.0 for n in c}, c["torch"]()))
    run = {n: (lambda: None) for n in ("cpp", "torch")}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            assert T.choose("op_threads", ("k",), run, "cpp", memo=("sig",)) == "torch"
    finally:
        torch.set_num_threads(threads)
    assert measured == [1, 2]
    assert {k.rsplit("|", 1)[1] for k in T.tuner().entries() if k.startswith("op_threads|")} == {"t1", "t2"}


def test_tuning_off_runs_the_default(monkeypatch):
    """PYHAPPY_TUNE=off measures nothing and runs the op's default without building the candidates."""
    monkeypatch.setenv("PYHAPPY_TUNE", "off")
    monkeypatch.setattr(T.Tuner, "measure", lambda *a, **k: pytest.fail("measured with tuning off"))
    run = {n: (lambda: None) for n in ("cpp", "cpp_aten", "torch")}
    assert T.choose("op_a", ("k",), run, "cpp") == "cpp"
    assert T.choose("op_b", ("k",), run, "torch") == "torch"
    assert T.choose("op_c", ("k",), lambda: pytest.fail("built"), "cpp", memo=("sig",)) == "cpp"
    with T.forced("cpp_aten"):
        assert T.choose("op_a", ("k",), run, "cpp") == "cpp_aten"


def _lora_step(M, K=256, N=256, r=8):
    """A function running one lora_linear forward and backward on fixed inputs: [y, ∂x, ∂A, ∂B]."""
    g = torch.Generator().manual_seed(M)
    x, W = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * K ** -0.5
    A, B = torch.randn(r, K, generator=g) * K ** -0.5, torch.randn(N, r, generator=g)
    dy = torch.randn(M, N, generator=g)

    def step():
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
        y = lora_linear(xs, W, None, As, Bs, 1.5)
        return [y.detach(), *torch.autograd.grad(y, [xs, As, Bs], dy)]
    return step


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a, b))


def _by_candidate(step, names=("cpp", "cpp_aten")):
    out = {}
    for n in names:
        with T.forced(n):
            out[n] = step()
    return out


@needs_cpp
def test_aten_candidate_and_another_threads_op_each_agree_with_serial(fp32_engine):
    """cpp_aten puts its products on ATen for its own thread only: one thread running it while
    another runs the "cpp" candidate on the process-wide engine (oneDNN here) each get their serial
    results bit for bit."""
    fp32_engine("onednn")
    step = _lora_step(48)
    want = _by_candidate(step)
    assert not _same(want["cpp"], want["cpp_aten"]), "the engines round alike here: the test cannot tell them apart"
    wrong = []

    def worker(name):
        with T.forced(name):
            for _ in range(30):
                if not _same(step(), want[name]):
                    wrong.append(name)
    run_in_threads(worker, ("cpp", "cpp_aten"))
    assert not wrong, wrong


@needs_cpp
def test_tuning_off_runs_the_products_on_torchs_engine():
    """PYHAPPY_TUNE=off (the suite's setting) runs the default with its products on ATen, torch's
    engine: bit for bit cpp_aten, forward and backward, at a decode size where pyhappy's own engine
    choice is another (its streaming kernels with AVX2, oneDNN with AVX-512F)."""
    assert T.mode() == "off"
    step = _lora_step(2)
    want = _by_candidate(step)
    if _decode_kernels() or _onednn():
        assert not _same(want["cpp"], want["cpp_aten"]), "the engines round alike here: the test cannot tell them apart"
    assert _same(step(), want["cpp_aten"])


@needs_cpp
def test_tuning_off_keeps_an_engine_set_explicitly(fp32_engine, monkeypatch):
    """An engine the user chose (set_gemm_engine, PYHAPPY_FP32_GEMM, an enclosing fp32_gemm_scope)
    wins over PYHAPPY_TUNE=off: with oneDNN set, off mode gives the "cpp" candidate's oneDNN result;
    products() leaves such a setting alone and does nothing outside off mode."""
    from pyhappy import _ext

    e = _ext.load()
    with T.products():
        assert e.fp32_gemm_setting() == "aten"
    with e.fp32_gemm_scope("onednn"), T.products():
        assert e.fp32_gemm_setting() == "onednn"
    fp32_engine("onednn")
    step = _lora_step(48)
    want = _by_candidate(step)
    assert not _same(want["cpp"], want["cpp_aten"]), "the engines round alike here: the test cannot tell them apart"
    assert _same(step(), want["cpp"])
    with T.products():
        assert e.fp32_gemm_setting() == "onednn"
    e.set_fp32_gemm("auto")
    monkeypatch.setenv("PYHAPPY_TUNE", "cache")
    with T.products():
        assert e.fp32_gemm_setting() == "auto"


@needs_cpp
@pytest.mark.parametrize("candidate", ["cpp", "torch"])
@pytest.mark.parametrize("fmt,M,lora,drop", [("nf4", 3, True, 0.0), ("int4", 40, True, 0.2), ("int3", 20, False, 0.0),
                                             ("int4", 1, False, 0.0)])
def test_quant_linear_every_candidate_matches_the_reference(candidate, fmt, M, lora, drop):
    """quant_linear's CPU candidates (the fused kernels; the weight dequantized, then F.linear and
    the adapter's products), each forced, forward and backward, agree with the dense math on the
    dequantized weight in float64; dropout's mask is the same on both."""
    from pyhappy.ops import quant_linear
    from pyhappy.quant import quantize

    g = torch.Generator().manual_seed(M)
    K, N, r = 64, 48, 4
    qw = quantize(torch.randn(N, K, generator=g), fmt, group_size=32)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    b = torch.randn(N, generator=g)
    A = (torch.randn(r, K, generator=g) / 8).requires_grad_() if lora else None
    B = (torch.randn(N, r, generator=g) / 2).requires_grad_() if lora else None
    dy = torch.randn(M, N, generator=g)
    seed = torch.tensor([7])

    def run(cand):
        params = [t for t in (x, A, B) if t is not None]
        for p in params:
            p.grad = None
        with T.forced(cand):
            y = quant_linear(x, qw, b, A, B, 0.5, None, drop, seed=seed)
            y.backward(dy)
        return [y.detach()] + [p.grad.clone() for p in params]
    got, want = run(candidate), run("cpp")
    W = qw.dequantize(torch.float64)
    y64 = x.detach().double() @ W.t() + b.double()
    torch.testing.assert_close(got[1], (dy.double() @ W).float() if not lora else got[1], rtol=1e-5, atol=1e-4)
    if not lora:
        torch.testing.assert_close(got[0], y64.float(), rtol=1e-5, atol=1e-4)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("candidate", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_vera_linear_candidates_in_other_dtypes(candidate, dtype):
    """The C++ step's generic path (not fp32) and the torch formulation, dropout on, against the reference in the same dtype."""
    from pyhappy.ops import vera_linear

    g = torch.Generator().manual_seed(3)
    M, K, N, r = 19, 32, 24, 4
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    x, W, b = t(M, K).requires_grad_(), t(N, K, scale=K ** -0.5), t(N)
    A, B = t(r, K, scale=K ** -0.5), t(N, r, scale=r ** -0.5)
    ld, lb = t(r).requires_grad_(), t(N).requires_grad_()
    dy, seed = t(M, N), torch.tensor([4])
    with T.forced(candidate):
        y = vera_linear(x, W, b, A, B, ld, lb, 0.25, seed=seed)
        got = [y.detach(), *torch.autograd.grad(y, (x, ld, lb), dy)]
    yr = reference.vera_linear(x, W, b, A, B, ld, lb, 0.25, seed)
    want = [yr.detach(), *torch.autograd.grad(yr, (x, ld, lb), dy)]
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=1e-1)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, **tol)


@needs_cpp
def test_vera_linear_tunes_its_forward_and_backward_keys(tmp_path, monkeypatch):
    """A training step measures one forward key (z saved: λ_b trains) and one backward key per op,
    and the whole step of each against PEFT's formulation."""
    from pyhappy.ops import pvera_linear, vera_linear

    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    tuner = T.tuner()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 32, generator=g, requires_grad=True)
    W, A, B = torch.randn(24, 32, generator=g), torch.randn(8, 32, generator=g), torch.randn(24, 4, generator=g)
    ld, lb = torch.randn(4, generator=g, requires_grad=True), torch.randn(24, generator=g, requires_grad=True)
    vera_linear(x, W, None, A[:4], B, ld, lb).sum().backward()
    ld2 = torch.randn(8, generator=g, requires_grad=True)
    pvera_linear(x, W, None, A, B, ld2, lb, sample=True).sum().backward()
    keys = sorted(tuner.entries())
    assert [k.split("|t")[0] for k in keys] == [
        "pvera_linear|bwd|float32|M16|K32|N24|r8|z||", "pvera_linear|fwd|float32|M16|K32|N24|r8|z||",
        "pvera_linear|step|float32|M16|K32|N24|r8||sample",
        "vera_linear|bwd|float32|M16|K32|N24|r4|z||", "vera_linear|fwd|float32|M16|K32|N24|r4|z||",
        "vera_linear|step|float32|M16|K32|N24|r4||"]
    # the winner depends on this machine's timings (cpp_skinny and cpp_aten are candidates too): each
    # pick is one the tuner measured, against the unfused formulation every time
    assert all(e["choice"] in e["median_us"] and "torch" in e["median_us"] for e in tuner.entries().values())


@pytest.mark.parametrize("pvera,sample", [(False, False), (True, False), (True, True)])
def test_vera_unfused_formulation_matches_the_op(pvera, sample):
    """The whole-call candidate of vera_linear / pvera_linear (PEFT's formulation in plain torch
    ops; PVeRA sampled with the op's noise) gives the op's values and gradients (x, λ_d, λ_b, bias)."""
    from pyhappy.ops import pvera_linear, vera_linear

    g = torch.Generator().manual_seed(9)
    r, K, N = 6, 16, 10
    x = torch.randn(2, 3, K, generator=g, requires_grad=True)
    W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g, requires_grad=True)
    A = torch.randn(2 * r if pvera else r, K, generator=g)
    B = torch.randn(N, r, generator=g)
    ld = torch.randn(A.shape[0], generator=g, requires_grad=True)
    lb = torch.randn(N, generator=g, requires_grad=True)
    params = [x, b, ld, lb]

    _unfused_agrees(lambda: (pvera_linear(x, W, b, A, B, ld, lb, sample=sample, noise_seed=torch.tensor([3]))
                             if pvera else vera_linear(x, W, b, A, B, ld, lb)), params, 1e-4)


def test_a_cached_whole_call_decision_runs_nothing_extra(tmp_path, monkeypatch):
    """With the decision in the cache file (another process measured it), the first call of a
    signature runs the picked formulation once: no warm-up call of the op, nothing measured."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setattr(T.Tuner, "measure", lambda *a, **k: pytest.fail("measured a cached key"))
    T.tuner()._store("some_op|call|k|t%d" % torch.get_num_threads(), {"choice": "torch", "default": "op"})
    runs = []
    x = torch.ones(2)
    assert T.unfused_call("some_op", ("m2",), ("k",), lambda: runs.append("op") or x, lambda: runs.append("u") or x, x)
    assert runs == []


def _clocked_tuner(monkeypatch, tmp_path):
    """(clock, tuner): tuning on, a fresh cache file, the tuner on a fake clock."""
    clock = Clock()
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    t = T.Tuner(T.cache_path(), clock=clock)
    monkeypatch.setitem(T._tuners, T.cache_path(), t)
    return clock, t


def test_a_whole_call_waits_for_its_passes_and_is_measured_only_where_they_are_fast(tmp_path, monkeypatch):
    """unfused_call with ``passes``: while a pass is undecided the op serves the call and the
    decision waits (pending_fast_calls says so once the passes are decided and fast); passes summing
    to WHOLE_CALL_US or more keep the op without a measurement; faster ones are measured."""
    clock, t = _clocked_tuner(monkeypatch, tmp_path)
    monkeypatch.setattr(T, "_pending", {})
    th = torch.get_num_threads()
    x = torch.ones(2)
    c, calls = cands(clock, {"op": 0.002, "torch": 0.001})
    fused, unfused = (lambda: c["op"]() and x), (lambda: c["torch"]() and x)

    def call(memo, passes):
        return T.unfused_call("some_op", memo, ("k", memo), fused, unfused, x, passes=passes)

    fast, slow = (("fwd", "a"), ("bwd", "a")), (("fwd", "b"), ("bwd", "b"))
    assert not call("m1", fast) and not call("m2", slow) and calls == {}  # nothing decided: the op, no timing
    assert not T.pending_fast_calls()
    w = T.WHOLE_CALL_US
    for kp, us in [(fast[0], 0.15 * w), (fast[1], 0.2 * w), (slow[0], 0.6 * w), (slow[1], 0.5 * w)]:
        t._store("|".join(["some_op", *kp, f"t{th}"]), {"choice": "cpp", "default": "cpp", "median_us": {"cpp": us}})
    assert T.decided_us("some_op", fast[0]) == 0.15 * w and T.decided_us("some_op", ("fwd", "none")) is None
    assert T.pending_fast_calls()  # m1's passes now take 0.35 WHOLE_CALL_US
    assert not call("m2", slow) and calls == {}  # 1.1 WHOLE_CALL_US: the op, nothing measured
    assert "some_op|step|k|m2|t%d" % th not in t.entries() and "some_op|call|k|m2|t%d" % th not in t.entries()
    assert call("m1", fast) and calls["torch"] > 0 and calls["op"] > 0  # measured: the unfused call is faster
    assert not T.pending_fast_calls()
    n = dict(calls)
    assert call("m1", fast) and not call("m2", slow) and calls == n  # both remembered


def test_a_whole_call_with_several_fused_ways_keeps_the_fastest_that_beats_the_unfused_call(tmp_path, monkeypatch):
    """whole_call_pick times every fused way and the unfused formulation in the same rounds: the
    fastest fused way wins where it beats the unfused call by the margin (also when the first,
    default way ties with it), the unfused call keeps near ties; the pick is remembered by name,
    large passes give "op" unmeasured, undecided passes None, a forced "unfused" gives "torch"; a
    fused ways named ``incumbents`` keep near ties in the unfused call's place."""
    clock, t = _clocked_tuner(monkeypatch, tmp_path)
    monkeypatch.setattr(T, "_pending", {})
    x = torch.ones(2)

    def pick(memo, costs, passes=None, incumbents=()):
        c, calls = cands(clock, costs)
        fused = {n: (lambda n=n: c[n]() and x) for n in costs if n != "torch"}
        return T.whole_call_pick("some_op", memo, ("k", memo), fused, lambda: c["torch"]() and x, x,
                                 passes=passes, incumbents=incumbents), calls

    got, calls = pick("m1", {"first": 0.00100, "second": 0.00080, "torch": 0.00100})
    assert got == "second" and set(calls) == {"first", "second", "torch"}
    assert T.cached_pick("some_op", ("call", "m1")) == "second"
    assert pick("m1", {"first": 1.0, "second": 1.0, "torch": 1.0}) == ("second", {})  # remembered
    assert pick("m2", {"first": 0.00100, "second": 0.00099, "torch": 0.00100})[0] == "torch"  # within the margin
    assert pick("m3", {"first": 0.00070, "second": 0.00080, "torch": 0.00100})[0] == "first"
    th = torch.get_num_threads()
    big, undecided = (("fwd", "big"), ("bwd", "big")), (("fwd", "big"), ("bwd", "none"))
    for kp in big:
        t._store("|".join(["some_op", *kp, f"t{th}"]), {"choice": "cpp", "default": "cpp",
                                                        "median_us": {"cpp": T.WHOLE_CALL_US}})
    assert pick("m4", {"first": 0.001, "torch": 0.002}, big) == ("op", {})
    assert pick("m5", {"first": 0.001, "torch": 0.002}, undecided) == (None, {})
    with T.forced("unfused"):
        assert pick("m6", {"first": 0.001, "torch": 0.002}) == ("torch", {})
    # fused ways named incumbents keep near ties, the fastest of them (no margin among them); the
    # unfused call, or an unnamed way, takes it only by the margin
    assert pick("m7", {"first": 0.00098, "node": 0.00100, "torch": 0.00099}, incumbents=("node",))[0] == "node"
    assert pick("m8", {"first": 0.00100, "node": 0.00100, "torch": 0.00090}, incumbents=("node",))[0] == "torch"
    assert pick("m9", {"first": 0.00098, "node": 0.00100, "torch": 0.00099}, incumbents=("first", "node"))[0] == "first"


@needs_cpp
@pytest.mark.parametrize("near_tie", [False, True])
@pytest.mark.parametrize("form", ["lora", "qlora"])
def test_a_small_layers_step_times_the_kernels_node_beside_its_passes_picks(tmp_path, monkeypatch, form, near_tie):
    """A small training layer whose backward pass picked the unfused candidate ("torch", a near tie)
    has its step timed as the node of its passes' picks (cpp/torch), the node with the kernels on
    both passes (cpp/cpp) and the node of the unfused products (torch/torch) against the unfused
    formulation: where the passes' node ties with the unfused step and the kernels' node is faster,
    the kernels' node serves (by name, remembered); where all come within the margin, the fastest
    node too (the nodes are the incumbents: the unfused formulation must beat them by the margin).
    The outputs and gradients agree with the unfused formulation's."""
    from pyhappy.nn import LoRALinear, QLoRALinear

    clock, t = _clocked_tuner(monkeypatch, tmp_path)
    op = "quant_linear" if form == "qlora" else "lora_linear"
    cost = ({"step:cpp/cpp": 0.0008, "step:cpp/torch": 0.001, "torch": 0.001} if not near_tie else
            {"step:cpp/cpp": 0.00098, "step:cpp/torch": 0.001, "step:torch/torch": 0.00099, "torch": 0.00099})

    def seconds(key, n):
        if "|step|" in key:
            return cost.get(n, 0.002)
        if "|fwd|" in key:
            return 0.0005 if n == "cpp" else 0.001
        return 0.0005 if n == "torch" else 0.001  # the backward: the unfused candidate fastest
    _clock_picks(monkeypatch, clock, seconds)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 20)
    m = QLoRALinear.from_linear(lin, "nf4", 32, r=4) if form == "qlora" else LoRALinear.from_linear(lin, r=4)
    torch.nn.init.normal_(m.lora_B.weight)
    params = [p for p in m.parameters() if p.requires_grad]
    x = torch.randn(5, 64, requires_grad=True)
    dy = torch.randn(5, 20)
    for _ in range(4):
        y = m(x)
        got = (y, *torch.autograd.grad(y, [x, *params], dy))
    steps = {k: v for k, v in t.entries().items() if k.startswith(op + "|step|")}
    assert [v["choice"] for v in steps.values()] == ["step:cpp/cpp"], steps
    assert set(next(iter(steps.values()))["median_us"]) == {"step:cpp/torch", "step:cpp/cpp", "step:torch/torch",
                                                            "torch"}
    assert y.grad_fn.name().endswith("Step>"), y.grad_fn.name()
    with T.forced("unfused"):
        y = m(x)
        want = (y, *torch.autograd.grad(y, [x, *params], dy))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _fake_step_clock(monkeypatch, tmp_path, unfused_wins: bool):
    """A tuner on a fake clock under which the passes' unfused formulations ("torch") take 1 ms and
    their other candidates 0.5 ms (so that no pass picks the unfused formulation, and the passes sum
    to less than WHOLE_CALL_US), the op's whole call 1 ms (the C++ node of the unfused products
    1.5 ms) and the unfused one's 0.5 ms (unfused_wins) or 2 ms."""
    clock, t = _clocked_tuner(monkeypatch, tmp_path)

    def seconds(key, n):
        if "|step|" in key:
            return {"torch": 0.0005 if unfused_wins else 0.002, "step:torch/torch": 0.0015}.get(n, 0.001)
        return 0.001 if n == "torch" else 0.0005
    _clock_picks(monkeypatch, clock, seconds)
    return t


def _clock_picks(monkeypatch, clock, seconds):
    """Every candidate the tuner times takes ``seconds(key, name)`` on the fake clock (it still runs);
    a candidate's ``incumbent`` mark is kept."""
    real_pick = T.Tuner.pick

    def pick(self, key, candidates, default, **kw):
        def timed(n, f):
            def run():
                out = f()
                clock.t += seconds(key, n)
                return out
            run.incumbent = getattr(f, "incumbent", False)
            return run
        return real_pick(self, key, {n: timed(n, f) for n, f in candidates.items()}, default, **kw)
    monkeypatch.setattr(T.Tuner, "pick", pick)


@needs_cpp
@pytest.mark.parametrize("unfused_wins", [True, False])
@pytest.mark.parametrize("form", ["lora", "tt_matrix", "tt_lowrank", "qlora", "sparse"])
def test_a_fast_training_call_is_served_by_the_whole_step_winner(tmp_path, monkeypatch, form, unfused_wins):
    """At small layers a training call's whole step (the op with its Python layers, forward and
    backward) is timed against the unfused formulation's once the passes are decided; the winner
    serves the later calls, and every call's output and gradients agree with the first's."""
    from pyhappy.nn import LoRALinear, QLoRALinear, SparseDeltaLinear, TTLinear

    t = _fake_step_clock(monkeypatch, tmp_path, unfused_wins)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64 if form == "qlora" else 24, 20)
    if form == "sparse":
        m = SparseDeltaLinear.from_linear(lin, density=0.2)
        with torch.no_grad():
            m.deltas["default"].values.normal_()
        op = "sparse_delta_linear"
    elif form == "lora":
        m = LoRALinear.from_linear(lin, r=4)
        torch.nn.init.normal_(m.lora_B.weight)
        op = "lora_linear"
    elif form == "qlora":
        m = QLoRALinear.from_linear(lin, "nf4", 32, r=4)
        torch.nn.init.normal_(m.lora_B.weight)
        m.bias.requires_grad_()  # a trained bias (PEFT's bias="lora_only")
        op = "quant_linear"
    else:
        m = TTLinear.from_linear(lin, tt_rank=2, form="matrix" if form == "tt_matrix" else "lowrank", r=4)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_()
        op = "lora_linear" if form == "tt_lowrank" else "tt_linear"
    params = [p for p in m.parameters() if p.requires_grad]
    x = torch.randn(5, lin.in_features, requires_grad=True)
    dy = torch.randn(5, 20)
    results, nodes = [], []
    for _ in range(4):
        y = m(x)
        nodes.append(y.grad_fn.name())  # (a C++ node's name is its Function's C++ type)
        results.append((y.detach(), *torch.autograd.grad(y, [x, *params], dy)))
    steps = {k: v["choice"] for k, v in t.entries().items() if k.startswith(op + "|step|")}
    # (lora_linear, TT lowrank included, and quant_linear time C++ nodes, stored by name; tt_linear its call)
    way = "op" if form in ("tt_matrix", "sparse") else "step:"
    assert len(steps) == 1 and list(steps.values())[0].startswith("torch" if unfused_wins else way), steps
    fused = ("_TTEagerBackward", "LoraLinearBackward", "LoraLinearStep>", "QuantLinearBackward", "QuantLinearStep>",
             "SparseDeltaLinearBackward")
    assert nodes[0].endswith(fused) and (not nodes[-1].endswith(fused)) == unfused_wins, nodes
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_cpp
def test_a_traced_call_keeps_the_plain_products_where_their_cpp_node_serves(tmp_path, monkeypatch):
    """Where a small layer's step decision keeps the C++ node of the unfused products (the fastest node,
    within the margin of the unfused formulation), a traced call (pyhappy.compiler's sites, the op under torch.compile) takes
    the plain products too (unfused_verdict), not the op; where the kernels' node wins, the op."""
    lora = importlib.import_module("pyhappy.ops.lora_linear")
    clock, t = _clocked_tuner(monkeypatch, tmp_path)
    monkeypatch.setattr(lora, "_VERDICTS", {})
    step = {}

    def seconds(key, n):
        if "|step|" in key:
            return step.get(n, 0.001)
        return 0.001 if n == "torch" else 0.0005
    _clock_picks(monkeypatch, clock, seconds)
    step.update({"step:cpp/cpp": 0.00099, "step:torch/torch": 0.00098, "torch": 0.001})
    assert lora.unfused_verdict(6, 24, 20, 4, "float32", True, True, True, False, 1.0)
    step.update({"step:cpp/cpp": 0.0005})
    assert not lora.unfused_verdict(40, 24, 20, 4, "float32", True, True, True, False, 1.0)  # another bucket
    assert sorted(v["choice"] for k, v in t.entries().items() if "|step|" in k) == ["step:cpp/cpp", "step:torch/torch"]


@needs_cpp
@pytest.mark.parametrize("unfused_wins", [True, False])
def test_the_compiler_keeps_a_site_unfused_where_the_measured_dispatch_does(tmp_path, monkeypatch, unfused_wins):
    """pyhappy.compiler asks the measured dispatch about each dense LoRA site's shapes (measured on
    synthetic tensors at compile time, or read from the cache): where the eager op would run the
    unfused formulation, the site stays as it is for Inductor, in the report's ``kept`` with the
    reason; otherwise it is fused. Results agree with eager either way; the user's random state is
    untouched; with PYHAPPY_TUNE=off every site fuses and nothing is measured."""
    import pyhappy.compiler as pc

    class Site(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.A = torch.nn.Linear(24, 20), torch.nn.Linear(24, 4, bias=False)
            self.B = torch.nn.Linear(4, 20, bias=False)
            torch.nn.init.normal_(self.B.weight)
            self.base.requires_grad_(False)

        def forward(self, x):
            return self.base(x) + self.B(self.A(x)) * 2.0

    t = _fake_step_clock(monkeypatch, tmp_path, unfused_wins)
    torch.manual_seed(0)
    m = Site()
    x = torch.randn(3, 5, 24, requires_grad=True)
    params = [x, m.A.weight, m.B.weight]
    for tune in ("on", "off"):
        monkeypatch.setenv("PYHAPPY_TUNE", tune)
        torch._dynamo.reset()
        be = pc.make_backend()
        rng = torch.random.get_rng_state()
        compiled_agrees(m, x, be, params)
        assert torch.equal(torch.random.get_rng_state(), rng)  # the measurement used its own generator
        (rep,) = be.reports
        if tune == "on" and unfused_wins:
            assert not rep.sites and len(rep.kept) == 1 and "unfused formulation" in rep.kept[0][1], str(rep)
            assert "M=15, K=24, N=20, r=4" in rep.kept[0][1] and "kept unfused" in str(rep)
        else:
            assert len(rep.sites) == 1 and not rep.kept, str(rep)
        if tune == "on":
            steps = [k for k in t.entries() if k.startswith("lora_linear|step|")]
            assert len(steps) == 1
    torch._dynamo.reset()


@needs_cpp
@pytest.mark.parametrize("unfused_wins", [True, False])
def test_a_compiled_module_traces_what_the_measured_dispatch_runs(tmp_path, monkeypatch, unfused_wins):
    """A pyhappy LoRALinear under torch.compile: where the measured dispatch serves its shapes with
    the unfused formulation (decided at trace time on synthetic tensors, taken as a constant), the
    graph holds those plain products and no pyhappy op; otherwise the fused op. Outputs and
    gradients agree with eager either way, the user's random state is untouched."""
    from pyhappy.nn import LoRALinear

    t = _fake_step_clock(monkeypatch, tmp_path, unfused_wins)
    torch.manual_seed(0)
    m = LoRALinear.from_linear(torch.nn.Linear(24, 20), r=4)
    torch.nn.init.normal_(m.lora_B.weight)
    x = torch.randn(3, 5, 24, requires_grad=True)
    params = [x, m.lora_A.weight, m.lora_B.weight]
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    rng = torch.random.get_rng_state()
    compiled_agrees(m, x, capture, params)
    assert torch.equal(torch.random.get_rng_state(), rng)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("pyhappy" in tg for tg in targets) != unfused_wins, targets
    assert [k for k in t.entries() if k.startswith("lora_linear|step|")]
    torch._dynamo.reset()


def test_tuning_cost_measurement_finds_every_decision_in_the_cache_of_a_fresh_process():
    """The benchmark's first-call tuning cost (seven Llama layer types, fresh processes): the first
    process measures keys (its pyhappy.tune reports seconds spent measuring); a second process on the
    same cache file measures none."""
    from pyhappy.benchmarks.lora_linear import tuning_cost

    got = tuning_cost(3, hidden=32, inter=48)
    assert got is not None
    first, cached = got["first"], got["cached"]
    assert first["keys"] >= 3 and first["measured_s"] > 0 and first["tune_s"] >= first["measured_s"]
    assert cached["keys"] == 0 and cached["measured_s"] == 0.0


def _tune_cli(tmp_path, monkeypatch, capsys, *argv):
    """``python -m pyhappy.tune *argv`` in this process: (exit status, stdout, stderr)."""
    cli = importlib.import_module("pyhappy.tune")
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "cli.json"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tune_cli_pre_tunes_a_transformers_model_from_its_config(tmp_path, monkeypatch, capsys):
    """``python -m pyhappy.tune --model CONFIG``: one decoder layer of the model, LoRA on every Linear but
    the head, one fwd+bwd per --tokens count; the cache then holds a forward and a backward key per
    layer shape and row count, and a second run measures nothing."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    cfg.save_pretrained(str(tmp_path / "m"))
    rc, out, err = _tune_cli(tmp_path, monkeypatch, capsys, "--model", str(tmp_path / "m"), "--r", "4",
                             "--tokens", "2", "40")
    assert rc == 0, err
    keys = json.load(open(tmp_path / "cli.json"))["entries"]
    # shapes of q/o (32->32), k/v (32->16), gate/up (32->48), down (48->32): forward keys for both row counts
    for shape in ("K32|N32", "K32|N16", "K32|N48", "K48|N32"):
        for m in ("M2|", "M64|"):
            assert any(k.startswith("lora_linear|fwd|float32|" + m + shape) for k in keys), (m, shape, sorted(keys))
    assert any(k.startswith("lora_linear|bwd") for k in keys)
    assert "keys measured in" in out and f"({len(keys)} keys)" in out
    rc, out, err = _tune_cli(tmp_path, monkeypatch, capsys, "--model", str(tmp_path / "m"), "--r", "4",
                             "--tokens", "2", "40")
    assert rc == 0 and out.count("0 keys measured in") == 2, out
    assert json.load(open(tmp_path / "cli.json"))["entries"] == keys


def test_tune_cli_build_function_and_argument_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodels_cli.py").write_text(
        "import torch, pyhappy\n"
        "def make():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))\n"
        "    pyhappy.inject(m, ['0', '2'], r=2)\n"
        "    return m, (torch.randn(20, 16),)\n"
        "def plain():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 8))\n")
    rc, out, err = _tune_cli(tmp_path, monkeypatch, capsys, "--build", "mymodels_cli:make", "--inference")
    assert rc == 0, err
    keys = json.load(open(tmp_path / "cli.json"))["entries"]
    assert any(k.startswith("lora_linear|fwd|float32|M32|K16|N24") for k in keys)
    assert not any("|bwd" in k for k in keys)  # forward only
    for argv, why in ((["--build", "mymodels_cli:plain"], "no pyhappy layer"),
                      (["--build", "mymodels_cli"], "MODULE:FUNCTION"),
                      (["--build", "no_such_module_here:make"], "cannot import 'no_such_module_here'"),
                      (["--build", "mymodels_cli:nothing"], "has no 'nothing'"),
                      (["--model", str(tmp_path / "nowhere")], "--model"),
                      (["--tokens", "0", "--build", "mymodels_cli:make"], "--tokens"),
                      (["--adapter", "lora"], "need --model or --build")):
        rc, out, err = _tune_cli(tmp_path, monkeypatch, capsys, *argv)
        assert rc != 0 and why in err, (argv, err)
    rc, out, err = _tune_cli(tmp_path, monkeypatch, capsys)
    assert rc == 0 and f"{len(keys)} keys" in out


def _fast_path_call(kind, g):
    """(op module, call(**overrides) -> y, the name of a tensor whose bad, broadcastable shape the
    checks must refuse) for the whole-call unfused fast path."""
    from pyhappy.ops import dora_linear, pvera_linear, sparse_delta_linear, sparse_layout, vera_linear

    x = torch.randn(3, 16, generator=g, requires_grad=True)
    W, b = torch.randn(8, 16, generator=g) / 4, torch.randn(8, generator=g)
    if kind == "sparse":
        idx = torch.tensor([1, 7, 20, 33, 64, 100, 127], dtype=torch.int32)
        lay = sparse_layout(idx, 8, 16)
        v = torch.randn(7, generator=g, requires_grad=True)
        return "sparse_delta_linear", lambda **o: sparse_delta_linear(o.get("x", x), W, o.get("bias", b), v, idx, lay,
                                                                      0.5), "bias"
    if kind == "lora":
        A, B = torch.randn(4, 16, generator=g, requires_grad=True), torch.randn(8, 4, generator=g, requires_grad=True)
        return "lora_linear", lambda **o: lora_linear(o.get("x", x), W, o.get("bias", b), A, B, 0.5), "bias"
    if kind == "dora":
        _, W, b, A, B, m = _dora_inputs(g, True)
        return "dora_linear", lambda **o: dora_linear(o.get("x", x), W, b, A, B, o.get("magnitude", m), 0.5), \
            "magnitude"
    A, B = torch.randn(8 if kind == "pvera" else 4, 16, generator=g) / 4, torch.randn(8, 4, generator=g) / 2
    ld = torch.randn(A.shape[0], generator=g, requires_grad=True)
    lb = torch.randn(8, generator=g, requires_grad=True)
    if kind == "vera":
        return "vera_linear", lambda **o: vera_linear(o.get("x", x), W, b, A, B, ld, o.get("lambda_b", lb)), "lambda_b"
    return "vera_linear", lambda **o: pvera_linear(o.get("x", x), W, b, A, B, ld, o.get("lambda_b", lb)), "lambda_b"


@pytest.mark.parametrize("kind", ["lora", "dora", "vera", "pvera", "sparse"])
def test_a_call_signature_served_unfused_skips_its_checks_until_something_changes(tmp_path, monkeypatch, kind):
    """After the measured dispatch served a call unfused (its arguments checked), a call of the same
    argument signature runs the unfused formulation at once (no checks, no decision lookup) with the
    same values; a bad tensor of a new signature is still refused by name, and tuning off, a forced
    candidate or a requested backend go back through the op's entry point."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    # (sparse_delta_linear measures a training call's whole step only where its passes are fast)
    secs = 1e-4 if kind == "sparse" else 1.0
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: ("torch" if "torch" in c else d,
                                                                           {n: secs for n in c},
                                                                           c["torch" if "torch" in c else d]()))
    mod_name, call, bad = _fast_path_call(kind, torch.Generator().manual_seed(2))
    mod = importlib.import_module(f"pyhappy.ops.{mod_name}")
    checks = []
    real = mod._validate
    monkeypatch.setattr(mod, "_validate", lambda *a, **k: checks.append(1) or real(*a, **k))
    y0 = call()
    y0.sum().backward()  # (lora_linear's backward pass is a decision of its own)
    y0 = call().detach()
    assert checks, "the first calls check their arguments"
    n = len(checks)
    y1 = call()
    assert len(checks) == n and torch.equal(y1.detach(), y0)  # the remembered signature: no checks
    with torch.no_grad():  # another grad mode: another signature
        call()
    assert len(checks) > n
    with pytest.raises(ValueError, match=bad):
        call(**{bad: torch.ones(1)})
    helpers.assert_settings_take_the_full_path(call, checks, monkeypatch)


@pytest.mark.skipif(not HAS_CPP, reason="extension not built")
def test_an_inference_signature_served_by_the_cpp_kernels_skips_its_checks_until_something_changes(
        tmp_path, monkeypatch):
    """lora_linear in inference: once the settled decision for a call's argument signature is the
    C++ kernels (its arguments checked), a call of that signature runs them at once with the same
    values; a new signature (recording autograd, a bad tensor) goes through the entry point again,
    and so do tuning off, a forced candidate or a requested backend."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: ("cpp", {n: 1.0 for n in c},
                                                                                        c["cpp"]()))
    mod = importlib.import_module("pyhappy.ops.lora_linear")
    checks = []
    real = mod._validate
    monkeypatch.setattr(mod, "_validate", lambda *a, **k: checks.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, generator=g)
    W, b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    A, B = torch.randn(4, 16, generator=g, requires_grad=True), torch.randn(8, 4, generator=g, requires_grad=True)

    def call(**o):
        with torch.no_grad():
            return lora_linear(o.get("x", x), W, o.get("bias", b), A, B, 0.5)
    y0 = call()
    assert checks
    n = len(checks)
    ref, _ = reference.lora_linear(x.double(), W.double(), b.double(), A.detach().double(), B.detach().double(), 0.5)
    for _ in range(2):
        y = call()
        assert len(checks) == n and torch.equal(y, y0) and y.shape == (2, 3, 8)
    torch.testing.assert_close(y0, ref.float())  # float32 tolerances
    lora_linear(x, W, b, A, B, 0.5).sum().backward()  # autograd records: another signature, checked
    assert len(checks) > n
    with pytest.raises(ValueError, match="bias"):
        call(bias=torch.ones(1))
    helpers.assert_settings_take_the_full_path(call, checks, monkeypatch)


def test_a_candidates_own_first_run_is_not_timed():
    """A candidate with a ``warmup`` attribute (the whole-call "op", whose first run measures the
    op's own passes) runs it untimed before the warm-up round: a slow first run alone does not make
    it lose, even where the warm-up round's times are the measurement (calls above the budget)."""
    now = [0.0]
    t = T.Tuner("/dev/null", clock=lambda: now[0], budget_s=0.2)
    runs = []

    def op():
        runs.append("op")
        now[0] += 0.3  # one call: above the budget, so the warm-up round is the measurement
        return "op-out"

    def warm():
        runs.append("warmup")
        now[0] += 5.0  # the op's own tuning
    op.warmup = warm

    def torch_():
        now[0] += 0.4
        return "torch-out"
    pick, med, out = t.measure({"op": op, "torch": torch_}, "op")
    assert runs[0] == "warmup" and runs.count("warmup") == 1
    assert pick == "op" and med["op"] == pytest.approx(0.3) and out == "op-out"


def test_a_sample_far_slower_than_the_fastest_is_taken_again(tmp_path):
    """Above the budget (one sample each), a sample over ``outlier`` times the fastest is taken once
    more and the faster kept: one interrupted run does not decide the key, and a truly slow
    candidate costs one run more, not more rounds."""
    clock = Clock()
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock, budget_s=0.2)
    calls = {"cpp": 0, "torch": 0}
    cpp = runs(clock, calls, "cpp", [0.95, 0.50])  # its first run lost a core; its second is its steady time
    torch_ = runs(clock, calls, "torch", [0.56])
    pick, med, out = t.measure({"cpp": cpp, "torch": torch_}, "cpp")
    assert pick == "cpp" and med["cpp"] == pytest.approx(0.50) and out == "cpp-out"
    assert calls == {"cpp": 2, "torch": 1}
    c, n = cands(clock, {"cpp": 0.50, "torch": 0.90})  # truly that slow: one run more, it still loses
    assert t.measure(c, "cpp")[0] == "cpp" and n == {"cpp": 1, "torch": 2}
    tries = []

    def flaky():  # its run again fails (say, out of memory): its first sample and output stand
        tries.append(1)
        if len(tries) > 1:
            raise RuntimeError("out of memory")
        clock.t += 0.95
        return "flaky-out"
    c, n = cands(clock, {"torch": 0.50})
    assert t.measure({"cpp": flaky, **c}, "cpp") == ("torch", {"cpp": pytest.approx(0.95), "torch": pytest.approx(0.5)},
                                                     ("torch", 1))
    assert len(tries) == 2


@pytest.mark.parametrize("costs,want,runs", [
    ({"op": 0.50, "torch": 0.52}, "op", 3),      # a near tie: two more rounds, medians of three
    ({"op": 0.50, "torch": 0.60}, "op", 1),      # clearly apart: the warm-up round decides
    ({"op": 0.515, "torch": 0.52}, "torch", 3),  # a near tie inside the margin: the incumbent
])
def test_calls_above_the_budget_take_two_more_rounds_only_on_a_near_tie(tmp_path, costs, want, runs):
    """Whole-call decisions (settle=True) of calls above the budget settle a near tie with two more
    rounds."""
    clock = Clock()
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock, budget_s=0.2)
    c, calls = cands(clock, costs)
    assert t.pick("k", c, "op", settle=True) == want
    assert calls["op"] == calls["torch"] == runs


@pytest.mark.parametrize("costs,want,runs", [
    ({"cpp": 0.51, "torch": 0.52}, "torch", (1, 1)),  # faster than the incumbent, not by the margin: it stays
    ({"cpp": 0.50, "torch": 0.60}, "cpp", (1, 1)),    # faster by more than the margin: the rival wins
    # slower than the incumbent: it keeps the key (the default, which lost, taken once more)
    ({"cpp": 0.53, "torch": 0.52}, "torch", (2, 1)),
])
def test_per_pass_decisions_above_the_budget_keep_one_sample_each(tmp_path, costs, want, runs):
    """A per-pass decision of a call above the budget takes no further rounds, near tie or not (only
    the retakes of an outlier or of a default that lost): first-call tuning stays about one run of
    each candidate."""
    clock = Clock()
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock, budget_s=0.2)
    c, calls = cands(clock, costs)
    assert t.pick("k", c, "cpp") == want
    assert (calls["cpp"], calls["torch"]) == runs


def test_a_default_that_lost_its_one_sample_is_taken_again(tmp_path):
    """Above the budget, the default's one sample that lost (slowed by less than ``outlier``: the
    machine busy for part of the run) is taken once more; a default that truly loses costs one run
    more and still loses."""
    clock = Clock()
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock, budget_s=0.2)
    calls = {"cpp": 0, "cpp_aten": 0}
    cpp = runs(clock, calls, "cpp", [0.62, 0.41])  # its first run slowed 1.24x the rival's: below the outlier rule
    cpp_aten = runs(clock, calls, "cpp_aten", [0.50])
    pick, med, out = t.measure({"cpp": cpp, "cpp_aten": cpp_aten}, "cpp")
    assert pick == "cpp" and med["cpp"] == pytest.approx(0.41) and out == "cpp-out"
    assert calls == {"cpp": 2, "cpp_aten": 1}
    c, n = cands(clock, {"cpp": 0.60, "cpp_aten": 0.50})  # truly slower: one run more, it still loses
    assert t.measure(c, "cpp")[0] == "cpp_aten" and n == {"cpp": 2, "cpp_aten": 1}
    c, n = cands(clock, {"cpp": 0.50, "cpp_aten": 0.60})  # the default won: nothing taken again
    assert t.measure(c, "cpp")[0] == "cpp" and n == {"cpp": 1, "cpp_aten": 1}


def test_a_candidate_ruled_out_by_the_first_samples_is_not_run_for_a_large_call(tmp_path):
    """A candidate's ``skip`` predicate, given the first samples of the candidates before it, leaves
    it unrun where those samples exceed the budget; below the budget every candidate runs."""
    clock = Clock()
    t = T.Tuner(str(tmp_path / "c.json"), clock=clock, budget_s=0.2)

    def case(costs):
        c, calls = cands(clock, costs)
        c["cpp_aten"].skip = lambda s: s["torch"] > 1.15 * s["cpp"]
        return t.measure(c, "cpp")[0], calls
    pick, calls = case({"cpp": 0.5, "torch": 0.7, "cpp_aten": 0.45})
    assert pick == "cpp" and "cpp_aten" not in calls
    pick, calls = case({"cpp": 0.5, "torch": 0.52, "cpp_aten": 0.40})  # not ruled out: measured, and wins
    assert pick == "cpp_aten" and calls["cpp_aten"] == 1
    pick, calls = case({"cpp": 0.005, "torch": 0.009, "cpp_aten": 0.004})  # below the budget: rounds of all
    assert pick == "cpp_aten" and calls["cpp_aten"] > 1


def test_cpp_aten_is_ruled_out_where_the_unfused_formulation_lost_clearly():
    e = pyhappy._ext.load()
    if e is None or not hasattr(e, "fp32_gemm_scope"):
        pytest.skip("extension not built")
    with e.fp32_gemm_scope("onednn"):
        if e.fp32_gemm() != "onednn":
            pytest.skip("no oneDNN in this torch")
        c = T.with_aten_engine(torch.randn(4, 8), {"cpp": lambda: 0, "torch": lambda: 1})
    skip = c["cpp_aten"].skip
    assert skip({"cpp": 1.0, "torch": 1.1}) and not skip({"cpp": 1.0, "torch": 1.05}) and not skip({"cpp": 1.0})


@needs_cpp
def test_a_training_call_served_unfused_still_checks_its_arguments(tmp_path, monkeypatch):
    """Once the whole-step decision gave a QLoRA layer's training calls to the unfused formulation,
    a call of the same shapes with a bad argument is refused with the op's error naming it (not an
    error from inside the plain torch ops)."""
    from pyhappy.ops import quant_linear

    _fake_step_clock(monkeypatch, tmp_path, unfused_wins=True)
    g = torch.Generator().manual_seed(2)
    qw = pyhappy.quantize(torch.randn(20, 64, generator=g), "nf4", 32)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    A = (torch.randn(4, 64, generator=g) / 8).requires_grad_()
    B = torch.randn(20, 4, generator=g, requires_grad=True)
    bias = torch.randn(20, generator=g)
    for _ in range(3):
        y = quant_linear(x, qw, bias, A, B, 0.5)
        y.sum().backward()
    assert type(y.grad_fn).__name__ == "AddmmBackward0"  # served by the unfused formulation
    with pytest.raises(ValueError, match="bias"):
        quant_linear(x, qw, torch.randn(21), A, B, 0.5)
    with pytest.raises(ValueError, match="lora_B"):
        quant_linear(x, qw, bias, A, torch.randn(21, 4), 0.5)


@needs_cpp
@pytest.mark.parametrize("op", ["lora", "qlora"])
def test_a_forced_unfused_call_leaves_no_decision_behind(tmp_path, monkeypatch, op):
    """A training call under forced("unfused") is served by the unfused formulation; the calls after
    the block decide as they would have (here: the cache holds nothing, so the op serves them)."""
    from pyhappy.ops import lora_linear, quant_linear

    monkeypatch.setenv("PYHAPPY_TUNE", "cache")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    g = torch.Generator().manual_seed(3)
    W = torch.randn(20, 64, generator=g)
    qw = pyhappy.quantize(W, "nf4", 32)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    A = (torch.randn(4, 64, generator=g) / 8).requires_grad_()
    B = torch.randn(20, 4, generator=g, requires_grad=True)

    def node():
        y = lora_linear(x, W, None, A, B, 0.5) if op == "lora" else quant_linear(x, qw, None, A, B, 0.5)
        return type(y.grad_fn).__name__
    with T.forced("unfused"):
        assert node() == "AddmmBackward0"
    assert node() == ("LoraLinearBackward" if op == "lora" else "QuantLinearBackward")


@needs_cpp
def test_a_qlora_layer_with_a_frozen_adapter_gets_its_whole_step_decision(tmp_path, monkeypatch):
    """A frozen adapter (x trains, A and B do not): the backward pass is keyed without the adapter
    (it computes no adapter gradients); the whole-step decision reads that key and is made."""
    from pyhappy.ops import quant_linear

    t = _fake_step_clock(monkeypatch, tmp_path, unfused_wins=True)
    g = torch.Generator().manual_seed(4)
    qw = pyhappy.quantize(torch.randn(20, 64, generator=g), "nf4", 32)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    A, B = torch.randn(4, 64, generator=g) / 8, torch.randn(20, 4, generator=g)
    grads = []
    for _ in range(3):
        y = quant_linear(x, qw, None, A, B, 0.5)
        grads.append(torch.autograd.grad(y.square().sum(), x)[0])
    assert [k for k in t.entries() if k.startswith("quant_linear|step|")], t.entries().keys()
    assert type(y.grad_fn).__name__ == "AddmmBackward0"
    torch.testing.assert_close(grads[-1], grads[0], rtol=1e-4, atol=1e-4)  # two formulations, fp32 sums


def test_a_small_layers_node_runs_each_passs_fastest_candidate_and_a_large_layers_its_decision(tmp_path, monkeypatch):
    """node_passes: where two passes take less than WHOLE_CALL_US together (their step is measured
    against the unfused formulation), each runs its fastest measured candidate, the pass's margin
    for its incumbent set aside; above it, or where a pass is undecided, the decisions stand; a
    fastest candidate the node cannot run keeps the decision."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    t = T.tuner()
    passes = (("fwd", "small"), ("bwd", "small"))
    times = {"fwd": {"cpp": 990.0, "torch": 1000.0}, "bwd": {"cpp": 1015.0, "cpp_x": 900.0, "torch": 1000.0}}
    for kp in passes:  # torch kept both passes (cpp within the 3% margin), cpp_x is fastest in the backward
        t.entries()[T._cache_key("op", kp)] = {"choice": "torch", "default": "cpp", "median_us": times[kp[0]]}
    assert T.node_passes("op", passes, ("torch", "torch"), ("cpp", "torch")) == ("cpp", "torch")
    assert T.node_passes("op", passes, ("torch", "torch"), ("cpp", "torch", "cpp_x")) == ("cpp", "cpp_x")
    big = (("fwd", "big"), ("bwd", "big"))
    for kp in big:
        t.entries()[T._cache_key("op", kp)] = {"choice": "torch", "default": "cpp",
                                               "median_us": {k: v * 10 for k, v in times[kp[0]].items()}}
    assert T.node_passes("op", big, ("torch", "torch"), ("cpp", "torch", "cpp_x")) == ("torch", "torch")
    assert T.node_passes("op", (passes[0], ("bwd", "undecided")), ("torch", None), ("cpp", "torch")) == ("torch", None)


def test_a_repeat_of_the_last_call_on_a_weight_is_served_without_building_its_signature(tmp_path, monkeypatch):
    """lora_linear: once a call's signature was served through the remembered pick, the next call
    on that weight with the same objects, shapes, dtypes, grad requirements, grad mode and settings is
    served the same way without building its signature (``_repeat_hit``); any of those changed takes
    the signature path again (a bad tensor is refused by name), and the record goes with the weight."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: ("torch", {n: 1.0 for n in c},
                                                                                        c["torch"]()))
    L = importlib.import_module("pyhappy.ops.lora_linear")
    sigs, checks = [], []
    real_sig, real_validate = L.arg_signature, L._validate
    monkeypatch.setattr(L, "arg_signature", lambda *a: sigs.append(1) or real_sig(*a))
    monkeypatch.setattr(L, "_validate", lambda *a, **k: checks.append(1) or real_validate(*a, **k))
    g = torch.Generator().manual_seed(5)
    N, K, r = 12, 16, 4
    W, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    A, B = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g)
    x = torch.randn(3, K, generator=g)

    def call(**o):
        a = {"x": x, "weight": W, "bias": b, "lora_A": A, "lora_B": B, "scaling": 0.5, **o}
        return lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["scaling"])

    def want(**o):
        a = {"x": x, "weight": W, "bias": b, "lora_A": A, "lora_B": B, "scaling": 0.5, **o}
        return a["x"] @ a["weight"].t() + a["bias"] + a["scaling"] * (a["x"] @ a["lora_A"].t()) @ a["lora_B"].t()

    with torch.no_grad():
        for _ in range(3):  # decided (the unfused formulation), remembered, then served through pick_hit
            call()
        n = len(sigs)
        y = call()
        assert len(sigs) == n and torch.equal(y, call())  # repeats: no signature built
        torch.testing.assert_close(y, want())
        for change in ({"x": torch.randn(5, K, generator=g)}, {"bias": b.clone()}, {"lora_A": A.clone()},
                       {"scaling": 0.25}, {"x": x.view(1, 3, K)}):
            n = len(sigs)
            torch.testing.assert_close(call(**change), want(**change))
            assert len(sigs) > n, change
        with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has torch.float64"):  # by name
            call(x=x.double())
        W2 = W.clone()
        for _ in range(3):
            call(weight=W2)
        key = id(W2)
        assert key in L._LAST._last
        del W2
        assert key not in L._LAST._last  # the record goes with its weight
        W3 = W.clone()
        for _ in range(3):
            call(weight=W3)
        W3.data = torch.randn(N, K + 1)  # the same tensor object, another shape: back through the checks
        n = len(sigs)
        with pytest.raises(ValueError, match=r"weight is \[N, K\] = \(12, 17\)"):
            call(weight=W3)
        assert len(sigs) > n
    A.requires_grad_()  # another grad requirement and grad mode: the training signature
    n = len(sigs)
    y = call()
    assert len(sigs) > n and y.requires_grad
    A.requires_grad_(False)
    with torch.no_grad():
        call()
        helpers.assert_settings_take_the_full_path(call, checks, monkeypatch)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the entry point's casts and checks
            n = len(sigs)
            assert call().dtype == torch.bfloat16 and len(sigs) > n


@pytest.mark.parametrize("kind", ["vera", "pvera_mean", "pvera_sample"])
def test_a_repeat_of_a_vera_call_served_unfused_builds_no_signature_until_anything_it_read_changes(
        tmp_path, monkeypatch, kind):
    """vera_linear / pvera_linear (training calls): once a call's signature was served unfused through
    the remembered decision, a repeat on that weight runs the unfused formulation without building its
    signature (``LastCalls``), with the values of the full path (PVeRA's sampled noise drawn from
    torch's generator as that path draws it); a replaced tensor, another x shape, a given noise seed
    or another grad mode take the signature path; the record goes with the weight."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: ("torch" if "torch" in c else d,
                                                                           {n: 1.0 for n in c},
                                                                           c["torch" if "torch" in c else d]()))
    V = importlib.import_module("pyhappy.ops.vera_linear")
    sigs = []
    real_sig = V.arg_signature
    monkeypatch.setattr(V, "arg_signature", lambda *a: sigs.append(1) or real_sig(*a))
    g = torch.Generator().manual_seed(9)
    N, K, r = 8, 16, 4
    pvera, sample = kind.startswith("pvera"), kind == "pvera_sample"
    x = torch.randn(3, K, generator=g, requires_grad=True)
    W, b = torch.randn(N, K, generator=g) / 4, torch.randn(N, generator=g)
    A, B = torch.randn(2 * r if pvera else r, K, generator=g) / 4, torch.randn(N, r, generator=g) / 2
    ld = torch.randn(A.shape[0], generator=g, requires_grad=True)
    lb = torch.randn(N, generator=g, requires_grad=True)
    last = V._PLAST if pvera else V._LAST

    def call(**o):
        a = {"x": x, "weight": W, "lambda_b": lb, **o}
        if pvera:
            return V.pvera_linear(a["x"], a["weight"], b, A, B, ld, a["lambda_b"], sample=sample,
                                  noise_seed=o.get("noise_seed"))
        return V.vera_linear(a["x"], a["weight"], b, A, B, ld, a["lambda_b"])

    def want(seed, **o):  # the unfused formulation on the noise seed the entry point draws
        a = {"x": x, "weight": W, "lambda_b": lb, **o}
        torch.manual_seed(seed)
        noise = V._draw_seed(x) if sample else None
        return V._unfused(a["x"], a["weight"], b, A, B, ld, a["lambda_b"], 0.0, None, noise)

    def check(seed, **o):
        torch.manual_seed(seed)
        y = call(**o)
        torch.testing.assert_close(y, want(seed, **o), atol=0, rtol=0)
        assert y.requires_grad
        return y

    for _ in range(3):  # decided (the unfused formulation), remembered, then served through pick_hit
        check(0).sum().backward()
    n = len(sigs)
    check(1), check(2)
    assert len(sigs) == n  # repeats: no signature built
    for change in ({"x": torch.randn(5, K, generator=g)}, {"lambda_b": lb.detach().clone().requires_grad_()}):
        n = len(sigs)
        check(3, **change)
        assert len(sigs) > n, change
    if pvera:
        call(), call()
        n = len(sigs)
        call(noise_seed=torch.tensor([5]))  # a given noise seed: checked with the signature
        assert len(sigs) > n
    with torch.no_grad():  # another grad mode: another signature
        n = len(sigs)
        call()
        assert len(sigs) > n
    W2 = W.clone()
    for _ in range(3):
        call(weight=W2)
    key = id(W2)
    assert key in last._last
    del W2
    assert key not in last._last  # the record goes with its weight


def test_a_repeat_of_a_sparse_delta_training_call_served_unfused_skips_its_checks_until_anything_it_read_changes(
        tmp_path, monkeypatch):
    """sparse_delta_linear (training calls, one delta on a dense weight): once the whole step was
    decided for the unfused formulation, a call repeating the last one on that weight runs it without
    the entry point's checks or its signature (``LastCalls``), with the values and gradients of the
    full path; another x shape, values tensor, scale, pattern, bias or grad mode take the checked
    path (a bad bias is refused by name); several deltas and a layout built per call are never
    recorded; the record goes with the weight."""
    monkeypatch.setenv("PYHAPPY_TUNE", "on")
    monkeypatch.setenv("PYHAPPY_TUNE_CACHE", str(tmp_path / "c.json"))
    monkeypatch.setattr(T.Tuner, "measure", lambda self, c, d, cold=(), settle=False: ("torch" if "torch" in c else d,
                                                                           {n: 1e-4 for n in c},
                                                                           c["torch" if "torch" in c else d]()))
    S = importlib.import_module("pyhappy.ops.sparse_delta_linear")
    sigs, checks = [], []
    real_sig, real_check = S.arg_signature, S.check_layout
    monkeypatch.setattr(S, "arg_signature", lambda *a: sigs.append(1) or real_sig(*a))
    monkeypatch.setattr(S, "check_layout", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    g = torch.Generator().manual_seed(4)
    N, K = 8, 16
    x = torch.randn(3, K, generator=g, requires_grad=True)
    W, b = torch.randn(N, K, generator=g) / 4, torch.randn(N, generator=g)
    idx = torch.tensor([0, 9, 17, 40, 41, 77, 127], dtype=torch.int32)
    lay = S.sparse_layout(idx, N, K)
    v = torch.randn(7, generator=g, requires_grad=True)

    def call(**o):
        a = {"x": x, "weight": W, "bias": b, "values": v, "indices": idx, "layout": lay, "scale": 0.5, **o}
        return S.sparse_delta_linear(a["x"], a["weight"], a["bias"], a["values"], a["indices"], a["layout"], a["scale"])

    def grads(y):
        return torch.autograd.grad(y, [x, v], torch.ones_like(y))

    with T.forced("cpp"):  # the op's kernels: the full path's values
        y_op = call()
        g_op = grads(y_op)
    for _ in range(3):  # passes decided, then the step (the unfused formulation), then recorded
        y = call()
        grads(y)
    n, c = len(sigs), len(checks)
    y = call()
    assert len(sigs) == n and len(checks) == c  # a repeat: no signature, no checks
    assert type(y.grad_fn).__name__ == "AddmmBackward0"
    torch.testing.assert_close(y, y_op)
    for a, e in zip(grads(y), g_op):
        torch.testing.assert_close(a, e)
    idx2 = torch.tensor([1, 9, 17, 40, 41, 77, 127], dtype=torch.int32)
    for change in ({"x": torch.randn(5, K, generator=g)}, {"values": v.detach().clone().requires_grad_()},
                   {"scale": 0.25}, {"indices": idx2, "layout": S.sparse_layout(idx2, N, K)}, {"bias": None},
                   {"layout": None}, {"values": [v, v], "indices": [idx, idx], "layout": [lay, lay]}):
        n = len(sigs)
        for _ in range(2):
            call(**change)
        assert len(sigs) > n, change
    with pytest.raises(ValueError, match="bias"):
        call(bias=torch.ones(N + 1))
    with torch.no_grad():  # another grad mode (inference: the entry point's checks, no step decision)
        c = len(checks)
        call()
        assert len(checks) > c
    W2 = W.clone()
    for _ in range(4):
        call(weight=W2)
    key = id(W2)
    assert key in S._LAST._last
    del W2
    assert key not in S._LAST._last  # the record goes with its weight
