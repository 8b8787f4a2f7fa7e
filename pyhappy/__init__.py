"""pyhappy: fused kernels for parameter-efficient fine-tuning in PyTorch.

Importing pyhappy never initialises CUDA and never fails because a compiled piece is missing:
ops fall back to the reference path and ``python -m pyhappy.info`` says what is served by what.
"""

__version__ = "0.1.0"

from . import _import_quiet  # noqa: E402  (torch's "Triton not available" log, filtered during this import)

_import_quiet.install()
from . import backends, ops, quant, reference, sparse  # noqa: E402  (registers torch.ops.pyhappy.*)
from . import nn  # noqa: E402
from .inject import inject  # noqa: E402
from .nn import adapter_batch  # noqa: E402
from .interop import (add_adapter, delete_adapter, from_peft, load_peft_adapter, load_quantized_state_dict, merge, save_peft_adapter,  # noqa: E402
                      set_adapter, unload, unmerge)
from .quant import QuantizedWeight, quantize  # noqa: E402
from ._tune import tune  # noqa: E402
from .backends import set_backend, set_gemm_engine, set_simd_level, set_tuning  # noqa: E402

_import_quiet.remove()


def __getattr__(name):
    # pyhappy.compiler (the torch.compile backend) is imported on first use, not with pyhappy.
    if name == "compiler":
        import importlib

        return importlib.import_module(".compiler", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_compile_backend() -> None:
    """Makes ``torch.compile(model, backend="pyhappy")`` find pyhappy.compiler.backend.

    Dynamo's registry accepts an entry-point-like object whose ``load()`` returns the backend, so
    this adds the name without importing pyhappy.compiler. Only done when Dynamo is already imported
    (registering must not import it); otherwise the installed ``torch_dynamo_backends`` entry point
    (pyproject.toml) provides the name."""
    import sys

    registry = sys.modules.get("torch._dynamo.backends.registry")
    if registry is None or "pyhappy" in getattr(registry, "_BACKENDS", {"pyhappy": None}):
        return

    class _Lazy:
        name, value, group = "pyhappy", "pyhappy.compiler:backend", "torch_dynamo_backends"

        @staticmethod
        def load():
            from .compiler import backend

            return backend

    registry._BACKENDS["pyhappy"] = _Lazy()


_register_compile_backend()

__all__ = ["QuantizedWeight", "adapter_batch", "add_adapter", "delete_adapter", "set_adapter", "backends", "from_peft", "inject", "load_peft_adapter", "load_quantized_state_dict", "merge", "save_peft_adapter",
           "unload", "unmerge", "nn", "ops", "quant", "quantize", "reference", "sparse", "tune", "compiler", "__version__",
           "set_backend", "set_gemm_engine", "set_simd_level", "set_tuning"]
