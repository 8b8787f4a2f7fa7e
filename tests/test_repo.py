"""The repository's promises: README commands, CI script, import-time behaviour, info, benchmarks."""

import os
from pathlib import Path
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


@pytest.mark.parametrize("path", ["README.md", os.path.join("benchmarks", "README.md"), os.path.join("csrc", "README.md")])
def test_readme_python_blocks_run_verbatim(path, tmp_path):
    """Every ```python block of the README files runs as written (a line that needs an optional
    package must be commented out in the README itself), in a fresh process with a user's defaults:
    measured dispatch on (with a cache of its own), not the suite's PYHAPPY_TUNE=off, since what
    the tuner picks decides which code torch.compile traces."""
    blocks = re.findall(r"```python\n(.*?)```", _read(path), re.S)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYHAPPY_")}
    env["PYHAPPY_TUNE_CACHE"] = str(tmp_path / "tune.json")
    for i, code in enumerate(blocks):
        script = tmp_path / f"block{i + 1}.py"
        script.write_text(code)
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=600)
        assert r.returncode == 0, f"{path} block {i + 1}:\n{r.stderr[-4000:]}"


def test_readme_orients_and_links():
    text = _read("README.md")
    assert len(text.splitlines()) <= 200
    for link in ("benchmarks/README.md", "csrc/README.md"):
        assert f"]({link})" in text and os.path.isfile(os.path.join(ROOT, link)), link
    for feature in ("pyhappy.tune(model, *inputs)", "python -m pyhappy.tune", "PYHAPPY_TUNE", "PYHAPPY_TUNE_CACHE",
                    "modules_to_save", "layers_to_transform", "adapter_name=", "save_peft_adapter(model, path)",
                    "bitsandbytes", "Conv1D", 'backend="pyhappy"'):
        assert feature in text, feature
    for path in ("README.md", os.path.join("benchmarks", "README.md")):
        for history in ("Earlier run", "not yet re-recorded", "this session", "NOT MET"):
            assert history not in _read(path), (path, history)


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


_BLOCK_TRITON = (
    "import sys\n"
    "class _NoTriton:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'triton' or name.startswith('triton.'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, _NoTriton())\n"
)


