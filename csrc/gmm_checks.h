#pragma once
// Argument validation of the Gaussian-mixture op family, shared by the CPU and CUDA launchers.
//
// prepare_gmm checks shapes, dtypes and devices (no data access). check_gmm_values checks the
// values (finite parameters, log σ above kMinLogSigma, finite points, finite non-negative
// weights with a finite row sum) with tensor reductions that work on either device; the CPU
// kernel detects bad values in its own pass and calls it only to produce the message.
#include <ATen/core/Tensor.h>
#include <ATen/ops/any.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>

#include <atomic>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "prefcore/gmm_math.h"

namespace prefcore {

struct GmmInputs {
  at::Tensor logits, mu, log_sigma;  // (B, K), contiguous, the parameters' dtype
  at::Tensor points;                 // (G,) shared or (B, N) per-row, accumulation dtype, any strides
  at::Tensor weights;                // (B, P) accumulation dtype, any strides; undefined = uniform
  int64_t B, K, P;
  bool per_row, normalize;
};

inline GmmInputs prepare_gmm(const at::Tensor& logits, const at::Tensor& mu, const at::Tensor& log_sigma,
                             const at::Tensor& points, const std::optional<at::Tensor>& weights,
                             bool normalize_grid) {
  check_floating(logits, "logits");
  check_dim(logits, 2, "logits");
  const int64_t B = logits.size(0), K = logits.size(1);
  TORCH_CHECK(K >= 1, "logits must have at least one component (K >= 1), got shape ", logits.sizes());
  check_dim(mu, 2, "mu");
  check_dim(log_sigma, 2, "log_sigma");
  TORCH_CHECK(mu.sizes() == logits.sizes(), "mu must have the shape of logits (B, K) = ", logits.sizes(),
              ", got ", mu.sizes());
  TORCH_CHECK(log_sigma.sizes() == logits.sizes(), "log_sigma must have the shape of logits (B, K) = ",
              logits.sizes(), ", got ", log_sigma.sizes());
  check_dtype(mu, logits.scalar_type(), "mu", "the dtype of logits");
  check_dtype(log_sigma, logits.scalar_type(), "log_sigma", "the dtype of logits");
  check_same_device(mu, logits, "mu", "logits");
  check_same_device(log_sigma, logits, "log_sigma", "logits");

  const auto acc = opmath_dtype(logits);
  TORCH_CHECK(points.dim() == 1 || points.dim() == 2,
              "points must be 1-D (G,) (a grid shared by all rows) or 2-D (B, N) (per-row points), got shape ",
              points.sizes());
  const bool per_row = points.dim() == 2;
  if (per_row) check_size(points, 0, B, "points", "logits.size(0) (per-row points (B, N))");
  const int64_t P = points.size(-1);
  TORCH_CHECK(P >= 1, "points must hold at least one point per row, got shape ", points.sizes());
  check_dtype(points, acc, "points", "the accumulation dtype of logits");
  check_same_device(points, logits, "points", "logits");
  TORCH_CHECK(!(normalize_grid && per_row),
              "normalize_grid=True needs one grid shared by all rows (points of shape (G,)), got per-row "
              "points of shape ", points.sizes());

  GmmInputs p{logits.contiguous(), mu.contiguous(), log_sigma.contiguous(), points, at::Tensor(),
              B, K, P, per_row, normalize_grid};
  if (weights.has_value() && weights->defined()) {
    const auto& w = *weights;
    TORCH_CHECK(w.dim() == 2 && w.size(0) == B && w.size(1) == P, "weights must have shape (B, ",
                per_row ? "N" : "G", ") = (", B, ", ", P, ") (already broadcast), got ", w.sizes());
    check_dtype(w, acc, "weights", "the accumulation dtype of logits");
    check_same_device(w, logits, "weights", "logits");
    p.weights = w;
  }
  return p;
}

// "name must be …, got v at row r (column c)" for the first element of `bad` (a bool mask of t).
inline std::string describe_first(const at::Tensor& t, const at::Tensor& bad, const char* name,
                                  const char* what, const char* col_name) {
  const at::Tensor idx = at::nonzero(bad).select(0, 0).cpu();
  std::ostringstream msg;
  msg << name << " must be " << what << ", got ";
  if (t.dim() == 2) {
    const int64_t r = idx[0].item<int64_t>(), c = idx[1].item<int64_t>();
    msg << t.select(0, r).select(0, c).item<double>() << " at row " << r << " (" << col_name << " " << c << ")";
  } else {
    const int64_t c = idx[0].item<int64_t>();
    msg << t.select(0, c).item<double>() << " at " << col_name << " " << c;
  }
  return msg.str();
}

inline at::Tensor nonfinite(const at::Tensor& t) { return at::logical_not(at::isfinite(t)); }

// Raises the first value error of p (parameters, then points, then weights); returns if none.
// Every check is reduced on the tensors' device and the flags are stacked, so a valid input
// costs one host sync (on CUDA); only a failing check syncs again to describe its first value.
inline void check_gmm_values(const GmmInputs& p) {
  const double lo = p.log_sigma.scalar_type() == at::kDouble ? kMinLogSigma<double> : kMinLogSigma<float>;
  const bool weighted = p.weights.defined();
  const at::Tensor bad_w =
      weighted ? nonfinite(p.weights).logical_or_(at::lt(p.weights, 0.0)) : at::Tensor();
  const at::Tensor inf_total = weighted ? nonfinite(at::sum(p.weights, {1})) : at::Tensor();
  std::vector<at::Tensor> flags{nonfinite(p.logits).any(), nonfinite(p.mu).any(), nonfinite(p.log_sigma).any(),
                                at::lt(p.log_sigma, lo).any(), nonfinite(p.points).any()};
  if (weighted) {
    flags.push_back(bad_w.any());
    flags.push_back(inf_total.any());
  }
  const at::Tensor any = at::stack(flags).cpu();  // the one sync
  const bool* f = any.const_data_ptr<bool>();
  if (f[0]) TORCH_CHECK(false, describe_first(p.logits, nonfinite(p.logits), "logits", "finite", "component"));
  if (f[1]) TORCH_CHECK(false, describe_first(p.mu, nonfinite(p.mu), "mu", "finite", "component"));
  if (f[2]) TORCH_CHECK(false, describe_first(p.log_sigma, nonfinite(p.log_sigma), "log_sigma", "finite", "component"));
  if (f[3]) {
    std::ostringstream what;
    what << ">= " << lo << " (1/sigma = exp(-log_sigma) must be finite in the accumulation dtype)";
    TORCH_CHECK(false, describe_first(p.log_sigma, at::lt(p.log_sigma, lo), "log_sigma", what.str().c_str(), "component"));
  }
  if (f[4]) TORCH_CHECK(false, describe_first(p.points, nonfinite(p.points), "points", "finite", "point"));
  if (weighted && f[5]) TORCH_CHECK(false, describe_first(p.weights, bad_w, "weights", "finite and non-negative", "point"));
  if (weighted && f[6]) {
    const int64_t r = at::nonzero(inf_total).select(0, 0).cpu()[0].item<int64_t>();
    TORCH_CHECK(false, "weights must have a finite sum per row (each row is normalised to sum 1), "
                "got a sum that overflows at row ", r);
  }
}

// The upstream gradient of the backward op: (B,) in the accumulation dtype, on logits' device.
inline at::Tensor checked_gmm_grad_rows(const at::Tensor& grad_rows, const GmmInputs& p) {
  check_dim(grad_rows, 1, "grad_rows");
  check_size(grad_rows, 0, p.B, "grad_rows", "logits.size(0)");
  check_dtype(grad_rows, opmath_dtype(p.logits), "grad_rows", "the accumulation dtype of logits");
  check_same_device(grad_rows, p.logits, "grad_rows", "logits");
  return grad_rows.contiguous();
}

// Raw-pointer view of prepared inputs and outputs, shared by the CPU and CUDA kernels (the
// launchers fill the outputs they use; `first_bad` is the CPU kernels' lowest invalid row).
template <typename acc_t>
struct GmmArgs {
  const acc_t* logits;     // (B, K) contiguous
  const acc_t* mu;         // (B, K)
  const acc_t* log_sigma;  // (B, K)
  const acc_t* points;     // shared (G,) (row stride 0) or per-row (B, N)
  int64_t pts_row_stride, pts_col_stride;
  const acc_t* weights;    // (B, P) any strides, or nullptr (uniform)
  int64_t w_row_stride, w_col_stride;
  int64_t B, K, P;
  bool normalize;
  const acc_t* grad_rows;  // (B,) backward only
  acc_t* loss;             // (B,) forward outputs
  acc_t* total;
  acc_t* dlogits;          // (B, K) backward outputs
  acc_t* dmu;
  acc_t* dlog_sigma;
  std::atomic<int64_t>* first_bad;  // CPU: lowest row with an invalid value (B if none)
};

// The input half of GmmArgs for parameters already in the accumulation dtype.
template <typename acc_t>
GmmArgs<acc_t> make_gmm_args(const GmmInputs& p, const at::Tensor& logits, const at::Tensor& mu,
                             const at::Tensor& log_sigma) {
  GmmArgs<acc_t> a{};
  a.logits = logits.const_data_ptr<acc_t>();
  a.mu = mu.const_data_ptr<acc_t>();
  a.log_sigma = log_sigma.const_data_ptr<acc_t>();
  a.points = p.points.const_data_ptr<acc_t>();
  a.pts_row_stride = p.per_row ? p.points.stride(0) : 0;
  a.pts_col_stride = p.points.stride(-1);
  if (p.weights.defined()) {
    a.weights = p.weights.const_data_ptr<acc_t>();
    a.w_row_stride = p.weights.stride(0);
    a.w_col_stride = p.weights.stride(1);
  }
  a.B = p.B;
  a.K = p.K;
  a.P = p.P;
  a.normalize = p.normalize;
  return a;
}

}  // namespace prefcore
