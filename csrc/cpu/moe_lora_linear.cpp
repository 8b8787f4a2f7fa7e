// C++ CPU backend of pyhappy::moe_lora_linear (a mixture of LoRA experts, forward and backward).
//
//   y = x Wᵀ + b + s · Σ_j g_j · B_{e_j} (A_{e_j} dropout(x)),   (e_j, g_j) the top-k of softmax(x Rᵀ)
//
// The adapter is ~2·k·r/N of the base GEMM's flops (K=N=4096, k=2, r=16: 1.6%); what a per-expert
// Python loop adds beyond that is its gathers, scatters and E small launches per product. The schedule
// here keeps those to the minimum the math needs:
//   1. the router: logits = x Rᵀ (M×E), softmax and top-k per token in one pass (a selection loop: strictly greater wins, so equal probabilities go to the lower expert index);
//   2. a counting sort of the M·k (token, slot) assignments by expert: perm (sorted slot -> t·k + j),
//      offsets [E + 1], and its inverse; every expert's tokens are one contiguous segment;
//   3. per segment u_e = x_e A_eᵀ [m_e, r], the segment's rows of dropout(x) read in place through
//      the sorted token list (gathered for BLAS where the skinny kernels do not serve; u is saved for
//      the backward, before the gate);
//   4. y += scatter(s·g ⊙ u_e B_eᵀ) per column block of y: each block's per-slot products are formed
//      into a small buffer (E skinny GEMMs) and summed into the token rows at once, so the [M·k, N]
//      products never exist at full width, and blocks are owned by one thread each (no races).
// The backward is the mirror image (dh = dy[tok] B_e, dA_e, dB_e per segment; dx += scatter(du_e A_e)
// per column block, with the token's dropout mask applied to its sum), then the router's Jacobian.
// Decode (a few rows): no gather or blocking, one pair of products per (token, slot).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/gemm.h"
#include "cpu/parallel.h"
#include "cpu/skinny_gemm.h"
#include "dropout_hash.h"

namespace pyhappy {
namespace cpu {
namespace {

constexpr const char* kOp = "moe_lora_linear_cpu";
// At or below this many (token, slot) assignments the products run one pair per assignment, without
// the sort's gather and the blocked scatter (their fixed costs outweigh what they save there).
constexpr int64_t kDecodeAssignments = 8;

struct MoeDropout {
  bool active = false;
  uint32_t seed = 0, threshold = 0;
  double scale = 1.0;
};

MoeDropout make_moe_dropout(double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, kOp, ": dropout_p must be in [0, 1), got ", p);
  MoeDropout d;
  if (p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->numel() >= 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
                kOp, ": dropout_p > 0 needs seed, an int64 tensor with one element on the CPU");
    d.active = true;
    d.seed = static_cast<uint32_t>(seed->reshape({-1})[0].item<int64_t>() & 0xFFFFFFFF);
    d.threshold = dropout_threshold(p);
    d.scale = 1.0 / (1.0 - p);
  }
  return d;
}

// row[c] = keep(t, c0 + c) ? row[c] * scale : 0 over nc entries (the hash mask of the reference).
template <typename T>
void drop_row(T* row, int64_t nc, int64_t t, int64_t c0, const MoeDropout& d) {
  using acc_t = at::opmath_type<T>;
  const uint32_t key = dropout_row_key(d.seed, static_cast<uint32_t>(t));
  const acc_t scale = static_cast<acc_t>(d.scale);
  for (int64_t c = 0; c < nc; ++c) {
    row[c] = dropout_keep(key, static_cast<uint32_t>(c0 + c), d.threshold)
                 ? static_cast<T>(static_cast<acc_t>(row[c]) * scale)
                 : static_cast<T>(0);
  }
}

// dropout(x) as a new contiguous tensor (x itself when dropout is off).
at::Tensor dropped(const at::Tensor& x, const MoeDropout& d) {
  if (!d.active) return x;
  at::Tensor out = x.contiguous().clone();
  const int64_t M = out.size(0), K = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "pyhappy_moe_dropout", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    cpu::parallel_for(0, M, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) drop_row<scalar_t>(p + t * K, K, t, 0, d);
    });
  });
  return out;
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The router's and the experts' thin products (one dimension E, r or a segment's row count): ATen's
// BLAS for fp32 / fp64. Their shapes change with the routing on every call, and a JIT engine (oneDNN,
// gemm.h's fp32 engine on AVX-512 CPUs) builds a kernel per new shape. bf16 / fp16 go through
// gemm:: (fp32 blocks where the CPU lacks native reduced-precision dot products).
bool blas_dtype(const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble; }

void thin_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (blas_dtype(out)) {
    at::mm_out(out, a, b);
  } else {
    gemm::mm_out(out, a, b);
  }
}

