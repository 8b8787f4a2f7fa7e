"""benchmarks/gpu_summary.py, the GPU check's summary page, on synthetic results.json and tests.xml."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the checkout's benchmarks package (the installed one is pyhappy.benchmarks)

from benchmarks import gpu_summary, lora_linear, quant_linear, sparse_delta_linear, tt_linear  # noqa: E402

CUDA = torch.device("cuda")  # only read for .type: nothing runs on it


def record(op, shape, params, dtype, pass_, variants, ratio, pct=90.0):
    """A result as common.run_case records it: the primary takes ``ratio`` times every other variant's time."""
    times = {v: 1e-4 * (1.0 if i == 0 else 1.0 / ratio) for i, v in enumerate(variants)}
    r = {"op": op, "shape": shape, "params": params, "dtype": dtype, "pass": pass_, "variants": list(variants),
         "primary": variants[0], "headline": True,
         "times": {v: {"median_s": t, "iqr_s": 0.0, "min_s": t} for v, t in times.items()},
         "pct_of_limit": {v: pct for v in variants}}
    r["ratios"] = {v: {"paired_median": times[variants[0]] / times[v], "paired_ci95": [0.0, 2.0]}
                   for v in variants[1:]}
    r["paired"] = {f"{a}/{b}": times[a] / times[b] for i, a in enumerate(variants) for b in variants[i + 1:]}
    return r


def gpu_results(ratio=0.9, pct=90.0):
    """{family: [records]} for every case the GPU targets read, shaped as the CUDA benchmark records them."""
    lora = [record("lora_linear", "M=4096 K=4096 N=4096 r=16",
                   {"M": 4096, "K": 4096, "N": 4096, "r": 16, "dropout_p": 0.0}, dt, "fwd+bwd",
                   ("pyhappy", "unfused", "base"), ratio) for dt in ("bfloat16", "float32")]
    quant = [record("quant_linear", f"M={M} K=4096 N=4096 {fmt}",
                    {"M": M, "K": 4096, "N": 4096, "format": fmt, "group_size": 128, "kind": "decode", "r": r},
                    "float16", "fwd", ("pyhappy", "cuda", "triton", "dense", "dequant_mm") + (("base_only",) if r else ()),
                    ratio, pct)
             for fmt in ("int4", "int3", "nf4") for M in (1, 16) for r in (0, 16)]
    quant.append(record("quant_linear", "QLoRA M=4096 K=4096 N=4096 r=16 nf4",
                        {"M": 4096, "K": 4096, "N": 4096, "r": 16, "format": "nf4", "group_size": 64, "kind": "train"},
                        "bfloat16", "fwd+bwd", ("pyhappy", "lora_dense", "dequant_unfused"), ratio))
    sparse = [record("sparse_delta_linear", "M=4096 K=4096 N=4096 density=0.01",
                     {"M": 4096, "K": 4096, "N": 4096, "density": 0.01, "nnz": 167772, "kind": "train"},
                     "bfloat16", "fwd+bwd", ("pyhappy", "base", "clone_scatter"), ratio)]
    tt = [record("tt_linear", "M=4096 K=4096 N=4096 tt_rank=4", {"M": 4096, "K": 4096, "N": 4096, "kind": "train"},
                 "bfloat16", "fwd+bwd", tt_linear.VARIANTS, ratio)]
    return {"lora_linear": lora, "quant_linear": quant, "sparse_delta_linear": sparse, "tt_linear": tt}


def write_results(out, families, device="cuda", targets=None):
    mods = {"lora_linear": lora_linear, "quant_linear": quant_linear, "sparse_delta_linear": sparse_delta_linear,
            "tt_linear": tt_linear}
    if targets is None:  # what the benchmark records: the families' own summary() on these results
        targets = {f: [x for x in mods[f].summary(rs, torch.device(device)) if isinstance(x, dict)]
                   for f, rs in families.items()}
    doc = {"env": {"device": device, "device_name": "NVIDIA H200", "torch": "2.11.0", "torch_cuda": "13.0",
                   "triton": "3.6.0", "pyhappy": "0.1.0", "pyhappy_git": "abc1234", "date": "2026-01-01"},
           "families": families, "targets": targets, "regressions": [], "stopped": None}
    (out / "results.json").write_text(json.dumps(doc))
    return targets


