"""Which backend serves each op on each device, and the overrides tests and benchmarks use.

Backends: ``reference`` (pure PyTorch, pyhappy/reference.py; every device), ``cpp`` (C++ kernels
in pyhappy._C; CPU), ``triton`` (triton_kernels/; CUDA, or CPU tensors under TRITON_INTERPRET=1),
``cuda`` (CUDA C++ kernels in a CUDA build of pyhappy._C; only ops that have one, see each op).

Defaults: CPU -> cpp, CUDA -> triton (an op may pick its CUDA C++ kernel by a size rule, e.g.
quant_linear's decode kernel); a backend that is not available falls back to reference.
Overrides, strongest first:
  * ``with pyhappy.backends.force("triton"):``  (this thread, every op)
  * ``PYHAPPY_BACKEND_<OP>=...`` e.g. PYHAPPY_BACKEND_LORA_LINEAR=reference (one op)
  * ``PYHAPPY_BACKEND=...`` (every op)
A forced backend that cannot serve the input raises an error saying why (never a silent switch).
The choice is made when the op runs, or once at trace time under torch.compile.

How an op declares its backends: one table per pass, a plain dict from backend name to a function
taking the pass's arguments, next to the functions in the op's module (pyhappy/ops/<op>.py)::

    def _cpp_forward(x2, weight, ...):        # torch.ops.pyhappy.<op>_cpu, measured dispatch
        ...
    def _triton_forward(x2, weight, ...):     # launches through torch.library.wrap_triton
        return backends.triton_module(OP).<op>_forward(x2, weight, ..., wrap=torch.library.wrap_triton)
    def _reference_forward(x2, weight, ...):  # the oracle, pyhappy/reference.py
        return reference.<op>(x2, weight, ...)

    FORWARD = {"cpp": _cpp_forward, "triton": _triton_forward, "reference": _reference_forward}
    BACKWARD = {...}                           # likewise, when the op has an autograd formula

and the op's body runs ``backends.run(OP, FORWARD, x.device, x.dtype, *args)``, or
``FORWARD[backend](*args)`` where it has picked ``backend`` already (an op whose C++ kernel serves
some dtypes only picks with ``pyhappy.ops._checks.select_backend``; an op that runs another op's pass
on its own choice, as dora_linear runs lora_linear's, indexes that op's table). Every name in
BACKENDS that ``select`` can return for the op needs an entry: "reference" always, "cpp" and
"triton" (an entry may serve a backend with torch ops where no kernel exists), "cuda" only for the
ops of CUDA_KERNELS. A table lookup and a call are the whole dispatch: these ops run per layer per
step, so no registry or wrapper layer sits between the op and its kernel.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading

import torch

from . import _ext

BACKENDS = ("reference", "cpp", "triton", "cuda")
# Ops with a CUDA C++ kernel, and the torch.ops.pyhappy op that is it (the others run Triton on CUDA).
CUDA_KERNELS = {"quant_linear": "quant_decode"}
class Overrides(threading.local):
    """Per-thread overrides (``forced``), None by default: a class attribute, so reading it needs no
    getattr fallback (this runs on every op call)."""

    forced = None
    result = None


_local = Overrides()


@contextlib.contextmanager
def thread_override(local: threading.local, value):
    """Set ``local.forced`` to ``value`` for this thread inside the block, then restore it."""
    prev = getattr(local, "forced", None)
    local.forced = value
    try:
        yield
    finally:
        local.forced = prev


def force(backend: str | None):
    """Force ``backend`` for every op run in this thread inside the block (None: no override)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return thread_override(_local, backend)


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype | None = None):
    """None when ``backend`` can serve an op on ``device``/``dtype``, else a sentence saying why not."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend serves CPU tensors only, got {device.type} tensors"
        if not _ext.available():
            return _ext.problem()
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpreting():
            return "the triton backend runs CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend serves CUDA tensors, got {device.type}"
        if dtype == torch.float64:
            return "the triton backend does not serve float64 (use the cpp or reference backend)"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend serves CUDA tensors only, got {device.type} tensors"
        if not _ext.available():
            return _ext.problem()
        if not (_ext.build_info() or {}).get("with_cuda"):
            return ("pyhappy._C was built without CUDA kernels (rebuild on a machine with nvcc and a CUDA build "
                    "of torch: pip install --no-build-isolation -e .)")
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            return f"the CUDA kernels take float16 or bfloat16 inputs, got {dtype}"
        return _cuda_arch_reason(device)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _cuda_arch_reason(device: torch.device):
    """None when the built CUDA kernels can run on ``device`` (sm_80 or newer, and an arch of the build
    or PTX that the driver JIT-compiles to it), else why not. Only called for CUDA tensors, so CUDA
    is already initialised."""
    major, minor = torch.cuda.get_device_capability(device)
    return _arch_reason(major, minor, (_ext.build_info() or {}).get("cuda_arch_list") or "8.0;9.0+PTX")


@functools.lru_cache(maxsize=None)
def _arch_reason(major: int, minor: int, archs: str):
    """_cuda_arch_reason for one capability and arch list (parsed once: the decode path asks per call)."""
    if (major, minor) < (8, 0):
        return f"the CUDA kernels need compute capability 8.0 or newer, this GPU is {major}.{minor}"
    built = []
    for a in archs.replace(",", ";").replace(" ", ";").split(";"):
        a = a.strip()
        if a:
            num = a.split("+")[0].rstrip("af")
            try:
                built.append((tuple(int(p) for p in num.split(".")), "+PTX" in a, a.split("+")[0][-1:] in "af"))
            except ValueError:
                continue
    if not built:  # named archs ("Ampere" ...) that this check does not parse: let the driver decide
        return None
    ok = any(cap == (major, minor) or (ptx and not specific and cap <= (major, minor)) or
             (not ptx and not specific and cap[0] == major and cap[1] <= minor) for cap, ptx, specific in built)
    if not ok:
        return (f"pyhappy._C's CUDA kernels were built for {archs}, which cannot run on compute capability "
                f"{major}.{minor} (rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor})")
    return None


# os.environ's own dict on POSIX (bytes keys; os.environ[...] = and del update it): a lookup there
# is ~30x cheaper than os.environ.get of a missing name (which raises and catches KeyError), and
# requested() runs twice per op call.
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENV_DATA, dict):
    _ENV_DATA = None


@functools.lru_cache(maxsize=None)
def _env_keys(op: str) -> tuple:
    names = (f"PYHAPPY_BACKEND_{op.upper()}", "PYHAPPY_BACKEND")
    return names if _ENV_DATA is None else tuple(os.fsencode(n) for n in names)


_ENV_NAMES: dict = {}  # name -> the key of _ENV_DATA (a plain dict: torch.compile traces it without warnings)


def getenv(name: str):
    """os.environ.get(name), cheaply (the settings are read on every op call)."""
    key = _ENV_NAMES.get(name)
    if key is None:
        key = _ENV_NAMES[name] = env_key(name)
    return _getenv(key)


def env_key(name: str):
    """The key of ``name`` in _ENV_DATA (bytes), or in os.environ where that is not available: its
    value is ``_ENV_DATA.get(key)`` (undecoded) or ``os.environ.get(key)``."""
    return name if _ENV_DATA is None else os.fsencode(name)


def _getenv(key):
    if _ENV_DATA is None:
        return os.environ.get(key)
    v = _ENV_DATA.get(key)
    return None if v is None else os.fsdecode(v)


def requested(op: str):
    """The override in force for ``op`` (or None)."""
    forced = _local.forced
    if forced is not None:
        return forced
    k_op, k_all = _env_keys(op)
    if _ENV_DATA is not None and k_op not in _ENV_DATA and k_all not in _ENV_DATA:
        return None  # the common case, without decoding anything
    env = _getenv(k_op) or _getenv(k_all)
    if env:
        if env not in BACKENDS:
            raise ValueError(f"PYHAPPY_BACKEND(_{op.upper()}) must be one of {BACKENDS}, got {env!r}")
        return env
    return None


def default(device: torch.device, dtype: torch.dtype | None = None) -> str:
    preferred = {"cpu": "cpp", "cuda": "triton"}.get(device.type, "reference")
    return preferred if unavailable_reason(preferred, device, dtype) is None else "reference"


def select(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` for tensors on ``device``; raises if a forced one cannot."""
    want = requested(op)
    if want is None:
        return default(device, dtype)
    why = unavailable_reason(want, device, dtype)
    if why is None and want == "cuda" and not hasattr(torch.ops.pyhappy, CUDA_KERNELS.get(op, "-")):
        why = (f"{op} has no CUDA C++ kernel" if op not in CUDA_KERNELS else
               f"the loaded pyhappy._C lacks {CUDA_KERNELS[op]} (rebuild: pip install --no-build-isolation -e .)")
        why += "; its CUDA backend is 'triton'"
    if why is not None:
        raise RuntimeError(f"pyhappy::{op}: backend {want!r} was forced but cannot serve this input: {why}")
    return want


