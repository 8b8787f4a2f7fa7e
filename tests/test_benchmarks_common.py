"""The benchmark harness's CPU timing loop, its confidence interval and the run's time plan
(benchmarks/common.py, benchmarks/__main__.py), on a fake clock: nothing real is timed."""

import itertools
import math

import pytest
import torch

from pyhappy.benchmarks import __main__ as M  # the installed package (the wheel's, or the checkout's)
from pyhappy.benchmarks import common as C


class _Clock:
    """A clock that only the fake variants move."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _Variant:
    def __init__(self, clock, name, durations, log):
        self.grads = ()

        def fn():
            log.append(name)
            clock.t += next(durations)
        self.fn = fn


def _variants(clock, durations: dict):
    log = []
    return {n: _Variant(clock, n, iter(d), log) for n, d in durations.items()}, log


def _binom_coverage(n, k):
    return 1.0 - 2.0 * sum(math.comb(n, j) for j in range(k + 1)) / 2.0**n


def test_median_interval_is_the_narrowest_symmetric_order_statistic_interval_with_95_percent_coverage():
    for n in range(6, 120):
        lo, hi, cov = C.median_ci_ranks(n)
        assert hi == n - 1 - lo and cov == pytest.approx(_binom_coverage(n, lo))
        assert cov >= 0.95
        assert lo + 1 > (n - 1) // 2 or _binom_coverage(n, lo + 1) < 0.95  # one rank further in: below 95%
    assert C.CI_MIN_ROUNDS == 6
    assert C.median_ci_ranks(5) == (0, 4, pytest.approx(0.9375))  # [min, max] of 5 covers 15/16 only
    # The normal approximation's ranks n/2 -+ 1.96 sqrt(n)/2 cover less than 95% at n = 8 (93%): these do not.
    assert C.median_ci_ranks(8)[:2] == (0, 7)


def test_median_interval_of_9_or_more_ignores_one_stalled_round():
    vals = [0.90, 0.88, 0.86, 0.91, 0.87, 0.89, 0.92, 0.85, 0.90]
    stalled = [1.9] + vals[1:]  # one call of the pair hit by a stop of the process
    assert C.median_ci95(vals) == [0.86, 0.91] and C.median_ci95(stalled) == [0.86, 0.92]  # one rank moves
    assert C.median_ci95(stalled[:5]) == [0.86, 1.9]  # with 5 rounds, [min, max]: the stall sets the upper end


def test_ci_too_wide_reads_the_width_and_the_count_only():
    assert C.ci_too_wide([1.0] * 5, 0.08)  # no 95% interval from 5 ratios, however alike
    assert not C.ci_too_wide([1.0] * 6, 0.08)
    narrow = [0.97, 0.99, 1.0, 1.01, 1.02, 1.03, 0.98, 1.0, 1.0]
    assert not C.ci_too_wide(narrow, 0.08)
    # The same spread around 0.5 or 2 (same relative width): the verdict does not depend on the side of 1.
    assert not C.ci_too_wide([v * 0.5 for v in narrow], 0.08) and not C.ci_too_wide([v * 2 for v in narrow], 0.08)
    assert C.ci_too_wide([0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 0.95, 1.05], 0.08)


def test_pair_rounds_time_only_the_judged_pair_alternating_and_stop_when_the_interval_is_narrow():
    clock = _Clock()
    # pyhappy: 3 warm-up calls, then alternately 1 and 3 ms in the 6 planned rounds (a wide interval),
    # then 2 ms: the paired ratios of the pair rounds are all 1 and pull the interval together.
    py = itertools.chain([0.002] * 3, [0.001, 0.003] * 3, itertools.repeat(0.002))
    variants, log = _variants(clock, {"pyhappy": py, "unfused": itertools.repeat(0.002),
                                      "base": itertools.repeat(0.002)})
    samples, info = C.time_variants_cpu(variants, budget_s=0.036, min_rounds=6, max_rounds=6, warmup_s=0.005,
                                        min_sample_s=0.0, until_ci=("pyhappy", "unfused", 0.08), ci_floor_s=10.0,
                                        clock=clock)
    assert info["rounds"] == 6 and info["pair"] == ["pyhappy", "unfused"]
    k = info["pair_rounds"]
    assert 0 < k < 3 * 6 - 6  # stopped by the interval, before the cap on rounds
    assert len(samples["base"]) == 6 and len(samples["pyhappy"]) == len(samples["unfused"]) == 6 + k
    paired = C.paired_ratios(samples, "pyhappy", "unfused")
    assert not C.ci_too_wide(paired, 0.08) and C.ci_too_wide(paired[:-1], 0.08)  # the first narrow enough
    assert len(C.paired_ratios(samples, "pyhappy", "base")) == 6  # the planned rounds only
    pair_calls = log[-2 * k:]
    assert "base" not in pair_calls
    # Every call follows one of the other variant (a b a b ...), the first one too: the 6th planned round
    # (rotation pyhappy unfused base, starting at round 5 % 3 = 2) ended with unfused.
    assert log[-2 * k - 1] == "unfused" and pair_calls == ["pyhappy", "unfused"] * k
    assert info["pair_s"] == pytest.approx(k * 0.004)


def _pair_of_run(monkeypatch, variants, ci_pair=()):
    """The until_ci that run_case hands the timing loop for a fake case of ``variants``."""
    seen = {}

    def fake_timing(vs, budget_s, min_rounds, max_rounds, until_ci=None, ci_floor_s=0.0):
        seen["until_ci"] = until_ci
        return {n: [1e-3] * 6 for n in vs}, {"rounds": 6}

    monkeypatch.setattr(C, "time_variants_cpu", fake_timing)
    case = C.Case(op="fake", shape="s", params={}, dtype=torch.float32, pass_="fwd", variants=variants,
                  setup=lambda: {n: C.Variant(lambda: torch.zeros(1)) for n in variants},
                  work={n: (1.0, 1.0) for n in variants}, ci_pair=ci_pair)
    limits = {"matmul_flops": {"float32": 1e9}, "bandwidth_Bps": 1e9}
    res = C.run_case(case, torch.device("cpu"), limits, budget_s=0.1, quick=False)
    assert "error" not in res
    return seen["until_ci"]


def test_pair_rounds_narrow_the_cases_ci_pair_else_its_unfused_pair(monkeypatch):
    decode = ("pyhappy", "dequant_mm", "stream_read")
    assert _pair_of_run(monkeypatch, decode) == ("pyhappy", "dequant_mm", C.CI_WIDTH)
    assert _pair_of_run(monkeypatch, decode, ci_pair=("pyhappy", "stream_read")) == ("pyhappy", "stream_read",
                                                                                      C.CI_WIDTH)
    assert _pair_of_run(monkeypatch, ("pyhappy", "dense")) is None  # no unfused pair, none named
    # The decode cases of quant_linear name the streaming read (their share of it is the kernel's figure).
    from pyhappy.benchmarks import quant_linear as QB

    dec = [c for c in QB.cases(torch.device("cpu"), quick=False) if c.params.get("kind") == "decode" and c.params["M"] <= 16]
    assert dec and all(c.ci_pair == ("pyhappy", "stream_read") for c in dec)
    # ... and their pair rounds get the judged cases' floor even when the run is behind.
    assert all(M.judged("quant_linear", c) for c in dec)
    train = [c for c in QB.cases(torch.device("cpu"), quick=False) if c.params.get("kind") == "train"]
    assert train and not any(M.judged("quant_linear", c) for c in train)
    assert M.judged("lora_linear", train[0])  # a judged family: every case


def test_pair_rounds_start_with_the_variant_not_called_last():
    clock = _Clock()
    variants, log = _variants(clock, {"pyhappy": itertools.cycle([0.001, 0.003]),
                                      "unfused": itertools.repeat(0.002)})
    # 4 planned rounds: pyhappy unfused, unfused pyhappy, pyhappy unfused, unfused pyhappy.
    _, info = C.time_variants_cpu(variants, budget_s=0.001, min_rounds=4, max_rounds=5, warmup_s=0.0,
                                  min_sample_s=0.0, until_ci=("pyhappy", "unfused", 0.08), ci_floor_s=0.05,
                                  clock=clock)
    k = info["pair_rounds"]
    assert info["rounds"] == 4 and k > 2
    assert log[:4] == ["pyhappy"] * 2 + ["unfused"] * 2  # two warm-up calls each
    assert log[4:12] == ["pyhappy", "unfused", "unfused", "pyhappy"] * 2
    assert log[12:] == ["unfused", "pyhappy"] * k  # the ratio is still pyhappy/unfused, paired per round
    assert all(x != y for x, y in zip(log[11:], log[12:]))


def _never_narrow(ci_floor_s, budget_s=0.02, until_ci=("pyhappy", "unfused", 0.08)):
    """pyhappy alternates 1 and 3 ms against unfused's 2 ms: the paired ratio's interval never narrows.
    Two warm-up calls each (pyhappy 1 and 1 ms, unfused 2 and 2 ms), then 5 planned rounds at
    budget_s=0.02 (21 ms), then pair rounds of 3 and 5 ms in turn (4 planned rounds at budget_s=0.001:
    16 ms, then 5 and 3 ms)."""
    clock = _Clock()
    pyhappy = itertools.chain([0.001], itertools.cycle([0.001, 0.003]))
    variants, _ = _variants(clock, {"pyhappy": pyhappy, "unfused": itertools.repeat(0.002)})
    return C.time_variants_cpu(variants, budget_s=budget_s, min_rounds=4, max_rounds=5, warmup_s=0.0,
                               min_sample_s=0.0, until_ci=until_ci, ci_floor_s=ci_floor_s, clock=clock)


def test_pair_rounds_stop_at_twice_the_budget_or_their_floor_and_at_three_times_max_rounds():
    # Twice the budget (40 ms) less the planned rounds' 21 ms: pair rounds start at 0, 3, 8, 11, 16 ms
    # into them, the one started before 19 ms being the last.
    _, info = _never_narrow(ci_floor_s=0.0)
    assert info["rounds"] == 5 and info["pair_rounds"] == 5 and info["pair_s"] == pytest.approx(0.019)
    # A budget shortened to nothing: no pair round without a floor; with a floor of 15.5 ms, those
    # started at 0, 5, 8, 13 ms.
    _, info = _never_narrow(ci_floor_s=0.0, budget_s=0.001)
    assert info["rounds"] == 4 and "pair_rounds" not in info  # min_rounds planned rounds, then nothing
    _, info = _never_narrow(ci_floor_s=0.0155, budget_s=0.001)
    assert info["pair_rounds"] == 4 and info["pair_s"] == pytest.approx(0.016)
    samples, info = _never_narrow(ci_floor_s=100.0)  # the cap on rounds: 3 * max_rounds in all
    assert info["rounds"] + info["pair_rounds"] == 15 and len(samples["pyhappy"]) == 15
    samples, info = _never_narrow(ci_floor_s=100.0, until_ci=None)
    assert info["rounds"] == 5 and "pair_rounds" not in info and len(samples["pyhappy"]) == 5


def test_judged_cases_keep_their_pair_time_when_the_run_is_behind():
    # On schedule: a case gets its own budget; no floor for the pair rounds of a case not judged.
    assert M.case_budgets(4.0, budget=85.0, spent=0.0, left=40.0) == (4.0, 0.0)
    # Behind (the cases left ask for 300 s, 25 s of the budget are left): shortened in proportion...
    planned, floor = M.case_budgets(4.0, budget=85.0, spent=60.0, left=300.0)
    assert planned == pytest.approx(4.0 * 25 / 300) and floor == 0.0
    # ... but a judged case's pair rounds keep JUDGED_CI_S, while the run's reserve lasts.
    planned_j, floor_j = M.case_budgets(4.0, budget=85.0, spent=60.0, left=300.0, judged=True, reserve_left=60.0)
    assert planned_j == planned and floor_j == M.JUDGED_CI_S
    assert M.case_budgets(4.0, 85.0, 60.0, 300.0, judged=True, reserve_left=5.0)[1] == 5.0
    assert M.case_budgets(4.0, 85.0, 60.0, 300.0, judged=True, reserve_left=-1.0)[1] == 0.0
    # Past the budget: planned rounds get nothing (time_variants_cpu still runs min_rounds).
    assert M.case_budgets(4.0, budget=85.0, spent=90.0, left=300.0)[0] == 0.0


def test_tables_say_when_an_interval_covers_less_than_95_percent():
    rt = {"paired_median": 0.88, "paired_ci95": [0.68, 1.91], "paired_ci_level": C.median_ci_ranks(5)[2]}
    assert C.ci_text(rt) == "0.68-1.91 at 94%"
    rt["paired_ci_level"] = C.median_ci_ranks(9)[2]
    assert C.ci_text(rt) == "0.68-1.91"


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_a_steady_step_peak_counts_the_steps_buffers_not_its_first_calls_one_time_memory():
    # The first call keeps 96 MiB for good (a one-time cost: a tuner's measurement, a primitive
    # cache); every call holds a 48 MiB buffer for its duration (the step's own peak). Both sizes
    # are above glibc's largest mmap threshold, so they are mapped and unmapped on their own.
    kept, fresh = [], []
    leaf = torch.zeros(4, requires_grad=True)

    def step():
        if not kept:
            kept.append(torch.ones(24 * 2**20))
        buf = torch.ones(12 * 2**20)
        fresh.append(leaf.grad is None)  # each step starts without the gradient the one before left
        leaf.grad = torch.ones(4)
        return float(buf[0])

    got = C.steady_step_peak_bytes(step, [leaf])
    assert fresh == [True, True]
    assert 44 * 2**20 <= got <= 60 * 2**20, got / 2**20


def test_variants_compared_for_the_same_result_read_the_same_rotated_copies(monkeypatch):
    """Decode cases rotate their operands through copies; the correctness check must still compare
    each variant's first call on the same copy (else it reports a mismatch of different weights)."""
    monkeypatch.setattr(C, "time_variants_cpu", lambda vs, *a, **k: ({n: [1e-3] * 6 for n in vs}, {"rounds": 6}))
    limits = {"matmul_flops": {"float32": 1e9, "bfloat16": 1e9}, "bandwidth_Bps": 1e9}

    def setup():
        rot = C.Rotation([torch.full((3,), float(i)) for i in range(4)])
        return {n: C.Variant(lambda: rot.next() * 1.0) for n in ("pyhappy", "unfused")}

    fake = C.Case(op="fake", shape="s", params={}, dtype=torch.float32, pass_="fwd", variants=("pyhappy", "unfused"),
                  setup=setup, work={"pyhappy": (1.0, 1.0), "unfused": (1.0, 1.0)}, same_result=("unfused",))
    assert C.run_case(fake, torch.device("cpu"), limits, budget_s=0.1, quick=True)["rel_err_vs_primary"] == {
        "unfused": 0.0}
    # The LoRA family's quick cases at M=64 rotate their weights (several copies).
    from pyhappy.benchmarks import lora_linear as LB

    for case in LB.cases(torch.device("cpu"), quick=True)[:2]:
        assert case.note  # rotated
        res = C.run_case(case, torch.device("cpu"), limits, budget_s=0.1, quick=True)
        assert res["rel_err_vs_primary"]["unfused"] < C.tolerance("float32"), res["rel_err_vs_primary"]


def test_rounds_are_planned_from_the_fastest_warm_up_call_not_a_first_call_that_tuned():
    # pyhappy's first warm-up call takes 500 ms (the tuner measuring a small layer's whole step),
    # then 2 ms like the unfused formulation: a 102 ms budget holds 25 rounds of 4 ms, not the
    # 3 (min_rounds) that the slow call would plan.
    clock = _Clock()
    variants, log = _variants(clock, {"pyhappy": itertools.chain([0.5], itertools.repeat(0.002)),
                                      "unfused": itertools.repeat(0.002)})
    samples, info = C.time_variants_cpu(variants, budget_s=0.102, min_rounds=3, max_rounds=100, warmup_s=0.0,
                                        min_sample_s=0.0, clock=clock)
    assert log[:4] == ["pyhappy"] * 2 + ["unfused"] * 2
    assert info["rounds"] == 25 and samples["pyhappy"] == pytest.approx([0.002] * 25)
