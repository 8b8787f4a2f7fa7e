// C++ CPU backend of pyhappy::lora_linear.
//
//   y = x Wᵀ + bias + s · ((dropout(x) Aᵀ) Cᵀ) Bᵀ
//
// Where the time goes on a CPU: the base GEMM x Wᵀ is ~K/r times the work of the adapter
// (K=4096, r=16: 256x), so it must run in the fastest BLAS form, and the adapter must cost little
// beyond its own flops. The schedule:
//   1. u = dropout(x) Aᵀ, the dropout mask generated from the counter hash while x is read
//      (dropout(x) is never materialised, no mask is stored);
//   2. y = x Wᵀ as a plain BLAS GEMM with beta = 0;
//   3. y += s · (u Cᵀ) Bᵀ + bias in ONE epilogue pass of the skinny kernel (read y, add, write).
// Why not fold the adapter into the GEMM with beta = 1 (no pass over y at all)? MKL's beta = 1 GEMM
// costs more over its beta = 0 form than a whole read-add-write pass over y costs, and end to end
// the two schedules are level; the separate pass keeps the base GEMM in its fastest form (figures:
// benchmarks/README.md, "Design measurements", "LoRA epilogue pass"). The backward is built the
// same way: dx = dy W (beta = 0), then dx += dropout(du A) in one pass.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ScalarOps.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/eager_ops.h"
#include "cpu/gemm.h"
#include "cpu/gemv.h"
#include "cpu/parallel.h"
#include "dropout_hash.h"

#if PYHAPPY_HAVE_AVX2_KERNELS
#include "cpu/dropout_avx2.h"
#endif
#include "cpu/lora_adapter.h"
#include "cpu/skinny_gemm.h"

namespace pyhappy {
namespace cpu {
namespace {

// ---- dropout mask, tile by tile --------------------------------------------------------------

// out[i, j] = keep(r0 + i, c0 + j) ? x[r0 + i, c0 + j] * scale : 0 for an [nr, nc] tile.
// x is addressed through its strides; out is row-major with leading dimension ldo; out may alias x
// (in-place) when both describe the same memory.
template <typename T>
void dropout_tile(const T* x, int64_t sx0, int64_t sx1, T* out, int64_t ldo, int64_t r0, int64_t nr, int64_t c0,
                  int64_t nc, uint32_t seed, uint32_t threshold, double scale_d) {
  // Scale in the op-math type (double for double, float otherwise), as torch's x * scalar does.
  using opmath_t = at::opmath_type<T>;
  const opmath_t scale = static_cast<opmath_t>(scale_d);
  for (int64_t i = 0; i < nr; ++i) {
    const uint32_t key = dropout_row_key(seed, static_cast<uint32_t>(r0 + i));
    const T* xr = x + (r0 + i) * sx0 + c0 * sx1;
    T* o = out + i * ldo;
#if PYHAPPY_HAVE_AVX2_KERNELS
    if constexpr (std::is_same_v<T, float>) {
      if (sx1 == 1 && use_avx2()) {
        dropout_row_f32(xr, o, nc, key, static_cast<uint32_t>(c0), threshold, scale);
        continue;
      }
    }
#endif
    for (int64_t j = 0; j < nc; ++j) {
      const bool keep = dropout_keep(key, static_cast<uint32_t>(c0 + j), threshold);
      o[j] = keep ? static_cast<T>(static_cast<opmath_t>(xr[j * sx1]) * scale) : static_cast<T>(0);
    }
  }
}

struct Dropout {
  double p;
  uint32_t seed;
  uint32_t threshold;
  double scale;
  bool active() const { return p > 0.0; }
};

Dropout make_dropout(double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lora_linear: dropout_p must be in [0, 1), got ", p);
  Dropout d{p, 0u, dropout_threshold(p), 1.0 / (1.0 - p)};
  if (p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->numel() >= 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
                "lora_linear: dropout_p > 0 needs seed, an int64 tensor with one element on the CPU");
    d.seed = static_cast<uint32_t>(seed->reshape({-1})[0].item<int64_t>() & 0xFFFFFFFF);
  }
  return d;
}

// Rows (or columns) per tile so that one tile of the dropped-out input stays in L2 (~256 KiB).
int64_t tile_extent(int64_t other_dim, int64_t elem_size) {
  return std::clamp<int64_t>((256 * 1024) / std::max<int64_t>(1, other_dim * elem_size), 1, 1024);
}

// dropout(x) Aᵀ -> [M, r], tiled over rows of x.
// (Worker threads of at::parallel_for do not inherit the dispatcher's "below autograd" state: the
// tensors they hand to ATen ops are detached.)
at::Tensor dropout_matmul_At(const at::Tensor& x_in, const at::Tensor& A_in, const Dropout& d) {
  const at::Tensor x = x_in.detach(), A = A_in.detach();
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0);
  at::Tensor u = at::empty({M, r}, x.options());
  if (M == 0) return u;
  const int64_t mb = tile_extent(K, x.element_size());
  const int64_t nblk = (M + mb - 1) / mb;
  const at::Tensor At = A.t();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pyhappy_dropout_matmul", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    cpu::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor buf = at::empty({mb, K}, x.options());
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * mb, nr = std::min(mb, M - r0);
        dropout_tile<scalar_t>(xp, x.stride(0), x.stride(1), buf.data_ptr<scalar_t>(), K, r0, nr, 0, K, d.seed,
                               d.threshold, d.scale);
        at::Tensor ublk = u.narrow(0, r0, nr);
        gemm::mm_out(ublk, buf.narrow(0, 0, nr), At);
      }
    });
  });
  return u;
}

