// C++ CPU backend of pyhappy::dora_weight_norm (the row norms DoRA divides its output by, without
// forming W + s·BA) and of pyhappy::dora_linear_backward with dropout off.
//
//   ‖W_n + s·B_n A‖² = ‖W_n‖² + 2s · B_n·(W Aᵀ)_n + s² · B_n (A Aᵀ) B_nᵀ
//
// The only product that reads W is P = W Aᵀ [N, r]: an activation-shaped skinny product, so on the
// fp32 fast path it runs the same AVX2 / AVX-512 kernel as u = x Aᵀ in lora_linear.cpp (one
// streaming pass over W, no [N, K] temporary). ‖W_n‖² comes in precomputed (the module caches it per
// weight version). The combination over [N, r] is done in float64, so the cancellation between the
// three terms (when s·B_n A nearly cancels W_n) loses no more than the fp32 P itself carries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/gemm.h"
#include "cpu/lora_adapter.h"
#include "cpu/parallel.h"
#include "cpu/skinny_gemm.h"

namespace pyhappy {
namespace cpu {
namespace {

// W Aᵀ [N, r] in weight's dtype. The skinny kernel serves fp32 W with unit
// column stride from 64 rows (as in lora_linear.cpp); the rest goes through at::mm.
at::Tensor weight_times_At(const at::Tensor& weight, const at::Tensor& lora_A) {
  const int64_t N = weight.size(0), K = weight.size(1), r = lora_A.size(0);
  if (weight.scalar_type() == at::kFloat && weight.stride(1) == 1 && N >= 64 && use_avx2()) {
    const at::Tensor A = lora_A.contiguous();
    at::Tensor P = at::empty({N, r}, weight.options());
    skinny::x_pt(weight.const_data_ptr<float>(), weight.stride(0), N, K, A.const_data_ptr<float>(), A.stride(0),
                 A.stride(1), r, 1.0f, skinny::Dropout{}, P.data_ptr<float>());
    return P;
  }
  return gemm::mm(weight, lora_A.t());  // bf16 / fp16: fp32 accumulation, one rounding per output
}

// S[n] = Σ_m dy[m, n] · (y[m, n] - b[n]) in float64 (float partial sums over 256-row slabs): one
// read of dy and y; columns split across threads, rows streamed.
void column_dots_f32(const at::Tensor& dy, const at::Tensor& y, const float* b, double* S) {
  const int64_t M = dy.size(0), N = dy.size(1);
  const float* dyp = dy.const_data_ptr<float>();
  const float* yp = y.const_data_ptr<float>();
  const int64_t ldd = dy.stride(0), ldy = y.stride(0);
  cpu::parallel_for(0, N, 512, [&](int64_t n0, int64_t n1) {
    const int64_t w = n1 - n0;
    std::vector<float> part(w);
    float* __restrict acc = part.data();
    for (int64_t m0 = 0; m0 < M; m0 += 256) {
      std::fill(part.begin(), part.end(), 0.0f);
      for (int64_t m = m0; m < std::min(M, m0 + 256); ++m) {
        const float* __restrict d = dyp + m * ldd + n0;
        const float* __restrict yy = yp + m * ldy + n0;
        if (b != nullptr) {
          const float* __restrict bb = b + n0;
          for (int64_t n = 0; n < w; ++n) acc[n] += d[n] * (yy[n] - bb[n]);
        } else {
          for (int64_t n = 0; n < w; ++n) acc[n] += d[n] * yy[n];
        }
      }
      for (int64_t n = 0; n < w; ++n) S[n0 + n] += acc[n];
    }
  });
}

// dst[n, :] = ms[n] · src[n, :] for a column block src of W ([N, kc], unit column stride) into dst
// ([N, kc] view of a buffer). Row by row in parallel: ATen's broadcasting mul runs this strided
// shape several times slower than one read of W.
void scale_rows(const at::Tensor& src, const at::Tensor& ms, at::Tensor& dst) {
  if (src.scalar_type() != at::kFloat || src.stride(1) != 1 || dst.stride(1) != 1) {
    at::mul_out(dst, src, ms.unsqueeze(1));
    return;
  }
  const int64_t N = src.size(0), kc = src.size(1), lds = src.stride(0), ldd = dst.stride(0);
  const float* sp = src.const_data_ptr<float>();
  const float* mp = ms.const_data_ptr<float>();
  float* dp = dst.data_ptr<float>();
  cpu::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* __restrict a = sp + n * lds;
      float* __restrict o = dp + n * ldd;
      const float c = mp[n];
      for (int64_t k = 0; k < kc; ++k) o[k] = c * a[k];
    }
  });
}