// A segment's products with an expert run pyhappy's fp32 skinny kernels (skinny_gemm.h) from this
// many rows, as lora_linear's do (below it their fixed costs outweigh what they save); BLAS otherwise.
constexpr int64_t kSkinnyMinRows = 64;

bool skinny_ok(const at::Tensor& t, int64_t rows) {
  return t.scalar_type() == at::kFloat && rows >= kSkinnyMinRows && use_avx2();
}

at::Tensor thin_mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  thin_mm_out(out, a, b);
  return out;
}

void thin_addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (blas_dtype(out)) {
    out.addmm_(a, b, 1.0, alpha);
  } else {
    gemm::addmm_(out, a, b, alpha);
  }
}

// ---- routing -------------------------------------------------------------------------------------

// p = softmax(l) over one token's E logits: exp(l - max) / Σ exp(l - max), in the logits' type.
// Equal logits give equal probabilities, so ties stay ties (and go to the lower expert index).
template <typename T>
void softmax_row(const T* l, T* p, int64_t E) {
  T mx = l[0];
  for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
  T sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    p[e] = std::exp(l[e] - mx);
    sum += p[e];
  }
  for (int64_t e = 0; e < E; ++e) p[e] /= sum;
}

struct Routing {
  at::Tensor logits, gates, experts, perm, offsets;
};

Routing route(const at::Tensor& x, const at::Tensor& R, int64_t k, bool normalize) {
  const int64_t M = x.size(0), E = R.size(0);
  Routing rt;
  rt.logits = thin_mm(x, R.t()).to(acc_type(x)).contiguous();
  rt.gates = at::empty({M, k}, rt.logits.options());
  rt.experts = at::empty({M, k}, x.options().dtype(at::kLong));
  int64_t* ex = rt.experts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(rt.logits.scalar_type(), "pyhappy_moe_route", [&] {
    const scalar_t* lp = rt.logits.const_data_ptr<scalar_t>();
    scalar_t* g = rt.gates.data_ptr<scalar_t>();
    cpu::parallel_for(0, M, 256, [&](int64_t t0, int64_t t1) {
      std::vector<char> taken(E);
      std::vector<scalar_t> prob(E);
      for (int64_t t = t0; t < t1; ++t) {
        softmax_row(lp + t * E, prob.data(), E);
        const scalar_t* pt = prob.data();
        std::fill(taken.begin(), taken.end(), 0);
        scalar_t sum = 0;
        for (int64_t j = 0; j < k; ++j) {
          int64_t best = -1;
          for (int64_t e = 0; e < E; ++e) {
            if (!taken[e] && (best < 0 || pt[e] > pt[best])) best = e;  // ties: the lower index stays
          }
          taken[best] = 1;
          ex[t * k + j] = best;
          g[t * k + j] = pt[best];
          sum += pt[best];
        }
        if (normalize) {
          for (int64_t j = 0; j < k; ++j) g[t * k + j] = g[t * k + j] / sum;
        }
      }
    });
  });
  // Counting sort of the assignments by expert, stable (token order inside a segment).
  const int64_t Mk = M * k;
  rt.offsets = at::zeros({E + 1}, x.options().dtype(at::kLong));
  rt.perm = at::empty({Mk}, x.options().dtype(at::kLong));
  int64_t* off = rt.offsets.data_ptr<int64_t>();
  int64_t* perm = rt.perm.data_ptr<int64_t>();
  for (int64_t a = 0; a < Mk; ++a) ++off[ex[a] + 1];
  for (int64_t e = 0; e < E; ++e) off[e + 1] += off[e];
  std::vector<int64_t> pos(off, off + E);
  for (int64_t a = 0; a < Mk; ++a) perm[pos[ex[a]]++] = a;
  return rt;
}