// duᵀ dropout(x) -> [r, K], tiled over columns of x (each tile owns its columns: no reduction).
at::Tensor dropout_matmul_duT(const at::Tensor& du_in, const at::Tensor& x_in, const Dropout& d) {
  const at::Tensor du = du_in.detach(), x = x_in.detach();
  const int64_t M = x.size(0), K = x.size(1), r = du.size(1);
  at::Tensor gAt = at::empty({K, r}, x.options());  // rows of gAt = columns of grad_A: contiguous slices
  const int64_t kb = tile_extent(M, x.element_size());
  const int64_t nblk = (K + kb - 1) / kb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pyhappy_dropout_matmul_t", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    cpu::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor buf = at::empty({M, kb}, x.options());
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * kb, nc = std::min(kb, K - c0);
        dropout_tile<scalar_t>(xp, x.stride(0), x.stride(1), buf.data_ptr<scalar_t>(), kb, 0, M, c0, nc, d.seed,
                               d.threshold, d.scale);
        at::Tensor out = gAt.narrow(0, c0, nc);
        gemm::mm_out(out, buf.narrow(1, 0, nc).t(), du);
      }
    });
  });
  return gAt.t().contiguous();
}

// In place: t = dropout(t) for a contiguous [M, K] tensor.
void dropout_inplace(at::Tensor& t, const Dropout& d) {
  const int64_t M = t.size(0), K = t.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "pyhappy_dropout_inplace", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    cpu::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
      dropout_tile<scalar_t>(p, K, 1, p + r0 * K, K, r0, r1 - r0, 0, K, d.seed, d.threshold, d.scale);
    });
  });
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                  const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_C) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K] here, got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must be [N, K] with K=", x.size(1),
              ", got ", weight.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1), op, ": lora_A must be [r, K], got ", lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == weight.size(0) && lora_B.size(1) == r, op,
              ": lora_B must be [N, r] = [", weight.size(0), ", ", r, "], got ", lora_B.sizes());
  if (lora_C) {
    TORCH_CHECK(lora_C->dim() == 2 && lora_C->size(0) == r && lora_C->size(1) == r, op, ": lora_C must be [r, r] = [",
                r, ", ", r, "], got ", lora_C->sizes());
  }
  for (const auto* t : {&weight, &lora_A, &lora_B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": all tensors must share x's dtype ", x.scalar_type());
  }
}

