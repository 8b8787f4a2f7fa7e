"""Loads the compiled extension ``pyhappy._C`` and checks it was built for this torch.

Never raises: when the extension is missing or was built against another torch, ``load()``
returns None, ``problem()`` says why and what to do, and every op falls back to the reference
path (``python -m pyhappy.info`` shows it). Never initialises CUDA.
"""

from __future__ import annotations

import importlib
import warnings

import torch

_state: dict = {}

_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` in the pyhappy checkout"


def _torch_base_version(v: str) -> str:
    return v.split("+")[0]


def _load():
    try:
        info = importlib.import_module("pyhappy._build_info").BUILD_INFO
    except ImportError:
        info = None
    if info is not None and _torch_base_version(info["torch_version"]) != _torch_base_version(torch.__version__):
        return None, info, (
            f"pyhappy._C was built against torch {info['torch_version']} but torch {torch.__version__} is "
            f"installed; {_REBUILD}. Falling back to the reference (pure PyTorch) kernels."
        )
    try:
        mod = importlib.import_module("pyhappy._C")
    except ImportError as e:
        return None, info, (
            f"pyhappy._C could not be loaded ({e}); {_REBUILD}. "
            "Falling back to the reference (pure PyTorch) kernels."
        )
    built = mod.build_info()
    if (built["torch_version_major"], built["torch_version_minor"]) != tuple(
        int(p) for p in _torch_base_version(torch.__version__).split(".")[:2]
    ):
        return None, info, (
            f"pyhappy._C reports torch {built['torch_version_major']}.{built['torch_version_minor']} headers but "
            f"torch {torch.__version__} is installed; {_REBUILD}."
        )
    built.update(info or {})
    return mod, built, None


def load():
    """The extension module, or None when it is unavailable (see ``problem()``)."""
    if "mod" not in _state:
        mod, info, problem = _load()
        _state.update(mod=mod, info=info, problem=problem)
        if problem is not None:
            warnings.warn(problem, RuntimeWarning, stacklevel=2)
    return _state["mod"]


def available() -> bool:
    return load() is not None


def problem():
    load()
    return _state["problem"]


def build_info():
    load()
    return _state["info"]
