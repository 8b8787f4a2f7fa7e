"""``python -m pyhappy.info``: versions, what was built, and which backend serves each op where.

Does not initialise CUDA unless a CUDA device is actually present (it then only reads its name).
"""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import __version__, _ext, backends

OPS = backends.OPS  # every op family, by the name its backend is selected with


def report() -> dict:
    devices = [torch.device("cpu")]
    cuda = torch.cuda.is_available()
    if cuda:
        devices.append(torch.device("cuda"))
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    ext = _ext.load()
    serving = {}
    for op in OPS:
        for dev in devices:
            try:
                chosen = backends.select(op, dev)
            except RuntimeError as e:  # a forced backend that cannot serve this device
                chosen = f"error: {e}"
            avail = {b: backends.unavailable_reason(b, dev) or "available" for b in backends.BACKENDS}
            kernel = backends.CUDA_KERNELS.get(op)
            if kernel is None:
                avail["cuda"] = "no CUDA C++ kernel for this op (triton serves CUDA)"
            elif avail["cuda"] == "available" and not hasattr(torch.ops.pyhappy, kernel):
                avail["cuda"] = f"the loaded pyhappy._C lacks {kernel}"
            if chosen == "triton" and dev.type == "cuda" and avail["cuda"] == "available":
                chosen = "triton+cuda"  # quant_linear: the CUDA decode kernel for 1 <= M <= 2 (fp16/bf16)
            serving[f"{op}@{dev.type}"] = {"backend": chosen, "backends": avail}
    return {
        "pyhappy": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": backends.triton_interpreting(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "extension": {
            "loaded": ext is not None,
            "problem": _ext.problem(),
            "build": _ext.build_info(),
            "cpu_simd": ext.simd_level() if ext is not None else None,
            "fp32_gemm": ext.fp32_gemm() if ext is not None else None,
        },
        "threads": torch.get_num_threads(),
        "ops": serving,
        "tuning": _tuning(),
    }


def _tuning() -> dict:
    """The measured-dispatch cache in use and, per op, how many keys it holds and what they picked."""
    from . import _tune

    try:
        mode = _tune.mode()
    except ValueError as e:
        return {"mode": f"error: {e}", "cache": _tune.cache_path(), "ops": {}}
    per_op: dict = {}
    for key, v in _tune.tuner().entries().items():
        picks = per_op.setdefault(key.split("|")[0], {})
        picks[v["choice"]] = picks.get(v["choice"], 0) + 1
    return {"mode": mode, "cache": _tune.cache_path(), "ops": per_op}


def main():
    r = report()
    print(f"pyhappy {r['pyhappy']}  python {r['python']}  torch {r['torch']} (cuda {r['torch_cuda']})  "
          f"triton {r['triton']}{' [interpreter]' if r['triton_interpret'] else ''}")
    print(f"cuda device: {r['cuda_device'] or 'none'}   threads: {r['threads']}")
    e = r["extension"]
    if e["loaded"]:
        print(f"pyhappy._C: loaded; built {e['build']}; CPU kernels: {e['cpu_simd']}; fp32 GEMMs: {e['fp32_gemm']}")
    else:
        print(f"pyhappy._C: NOT loaded: {e['problem']}")
    print(f"\n{'op@device':28s} {'serves':10s} backends")
    for key, v in r["ops"].items():
        others = "; ".join(f"{b}: {why}" for b, why in v["backends"].items())
        print(f"{key:28s} {v['backend']:10s} {others}")
    t = r["tuning"]
    print(f"\nmeasured CPU dispatch (PYHAPPY_TUNE): {t['mode']}; cache {t['cache']}")
    for op, picks in sorted(t["ops"].items()):
        print(f"  {op:26s} " + ", ".join(f"{n} keys -> {c}" for c, n in sorted(picks.items())))
    if not t["ops"]:
        print("  (no key measured yet; `python -m pyhappy.tune` lists them once there are)")


if __name__ == "__main__":
    main()
