"""The repository's promises: README commands, CI script, import-time behaviour, info, benchmarks."""

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*p):
    with open(os.path.join(ROOT, *p)) as f:
        return f.read()


def _readme_commands():
    return re.findall(r"```\n(pip install [^\n]+)\n```", _read("README.md"))


def test_ci_runs_exactly_the_readme_test_command():
    main_job, tests = _readme_commands()
    assert main_job.endswith("pyhappy-bench")
    ci_lines = [ln.strip() for ln in _read(".ci", "run").splitlines()]
    assert tests in ci_lines


def test_readme_usage_example_runs():
    code = re.search(r"```python\n(.*?)```", _read("README.md"), re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_import_without_extension_falls_back_to_reference():
    code = (
        "import sys, warnings; sys.modules['pyhappy._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); import pyhappy, torch\n"
        "from pyhappy import backends\n"
        "print('BACKEND', backends.select('lora_linear', torch.device('cpu')))\n"
        "print('WARN', [str(x.message) for x in w])\n"
        "y = pyhappy.ops.lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0)\n"
        "print('SHAPE', tuple(y.shape))\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "BACKEND reference" in r.stdout and "SHAPE (4," not in r.stdout and "SHAPE (2, 4)" in r.stdout
    assert "pip install --no-build-isolation -e ." in r.stdout  # the warning says how to fix it


def test_import_does_not_initialise_cuda():
    r = _run("import torch, pyhappy; print('INIT', torch.cuda.is_initialized())")
    assert r.returncode == 0, r.stderr
    assert "INIT False" in r.stdout


def test_info_reports_backends():
    r = subprocess.run([sys.executable, "-m", "pyhappy.info"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "lora_linear@cpu" in r.stdout and "pyhappy._C" in r.stdout


@pytest.mark.slow
def test_benchmark_quick_run_writes_results(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    names = os.listdir(tmp_path)
    assert any(n.endswith(".json") for n in names) and any(n.endswith(".md") for n in names), names


def test_roofline_note_matches_its_generator():
    sys.path.insert(0, ROOT)
    from benchmarks import roofline

    assert roofline.table() in _read("benchmarks", "ROOFLINE.md"), \
        "benchmarks/ROOFLINE.md is stale: regenerate its table with python -m benchmarks.roofline"


def test_benchmark_skips_cases_whose_torch_baselines_are_impractical(monkeypatch):
    """Where torch's bf16 GEMM is far slower than fp32 (an AVX2 CPU), a bf16 case whose torch
    variants would take more than 3 s a call is skipped with the measured rate; fp32 cases, CUDA,
    small bf16 cases and machines with a fast bf16 GEMM are not."""
    sys.path.insert(0, ROOT)
    from benchmarks import common

    rates = {torch.float32: {"nt": 150e9, "nn": 150e9}, torch.bfloat16: {"nt": 20e9, "nn": 0.3e9}}
    monkeypatch.setattr(common, "torch_gemm_rates", lambda dt: rates[dt])

    def case(dtype, flops, pass_="fwd+bwd"):
        return common.Case(op="x", shape="s", params={}, dtype=dtype, pass_=pass_, variants=("pyhappy", "base"),
                           setup=lambda: {}, work={"pyhappy": (flops, 0), "base": (flops, 0)})

    cpu = torch.device("cpu")
    why = common.torch_slow_skip(case(torch.bfloat16, 34e9), cpu)
    assert why and "bfloat16" in why and "300.0 MFLOP/s" in why
    assert common.torch_slow_skip(case(torch.bfloat16, 34e9, "fwd"), cpu) is None  # 1.7 s at the nt rate
    assert common.torch_slow_skip(case(torch.bfloat16, 0.5e9), cpu) is None
    assert common.torch_slow_skip(case(torch.float32, 1e15), cpu) is None
    assert common.torch_slow_skip(case(torch.bfloat16, 34e9), torch.device("meta")) is None
    rates[torch.bfloat16] = {"nt": 800e9, "nn": 800e9}
    assert common.torch_slow_skip(case(torch.bfloat16, 34e9), cpu) is None
