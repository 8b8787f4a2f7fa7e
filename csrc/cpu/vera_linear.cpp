// C++ CPU helpers of pyhappy::vera_linear and pyhappy::pvera_linear.
//
// 1. The reparameterisation noise ε [rows, cols] of PVeRA, standard normal from the counter-based
//    dropout hash (dropout_hash.h), so PVeRA's backward regenerates it instead of storing it. The
//    same arithmetic as reference.gaussian_noise, in double, per pair of columns (2k, 2k + 1) of a row:
//
//      a = mix32(seed + row * 0x9E3779B9),  h1 = mix32(a ^ 2k),  h2 = mix32(a ^ (2k + 1))
//      u1 = (h1 + 0.5) / 2^32,  ρ = sqrt(-2 ln u1),  θ = 2π h2 / 2^32
//      ε[row, 2k] = ρ cos θ,  ε[row, 2k + 1] = ρ sin θ
//
//    (one log and one sin/cos pair per two elements; the torch formulation costs ~30 elementwise passes).
//
// 2. The pieces of the fused VeRA / PVeRA step around the two base GEMMs; the rank-space algebra
//    between them (λ_d, PVeRA's sampling) stays in Python, on [M, r] tensors:
//
//      forward   u = dropout(x) Aᵀ                            vera_hidden_cpu
//                y = x Wᵀ + b + λ_b ⊙ z,  z = v Bᵀ            vera_linear_out_cpu   (v = λ_d ⊙ u, or PVeRA's h)
//      backward  dv = dy (λ_b ⊙ B),  ∂λ_b = Σ_rows dy ⊙ z     vera_dy_side_cpu
//                dx = dy W + dropout(du A)                    vera_dx_cpu           (du from dv in rank space)
//
//    z is the adapter's output before λ_b, saved by the forward when λ_b is trained: its gradient
//    is then one pass over dy and z instead of the product dyᵀ v (M·N·r multiply-adds), which is
//    what PEFT's autograd does too (it saves the same tensor). Each base GEMM runs in the column
//    blocks of gemm.h with the adapter's share added to each block of y (dx) while the block is in
//    cache; the adapter's products run on BLAS or (``skinny``) on the skinny kernels of
//    skinny_gemm.h. Which of the two, or the unfused torch formulation, serves a call is measured
//    (pyhappy/_tune.py, candidates in pyhappy/ops/vera_linear.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "cpu/cpu_features.h"
#include "cpu/gemm.h"
#include "cpu/lora_adapter.h"
#include "cpu/parallel.h"
#include "cpu/skinny_gemm.h"
#include "dropout_hash.h"

#if PYHAPPY_HAVE_AVX2_KERNELS
#include "cpu/dropout_avx2.h"
#endif

namespace pyhappy {
namespace cpu {
namespace {

template <typename T>
void fill_noise(T* out, int64_t rows, int64_t cols, uint32_t seed) {
  constexpr double kInv32 = 1.0 / 4294967296.0;
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  const int64_t pairs = (cols + 1) / 2;
  cpu::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t a = dropout_row_key(seed, static_cast<uint32_t>(r));
      T* row = out + r * cols;
      for (int64_t k = 0; k < pairs; ++k) {
        const uint32_t c = static_cast<uint32_t>(2 * k);
        const double u1 = (static_cast<double>(mix32(a ^ c)) + 0.5) * kInv32;
        const double theta = static_cast<double>(mix32(a ^ (c + 1u))) * (kTwoPi * kInv32);
        const double rho = std::sqrt(-2.0 * std::log(u1));
        row[2 * k] = static_cast<T>(rho * std::cos(theta));
        if (2 * k + 1 < cols) row[2 * k + 1] = static_cast<T>(rho * std::sin(theta));
      }
    }
  });
}

}  // namespace

at::Tensor gaussian_noise_cpu(const at::Tensor& seed, int64_t rows, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "gaussian_noise_cpu: seed must be an int64 tensor of one element");
  TORCH_CHECK(rows >= 0 && cols >= 0, "gaussian_noise_cpu: rows and cols must be >= 0");
  const uint32_t s = static_cast<uint32_t>(seed.cpu().item<int64_t>() & 0xFFFFFFFFLL);
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "gaussian_noise_cpu",
                                  [&] { fill_noise<scalar_t>(out.data_ptr<scalar_t>(), rows, cols, s); });
  return out;
}