// inv[perm[a]] = a: the sorted slot of each flat assignment t·k + j.
std::vector<int64_t> slot_of(const at::Tensor& perm) {
  const int64_t n = perm.numel();
  const int64_t* p = perm.const_data_ptr<int64_t>();
  std::vector<int64_t> inv(n);
  for (int64_t a = 0; a < n; ++a) inv[p[a]] = a;
  return inv;
}

std::vector<int64_t> offsets_of(const at::Tensor& offsets) {
  const at::Tensor o = offsets.contiguous();
  return std::vector<int64_t>(o.const_data_ptr<int64_t>(), o.const_data_ptr<int64_t>() + o.numel());
}

// dst[:, :nc] = G · P[:, c0 : c0 + nc] (G [m, q], P [q, C], dst a block of a buffer): the skinny
// kernel's epilogue product for fp32 with unit column strides from kSkinnyMinRows rows (BLAS packs
// both operands of every such thin call, which costs more than the product), BLAS otherwise.
void block_product(at::Tensor dst, const at::Tensor& G, const at::Tensor& P, int64_t c0, int64_t nc) {
  const int64_t m = G.size(0), q = G.size(1);
  if (skinny_ok(G, m) && G.stride(1) == 1 && P.stride(1) == 1 && dst.stride(1) == 1) {
    skinny::g_p(G.const_data_ptr<float>(), G.stride(0), m, q, P.const_data_ptr<float>() + c0, P.stride(0), nc,
                nullptr, 1.0f, skinny::Dropout{}, false, dst.data_ptr<float>(), dst.stride(0));
    return;
  }
  at::Tensor d = dst.narrow(1, 0, nc);
  thin_mm_out(d, G, P.narrow(1, c0, nc));
}

