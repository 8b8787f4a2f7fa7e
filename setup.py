"""Build pyhappy._C from csrc/ with torch's cpp_extension.

C++ CPU kernels are always built. CUDA sources (csrc/cuda/*.cu) are added only when the CUDA
toolkit (nvcc and its headers) and a CUDA build of torch are both present. Nothing here looks at the
GPU itself.

The extension is compiled against the torch it will run with, so the build needs that torch
importable: ``pip install --no-build-isolation .`` (or ``-e .``). With build isolation pip would build
in a throwaway environment, with a different torch or none; this script then stops at once with a
message saying so instead of compiling against the wrong torch.

The repository's ``triton_kernels/`` and ``benchmarks/`` folders install as ``pyhappy.triton_kernels``
and ``pyhappy.benchmarks`` (both names belong to other published packages at the top level).

Environment switches:
  PYHAPPY_CUDA=0|1           skip CUDA / require CUDA (default: build it when possible)
  TORCH_CUDA_ARCH_LIST       CUDA archs, e.g. "8.0;9.0a" (default here: "8.0;9.0+PTX")
  MAX_JOBS                   parallel compile jobs (torch's switch)
  PYHAPPY_DEBUG=1            -O0 -g, no -DNDEBUG
  PYHAPPY_SANITIZE=1         build with AddressSanitizer + UndefinedBehaviorSanitizer
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
_NO_ISOLATION = ("pyhappy builds against the torch it will run with: install torch first, then build "
                 "without build isolation: pip install --no-build-isolation .  (or -e . for a checkout)")


def _import_torch():
    """torch of this environment, or a one-paragraph exit naming --no-build-isolation."""
    try:
        import torch
    except ImportError as e:
        sys.exit(f"error: torch is not importable in the build environment ({e}).\n{_NO_ISOLATION}")
    # pip's isolated build environments live in a temporary pip-build-env-* folder: a torch found
    # there is not the one the extension will be loaded into.
    if "pip-build-env-" in (torch.__file__ or ""):
        sys.exit(f"error: the build environment has its own torch ({torch.__version__} in {os.path.dirname(torch.__file__)}),"
                 f" not the one pyhappy will run with.\n{_NO_ISOLATION}")
    return torch


torch = _import_torch()
from torch.utils import cpp_extension  # noqa: E402


def _cuda_headers() -> bool:
    home = cpp_extension.CUDA_HOME
    return home is not None and any(os.path.isfile(os.path.join(d, "cuda_runtime.h")) for d in
                                    (os.path.join(home, "include"), os.path.join(home, "targets", "x86_64-linux", "include"),
                                     os.path.join(home, "targets", "sbsa-linux", "include")))


def _want_cuda() -> bool:
    """PYHAPPY_CUDA=1 builds the CUDA sources (an error if torch is not a CUDA build or there is no
    toolkit); =0 skips them; unset builds them only when nvcc, the CUDA headers and a CUDA build of
    torch are all present (an nvcc alone, without headers, or a CPU torch would only fail later)."""
    flag = os.environ.get("PYHAPPY_CUDA", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
            sys.exit(
                "error: PYHAPPY_CUDA=1 but CUDA cannot be built here: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}. "
                "Install a CUDA build of torch and the CUDA toolkit, or unset PYHAPPY_CUDA."
            )
        return True
    missing = [what for what, ok in (("a CUDA build of torch", torch.version.cuda is not None),
                                     ("the CUDA toolkit (nvcc)", cpp_extension.CUDA_HOME is not None),
                                     ("the CUDA headers (cuda_runtime.h)", _cuda_headers())) if not ok]
    if missing and cpp_extension.CUDA_HOME is not None:
        print(f"pyhappy: building the C++ CPU kernels only (no {', no '.join(missing)}; PYHAPPY_CUDA=1 forces CUDA)",
              file=sys.stderr)
    return not missing


def _write_build_info(with_cuda: bool) -> None:
    # Recorded at build time and checked at load time (pyhappy/_ext.py).
    info = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "with_cuda": with_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "sanitize": os.environ.get("PYHAPPY_SANITIZE") == "1",
    }
    with open(os.path.join(ROOT, "pyhappy", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time; do not edit.\n")
        f.write(f"BUILD_INFO = {info!r}\n")


def _extensions():
    with_cuda = _want_cuda()
    if with_cuda:
        # sm_80 and sm_90 machine code, plus sm_90 PTX that newer GPUs JIT-compile (nothing here needs
        # the arch-specific sm_90a features; PTX for 9.0a would JIT nowhere else).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    _write_build_info(with_cuda)
    debug = os.environ.get("PYHAPPY_DEBUG") == "1"
    sanitize = os.environ.get("PYHAPPY_SANITIZE") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    cxx += ["-std=c++20", "-Wall", "-Wno-unused-function"]
    ldflags = []
    if torch.__config__.parallel_info().find("ATen parallel backend: OpenMP") >= 0:
        # at::parallel_for is a header template: without -fopenmp it silently runs on one thread.
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    if sanitize:
        cxx += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        ldflags += ["-fsanitize=address,undefined"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    kwargs = dict(
        name="pyhappy._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=ldflags,
    )
    if with_cuda:
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        kwargs["sources"] = sources + cu
        # C++17 for nvcc: CUDA 11.x (torch's cu118 builds) rejects -std=c++20; the .cu sources need no more.
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DPYHAPPY_WITH_CUDA"]
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DPYHAPPY_WITH_CUDA"], "nvcc": nvcc}
        return [cpp_extension.CUDAExtension(**kwargs)]
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return [cpp_extension.CppExtension(**kwargs)]


setup(
    # The repository's top-level folders triton_kernels/ and benchmarks/ install inside the package.
    packages=find_packages(include=["pyhappy", "pyhappy.*"]) + ["pyhappy.triton_kernels", "pyhappy.benchmarks"],
    package_dir={"pyhappy": "pyhappy", "pyhappy.triton_kernels": "triton_kernels", "pyhappy.benchmarks": "benchmarks"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
