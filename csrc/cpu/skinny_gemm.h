// AVX2+FMA and AVX-512F fp32 kernels (chosen at run time) for the skinny products of low-rank adapters: one operand has a tiny
// dimension r (the adapter rank), the other is an activation [M, D] with D in the thousands.
//
// Why not BLAS: for r = 16 the library GEMM can run these shapes at about half the throughput of a
// square GEMM (MKL on a 2-core EPYC), which makes the adapter cost about twice its flops. On an
// AVX-512 CPU MKL does better, and the 16-lane kernels here still take less time than it on x·Aᵀ
// and uᵀx (more on the epilogue product, which they fuse with the bias and dropout; figures:
// benchmarks/README.md, "Design measurements", "Skinny kernels against BLAS"). These
// register-blocked kernels keep the activation streaming through once and fuse the dropout hash
// and the epilogues (scale, bias, dropout of the result) so nothing is materialised.
//
// All pointers are fp32; activations have unit column stride and a row stride (ld*); the small
// operand is addressed through two strides, so transposed views need no copy from the caller.
// Every function parallelises with at::parallel_for. Call only when cpu::use_avx2() is true; the
// 16-lane kernels run when cpu::use_avx512() is true too (same results, bit for bit).
#pragma once

#include <cstdint>

namespace pyhappy {
namespace cpu {
namespace skinny {

// Dropout applied to an activation while it is read (or to a result as it is stored), with the
// mask of dropout_hash.h evaluated at (row, col) of the activation.
struct Dropout {
  bool active = false;
  uint32_t seed = 0;
  uint32_t threshold = 0;
  float scale = 1.0f;
};

// out[M, r] (row stride r) = alpha · dropout(X)[M, D] · Pᵀ, where P(j, k) = P[j*sp0 + k*sp1], j < r, k < D.
// With rows, row m of X is the row rows[m] of the matrix at X (a gather read in place, no copy; the
// dropout mask is that row's).
void x_pt(const float* X, int64_t ldx, int64_t M, int64_t D, const float* P, int64_t sp0, int64_t sp1, int64_t r,
          float alpha, const Dropout& drop, float* out, const int64_t* rows = nullptr);

// out[r, D] (row stride ldo) = alpha · Gᵀ · dropout(X), G [M, r] with row stride ldg, X [M, D]; rows
// as for x_pt.
void gt_x(const float* G, int64_t ldg, int64_t r, const float* X, int64_t ldx, int64_t M, int64_t D, float alpha,
          const Dropout& drop, float* out, int64_t ldo, const int64_t* rows = nullptr);

// out[M, D] (row stride ldo) (+)= dropout(alpha · G[M, r] · P[r, D] + bias[D]); P row stride ldp;
// bias may be null; the dropout (if active) is applied at (row, col0 + col) of out (col0: where a
// column block handed in starts in the full result); with accumulate the result is added to what
// out holds (the epilogue of a GEMM computed before, see lora_linear.cpp).
void g_p(const float* G, int64_t ldg, int64_t M, int64_t r, const float* P, int64_t ldp, int64_t D,
         const float* bias, float alpha, const Dropout& drop, bool accumulate, float* out, int64_t ldo,
         int64_t col0 = 0);

}  // namespace skinny
}  // namespace cpu
}  // namespace pyhappy