// out[t, :] += bias + (dropout of token t)(Σ_j (H W_e)[inv[t·k + j], :]) + (L Rt)[t, :] for out [M, C]
// contiguous, H [M·k, r]
// in sorted order, W_e = mats[e] [r, C], L = extra_lhs [M, q] and Rt = extra_rhs [q, C] (optional; the
// backward's router term dlogits R). Column blocks of out are owned by one thread each; each
// block's per-slot products go to a small buffer (one skinny GEMM per expert segment) and are summed
// into the token rows while they are in cache.
void scatter_products(at::Tensor& out, const at::Tensor& H, const std::vector<at::Tensor>& mats,
                      const std::vector<int64_t>& off, const std::vector<int64_t>& inv, int64_t k,
                      const MoeDropout& d, const at::Tensor& bias = at::Tensor(),
                      const at::Tensor& extra_lhs = at::Tensor(), const at::Tensor& extra_rhs = at::Tensor()) {
  const int64_t M = out.size(0), C = out.size(1), Mk = H.size(0), E = static_cast<int64_t>(mats.size());
  if (M == 0 || C == 0) return;
  const int64_t elem = out.element_size();
  int64_t cb = (1 << 20) / std::max<int64_t>(1, Mk * elem);  // ~1 MiB of per-slot products per block
  cb = std::clamp<int64_t>((cb / 64) * 64, 64, std::max<int64_t>(64, C));
  const int64_t nblk = (C + cb - 1) / cb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "pyhappy_moe_scatter", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bp_bias = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    cpu::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor buf = at::empty({Mk, cb}, out.options());
      at::Tensor ebuf = extra_lhs.defined() ? at::empty({M, cb}, out.options()) : at::Tensor();
      const scalar_t* ep = ebuf.defined() ? ebuf.const_data_ptr<scalar_t>() : nullptr;
      std::vector<acc_t> acc(cb);
      std::vector<scalar_t> row(cb);
      const scalar_t* bp = buf.const_data_ptr<scalar_t>();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * cb, nc = std::min(cb, C - c0);
        for (int64_t e = 0; e < E; ++e) {
          const int64_t a = off[e], m = off[e + 1] - off[e];
          if (m == 0) continue;
          block_product(buf.narrow(0, a, m), H.narrow(0, a, m), mats[e], c0, nc);
        }
        if (ebuf.defined()) block_product(ebuf, extra_lhs, extra_rhs, c0, nc);
        for (int64_t t = 0; t < M; ++t) {
          if (bp_bias != nullptr) {
            for (int64_t c = 0; c < nc; ++c) acc[c] = static_cast<acc_t>(bp_bias[c0 + c]);
          } else {
            std::fill(acc.begin(), acc.begin() + nc, acc_t(0));
          }
          for (int64_t j = 0; j < k; ++j) {
            const scalar_t* src = bp + inv[t * k + j] * cb;
            for (int64_t c = 0; c < nc; ++c) acc[c] += static_cast<acc_t>(src[c]);
          }
          scalar_t* dst = o + t * C + c0;
          if (ep != nullptr) {
            const scalar_t* er = ep + t * cb;
            for (int64_t c = 0; c < nc; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(dst[c]) + er[c]);
          }
          if (d.active) {
            for (int64_t c = 0; c < nc; ++c) row[c] = static_cast<scalar_t>(acc[c]);
            drop_row<scalar_t>(row.data(), nc, t, c0, d);
            for (int64_t c = 0; c < nc; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(dst[c]) + row[c]);
          } else {
            for (int64_t c = 0; c < nc; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(dst[c]) + acc[c]);
          }
        }
      }
    });
  });
}

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& R, const at::Tensor& A, const at::Tensor& B, int64_t k) {
  TORCH_CHECK(x.dim() == 2, kOp, ": x must be 2-D [M, K] here, got ", x.dim(), "-D");
  const int64_t K = x.size(1);
  TORCH_CHECK(R.dim() == 2 && R.size(1) == K && R.size(0) >= 1, kOp, ": router_weight must be [E, K] with K=", K,
              ", got ", R.sizes());
  const int64_t E = R.size(0);
  TORCH_CHECK(A.dim() == 3 && A.size(0) == E && A.size(2) == K && A.size(1) >= 1, kOp, ": lora_A must be [E, r, K] = [",
              E, ", r, ", K, "], got ", A.sizes());
  const int64_t r = A.size(1);
  TORCH_CHECK(B.dim() == 3 && B.size(0) == E && B.size(2) == r, kOp, ": lora_B must be [E, N, r] = [", E, ", N, ", r,
              "], got ", B.sizes());
  const int64_t N = B.size(1);
  if (weight) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == N && weight->size(1) == K, kOp, ": weight must be [N, K] = [",
                N, ", ", K, "], got ", weight->sizes());
  }
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, kOp, ": bias must be [N] = [", N, "]");
  TORCH_CHECK(k >= 1 && k <= E, kOp, ": top_k must be in [1, E] = [1, ", E, "], got ", k);
  for (const auto* t : {&R, &A, &B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), kOp, ": all tensors must share x's dtype ", x.scalar_type());
  }
  if (weight) TORCH_CHECK(weight->scalar_type() == x.scalar_type(), kOp, ": weight must share x's dtype");
  if (bias) TORCH_CHECK(bias->scalar_type() == x.scalar_type(), kOp, ": bias must share x's dtype");
}