def rows_by_label(out, mode="gpu"):
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return {r[0]: r for r in gpu_summary.target_rows(results, mode == "dry-run")}


def test_every_target_row_is_one_the_families_record(tmp_path):
    """The summary's target names are the ones the families' CUDA summaries record: with every case
    present, no row is missing, and each row's result is the family's own verdict."""
    targets = write_results(tmp_path, gpu_results())
    rows = rows_by_label(tmp_path)
    assert len(rows) == len(gpu_summary.TARGETS)
    recorded = {(f, c["what"]): c for f, cs in targets.items() for c in cs}
    for t in gpu_summary.TARGETS:
        label, goal, measured, result, time_s, floor = rows[t.label]
        c = recorded[(t.family, t.what)]
        assert result == ("pass" if c["met"] else "fail"), t.label
        assert measured != "-" and time_s != "-", t.label
        assert goal.split()[1].rstrip("%x") == f"{c['goal']:g}", (goal, c["goal"])
    # The floors are ROOFLINE.md's (benchmarks.roofline, the table's generator).
    assert rows[gpu_summary.TARGETS[0].label][5] == "281 us (compute)"
    assert any(r[5].endswith("(memory)") for r in rows.values())


def test_pass_fail_and_missing_rows(tmp_path):
    fams = gpu_results(ratio=0.9, pct=85.0)
    fams["tt_linear"] = []  # the TT case failed or did not run
    fams["quant_linear"] = [r for r in fams["quant_linear"] if r["params"].get("kind") != "train"]
    write_results(tmp_path, fams)
    rows = rows_by_label(tmp_path)
    lora_base = rows["LoRA fwd+bwd M=4096 K=N=4096 r=16 bf16: pyhappy/base GEMM"]
    assert lora_base[2:4] == ("0.900", "pass")  # pyhappy/base = 0.9 <= 1.03
    lora_unf = rows["LoRA fwd+bwd M=4096 K=N=4096 r=16 bf16: speed-up over unfused"]
    assert lora_unf[2:4] == ("1.111", "fail")  # 1/0.9 < 1.15
    int4 = rows["int4 decode M=1 4096² fp16: % of HBM bandwidth (best of cuda, triton)"]
    assert int4[1:4] == ("≥ 80%", "85%", "pass")
    int3 = rows["int3 decode M=16 4096² fp16: % of HBM bandwidth (best of cuda, triton)"]
    assert int3[1:4] == ("≥ 70%", "85%", "pass")
    for label in ("TT lowrank fwd+bwd M=4096 K=N=4096 bf16: over LoRA r=8",
                  "QLoRA nf4 fwd+bwd M=4096 K=N=4096 r=16: over bf16 LoRA on the dense weight"):
        assert rows[label][2:5] == ("-", "missing", "-"), rows[label]
        assert rows[label][1].startswith("≤ ")  # the goal is still shown


def test_dry_run_and_cpu_results_are_not_measured(tmp_path):
    write_results(tmp_path, gpu_results(), device="cpu", targets={})
    assert {r[3] for r in rows_by_label(tmp_path, "dry-run").values()} == {"not measured (dry run)"}
    (tmp_path / "results.json").unlink()  # the bench did not run at all: on a GPU every row is missing
    assert {r[3] for r in rows_by_label(tmp_path, "gpu").values()} == {"missing"}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2"
