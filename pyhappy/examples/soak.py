"""Training soak: a tiny model per adapter family for many steps, watching resident memory and loss.

    python -m pyhappy.examples.soak                       # every family, 1000 steps each
    python -m pyhappy.examples.soak --family qlora --steps 3000

A leak in a kernel, a cache that grows per call or a tensor kept alive by autograd shows as
resident memory (VmRSS) that keeps growing after warm-up; a numerical fault as a non-finite loss.
For each family this prints RSS after warm-up and at the end, the growth per 1000 steps, and the
loss at both ends. Exit status 1 when a loss is not finite or RSS grows past --max-growth-mib.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time

import torch

from .finetune import FAMILIES, adapt, batches, build_model, corpus, proc_status_mib, train_step


def rss_mib() -> float:
    return proc_status_mib("VmRSS")


def soak(family: str, steps: int, warmup: int, batch: int = 4, seq: int = 32, lr: float = 2e-3) -> dict:
    model, is_hf = build_model()
    model.train()
    adapt(model, family)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    data = batches(corpus(), batch, seq)
    losses, rss_warm, t0 = [], None, time.perf_counter()
    for i in range(1, steps + 1):
        losses.append(train_step(model, is_hf, next(data), opt))
        if not math.isfinite(losses[-1]):
            break
        if i == warmup:
            gc.collect()
            rss_warm = rss_mib()
    gc.collect()
    rss_end = rss_mib()
    n = len(losses)
    measured = max(1, n - warmup)
    growth = (rss_end - rss_warm) if rss_warm is not None else float("nan")
    return {"family": family, "steps": n, "warmup": warmup, "rss_warm_mib": rss_warm, "rss_end_mib": rss_end,
            "rss_growth_mib": growth, "growth_per_1000_steps_mib": growth * 1000 / measured,
            "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
            "finite": all(math.isfinite(v) for v in losses), "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", choices=FAMILIES, help="repeatable; default: all")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--max-growth-mib", type=float, default=16.0,
                    help="RSS growth after warm-up that fails the soak (default 16 MiB)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per family")
    a = ap.parse_args(argv)
    if a.warmup >= a.steps:
        ap.error("--warmup must be below --steps")
    ok = True
    for family in a.family or FAMILIES:
        r = soak(family, a.steps, a.warmup)
        good = r["finite"] and r["rss_growth_mib"] <= a.max_growth_mib
        ok &= good
        if a.json:
            print(json.dumps(r))
        else:
            print(f"{family}: {r['steps']} steps in {r['seconds']:.0f} s, loss {r['first_loss']:.3f} -> "
                  f"{r['last_loss']:.3f}{'' if r['finite'] else ' (NOT FINITE)'}; RSS {r['rss_warm_mib']:.1f} MiB "
                  f"after {r['warmup']} steps -> {r['rss_end_mib']:.1f} MiB "
                  f"({r['rss_growth_mib']:+.1f} MiB, {r['growth_per_1000_steps_mib']:+.1f} MiB / 1000 steps) "
                  f"{'ok' if good else 'FAIL'}")
        sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
