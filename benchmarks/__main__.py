"""``pyhappy-bench`` (installed as ``pyhappy.benchmarks``; ``python -m benchmarks`` in a checkout):
run every benchmark family on the default device.

    pyhappy-bench                              # all families, cuda if available else cpu
    pyhappy-bench --quick --out /tmp/x         # a few small cases (< 30 s), for tests
    pyhappy-bench --family lora_linear --device cpu --out results/mine
    pyhappy-bench --device cuda --time-limit 120 --plots combined   # what .ci/gpu runs

Writes results.json, results.md (and, when matplotlib is importable, a PNG of the ratios per family
and one per sweep) into --out: by default ./benchmarks/results/latest under the current directory
(never inside the installed package).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

DEFAULT_OUT = Path("benchmarks") / "results" / "latest"  # relative to the current directory
# Seconds of timed rounds aimed at over the whole run (excluding setup and warm-up); cases are
# shortened proportionally when the run falls behind.
DEFAULT_BUDGET = {"cpu": 85.0, "cuda": float("inf")}  # CUDA: fixed do_bench rounds, no budget
QUICK_BUDGET = 6.0
# Families whose pyhappy/unfused ratio is read as a verdict (no slower than unfused, up to the upper
# end of its 95% interval), and cases that name the pair their figure is read from (Case.ci_pair: the
# decode cases' share of the streaming read). On CPU (not --quick) their pair rounds
# (common.time_variants_cpu: only the two variants, while the interval is wider than common.CI_WIDTH
# of the ratio) may take JUDGED_CI_S seconds a case however far behind the run is, out of
# JUDGED_CI_RESERVE_S for the whole run; the cases after it pay for it, their planned rounds being
# shortened to the budget.
JUDGED_FAMILIES = ("compiler", "lora_linear", "lora_linear_multi")
JUDGED_CI_S = 15.0
JUDGED_CI_RESERVE_S = 60.0
_NOT_FAMILIES = {"common"}


def judged(fam: str, case) -> bool:
    """Whether ``case`` of family ``fam`` gets the pair-round floor (JUDGED_FAMILIES, Case.ci_pair)."""
    return fam in JUDGED_FAMILIES or bool(case.ci_pair)


def discover():
    """{family name: module} of every benchmarks/<name>.py defining FAMILY and cases(), and
    {module name: error} of those that failed to import."""
    package = importlib.import_module(__package__)  # "benchmarks" in a checkout, "pyhappy.benchmarks" installed

    found, failed = {}, {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in _NOT_FAMILIES:
            continue
        try:
            mod = importlib.import_module(f"{__package__}.{info.name}")
        except Exception as e:  # noqa: BLE001  (one broken family must not stop the others)
            failed[info.name] = f"{type(e).__name__}: {e}"
            continue
        if isinstance(getattr(mod, "FAMILY", None), str) and callable(getattr(mod, "cases", None)):
            found[mod.FAMILY] = mod
    return found, failed


def case_budgets(nominal_s, budget, spent, left, judged=False, reserve_left=0.0):
    """(budget of the planned rounds, floor of the pair rounds) in seconds for a case whose own budget
    is ``nominal_s`` when ``spent`` of the run's ``budget`` is gone and the cases left (this one
    included) ask for ``left``: the planned rounds are shortened in proportion when the run is behind
    (all rounds may take twice that, common.time_variants_cpu); a judged case's pair rounds may take
    min(JUDGED_CI_S, ``reserve_left``) whatever that budget is."""
    planned = nominal_s * min(1.0, max(0.0, budget - spent) / left) if left > 0 else nominal_s
    floor = min(JUDGED_CI_S, max(0.0, reserve_left)) if judged else 0.0
    return planned, floor


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="pyhappy-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few small cases (< 30 s)")
    ap.add_argument("--family", action="append", default=None, metavar="NAME",
                    help="run only this family (repeatable); default: all")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda if available, else cpu")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default: ./{DEFAULT_OUT}, relative to the current directory)")
    ap.add_argument("--budget", type=float, default=None,
                    help="CPU: seconds of timed rounds for the whole run, cases shortened proportionally to fit "
                         "(default 85, quick 6); CUDA runs a fixed number of do_bench rounds")
    ap.add_argument("--filter", action="append", default=None, metavar="TEXT",
                    help="run only the cases whose label contains TEXT (repeatable: any matches), "
                         "e.g. --filter 'M=512 K=4096 N=4096 r=16 float32'")
    ap.add_argument("--full", action="store_true",
                    help="also the secondary shapes (densities, ranks, N=11008, ...): the results recorded under "
                         "benchmarks/results/ come from --full runs; the default run keeps to the headline cases and "
                         "a few more (about 6 minutes on a 2-core CPU)")
    ap.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="start no case after this many seconds of wall time (headline cases run first); the cases "
                         "left are recorded as not run and the reports are written as usual. An interrupt (Ctrl-C, "
                         "SIGINT) does the same at once")
    ap.add_argument("--plots", choices=("each", "combined", "none"), default="each",
                    help="each: one PNG per family and one per sweep (default); combined: ratios.png (every family) "
                         "and sweeps.png (every sweep), two files at most; none: no PNG")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from . import common

    t_start = time.perf_counter()
    # The measured CPU dispatch starts from an empty tuning cache, so a run shows the choices pyhappy
    # makes on first use on this machine (not ones a user's cache kept from other conditions).
    # PYHAPPY_TUNE_CACHE set by the caller is respected.
    tune_dir = None
    if not os.environ.get("PYHAPPY_TUNE_CACHE"):
        tune_dir = tempfile.TemporaryDirectory(prefix="pyhappy-bench-tune-")
        os.environ["PYHAPPY_TUNE_CACHE"] = os.path.join(tune_dir.name, "tune.json")
    if args.time_limit is not None and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background with SIGINT ignored (a non-interactive shell): let an interrupt
        # (`timeout -s INT`, as .ci/gpu sends) still stop the run and write its reports.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_name == "cuda" and not torch.cuda.is_available():
        print("pyhappy-bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(dev_name)

    families, failures = discover()
    if args.family:
        unknown = [f for f in args.family if f not in families]
        if unknown:
            known = ", ".join(sorted(families)) or "none"
            print(f"pyhappy-bench: unknown family {', '.join(unknown)} (known: {known})", file=sys.stderr)
            for name, err in failures.items():
                print(f"  benchmarks/{name}.py failed to import: {err}", file=sys.stderr)
            return 2
        families = {f: families[f] for f in args.family}
        failures = {}
    for name, err in failures.items():
        print(f"warning: benchmarks/{name}.py failed to import, skipped: {err}", flush=True)

    todo = []  # (family, module, case)
    for fam, mod in list(families.items()):
        try:
            fam_cases = list(mod.cases(device, args.quick))
        except Exception as e:  # noqa: BLE001  (a family that cannot list its cases is reported, not fatal)
            failures[fam] = f"cases() failed: {type(e).__name__}: {e}"
            print(f"warning: family {fam}: {failures[fam]}", flush=True)
            del families[fam]
            continue
        for case in fam_cases:
            if case.extended and not (args.full or args.filter):
                continue
            if not args.filter or any(f in case.label() for f in args.filter):
                todo.append((fam, mod, case))
    if args.time_limit is not None:
        todo.sort(key=lambda t: not t[2].headline)  # headline cases first (stable otherwise)
    if args.list:
        for fam, _, case in todo:
            print(f"{fam}: {case.label()}")
        return 0

    hooks = {f: m.backend_of for f, m in families.items() if callable(getattr(m, "backend_of", None))}
    env = common.environment(device, hooks)
    print(common.wrap(f"pyhappy-bench on {device.type} ({env['device_name']}), {env['torch_num_threads']} threads, "
                      f"torch {env['torch']}, backend {env['pyhappy_backend']}; {len(todo)} cases"), flush=True)
    limits_start = common.measure_limits(device, args.quick)
    for line in common.limits_lines(limits_start):
        print(common.wrap(f"machine limit (start): {line}"), flush=True)

    budget = args.budget if args.budget is not None else (QUICK_BUDGET if args.quick else DEFAULT_BUDGET[device.type])
    results = {fam: [] for fam in families}
    spent, judged_spent, n_warnings, stopped = 0.0, 0.0, 0, None
    for i, (fam, mod, case) in enumerate(todo, 1):
        if stopped is None and args.time_limit is not None and time.perf_counter() - t_start > args.time_limit:
            stopped = f"not run: the time limit of {args.time_limit:g} s was reached"
        if stopped is not None:
            results[fam].append({"op": case.op, "shape": case.shape, "params": case.params,
                                 "dtype": common.dtype_name(case.dtype), "pass": case.pass_,
                                 "variants": list(case.variants), "primary": case.primary,
                                 "error": f"skipped: {stopped}", "skipped": True, "not_run": True})
            continue
        left = sum(c.budget_s for _, _, c in todo[i - 1:])
        is_judged = judged(fam, case)
        case_budget, ci_floor_s = case_budgets(case.budget_s, budget, spent, left,
                                         judged=is_judged and not args.quick,
                                         reserve_left=JUDGED_CI_RESERVE_S - judged_spent)
        stub = {"op": case.op, "shape": case.shape, "params": case.params, "dtype": common.dtype_name(case.dtype),
                "pass": case.pass_, "variants": list(case.variants), "primary": case.primary}
        skip = common.torch_slow_skip(case, device)
        # Warnings raised while a case runs (torch's sparse-CSR beta notice, deprecations of the
        # optional libraries) are recorded with the case in results.json instead of interleaving with
        # the progress lines.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta")
            try:
                if skip:
                    res = {**stub, "error": f"skipped: {skip}", "skipped": True}
                else:
                    res = common.run_case(case, device, limits_start, case_budget, args.quick,
                                          getattr(mod, "backend_of", None), ci_floor_s=ci_floor_s)
            except KeyboardInterrupt:  # SIGINT (Ctrl-C, `timeout -s INT`): stop here, still write the reports
                stopped = "not run: the run was interrupted"
                res = {**stub, "error": "skipped: interrupted while running", "skipped": True, "not_run": True}
            except Exception as e:  # noqa: BLE001  (record it, go on with the other cases)
                res = {**stub, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        if caught:
            res["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
            n_warnings += len(res["warnings"])
        spent += res.get("timed_s", 0.0)  # only the timed rounds count against the budget
        if is_judged:
            judged_spent += res.get("timing", {}).get("pair_s", 0.0)
        results[fam].append(res)
        print(common.wrap(common.progress_line(i, len(todo), res)), flush=True)

    if stopped is not None:
        n_left = sum(1 for rs in results.values() for r in rs if r.get("not_run"))
        print(common.wrap(f"stopped early: {n_left} cases {stopped.removeprefix('not run: ')}"), flush=True)
    # Measured again at the end: the limits are the best of both, and every % of limit is
    # recomputed against them (a shared machine has slow phases). Not when the run stopped early
    # (out of time or interrupted): the reports come first.
    runs = [limits_start]
    if stopped is None:
        try:
            runs.append(common.measure_limits(device, args.quick))
        except KeyboardInterrupt:
            stopped = "not run: the run was interrupted"
    limits = common.merge_limits(runs)
    for rs in results.values():
        for r in rs:
            common.apply_limits(r, limits)
    for line in common.limits_lines(limits):
        print(common.wrap(f"machine limit: {line}"), flush=True)

    summaries, targets, not_run = {}, {}, {}
    for fam, mod in families.items():
        if callable(getattr(mod, "summary", None)):
            try:
                items = list(mod.summary(results[fam], device))
            except Exception as e:  # noqa: BLE001
                items = [f"summary failed: {type(e).__name__}: {e}"]
            # Strings say what was measured; dicts (common.target) are target checks, kept for the JSON.
            summaries[fam] = [x for x in items if isinstance(x, str)]
            targets[fam] = [x for x in items if isinstance(x, dict)]
        if callable(getattr(mod, "not_run", None)):
            not_run[fam] = list(mod.not_run(device, args.quick, args.full))

    total = time.perf_counter() - t_start
    print()
    print("Times: median ± IQR/2 of interleaved rounds; each comparison is the median of paired per-round "
          "ratios\n(x < 1: pyhappy takes less time), with its 95% confidence interval; * = headline case.")
    for fam, rs in results.items():
        print()
        print(f"== {fam} ({device.type}) ==")
        for r in rs:
            for line in common.case_block(r):
                print(line)
        if not rs:
            print("  no case ran" + ("" if not_run.get(fam) else " (none selected)"))
        for why in not_run.get(fam, []):
            print(common.wrap(f"  not run: {why}"))
        for line in summaries.get(fam, []):
            print(common.wrap(f"  {line}"))
    regress = common.regressions([r for rs in results.values() for r in rs])
    print()
    for line in regress:
        print(common.wrap(line))
    if not regress and any("error" not in r for rs in results.values() for r in rs):
        print("No regressions: every pyhappy case took no longer than the unfused formulation it replaces.")
    if n_warnings:
        print(f"{n_warnings} distinct warnings raised during the cases are listed with them in results.json.")
    files = common.write_reports(args.out, env, limits, results, summaries, total, failures, targets, not_run,
                                 plots=args.plots, stopped=stopped)
    print(common.wrap(f"wrote {', '.join(files)} to {args.out} (total {total:.1f} s)"), flush=True)
    if stopped is not None and "interrupted" in stopped:
        return 130
    return 0 if all("error" not in r or r.get("skipped") for rs in results.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
