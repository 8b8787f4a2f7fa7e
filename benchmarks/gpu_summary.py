"""The one-page summary of the GPU check (``bash .ci/gpu``): pass/fail per phase and the GPU targets.

    python -m benchmarks.gpu_summary OUT_DIR --mode gpu|dry-run \\
        --phase build:pass:123.4:150:build.log:"CUDA for sm_90" --phase tests:fail:140:150:tests.xml ...

Reads ``OUT_DIR/results.json`` (written by ``pyhappy-bench``: its ``targets``, the checks each
family's ``summary()`` records, and its per-case times) and ``OUT_DIR/tests.xml`` (pytest's JUnit
XML), writes ``OUT_DIR/summary.md``. Nothing here measures anything: every figure is read from those
two files, and the floor beside it is ``benchmarks/ROOFLINE.md``'s (``benchmarks.roofline``).

Each row of the target table is one target check a family records on CUDA (``TARGETS`` below names
it exactly as the family does, ``tests/test_gpu_summary.py`` checks the names against the families'
own ``summary()``). A row reads "pass" or "fail" from the recorded check, "missing" when the run
recorded no such check (its case failed, was not run, or the bench did not run), and
"not measured (dry run)" in a dry run, whose benchmark ran on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

try:  # a checkout (python -m benchmarks.gpu_summary) or the installed package
    from . import roofline
    from .common import find_result, fmt_time
except ImportError:  # pragma: no cover  (run as a script)
    from benchmarks import roofline
    from benchmarks.common import find_result, fmt_time


@dataclass(frozen=True)
class Target:
    label: str  # what the summary calls it
    family: str
    what: str  # the target check's "what", exactly as the family records it (benchmarks/<family>.py)
    op: str  # the goal as the family sets it (shown when the run has no figure)
    goal: float
    find: dict = field(default_factory=dict)  # the case whose pyhappy time is shown (common.find_result)
    variant: str = "pyhappy"
    floor: Optional[tuple] = None  # (kernel, shape) of the ROOFLINE.md row beside it
    unit: str = "x"  # "x": a time ratio or speed-up; "%": a percentage


_LORA = {"M": 4096, "K": 4096, "N": 4096, "r": 16, "dropout_p": 0.0, "pass": "fwd+bwd"}
_LORA_FLOOR = ("lora_linear fwd+bwd (Triton)", "M=4096 K=N=4096 r=16")


def _decode(fmt, M, goal):
    gs = 64 if fmt == "nf4" else 128
    return Target(f"{fmt} decode M={M} 4096² fp16: % of HBM bandwidth (best of cuda, triton)", "quant_linear",
                  f"CUDA M={M} 4096² {fmt} fp16: % of HBM bandwidth", ">=", goal,
                  {"M": M, "K": 4096, "N": 4096, "format": fmt, "dtype": "float16", "kind": "decode", "r": 0},
                  floor=("quant_decode (CUDA C++)", f"{fmt} g{gs} M={M} K=4096 N=4096"), unit="%")


TARGETS = (
    Target("LoRA fwd+bwd M=4096 K=N=4096 r=16 bf16: pyhappy/base GEMM", "lora_linear",
           "CUDA fwd+bwd M=4096 K=N=4096 r=16 bfloat16: pyhappy/base", "<=", 1.03, {**_LORA, "dtype": "bfloat16"},
           floor=_LORA_FLOOR),
    Target("LoRA fwd+bwd M=4096 K=N=4096 r=16 bf16: speed-up over unfused", "lora_linear",
           "CUDA fwd+bwd M=4096 K=N=4096 r=16 bfloat16: speed-up over unfused", ">=", 1.15,
           {**_LORA, "dtype": "bfloat16"}, floor=_LORA_FLOOR),
    Target("LoRA fwd+bwd M=4096 K=N=4096 r=16 fp32: pyhappy/base GEMM", "lora_linear",
           "CUDA fwd+bwd M=4096 K=N=4096 r=16 float32: pyhappy/base", "<=", 1.03, {**_LORA, "dtype": "float32"}),
    Target("LoRA fwd+bwd M=4096 K=N=4096 r=16 fp32: speed-up over unfused", "lora_linear",
           "CUDA fwd+bwd M=4096 K=N=4096 r=16 float32: speed-up over unfused", ">=", 1.15,
           {**_LORA, "dtype": "float32"}),
    _decode("int4", 1, 80), _decode("nf4", 1, 80), _decode("int3", 1, 75), _decode("int4", 16, 70),
    _decode("int3", 16, 70),
    Target("int4 decode + LoRA r=16 M=1: time over the base-only kernel", "quant_linear",
           "CUDA M=1 int4 LoRA r=16 over base-only", "<=", 1.05,
           {"M": 1, "K": 4096, "N": 4096, "format": "int4", "dtype": "float16", "kind": "decode", "r": 16},
           variant="cuda", floor=("quant_decode + LoRA r=16", "int4 g128 M=1 K=N=4096")),
    Target("int4 decode + LoRA r=16 M=16: time over the base-only kernel", "quant_linear",
           "CUDA M=16 int4 LoRA r=16 over base-only", "<=", 1.05,
           {"M": 16, "K": 4096, "N": 4096, "format": "int4", "dtype": "float16", "kind": "decode", "r": 16},
           variant="cuda", floor=("quant_decode + LoRA r=16", "int4 g128 M=16 K=N=4096")),
    Target("QLoRA nf4 fwd+bwd M=4096 K=N=4096 r=16: over bf16 LoRA on the dense weight", "quant_linear",
           "CUDA QLoRA fwd+bwd M=4096 4096² r=16 nf4 bf16: pyhappy/lora_dense", "<=", 1.25,
           {"M": 4096, "format": "nf4", "kind": "train", "dtype": "bfloat16"},
           floor=("quant_linear QLoRA fwd+bwd (Triton)", "nf4 M=4096 K=N=4096 r=16")),
    Target("sparse delta 1% fwd+bwd M=4096 K=N=4096 bf16: pyhappy/base GEMM", "sparse_delta_linear",
           "CUDA fwd+bwd 1% M=4096 4096² bf16: pyhappy/base", "<=", 1.15,
           {"M": 4096, "K": 4096, "N": 4096, "density": 0.01, "kind": "train", "dtype": "bfloat16"},
           floor=("sparse_delta_linear fwd+bwd (Triton)", "1% M=4096 K=N=4096")),
    Target("sparse delta 1% fwd+bwd M=4096 K=N=4096 bf16: speed-up over clone+scatter", "sparse_delta_linear",
           "CUDA fwd+bwd 1% M=4096 4096² bf16: speed-up over clone+scatter", ">=", 1.6,
           {"M": 4096, "K": 4096, "N": 4096, "density": 0.01, "kind": "train", "dtype": "bfloat16"},
           floor=("sparse_delta_linear fwd+bwd (Triton)", "1% M=4096 K=N=4096")),
    Target("TT lowrank fwd+bwd M=4096 K=N=4096 bf16: over LoRA r=8", "tt_linear",
           "CUDA M=4096 K=4096 N=4096 tt_rank=4 bfloat16: lowrank/lora_r8", "<=", 1.2,
           {"M": 4096, "K": 4096, "N": 4096, "dtype": "bfloat16"}, variant="pyhappy_lowrank"),
    Target("TT lowrank fwd+bwd M=4096 K=N=4096 bf16: speed-up over tensordot", "tt_linear",
           "CUDA M=4096 K=4096 N=4096 tt_rank=4 bfloat16: lowrank speed-up over tensordot", ">=", 2.0,
           {"M": 4096, "K": 4096, "N": 4096, "dtype": "bfloat16"}, variant="pyhappy_lowrank"),
)

PHASES = ("build", "info", "tests", "bench", "summary")


@dataclass
class Phase:
    name: str
    status: str  # pass, fail, timeout, skipped
    seconds: float
    budget: float
    files: str = ""
    note: str = ""

    @classmethod
    def parse(cls, spec: str) -> "Phase":
        """``name:status:seconds:budget[:files[:note]]`` (the note may contain colons)."""
        parts = spec.split(":", 5)
        if len(parts) < 4:
            raise ValueError(f"--phase wants name:status:seconds:budget[:files[:note]], got {spec!r}")
        name, status, secs, budget = parts[:4]
        return cls(name, status, float(secs), float(budget), *(parts[4:6]))


def _floors() -> dict:
    """{(kernel, shape): (seconds, bound)} from the ROOFLINE.md table's generator."""
    out = {}
    for name, shape, nbytes, flops in roofline.rows():
        tm, tc = nbytes / roofline.HBM_BPS, flops / roofline.PEAK_FLOPS
        out[(name, shape)] = (max(tm, tc), "memory" if tm >= tc else "compute")
    return out