// The skinny kernels serve fp32 with unit column stride from kSkinnyMinRows rows; everything else
// (bf16/fp16/fp64, strided columns, no AVX2, few rows) runs the same schedule on at::mm. Below 64
// rows their fixed costs (packing the small operand, row groups of 6-8) outweigh what they save;
// at 64 rows the two schedules tie and from 128 rows the kernels are faster (figures:
// benchmarks/README.md, "Design measurements", "kSkinnyMinRows").
constexpr int64_t kSkinnyMinRows = 64;

bool fast_path(const at::Tensor& act) {
  return act.scalar_type() == at::kFloat && act.stride(1) == 1 && act.size(0) >= kSkinnyMinRows && use_avx2();
}

skinny::Dropout skinny_dropout(const Dropout& d) {
  return skinny::Dropout{d.active(), d.seed, d.threshold, static_cast<float>(d.scale)};
}

// ---- the fp32 fast path, in pieces the fused op interleaves with its base GEMM ------------

// u = dropout(x) Aᵀ [M, r].
at::Tensor fast_hidden(const at::Tensor& x, const at::Tensor& lora_A, const Dropout& d) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  at::Tensor u = at::empty({M, r}, x.options());
  skinny::x_pt(x.const_data_ptr<float>(), x.stride(0), M, K, lora_A.const_data_ptr<float>(), lora_A.stride(0),
               lora_A.stride(1), r, 1.0f, skinny_dropout(d), u.data_ptr<float>());
  return u;
}

// y[:, n0 : n0 + nc] += s · v Bᵀ + bias over one column block of y (contiguous fp32 [M, N]).
struct ForwardEpilogue {
  at::Tensor v, Bt, bias;  // v = u Cᵀ [M, r]; Bt = Bᵀ [r, N] contiguous (read once per row group)
  float scaling;
  void operator()(at::Tensor& y, int64_t n0, int64_t nc) const {
    const int64_t M = y.size(0), N = y.size(1);
    skinny::g_p(v.const_data_ptr<float>(), v.stride(0), M, v.size(1), Bt.const_data_ptr<float>() + n0, N, nc,
                bias.defined() ? bias.const_data_ptr<float>() + n0 : nullptr, scaling, skinny::Dropout{},
                /*accumulate=*/true, y.data_ptr<float>() + n0, N, n0);
  }
};

ForwardEpilogue fast_epilogue(const at::Tensor& u, const std::optional<at::Tensor>& bias, const at::Tensor& lora_B,
                              const std::optional<at::Tensor>& lora_C, double scaling) {
  return {lora_C ? gemm::mm(u, lora_C->t()) : u, lora_B.t().contiguous(),
          bias ? bias->contiguous() : at::Tensor(), static_cast<float>(scaling)};
}

// The backward's products with dy (one pass each over dy) and what the x side needs from them.
struct DySide {
  at::Tensor gBt;     // (s · dyᵀ v)ᵀ [r, N]
  at::Tensor grad_C;  // dvᵀ u, or empty [0]
  at::Tensor du;      // dv C with dv = s · dy B (dv itself without a core) [M, r], contiguous
};

DySide fast_dy_side(const at::Tensor& grad_out, const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_C,
                    const at::Tensor& u, double scaling) {
  const at::Tensor v = lora_C ? gemm::mm(u, lora_C->t()) : u;
  const int64_t M = grad_out.size(0), N = grad_out.size(1), r = lora_B.size(1);
  const float* dy = grad_out.const_data_ptr<float>();
  at::Tensor dv = at::empty({M, r}, u.options());  // s · dy B
  skinny::x_pt(dy, grad_out.stride(0), M, N, lora_B.const_data_ptr<float>(), lora_B.stride(1), lora_B.stride(0), r,
               static_cast<float>(scaling), skinny::Dropout{}, dv.data_ptr<float>());
  at::Tensor gBt = at::empty({r, N}, u.options());
  skinny::gt_x(v.const_data_ptr<float>(), v.stride(0), r, dy, grad_out.stride(0), M, N, static_cast<float>(scaling),
               skinny::Dropout{}, gBt.data_ptr<float>(), N);
  at::Tensor grad_C = lora_C ? gemm::mm(dv.t(), u) : at::empty({0}, u.options());
  at::Tensor du = lora_C ? gemm::mm(dv, *lora_C) : dv;
  return {gBt, grad_C, du.contiguous()};
}