// Columns of dz per block of the reduction split (see dora_linear_backward_cpu): its buffer [M, cols]
// within half the budget of W's column blocks (N·kb / 2 elements), cols a multiple of 64 (at least
// 64, at most N). M >= 1.
int64_t split_cols(int64_t M, int64_t N, int64_t kb) {
  return std::min(N, std::max<int64_t>(64, N * kb / 2 / M / 64 * 64));
}

// Rows of dz per block of the row split: its buffer [rows, N] within the budget of W's column blocks
// (N·kb elements: kb rows), the M rows in equal blocks (a multiple of 16 rows, at least 16).
int64_t split_rows(int64_t M, int64_t kb) {
  const int64_t cap = std::max<int64_t>(16, kb / 16 * 16), nblk = (M + cap - 1) / cap;
  return std::min(cap, ((M + nblk - 1) / nblk + 15) / 16 * 16);
}

// How the C++ backward forms dz W = dy (ms ⊙ W) for more rows than a block (dz = dy ⊙ ms [M, N] is
// then larger than the budget of one temporary), the way that moves the fewest bytes:
//   kReduction  column blocks of dz (dy's columns scaled) times W's matching rows, accumulated into
//               grad_x: dy read once more, grad_x read and written once per block after the first.
//               fp32 on ATen only: oneDNN's products return a new tensor, which accumulating would
//               add a full [M, K] temporary, and a reduced-precision grad_x would be rounded once per
//               block. MKL runs a product split along its reduction into a few blocks at the whole
//               product's speed.
//   kRows       row blocks of dz times W into grad_x's rows: dy read once more, W read once per block
//               (a compute-bound product re-reads it anyway when it does not fit the cache), and on
//               oneDNN each block's result copied into grad_x.
//   kCols       column blocks of W scaled (ms ⊙ W) and multiplied into grad_x's column blocks: W read
//               and its scaled copy written once, dy packed again per block.
// fp32 M=512, K=N=4096, kb=384 (elements): reduction 12.6 M; rows (2 blocks of 256) 21 M on ATen,
// 25 M on oneDNN; columns 55 M.
// Machine epsilon of a floating dtype.
double dtype_eps(at::ScalarType dt) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "pyhappy_dtype_eps", [&] {
    return static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
  });
}

enum class DzSplit { kReduction, kRows, kCols };

DzSplit dz_split(at::ScalarType dt, int64_t M, int64_t K, int64_t N, int64_t kb) {
  const bool aten = std::string(gemm::fp32_engine()) == "aten";
  const int64_t kblk = (K + kb - 1) / kb, mb = split_rows(M, kb), mblk = (M + mb - 1) / mb;
  const double cols = 2.0 * N * K + double(kblk - 1) * M * N;
  const double rows = 2.0 * M * N + double(mblk - 1) * N * K + (aten && dt == at::kFloat ? 0.0 : 2.0 * M * K);
  if (dt == at::kFloat && aten) {
    const int64_t nb = split_cols(M, N, kb), nblk = (N + nb - 1) / nb;
    const double red = 2.0 * M * N + 2.0 * (nblk - 1) * M * K;
    if (red <= rows && red < cols) return DzSplit::kReduction;
  }
  return rows < cols ? DzSplit::kRows : DzSplit::kCols;
}

}  // namespace