def _fmt_value(v: float, unit: str) -> str:
    return f"{v:.0f}%" if unit == "%" else f"{v:.3f}"


def _fmt_goal(op: str, goal: float, unit: str) -> str:
    sym = {"<=": "≤", ">=": "≥", "<": "<", ">": ">"}.get(op, op)
    return f"{sym} {goal:g}{'%' if unit == '%' else ('x' if unit == 'x' else '')}"


def target_rows(results: Optional[dict], dry_run: bool) -> list:
    """[(label, goal, measured, result, pyhappy time, floor)] for every GPU target: its figure from
    results.json's ``targets``, "missing" where the run has none (or "not measured (dry run)")."""
    floors = _floors()
    recorded = {}
    families = {}
    on_gpu = False
    if results is not None:
        on_gpu = results.get("env", {}).get("device") == "cuda"
        families = results.get("families", {})
        for fam, checks in results.get("targets", {}).items():
            for c in checks:
                recorded[(fam, c.get("what"))] = c
    rows = []
    for t in TARGETS:
        c = recorded.get((t.family, t.what)) if on_gpu else None
        goal = _fmt_goal(c["op"], c["goal"], t.unit) if c else _fmt_goal(t.op, t.goal, t.unit)
        if c is not None:
            measured = _fmt_value(c["value"], t.unit)
            result = "pass" if c["met"] else "fail"
        else:
            measured = "-"
            result = "not measured (dry run)" if dry_run else "missing"
        time_s = "-"
        r = find_result(families.get(t.family, []), **t.find) if on_gpu else None
        if r is not None and t.variant in r.get("times", {}):
            time_s = fmt_time(r["times"][t.variant]["median_s"])
        floor = "-"
        if t.floor is not None and t.floor in floors:
            secs, bound = floors[t.floor]
            floor = f"{fmt_time(secs)} ({bound})"
        rows.append((t.label, goal, measured, result, time_s, floor))
    return rows