// dx[:, k0 : k0 + kc] += dropout(du A) over one column block of dx (contiguous fp32 [M, K]).
void fast_dx_epilogue(const at::Tensor& du, const at::Tensor& A, const Dropout& d, at::Tensor& dx, int64_t k0,
                      int64_t kc) {
  const int64_t M = dx.size(0), K = dx.size(1);
  skinny::g_p(du.const_data_ptr<float>(), du.stride(0), M, du.size(1), A.const_data_ptr<float>() + k0, K, kc, nullptr,
              1.0f, skinny_dropout(d), /*accumulate=*/true, dx.data_ptr<float>() + k0, K, k0);
}

// grad_A = duᵀ dropout(x) [r, K].
at::Tensor fast_grad_A(const at::Tensor& du, const at::Tensor& x, const Dropout& d) {
  const int64_t M = x.size(0), K = x.size(1), r = du.size(1);
  at::Tensor grad_A = at::empty({r, K}, x.options());
  skinny::gt_x(du.const_data_ptr<float>(), du.stride(0), r, x.const_data_ptr<float>(), x.stride(0), M, K, 1.0f,
               skinny_dropout(d), grad_A.data_ptr<float>(), K);
  return grad_A;
}

bool fast_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor* grad_x) {
  const bool gx_fast = grad_x == nullptr || (grad_x->scalar_type() == at::kFloat && grad_x->is_contiguous());
  return fast_path(x) && fast_path(grad_out) && gx_fast;
}

}  // namespace

at::Tensor lora_adapter_forward(const at::Tensor& x, at::Tensor& y, const std::optional<at::Tensor>& bias,
                                const at::Tensor& lora_A, const at::Tensor& lora_B,
                                const std::optional<at::Tensor>& lora_C, double scaling, double dropout_p,
                                const std::optional<at::Tensor>& seed) {
  const Dropout d = make_dropout(dropout_p, seed);
  if (fast_path(x) && y.scalar_type() == at::kFloat && y.is_contiguous()) {
    at::Tensor u = fast_hidden(x, lora_A, d);
    fast_epilogue(u, bias, lora_B, lora_C, scaling)(y, 0, y.size(1));
    return u;
  }
  at::Tensor u = d.active() ? dropout_matmul_At(x, lora_A, d) : gemm::mm(x, lora_A.t());
  const at::Tensor v = lora_C ? gemm::mm(u, lora_C->t()) : u;
  gemm::addmm_(y, v, lora_B.t(), scaling);  // one read-add-write pass over y (k = r)
  if (bias) y.add_(*bias);
  return u;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_adapter_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const std::optional<at::Tensor>& lora_C, const at::Tensor& lora_hidden, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, at::Tensor* grad_x) {
  const Dropout d = make_dropout(dropout_p, seed);
  const at::Tensor u = lora_hidden.contiguous();
  if (fast_backward(grad_out, x, grad_x)) {
    const DySide g = fast_dy_side(grad_out, lora_B, lora_C, u, scaling);
    at::Tensor grad_A = fast_grad_A(g.du, x, d);
    if (grad_x != nullptr) fast_dx_epilogue(g.du, lora_A.contiguous(), d, *grad_x, 0, grad_x->size(1));
    return {grad_A, g.gBt.t().contiguous(), g.grad_C};
  }
  const at::Tensor v = lora_C ? gemm::mm(u, lora_C->t()) : u;
  const at::Tensor dv = gemm::mm(grad_out, lora_B).mul_(scaling);        // [M, r]
  at::Tensor grad_B = gemm::mm(grad_out.t(), v).mul_(scaling);           // [N, r]
  at::Tensor grad_C = lora_C ? gemm::mm(dv.t(), u) : at::empty({0}, x.options());
  const at::Tensor du = lora_C ? gemm::mm(dv, *lora_C) : dv;
  at::Tensor grad_A = d.active() ? dropout_matmul_duT(du, x, d) : gemm::mm(du.t(), x);
  if (grad_x != nullptr) {
    if (d.active()) {
      at::Tensor lr = gemm::mm(du, lora_A);
      dropout_inplace(lr, d);
      grad_x->add_(lr);
    } else {
      gemm::addmm_(*grad_x, du, lora_A);  // skinny (k = r) GEMM
    }
  }
  return {grad_A, grad_B, grad_C};
}