// weight [N, K], lora_A [r, K], lora_B [N, r] (one dtype), weight_sqnorm [N] (‖W_n‖², any float
// dtype). Returns ‖W_n + s·B_n A‖ [N] in weight's dtype (PEFT casts its norm to the weight's dtype).
at::Tensor dora_weight_norm_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                const at::Tensor& weight_sqnorm, double scaling) {
  TORCH_CHECK(weight.dim() == 2, "dora_weight_norm_cpu: weight must be [N, K], got ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K, "dora_weight_norm_cpu: lora_A must be [r, K], got ",
              lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == r,
              "dora_weight_norm_cpu: lora_B must be [N, r] = [", N, ", ", r, "], got ", lora_B.sizes());
  TORCH_CHECK(weight_sqnorm.dim() == 1 && weight_sqnorm.size(0) == N,
              "dora_weight_norm_cpu: weight_sqnorm must be [N], got ", weight_sqnorm.sizes());
  TORCH_CHECK(lora_A.scalar_type() == weight.scalar_type() && lora_B.scalar_type() == weight.scalar_type(),
              "dora_weight_norm_cpu: lora_A and lora_B must share weight's dtype ", weight.scalar_type());
  const auto f64 = weight.options().dtype(at::kDouble);
  const at::Tensor P = weight_times_At(weight, lora_A).to(at::kDouble).contiguous();  // [N, r]
  const at::Tensor Ad = lora_A.to(at::kDouble);
  const at::Tensor Bd = lora_B.to(at::kDouble).contiguous();
  const at::Tensor BG = at::mm(Bd, at::mm(Ad, Ad.t())).contiguous();  // B (A Aᵀ) [N, r]
  const at::Tensor sq = weight_sqnorm.to(at::kDouble).contiguous();
  at::Tensor out = at::empty({N}, f64);
  const double* p = P.const_data_ptr<double>();
  const double* b = Bd.const_data_ptr<double>();
  const double* bg = BG.const_data_ptr<double>();
  const double* s2 = sq.const_data_ptr<double>();
  double* o = out.data_ptr<double>();
  const double s = scaling;
  // The floor eps·(‖W_n‖ + |s|·‖B_n‖·‖A‖) (eps of weight's dtype): where W_n + s·B_n A cancels to
  // below the rounding of its terms, the expansion can come out 0 or negative while the output's
  // numerator x·(W_n + s·B_n A) is rounding noise of that same size; dividing by the floor keeps
  // the output within ‖x‖·magnitude (what it is bounded by exactly) instead of inf or NaN.
  const double eps = dtype_eps(weight.scalar_type());
  const double a_norm = Ad.norm().item<double>();
  cpu::parallel_for(0, N, 1024, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      double cross = 0.0, quad = 0.0, bb = 0.0;
      for (int64_t j = 0; j < r; ++j) {
        cross += b[n * r + j] * p[n * r + j];
        quad += b[n * r + j] * bg[n * r + j];
        bb += b[n * r + j] * b[n * r + j];
      }
      const double floor = eps * (std::sqrt(s2[n]) + std::abs(s) * std::sqrt(bb) * a_norm);
      o[n] = std::max(floor, std::sqrt(std::max(0.0, s2[n] + 2.0 * s * cross + s * s * quad)));
    }
  });
  return out.to(weight.scalar_type());
}