// ---- the fused VeRA / PVeRA step ------------------------------------------------------------

namespace {

struct Drop {
  bool active = false;
  uint32_t seed = 0, threshold = 0;
  float scale = 1.0f;
};

Drop make_drop(double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "vera_dx_cpu: dropout_p must be in [0, 1), got ", p);
  Drop d;
  if (p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->numel() >= 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
                "vera_dx_cpu: dropout_p > 0 needs seed, an int64 tensor with one element on the CPU");
    d = Drop{true, static_cast<uint32_t>(seed->reshape({-1})[0].item<int64_t>() & 0xFFFFFFFF), dropout_threshold(p),
             static_cast<float>(1.0 / (1.0 - p))};
  }
  return d;
}

// fp32 matrix with unit column stride (what the blocked epilogues and the kernels address).
bool fp32_rows(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.dim() == 2 && t.stride(1) == 1; }

#if PYHAPPY_HAVE_AVX2_KERNELS
PYHAPPY_TARGET_AVX2 void dropout_add_row_avx2(float* o, const float* s, int64_t n, uint32_t key, uint32_t c0,
                                              uint32_t thr, float scale) {
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 keep = dropout_keep8(key, c0 + static_cast<uint32_t>(j), thr);
    const __m256 v = _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), vs), keep);
    _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_loadu_ps(o + j), v));
  }
  for (; j < n; ++j) o[j] += dropout_keep(key, c0 + static_cast<uint32_t>(j), thr) ? s[j] * scale : 0.0f;
}
#endif

// out[i, j] += dropout(src)[i, c0 + j] over [M, nc] (fp32, row strides ldo / lds; the mask at
// row i, column c0 + j of the full matrix).
void dropout_add(float* out, int64_t ldo, const float* src, int64_t lds, int64_t M, int64_t c0, int64_t nc,
                 const Drop& d) {
  cpu::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const uint32_t key = dropout_row_key(d.seed, static_cast<uint32_t>(i));
      float* o = out + i * ldo;
      const float* s = src + i * lds;
#if PYHAPPY_HAVE_AVX2_KERNELS
      if (use_avx2()) {
        dropout_add_row_avx2(o, s, nc, key, static_cast<uint32_t>(c0), d.threshold, d.scale);
        continue;
      }
#endif
      for (int64_t j = 0; j < nc; ++j) {
        o[j] += dropout_keep(key, static_cast<uint32_t>(c0 + j), d.threshold) ? s[j] * d.scale : 0.0f;
      }
    }
  });
}

// Σ_rows a ⊙ b [N] for contiguous fp32 [M, N]: tasks own column slices and sum their rows in order,
// so the result does not depend on the thread count.
at::Tensor colsum_prod(const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), N = a.size(1);
  at::Tensor out = at::empty({N}, a.options());
  const float* pa = a.const_data_ptr<float>();
  const float* pb = b.const_data_ptr<float>();
  float* po = out.data_ptr<float>();
  constexpr int64_t kc = 256;
  cpu::parallel_for(0, (N + kc - 1) / kc, 1, [&](int64_t c0, int64_t c1) {
    float acc[kc];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j0 = c * kc, n = std::min(kc, N - j0);
      std::fill(acc, acc + n, 0.0f);
      for (int64_t i = 0; i < M; ++i) {
        const float* ar = pa + i * N + j0;
        const float* br = pb + i * N + j0;
        for (int64_t j = 0; j < n; ++j) acc[j] += ar[j] * br[j];
      }
      std::copy(acc, acc + n, po + j0);
    }
  });
  return out;
}

}  // namespace

at::Tensor vera_hidden_cpu(const at::Tensor& x, const at::Tensor& A, double dropout_p,
                           const std::optional<at::Tensor>& seed, bool skinny) {
  TORCH_CHECK(x.dim() == 2 && A.dim() == 2 && A.size(1) == x.size(1), "vera_hidden_cpu: x must be [M, K], A [r, K]");
  return lora_hidden(x, A, dropout_p, seed, skinny);
}