at::Tensor lora_hidden(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p,
                       const std::optional<at::Tensor>& seed, bool skinny) {
  const Dropout d = make_dropout(dropout_p, seed);
  if (skinny && fast_path(x) && lora_A.scalar_type() == at::kFloat) return fast_hidden(x, lora_A, d);
  return d.active() ? dropout_matmul_At(x, lora_A, d) : gemm::mm(x, lora_A.t());
}

void lora_dropout_(at::Tensor& t, double dropout_p, const std::optional<at::Tensor>& seed) {
  const Dropout d = make_dropout(dropout_p, seed);
  if (d.active()) dropout_inplace(t, d);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_C,
                                                   double scaling, double dropout_p,
                                                   const std::optional<at::Tensor>& seed) {
  check_inputs("lora_linear_cpu", x, weight, lora_A, lora_B, lora_C);
  const Dropout d = make_dropout(dropout_p, seed);  // validates before the GEMM
  if (fast_path(x)) {
    // u first (x comes through the cache for the GEMM), then the GEMM in column blocks with the
    // adapter's epilogue on each block while it is still in cache.
    at::Tensor u = fast_hidden(x, lora_A, d);
    const ForwardEpilogue epi = fast_epilogue(u, bias, lora_B, lora_C, scaling);
    at::Tensor y;  // allocated by mm_out_blocks (on oneDNN: its result tensor)
    gemm::mm_out_blocks(y, x, weight.t(), [&](int64_t n0, int64_t nc) { epi(y, n0, nc); });
    return {y, u};
  }
  at::Tensor y = gemm::mm(x, weight.t());  // beta = 0; the adapter (+ bias) is added in one epilogue pass
  at::Tensor u = lora_adapter_forward(x, y, bias, lora_A, lora_B, lora_C, scaling, dropout_p, seed);
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_C, const at::Tensor& lora_hidden,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed, bool need_grad_x) {
  check_inputs("lora_linear_backward_cpu", x, weight, lora_A, lora_B, lora_C);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == weight.size(0),
              "lora_linear_backward_cpu: grad_out must be [M, N], got ", grad_out.sizes());
  const Dropout d = make_dropout(dropout_p, seed);
  if (fast_backward(grad_out, x, nullptr)) {
    // The dy products first (dy comes through the cache for dx = dy W), then dx in column blocks
    // with dropout(du A) added to each block while it is in cache, then grad_A over x.
    const DySide g = fast_dy_side(grad_out, lora_B, lora_C, lora_hidden.contiguous(), scaling);
    at::Tensor grad_x = at::empty({0}, x.options());
    if (need_grad_x) {
      const at::Tensor A = lora_A.contiguous();
      grad_x = at::Tensor();  // allocated by mm_out_blocks (on oneDNN: its result tensor)
      gemm::mm_out_blocks(grad_x, grad_out, weight,
                          [&](int64_t k0, int64_t kc) { fast_dx_epilogue(g.du, A, d, grad_x, k0, kc); });
    }
    return {grad_x, fast_grad_A(g.du, x, d), g.gBt.t().contiguous(), g.grad_C};
  }
  at::Tensor grad_x = need_grad_x ? gemm::mm(grad_out, weight) : at::empty({0}, x.options());
  auto [grad_A, grad_B, grad_C] = lora_adapter_backward(grad_out, x, lora_A, lora_B, lora_C, lora_hidden, scaling,
                                                        dropout_p, seed, need_grad_x ? &grad_x : nullptr);
  return {grad_x, grad_A, grad_B, grad_C};
}

