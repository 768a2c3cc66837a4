"""prefcore.ops.gmm_nll against the reference, an independent scipy computation, fp64 gradcheck,
the stability range, a maximum-likelihood fit, and every bad input (DESIGN §3.2).

Tolerances: float64 results match the float64 reference to 1e-10 (rel) / 1e-12 (abs); float32
to 1e-5 / 1e-5 (different summation order and exp/log implementations only). For bfloat16 /
float16 parameters, flash-attention's rule: our error against the float64 truth is at most 2×
the error of the reference run in that dtype (+ slack).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

import prefcore
from prefcore.ops import reference as ref
from python_tests.helpers import DEVICES, DTYPES, assert_within_lowp_rule, noncontiguous, run_in_every_cpu_isa

TIGHT = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}

# (parameter shape (*, K), points shape: (G,) shared grid or (*, N) per-row points).
SHAPES = [
    ((0, 3), (7,)),          # empty batch
    ((1, 1), (1,)),          # K = 1, G = 1
    ((5, 1), (9,)),          # K = 1
    ((7, 3), (201,)),        # the DFL grid size (odd)
    ((4, 5, 3), (13,)),      # leading dims, shared grid
    ((6, 3), (6, 1)),        # N = 1 per-row point
    ((9, 4), (9, 10)),       # per-row annotator scores
    ((2, 3, 2), (2, 3, 7)),  # leading dims, per-row points
    ((3, 5), (17,)),         # a K without an unrolled CPU kernel
    ((3, 11), (3, 5)),       # K > 8: several component chunks in the CUDA backward
    ((37, 3), (37, 10)),     # CPU: rows across SIMD lanes (2 full float tiles + a partial one)
    ((21, 2), (5,)),         # ... with a small shared grid
    ((19, 4), (19, 3)),
]


# normalize_grid only with a shared grid (the per-row combination is an error, tested below).
CASES = [(p, x, False) for p, x in SHAPES] + [(p, x, True) for p, x in SHAPES if len(x) == 1]


def _inputs(pshape, xshape, seed=0, weighted=True):
    """float64 parameters, points and (optionally) weights with a zero row and zero entries."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(pshape, generator=g, dtype=torch.float64)
    mu = 0.6 * torch.randn(pshape, generator=g, dtype=torch.float64)
    log_sigma = 0.3 * torch.randn(pshape, generator=g, dtype=torch.float64) - 0.7
    if len(xshape) == 1:
        points = torch.linspace(-2.0, 2.0, xshape[0], dtype=torch.float64) if xshape[0] > 1 else torch.zeros(1, dtype=torch.float64)
    else:
        points = torch.randn(xshape, generator=g, dtype=torch.float64)
    weights = None
    if weighted:
        weights = torch.rand(pshape[:-1] + xshape[-1:], generator=g, dtype=torch.float64)
        weights[torch.rand(weights.shape, generator=g) < 0.2] = 0.0
        flat = weights.view(-1, xshape[-1])
        if flat.shape[0] > 1:
            flat[1] = 0.0  # an all-zero row: loss 0, left out of "mean"
    return logits, mu, log_sigma, points, weights