def test_import_is_silent_without_triton():
    """torch logs "Triton not available" once per triton_op registered without Triton; pyhappy's
    import filters exactly that, so the import prints nothing (as ``import torch`` prints nothing)."""
    r = _run(_BLOCK_TRITON + "import torch, pyhappy\nprint('OK', 'triton' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK False" and r.stderr == "", r.stderr
    r = _run("import torch, pyhappy")  # with Triton (when installed) as well
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_import_filter_is_removed_after_the_import():
    r = _run("import logging, pyhappy\nprint('FILTERS', logging.getLogger('torch._library.triton').filters)")
    assert r.returncode == 0, r.stderr
    assert "FILTERS []" in r.stdout


def test_compiler_reachable_and_registered_as_a_torch_compile_backend():
    code = (
        "import torch, pyhappy\n"
        "assert callable(pyhappy.compiler.backend) and callable(pyhappy.compiler.make_backend)\n"
        "F = torch.nn.functional\n"
        "def f(x, W, A, B):\n"
        "    return F.linear(x, W) + 2.0 * F.linear(F.linear(x, A), B)\n"
        "torch.manual_seed(0)\n"
        "x, W, A, B = torch.randn(4, 64), torch.randn(32, 64), torch.randn(8, 64), torch.randn(32, 8)\n"
        "y = torch.compile(f, backend='pyhappy', fullgraph=True)(x, W, A, B)\n"
        # fp32 sums of 64 products in another order than MKL's: within a few K·eps of the magnitude
        "torch.testing.assert_close(y, f(x, W, A, B), rtol=1e-5, atol=1e-4)\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "print('SAME', lookup_backend('pyhappy') is pyhappy.compiler.backend)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "SAME True" in r.stdout


def test_build_stops_at_once_without_torch_naming_no_build_isolation():
    """An isolated build (pip install . with build isolation) has no torch: setup.py exits at once
    with one message saying what to do, instead of compiling for minutes."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']\n"
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__file__': 'setup.py', '__name__': '__main__'})")
    r = _run(code)
    assert r.returncode != 0
    assert "--no-build-isolation" in r.stderr and "torch" in r.stderr
    assert len(r.stderr.splitlines()) <= 3, r.stderr


def test_benchmarks_and_triton_kernels_install_inside_the_package():
    text = _read("setup.py")
    assert '"pyhappy.triton_kernels": "triton_kernels"' in text and '"pyhappy.benchmarks": "benchmarks"' in text
    assert 'pyhappy-bench = "pyhappy.benchmarks.__main__:main"' in _read("pyproject.toml")
    r = _run("import pyhappy.triton_kernels, pyhappy.benchmarks.__main__ as m; print('OUT', m.DEFAULT_OUT)")
    assert r.returncode == 0, r.stderr
    assert "OUT benchmarks/results/latest" in r.stdout  # relative: under the current directory


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


def test_benchmark_wording_and_width():
    """Ratios are worded one way, the number the tables print ("0.94x the time of"), terminal lines fit
    120 columns, and a pyhappy case slower than its unfused formulation gives a REGRESSION line."""
    sys.path.insert(0, ROOT)
    from benchmarks import common

    assert common.compare(0.94, "base", "pyhappy") == "pyhappy 0.94x the time of base"
    assert common.compare(1.07, "unfused", "pyhappy") == "pyhappy 1.07x the time of unfused"
    assert "same time" in common.compare(1.001, "unfused")
    t = {"median_s": 0.0875, "iqr_s": 0.001, "min_s": 0.086}
    res = {"op": "lora_linear", "shape": "M=512 K=4096 N=4096 r=16 " + "x" * 150, "dtype": "float32",
           "pass": "fwd+bwd", "variants": ["pyhappy", "unfused", "base"], "primary": "pyhappy", "headline": True,
           "times": {"pyhappy": t, "unfused": t, "base": t}, "pct_of_limit": {"pyhappy": 40.0, "unfused": None, "base": 41.0},
           "ratios": {n: {"paired_median": v, "paired_ci95": (v - 0.01, v + 0.01)} for n, v in (("unfused", 1.07), ("base", 0.5))},
           "paired": {"pyhappy/unfused": 1.07, "pyhappy/base": 0.5, "unfused/base": 0.47},
           "timing": {"rounds": 9}, "wall_s": 1.0}
    lines = common.case_block(res) + [common.wrap(common.progress_line(1, 1, res))]
    lines += [common.wrap(x) for x in common.regressions([res])]
    text = "\n".join(lines)
    assert all(len(ln) <= common.WIDTH for ln in text.splitlines()), text
    flat = re.sub(r"\s+", " ", text)
    assert "1.07x the time of unfused" in flat and "REGRESSION" in flat and "NOT MET" not in flat
    assert "0.500x the time of base" in flat and "REGRESSION lora_linear" in flat
    assert "1.070x the time of unfused (95% CI" in flat  # never "the same time as" in a REGRESSION line
    res["paired"]["pyhappy/unfused"] = 1.0004
    assert "pyhappy 1.00040x the time of unfused" in common.regressions([res])[0]
    assert not re.search(r"x (faster|slower) than", flat)


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


def test_no_binaries_or_large_files_are_tracked():
    """The repository holds sources: no wheels, archives or compiled objects, and no file over 1 MiB
    except recorded benchmark results."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    files = [f for f in out.stdout.decode().split("\0") if f]
    binary = [f for f in files if f.endswith((".whl", ".tar.gz", ".zip", ".so", ".o", ".pyd", ".dll", ".a"))]
    assert not binary, binary
    large = [f for f in files if (root / f).is_file() and (root / f).stat().st_size > 2**20
             and not f.startswith("benchmarks/results/")]
    assert not large, large


def test_saved_files_get_the_umask_permissions(tmp_path):
    """Files pyhappy writes (atomically, through a temporary file) get 0666 less the umask, as open()
    would give them, not mkstemp's 0600."""
    from pyhappy.sparse import atomic_write

    old = os.umask(0o027)
    try:
        p = atomic_write(tmp_path / "f.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (os.stat(p).st_mode & 0o777) == 0o640


def _import_graph():
    """pyhappy's own imports, from the sources: {module: {(imported module, lineno, at module level)}}.
    ``from pkg import name`` counts as an import of pkg.name when that is a module, else of pkg; an
    import of pkg.sub.mod also imports its packages pkg.sub (the root package, which every module
    implies, is left out)."""
    import ast

    pkg = Path(ROOT, "pyhappy")
    mods = {}
    for p in pkg.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    graph = {}
    for mod, (path, is_pkg) in mods.items():
        edges = graph.setdefault(mod, set())

        def add(target, node, top):
            if target.split(".")[0] != "pyhappy":
                return
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                t = ".".join(parts[:i])
                if t != mod and not mod.startswith(t + "."):
                    edges.add((t, node.lineno, top))

        def visit(node, top):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import):
                    for a in child.names:
                        add(a.name, child, top)
                elif isinstance(child, ast.ImportFrom):
                    base = mod.split(".")[: None if is_pkg else -1]
                    if child.level:
                        base = base[: len(base) - (child.level - 1)]
                        target = ".".join(base + ([child.module] if child.module else []))
                    else:
                        target = child.module
                    for a in child.names:
                        add(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target, child, top)
                visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text()), True)
    return graph


