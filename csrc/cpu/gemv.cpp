#include "cpu/gemv.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"

#if PYHAPPY_HAVE_AVX2_KERNELS
#include <immintrin.h>

namespace pyhappy {
namespace cpu {
namespace gemv {
namespace {

#define PYHAPPY_TARGET_GEMV __attribute__((target("avx2,fma,f16c")))

// 8 consecutive elements widened to fp32.
PYHAPPY_TARGET_GEMV inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PYHAPPY_TARGET_GEMV inline __m256 load8(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
PYHAPPY_TARGET_GEMV inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

PYHAPPY_TARGET_GEMV inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// out[m, n] = Σ_k x[m, k] w[n, k] for rows n0 <= n < n1 of w, R rows of w at a time: each row of w
// is read once for all M rows of x (fp32, leading dimension ldx); out is fp32 [M, ldo].
template <int M, int R, typename Tw>
PYHAPPY_TARGET_GEMV void dot_rows(const float* x, int64_t ldx, int64_t K, const Tw* w, int64_t ldw, int64_t n0,
                                  int64_t n1, float* out, int64_t ldo) {
  const int64_t kv = K & ~int64_t{7};
  for (int64_t n = n0; n + R <= n1; n += R) {
    __m256 acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    const Tw* wr = w + n * ldw;
    for (int64_t k = 0; k < kv; k += 8) {
      __m256 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = load8(wr + r * ldw + k);
        for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int r = 0; r < R; ++r) {
        float s = hsum(acc[m][r]);
        for (int64_t k = kv; k < K; ++k) s += x[m * ldx + k] * static_cast<float>(wr[r * ldw + k]);
        out[m * ldo + n + r] = s;
      }
    }
  }
}

// Rows of w per register block for M activation rows (M·R accumulators + M + 1 registers of 16).
template <int M>
constexpr int kRowsPerBlock = M == 1 ? 8 : M == 2 ? 4 : M == 3 ? 3 : 2;

template <int M, typename Tw>
PYHAPPY_TARGET_GEMV void dot_range(const float* x, int64_t ldx, int64_t K, const Tw* w, int64_t ldw, int64_t n0,
                                   int64_t n1, float* out, int64_t ldo) {
  constexpr int R = kRowsPerBlock<M>;
  const int64_t nr = n0 + (n1 - n0) / R * R;
  dot_rows<M, R>(x, ldx, K, w, ldw, n0, nr, out, ldo);
  dot_rows<M, 1>(x, ldx, K, w, ldw, nr, n1, out, ldo);
}

template <typename Tw>
void dot_range_m(int M, const float* x, int64_t ldx, int64_t K, const Tw* w, int64_t ldw, int64_t n0, int64_t n1,
                 float* out, int64_t ldo) {
  switch (M) {
    case 1: return dot_range<1>(x, ldx, K, w, ldw, n0, n1, out, ldo);
    case 2: return dot_range<2>(x, ldx, K, w, ldw, n0, n1, out, ldo);
    case 3: return dot_range<3>(x, ldx, K, w, ldw, n0, n1, out, ldo);
    default: return dot_range<4>(x, ldx, K, w, ldw, n0, n1, out, ldo);
  }
}

// part[m, j] += Σ_{k0 <= k < k1} a[m, k] b[k, j] (b row-major [K, N], leading dimension ldb; part
// fp32 [M, N]), four rows of b at a time: each row of b is read once for all M rows of a.
template <int M, typename Tw>
PYHAPPY_TARGET_GEMV void axpy_rows(const float* a, int64_t lda, const Tw* b, int64_t ldb, int64_t N, int64_t k0,
                                   int64_t k1, float* part) {
  const int64_t nv = N & ~int64_t{7};
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    __m256 c[M][4];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < 4; ++r) c[m][r] = _mm256_set1_ps(a[m * lda + k + r]);
    const Tw* br = b + k * ldb;
    for (int64_t j = 0; j < nv; j += 8) {
      __m256 bv[4];
      for (int r = 0; r < 4; ++r) bv[r] = load8(br + r * ldb + j);
      for (int m = 0; m < M; ++m) {
        __m256 acc = _mm256_loadu_ps(part + m * N + j);
        for (int r = 0; r < 4; ++r) acc = _mm256_fmadd_ps(c[m][r], bv[r], acc);
        _mm256_storeu_ps(part + m * N + j, acc);
      }
    }
    for (int64_t j = nv; j < N; ++j)
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < 4; ++r) part[m * N + j] += a[m * lda + k + r] * static_cast<float>(br[r * ldb + j]);
  }
  for (; k < k1; ++k) {
    const Tw* br = b + k * ldb;
    for (int m = 0; m < M; ++m) {
      const float am = a[m * lda + k];
      for (int64_t j = 0; j < N; ++j) part[m * N + j] += am * static_cast<float>(br[j]);
    }
  }
}

template <typename Tw>
void axpy_rows_m(int M, const float* a, int64_t lda, const Tw* b, int64_t ldb, int64_t N, int64_t k0, int64_t k1,
                 float* part) {
  switch (M) {
    case 1: return axpy_rows<1>(a, lda, b, ldb, N, k0, k1, part);
    case 2: return axpy_rows<2>(a, lda, b, ldb, N, k0, k1, part);
    case 3: return axpy_rows<3>(a, lda, b, ldb, N, k0, k1, part);
    default: return axpy_rows<4>(a, lda, b, ldb, N, k0, k1, part);
  }
}

// Elements of the weight below which a product runs on one thread (a parallel region costs more).
constexpr int64_t kMinParallelElems = int64_t{1} << 16;

// a as fp32 with unit column stride: a itself when it already is, else a converted copy.
at::Tensor as_fp32_rows(const at::Tensor& a) {
  return a.scalar_type() == at::kFloat ? a : a.to(at::kFloat).contiguous();
}

template <typename T>
void store_rounded(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename T>
at::Tensor run(const at::Tensor& a, const at::Tensor& b) {
  const int M = static_cast<int>(a.size(0));
  const int64_t K = a.size(1), N = b.size(1);
  at::Tensor out = at::empty({M, N}, a.options());
  if (N == 0) return out;
  if (K == 0) return out.zero_();
  const at::Tensor af = as_fp32_rows(a);
  const float* ap = af.const_data_ptr<float>();
  const int64_t lda = af.stride(0);
  const T* bp = b.const_data_ptr<T>();
  const bool single = K * N < kMinParallelElems;
  if (b.stride(0) == 1 && b.stride(1) >= K) {
    // b = Wᵀ, W [N, K] row-major with leading dimension b.stride(1): a dot product per row of W.
    const int64_t ldw = b.stride(1);
    std::vector<float> tmp;
    float* o = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      o = out.data_ptr<float>();
    } else {
      tmp.resize(static_cast<size_t>(M * N));
      o = tmp.data();
    }
    constexpr int64_t kGroup = 8;
    const int64_t groups = (N + kGroup - 1) / kGroup;
    const int64_t grain = std::max<int64_t>(1, kMinParallelElems / (kGroup * K));
    auto body = [&](int64_t g0, int64_t g1) {
      dot_range_m<T>(M, ap, lda, K, bp, ldw, g0 * kGroup, std::min(N, g1 * kGroup), o, N);
    };
    if (single) body(0, groups); else cpu::parallel_for(0, groups, grain, body);
    if constexpr (!std::is_same_v<T, float>) store_rounded(o, out.data_ptr<T>(), M * N);
    return out;
  }
  // b = W [K, N] row-major (leading dimension b.stride(0)): each thread accumulates the rows of W
  // it owns into its own fp32 partial [M, N]; the partials are summed and rounded once.
  const int64_t ldb = b.stride(0);
  const int nt = single ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, K / 4)));
  std::vector<float> parts(static_cast<size_t>(nt) * M * N, 0.0f);
  auto chunk = [&](int t) {
    const int64_t k0 = K * t / nt, k1 = K * (t + 1) / nt;
    axpy_rows_m<T>(M, ap, lda, bp, ldb, N, k0, k1, parts.data() + static_cast<size_t>(t) * M * N);
  };
  if (nt == 1) {
    chunk(0);
  } else {
    cpu::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) chunk(static_cast<int>(t));
    });
  }
  T* op = out.data_ptr<T>();
  for (int64_t i = 0; i < M * N; ++i) {
    float s = parts[i];
    for (int t = 1; t < nt; ++t) s += parts[static_cast<size_t>(t) * M * N + i];
    op[i] = static_cast<T>(s);
  }
  return out;
}

}  // namespace

