// CPU kernels of gmm_nll and _gmm_nll_backward (DESIGN §3.2). Maths: prefcore/gmm_math.h.
//
// One pass over a row's points per direction. Points are processed one SIMD value at a time
// (16/8/4 float or 8/4/2 double lanes in the AVX-512/AVX2/baseline clones, see simd.h); per
// lane block the K log-terms a_k are formed, their max-shifted exps give the mixture log-density (forward) or the responsibilities, which are
// folded straight into three sums per component (backward). Nothing of size (B, K, G) exists:
// per thread the scratch is the row's points, weights and (normalize_grid) log-densities, plus
// O(K) SIMD blocks. With few points per row (raw annotator scores) gmm_tiles puts W rows
// across the lanes instead, so no lane idles and the per-row set-up is vectorised too.
//
// The parameters are (B, K), tiny next to the (B, G) weights, so half/bfloat16 parameters are
// widened to float32 once up front and the row kernels exist only for the two accumulation
// types (× the ISA clones of isa.h). Points and weights arrive in the accumulation dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/isa.h"
#include "cpu/simd.h"
#include "gmm_checks.h"
#include "prefcore/gmm_math.h"

namespace prefcore::cpu {
namespace {

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

template <typename acc_t>
PREFCORE_ALWAYS_INLINE bool is_finite_value(acc_t v) {
  return (v < kInf<acc_t>) & (v > -kInf<acc_t>);  // false for ±∞ and NaN
}

// Most points per row the row-tile kernel (gmm_tiles) takes.
constexpr int64_t kMaxTilePoints = 64;

#define PREFCORE_SIMD_KERNELS "cpu/gmm_nll_simd.inc"
#include "cpu/simd_namespaces.inc"

PREFCORE_ISA_CLONES(gmm_rows_isa, gmm_rows)
PREFCORE_ISA_CLONES(gmm_tiles_isa, gmm_tiles)

// ---- launchers ----------------------------------------------------------------------------

int64_t grain_for(const GmmInputs& p) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.P * p.K));
}

// Runs the row kernel over all rows; raises the first value error if a row had one.
template <bool kBackward, typename acc_t>
void run_rows(const GmmInputs& p, GmmArgs<acc_t>& a, std::atomic<int64_t>& first_bad) {
  // Points read with row stride 0 — a shared grid, or per-row points expanded from one row — are
  // read once into the row kernels' scratch and not checked per row, so they are checked here.
  if (a.pts_row_stride == 0) {
    const acc_t* pts = a.points;
    for (int64_t i = 0; i < p.P; ++i) {
      if (!is_finite_value(pts[i * a.pts_col_stride])) check_gmm_values(p);
    }
  }
  const Isa isa = active_isa();
  // The paper's K = 3 (and its neighbours) get unrolled kernels; other K the generic one. Few
  // points per row (and no grid normalisation) put rows across the SIMD lanes instead.
  const bool tiles = !p.normalize && p.P <= kMaxTilePoints && p.K >= 2 && p.K <= 4;
  at::parallel_for(0, p.B, tiles ? std::max<int64_t>(grain_for(p), 64) : grain_for(p), [&](int64_t b0, int64_t b1) {
    const std::bool_constant<kBackward> dir{};
    switch (tiles ? p.K : -p.K) {
      case 2: gmm_tiles_isa(isa, dir, std::integral_constant<int, 2>{}, a, b0, b1); break;
      case 3: gmm_tiles_isa(isa, dir, std::integral_constant<int, 3>{}, a, b0, b1); break;
      case 4: gmm_tiles_isa(isa, dir, std::integral_constant<int, 4>{}, a, b0, b1); break;
      case -2: gmm_rows_isa(isa, dir, std::integral_constant<int, 2>{}, a, b0, b1); break;
      case -3: gmm_rows_isa(isa, dir, std::integral_constant<int, 3>{}, a, b0, b1); break;
      case -4: gmm_rows_isa(isa, dir, std::integral_constant<int, 4>{}, a, b0, b1); break;
      default: gmm_rows_isa(isa, dir, std::integral_constant<int, 0>{}, a, b0, b1); break;
    }
  });
  const int64_t bad = first_bad.load();
  if (bad < p.B) {
    check_gmm_values(p);
    TORCH_CHECK(false, "gmm_nll: invalid parameter, point or weight value in row ", bad);
  }
}

std::tuple<at::Tensor, at::Tensor> gmm_nll_cpu(const at::Tensor& logits, const at::Tensor& mu,
                                               const at::Tensor& log_sigma, const at::Tensor& points,
                                               const std::optional<at::Tensor>& weights, bool normalize_grid) {
  const GmmInputs p = prepare_gmm(logits, mu, log_sigma, points, weights, normalize_grid);
  const auto acc = opmath_dtype(logits);
  at::Tensor loss = at::empty({p.B}, logits.options().dtype(acc));
  at::Tensor total = at::empty({p.B}, logits.options().dtype(acc));
  if (p.B == 0) return {loss, total};
  const at::Tensor l = p.logits.to(acc), m = p.mu.to(acc), s = p.log_sigma.to(acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "gmm_nll_cpu", [&] {
    std::atomic<int64_t> first_bad{p.B};
    auto a = make_gmm_args<scalar_t>(p, l, m, s);
    a.first_bad = &first_bad;
    a.loss = loss.mutable_data_ptr<scalar_t>();
    a.total = total.mutable_data_ptr<scalar_t>();
    run_rows<false>(p, a, first_bad);
  });
  return {loss, total};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gmm_nll_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& mu, const at::Tensor& log_sigma,
    const at::Tensor& points, const std::optional<at::Tensor>& weights, bool normalize_grid) {
  const GmmInputs p = prepare_gmm(logits, mu, log_sigma, points, weights, normalize_grid);
  const at::Tensor g = checked_gmm_grad_rows(grad_rows, p);
  const auto acc = opmath_dtype(logits);
  at::Tensor dl = at::empty({p.B, p.K}, logits.options().dtype(acc));
  at::Tensor dm = at::empty({p.B, p.K}, logits.options().dtype(acc));
  at::Tensor ds = at::empty({p.B, p.K}, logits.options().dtype(acc));
  if (p.B > 0) {
    const at::Tensor l = p.logits.to(acc), m = p.mu.to(acc), s = p.log_sigma.to(acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "gmm_nll_backward_cpu", [&] {
      std::atomic<int64_t> first_bad{p.B};
      auto a = make_gmm_args<scalar_t>(p, l, m, s);
      a.first_bad = &first_bad;
      a.grad_rows = g.const_data_ptr<scalar_t>();
      a.dlogits = dl.mutable_data_ptr<scalar_t>();
      a.dmu = dm.mutable_data_ptr<scalar_t>();
      a.dlog_sigma = ds.mutable_data_ptr<scalar_t>();
      run_rows<true>(p, a, first_bad);
    });
  }
  const auto out = logits.scalar_type();
  return {dl.to(out), dm.to(out), ds.to(out)};
}

}  // namespace
}  // namespace prefcore::cpu

TORCH_LIBRARY_IMPL(prefcore, CPU, m) {
  m.impl("gmm_nll", &prefcore::cpu::gmm_nll_cpu);
  m.impl("_gmm_nll_backward", &prefcore::cpu::gmm_nll_backward_cpu);
}