def _grads(out, params):
    if out.numel() == 0 or all(p.numel() == 0 for p in params):
        return tuple(torch.zeros_like(p) for p in params)
    return torch.autograd.grad(out.sum(), params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pshape,xshape,normalize", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_gmm_matches_reference(device, dtype, pshape, xshape, normalize, weighted):
    logits, mu, log_sigma, points, weights = _inputs(pshape, xshape, weighted=weighted)
    for reduction in ("none", "mean", "sum"):
        params = [t.to(device=device, dtype=dtype).requires_grad_() for t in (logits, mu, log_sigma)]
        pts = points.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
        w = weights.to(device=device, dtype=pts.dtype) if weights is not None else None
        out = prefcore.ops.gmm_nll(*params, pts, w, normalize_grid=normalize, reduction=reduction)
        assert out.dtype == dtype
        assert out.shape == (pshape[:-1] if reduction == "none" else ())
        grads = _grads(out, params)
        # truth: the reference in float64 on the same (rounded) parameters and points
        p64 = [p.detach().cpu().double().requires_grad_() for p in params]
        truth = ref.gmm_nll(*p64, pts.cpu().double(), w.cpu().double() if w is not None else None,
                            normalize_grid=normalize, reduction=reduction)
        g_truth = _grads(truth, p64)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        if dtype in TIGHT:
            torch.testing.assert_close(out.cpu().double(), truth, **TIGHT[dtype])
            for a, t in zip(grads, g_truth):
                torch.testing.assert_close(a.cpu().double(), t, **TIGHT[dtype])
        else:
            pl = [p.detach().cpu().requires_grad_() for p in params]
            base = ref.gmm_nll(*pl, pts.cpu().to(dtype), w.cpu().to(dtype) if w is not None else None,
                               normalize_grid=normalize, reduction=reduction)
            assert_within_lowp_rule(out.cpu(), base, truth, dtype)
            for a, b, t in zip(grads, _grads(base, pl), g_truth):
                assert_within_lowp_rule(a.cpu(), b, t, dtype)


def test_gmm_matches_scipy():
    # Independent maths: scipy's normal log-pdf, log-softmax and logsumexp in numpy float64.
    logits, mu, log_sigma, grid, weights = _inputs((11, 3), (41,), seed=3)
    lg, m, s, x, w = (t.numpy() for t in (logits, mu, log_sigma, grid, weights))
    log_pi = lg - scipy.special.logsumexp(lg, axis=-1, keepdims=True)
    comp = log_pi[:, :, None] + scipy.stats.norm.logpdf(x[None, None, :], loc=m[:, :, None], scale=np.exp(s)[:, :, None])
    log_p = scipy.special.logsumexp(comp, axis=1)  # (B, G)
    totals = w.sum(-1)
    wbar = np.where(totals[:, None] > 0, w / np.where(totals > 0, totals, 1.0)[:, None], 0.0)
    expected = -(wbar * log_p).sum(-1)
    log_q = log_p - scipy.special.logsumexp(log_p, axis=-1, keepdims=True)
    expected_norm = -(wbar * log_q).sum(-1)
    for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 2e-5)):
        args = [t.to(dtype) for t in (logits, mu, log_sigma, grid, weights)]
        out = prefcore.ops.gmm_nll(*args, reduction="none").double().numpy()
        np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
        out_n = prefcore.ops.gmm_nll(*args, normalize_grid=True, reduction="none").double().numpy()
        np.testing.assert_allclose(out_n, expected_norm, rtol=tol, atol=tol)
    # per-row raw scores, uniform weights: the mean negative log-likelihood of each row's scores
    scores = torch.randn(11, 8, dtype=torch.float64)
    comp = log_pi[:, :, None] + scipy.stats.norm.logpdf(scores.numpy()[:, None, :], loc=m[:, :, None], scale=np.exp(s)[:, :, None])
    expected = -scipy.special.logsumexp(comp, axis=1).mean(-1)
    out = prefcore.ops.gmm_nll(logits, mu, log_sigma, scores, reduction="none").numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-11)