std::tuple<at::Tensor, at::Tensor> vera_linear_out_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, const at::Tensor& v,
                                                       const at::Tensor& B, const at::Tensor& lambda_b, bool want_z,
                                                       bool skinny) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == x.size(1) && v.dim() == 2 &&
                  v.size(0) == x.size(0) && B.dim() == 2 && B.size(0) == weight.size(0) && B.size(1) == v.size(1) &&
                  lambda_b.dim() == 1 && lambda_b.size(0) == weight.size(0),
              "vera_linear_out_cpu: x [M, K], weight [N, K], v [M, r], B [N, r] and lambda_b [N] expected");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = v.size(1);
  const at::Tensor empty = at::empty({0}, x.options());
  const bool fast = fp32_rows(x) && fp32_rows(v) && weight.scalar_type() == at::kFloat &&
                    B.scalar_type() == at::kFloat && lambda_b.scalar_type() == at::kFloat;
  if (!fast) {
    at::Tensor y = gemm::mm(x, weight.t());
    at::Tensor z = gemm::mm(v, B.t());
    y.addcmul_(z, lambda_b);
    if (bias) y.add_(*bias);
    return {y, want_z ? z : empty};
  }
  const bool kern = skinny && use_avx2() && M > 0;
  const at::Tensor lb = lambda_b.contiguous();
  const at::Tensor bs = bias ? bias->contiguous() : at::Tensor();
  // z wanted: the epilogue forms z's block, then y += λ_b ⊙ z + b over it. Not wanted: y += v (λ_b ⊙ B)ᵀ + b.
  const at::Tensor P = want_z ? B : B * lb.unsqueeze(1);  // [N, r]
  const at::Tensor Pt = kern ? P.t().contiguous() : P.t();  // [r, N]
  at::Tensor z = want_z ? at::empty({M, N}, x.options()) : empty;
  at::Tensor y;
  auto epilogue = [&](int64_t n0, int64_t nc) {
    at::Tensor yb = y.narrow(1, n0, nc);
    if (want_z) {
      at::Tensor zb = z.narrow(1, n0, nc);
      if (kern) {
        skinny::g_p(v.const_data_ptr<float>(), v.stride(0), M, r, Pt.const_data_ptr<float>() + n0, N, nc, nullptr,
                    1.0f, skinny::Dropout{}, /*accumulate=*/false, zb.data_ptr<float>(), N, n0);
      } else {
        at::mm_out(zb, v, Pt.narrow(1, n0, nc));
      }
      yb.addcmul_(zb, lb.narrow(0, n0, nc));
      if (bs.defined()) yb.add_(bs.narrow(0, n0, nc));
    } else if (kern) {
      skinny::g_p(v.const_data_ptr<float>(), v.stride(0), M, r, Pt.const_data_ptr<float>() + n0, N, nc,
                  bs.defined() ? bs.const_data_ptr<float>() + n0 : nullptr, 1.0f, skinny::Dropout{},
                  /*accumulate=*/true, y.data_ptr<float>() + n0, N, n0);
    } else {
      yb.addmm_(v, Pt.narrow(1, n0, nc));
      if (bs.defined()) yb.add_(bs.narrow(0, n0, nc));
    }
  };
  if (gemm::column_block(at::kFloat, M, K, N, /*b_col_major=*/true) == 0) {
    y = gemm::mm(x, weight.t());  // (the decode kernels for a few rows, oneDNN where it is the engine)
    epilogue(0, N);
  } else {
    y = at::empty({M, N}, x.options());
    gemm::mm_out_blocks(y, x, weight.t(), epilogue);
  }
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor> vera_dy_side_cpu(const at::Tensor& dy, const at::Tensor& B,
                                                    const at::Tensor& lambda_b, const std::optional<at::Tensor>& z,
                                                    bool skinny) {
  TORCH_CHECK(dy.dim() == 2 && B.dim() == 2 && B.size(0) == dy.size(1) && lambda_b.dim() == 1 &&
                  lambda_b.size(0) == dy.size(1),
              "vera_dy_side_cpu: dy [M, N], B [N, r] and lambda_b [N] expected");
  const int64_t M = dy.size(0), N = dy.size(1), r = B.size(1);
  const at::Tensor P = (B * lambda_b.unsqueeze(1)).contiguous();  // λ_b ⊙ B [N, r]
  at::Tensor dv;
  if (skinny && fp32_rows(dy) && P.scalar_type() == at::kFloat && use_avx2() && M > 0) {
    dv = at::empty({M, r}, dy.options());
    skinny::x_pt(dy.const_data_ptr<float>(), dy.stride(0), M, N, P.const_data_ptr<float>(), 1, r, r, 1.0f,
                 skinny::Dropout{}, dv.data_ptr<float>());
  } else {
    dv = gemm::mm(dy, P);
  }
  at::Tensor gb;
  if (!z) {
    gb = at::empty({0}, dy.options());
  } else {
    TORCH_CHECK(z->sizes() == dy.sizes(), "vera_dy_side_cpu: z must be [M, N] like dy");
    gb = dy.scalar_type() == at::kFloat && z->scalar_type() == at::kFloat
             ? colsum_prod(dy.contiguous(), z->contiguous())
             : (dy * *z).sum(0);
  }
  return {dv, gb};
}

