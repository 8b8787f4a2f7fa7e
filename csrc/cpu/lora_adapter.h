// The low-rank adapter's share of a fused linear, on top of any base product (dense GEMM in
// lora_linear.cpp, packed quantized weight in quant_linear.cpp). Defined in lora_linear.cpp.
#pragma once

#include <ATen/ATen.h>

#include "cpu/gemm.h"

#include <optional>
#include <tuple>

namespace pyhappy {
namespace cpu {

// y [M, N] holds the base product x Wᵀ; adds s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ + bias in one pass over y
// and returns u = dropout(x) Aᵀ [M, r] (what the backward reuses).
at::Tensor lora_adapter_forward(const at::Tensor& x, at::Tensor& y, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B,
                                const std::optional<at::Tensor>& lora_C, double scaling, double dropout_p,
                                const std::optional<at::Tensor>& seed);

// (grad_A, grad_B, grad_C or empty [0]); when grad_x is given (holding dy W) adds the adapter's
// dropout(du A) to it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_adapter_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_C, const at::Tensor& lora_hidden, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, at::Tensor* grad_x);

// u = dropout(x) Aᵀ [M, r]: on the skinny kernels where ``skinny`` and they serve x (fp32, unit column
// stride, from kSkinnyMinRows rows, AVX2), else the dropout tile by tile before the GEMM (no mask
// stored, dropout(x) not materialised) or one GEMM.
at::Tensor lora_hidden(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
                       const std::optional<at::Tensor>& seed, bool skinny);

// The unfused formulation's products on ATen, dropout off (pyhappy/ops/lora_linear.py, _torch_forward
// and _torch_backward: the same ATen calls, equal bit for bit): (y, u) of y = x Wᵀ + bias + s · (x Aᵀ
// Cᵀ) Bᵀ, and (grad_x, grad_A, grad_B, grad_C), each undefined where not asked for (grad_C also
// without a core). The C++ training nodes run them for a pass the tuner gave to the unfused products.
std::tuple<at::Tensor, at::Tensor> lora_products_forward(const at::Tensor& x, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                         const std::optional<at::Tensor>& lora_C, double scaling);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_products_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_C, const at::Tensor& u, double scaling,
    bool need_x, bool need_A, bool need_B, bool need_C);

// How a C++ training node runs one pass (the tuner's pick for it): kKernels, pyhappy's kernels
// ("cpp"); kProducts, the unfused products on ATen ("torch"); kKernelsOnAten, pyhappy's kernels with
// their products on ATen ("cpp_aten"). PassEngine puts this thread's products on ATen for the
// kernels of a kKernelsOnAten pass while it lives (gemm::EngineScope), as the Python candidate's
// fp32_gemm_scope("aten") does, where the Python dispatch offers that candidate for the pass's
// operand `a` (and `base`, the weight operand of a decode-sized product, or null).
constexpr int64_t kKernels = 0, kProducts = 1, kKernelsOnAten = 2;
class PassEngine {
 public:
  PassEngine(int64_t pass, const at::Tensor& a, const at::Tensor* base);

 private:
  std::optional<gemm::EngineScope> scope_;
};

// A C++ training node's output: y [M, N] in x's leading shape, [..., N], as a fresh tensor, not a
// view (an in-place op on the output must reach autograd, as with aten's linear).
at::Tensor node_output(const at::Tensor& y, const at::Tensor& x, int64_t N);

// A C++ training node's backward refuses to record a graph of its own (create_graph=True): its
// kernels have no autograd, so a gradient of the gradient would be silently wrong.
void check_first_order(const char* op);

// t = dropout(t) in place for a contiguous [M, K] tensor (the mask of row i, column j of t).
void lora_dropout_(at::Tensor& t, double dropout_p, const std::optional<at::Tensor>& seed);

}  // namespace cpu
}  // namespace pyhappy