def test_gmm_noncontiguous_and_broadcast_weights():
    logits, mu, log_sigma, _, _ = _inputs((6, 4, 3), (9,))
    grid = torch.linspace(-1.5, 1.5, 9, dtype=torch.float64)
    w_grid = torch.rand(9, dtype=torch.float64)
    params = [noncontiguous(t).requires_grad_() for t in (logits, mu, log_sigma)]
    for w in (w_grid, w_grid.expand(4, 9), noncontiguous(torch.rand(6, 4, 9, dtype=torch.float64)), torch.rand(6, 1, 9, dtype=torch.float64)):
        out = prefcore.ops.gmm_nll(*params, noncontiguous(grid), w, reduction="none")
        p64 = [t.clone().requires_grad_() for t in (logits, mu, log_sigma)]
        truth = ref.gmm_nll(*p64, grid, w.expand(6, 4, 9).contiguous(), reduction="none")
        torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(truth.sum(), p64)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    scores = noncontiguous(torch.randn(6, 4, 5, dtype=torch.float64))
    out = prefcore.ops.gmm_nll(*params, scores, torch.rand(5, dtype=torch.float64).expand(6, 4, 5))
    assert torch.isfinite(out)
    # the backward op alone, with a non-contiguous upstream gradient
    l2, m2, s2 = (t.reshape(24, 3) for t in (logits, mu, log_sigma))
    g_rows = noncontiguous(torch.rand(24, dtype=torch.float64))
    got = torch.ops.prefcore._gmm_nll_backward(g_rows, l2, m2, s2, grid, None, False)
    p64 = [t.clone().requires_grad_() for t in (l2, m2, s2)]
    want = torch.autograd.grad((ref.gmm_nll(*p64, grid, reduction="none") * g_rows).sum(), p64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["grid", "grid+normalize", "points"])
def test_gmm_gradcheck(mode):
    if mode == "points":
        logits, mu, log_sigma, pts, w = _inputs((4, 3), (4, 6), seed=5)
    else:
        logits, mu, log_sigma, pts, w = _inputs((4, 3), (11,), seed=5)
    params = tuple(t.requires_grad_() for t in (logits, mu, log_sigma))
    normalize = mode == "grid+normalize"
    for weights in (w, None):
        fn = lambda a, b, c: prefcore.ops.gmm_nll(a, b, c, pts, weights, normalize_grid=normalize, reduction="none")  # noqa: E731
        assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7)


def test_gmm_zero_weight_rows():
    logits, mu, log_sigma, grid, _ = _inputs((4, 3), (15,))
    params = [t.requires_grad_() for t in (logits, mu, log_sigma)]
    w = torch.zeros(4, 15, dtype=torch.float64)
    loss = prefcore.ops.gmm_nll(*params, grid, w)
    grads = torch.autograd.grad(loss, params)
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)
    w[1:] = torch.rand(3, 15, dtype=torch.float64)
    rows = prefcore.ops.gmm_nll(*params, grid, w, reduction="none")
    assert rows[0].item() == 0.0
    torch.testing.assert_close(prefcore.ops.gmm_nll(*params, grid, w), rows[1:].mean())
    torch.testing.assert_close(prefcore.ops.gmm_nll(*params, grid, w, reduction="sum"), rows.sum())
    # weights are normalised per row: scaling a row does not change its loss
    torch.testing.assert_close(prefcore.ops.gmm_nll(*params, grid, w * 1e3, reduction="none"), rows)


def test_gmm_stability_tiny_and_huge_sigma_far_points_float32():
    # σ from 1e-6 to 1e4 and points 1e3 away from every component: finite loss and gradients in
    # float32, matching the float64 reference.
    sig = torch.tensor([[1e-6, 1.0, 1e4], [1e-6, 1e-6, 1e-6], [1e4, 1e4, 1e4]], dtype=torch.float64)
    mu = torch.tensor([[0.0, 5.0, -3.0], [1.0, -1.0, 0.5], [2.0, 0.0, -2.0]], dtype=torch.float64)
    logits = torch.tensor([[0.1, -0.4, 0.3], [0.0, 1.0, -1.0], [2.0, 0.0, 0.5]], dtype=torch.float64)
    cases = [
        (torch.linspace(1000.0, 1010.0, 21, dtype=torch.float64), torch.rand(3, 21, dtype=torch.float64), False),
        (torch.linspace(-1010.0, -1000.0, 21, dtype=torch.float64), None, True),
        (torch.tensor([[1005.0, -1003.0, 1002.5]] * 3, dtype=torch.float64), None, False),
        (torch.tensor([[0.0, 5.0, -3.0]] * 3, dtype=torch.float64), None, False),  # points at the means
    ]
    for pts, w, normalize in cases:
        p32 = [t.float().requires_grad_() for t in (logits, mu, sig.log())]
        out = prefcore.ops.gmm_nll(*p32, pts.float(), w.float() if w is not None else None, normalize_grid=normalize, reduction="none")
        grads = torch.autograd.grad(out.sum(), p32)
        assert torch.isfinite(out).all(), out
        assert all(torch.isfinite(g).all() for g in grads), grads
        p64 = [t.detach().double().requires_grad_() for t in p32]
        truth = ref.gmm_nll(*p64, pts.float().double(), w.float().double() if w is not None else None,
                            normalize_grid=normalize, reduction="none")
        torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-4)
        for a, b in zip(grads, torch.autograd.grad(truth.sum(), p64)):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))