def run(op: str, table: dict, device: torch.device, dtype: torch.dtype | None, *args):
    """``table[select(op, device, dtype)](*args)``: the op's pass on the backend that serves it."""
    return table[select(op, device, dtype)](*args)


_TRITON_MODULES: dict = {}


def triton_module(name: str):
    """The module pyhappy.triton_kernels.<name>, imported on first use (importing it imports Triton,
    which only the triton backend needs)."""
    mod = _TRITON_MODULES.get(name)
    if mod is None:
        mod = _TRITON_MODULES[name] = importlib.import_module(f"pyhappy.triton_kernels.{name}")
    return mod


# ---- public setters for the run-time choices (also reachable as pyhappy.set_*) ----------------------

# Every op family, by the name its backend is selected with (set_backend, PYHAPPY_BACKEND_<OP>).
OPS = ("lora_linear", "lora_linear_multi", "quant_linear", "sparse_delta_linear", "tt_linear", "dora_linear",
       "vera_linear", "pvera_linear", "moe_lora_linear")


def set_backend(backend: str | None, op: str | None = None) -> None:
    """Force ``backend`` ("cpp", "triton", "cuda", "reference") for every op, or for ``op`` alone, in
    this process (the PYHAPPY_BACKEND / PYHAPPY_BACKEND_<OP> setting); None removes the override.
    ``force()`` does the same for one block of one thread."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"set_backend: backend must be one of {BACKENDS} or None, got {backend!r}")
    if op is not None and op not in OPS:
        raise ValueError(f"set_backend: op must be one of {OPS} or None (every op), got {op!r}")
    name = "PYHAPPY_BACKEND" if op is None else f"PYHAPPY_BACKEND_{op.upper()}"
    if backend is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = backend


def _extension(who: str):
    e = _ext.load()
    if e is None:
        raise RuntimeError(f"{who}: the C++ extension pyhappy._C is not built (pip install --no-build-isolation -e .)")
    return e


GEMM_ENGINES = ("auto", "aten", "onednn")
SIMD_LEVELS = ("portable", "avx2", "avxvnni", "avx512")


def set_gemm_engine(engine: str) -> None:
    """The engine of the C++ CPU ops' matrix products, for the process: "auto" (the default:
    pyhappy's streaming kernels for decode-sized products, oneDNN for other fp32 products where the
    CPU has AVX-512F, else ATen/MKL; with PYHAPPY_TUNE=off the ops run their products on ATen
    instead), "aten" (every product as torch runs it) or "onednn" (PYHAPPY_FP32_GEMM at start-up).
    "aten" and "onednn" hold in every tuning mode."""
    if engine not in GEMM_ENGINES:
        raise ValueError(f"set_gemm_engine: engine must be one of {GEMM_ENGINES}, got {engine!r}")
    _extension("set_gemm_engine").set_fp32_gemm(engine)


def set_simd_level(level: str | None) -> None:
    """Cap the C++ CPU kernels' instruction set at ``level`` ("portable", "avx2", "avxvnni",
    "avx512"); None removes the cap (PYHAPPY_CPU_SIMD at start-up)."""
    if level is not None and level not in SIMD_LEVELS:
        raise ValueError(f"set_simd_level: level must be one of {SIMD_LEVELS} or None, got {level!r}")
    e = _extension("set_simd_level")
    if level is None:
        e.set_simd_enabled(True)
    else:
        e.set_simd_level(level)


def set_tuning(mode: str) -> None:
    """The measured CPU dispatch's mode in this process: "on", "cache" or "off" (PYHAPPY_TUNE)."""
    modes = ("on", "cache", "off")
    if mode not in modes:
        raise ValueError(f"set_tuning: mode must be one of {modes}, got {mode!r}")
    os.environ["PYHAPPY_TUNE"] = mode
