// C++ CPU backend of pyhappy::lora_linear_multi: one batch, many LoRA adapters.
//
//   y[m] = x[m] Wᵀ + bias + s_a · (x[m] A_aᵀ) B_aᵀ,   a = adapter_index[m]  (-1: none)
//
// The base product is one BLAS GEMM for all rows. The low-rank part groups the rows by adapter
// (counting sort of the index) and runs, per group, u = X_a A_aᵀ and d = u B_aᵀ as two small GEMMs,
// then adds s_a·d into the group's rows of y; groups run in parallel (their rows are disjoint).
// Decode (one row per adapter) makes each group a pair of GEMVs reading A_a and B_a once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/parallel.h"

namespace pyhappy {
namespace cpu {
namespace {

at::Tensor lora_linear_multi_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& lora_A_in,
                                 const at::Tensor& lora_B_in, const at::Tensor& scalings_in,
                                 const at::Tensor& adapter_index) {
  const char* op = "lora_linear_multi_cpu";
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), op, ": x must be a 2-D CPU tensor");
  const at::Tensor x = x_in.detach().contiguous(), W = weight_in.detach();
  const at::Tensor A = lora_A_in.detach(), B = lora_B_in.detach();
  const int64_t M = x.size(0), K = x.size(1), N = W.size(0), L = A.size(0);
  TORCH_CHECK(W.dim() == 2 && W.size(1) == K && W.scalar_type() == x.scalar_type(), op,
              ": weight must be [N, K] in x's dtype");
  TORCH_CHECK(A.dim() == 3 && A.size(2) == K && A.scalar_type() == x.scalar_type(), op,
              ": lora_A must be [adapters, r_max, K] in x's dtype");
  TORCH_CHECK(B.dim() == 3 && B.size(0) == L && B.size(1) == N && B.size(2) == A.size(1) &&
                  B.scalar_type() == x.scalar_type(),
              op, ": lora_B must be [adapters, N, r_max] in x's dtype");
  TORCH_CHECK(scalings_in.scalar_type() == at::kFloat && scalings_in.numel() == L, op,
              ": scalings must be float32 [adapters]");
  TORCH_CHECK(adapter_index.scalar_type() == at::kLong && adapter_index.numel() == M, op,
              ": adapter_index must be int64 [M]");
  at::Tensor y = bias.has_value() ? gemm::addmm(bias->detach(), x, W.t()) : gemm::mm(x, W.t());
  if (M == 0) return y;
  // Group rows by adapter: counting sort (stable), validating every index.
  const at::Tensor idx_t = adapter_index.contiguous();
  const int64_t* idx = idx_t.const_data_ptr<int64_t>();
  std::vector<int64_t> start(L + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(idx[m] >= -1 && idx[m] < L, op, ": adapter_index[", m, "] = ", idx[m], " is outside [-1, ", L, ")");
    if (idx[m] >= 0) ++start[idx[m] + 1];
  }
  for (int64_t a = 0; a < L; ++a) start[a + 1] += start[a];
  std::vector<int64_t> rows(start[L]), fill(start.begin(), start.end() - 1);
  for (int64_t m = 0; m < M; ++m)
    if (idx[m] >= 0) rows[fill[idx[m]]++] = m;
  const at::Tensor rows_t = at::from_blob(rows.data(), {static_cast<int64_t>(rows.size())}, at::kLong);
  const at::Tensor s = scalings_in.detach().contiguous();
  const float* sp = s.const_data_ptr<float>();
  cpu::parallel_for(0, L, 1, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t c = start[a + 1] - start[a];
      if (c == 0) continue;
      const at::Tensor r = rows_t.narrow(0, start[a], c);
      const at::Tensor xa = x.index_select(0, r);
      const at::Tensor u = gemm::mm(xa, A[a].t());
      const at::Tensor d = gemm::mm(u, B[a].t());
      y.index_add_(0, r, d, sp[a]);  // rows of different adapters are disjoint: no race
    }
  });
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def(
      "lora_linear_multi_cpu(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor scalings, "
      "Tensor adapter_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) { m.impl("lora_linear_multi_cpu", &pyhappy::cpu::lora_linear_multi_cpu); }