// Backward of dora_linear with dropout off (see pyhappy/ops/dora_linear.py): grad_out dy, out (the
// forward's y) [M, N]; x [M, K]; lora_hidden u [M, r]. Returns (grad_x [M, K] or empty [0], grad_A,
// grad_B, S [N] float64) with S = Σ_m dy ⊙ (y - b) = ms ⊙ Σ_m dy ⊙ z.
//
// dz = dy ⊙ ms ([M, N]) is formed whole only when it is no larger than one block ([N, block_cols],
// kept within a tenth of W by the caller). Otherwise the base part dz W goes through one buffer of
// that size, in one of three ways (dz_split picks the one moving the fewest bytes): column blocks
// of dz (dy's columns scaled) times W's matching rows, accumulated into grad_x; row blocks of dz
// times W into grad_x's rows; or column blocks of W scaled (ms ⊙ W) and multiplied from cache into
// grad_x's column blocks. The adapter part takes
// ms ⊙ B for B (dz B = dy (ms ⊙ B)) and scales grad_B's rows after (dzᵀ u = ms ⊙ dyᵀ u).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& weight_norm,
    const at::Tensor& out, const at::Tensor& lora_hidden, double scaling, bool need_grad_x, int64_t block_cols) {
  TORCH_CHECK(x.dim() == 2 && grad_out.dim() == 2 && out.dim() == 2, "dora_linear_backward_cpu: 2-D x, grad_out, out");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, "dora_linear_backward_cpu: weight must be [N, K]");
  TORCH_CHECK(grad_out.size(0) == M && grad_out.size(1) == N && out.sizes() == grad_out.sizes(),
              "dora_linear_backward_cpu: grad_out and out must be [M, N]");
  TORCH_CHECK(block_cols >= 1, "dora_linear_backward_cpu: block_cols must be >= 1");
  const auto dt = x.scalar_type();
  const at::Tensor ms = (magnitude / weight_norm).contiguous();
  const at::Tensor ms_col = ms.unsqueeze(1);
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  at::Tensor S = at::zeros({N}, x.options().dtype(at::kDouble));
  if (dt == at::kFloat && grad_out.stride(1) == 1 && out.stride(1) == 1) {
    column_dots_f32(grad_out, out, b.defined() ? b.const_data_ptr<float>() : nullptr, S.data_ptr<double>());
  } else {
    const at::ScalarType acc = dt == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor t = b.defined() ? (out - b) * grad_out : out * grad_out;
    S.add_(t.sum({0}, false, acc));
  }
  at::Tensor grad_x = at::empty({0}, x.options());
  if (M <= block_cols) {
    // Few rows: dz = dy ⊙ ms [M, N] is no larger than one scaled block of W, and forming it spares
    // the pass over W that scaling the blocks costs (the product is bound by reading W here).
    const at::Tensor dz = grad_out * ms;
    if (need_grad_x) grad_x = gemm::mm(dz, weight);
    auto [gA, gB, gC] = lora_adapter_backward(dz, x, lora_A, lora_B, std::nullopt, lora_hidden, scaling, 0.0,
                                              std::nullopt, need_grad_x ? &grad_x : nullptr);
    return {grad_x, gA, gB, S};
  }
  const DzSplit how = N > 0 && K > 0 ? dz_split(dt, M, K, N, std::min(block_cols, K)) : DzSplit::kCols;
  if (need_grad_x && how == DzSplit::kReduction) {
    // dz W = Σ_j (dy[:, j-block] ⊙ ms[j-block]) W[j-block, :]: the scaled column blocks of dy go
    // through one buffer of half the budget of W's blocks below (split_cols; unlike W's block
    // buffer it is not served from memory the step freed before, so the full budget would take the
    // step's peak to the tenth of W that benchmarks/dora_linear.py checks) and the products
    // accumulate into grad_x.
    grad_x = at::empty({M, K}, x.options());
    const int64_t nb = split_cols(M, N, std::min(block_cols, K));
    at::Tensor buf = at::empty({M, nb}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
      const int64_t nc = std::min(nb, N - n0);
      at::Tensor dzb = buf.narrow(1, 0, nc);
      at::mul_out(dzb, grad_out.narrow(1, n0, nc), ms.narrow(0, n0, nc));
      if (n0 == 0) {
        gemm::mm_out(grad_x, dzb, weight.narrow(0, n0, nc));
      } else {
        gemm::addmm_(grad_x, dzb, weight.narrow(0, n0, nc));
      }
    }
  } else if (need_grad_x && how == DzSplit::kRows) {
    // dz W by row blocks of dz: grad_x[rows] = (dy[rows] ⊙ ms) W, through one buffer within the
    // budget (split_rows). Where the product of a block is computed into a tensor of its own and
    // copied into grad_x's rows (oneDNN) and a block of dz fits in those rows (N <= K), the block
    // is formed there instead: the buffer is not needed (the step's peak holds grad_x and one
    // block's result, as fused LoRA's holds grad_x).
    grad_x = at::empty({M, K}, x.options());
    const int64_t mb = split_rows(M, std::min(block_cols, K));
    at::Tensor buf;
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
      const int64_t mc = std::min(mb, M - m0);
      at::Tensor dst = grad_x.narrow(0, m0, mc);
      at::Tensor dzb;
      if (N <= K && gemm::mm_out_copies(weight, mc)) {
        dzb = dst.view({-1}).narrow(0, 0, mc * N).view({mc, N});
      } else {
        if (!buf.defined()) buf = at::empty({mb, N}, x.options());
        dzb = buf.narrow(0, 0, mc);
      }
      at::mul_out(dzb, grad_out.narrow(0, m0, mc), ms);
      gemm::mm_out(dst, dzb, weight);
    }
  } else if (need_grad_x) {
    grad_x = at::empty({M, K}, x.options());
    const int64_t kb = std::min(block_cols, K);
    at::Tensor buf = at::empty({N, kb}, weight.options());
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
      const int64_t kc = std::min(kb, K - k0);
      at::Tensor ws = buf.narrow(1, 0, kc);
      scale_rows(weight.narrow(1, k0, kc), ms, ws);
      at::Tensor dst = grad_x.narrow(1, k0, kc);
      gemm::mm_out(dst, grad_out, ws);
    }
  }
  auto [gA, gB, gC] = lora_adapter_backward(grad_out, x, lora_A, lora_B * ms_col, std::nullopt, lora_hidden, scaling,
                                            0.0, std::nullopt, need_grad_x ? &grad_x : nullptr);
  return {grad_x, gA, gB.mul_(ms_col), S};
}

}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def("dora_weight_norm_cpu(Tensor weight, Tensor lora_A, Tensor lora_B, Tensor weight_sqnorm, float scaling) "
        "-> Tensor");
  m.def(
      "dora_linear_backward_cpu(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, "
      "Tensor lora_B, Tensor magnitude, Tensor weight_norm, Tensor out, Tensor lora_hidden, float scaling, "
      "bool need_grad_x, int block_cols) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) {
  m.impl("dora_weight_norm_cpu", &pyhappy::cpu::dora_weight_norm_cpu);
  m.impl("dora_linear_backward_cpu", &pyhappy::cpu::dora_linear_backward_cpu);
}
