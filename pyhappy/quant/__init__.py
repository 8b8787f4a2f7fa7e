"""Quantized base weights: formats (NF4, INT4, INT3), quantizers (RTN, GPTQ/OPTQ), importers.

    qw = pyhappy.quantize(linear.weight, format="int4", group_size=128)   # -> QuantizedWeight
    qw.dequantize()                                                        # dense [N, K]

The packed layout all kernels read is in layout.py; nf4.py (bitsandbytes NF4) and intq.py
(INT4/INT3, GPTQ checkpoints) convert between it and the outside world; gptq.py is OPTQ.
"""

from . import gptq, intq, nf4  # noqa: F401  (each registers its converters with weight.py)
from .weight import FORMATS, QuantizedWeight, quantize

__all__ = ["FORMATS", "QuantizedWeight", "quantize"]