bool serves(const at::Tensor& a, const at::Tensor& b) {
  static const bool f16c = __builtin_cpu_supports("f16c");
  if (!use_avx2() || !a.device().is_cpu() || a.dim() != 2 || b.dim() != 2) return false;
  const int64_t M = a.size(0);
  if (M < 1 || M > kMaxRows || a.size(1) != b.size(0) || a.scalar_type() != b.scalar_type() || a.stride(1) != 1)
    return false;
  const auto t = a.scalar_type();
  if (!(t == at::kFloat || t == at::kBFloat16 || (t == at::kHalf && f16c))) return false;
  const int64_t K = b.size(0), N = b.size(1);
  if (K == 0 || N == 0) return true;
  return (b.stride(0) == 1 && b.stride(1) >= K) || (b.stride(1) == 1 && b.stride(0) >= N);
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(serves(a, b), "gemv::mm: the decode kernels do not serve ", a.sizes(), " x ", b.sizes());
  switch (a.scalar_type()) {
    case at::kFloat: return run<float>(a, b);
    case at::kBFloat16: return run<c10::BFloat16>(a, b);
    default: return run<c10::Half>(a, b);
  }
}

}  // namespace gemv
}  // namespace cpu
}  // namespace pyhappy

#else  // no AVX2 kernels on this architecture

namespace pyhappy {
namespace cpu {
namespace gemv {
bool serves(const at::Tensor&, const at::Tensor&) { return false; }
at::Tensor mm(const at::Tensor& a, const at::Tensor&) {
  TORCH_CHECK(false, "gemv::mm: built without AVX2 kernels");
  return a;
}
}  // namespace gemv
}  // namespace cpu
}  // namespace pyhappy

#endif
