"""Issue 20: the defects a line-by-line review of csrc/cuda/ found, one test per fix.

Each CUDA test is marked ``cuda`` (skipped without a device; ``make gpu-check`` runs them), and
where the same property holds on the CPU the test is parametrised over both devices, so the CPU
half runs in every ``make test``. Expected values come from float64 brute force
(``prefcore.ops.reference``) or closed forms, never from the op under test.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import prefcore
from prefcore.ops import reference as ref

from helpers import DEVICES

cuda = pytest.mark.cuda


def _rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    """‖out − truth‖ / ‖truth‖ in float64 (Frobenius)."""
    d = out.double().cpu() - truth.double().cpu()
    return (d.norm() / truth.double().cpu().norm()).item()


# ---- token_logprobs: dz in float32 for every input dtype ----------------------------------------

@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_token_logprobs_mean_loss_keeps_tiny_dz(dtype):
    # V = 32k, 4096 valid tokens, mean loss: dz = −p·(1/n) ≈ 1/(V·n) ≈ 7e-9, below float16's
    # smallest subnormal (6e-8). Written in fp16 it is 0: grad_hidden loses −E_p[W] and the
    # non-target rows of grad_weight are 0. A common offset on W and h makes both terms large.
    g = torch.Generator().manual_seed(0)
    n, h, v = 4096, 64, 32768
    hidden = (1.0 + 0.5 * torch.randn(n, h, generator=g, dtype=torch.float64)).to(dtype)
    weight = (0.5 + 0.05 * torch.randn(v, h, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    hd, wd = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_()
    gh, gw = torch.autograd.grad(prefcore.ops.token_logprobs(hd, wd, targets.cuda()).mean(), (hd, wd))
    h64, w64 = hidden.double().cuda().requires_grad_(), weight.double().cuda().requires_grad_()
    th, tw = torch.autograd.grad(ref.token_logprobs(h64, w64, targets.cuda()).mean(), (h64, w64))
    assert gh.dtype == dtype and gw.dtype == dtype
    assert _rel_err(gh, th) < 2e-2
    non_target = torch.ones(v, dtype=torch.bool)
    non_target[targets] = False
    assert (tw[non_target.cuda()].abs() > 0).all()  # the truth has them; the old kernel wrote 0
    assert _rel_err(gw[non_target.cuda()], tw[non_target.cuda()]) < 5e-2
    assert _rel_err(gw, tw) < 2e-2


@cuda
def test_cuda_token_logprobs_fp32_is_full_fp32_by_default():
    # TF32 keeps 10 mantissa bits (~5e-4 relative per product): at H = 1024 and logits of a few
    # units its error is ~1e-3, float32's ~1e-6. The default (allow_tf32 False) must be float32.
    assert not torch.backends.cuda.matmul.allow_tf32
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(256, 1024, generator=g, dtype=torch.float64)
    weight = torch.randn(4096, 1024, generator=g, dtype=torch.float64) / 16
    targets = torch.randint(0, 4096, (256,), generator=g)
    lp = prefcore.ops.token_logprobs(hidden.float().cuda(), weight.float().cuda(), targets.cuda())
    truth = ref.token_logprobs(hidden.float().double(), weight.float().double(), targets)
    assert (lp.cpu().double() - truth).abs().max().item() < 1e-4


# ---- GAE: float64 whitening of float64 advantages ------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_gae_float64_whiten_reads_float64_advantages(device):
    # γ = λ = 1, no KL: A_t = score − V_t over valid tokens. V_t = −1e5 + 1e-3·noise puts the
    # spread (1e-3) below float32's spacing at 1e5 (0.0078): whitening float-rounded advantages
    # would return mostly rounding noise; the fp64 truth is the whitened noise itself.
    g = torch.Generator().manual_seed(2)
    b, t = 6, 80
    mask = torch.rand(b, t, generator=g) > 0.2
    values = -1e5 + 1e-3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    scores = torch.randn(b, generator=g, dtype=torch.float64) * 1e-3
    lp = torch.zeros(b, t, dtype=torch.float64)
    kw = dict(kl_coef=0.0, mode="gae", values=values, gamma=1.0, lam=1.0, whiten=True)
    truth = ref.kl_penalized_advantages(lp, lp, mask, scores, **kw).advantages
    dev_kw = {**kw, "values": values.to(device)}
    out = prefcore.ops.kl_penalized_advantages(lp.to(device), lp.to(device), mask.to(device), scores.to(device), **dev_kw)
    assert out.advantages.dtype == torch.float32
    assert truth[mask].std().item() > 0.5  # whitened: O(1) values, not collapsed by eps
    torch.testing.assert_close(out.advantages.cpu().double(), truth, rtol=1e-5, atol=1e-5)


# ---- pinball: a row with no valid target gets gradient 0 even for an inf upstream gradient -------

@pytest.mark.parametrize("device", DEVICES)
def test_pinball_no_valid_target_row_has_zero_grad_under_inf_upstream(device):
    pred = torch.randn(3, 4, device=device, requires_grad=True)
    target = torch.randn(3, 5, device=device)
    mask = torch.ones(3, 5, dtype=torch.bool, device=device)
    mask[1] = False
    taus = torch.tensor([0.1, 0.4, 0.6, 0.9], device=device)
    loss = prefcore.ops.pinball_loss(pred, target, taus, mask, reduction="none")
    assert loss[1].item() == 0.0
    up = torch.tensor([1.0, float("inf"), 2.0], device=device)
    (grad,) = torch.autograd.grad(loss, pred, up)
    assert (grad[1] == 0).all()  # not inf·0 = NaN
    # The backward op itself (the path taken when the forward did not fuse the gradient).
    direct = torch.ops.prefcore._pinball_loss_backward(up, pred.detach(), target, taus, mask, 0.0)
    assert (direct[1] == 0).all()
    torch.testing.assert_close(direct[[0, 2]], grad[[0, 2]])
    p64 = pred.detach().double().requires_grad_()
    truth = ref.pinball_loss(p64, target.double(), taus.double(), mask, reduction="none")
    (tg,) = torch.autograd.grad(truth[[0, 2]], p64, up[[0, 2]].double())
    torch.testing.assert_close(grad[[0, 2]].cpu().double(), tg[[0, 2]].cpu(), rtol=1e-5, atol=1e-6)


# ---- gmm_nll: one-point normalised grid has loss 0 and gradient 0 --------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gmm_one_point_grid_normalized_has_zero_gradient(device, dtype):
    # q = p(x)/Σ_g p(x_g) ≡ 1 for a one-point grid: the loss −log q is 0 for every parameter
    # value, so its gradient is exactly 0 (the fuzz found d log_sigma = −0.012 at log_sigma = −2).
    logits = torch.tensor([[0.3, -1.2, 0.5], [2.0, 0.1, -0.4]], dtype=dtype, device=device, requires_grad=True)
    mu = torch.tensor([[-1.0, 0.5, 3.0], [0.0, 7.0, -2.0]], dtype=dtype, device=device, requires_grad=True)
    log_sigma = torch.full((2, 3), -2.0, dtype=dtype, device=device, requires_grad=True)
    points = torch.tensor([1.7], dtype=dtype, device=device)
    # w · (1/w) ≠ 1 in float32 for w = 1.7 and in float64 for w = 49: the old ω = w̄ − q was
    # rounding noise times ∂log p (measured before the fix: 4.6e-6 and 8.6e-15 here).
    weights = torch.tensor([[1.7], [49.0]], dtype=dtype, device=device)
    loss = prefcore.ops.gmm_nll(logits, mu, log_sigma, points, weights, normalize_grid=True, reduction="none")
    assert (loss == 0).all()
    grads = torch.autograd.grad(loss.sum(), (logits, mu, log_sigma))
    for name, gr in zip(("logits", "mu", "log_sigma"), grads):
        assert (gr == 0).all(), f"d {name} = {gr}"


# ---- exp_utility: lam on the meta device ---------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_exp_utility_meta_lam_is_named(device):
    q = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match=r"^lam must be on the same device as quantiles .* got meta$"):
        prefcore.ops.exp_utility(q, torch.ones(3, device="meta"))


def test_exp_utility_meta_inputs_give_shapes():
    out = prefcore.ops.exp_utility(torch.empty(3, 8, device="meta"), torch.ones(3, device="meta"))
    assert out.shape == (3,) and out.is_meta


# ---- shared memory: sizes beyond the 48 KiB default run on the GPU -------------------------------

@cuda
@pytest.mark.parametrize("k,dtype", [(1024, torch.float32), (700, torch.float64), (8192, torch.float64)])
def test_cuda_gmm_many_components(k, dtype):
    # K = 1024 (fp32) and 700 (fp64) need more than 48 KiB for 8 rows' components (opt-in);
    # K = 8192 (fp64) needs more than any block has (global scratch).
    g = torch.Generator().manual_seed(k)
    b = 10
    logits = torch.randn(b, k, generator=g, dtype=torch.float64)
    mu = 3 * torch.randn(b, k, generator=g, dtype=torch.float64)
    log_sigma = 0.3 * torch.randn(b, k, generator=g, dtype=torch.float64)
    points = torch.linspace(-6, 6, 97, dtype=torch.float64)
    weights = torch.rand(b, 97, generator=g, dtype=torch.float64)
    args = [x.to("cuda", dtype).requires_grad_() for x in (logits, mu, log_sigma)]
    loss = prefcore.ops.gmm_nll(*args, points.to("cuda", dtype), weights.to("cuda", dtype), normalize_grid=True)
    grads = torch.autograd.grad(loss, args)
    targs = [x.clone().requires_grad_() for x in (logits, mu, log_sigma)]
    tloss = ref.gmm_nll(*targs, points, weights, normalize_grid=True)
    tgrads = torch.autograd.grad(tloss, targs)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert abs(loss.item() - tloss.item()) <= tol * max(1.0, abs(tloss.item()))
    for gr, tg in zip(grads, tgrads):
        assert _rel_err(gr, tg) < tol * 10


@cuda
@pytest.mark.parametrize("q,dtype", [(2048, torch.float32), (20000, torch.float32), (4096, torch.float64)])
@pytest.mark.parametrize("kind", ["ce", "utility"])
def test_cuda_exp_utility_many_quantiles(q, dtype, kind):
    # Q = 2048 fp32 / 4096 fp64: 64 / 256 KiB for 8 rows (opt-in, then global); Q = 20000: global.
    g = torch.Generator().manual_seed(q)
    b, m = 9, 3
    quant = torch.randn(b, m, q, generator=g, dtype=torch.float64)
    gate = torch.rand(b, m, generator=g, dtype=torch.float64)
    lam = torch.rand(b, generator=g, dtype=torch.float64) + 0.1
    qd = quant.to("cuda", dtype).requires_grad_()
    gd = gate.to("cuda", dtype).requires_grad_()
    out = prefcore.ops.exp_utility(qd, lam.to("cuda", dtype), gd, kind=kind)
    grads = torch.autograd.grad(out.sum(), (qd, gd))
    q64, g64 = quant.clone().requires_grad_(), gate.clone().requires_grad_()
    truth = ref.exp_utility(q64, lam, g64, kind=kind)
    tgrads = torch.autograd.grad(truth.sum(), (q64, g64))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert _rel_err(out, truth) < tol
    for gr, tg in zip(grads, tgrads):
        assert _rel_err(gr, tg) < tol * 10


# ---- host syncs: one per call ----------------------------------------------------------------------

def _count_syncs(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in rec)


@cuda
def test_cuda_value_checks_sync_once():
    b, k = 4, 3
    logits, mu, log_sigma = (torch.randn(b, k, device="cuda") for _ in range(3))
    points = torch.randn(b, 6, device="cuda")
    weights = torch.rand(b, 6, device="cuda")
    grad_rows = torch.ones(b, device="cuda")
    ops = torch.ops.prefcore
    assert _count_syncs(lambda: ops.gmm_nll(logits, mu, log_sigma, points, weights, False)) == 1
    assert _count_syncs(lambda: ops._gmm_nll_backward(grad_rows, logits, mu, log_sigma, points, weights, False)) == 1
    pred, target = torch.randn(5, 4, device="cuda"), torch.randn(5, 3, device="cuda")
    taus = torch.tensor([0.1, 0.3, 0.6, 0.9], device="cuda")
    assert _count_syncs(lambda: ops.pinball_loss(pred, target, taus, None, 0.0, False)) == 1
    # A failing check still names the first bad value (the error path may sync again).
    bad = log_sigma.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match=r"log_sigma must be finite, got nan at row 2 \(component 1\)"):
        ops.gmm_nll(logits, mu, bad, points, weights, False)
