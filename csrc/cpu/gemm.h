// Matrix products for the C++ CPU ops, in place of at::mm / at::addmm: on a CPU without native bf16
// / fp16 dot products (no AVX512-BF16 / AMX, no AVX512-FP16), torch's reduced-precision GEMM falls
// back to slow generic code, a small fraction of its fp32 GEMM's throughput and slowest for dy·W
// (figures: benchmarks/README.md, "Design measurements", "bf16/fp16 products through fp32 blocks").
// There these functions compute bf16/fp16 products in fp32 blocks: each operand is converted block
// by block (a in row blocks of up to 16 MiB of fp32, b in column blocks of 4 MiB: no full-size fp32
// copy of a weight), multiplied by the fp32 GEMM and rounded once into the output, the rounding
// torch's own bf16 GEMM does (fp32 accumulation, one rounding per output). Everything else, and
// every product on a CPU with native reduced-precision dot products, goes straight to ATen.
//
// Decode-sized products against a column-major weight (x·Wᵀ with few rows) stay on ATen: they are
// bound by reading the weight, and converting it would triple the bytes moved (see gemm.cpp).
#pragma once

#include <ATen/ATen.h>

#include <functional>

namespace pyhappy {
namespace cpu {
namespace gemm {

// Whether the product a [M, K] · b [K, N] runs in fp32 blocks here.
bool via_fp32(const at::Tensor& a, const at::Tensor& b);
// The same for a product of that shape and dtype that is not yet materialised, b [K, N] column-major
// (unit row stride, a transposed weight) or not.
bool via_fp32(at::ScalarType t, int64_t M, int64_t K, int64_t N, bool b_col_major);

// a · b (a [M, K], b [K, N], any strides, one dtype) -> a new contiguous [M, N] in that dtype.
at::Tensor mm(const at::Tensor& a, const at::Tensor& b);
// bias [N] + a · b.
at::Tensor addmm(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b);
// out = a · b into an existing [M, N] view (out may be strided; it is not an input).
void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// Whether mm_out(out, a, b), for a contiguous a [M, b.size(0)] of b's dtype, computes the product
// into a tensor of its own and then copies it into out (oneDNN): a may then share out's memory.
bool mm_out_copies(const at::Tensor& b, int64_t M);
// out += alpha · a · b in place.
void addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha = 1.0);

// out = a · b computed in column blocks of out, calling after(n0, nc) once each block
// out[:, n0 : n0 + nc] is final (one call for the whole width when the product is not blocked):
// an epilogue run there finds the block still in cache. An undefined out is allocated here, or on
// oneDNN becomes the product's own result tensor (a defined one there is a copy more: [M, N] read
// and written once); epilogues that capture out by reference see it.
using BlockFn = std::function<void(int64_t n0, int64_t nc)>;
void mm_out_blocks(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const BlockFn& after);

// The column-block width of out for an fp32 product a [M, K] · b [K, N] (0: one ATen call). MKL
// runs these shapes markedly slower as one call than in column blocks of b that fit in L3 with
// a still resident (see gemm.cpp for the measurements and the rule).
int64_t column_block(at::ScalarType t, int64_t M, int64_t K, int64_t N, bool b_col_major);

// out = a · b where a, b are already in the compute dtype (fp32 operands converted by the caller,
// e.g. dequantized slabs) and out may be in another: at::mm_out when the dtypes agree, else the
// product rounded once into out.
void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// The engine of fp32 products: "auto" (oneDNN where the CPU has AVX-512F, else ATen/MKL, and
// pyhappy's streaming kernels for decode-sized products; the default, PYHAPPY_FP32_GEMM overrides it
// at start-up), "aten" or "onednn" (see gemm.cpp). set_fp32_engine sets it for the process;
// EngineScope overrides it for one thread. fp32_engine() names the engine this thread's fp32
// products use: "onednn" or "aten"; engine_setting() the setting in force on this thread ("auto",
// "aten" or "onednn": its override, else the process's).
void set_fp32_engine(const char* engine);
const char* fp32_engine();
const char* engine_setting();

// An engine's value for EngineScope ("auto", "aten" or "onednn"); std::invalid_argument naming
// `who` otherwise.
int engine_value(const char* name, const char* who);

// The setting in force on this thread, as a value for EngineScope.
int current_engine();

// This thread's products use `engine` while the scope lives (RAII; nested scopes restore in turn),
// whatever the process-wide setting is and without changing what other threads use: the measured
// dispatch runs a candidate on ATen in one, and PYHAPPY_TUNE=off runs the ops' products on torch's
// engine in one. at::parallel_for's workers do not inherit it: cpu::parallel_for (parallel.h)
// carries the calling thread's setting into them.
class EngineScope {
 public:
  explicit EngineScope(int engine);
  ~EngineScope();
  EngineScope(const EngineScope&) = delete;
  EngineScope& operator=(const EngineScope&) = delete;

 private:
  int prev_;
};

// The mode: "auto" (fp32 blocks where the CPU has no native dot products for the dtype, the
// default; PYHAPPY_LOWP_GEMM overrides it at start-up), "fp32" (always, for the reduced-precision
// dtypes and every shape: tests run this path on any CPU) or "native" (never).
void set_mode(const char* mode);
const char* mode();

}  // namespace gemm
}  // namespace cpu
}  // namespace pyhappy
