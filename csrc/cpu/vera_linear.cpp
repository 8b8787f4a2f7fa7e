// C++ CPU helper of pyhappy::pvera_linear: the reparameterisation noise ε [rows, cols], standard
// normal from the counter-based dropout hash (dropout_hash.h), so PVeRA's backward regenerates it
// instead of storing it. The same arithmetic as reference.gaussian_noise, in double, per pair of
// columns (2k, 2k + 1) of a row:
//
//   a = mix32(seed + row * 0x9E3779B9),  h1 = mix32(a ^ 2k),  h2 = mix32(a ^ (2k + 1))
//   u1 = (h1 + 0.5) / 2^32,  ρ = sqrt(-2 ln u1),  θ = 2π h2 / 2^32
//   ε[row, 2k] = ρ cos θ,  ε[row, 2k + 1] = ρ sin θ
//
// (one log and one sin/cos pair per two elements; the torch formulation costs ~30 elementwise passes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "dropout_hash.h"

namespace pyhappy {
namespace cpu {
namespace {

template <typename T>
void fill_noise(T* out, int64_t rows, int64_t cols, uint32_t seed) {
  constexpr double kInv32 = 1.0 / 4294967296.0;
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  const int64_t pairs = (cols + 1) / 2;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
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

}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def("gaussian_noise_cpu(Tensor seed, int rows, int cols, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) { m.impl("gaussian_noise_cpu", &pyhappy::cpu::gaussian_noise_cpu); }