def _cycle(graph):
    """One import cycle of ``graph`` ({module: {imported module}}) as a list of modules, or None."""
    state, stack = {}, []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = dfs(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


# Function-level imports that go up the layers on purpose: pyhappy.tune(model) walks a model's
# pyhappy layers, while the measured dispatch it belongs to sits below the ops.
_UPWARD_IMPORTS = {("pyhappy._tune", "pyhappy.nn")}


def test_import_graph_has_no_cycles_and_the_reference_is_a_leaf():
    """Layering: no module-level import cycle; no function-level import closing a cycle either (a
    lazy import that only dodges a circle hides one: shared helpers belong in a lower module), save
    the listed deliberate ones; and pyhappy.reference, the oracle every backend is tested against,
    imports nothing from pyhappy.ops."""
    graph = _import_graph()
    top = {m: {t for t, _, at_top in es if at_top} for m, es in graph.items()}
    cycle = _cycle(top)
    assert cycle is None, f"module-level import cycle: {' -> '.join(cycle)}"
    every = {m: {t for t, _, _ in es if (m, t) not in _UPWARD_IMPORTS} for m, es in graph.items()}
    cycle = _cycle(every)
    assert cycle is None, f"import cycle through function-level imports: {' -> '.join(cycle)}"
    ops = sorted(f"{t} (line {ln})" for t, ln, _ in graph["pyhappy.reference"] if t.startswith("pyhappy.ops"))
    assert not ops, f"pyhappy/reference.py imports {ops}"


def test_finetune_example_ends_with_a_table_of_families(tmp_path, capsys):
    from pyhappy.examples import finetune

    finetune.main(["--family", "lora", "--family", "sparse", "--steps", "2", "--batch", "2", "--seq", "16",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    table = out[out.index("family  run"):].splitlines()
    assert all(len(line) <= 120 for line in table), table
    assert "tokens/s" in table[0] and "peak RSS MiB" in table[0]
    rows = [line.split() for line in table[2:]]
    assert [r[0] for r in rows if r[0] in finetune.FAMILIES] == ["lora", "sparse"]
    assert len(rows) == 4  # each family: pyhappy, then its comparison run
    assert re.search(r"lora +pyhappy +\d+\.\d{3} -> \d+\.\d{3} .*\d\.\d\d× the time of (peft|unfused)$", table[2])
    assert re.search(r"^ +(peft|unfused) +\d+\.\d{3} -> ", table[3])
