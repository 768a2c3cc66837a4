// CPU kernels of token_logprobs and _token_logprobs_backward (DESIGN §3.5).
//
// The valid (unmasked) tokens are gathered first; masked ones are never computed. The (n, V)
// logits never exist: tokens are cut into blocks of ≤ kTokenTile rows and the vocabulary into
// tiles of kVocabTile rows of the weight; each (rows × cols) tile of products comes from at::mm
// (MKL/oneDNN, single-threaded inside our parallel region) into a per-thread buffer, and the
// epilogue (token_logprobs_simd.inc) consumes it while it is in L2:
//   forward   — online log-sum-exp (and entropy sums) + target gather: one streaming pass;
//   backward  — recompute the tile, turn it into ∂L/∂z in place, then two products:
//               grad_hidden[block] += dz · W_tile,  grad_weight[tile] += dzᵀ · h_block.
// Chunk sizes: a 256 × 512 fp32 tile is 512 KiB, so the tile plus the W tile it came from
// (512 × H) stays in a 2 MiB L2 for H ≤ 512 and in L2+L3 above; 256 rows make each product
// long enough for MKL's packed kernels to run near peak, and 512 vocabulary rows keep the
// grad_weight accumulator of a tile (512 × H fp32, 1 MiB at H = 512) in cache across blocks.
// Work split: the forward and a hidden-only backward give each thread whole token blocks (no
// shared outputs); a backward that needs grad_weight gives each thread a stripe of vocabulary
// tiles (it owns those grad_weight rows) and its own (n, H) fp32 grad_hidden partial, summed at
// the end ((threads − 1)·n·H·4 bytes of scratch, 4 MiB at n = 2048, H = 512, 2 threads).
// bfloat16/float16 are computed in float32: hidden is converted once, each weight tile into a
// per-thread buffer, so every product accumulates in float32; float64 stays float64.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "prefcore/token_logprobs_math.h"
#include "token_logprobs_checks.h"

