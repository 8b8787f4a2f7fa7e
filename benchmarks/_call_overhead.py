"""Per-call cost of the layers around an op, eager fwd+bwd (``python -m benchmarks._call_overhead``).

Times one lora_linear training step (forward, then backward of a fixed gradient) three ways on the
same inputs, interleaved, medians of per-call times:
  registered  ``torch.ops.pyhappy.lora_linear``: the torch.library op and its autograd wrapper
  front       ``pyhappy.ops.lora_linear``: what users call (an autograd.Function over the same
              forward body and gradient formula, pyhappy/ops/_eager.py)
  unfused     ``x Wᵀ + s·(x Aᵀ) Bᵀ`` as plain torch ops (PEFT's formulation)
Run with ``PYHAPPY_TUNE=off`` to time the fused kernels (tuning on lets the front pick the unfused
formulation where it is faster). Arguments: M K N r rounds (default 4 64 64 8 2000).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main(argv=None):
    import pyhappy  # noqa: F401  (registers the ops)
    from pyhappy.ops import lora_linear

    M, K, N, r, rounds = [int(a) for a in (argv or sys.argv[1:])] or [4, 64, 64, 8, 2000]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    W = torch.randn(N, K, generator=g)
    A = torch.randn(r, K, generator=g, requires_grad=True)
    B = torch.randn(N, r, generator=g, requires_grad=True)
    dy = torch.ones(M, N)
    fns = {"registered": lambda: torch.ops.pyhappy.lora_linear(x, W, None, A, B, None, 0.5, 0.0, None)[0],
           "front": lambda: lora_linear(x, W, None, A, B, 0.5),
           "unfused": lambda: x @ W.t() + (x @ A.t()) @ B.t() * 0.5}
    for f in fns.values():
        for _ in range(20):
            f().backward(dy)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f().backward(dy)
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"{k:<11}{statistics.median(v) * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