def test_gmm_underflow_is_loud_not_nan():
    # Beyond the representable range (|x − μ|/σ > 1e19 in float32 for every component) a point
    # with positive weight gives +inf; a zero-weight point there contributes nothing.
    logits, mu = torch.zeros(1, 2), torch.zeros(1, 2)
    log_sigma = torch.full((1, 2), math.log(1e-20), requires_grad=True)
    pts = torch.tensor([0.0, 5.0])
    out = prefcore.ops.gmm_nll(logits, mu, log_sigma, pts, torch.tensor([1.0, 1.0]))
    assert out.item() == math.inf
    out0 = prefcore.ops.gmm_nll(logits, mu, log_sigma, pts, torch.tensor([1.0, 0.0]))
    (g,) = torch.autograd.grad(out0, log_sigma)
    assert torch.isfinite(out0) and torch.isfinite(g).all()
    torch.testing.assert_close(out0, ref.gmm_nll(logits.double(), mu.double(), log_sigma.detach().double(), pts[:1].double()).float())


def _sample_mixture(n: int, gen: torch.Generator) -> torch.Tensor:
    comp = torch.rand(n, generator=gen) < TRUE_PI[0]
    draws = torch.where(comp, TRUE_MU[0] + TRUE_SIGMA[0] * torch.randn(n, generator=gen),
                        TRUE_MU[1] + TRUE_SIGMA[1] * torch.randn(n, generator=gen))
    return draws.double()


TRUE_PI, TRUE_MU, TRUE_SIGMA = (0.35, 0.65), (-0.45, 0.35), (0.12, 0.2)


@pytest.mark.parametrize("mode", ["raw scores", "grid histogram"])
def test_adam_on_gmm_nll_recovers_a_bimodal_mixture(mode):
    # Scores drawn from 0.35·N(−0.45, 0.12²) + 0.65·N(0.35, 0.2²). Adam on gmm_nll (the raw
    # scores as per-row points, or their histogram on a 201-point grid over [−1.5, 1.5] with
    # normalize_grid) recovers the weights to ±0.03 and the means and σ's to ±0.03 (sampling
    # error at n = 4000 is ~0.005).
    gen = torch.Generator().manual_seed(7)
    scores = _sample_mixture(4000, gen)
    if mode == "raw scores":
        points, weights, normalize = scores[None], None, False
    else:
        points = torch.linspace(-1.5, 1.5, 201, dtype=torch.float64)
        idx = torch.bucketize(scores, (points[1:] + points[:-1]) / 2)
        weights = torch.bincount(idx, minlength=201).double()[None]
        normalize = True
    logits = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    mu = torch.tensor([[-0.1, 0.1]], dtype=torch.float64, requires_grad=True)
    log_sigma = torch.full((1, 2), math.log(0.5), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits, mu, log_sigma], lr=0.03)
    for _ in range(800):
        opt.zero_grad()
        prefcore.ops.gmm_nll(logits, mu, log_sigma, points, weights, normalize_grid=normalize).backward()
        opt.step()
    pi = torch.softmax(logits.detach(), -1)[0]
    assert pi.tolist() == pytest.approx(TRUE_PI, abs=0.03)
    assert mu.detach()[0].tolist() == pytest.approx(TRUE_MU, abs=0.03)
    assert log_sigma.detach()[0].exp().tolist() == pytest.approx(TRUE_SIGMA, abs=0.03)


# ---- torch.library / torch.compile ---------------------------------------------------------