// A training call of pyhappy::lora_linear (dropout off) as one C++ autograd node. Each pass runs
// the candidate the tuner decided for the layer (a LoraPass: the kernels above, "cpp"; the same
// kernels with their products on ATen, "cpp_aten"; or the unfused products on ATen, "torch":
// lora_products_forward / lora_products_backward); the gradient formula is the registered op's
// (pyhappy/ops/lora_linear.py, _backward). Python's autograd.Function around the same products
// costs a fixed amount of interpreter work a step, forward and backward, as much as the products of
// a small layer, and the unfused formulation's own autograd graph records a node per product
// (benchmarks/README.md, "Whole training steps of small layers"); here the engine calls one
// backward without entering Python.
namespace {

// t *= s as Python's `t.mul_(s)` computes it: s a wrapped number (for a bf16 / fp16 t, the product of
// t and s rounded to s's value in t's dtype; the Scalar overload of mul_ multiplies in float).
at::Tensor& scale_(at::Tensor& t, double s) { return t.mul_(at::native::wrapped_scalar_tensor(s)); }

}  // namespace

PassEngine::PassEngine(int64_t pass, const at::Tensor& a, const at::Tensor* base) {
  if (pass != kKernelsOnAten) return;
  // Where the measured dispatch offers "cpp_aten" (pyhappy/_tune.py, with_aten_engine): fp32 products
  // on oneDNN, or a decode-sized product a · base that pyhappy's streaming kernels would take;
  // elsewhere the registered op runs its default, the kernels as they are, and so does the node.
  const bool onednn = a.scalar_type() == at::kFloat && std::string(gemm::fp32_engine()) == "onednn";
  if (onednn || (base && a.dim() == 2 && gemv::serves(a, *base))) scope_.emplace(gemm::engine_value("aten", "PassEngine"));
}

at::Tensor node_output(const at::Tensor& y, const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(N);
  if (y.sizes() == at::IntArrayRef(shape) && !y.is_view() && y.is_contiguous()) return y;
  return at::_unsafe_view(y.contiguous(), shape);  // a fresh tensor, not a view (as aten's linear)
}

void check_first_order(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op, ": the gradient of this op's gradient is not implemented (a ",
              "backward with create_graph=True); run the layer unfused for that, e.g. inside ",
              "pyhappy._tune.forced(\"unfused\") or with pyhappy's ops left out of that part of the model");
}

std::tuple<at::Tensor, at::Tensor> lora_products_forward(const at::Tensor& x, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias,
                                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                         const std::optional<at::Tensor>& lora_C, double scaling) {
  at::Tensor u = x.mm(lora_A.t());
  const at::Tensor v = lora_C ? u.mm(lora_C->t()) : u;
  at::Tensor y = at::linear(x, weight, bias);
  y.addmm_(v, lora_B.t(), 1.0, scaling);
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_products_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_C, const at::Tensor& u, double scaling,
    bool need_x, bool need_A, bool need_B, bool need_C) {
  at::Tensor dv = dy.mm(lora_B);
  scale_(dv, scaling);
  at::Tensor gB, gC, gA, gx;
  if (need_B) {
    gB = dy.t().mm(lora_C ? u.mm(lora_C->t()) : u);
    scale_(gB, scaling);
  }
  if (lora_C && need_C) gC = dv.t().mm(u);
  const at::Tensor du = lora_C ? dv.mm(*lora_C) : dv;
  if (need_A) gA = du.t().mm(x);
  if (need_x) gx = dy.mm(weight).addmm_(du, lora_A);
  return {gx, gA, gB, gC};
}