at::Tensor vera_dx_cpu(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& du, const at::Tensor& A,
                       double dropout_p, const std::optional<at::Tensor>& seed, bool skinny) {
  TORCH_CHECK(dy.dim() == 2 && weight.dim() == 2 && weight.size(0) == dy.size(1) && du.dim() == 2 &&
                  du.size(0) == dy.size(0) && A.dim() == 2 && A.size(0) == du.size(1) && A.size(1) == weight.size(1),
              "vera_dx_cpu: dy [M, N], weight [N, K], du [M, r] and A [r, K] expected");
  const Drop d = make_drop(dropout_p, seed);
  const int64_t M = dy.size(0), N = dy.size(1), K = weight.size(1), r = du.size(1);
  const bool fast = fp32_rows(dy) && du.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                    A.scalar_type() == at::kFloat;
  if (!fast) {
    at::Tensor gx = gemm::mm(dy, weight);
    at::Tensor t = gemm::mm(du, A);
    lora_dropout_(t, dropout_p, seed);
    return gx.add_(t);
  }
  const bool kern = skinny && use_avx2() && M > 0;
  const at::Tensor duc = du.contiguous(), Ac = A.contiguous();
  at::Tensor gx, buf;
  auto epilogue = [&](int64_t k0, int64_t kc) {
    at::Tensor gb = gx.narrow(1, k0, kc);
    if (kern) {
      skinny::g_p(duc.const_data_ptr<float>(), r, M, r, Ac.const_data_ptr<float>() + k0, K, kc, nullptr, 1.0f,
                  skinny::Dropout{d.active, d.seed, d.threshold, d.scale}, /*accumulate=*/true,
                  gx.data_ptr<float>() + k0, K, k0);
    } else if (!d.active) {
      gb.addmm_(duc, Ac.narrow(1, k0, kc));
    } else {
      if (!buf.defined() || buf.size(1) < kc) buf = at::empty({M, kc}, dy.options());
      at::Tensor tb = buf.narrow(1, 0, kc);
      at::mm_out(tb, duc, Ac.narrow(1, k0, kc));
      dropout_add(gx.data_ptr<float>() + k0, K, tb.const_data_ptr<float>(), tb.stride(0), M, k0, kc, d);
    }
  };
  if (gemm::column_block(at::kFloat, M, N, K, /*b_col_major=*/false) == 0) {
    gx = gemm::mm(dy, weight);
    epilogue(0, K);
  } else {
    gx = at::empty({M, K}, dy.options());
    gemm::mm_out_blocks(gx, dy, weight, epilogue);
  }
  return gx;
}

}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def("gaussian_noise_cpu(Tensor seed, int rows, int cols, ScalarType dtype) -> Tensor");
  m.def("vera_hidden_cpu(Tensor x, Tensor A, float dropout_p, Tensor? seed, bool skinny) -> Tensor");
  m.def("vera_linear_out_cpu(Tensor x, Tensor weight, Tensor? bias, Tensor v, Tensor B, Tensor lambda_b, bool want_z, "
        "bool skinny) -> (Tensor, Tensor)");
  m.def("vera_dy_side_cpu(Tensor dy, Tensor B, Tensor lambda_b, Tensor? z, bool skinny) -> (Tensor, Tensor)");
  m.def("vera_dx_cpu(Tensor dy, Tensor weight, Tensor du, Tensor A, float dropout_p, Tensor? seed, bool skinny) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) {
  m.impl("gaussian_noise_cpu", &pyhappy::cpu::gaussian_noise_cpu);
  m.impl("vera_hidden_cpu", &pyhappy::cpu::vera_hidden_cpu);
  m.impl("vera_linear_out_cpu", &pyhappy::cpu::vera_linear_out_cpu);
  m.impl("vera_dy_side_cpu", &pyhappy::cpu::vera_dy_side_cpu);
  m.impl("vera_dx_cpu", &pyhappy::cpu::vera_dx_cpu);
}