def test_opcheck_gmm_ops():
    logits, mu, log_sigma, grid, w = _inputs((5, 3), (9,))
    f32 = [t.float() for t in (logits, mu, log_sigma, grid, w)]
    l, m, s, x, ww = f32
    for normalize in (False, True):
        for weights in (ww, None):
            torch.library.opcheck(torch.ops.prefcore.gmm_nll,
                                  (l.clone().requires_grad_(), m.clone().requires_grad_(), s.clone().requires_grad_(), x, weights, normalize))
    scores = torch.randn(5, 4)
    torch.library.opcheck(torch.ops.prefcore.gmm_nll, (l.clone().requires_grad_(), m.clone().requires_grad_(), s.clone().requires_grad_(), scores, None, False))
    torch.library.opcheck(torch.ops.prefcore._gmm_nll_backward, (torch.rand(5), l, m, s, x, ww, True))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def objective(logits, mu, log_sigma, grid, hist, scores):
        return (prefcore.ops.gmm_nll(logits, mu, log_sigma, grid, hist, normalize_grid=True)
                + prefcore.ops.gmm_nll(logits, mu, log_sigma, scores, reduction="sum"))

    logits, mu, log_sigma, grid, hist = (t.float() for t in _inputs((8, 3), (21,)))
    params = [t.requires_grad_() for t in (logits, mu, log_sigma)]
    scores = torch.randn(8, 10)
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    out_c = compiled(*params, grid, hist, scores)
    grads_c = torch.autograd.grad(out_c, params)
    out_e = objective(*params, grid, hist, scores)
    grads_e = torch.autograd.grad(out_e, params)
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_every_cpu_isa_clone_matches_reference():
    script = (
        "import torch, prefcore\n"
        "from prefcore.ops import reference as ref\n"
        "torch.manual_seed(0)\n"
        "l, m = torch.randn(37, 3), torch.randn(37, 3)\n"
        "s = 0.3 * torch.randn(37, 3) - 0.5\n"
        "grid, w, pts = torch.linspace(-2, 2, 41), torch.rand(37, 41), torch.randn(37, 10)\n"
        "for dt in (torch.float32, torch.float64):\n"
        "  for x, ww, nz in ((grid, w, False), (grid, None, True), (pts, None, False)):\n"
        "    p = [t.to(dt).requires_grad_() for t in (l, m, s)]\n"
        "    a = prefcore.ops.gmm_nll(*p, x.to(dt), ww.to(dt) if ww is not None else None, normalize_grid=nz)\n"
        "    q = [t.double().requires_grad_() for t in (l, m, s)]\n"
        "    b = ref.gmm_nll(*q, x.double(), ww.double() if ww is not None else None, normalize_grid=nz)\n"
        "    assert abs(a.item() - b.item()) < 1e-5, (dt, a, b)\n"
        "    for ga, gb in zip(torch.autograd.grad(a, p), torch.autograd.grad(b, q)):\n"
        "      assert (ga.double() - gb).abs().max() < 1e-5\n"
        "# issue 14 rows 2 and 8 in this clone: expanded per-row points are checked; a one-point grid is 0\n"
        "try:\n"
        "  prefcore.ops.gmm_nll(l[:3], m[:3], s[:3], torch.tensor([[0.0] * 9 + [float('nan')]]).expand(3, 10))\n"
        "  raise AssertionError('NaN points accepted')\n"
        "except RuntimeError as e:\n"
        "  assert 'points must be finite' in str(e), e\n"
        "one = prefcore.ops.gmm_nll(l[:1], m[:1], s[:1] - 2, torch.tensor([50.0]), torch.tensor([[0.05]]), normalize_grid=True)\n"
        "assert one.item() == 0.0, one\n"
        "print(prefcore._C.cpu_isa())\n"
    )
    assert "default" in run_in_every_cpu_isa(script)


