// pyhappy::quant_decode's tensors -> the kernels' QuantDecodeArgs, with every check that keeps the
// kernels in bounds. Shared by the CUDA binding (csrc/cuda/quant_linear_torch.cpp) and the CPU
// lane-by-lane emulation (csrc/cpu/quant_linear_lanes.cpp), so both reject the same inputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "cuda/quant_linear.h"
#include "quant_linear_common.h"

namespace pyhappy {

inline void check_same_device(const char* op, const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

inline cuda::QuantDecodeArgs make_decode_args(const char* op, const at::Tensor& x, const at::Tensor& y,
                                              const at::Tensor& qdata, const at::Tensor& scales,
                                              const std::optional<at::Tensor>& zeros, int64_t fmt, int64_t N,
                                              int64_t group_size, const std::optional<at::Tensor>& bias,
                                              const std::optional<at::Tensor>& lora_v,
                                              const std::optional<at::Tensor>& lora_B,
                                              const std::optional<at::Tensor>& sparse_layout,
                                              const std::optional<at::Tensor>& sparse_values, double sparse_scale) {
  using namespace quant;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), op, ": x must be a contiguous 2-D [M, K] tensor, got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op,
              ": x must be float16, bfloat16 or float32, got ", dt);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= kDecodeMaxM, op, ": x must have 1 to ", kDecodeMaxM, " rows, got M = ", M);
  TORCH_CHECK(fmt >= kFmtNF4 && fmt <= kFmtInt3, op, ": fmt must be 0 (nf4), 1 (int4) or 2 (int3), got ", fmt);
  TORCH_CHECK(K >= kBlockK && K % kBlockK == 0, op, ": K must be a positive multiple of 32, got ", K);
  TORCH_CHECK(group_size >= kBlockK && group_size % kBlockK == 0 && K % group_size == 0, op,
              ": group_size must be a multiple of 32 dividing K = ", K, ", got ", group_size);
  TORCH_CHECK(N >= 1, op, ": N must be >= 1, got ", N);
  const int64_t N8 = tile_count(N), KB = K / kBlockK, G = K / group_size;
  TORCH_CHECK(qdata.scalar_type() == at::kByte && qdata.is_contiguous() &&
                  qdata.sizes() == at::IntArrayRef({N8 / 2, KB, block_stride(static_cast<int>(fmt))}),
              op, ": qdata must be a contiguous uint8 [", N8 / 2, ", ", KB, ", ", block_stride(static_cast<int>(fmt)),
              "] tensor, got ", qdata.scalar_type(), " ", qdata.sizes());
  const auto sdt = fmt == kFmtNF4 ? at::kFloat : at::kHalf;
  TORCH_CHECK(scales.scalar_type() == sdt && scales.is_contiguous() && scales.sizes() == at::IntArrayRef({N8, G, kTileN}),
              op, ": scales must be a contiguous ", sdt, " [", N8, ", ", G, ", 8] tensor, got ", scales.scalar_type(),
              " ", scales.sizes());
  check_same_device(op, x, qdata, "qdata");
  check_same_device(op, x, scales, "scales");
  const uint8_t* zp = nullptr;
  if (fmt == kFmtNF4) {
    TORCH_CHECK(!zeros.has_value(), op, ": zeros must be None for nf4 (fmt 0)");
  } else {
    TORCH_CHECK(zeros.has_value() && zeros->scalar_type() == at::kByte && zeros->is_contiguous() &&
                    zeros->sizes() == scales.sizes(),
                op, ": zeros must be a contiguous uint8 tensor shaped like scales for int formats");
    check_same_device(op, x, *zeros, "zeros");
    zp = zeros->const_data_ptr<uint8_t>();
  }
  cuda::QuantDecodeArgs a{};
  a.x = x.const_data_ptr();
  a.y = y.data_ptr();
  a.M = M;
  a.N = N;
  a.K = K;
  a.qdata = qdata.const_data_ptr<uint8_t>();
  a.scales = scales.const_data_ptr();
  a.zeros = zp;
  a.fmt = static_cast<int>(fmt);
  a.group_size = group_size;
  a.dtype = dt == at::kHalf ? cuda::DType::kHalf : dt == at::kBFloat16 ? cuda::DType::kBFloat16 : cuda::DType::kFloat;
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == dt && bias->is_contiguous() && bias->sizes() == at::IntArrayRef({N}), op,
                ": bias must be a contiguous [", N, "] tensor of x's dtype");
    check_same_device(op, x, *bias, "bias");
    a.bias = bias->const_data_ptr();
  }
  TORCH_CHECK(lora_v.has_value() == lora_B.has_value(), op, ": lora_v and lora_B must be given together");
  if (lora_v) {
    const int64_t r = lora_v->dim() == 2 ? lora_v->size(1) : -1;
    TORCH_CHECK(lora_v->scalar_type() == at::kFloat && lora_v->is_contiguous() && lora_v->dim() == 2 &&
                    lora_v->size(0) == M && r >= 1,
                op, ": lora_v must be a contiguous float32 [M, r] tensor with M = ", M, ", got ", lora_v->sizes());
    TORCH_CHECK(lora_B->scalar_type() == dt && lora_B->is_contiguous() && lora_B->sizes() == at::IntArrayRef({N, r}),
                op, ": lora_B must be a contiguous [", N, ", ", r, "] tensor of x's dtype, got ", lora_B->sizes());
    check_same_device(op, x, *lora_v, "lora_v");
    check_same_device(op, x, *lora_B, "lora_B");
    a.lora_v = lora_v->const_data_ptr<float>();
    a.lora_B = lora_B->const_data_ptr();
    a.r = r;
  }
  TORCH_CHECK(sparse_layout.has_value() == sparse_values.has_value(), op,
              ": sparse_layout and sparse_values must be given together");
  if (sparse_layout) {
    const int64_t nnz = sparse_values->numel();
    TORCH_CHECK(sparse_values->scalar_type() == dt && sparse_values->is_contiguous() && sparse_values->dim() == 1, op,
                ": sparse_values must be a contiguous 1-D tensor of x's dtype");
    TORCH_CHECK(sparse_layout->scalar_type() == at::kInt && sparse_layout->is_contiguous() &&
                    sparse_layout->dim() == 1 && sparse_layout->numel() == N + K + 2 + 3 * nnz,
                op, ": sparse_layout must be the int32 layout pyhappy.ops.sparse_delta_linear.sparse_layout builds "
                "for N = ", N, ", K = ", K, ", nnz = ", nnz, " (", N + K + 2 + 3 * nnz, " entries), got ",
                sparse_layout->sizes());
    check_same_device(op, x, *sparse_layout, "sparse_layout");
    check_same_device(op, x, *sparse_values, "sparse_values");
    a.row_ptr = sparse_layout->const_data_ptr<int32_t>();
    a.cols = a.row_ptr + N + 1;
    a.values = sparse_values->const_data_ptr();
    a.sparse_scale = static_cast<float>(sparse_scale);
  }
  return a;
}

}  // namespace pyhappy
