// Decode-sized matrix products (1 to kMaxRows rows of activations against a weight) for the C++ CPU
// ops. At these sizes a product is bound by reading the weight once from memory: these kernels
// stream each weight row once for all the rows of the activation, in the weight's own dtype
// (float32, bfloat16 or float16, widened to fp32 in registers), accumulate in fp32 and round once
// into the output, as torch's own CPU GEMM does. Which products they serve is in gemm.cpp
// (gemm::mm sends decode products here unless the fp32 engine is set to "aten").
#pragma once

#include <ATen/ATen.h>

namespace pyhappy {
namespace cpu {
namespace gemv {

constexpr int64_t kMaxRows = 4;

// Whether the kernels serve a [M, K] · b [K, N]: 1 <= M <= kMaxRows, a and b of one dtype among
// float32 / bfloat16 / float16, a with unit column stride, b with a unit stride on either side (b
// = Wᵀ of a row-major weight W [N, K], the forward's x·Wᵀ; or b = W [K, N] row-major, the
// backward's dy·W), and the CPU has AVX2+FMA.
bool serves(const at::Tensor& a, const at::Tensor& b);

// a · b as a new contiguous [M, N] tensor of a's dtype (serves(a, b) must hold).
at::Tensor mm(const at::Tensor& a, const at::Tensor& b);

}  // namespace gemv
}  // namespace cpu
}  // namespace pyhappy