# ---- bad input -----------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    logits, mu, log_sigma, grid, w = (t.float() for t in _inputs((4, 3), (9,)))
    nll = prefcore.ops.gmm_nll
    scores = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"mu must have the shape of logits \(\*, K\) = \(4, 3\), got \(4, 2\)"):
        nll(logits, mu[:, :2], log_sigma, grid)
    with pytest.raises(ValueError, match=r"log_sigma must have the shape of logits \(\*, K\) = \(4, 3\), got \(4, 4\)"):
        nll(logits, mu, torch.zeros(4, 4), grid)
    with pytest.raises(ValueError, match=r"mu must have the dtype of logits \(torch.float32\), got torch.float64"):
        nll(logits, mu.double(), log_sigma, grid)
    with pytest.raises(ValueError, match=r"logits must be a floating tensor"):
        nll(logits.long(), mu, log_sigma, grid)
    with pytest.raises(ValueError, match=r"logits must have at least one component \(K >= 1\)"):
        nll(torch.zeros(4, 0), torch.zeros(4, 0), torch.zeros(4, 0), grid)
    with pytest.raises(ValueError, match=r"points must have shape \(G,\) .* or \(\*, N\) = \(4, N\) .* got \(5, 6\)"):
        nll(logits, mu, log_sigma, torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"points must hold at least one point per row, got shape \(0,\)"):
        nll(logits, mu, log_sigma, torch.zeros(0))
    with pytest.raises(ValueError, match=r"weights must be broadcastable to \(4, G\) = \(4, 9\), got \(4, 8\)"):
        nll(logits, mu, log_sigma, grid, w[:, :8])
    with pytest.raises(ValueError, match=r"weights must be broadcastable to \(4, N\) = \(4, 6\), got \(4, 9\)"):
        nll(logits, mu, log_sigma, scores, w)
    with pytest.raises(ValueError, match=r"normalize_grid=True needs one grid shared by all rows .* got per-row points of shape \(4, 6\)"):
        nll(logits, mu, log_sigma, scores, normalize_grid=True)
    with pytest.raises(ValueError, match=r"normalize_grid must be a bool, got int"):
        nll(logits, mu, log_sigma, grid, normalize_grid=1)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        nll(logits, mu, log_sigma, grid, reduction="avg")
    with pytest.raises(ValueError, match=r"points must be on the same device as logits"):
        nll(logits, mu, log_sigma, grid.to("meta"))
    with pytest.raises(TypeError, match=r"points must be a torch.Tensor, got list"):
        nll(logits, mu, log_sigma, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"weights must be a floating tensor"):
        nll(logits, mu, log_sigma, grid, torch.ones(4, 9, dtype=torch.long))

    # value errors come from the kernels: argument, row, column and value
    bad_w = w.clone()
    bad_w[2, 3] = -0.5
    with pytest.raises(RuntimeError, match=r"weights must be finite and non-negative, got -0.5 at row 2 \(point 3\)"):
        nll(logits, mu, log_sigma, grid, bad_w)
    bad_w[2, 3] = float("nan")
    with pytest.raises(RuntimeError, match=r"weights must be finite and non-negative, got nan at row 2 \(point 3\)"):
        nll(logits, mu, log_sigma, grid, bad_w)
    bad_w[2, 3] = float("inf")
    with pytest.raises(RuntimeError, match=r"weights must be finite and non-negative, got inf at row 2 \(point 3\)"):
        nll(logits, mu, log_sigma, scores, bad_w[:, :6])
    with pytest.raises(RuntimeError, match=r"weights must have a finite sum per row .* at row 0"):
        nll(logits, mu, log_sigma, grid, torch.full((4, 9), 3e38))
    for name, idx in (("logits", 0), ("mu", 1), ("log_sigma", 2)):
        for v in (float("nan"), float("inf")):
            args = [logits, mu, log_sigma]
            args[idx] = args[idx].clone()
            args[idx][3, 1] = v
            with pytest.raises(RuntimeError, match=rf"{name} must be finite, got {v} at row 3 \(component 1\)"):
                nll(*args, grid)
    small = log_sigma.clone()
    small[1, 2] = -81.0
    with pytest.raises(RuntimeError, match=r"log_sigma must be >= -80 .* got -81 at row 1 \(component 2\)"):
        nll(logits, mu, small, grid)
    nll(logits, mu, torch.full_like(log_sigma, -80.0), grid)  # the bound itself is accepted
    bad_grid = grid.clone()
    bad_grid[4] = float("inf")
    with pytest.raises(RuntimeError, match=r"points must be finite, got inf at point 4"):
        nll(logits, mu, log_sigma, bad_grid)
    bad_scores = scores.clone()
    bad_scores[1, 5] = float("nan")
    with pytest.raises(RuntimeError, match=r"points must be finite, got nan at row 1 \(point 5\)"):
        nll(logits, mu, log_sigma, bad_scores)

    # the same checks where the CPU kernel puts rows across SIMD lanes (few points, K = 3)
    l37, m37, s37, x37, w37 = (t.float() for t in _inputs((37, 3), (37, 10)))
    for row in (5, 20, 33):  # in the first or second full tile, or in the partial last one
        bad_mu = m37.clone()
        bad_mu[row, 1] = float("nan")
        with pytest.raises(RuntimeError, match=rf"mu must be finite, got nan at row {row} \(component 1\)"):
            nll(l37, bad_mu, s37, x37, w37)
        bad_w = w37.clone()
        bad_w[row, 2] = -1.0
        with pytest.raises(RuntimeError, match=rf"weights must be finite and non-negative, got -1 at row {row} \(point 2\)"):
            nll(l37, m37, s37, x37, bad_w)
        bad_x = x37.clone()
        bad_x[row, 9] = -float("inf")
        with pytest.raises(RuntimeError, match=rf"points must be finite, got -inf at row {row} \(point 9\)"):
            nll(l37, m37, s37, bad_x, w37)
    with pytest.raises(RuntimeError, match=r"weights must have a finite sum per row .* at row 0"):
        nll(l37, m37, s37, x37, torch.full((37, 10), 1e38))

    # the raw ops check what the wrapper normally guarantees
    op = torch.ops.prefcore.gmm_nll
    with pytest.raises(RuntimeError, match=r"weights must have shape \(B, G\) = \(4, 9\) \(already broadcast\), got \[9\]"):
        op(logits, mu, log_sigma, grid, w[0], False)
    with pytest.raises(RuntimeError, match=r"points must have dtype Float \(the accumulation dtype of logits\), got Double"):
        op(logits, mu, log_sigma, grid.double(), None, False)
    with pytest.raises(RuntimeError, match=r"points.size\(0\) must equal logits.size\(0\)"):
        op(logits, mu, log_sigma, scores[:3], None, False)
    with pytest.raises(RuntimeError, match=r"normalize_grid=True needs one grid shared by all rows"):
        op(logits, mu, log_sigma, scores, None, True)
    with pytest.raises(RuntimeError, match=r"mu must have the shape of logits \(B, K\) = \[4, 3\], got \[4, 2\]"):
        op(logits, mu[:, :2], log_sigma, grid, None, False)
    with pytest.raises(RuntimeError, match=r"grad_rows.size\(0\) must equal logits.size\(0\) = 4"):
        torch.ops.prefcore._gmm_nll_backward(torch.ones(3), logits, mu, log_sigma, grid, None, False)
    with pytest.raises(RuntimeError, match=r"grad_rows must have dtype Float"):
        torch.ops.prefcore._gmm_nll_backward(torch.ones(4, dtype=torch.float64), logits, mu, log_sigma, grid, None, False)