skipped="3" tests="10" time="12.5"><testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad[cuda]" time="0.1"><failure message="x">boom</failure></testcase>
<testcase classname="tests.test_b" name="test_worse" time="0.1"><failure message="y">boom</failure></testcase>
<testcase classname="tests.test_b" name="test_err" time="0.1"><error message="z">boom</error></testcase>
</testsuite></testsuites>"""


def test_summary_page(tmp_path):
    write_results(tmp_path, gpu_results())
    (tmp_path / "tests.xml").write_text(JUNIT)
    rc = gpu_summary.main([str(tmp_path), "--mode", "gpu", "--device", "NVIDIA H200",
                           "--phase", "build:pass:120:150:build.log:CUDA for sm_90",
                           "--phase", "info:pass:4:20:info.txt",
                           "--phase", "tests:fail:140:150:tests.xml:--timeout=90 per test",
                           "--phase", "bench:timeout:140:140:results.md, results.json:note: with a colon"])
    assert rc == 0
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("# pyhappy GPU check: NVIDIA H200\n")
    assert "FAILED: tests, bench" in text and "404 s of the 480 s budget" in text
    assert "| build | pass | 120 s | 150 s | build.log | CUDA for sm_90 |" in text
    assert "| tests | fail | 140 s | 150 s | tests.xml | 4 passed, 2 failed, 1 errors, 3 skipped; --timeout=90 per test |" in text
    assert "note: with a colon" in text
    assert "- `tests.test_a::test_bad[cuda]`" in text and "- `tests.test_b::test_err`" in text
    assert "| target | goal | measured | result | pyhappy time | floor (ROOFLINE.md, H100 SXM) |" in text
    assert len(text.splitlines()) < 70  # one page


def test_phase_spec_is_checked():
    with pytest.raises(ValueError, match="name:status:seconds:budget"):
        gpu_summary.Phase.parse("build:pass")
    p = gpu_summary.Phase.parse("bench:pass:1:2:a.md, b.json:x: y")
    assert (p.files, p.note) == ("a.md, b.json", "x: y")


def test_gpu_check_script_plumbing():
    """.ci/gpu: valid bash, CI runs its dry run, the phase budgets sum to at most 8 minutes on the GPU."""
    import re
    import subprocess

    script = os.path.join(ROOT, ".ci", "gpu")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    assert 'bash .ci/gpu --dry-run "$GPU_DRY"' in open(os.path.join(ROOT, ".ci", "run")).read()
    gpu = re.search(r"declare -A BUDGET=\(([^)]*)\)", open(script).read()).group(1)
    budgets = dict(re.findall(r"\[(\w+)\]=(\d+)", gpu))
    assert set(budgets) == set(gpu_summary.PHASES) and sum(map(int, budgets.values())) <= 480, budgets


def test_the_default_cuda_run_has_every_case_the_targets_read(monkeypatch):
    """pyhappy-bench --device cuda (no --full) lists a case for every GPU target, and is sized for the
    GPU check's bench budget (listing needs no GPU: the L2 size is the only device query)."""
    from benchmarks import common, lora_linear_multi

    monkeypatch.setattr(common, "last_level_cache_bytes", lambda device: 50 * 2**20)
    mods = {"lora_linear": lora_linear, "quant_linear": quant_linear, "sparse_delta_linear": sparse_delta_linear,
            "tt_linear": tt_linear, "lora_linear_multi": lora_linear_multi}
    cases = {f: [c for c in m.cases(CUDA, False) if not c.extended] for f, m in mods.items()}

    def matches(c, want):
        fields = {**c.params, "dtype": common.dtype_name(c.dtype), "pass": c.pass_}
        return all(fields.get(k) == v for k, v in want.items())

    for t in gpu_summary.TARGETS:
        assert any(matches(c, t.find) for c in cases[t.family]), t.label
        assert any(matches(c, t.find) and c.headline for c in cases[t.family]), f"{t.label}: not a headline case"
    n_variant_runs = sum(len(c.variants) for cs in cases.values() for c in cs)
    assert sum(map(len, cases.values())) <= 40 and n_variant_runs <= 150, n_variant_runs


@pytest.mark.slow
def test_bench_time_limit_still_writes_reports_the_summary_reads(tmp_path):
    """pyhappy-bench --time-limit: cases not started in time are recorded as not run, the reports are
    written (plots as asked), and the summary says how many did not run."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--family", "tt_linear",
                        "--time-limit", "0", "--plots", "none", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert "time limit" in doc["stopped"] and all(x.get("not_run") for x in doc["families"]["tt_linear"])
    assert "**Stopped early**" in (tmp_path / "results.md").read_text()
    text = gpu_summary.render(tmp_path, "dry-run", [gpu_summary.Phase("bench", "pass", 9, 70)])
    assert "0 of 1 cases ran, 0 errors, 1 not run (the time limit of 0 s was reached)" in text