namespace prefcore::cpu {
namespace {

constexpr int64_t kTokenTile = 256;
constexpr int64_t kVocabTile = 512;

#define PREFCORE_SIMD_KERNELS "cpu/token_logprobs_simd.inc"
#include "cpu/simd_namespaces.inc"

PREFCORE_ISA_CLONES(forward_tile_isa, forward_tile)
PREFCORE_ISA_CLONES(backward_tile_isa, backward_tile)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The valid tokens: their flat indices (empty = all valid) after checking their targets.
struct ValidTokens {
  at::Tensor index;             // (n,) int64, undefined when every token is valid
  std::vector<int64_t> targets;  // (n,) targets of the valid tokens
  int64_t n = 0;
};

ValidTokens gather_valid(const TokenLogprobsInputs& p, bool check_range) {
  ValidTokens v;
  const bool* m = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
  std::vector<int64_t> idx;
  v.targets.reserve(static_cast<size_t>(p.N));
  AT_DISPATCH_INDEX_TYPES(p.targets.scalar_type(), "token_logprobs_targets", [&] {
    const index_t* t = p.targets.const_data_ptr<index_t>();
    for (int64_t i = 0; i < p.N; ++i) {
      if (m != nullptr && !m[i]) continue;
      const int64_t ti = static_cast<int64_t>(t[i]);
      if (check_range && (ti < 0 || ti >= p.V)) fail_target_range(ti, p.V);
      if (m != nullptr) idx.push_back(i);
      v.targets.push_back(ti);
    }
  });
  v.n = static_cast<int64_t>(v.targets.size());
  if (m != nullptr && v.n < p.N) {
    v.index = at::empty({v.n}, p.targets.options().dtype(at::kLong));
    std::copy(idx.begin(), idx.end(), v.index.mutable_data_ptr<int64_t>());
  }
  return v;
}

// The valid rows of `x` (N, ...) as a contiguous tensor of dtype `dt` (a view when nothing changes).
at::Tensor valid_rows(const at::Tensor& x, const ValidTokens& v, at::ScalarType dt) {
  at::Tensor r = v.index.defined() ? at::index_select(x, 0, v.index) : x;
  return r.to(dt).contiguous();
}

// Scatters valid-row values back to (N, ...) with zeros at masked tokens.
at::Tensor scatter_rows(const at::Tensor& vals, const ValidTokens& v, int64_t N, at::ScalarType dt) {
  if (!v.index.defined()) return vals.to(dt);
  auto sizes = vals.sizes().vec();
  sizes[0] = N;
  at::Tensor out = at::zeros(sizes, vals.options().dtype(dt));
  if (v.n > 0) out.index_copy_(0, v.index, vals.to(dt));
  return out;
}

int64_t token_tile_for(int64_t n) {
  // Enough blocks for every thread, each a multiple of 16 rows and at most kTokenTile.
  const int64_t per_thread = ceil_div(n, std::max<int64_t>(1, at::get_num_threads()));
  return std::clamp<int64_t>(ceil_div(per_thread, 16) * 16, 16, kTokenTile);
}

// The weight tile [v0, v0 + vn) in the accumulation dtype: a view, or a conversion into `buf`.
at::Tensor weight_tile(const at::Tensor& w, int64_t v0, int64_t vn, at::Tensor& buf, at::ScalarType acc) {
  at::Tensor wt = w.narrow(0, v0, vn);
  if (w.scalar_type() == acc) return wt;
  if (!buf.defined()) buf = at::empty({kVocabTile, w.size(1)}, w.options().dtype(acc));
  at::Tensor dst = buf.narrow(0, 0, vn);
  dst.copy_(wt);
  return dst;
}

at::Tensor tile_view(at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

template <typename acc_t>
void forward_valid(const at::Tensor& hv, const at::Tensor& w, const int64_t* tgt, acc_t inv_t, bool ent,
                   acc_t* lse, acc_t* lp, acc_t* entropy) {
  const int64_t n = hv.size(0), V = w.size(0);
  const at::ScalarType acc = hv.scalar_type();
  const int64_t tn = token_tile_for(n);
  const Isa isa = active_isa();
  at::parallel_for(0, ceil_div(n, tn), 1, [&](int64_t b0, int64_t b1) {
    at::Tensor tile = at::empty({tn * kVocabTile}, hv.options());
    at::Tensor wbuf;
    std::vector<LseState<acc_t>> st(static_cast<size_t>(tn));
    std::vector<acc_t> zt(static_cast<size_t>(tn));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * tn, rn = std::min(tn, n - r0);
      const at::Tensor hb = hv.narrow(0, r0, rn);
      std::fill(st.begin(), st.end(), lse_empty<acc_t>());
      std::fill(zt.begin(), zt.end(), acc_t(0));
      for (int64_t v0 = 0; v0 < V; v0 += kVocabTile) {
        const int64_t vn = std::min(kVocabTile, V - v0);
        const at::Tensor wt = weight_tile(w, v0, vn, wbuf, acc);
        at::Tensor z = tile_view(tile, rn, vn);
        at::mm_out(z, hb, wt.t());
        const acc_t* zp = z.const_data_ptr<acc_t>();
        if (ent) forward_tile_isa(isa, std::true_type{}, zp, rn, vn, v0, tgt + r0, inv_t, st.data(), zt.data());
        else forward_tile_isa(isa, std::false_type{}, zp, rn, vn, v0, tgt + r0, inv_t, st.data(), zt.data());
      }
      for (int64_t r = 0; r < rn; ++r) {
        const acc_t l = lse_value(st[r]);
        lse[r0 + r] = l;
        lp[r0 + r] = zt[r] - l;
        if (ent) entropy[r0 + r] = lse_entropy(st[r]);
      }
    }
  });
}

template <typename acc_t>
struct BackwardRows {
  const int64_t* tgt;
  const acc_t* lse;
  const acc_t* mu;  // nullptr without the entropy gradient
  const acc_t* a;   // g_ℓ / T
  const acc_t* b;   // g_H / T or nullptr
};

template <typename acc_t>
void dz_tile(Isa isa, at::Tensor& z, int64_t r0, int64_t v0, acc_t inv_t, const BackwardRows<acc_t>& br) {
  const int64_t rn = z.size(0), vn = z.size(1);
  acc_t* zp = z.mutable_data_ptr<acc_t>();
  if (br.mu != nullptr) {
    backward_tile_isa(isa, std::true_type{}, zp, rn, vn, v0, br.tgt + r0, inv_t, br.lse + r0, br.mu + r0,
                      br.a + r0, br.b + r0);
  } else {
    backward_tile_isa(isa, std::false_type{}, zp, rn, vn, v0, br.tgt + r0, inv_t, br.lse + r0,
                      static_cast<const acc_t*>(nullptr), br.a + r0, static_cast<const acc_t*>(nullptr));
  }
}

// grad_hidden (n, H) in acc (or undefined) and grad_weight (V, H) in w's dtype (or undefined).
template <typename acc_t>
std::pair<at::Tensor, at::Tensor> backward_valid(const at::Tensor& hv, const at::Tensor& w, acc_t inv_t,
                                                 const BackwardRows<acc_t>& br, bool need_gh, bool need_gw) {
  const int64_t n = hv.size(0), V = w.size(0), H = hv.size(1);
  const at::ScalarType acc = hv.scalar_type();
  const Isa isa = active_isa();
  const int64_t tn = token_tile_for(n);
  const int64_t nb = ceil_div(n, tn), nvt = ceil_div(V, kVocabTile);
  at::Tensor gh, gw;
  if (!need_gw) {
    // Hidden only: each thread owns whole token blocks and accumulates their grad_hidden rows.
    gh = at::empty({n, H}, hv.options());
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor tile = at::empty({tn * kVocabTile}, hv.options());
      at::Tensor wbuf;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * tn, rn = std::min(tn, n - r0);
        const at::Tensor hb = hv.narrow(0, r0, rn);
        at::Tensor ghb = gh.narrow(0, r0, rn);
        for (int64_t v0 = 0; v0 < V; v0 += kVocabTile) {
          const int64_t vn = std::min(kVocabTile, V - v0);
          const at::Tensor wt = weight_tile(w, v0, vn, wbuf, acc);
          at::Tensor z = tile_view(tile, rn, vn);
          at::mm_out(z, hb, wt.t());
          dz_tile(isa, z, r0, v0, inv_t, br);
          if (v0 == 0) at::mm_out(ghb, z, wt);
          else ghb.addmm_(z, wt);
        }
      }
    });
    return {gh, gw};
  }
  // grad_weight needed: each stripe of vocabulary tiles belongs to one thread.
  gw = at::empty({V, H}, w.options());
  const int64_t stripes = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nvt));
  std::vector<at::Tensor> parts(static_cast<size_t>(need_gh ? stripes : 0));
  for (auto& part : parts) part = at::zeros({n, H}, hv.options());
  at::parallel_for(0, stripes, 1, [&](int64_t s0, int64_t s1) {
    at::Tensor tile = at::empty({tn * kVocabTile}, hv.options());
    at::Tensor wbuf, gbuf;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t t0 = s * nvt / stripes, t1 = (s + 1) * nvt / stripes;
      for (int64_t vt = t0; vt < t1; ++vt) {
        const int64_t v0 = vt * kVocabTile, vn = std::min(kVocabTile, V - v0);
        const at::Tensor wt = weight_tile(w, v0, vn, wbuf, acc);
        at::Tensor gwt;
        if (w.scalar_type() == acc) {
          gwt = gw.narrow(0, v0, vn);
        } else {
          if (!gbuf.defined()) gbuf = at::empty({kVocabTile, H}, hv.options());
          gwt = gbuf.narrow(0, 0, vn);
        }
        if (n == 0) gwt.zero_();
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t r0 = b * tn, rn = std::min(tn, n - r0);
          const at::Tensor hb = hv.narrow(0, r0, rn);
          at::Tensor z = tile_view(tile, rn, vn);
          at::mm_out(z, hb, wt.t());
          dz_tile(isa, z, r0, v0, inv_t, br);
          if (b == 0) at::mm_out(gwt, z.t(), hb);
          else gwt.addmm_(z.t(), hb);
          if (need_gh) parts[static_cast<size_t>(s)].narrow(0, r0, rn).addmm_(z, wt);
        }
        if (w.scalar_type() != acc) gw.narrow(0, v0, vn).copy_(gwt);
      }
    }
  });
  if (need_gh) {
    gh = parts[0];
    for (size_t i = 1; i < parts.size(); ++i) gh.add_(parts[i]);
  }
  return {gh, gw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                  const at::Tensor& targets,
                                                                  const std::optional<at::Tensor>& mask,
                                                                  double temperature, bool return_entropy) {
  const TokenLogprobsInputs p = prepare_token_logprobs(hidden, weight, targets, mask, temperature);
  const ValidTokens v = gather_valid(p, /*check_range=*/true);
  const at::ScalarType acc = opmath_dtype(p.hidden);
  const auto opts = p.hidden.options().dtype(acc);
  at::Tensor lse = at::empty({v.n}, opts), lp = at::empty({v.n}, opts);
  at::Tensor ent = at::empty({return_entropy ? v.n : 0}, opts);
  if (v.n > 0) {
    const at::Tensor hv = valid_rows(p.hidden, v, acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "token_logprobs_cpu", [&] {
      forward_valid<scalar_t>(hv, p.weight, v.targets.data(), static_cast<scalar_t>(p.inv_temperature),
                              return_entropy, lse.mutable_data_ptr<scalar_t>(), lp.mutable_data_ptr<scalar_t>(),
                              return_entropy ? ent.mutable_data_ptr<scalar_t>() : nullptr);
    });
  }
  return {scatter_rows(lp, v, p.N, acc), return_entropy ? scatter_rows(ent, v, p.N, acc) : ent,
          scatter_rows(lse, v, p.N, acc)};
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_backward_cpu(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& hidden,
    const at::Tensor& weight, const at::Tensor& targets, const std::optional<at::Tensor>& mask,
    const at::Tensor& lse, const at::Tensor& entropy, double temperature, bool need_hidden_grad,
    bool need_weight_grad) {
  const TokenLogprobsInputs p = prepare_token_logprobs(hidden, weight, targets, mask, temperature);
  const at::Tensor gl = checked_token_vector(grad_logprobs, p, "grad_logprobs");
  const at::Tensor l = checked_token_vector(lse, p, "lse");
  const bool has_ge = grad_entropy.has_value() && grad_entropy->defined();
  at::Tensor ge, e;
  if (has_ge) {
    ge = checked_token_vector(*grad_entropy, p, "grad_entropy");
    e = checked_token_vector(entropy, p, "entropy");
  }
  // Out-of-range targets only ever fail to match a tile column, so no read depends on them.
  const ValidTokens v = gather_valid(p, /*check_range=*/false);
  const at::ScalarType acc = opmath_dtype(p.hidden);
  at::Tensor gh_out = at::empty({0}, p.hidden.options()), gw_out = at::empty({0}, p.weight.options());
  if (!need_hidden_grad && !need_weight_grad) return {gh_out, gw_out};
  const at::Tensor hv = valid_rows(p.hidden, v, acc);
  const at::Tensor lv = valid_rows(l, v, acc);
  const at::Tensor av = valid_rows(gl, v, acc).mul(p.inv_temperature);
  at::Tensor muv, bv;
  if (has_ge) {
    muv = lv.sub(valid_rows(e, v, acc));
    bv = valid_rows(ge, v, acc).mul(p.inv_temperature);
  }
  at::Tensor gh, gw;
  AT_DISPATCH_FLOATING_TYPES(acc, "token_logprobs_backward_cpu", [&] {
    const BackwardRows<scalar_t> br{v.targets.data(), lv.const_data_ptr<scalar_t>(),
                                    has_ge ? muv.const_data_ptr<scalar_t>() : nullptr, av.const_data_ptr<scalar_t>(),
                                    has_ge ? bv.const_data_ptr<scalar_t>() : nullptr};
    std::tie(gh, gw) = backward_valid<scalar_t>(hv, p.weight, static_cast<scalar_t>(p.inv_temperature), br,
                                                need_hidden_grad, need_weight_grad);
  });
  if (need_hidden_grad) gh_out = scatter_rows(gh, v, p.N, p.hidden.scalar_type());
  if (need_weight_grad) gw_out = gw;
  return {gh_out, gw_out};
}

}  // namespace
}  // namespace prefcore::cpu

TORCH_LIBRARY_IMPL(prefcore, CPU, m) {
  m.impl("token_logprobs", &prefcore::cpu::token_logprobs_cpu);
  m.impl("_token_logprobs_backward", &prefcore::cpu::token_logprobs_backward_cpu);
}
