// The thin torch binding of the CUDA decode kernel (csrc/cuda/quant_linear.cu): the CUDA
// implementation of pyhappy::quant_decode (schema and CPU emulation: csrc/cpu/quant_linear_lanes.cpp).
// Compiled only in CUDA builds of the extension. Launches on the current stream; no host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/quant_linear.h"
#include "quant_decode_args.h"

namespace pyhappy {
namespace cuda {

at::Tensor quant_decode_cuda(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scales,
                             const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t N, int64_t group_size,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_v,
                             const std::optional<at::Tensor>& lora_B, const std::optional<at::Tensor>& sparse_layout,
                             const std::optional<at::Tensor>& sparse_values, double sparse_scale) {
  const char* op = "quant_decode";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor here");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": the CUDA decode kernel takes float16 or bfloat16 x, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  // The kernel's 16-byte vector loads need aligned rows: a view at an odd storage offset is copied.
  const auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t : t.clone();
  };
  const at::Tensor xa = aligned(x.contiguous()), qa = aligned(qdata);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  const QuantDecodeArgs a = make_decode_args(op, xa, y, qa, scales, zeros, fmt, N, group_size, bias, lora_v, lora_B,
                                             sparse_layout, sparse_values, sparse_scale);
  const char* why = launch_quant_decode(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(why == nullptr, op, ": ", why);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace cuda
}  // namespace pyhappy

TORCH_LIBRARY_IMPL(pyhappy, CUDA, m) { m.impl("quant_decode", &pyhappy::cuda::quant_decode_cuda); }