struct LoraLinearStep : public torch::autograd::Function<LoraLinearStep> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& lora_C, double scaling, int64_t fwd_pass,
                            int64_t bwd_pass) {
    const int64_t K = x.size(-1), N = weight.size(0);
    const at::Tensor x2 = x.reshape({-1, K});
    at::Tensor y, u;
    if (fwd_pass == kProducts) {
      std::tie(y, u) = lora_products_forward(x2, weight, bias, lora_A, lora_B, lora_C, scaling);
    } else {
      const at::Tensor wt = weight.t();
      const PassEngine engine(fwd_pass, x2, &wt);
      std::tie(y, u) = lora_linear_cpu(x2, weight, bias, lora_A, lora_B, lora_C, scaling, 0.0, std::nullopt);
    }
    const bool has_core = lora_C.has_value() && lora_C->defined();
    // Which gradients the backward computes: those of the inputs that require grad now, as the
    // registered op's autograd.Function reads them (its needs_input_grad is fixed at the forward).
    ctx->saved_data["needs"] = c10::List<bool>({x.requires_grad(), weight.requires_grad(),
                                                bias && bias->defined() && bias->requires_grad(),
                                                lora_A.requires_grad(), lora_B.requires_grad(),
                                                has_core && lora_C->requires_grad()});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["bwd_pass"] = bwd_pass;
    ctx->save_for_backward({x, weight, lora_A, lora_B, has_core ? *lora_C : at::Tensor(), u});
    return node_output(y, x, N);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_A = saved[2], &lora_B = saved[3], &u = saved[5];
    const std::optional<at::Tensor> lora_C = saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    check_first_order("pyhappy::lora_linear");
    const c10::List<bool> needs = ctx->saved_data["needs"].toBoolList();
    const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_A = needs[3], need_B = needs[4],
               need_C = needs[5];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const int64_t K = x.size(-1), N = weight.size(0), M = K == 0 ? 0 : x.numel() / K, r = lora_A.size(0);
    const at::Tensor dy = grads[0].reshape({M, N}), x2 = x.reshape({M, K}), u2 = u.reshape({M, r});
    const int64_t bwd_pass = ctx->saved_data["bwd_pass"].toInt();
    at::Tensor gx, gA, gB, gC;
    if (bwd_pass == kProducts) {
      std::tie(gx, gA, gB, gC) =
          lora_products_backward(dy, x2, weight, lora_A, lora_B, lora_C, u2, scaling, need_x, need_A, need_B, need_C);
    } else {
      const PassEngine engine(bwd_pass, dy, need_x ? &weight : nullptr);
      std::tie(gx, gA, gB, gC) =
          lora_linear_backward_cpu(dy, x2, weight, lora_A, lora_B, lora_C, u2, scaling, 0.0, std::nullopt, need_x);
    }
    return {need_x ? gx.reshape(x.sizes()) : at::Tensor(),
            need_w ? dy.t().mm(x2) : at::Tensor(),
            need_b ? dy.sum(0) : at::Tensor(),
            need_A ? gA : at::Tensor(),
            need_B ? gB : at::Tensor(),
            need_C ? gC : at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor lora_linear_step(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& lora_A, const at::Tensor& lora_B,
                            const std::optional<at::Tensor>& lora_C, double scaling, int64_t fwd_pass,
                            int64_t bwd_pass) {
  TORCH_CHECK(fwd_pass >= kKernels && fwd_pass <= kKernelsOnAten && bwd_pass >= kKernels && bwd_pass <= kKernelsOnAten,
              "lora_linear_step: fwd_pass and bwd_pass must be 0 (kernels), 1 (products on ATen) or 2 (kernels on "
              "ATen), got ", fwd_pass, " and ", bwd_pass);
  return LoraLinearStep::apply(x, weight, bias, lora_A, lora_B, lora_C, scaling, fwd_pass, bwd_pass);
}

// Test hook: the exact dropout the kernels apply, so tests can compare masks bit for bit.
at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  TORCH_CHECK(x.dim() == 2, "dropout_cpu: x must be 2-D");
  const Dropout d = make_dropout(p, seed);
  at::Tensor out = x.contiguous().clone();
  if (d.active()) dropout_inplace(out, d);
  return out;
}

}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def(
      "lora_linear_cpu(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? lora_C, "
      "float scaling, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_backward_cpu(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor? lora_C, Tensor lora_hidden, float scaling, float dropout_p, Tensor? seed, bool need_grad_x) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dropout_cpu(Tensor x, float p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) {
  m.impl("lora_linear_cpu", &pyhappy::cpu::lora_linear_cpu);
  m.impl("lora_linear_backward_cpu", &pyhappy::cpu::lora_linear_backward_cpu);
  m.impl("dropout_cpu", &pyhappy::cpu::dropout_cpu);
}