def junit_counts(xml_path: Path) -> Optional[dict]:
    """{tests, failures, errors, skipped, failed: [names]} of a JUnit XML file, None if unreadable."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            counts[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"].append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return counts


def bench_counts(results: Optional[dict]) -> Optional[dict]:
    if results is None:
        return None
    rs = [r for rr in results.get("families", {}).values() for r in rr]
    return {
        "cases": len(rs),
        "ran": sum(1 for r in rs if "error" not in r),
        "errors": [f"{r['op']} {r['shape']} {r['dtype']} {r['pass']}: {r['error'][:160]}"
                   for r in rs if "error" in r and not r.get("skipped")],
        "not_run": sum(1 for r in rs if r.get("not_run")),
        "skipped": sum(1 for r in rs if r.get("skipped") and not r.get("not_run")),
        "stopped": results.get("stopped"),
        "regressions": results.get("regressions", []),
    }


def _md_table(header, rows) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]


def render(out: Path, mode: str, phases: list, device: str = "", total_budget: float = 480.0) -> str:
    """The summary's markdown (one page)."""
    results = None
    rpath = out / "results.json"
    if rpath.is_file():
        try:
            results = json.loads(rpath.read_text())
        except (OSError, ValueError):
            results = None
    tests = junit_counts(out / "tests.xml")
    bench = bench_counts(results)
    dry = mode == "dry-run"
    env = (results or {}).get("env", {})
    title = "dry run on CPU" if dry else (device or env.get("device_name") or "GPU")
    lines = [f"# pyhappy GPU check: {title}", ""]
    total = sum(p.seconds for p in phases)
    failed = [p.name for p in phases if p.status != "pass"]
    verdict = "every phase passed" if not failed else f"FAILED: {', '.join(failed)}"
    facts = [f"mode {mode}", f"{total:.0f} s of the {total_budget:.0f} s budget", verdict]
    if env:
        facts.insert(1, f"torch {env.get('torch')} (cuda {env.get('torch_cuda')}), triton {env.get('triton')}, "
                        f"pyhappy {env.get('pyhappy')} ({env.get('pyhappy_git')}), {env.get('date')}")
    lines += ["; ".join(facts) + ".", "", "## Phases", ""]
    rows = []
    for p in phases:
        note = p.note
        if p.name == "tests" and tests is not None:
            note = (f"{tests['tests'] - tests['failures'] - tests['errors'] - tests['skipped']} passed, "
                    f"{tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped"
                    + (f"; {note}" if note else ""))
        if p.name == "bench" and bench is not None:
            note = (f"{bench['ran']} of {bench['cases']} cases ran, {len(bench['errors'])} errors"
                    + (f", {bench['not_run']} not run ({bench['stopped'].removeprefix('not run: ')})"
                       if bench["not_run"] else "")
                    + (f", {bench['skipped']} skipped" if bench["skipped"] else "")
                    + (f"; {note}" if note else ""))
        rows.append((p.name, p.status, f"{p.seconds:.0f} s", f"{p.budget:.0f} s", p.files or "-", note or "-"))
    lines += _md_table(("phase", "result", "time", "budget", "files", "notes"), rows)
    if tests is not None and tests["failed"]:
        shown = tests["failed"][:10]
        lines += ["", f"Failed tests ({len(tests['failed'])}; details in tests.xml):", ""]
        lines += [f"- `{n}`" for n in shown] + ([f"- ... and {len(tests['failed']) - 10} more"]
                                                 if len(tests["failed"]) > 10 else [])
    if bench is not None and bench["errors"]:
        lines += ["", f"Benchmark errors ({len(bench['errors'])}; tracebacks in results.json):", ""]
        lines += [f"- {e}" for e in bench["errors"][:8]]
    lines += ["", "## GPU targets", ""]
    trows = target_rows(results, dry)
    lines += _md_table(("target", "goal", "measured", "result", "pyhappy time", "floor (ROOFLINE.md, H100 SXM)"),
                       trows)
    n = {k: sum(1 for r in trows if r[3] == k) for k in ("pass", "fail", "missing")}
    lines += ["", f"{n['pass']} pass, {n['fail']} fail, {n['missing']} missing"
              + (f", {len(trows) - sum(n.values())} not measured (dry run: the benchmark ran on the CPU)" if dry else "")
              + ". Measured: the figure each family's summary records in results.json (time ratios are medians of "
                "paired rounds; % of HBM bandwidth against the bandwidth measured in the same run). Floor: the "
                "kernel's bytes at 3.35 TB/s or FLOPs at 989 TFLOP/s, the larger; an H200 moves 4.8 TB/s."]
    if bench is not None and bench["regressions"]:
        lines += ["", f"{len(bench['regressions'])} REGRESSION lines (pyhappy slower than the unfused formulation): "
                      "see results.md."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the GPU check's output folder (reads results.json, tests.xml)")
    ap.add_argument("--mode", choices=("gpu", "dry-run"), required=True)
    ap.add_argument("--phase", action="append", default=[], metavar="NAME:STATUS:SECONDS:BUDGET[:FILES[:NOTE]]")
    ap.add_argument("--device", default="", help="the GPU's name (else read from results.json)")
    ap.add_argument("--total-budget", type=float, default=480.0)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    phases = [Phase.parse(s) for s in args.phase]
    text = render(args.out, args.mode, phases, args.device, args.total_budget)
    (args.out / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
