// C++ functions of registered CPU ops that pyhappy._C also binds directly (csrc/pyhappy.cpp, the
// *_eager functions): an eager inference call whose arguments Python has checked before runs them
// without the dispatcher (benchmarks/README.md, "Decode calls without the dispatcher"). Each is
// defined in its op family's file, which includes this header so that the two declarations
// cannot drift apart.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace pyhappy {
namespace cpu {

// pyhappy::lora_linear_cpu (csrc/cpu/lora_linear.cpp): (y, the adapter's hidden u).
std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_C,
                                                   double scaling, double dropout_p,
                                                   const std::optional<at::Tensor>& seed);

// A training call of pyhappy::lora_linear, dropout off (csrc/cpu/lora_linear.cpp): y [..., N], recorded
// for autograd as one C++ node; each pass runs as fwd_pass / bwd_pass says (lora_adapter.h: 0 the
// kernels, 1 the unfused products on ATen, 2 the kernels with their products on ATen).
at::Tensor lora_linear_step(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& lora_C, double scaling, int64_t fwd_pass,
                            int64_t bwd_pass);

// pyhappy::quant_linear_cpu (csrc/cpu/quant_linear.cpp): (y, the adapter's hidden u or an empty [M, 0]).
std::tuple<at::Tensor, at::Tensor> quant_linear_cpu(const at::Tensor& x_in, const at::Tensor& qdata,
                                                    const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                                    int64_t fmt, int64_t N, int64_t group_size,
                                                    const std::optional<at::Tensor>& bias,
                                                    const std::optional<at::Tensor>& lora_A,
                                                    const std::optional<at::Tensor>& lora_B,
                                                    const std::optional<at::Tensor>& lora_C, double scaling,
                                                    double dropout_p, const std::optional<at::Tensor>& seed,
                                                    bool int8_decode, bool int_dot);

// A training call of pyhappy::quant_linear, dropout off (csrc/cpu/quant_linear.cpp): y [..., N], recorded
// for autograd as one C++ node; each pass runs pyhappy's kernels, or the unfused formulation on ATen
// (the weight dequantized) where torch_fwd / torch_bwd is set.
at::Tensor quant_linear_step(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t N, int64_t group_size,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_A,
                             const std::optional<at::Tensor>& lora_B, const std::optional<at::Tensor>& lora_C,
                             double scaling, bool torch_fwd, bool torch_bwd);

}  // namespace cpu
}  // namespace pyhappy
