"""The benchmark harness's CPU timing loop (benchmarks/common.py)."""

import itertools
import time

from pyhappy.benchmarks import common as C


class _Variant:
    def __init__(self, fn):
        self.fn, self.grads = fn, ()


def _busy(seconds_of_call):
    def fn():
        end = time.perf_counter() + next(seconds_of_call)
        while time.perf_counter() < end:
            pass
    return fn


def test_rounds_are_added_while_the_paired_interval_is_wide_and_stop_at_the_cap():
    # pyhappy alternates 1 ms and 3 ms calls: the paired ratio's interval never narrows, so rounds are
    # added up to 3 * max_rounds (well within twice the budget).
    variants = {"pyhappy": _Variant(_busy(itertools.cycle([0.001, 0.003]))),
                "unfused": _Variant(_busy(itertools.repeat(0.002)))}
    samples, info = C.time_variants_cpu(variants, budget_s=1.0, min_rounds=4, max_rounds=6, min_sample_s=0.0,
                                        until_ci=("pyhappy", "unfused", 0.08))
    assert info["rounds"] == 18 and info["extra_rounds"] > 0
    assert len(samples["pyhappy"]) == len(samples["unfused"]) == 18
    plain, info = C.time_variants_cpu(variants, budget_s=1.0, min_rounds=4, max_rounds=6, min_sample_s=0.0)
    assert info["rounds"] <= 6 and "extra_rounds" not in info and len(plain["pyhappy"]) == info["rounds"]


def test_median_ci95_brackets_the_median():
    vals = [float(v) for v in range(1, 26)]
    lo, hi = C.median_ci95(vals)
    assert lo < 13 < hi and lo >= 1 and hi <= 25
