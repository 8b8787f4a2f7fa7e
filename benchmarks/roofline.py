"""Roofline of every pyhappy kernel on an H100 SXM, so the first GPU run can be judged at once.

For each kernel and a typical shape: the bytes it must move (inputs read once, outputs written once),
its FLOPs, and the time those take at the H100 SXM's HBM3 bandwidth (3.35 TB/s) and dense bf16
tensor-core peak (989 TFLOP/s); the larger of the two is the floor a kernel can approach. The
benchmark suite measures the machine's own bandwidth and GEMM rate in the same run and reports
each variant's "% of limit" against those; this table is the paper version of that column.

    python -m benchmarks.roofline          # prints the table in benchmarks/ROOFLINE.md
"""

from __future__ import annotations

HBM_BPS = 3.35e12
PEAK_FLOPS = 989e12  # bf16 dense, tensor cores
ELEM = 2  # bf16 / fp16 activations and adapters


def _packed_bytes(fmt: str, N: int, K: int, group_size: int) -> int:
    """Packed weight + per-group parameters as pyhappy stores them (pyhappy/quant/layout.py)."""
    n8 = -(-N // 8) * 8
    codes = n8 * K * (3 if fmt == "int3" else 4) // 8
    groups = n8 * (K // group_size)
    return codes + groups * (4 if fmt == "nf4" else 3)  # nf4: fp32 absmax; int: fp16 scale + uint8 zero


def rows():
    """(kernel, shape, bytes, flops) for the kernels the suite benchmarks."""
    out = []
    for fmt, gs in (("int4", 128), ("int3", 128), ("nf4", 64)):
        for M in (1, 16):
            for N in (4096, 11008):
                b = _packed_bytes(fmt, N, 4096, gs) + (M * 4096 + M * N) * ELEM
                out.append(("quant_decode (CUDA C++)", f"{fmt} g{gs} M={M} K=4096 N={N}", b, 2 * M * N * 4096))
    for M in (1, 16):
        r, N, K = 16, 4096, 4096
        b = _packed_bytes("int4", N, K, 128) + (M * K + M * N) * ELEM + r * (K + N) * ELEM + M * r * 4
        out.append(("quant_decode + LoRA r=16", f"int4 g128 M={M} K=N=4096", b, 2 * M * N * K + 2 * M * r * (K + N)))
        nnz = N * K // 100
        b = _packed_bytes("int4", N, K, 128) + (M * K + M * N) * ELEM + nnz * (ELEM + 4) + (N + 1) * 4
        out.append(("quant_decode + sparse 1%", f"int4 g128 M={M} K=N=4096", b, 2 * M * N * K + 2 * M * nnz))
    for M in (4096,):
        N, K, r = 4096, 4096, 16
        b = (M * K + N * K + r * (K + N) + M * N) * ELEM
        out.append(("lora_linear fwd (Triton)", f"M={M} K=N=4096 r=16", b, 2 * M * N * K + 2 * M * r * (K + N)))
        b = (2 * M * K + N * K + 2 * r * (K + N) + 2 * M * N) * ELEM
        out.append(("lora_linear fwd+bwd (Triton)", f"M={M} K=N=4096 r=16", b,
                    2 * 2 * M * N * K + 3 * 2 * M * r * (K + N)))
        b = _packed_bytes("nf4", N, K, 64) * 2 + (2 * M * K + 2 * r * (K + N) + 2 * M * N) * ELEM
        out.append(("quant_linear QLoRA fwd+bwd (Triton)", f"nf4 M={M} K=N=4096 r=16", b,
                    2 * 2 * M * N * K + 3 * 2 * M * r * (K + N)))
        nnz = N * K // 100
        b = (2 * M * K + N * K + 2 * M * N) * ELEM + nnz * (2 * ELEM + 3 * 4)
        out.append(("sparse_delta_linear fwd+bwd (Triton)", f"1% M={M} K=N=4096", b,
                    2 * 2 * M * N * K + 3 * 2 * M * nnz))
    return out


def table() -> str:
    lines = ["| kernel | shape | bytes moved | GFLOP | at 3.35 TB/s | at 989 TFLOP/s | bound |",
             "|---|---|---|---|---|---|---|"]
    for name, shape, b, f in rows():
        tm, tc = b / HBM_BPS, f / PEAK_FLOPS
        lines.append(f"| {name} | {shape} | {b / 2**20:.2f} MiB | {f / 1e9:.3f} | {tm * 1e6:.1f} us | "
                     f"{tc * 1e6:.1f} us | {'memory' if tm >= tc else 'compute'} |")
    return "\n".join(lines) + "\n"


def main():
    print(table(), end="")


if __name__ == "__main__":
    main()