// The base product (or zeros / the bias when there is no weight) -> a new contiguous [M, N].
at::Tensor base_output(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, int64_t N) {
  const int64_t M = x.size(0);
  if (M == 0) return at::empty({0, N}, x.options());
  if (weight) return bias ? gemm::addmm(*bias, x, weight->t()) : gemm::mm(x, weight->t());
  if (bias) return bias->expand({M, N}).contiguous();
  return at::zeros({M, N}, x.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_lora_linear_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& R, const at::Tensor& A_in, const at::Tensor& B_in, int64_t k, bool normalize, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  check_inputs(x_in, weight, bias, R, A_in, B_in, k);
  const MoeDropout d = make_moe_dropout(dropout_p, seed);  // validated before any work
  // Detached: worker threads of at::parallel_for do not inherit the dispatcher's "below autograd"
  // state, and the products there must not see tensors that require grad.
  const at::Tensor x = x_in.detach().contiguous(), A = A_in.detach().contiguous(), B = B_in.detach().contiguous();
  const int64_t M = x.size(0), K = x.size(1), E = R.size(0), r = A.size(1), N = B.size(1), Mk = M * k;
  // The bias joins the scatter's pass over y (one read-add-write), except on the decode path.
  const bool decode = Mk <= kDecodeAssignments;
  const at::Tensor bias_c = bias ? bias->detach().contiguous() : at::Tensor();
  at::Tensor y = base_output(x, weight ? std::optional<at::Tensor>(weight->detach()) : std::nullopt,
                             (bias && (decode || M == 0)) ? std::optional<at::Tensor>(bias_c) : std::nullopt, N);
  if (M == 0) {
    const auto acc = x.options().dtype(acc_type(x));
    return {y, at::empty({0, E}, acc), at::empty({0, k}, acc), at::empty({0, k}, x.options().dtype(at::kLong)),
            at::empty({0}, x.options().dtype(at::kLong)), at::zeros({E + 1}, x.options().dtype(at::kLong)),
            at::empty({0, r}, x.options())};
  }
  Routing rt = route(x, R.detach(), k, normalize);
  const std::vector<int64_t> inv = slot_of(rt.perm);
  const std::vector<int64_t> off = offsets_of(rt.offsets);
  const at::Tensor xd = dropped(x, d);
  at::Tensor hidden = at::empty({Mk, r}, x.options());
  const at::Tensor g = rt.gates.reshape({-1});
  const int64_t* ex = rt.experts.const_data_ptr<int64_t>();
  if (decode) {
    // One pair of products per assignment, straight into the token's row of y.
    for (int64_t t = 0; t < M; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = ex[t * k + j], a = inv[t * k + j];
        at::Tensor u = hidden.narrow(0, a, 1);
        thin_mm_out(u, xd.narrow(0, t, 1), A[e].t());
        at::Tensor yt = y.narrow(0, t, 1);
        thin_addmm_(yt, u, B[e].t(), scaling * g[t * k + j].item<double>());
      }
    }
    return {y, rt.logits, rt.gates, rt.experts, rt.perm, rt.offsets, hidden};
  }
  const at::Tensor tok = at::floor_divide(rt.perm, k);
  const int64_t* tp = tok.const_data_ptr<int64_t>();
  // One parallel region over the experts (each segment's gather and product on one thread) rather
  // than a multi-threaded BLAS call per expert: the segments are small, and every parallel region
  // costs a fork-join.
  cpu::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t a = off[e], m = off[e + 1] - off[e];
      if (m == 0) continue;
      at::Tensor u = hidden.narrow(0, a, m);
      if (skinny_ok(xd, m)) {  // the segment's rows of x read in place through tok
        skinny::x_pt(xd.const_data_ptr<float>(), K, m, K, A[e].const_data_ptr<float>(), K, 1, r, 1.0f,
                     skinny::Dropout{}, u.data_ptr<float>(), tp + a);
      } else {
        thin_mm_out(u, xd.index_select(0, tok.narrow(0, a, m)), A[e].t());
      }
    }
  });
  const at::Tensor sg = (g.index_select(0, rt.perm) * scaling).to(x.scalar_type());
  const at::Tensor H = hidden * sg.unsqueeze(1);
  // [r, N] per expert: a row-major copy where the skinny kernel may serve the products (fp32, AVX2),
  // else views of B.
  const at::Tensor Bt_all = skinny_ok(H, kSkinnyMinRows) ? B.transpose(1, 2).contiguous() : B.transpose(1, 2);
  std::vector<at::Tensor> Bt;
  for (int64_t e = 0; e < E; ++e) Bt.push_back(Bt_all[e]);
  scatter_products(y, H, Bt, off, inv, k, MoeDropout{}, bias_c);
  return {y, rt.logits, rt.gates, rt.experts, rt.perm, rt.offsets, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_lora_linear_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logits, const at::Tensor& x_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& R, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& logits, const at::Tensor& gates, const at::Tensor& experts, const at::Tensor& perm,
    const at::Tensor& offsets, const at::Tensor& hidden_in, int64_t k, bool normalize, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, bool need_grad_x) {
  check_inputs(x_in, weight, std::nullopt, R, A_in, B_in, k);
  const at::Tensor x = x_in.detach().contiguous(), A = A_in.detach().contiguous(), B = B_in.detach().contiguous();
  const int64_t M = x.size(0), K = x.size(1), E = R.size(0), r = A.size(1), N = B.size(1), Mk = M * k;
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == M && grad_out.size(1) == N, kOp,
              "_backward: grad_out must be [M, N] = [", M, ", ", N, "], got ", grad_out.sizes());
  TORCH_CHECK(perm.numel() == Mk && offsets.numel() == E + 1 && hidden_in.size(0) == Mk && hidden_in.size(1) == r,
              kOp, "_backward: routing tensors do not match x and top_k");
  const MoeDropout d = make_moe_dropout(dropout_p, seed);
  const at::Tensor dy = grad_out.detach().contiguous(), hidden = hidden_in.detach().contiguous();
  at::Tensor gA = at::empty_like(A), gB = at::empty_like(B);  // every expert's slice written below
  at::Tensor gx = need_grad_x ? (weight && M > 0 ? gemm::mm(dy, weight->detach()) : at::zeros({M, K}, x.options()))
                              : at::empty({0}, x.options());
  if (M == 0) {
    return {gx, at::zeros_like(R), gA.zero_(), gB.zero_()};
  }
  const std::vector<int64_t> inv = slot_of(perm.contiguous());
  const std::vector<int64_t> off = offsets_of(offsets);
  const at::Tensor tok = at::floor_divide(perm, k);
  const int64_t* tp = tok.const_data_ptr<int64_t>();
  const at::Tensor sg = (gates.reshape({-1}).index_select(0, perm) * scaling).to(x.scalar_type());
  // Per expert, on one thread each (one parallel region): its rows of dy and dropout(x) gathered,
  // dh = dy_e B_e, dB_e = dy_eᵀ (s·g ⊙ u_e), dgate = s·⟨dh, u⟩, du = s·g ⊙ dh, dA_e = du_eᵀ x_e.
  const at::Tensor xd = dropped(x, d);
  at::Tensor du = at::empty({Mk, r}, x.options());
  at::Tensor dgate_sorted = at::empty({Mk}, logits.options());
  cpu::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t a = off[e], m = off[e + 1] - off[e];
      if (m == 0) {  // no token chose this expert: its gradients are zero
        gA[e].zero_();
        gB[e].zero_();
        continue;
      }
      const at::Tensor te = tok.narrow(0, a, m), ue = hidden.narrow(0, a, m), sge = sg.narrow(0, a, m).unsqueeze(1);
      const at::Tensor hse = (ue * sge).contiguous();
      // The skinny kernels read the segment's rows of dy and dropout(x) in place through tok; BLAS
      // takes them gathered.
      const bool sk = skinny_ok(dy, m);
      at::Tensor dhe;
      at::Tensor gBe = gB[e];
      if (sk) {
        dhe = at::empty({m, r}, x.options());
        skinny::x_pt(dy.const_data_ptr<float>(), N, m, N, B[e].const_data_ptr<float>(), 1, r, r, 1.0f,
                     skinny::Dropout{}, dhe.data_ptr<float>(), tp + a);
        at::Tensor gBt = at::empty({r, N}, x.options());
        skinny::gt_x(hse.const_data_ptr<float>(), r, r, dy.const_data_ptr<float>(), N, m, N, 1.0f,
                     skinny::Dropout{}, gBt.data_ptr<float>(), N, tp + a);
        gBe.copy_(gBt.t());
      } else {
        const at::Tensor dye = dy.index_select(0, te);  // [m, N] contiguous
        dhe = thin_mm(dye, B[e]);
        thin_mm_out(gBe, dye.t(), hse);
      }
      dgate_sorted.narrow(0, a, m).copy_((dhe * ue).sum(1).to(logits.scalar_type()).mul_(scaling));
      at::Tensor due = du.narrow(0, a, m);
      at::mul_out(due, dhe, sge);
      at::Tensor gAe = gA[e];
      if (sk) {
        skinny::gt_x(due.const_data_ptr<float>(), r, r, xd.const_data_ptr<float>(), K, m, K, 1.0f, skinny::Dropout{},
                     gAe.data_ptr<float>(), K, tp + a);
      } else {
        thin_mm_out(gAe, due.t(), xd.index_select(0, te));
      }
    }
  });
  // The router, one pass per token: d gates -> d probabilities of the chosen experts (through the
  // renormalisation) -> d logits (softmax Jacobian), plus the logits' own gradient.
  const at::Tensor lg = logits.contiguous(), gt = gates.contiguous(), ext = experts.contiguous();
  at::Tensor dl = at::empty({M, E}, lg.options());
  const at::Tensor dlog = (grad_logits && grad_logits->defined() && grad_logits->numel() > 0)
                              ? grad_logits->detach().to(lg.scalar_type()).contiguous()
                              : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(lg.scalar_type(), "pyhappy_moe_router_backward", [&] {
    const scalar_t* lp = lg.const_data_ptr<scalar_t>();
    const scalar_t* gp = gt.const_data_ptr<scalar_t>();
    const scalar_t* dsp = dgate_sorted.const_data_ptr<scalar_t>();
    const scalar_t* dlp = dlog.defined() ? dlog.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* ep = ext.const_data_ptr<int64_t>();
    scalar_t* out = dl.data_ptr<scalar_t>();
    cpu::parallel_for(0, M, 256, [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> p(E), dp(E);
      for (int64_t t = t0; t < t1; ++t) {
        softmax_row(lp + t * E, p.data(), E);
        std::fill(dp.begin(), dp.end(), scalar_t(0));
        scalar_t s = 0, gdot = 0;
        for (int64_t j = 0; j < k; ++j) {
          s += p[ep[t * k + j]];
          gdot += dsp[inv[t * k + j]] * gp[t * k + j];
        }
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t dg = dsp[inv[t * k + j]];
          dp[ep[t * k + j]] = normalize ? (dg - gdot) / s : dg;
        }
        scalar_t dot = 0;
        for (int64_t e = 0; e < E; ++e) dot += dp[e] * p[e];
        for (int64_t e = 0; e < E; ++e) {
          out[t * E + e] = p[e] * (dp[e] - dot) + (dlp ? dlp[t * E + e] : scalar_t(0));
        }
      }
    });
  });
  const at::Tensor dlx = dl.to(x.scalar_type());
  at::Tensor gR = thin_mm(dlx.t(), x);
  if (need_grad_x) {  // dx += dropout(scatter(du_e A_e)) + dlogits R, in one pass over dx
    std::vector<at::Tensor> As;
    for (int64_t e = 0; e < E; ++e) As.push_back(A[e]);  // [r, K]
    scatter_products(gx, du, As, off, inv, k, d, at::Tensor(), dlx, R.detach());
  }
  return {gx, gR, gA, gB};
}

}  // namespace cpu
}  // namespace pyhappy

TORCH_LIBRARY_FRAGMENT(pyhappy, m) {
  m.def(
      "moe_lora_linear_cpu(Tensor x, Tensor? weight, Tensor? bias, Tensor router_weight, Tensor lora_A, "
      "Tensor lora_B, int top_k, bool normalize, float scaling, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "moe_lora_linear_backward_cpu(Tensor grad_out, Tensor? grad_logits, Tensor x, Tensor? weight, "
      "Tensor router_weight, Tensor lora_A, Tensor lora_B, Tensor logits, Tensor gates, Tensor experts, "
      "Tensor perm, Tensor offsets, Tensor hidden, int top_k, bool normalize, float scaling, float dropout_p, "
      "Tensor? seed, bool need_grad_x) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyhappy, CPU, m) {
  m.impl("moe_lora_linear_cpu", &pyhappy::cpu::moe_lora_linear_cpu);
  m.impl("moe_lora_linear_backward_cpu", &pyhappy::cpu::moe_lora_linear_backward_cpu);
}
