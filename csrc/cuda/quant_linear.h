// Launcher of the CUDA decode kernel of pyhappy::quant_linear (csrc/cuda/quant_linear.cu): plain
// C++, no torch, so the kernels compile with nvcc against any torch build (csrc/cuda/compile_check.sh)
// and only the thin binding (quant_linear_torch.cpp) needs a CUDA build of torch.
#pragma once

#include <cstdint>

namespace pyhappy {
namespace cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };  // kFloat: the CPU emulation only

// y [M, N] = x [M, K] · deq(W)ᵀ + bias + lora_v · lora_Bᵀ + sparse_scale · x · ΔWᵀ, M <= 16.
// Element type of x, y, bias, lora_B, values: dtype. Packed weight as in csrc/quant_linear_common.h.
// Optional terms: null pointers. lora_v [M, r] float32 (already scaled); ΔW as CSR (row_ptr [N+1],
// cols [nnz]) with values [nnz]. x and qdata must be 16-byte aligned, x and y contiguous.
struct QuantDecodeArgs {
  const void* x;
  void* y;
  int64_t M, N, K;
  const uint8_t* qdata;
  const void* scales;  // float32 (nf4) or float16 (int4 / int3), [N8, G, 8]
  const uint8_t* zeros;  // uint8 [N8, G, 8], null for nf4
  int fmt;               // 0 nf4, 1 int4, 2 int3
  int64_t group_size;
  const void* bias;
  const float* lora_v;
  const void* lora_B;
  int64_t r;
  const int32_t* row_ptr;
  const int32_t* cols;
  const void* values;
  float sparse_scale;
  DType dtype;
};

// Enqueues the kernel on `stream` (a cudaStream_t). Returns null, or a sentence naming the
// argument that the kernel cannot take; launch errors are left for cudaGetLastError.
const char* launch_quant_decode(const QuantDecodeArgs& a, void* stream);

}  // namespace cuda
}  // namespace pyhappy