# ---- issue 14 regressions --------------------------------------------------------------------

def test_expanded_per_row_points_are_checked_like_contiguous_ones():
    """Row 2: stride-0 per-row points (one row expanded) get the finiteness check, not +inf."""
    logits, mu, log_sigma = torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, 2)
    pts = torch.tensor([[0.0, float("nan")]]).expand(3, 2)
    with pytest.raises(RuntimeError, match=r"points must be finite, got nan at row 0 \(point 1\)"):
        prefcore.ops.gmm_nll(logits, mu, log_sigma, pts)
    with pytest.raises(RuntimeError, match=r"points must be finite, got nan at row 0 \(point 1\)"):
        prefcore.ops.gmm_nll(logits, mu, log_sigma, pts.contiguous())
    with pytest.raises(ValueError, match=r"points must be finite, got nan"):
        ref.gmm_nll(logits, mu, log_sigma, pts)
    # a finite expanded row agrees with its contiguous copy (and the reference)
    good = torch.tensor([[0.3, -1.2]]).expand(3, 2)
    out = prefcore.ops.gmm_nll(logits, mu, log_sigma, good, reduction="none")
    torch.testing.assert_close(out, prefcore.ops.gmm_nll(logits, mu, log_sigma, good.contiguous(), reduction="none"))
    torch.testing.assert_close(out, ref.gmm_nll(logits, mu, log_sigma, good, reduction="none"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalized_one_point_grid_gives_exactly_zero(dtype):
    """Row 8: with G = 1, log q ≡ 0, so the loss is exactly 0 whatever the weight and log p."""
    logits = torch.zeros(1, 1, dtype=dtype, requires_grad=True)
    mu = torch.zeros(1, 1, dtype=dtype, requires_grad=True)
    log_sigma = torch.full((1, 1), -2.3, dtype=dtype, requires_grad=True)
    out = prefcore.ops.gmm_nll(logits, mu, log_sigma, torch.tensor([50.0]), torch.tensor([[0.05]]),
                               normalize_grid=True, reduction="none")
    assert out.item() == 0.0
    out.sum().backward()
    for t in (logits, mu, log_sigma):
        assert t.grad.abs().max().item() == 0.0
    # and a multi-point grid still matches the fp64 reference (per-point log q formulation)
    l, m, s, x, w = _inputs((5, 3), (7,))
    got = prefcore.ops.gmm_nll(l.float(), m.float(), s.float(), x.float() * 20, w.float(),
                               normalize_grid=True, reduction="none")
    want = ref.gmm_nll(l, m, s, x * 20, w, normalize_grid=True, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["grid", "grid+normalize", "points"])
def test_double_backward_gives_the_true_hessian(mode):
    """Row 6: Hessians through gmm_nll are the true ones (fp64 gradgradcheck, and the reference's
    Hessian), not silent zeros."""
    per_row = mode == "points"
    l, m, s, x, w = _inputs((3, 2), (3, 4) if per_row else (5,))
    normalize = mode == "grid+normalize"
    params = [t.clone().requires_grad_() for t in (l, m, s)]
    fn = lambda a, b, c: prefcore.ops.gmm_nll(a, b, c, x, w, normalize_grid=normalize)
    assert torch.autograd.gradgradcheck(fn, params)
    flat = lambda v: fn(*v.reshape(3, 3, 2).unbind(0))
    flat_ref = lambda v: ref.gmm_nll(*v.reshape(3, 3, 2).unbind(0), x, w, normalize_grid=normalize)
    v0 = torch.stack([l, m, s]).reshape(-1)
    h = torch.autograd.functional.hessian(flat, v0)
    h_ref = torch.autograd.functional.hessian(flat_ref, v0)
    assert h.abs().max() > 1e-3
    torch.testing.assert_close(h, h_ref, rtol=1e-8, atol=1e-10)
    # only some parameters requiring grad
    mu_only = m.clone().requires_grad_()
    (g,) = torch.autograd.grad(prefcore.ops.gmm_nll(l, mu_only, s, x, w, normalize_grid=normalize), mu_only,
                               create_graph=True)
    (g_ref,) = torch.autograd.grad(ref.gmm_nll(l, mu_only, s, x, w, normalize_grid=normalize), mu_only,
                                   create_graph=True)
    torch.testing.assert_close(g, g_ref)
    (hh,) = torch.autograd.grad(g.sum(), mu_only)
    (hh_ref,) = torch.autograd.grad(g_ref.sum(), mu_only)
    torch.testing.assert_close(hh, hh_ref)
