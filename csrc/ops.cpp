// The one schema block for every prefcore operator (DESIGN §2), and the Python module
// `prefcore._C` whose import loads them. Device files hold only TORCH_LIBRARY_IMPL blocks.
// Integer-coded enums: pinball/gmm `reduction` is applied in Python; exp_utility `kind`
// 0 = utility, 1 = certainty equivalent; advantages `estimator` 0..3 = k1,k2,k3,abs and
// `mode` 0..2 = rloo, grpo, gae (the Python wrappers map names to codes).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/isa.h"

TORCH_LIBRARY(prefcore, m) {
  // ---- quantile family (DESIGN §3.1, §3.3) ----
  // pred (R, Q), target (R, N), taus (Q,), target_mask (R, N) bool or None.
  // Returns (row_loss (R,) in opmath dtype, d row_loss / d pred (R, Q) in pred dtype — empty
  // (0,) unless need_grad).
  m.def(
      "pinball_loss(Tensor pred, Tensor target, Tensor taus, Tensor? target_mask, float kappa, "
      "bool need_grad) -> (Tensor, Tensor)");
  m.def(
      "_pinball_loss_backward(Tensor grad_rows, Tensor pred, Tensor target, Tensor taus, "
      "Tensor? target_mask, float kappa) -> Tensor");
  // quantiles (B, Q) or (B, M, Q) with gate (B, M); lam (B,) or (1,). Output (B,).
  m.def("exp_utility(Tensor quantiles, Tensor lam, Tensor? gate, int kind) -> Tensor");
  m.def(
      "_exp_utility_backward(Tensor grad, Tensor quantiles, Tensor lam, Tensor? gate, int kind) "
      "-> (Tensor, Tensor)");

  // ---- Gaussian-mixture family (DESIGN §3.2) ----
  // logits/mu/log_sigma (B, K); points (G,) or (B, N); weights None or (B, G|N) (already
  // broadcast). Returns (row_loss (B,) opmath, row_weight_total (B,) opmath).
  m.def(
      "gmm_nll(Tensor logits, Tensor mu, Tensor log_sigma, Tensor points, Tensor? weights, "
      "bool normalize_grid) -> (Tensor, Tensor)");
  m.def(
      "_gmm_nll_backward(Tensor grad_rows, Tensor logits, Tensor mu, Tensor log_sigma, "
      "Tensor points, Tensor? weights, bool normalize_grid) -> (Tensor, Tensor, Tensor)");

  // ---- KL-penalised advantages (DESIGN §3.4) ----
  // Returns (advantages, returns, token_rewards, kl), all (B, T) float32. No autograd. `outputs`
  // is a bit set (1 advantages — required, 2 returns, 4 token_rewards, 8 kl); the others come
  // back empty, (0,).
  m.def(
      "kl_penalized_advantages(Tensor logprobs, Tensor ref_logprobs, Tensor mask, Tensor scores, "
      "Tensor? values, float kl_coef, int estimator, int mode, int group_size, float gamma, "
      "float lam, bool whiten, float? kl_clamp, int outputs=15) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("masked_whiten(Tensor x, Tensor mask, bool unbiased, bool shift_mean) -> Tensor");

  // ---- fused token log-probs from hidden states × LM head (DESIGN §3.5) ----
  // hidden (N, H), weight (V, H) same dtype, targets (N,) int64/int32, mask (N,) bool or None.
  // Returns (logprobs (N,), entropy (N,) — empty (0,) unless return_entropy —, lse (N,)), all in
  // the accumulation dtype; masked tokens are 0. lse is saved for the backward op.
  m.def(
      "token_logprobs(Tensor hidden, Tensor weight, Tensor targets, Tensor? mask, float temperature, "
      "bool return_entropy) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_hidden (N, H) or (0,), grad_weight (V, H) or (0,)); entropy is read only with
  // grad_entropy.
  m.def(
      "_token_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
      "Tensor targets, Tensor? mask, Tensor lse, Tensor entropy, float temperature, bool need_hidden_grad, "
      "bool need_weight_grad) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "prefcore native operators (registered as torch.ops.prefcore.*)";
  m.def("cpu_isa", [] { return prefcore::cpu::isa_name(prefcore::cpu::active_isa()); },
        "The CPU instruction set the native kernels dispatch to (avx512, avx2 or default).");
  m.def("cuda_built", [] {
#ifdef PREFCORE_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build of prefcore._C contains the CUDA kernels.");
}
