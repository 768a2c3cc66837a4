"""prefcore.ops.pinball_loss and prefcore.ops.exp_utility against the reference, closed forms
and independent maths (DESIGN §3.1, §3.3).

Tolerances: float64 results match the float64 reference to 1e-10 (rel) / 1e-12 (abs); float32
to 1e-5 / 1e-6 (different summation order only). For bfloat16/float16, flash-attention's rule:
our error against the float64 truth is at most 2× the reference's error in that dtype (+ slack).
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import prefcore
from prefcore.ops import reference as ref
from python_tests.helpers import DEVICES, DTYPES, assert_within_lowp_rule, noncontiguous, run_in_every_cpu_isa

TAUS19 = torch.linspace(0.05, 0.95, 19)
TIGHT = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}

# (pred shape, target shape): empty batch, Q=1, N=1, odd sizes, leading dims, scalar target.
PINBALL_SHAPES = [
    ((0, 19), (0, 10)),
    ((1, 1), (1, 1)),
    ((5, 1), (5, 7)),
    ((7, 19), (7, 1)),
    ((13, 5), (13, 123)),
    ((3, 4, 19), (3, 4, 10)),
    ((6, 19), (6,)),
    ((2, 3, 7), (2, 3)),
]


def _pinball_inputs(pshape, tshape, dtype, device, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = pshape[-1]
    pred = torch.randn(pshape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    target = torch.randn(tshape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    taus = torch.rand(q, generator=g, dtype=torch.float64).clamp(0.02, 0.98).to(device)
    mask = None
    if masked:
        mask = (torch.rand(tshape, generator=g) > 0.3).to(device)
        if mask.dim() >= 1 and mask.shape[0] > 0:
            mask.view(-1, *(mask.shape[-1:] if len(tshape) == len(pshape) else ()))[0] = False  # an empty row
    return pred, target, taus, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pshape,tshape", PINBALL_SHAPES)
@pytest.mark.parametrize("kappa", [0.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_pinball_matches_reference(device, dtype, pshape, tshape, kappa, masked):
    pred, target, taus, mask = _pinball_inputs(pshape, tshape, dtype, device, masked)
    for reduction in ("none", "mean", "sum"):
        p = pred.clone().requires_grad_()
        out = prefcore.ops.pinball_loss(p, target, taus, mask, kappa=kappa, reduction=reduction)
        assert out.dtype == dtype
        assert out.shape == (pshape[:-1] if reduction == "none" else ())
        p64 = pred.double().requires_grad_()
        truth = ref.pinball_loss(p64, target.double(), taus, mask, kappa=kappa, reduction=reduction)
        (grad,) = torch.autograd.grad(out.sum(), p, allow_unused=False) if p.numel() else (torch.zeros_like(p),)
        (g_truth,) = torch.autograd.grad(truth.sum(), p64) if p.numel() else (torch.zeros_like(p64),)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        if dtype in TIGHT:
            torch.testing.assert_close(out.double(), truth, **TIGHT[dtype])
            torch.testing.assert_close(grad.double(), g_truth, **TIGHT[dtype])
        else:
            pl = pred.clone().requires_grad_()
            base = ref.pinball_loss(pl, target, taus.to(dtype), mask, kappa=kappa, reduction=reduction)
            (g_base,) = torch.autograd.grad(base.sum(), pl) if p.numel() else (torch.zeros_like(pl),)
            assert_within_lowp_rule(out, base, truth, dtype)
            assert_within_lowp_rule(grad, g_base, g_truth, dtype)


@pytest.mark.parametrize("kappa", [0.0, 0.4])
def test_pinball_noncontiguous_and_unfused_backward(kappa):
    pred, target, taus, mask = _pinball_inputs((9, 6, 11), (9, 6, 5), torch.float64, "cpu", True)
    p_nc = noncontiguous(pred).requires_grad_()
    out = prefcore.ops.pinball_loss(p_nc, noncontiguous(target), noncontiguous(taus), mask, kappa=kappa)
    p64 = pred.clone().requires_grad_()
    truth = ref.pinball_loss(p64, target, taus, mask, kappa=kappa)
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out, p_nc)[0], torch.autograd.grad(truth, p64)[0])
    # The standalone backward op (used when the forward ran without grad) gives the same gradient.
    p2 = pred.reshape(-1, 11)
    t2 = target.reshape(-1, 5)
    m2 = mask.reshape(-1, 5)
    g_rows = torch.rand(p2.shape[0], dtype=torch.float64)
    _, dpred = torch.ops.prefcore.pinball_loss(p2, t2, taus, m2, kappa, True)
    unfused = torch.ops.prefcore._pinball_loss_backward(g_rows, p2, t2, taus, m2, kappa)
    torch.testing.assert_close(unfused, g_rows[:, None] * dpred)


def test_pinball_backward_twice_with_retain_graph():
    # The first backward consumes the fused gradient in place; a second one must recompute it.
    pred, target, taus, mask = _pinball_inputs((6, 7), (6, 4), torch.float64, "cpu", True)
    pred.requires_grad_()
    loss = prefcore.ops.pinball_loss(pred, target, taus, mask, kappa=0.3)
    (g1,) = torch.autograd.grad(loss * 2.0, pred, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3.0, pred)
    torch.testing.assert_close(g2, 1.5 * g1)
    p64 = pred.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(ref.pinball_loss(p64, target, taus, mask, kappa=0.3) * 3.0, p64)
    torch.testing.assert_close(g2, g_ref)


def test_pinball_strict_indicator_at_zero():
    # u = 0 exactly: the κ=0 gradient is 1[u<0] − τ = −τ (strict indicator), per DESIGN §3.1.
    pred = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    taus = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    loss = prefcore.ops.pinball_loss(pred, torch.zeros(1, 1, dtype=torch.float64), taus, reduction="sum")
    (g,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(g, -taus[None] / 3)


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_pinball_gradcheck(kappa):
    pred, target, taus, mask = _pinball_inputs((4, 3, 5), (4, 3, 6), torch.float64, "cpu", True)
    pred.requires_grad_()
    fn = lambda p: prefcore.ops.pinball_loss(p, target, taus, mask, kappa=kappa, reduction="none")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("tau", [0.05, 0.3, 0.5, 0.95])
def test_pinball_minimiser_is_empirical_quantile(tau):
    targets = torch.randn(101, dtype=torch.float64)
    candidates = torch.sort(targets).values
    loss = prefcore.ops.pinball_loss(candidates[:, None], targets.expand(101, 101), torch.tensor([tau], dtype=torch.float64),
                                     reduction="none")
    best = candidates[loss.argmin()].item()
    expected = np.quantile(targets.numpy(), tau, method="inverted_cdf")  # t_(ceil(N·tau)), unique for N·tau ∉ ℤ
    assert best == pytest.approx(expected, abs=0)


def test_pinball_all_rows_masked_gives_zero_not_nan():
    pred = torch.randn(4, 5, requires_grad=True)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    loss = prefcore.ops.pinball_loss(pred, torch.randn(4, 3), TAUS19[:5], mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(pred.grad) == 0
    # an empty row is excluded from the mean: the mean equals the mean over the valid rows only
    mask[1:] = True
    target = torch.randn(4, 3)
    mean = prefcore.ops.pinball_loss(pred, target, TAUS19[:5], mask)
    rows = prefcore.ops.pinball_loss(pred, target, TAUS19[:5], mask, reduction="none")
    torch.testing.assert_close(mean, rows[1:].mean())


# ---- exp_utility -------------------------------------------------------------------------

UTILITY_SHAPES = [(0, 1, 5), (1, 1, 1), (7, 1, 19), (5, 3, 11), (9, 19, 19), (4, 2, 40)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", UTILITY_SHAPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kind", ["ce", "utility"])
@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.8, -1.5, "per-row"])
def test_exp_utility_matches_reference(device, dtype, shape, gated, kind, lam):
    b, m, q = shape
    g = torch.Generator().manual_seed(1)
    quant = torch.randn(b, m, q, generator=g, dtype=torch.float64)
    gate = torch.softmax(torch.randn(b, m, generator=g, dtype=torch.float64), -1)
    if not gated:
        quant = quant[:, 0]
    lam_v = torch.randn(b, generator=g, dtype=torch.float64) if lam == "per-row" else lam
    x = quant.to(device=device, dtype=dtype).requires_grad_()
    gt = gate.to(device=device, dtype=dtype).requires_grad_() if gated else None
    lam_arg = lam_v.to(device) if isinstance(lam_v, torch.Tensor) else lam_v
    out = prefcore.ops.exp_utility(x, lam_arg, gt, kind=kind)
    assert out.shape == (b,) and out.dtype == dtype
    x64 = quant.clone().requires_grad_()
    g64 = gate.clone().requires_grad_() if gated else None
    truth = ref.exp_utility(x64, lam_v, g64, kind=kind)
    inputs = (x, gt) if gated else (x,)
    inputs64 = (x64, g64) if gated else (x64,)
    grads = torch.autograd.grad(out.sum(), inputs) if b else tuple(torch.zeros_like(i) for i in inputs)
    grads64 = torch.autograd.grad(truth.sum(), inputs64) if b else tuple(torch.zeros_like(i) for i in inputs64)
    if dtype in TIGHT:
        torch.testing.assert_close(out.double().cpu(), truth, **TIGHT[dtype])
        for a, t in zip(grads, grads64):
            torch.testing.assert_close(a.double().cpu(), t, **TIGHT[dtype])
    else:
        xl = quant.to(dtype).requires_grad_()
        gl = gate.to(dtype).requires_grad_() if gated else None
        base = ref.exp_utility(xl, lam_v.to(dtype) if isinstance(lam_v, torch.Tensor) else lam_v, gl, kind=kind)
        bases = torch.autograd.grad(base.sum(), (xl, gl) if gated else (xl,)) if b else tuple(torch.zeros_like(i) for i in inputs64)
        assert_within_lowp_rule(out.cpu(), base, truth, dtype)
        for a, bb, t in zip(grads, bases, grads64):
            assert_within_lowp_rule(a.cpu(), bb, t, dtype)


def test_exp_utility_gradcheck():
    quant = torch.randn(5, 3, 7, dtype=torch.float64, requires_grad=True)
    gate = torch.softmax(torch.randn(5, 3, dtype=torch.float64), -1).requires_grad_()
    lam = torch.tensor([0.0, 1e-4, 0.5, -2.0, 3.0], dtype=torch.float64)
    for kind in ("ce", "utility"):
        assert torch.autograd.gradcheck(lambda q, g: prefcore.ops.exp_utility(q, lam, g, kind=kind), (quant, gate))
        assert torch.autograd.gradcheck(lambda q: prefcore.ops.exp_utility(q, lam, kind=kind), (quant[:, 0].detach().requires_grad_(),))


def test_large_outputs_with_huge_page_advice_match_reference():
    # Outputs >= 8 MB take the madvise(MADV_HUGEPAGE) path (csrc/cpu/huge_pages.h); values unchanged.
    quant = torch.randn(16384, 8, 19, requires_grad=True)  # 10 MB gradient
    gate = torch.softmax(torch.randn(16384, 8), -1).requires_grad_()
    out = prefcore.ops.exp_utility(quant, 0.8, gate)
    gq, gg = torch.autograd.grad(out.sum(), (quant, gate))
    q64, g64 = quant.detach().double().requires_grad_(), gate.detach().double().requires_grad_()
    rq, rg = torch.autograd.grad(ref.exp_utility(q64, 0.8, g64).sum(), (q64, g64))
    torch.testing.assert_close(gq.double(), rq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gg.double(), rg, rtol=1e-5, atol=1e-5)
    pred = torch.randn(131072, 19, requires_grad=True)  # 10 MB fused gradient
    target = torch.randn(131072, 3)
    (gp,) = torch.autograd.grad(prefcore.ops.pinball_loss(pred, target, TAUS19, reduction="sum"), pred)
    p64 = pred.detach().double().requires_grad_()
    (rp,) = torch.autograd.grad(ref.pinball_loss(p64, target.double(), TAUS19.double(), reduction="sum"), p64)
    torch.testing.assert_close(gp.double(), rp, rtol=1e-5, atol=1e-6)


def test_ce_limits_and_monotonicity():
    x = torch.randn(64, 19, dtype=torch.float64)
    mean, var = x.mean(-1), x.var(-1, unbiased=False)
    torch.testing.assert_close(prefcore.ops.exp_utility(x, 0.0), mean, rtol=0, atol=1e-15)
    # Small λ: CE = mean − λ·Var/2 + O(λ²) (cumulant expansion) — independent closed form.
    lam = 1e-4
    torch.testing.assert_close(prefcore.ops.exp_utility(x, lam), mean - lam * var / 2, rtol=0, atol=1e-7)
    # λ → ±∞: min / max, within log(Q)/|λ|.
    big = 1e4
    assert (prefcore.ops.exp_utility(x, big) - x.min(-1).values).abs().max() <= math.log(19) / big + 1e-12
    assert (prefcore.ops.exp_utility(x, -big) - x.max(-1).values).abs().max() <= math.log(19) / big + 1e-12
    lams = torch.linspace(-20, 20, 81)
    ces = torch.stack([prefcore.ops.exp_utility(x, float(l)) for l in lams])  # (81, 64)
    assert (ces[1:] <= ces[:-1] + 1e-12).all(), "CE must be non-increasing in λ"


def test_exp_utility_extremes_match_reference_in_float32():
    # The CPU kernels use their own vectorised exp: overflow gives -inf like torch, underflow 0,
    # NaN propagates; far-apart quantiles keep the CE finite (shifted logsumexp).
    x = torch.tensor([[-100.0] * 16 + [0.0] * 3, [200.0] * 19, [-30.0, 30.0] * 9 + [0.0], [float("nan")] + [0.0] * 18])
    out = prefcore.ops.exp_utility(x, 1.0, kind="utility")
    expected = ref.exp_utility(x, 1.0, kind="utility")
    assert out[0] == -math.inf and expected[0] == -math.inf
    torch.testing.assert_close(out[1:3], expected[1:3], rtol=1e-5, atol=0)
    assert torch.isnan(out[3])
    ce = prefcore.ops.exp_utility(x[:3], 50.0)
    torch.testing.assert_close(ce, ref.exp_utility(x[:3].double(), 50.0).float(), rtol=1e-5, atol=1e-5)


def test_ce_small_lambda_is_accurate_in_float32():
    x = torch.randn(256, 19, dtype=torch.float64)
    for lam in (1e-6, 1e-4, 1e-2, 0.3):
        truth = x.mean(-1) - torch.special.logsumexp(-lam * (x - x.mean(-1, keepdim=True)) - math.log(19), -1) / lam
        out = prefcore.ops.exp_utility(x.float(), lam).double()
        assert (out - truth).abs().max() < 2e-6, lam


# ---- torch.library / torch.compile ---------------------------------------------------------

def test_opcheck_quantile_ops():
    pred, target, taus, mask = _pinball_inputs((6, 5), (6, 4), torch.float32, "cpu", True)
    for kappa in (0.0, 0.5):
        for need_grad in (False, True):
            torch.library.opcheck(torch.ops.prefcore.pinball_loss,
                                  (pred.clone().requires_grad_(need_grad), target, taus.float(), mask, kappa, need_grad))
    torch.library.opcheck(torch.ops.prefcore._pinball_loss_backward, (torch.rand(6), pred, target, taus.float(), mask, 0.0))
    quant = torch.randn(4, 3, 5, requires_grad=True)
    gate = torch.softmax(torch.randn(4, 3), -1).requires_grad_()
    for kind in (0, 1):
        torch.library.opcheck(torch.ops.prefcore.exp_utility, (quant, torch.full((1,), 0.7), gate, kind))
        torch.library.opcheck(torch.ops.prefcore.exp_utility, (quant[:, 0].detach().requires_grad_(), torch.rand(4), None, kind))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def objective(pred, target, taus, gate):
        loss = prefcore.ops.pinball_loss(pred, target, taus, kappa=0.1)
        util = prefcore.ops.exp_utility(pred, 0.5, gate).mean()
        return loss - util

    pred = torch.randn(8, 3, 19, requires_grad=True)
    target = torch.randn(8, 3, 10)
    gate = torch.softmax(torch.randn(8, 3), -1).requires_grad_()
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    out_c = compiled(pred, target, TAUS19, gate)
    grads_c = torch.autograd.grad(out_c, (pred, gate))
    out_e = objective(pred, target, TAUS19, gate)
    grads_e = torch.autograd.grad(out_e, (pred, gate))
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# ---- every ISA clone computes the same thing -------------------------------------------------

def test_every_cpu_isa_clone_matches_reference():
    script = (
        "import torch, prefcore, sys\n"
        "from prefcore.ops import reference as ref\n"
        "torch.manual_seed(0)\n"
        "p = torch.randn(37, 19, requires_grad=True); t = torch.randn(37, 10); m = torch.rand(37, 10) > 0.2\n"
        "taus = torch.linspace(0.05, 0.95, 19)\n"
        "for k, dt in [(0.0, torch.float32), (0.5, torch.float32), (0.0, torch.float64), (0.5, torch.float64)]:\n"
        "  pd = p.detach().to(dt).requires_grad_()\n"
        "  a = prefcore.ops.pinball_loss(pd, t.to(dt), taus.to(dt), m, kappa=k); b = ref.pinball_loss(p.double(), t.double(), taus.double(), m, kappa=k)\n"
        "  assert abs(a.item() - b.item()) < 1e-5, (k, dt, a, b)\n"
        "  ga, = torch.autograd.grad(a, pd); gb, = torch.autograd.grad(b, p)\n"
        "  assert (ga.double() - gb).abs().max() < 1e-6, (k, dt)\n"
        "# issue 14 rows 5 and 11 in this clone: subnormal kappa is the pinball limit; no overflow on the way\n"
        "z = torch.zeros(3, 17, requires_grad=True)\n"
        "a = prefcore.ops.pinball_loss(z, torch.zeros(3, 2), torch.rand(17) * 0.9 + 0.05, kappa=1e-40); a.backward()\n"
        "assert a.item() == 0.0 and torch.isfinite(z.grad).all()\n"
        "big = prefcore.ops.pinball_loss(torch.full((2, 19), 1e38), torch.tensor([[-1e38, 0.0]] * 2), taus)\n"
        "want = ref.pinball_loss(torch.full((2, 19), 1e38).double(), torch.tensor([[-1e38, 0.0]] * 2).double(), taus.double())\n"
        "assert abs(big.item() / want.item() - 1) < 1e-5, (big, want)\n"
        "q = torch.randn(33, 5, 19, requires_grad=True); g = torch.softmax(torch.randn(33, 5), -1)\n"
        "for kind, dt in [(kd, d) for kd in ('ce', 'utility') for d in (torch.float32, torch.float64)]:\n"
        "  qd = q.detach().to(dt).requires_grad_()\n"
        "  a = prefcore.ops.exp_utility(qd, 0.9, g.to(dt), kind=kind); b = ref.exp_utility(q.double(), 0.9, g.double(), kind=kind)\n"
        "  assert (a.double() - b).abs().max() < 1e-5, (kind, dt)\n"
        "  ga, = torch.autograd.grad(a.sum(), qd); gb, = torch.autograd.grad(b.sum(), q)\n"
        "  assert (ga.double() - gb).abs().max() < 1e-5, (kind, dt)\n"
        "print(prefcore._C.cpu_isa())\n"
    )
    run_in_every_cpu_isa(script)


def test_import_without_extension_fails_loudly(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "prefcore"), tmp_path / "prefcore",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    # An editable install registers a meta-path finder that would resolve `prefcore` to the
    # built checkout; drop it so the copy without the extension is the one imported.
    code = (
        "import sys, importlib.util\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "print('ORIGIN', importlib.util.find_spec('prefcore').origin, file=sys.stderr)\n"
        "import prefcore\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=120)
    assert f"ORIGIN {tmp_path}" in proc.stderr, proc.stderr
    assert proc.returncode != 0
    assert "native extension" in proc.stderr and "make build" in proc.stderr


# ---- bad input -----------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    pred, target, taus = torch.randn(4, 5), torch.randn(4, 3), TAUS19[:5]
    pl = prefcore.ops.pinball_loss
    with pytest.raises(RuntimeError, match=r"taus must lie strictly inside \(0, 1\)"):
        pl(pred, target, torch.tensor([0.0, 0.2, 0.3, 0.4, 0.5]))
    with pytest.raises(RuntimeError, match=r"taus must lie strictly inside \(0, 1\)"):
        pl(pred, target, torch.tensor([0.1, 0.2, 0.3, 0.4, 1.0]))
    with pytest.raises(ValueError, match=r"taus must have shape \(Q,\) = \(5,\)"):
        pl(pred, target, TAUS19)
    with pytest.raises(ValueError, match=r"target must have shape"):
        pl(pred, torch.randn(5, 3), taus)
    with pytest.raises(ValueError, match=r"target_mask must be a bool tensor"):
        pl(pred, target, taus, torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"target_mask must have the shape of target"):
        pl(pred, target, taus, torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"kappa must be >= 0"):
        pl(pred, target, taus, kappa=-1.0)
    with pytest.raises(ValueError, match=r"kappa must be finite"):
        pl(pred, target, taus, kappa=float("nan"))
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        pl(pred, target, taus, reduction="avg")
    with pytest.raises(ValueError, match=r"pred must be a floating tensor"):
        pl(pred.long(), target, taus)
    with pytest.raises(ValueError, match=r"pred must have at least one quantile"):
        pl(torch.randn(4, 0), target, torch.empty(0))
    with pytest.raises(ValueError, match=r"target must be on the same device as pred"):
        pl(pred, target.to("meta"), taus)
    with pytest.raises(TypeError, match=r"target must be a torch.Tensor"):
        pl(pred, [1.0, 2.0], taus)

    eu = prefcore.ops.exp_utility
    q3, gate = torch.randn(4, 3, 5), torch.softmax(torch.randn(4, 3), -1)
    with pytest.raises(ValueError, match=r"gate must have shape \(B, M\) = \(4, 3\)"):
        eu(q3, 1.0, gate[:, :2])
    with pytest.raises(ValueError, match=r"quantiles must have shape \(B, M, Q\) when gate is given"):
        eu(q3[:, 0], 1.0, gate)
    with pytest.raises(ValueError, match=r"quantiles must have shape \(B, Q\)"):
        eu(q3, 1.0)
    with pytest.raises(ValueError, match=r"kind must be one of"):
        eu(q3[:, 0], 1.0, kind="cvar")
    with pytest.raises(ValueError, match=r"lam must be a float or a tensor of shape \(B,\) = \(4,\)"):
        eu(q3[:, 0], torch.ones(3))
    with pytest.raises(ValueError, match=r"lam must be finite"):
        eu(q3[:, 0], float("inf"))
    with pytest.raises(ValueError, match=r"gate must have the dtype of quantiles"):
        eu(q3, 1.0, gate.double())
    with pytest.raises(RuntimeError, match=r"kind must be 0 \(utility\) or 1"):
        torch.ops.prefcore.exp_utility(q3[:, 0], torch.ones(1), None, 7)


# ---- exp_utility edge cases (issue 14: M = 0, non-finite lam, pad-lane overflow, 2nd order) ----

@pytest.mark.parametrize("kind,value", [("ce", 0.0), ("utility", -1.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_utility_empty_gate_is_the_utility_of_zeros(kind, value, dtype):
    # M = 0 attributes: Q_mix is the empty sum, 0 on every quantile, for any λ (was a SIGSEGV:
    # the empty gate's null data pointer took the ungated path).
    quant = torch.randn(2, 0, 5, dtype=dtype, requires_grad=True)
    gate = torch.randn(2, 0, dtype=dtype, requires_grad=True)
    for lam in (1.0, 0.0, -2.0, torch.tensor([0.5, 3.0])):
        out = prefcore.ops.exp_utility(quant, lam, gate, kind=kind)
        truth = ref.exp_utility(quant.detach().double(), lam.double() if isinstance(lam, torch.Tensor) else lam,
                                gate.detach().double(), kind=kind)
        assert out.shape == (2,) and out.dtype == dtype
        assert torch.equal(out.double(), torch.full((2,), value, dtype=torch.float64))
        torch.testing.assert_close(truth, torch.full((2,), value, dtype=torch.float64))
        gq, gg = torch.autograd.grad(out.sum(), (quant, gate))
        assert gq.shape == quant.shape and gg.shape == gate.shape


def test_exp_utility_empty_gate_of_a_strided_view_reads_nothing():
    # A (4, 0, 5) view into a larger tensor with an empty gate: was [2, 7, 12, 17] (memory of
    # another tensor).
    base = torch.arange(60.0).reshape(4, 3, 5)
    out = prefcore.ops.exp_utility(base[:, :0], 0.0, torch.empty(4, 0))
    assert torch.equal(out, torch.zeros(4))
    assert torch.equal(prefcore.ops.exp_utility(base[:, :0], 1.0, torch.empty(4, 0), kind="utility"),
                       torch.full((4,), -1.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_exp_utility_non_finite_lam_tensor_raises_naming_the_row(bad):
    x = torch.randn(4, 5)
    lam = torch.tensor([0.5, 1.0, bad, 2.0])
    for fn in (prefcore.ops.exp_utility, ref.exp_utility):
        with pytest.raises(ValueError, match=r"lam must be finite.*row 2"):
            fn(x, lam)
        with pytest.raises(ValueError, match="lam must be finite"):
            fn(x, torch.full((4,), bad))
        with pytest.raises(ValueError, match="lam must be finite"):
            fn(x, bad)


@pytest.mark.parametrize("q", [1, 2, 5, 15, 16, 17, 19])
def test_exp_utility_large_values_do_not_overflow_in_pad_lanes(q):
    # Rows of Q not a multiple of the SIMD width have pad lanes holding 0; −λ·(0 − mean) there
    # overflowed to inf when λ·mean does, and inf·0 made the value and gradient NaN.
    for value, lam in ((1e30, 1e10), (2.0, 2e38), (-1e36, 1e2), (3e-38, -1e38)):
        x = torch.full((3, q), value, requires_grad=True)
        out = prefcore.ops.exp_utility(x, lam)
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(out.detach(), torch.full((3,), value), rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, torch.full((3, q), 1.0 / q), rtol=1e-6, atol=0)  # softmax of equal z
        gate = torch.ones(3, 1, requires_grad=True)
        out_g = prefcore.ops.exp_utility(x.detach().unsqueeze(1), lam, gate)
        torch.testing.assert_close(out_g.detach(), torch.full((3,), value), rtol=1e-6, atol=0)
    out = prefcore.ops.exp_utility(torch.tensor([[1e30]]), 1e10)
    assert out.item() == pytest.approx(1e30, rel=1e-6)
    out = prefcore.ops.exp_utility(torch.tensor([[2.0, 2.0]]), 2e38)
    assert out.item() == 2.0


def test_exp_utility_double_backward_raises():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    gate = torch.softmax(torch.randn(3, 2, dtype=torch.float64), -1).requires_grad_()
    with pytest.raises(RuntimeError, match="exp_utility supports first-order gradients only"):
        torch.autograd.functional.hessian(lambda q: prefcore.ops.exp_utility(q, 0.7, gate).sum(), x)
    (g,) = torch.autograd.grad(prefcore.ops.exp_utility(x, 0.7, gate).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        g.sum().backward()
    # First order is unaffected, with or without create_graph; the reference has a true Hessian.
    (g1,) = torch.autograd.grad(prefcore.ops.exp_utility(x, 0.7, gate).sum(), x)
    (g2,) = torch.autograd.grad(ref.exp_utility(x, 0.7, gate).sum(), x)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(g.detach(), g2)

# ---- issue 14 regressions --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kappa", [1e-40, 1e-45, 5e-324])
def test_pinball_subnormal_kappa_is_the_pinball_limit_not_nan(dtype, kappa):
    """Row 5: a κ whose reciprocal overflows the accumulation dtype is taken as κ = 0."""
    taus = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    pred = torch.zeros(1, 3, dtype=dtype, requires_grad=True)
    out = prefcore.ops.pinball_loss(pred, torch.zeros(1, 2, dtype=dtype), taus, kappa=kappa)
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(pred.grad).all()
    # away from u = 0 it is the plain pinball loss (the κ → 0 limit), in value and gradient
    p2 = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    t2 = torch.randn(4, 5, dtype=dtype)
    got = prefcore.ops.pinball_loss(p2, t2, taus, kappa=kappa, reduction="none")
    (g_got,) = torch.autograd.grad(got.sum(), p2)
    want = prefcore.ops.pinball_loss(p2, t2, taus, kappa=0.0, reduction="none")
    (g_want,) = torch.autograd.grad(want.sum(), p2)
    if dtype != torch.float64 or kappa == 5e-324:  # 1/κ overflows the accumulation dtype: exactly κ = 0
        assert torch.equal(got, want) and torch.equal(g_got, g_want)
    else:  # float64 represents 1/κ: the genuine quantile-Huber loss, within κ/2 of the pinball loss
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=0)
    r = ref.pinball_loss(p2.detach().double(), t2.double(), taus, kappa=kappa, reduction="none")
    torch.testing.assert_close(got.double(), r, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("masked", [False, True])
def test_pinball_row_mean_near_float32_max_does_not_overflow(masked):
    """Row 11: the terms are scaled before they are summed, so a finite mean stays finite."""
    taus = torch.tensor([0.25, 0.5, 0.75])
    pred = torch.full((1, 3), 1e38)
    target = torch.tensor([[-1e38, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool) if masked else None
    out = prefcore.ops.pinball_loss(pred, target, taus, mask)
    want = ref.pinball_loss(pred.double(), target.double(), taus.double(), mask)  # closed form: 7.5e37
    assert math.isclose(want.item(), 7.5e37, rel_tol=1e-7)  # (1e38 is not exact in float32)
    assert math.isclose(out.item(), 7.5e37, rel_tol=1e-6)
    assert math.isclose(ref.pinball_loss(pred, target, taus, mask).item(), 7.5e37, rel_tol=1e-6)
    # a per-quantile sum over targets that overflows on its own (N = 4 terms near 3e38)
    pred4 = torch.full((2, 2), 3e38)
    target4 = torch.full((2, 4), -0.1e38)
    out4 = prefcore.ops.pinball_loss(pred4, target4, torch.tensor([0.05, 0.1]), reduction="none")
    want4 = ref.pinball_loss(pred4.double(), target4.double(), torch.tensor([0.05, 0.1], dtype=torch.float64),
                             reduction="none")
    assert torch.isfinite(out4).all()
    torch.testing.assert_close(out4.double(), want4, rtol=1e-6, atol=0)


def test_pinball_raw_op_outputs_are_not_modified_by_backward():
    """Row 10: backward never scales a dpred tensor the caller holds in place."""
    taus = torch.tensor([0.2, 0.5, 0.8])
    p = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 2)
    loss, d = torch.ops.prefcore.pinball_loss(p, t, taus, None, 0.0, True)
    before = d.clone()
    (loss * 3).sum().backward()
    assert torch.equal(d, before)
    torch.testing.assert_close(p.grad, 3 * before)
    # the wrapper's private buffer gives the same gradient
    p2 = p.detach().clone().requires_grad_()
    (prefcore.ops.pinball_loss(p2, t, taus, reduction="sum") * 3).backward()
    torch.testing.assert_close(p2.grad, p.grad)


@pytest.mark.parametrize("masked", [False, True])
def test_pinball_double_backward_gives_the_true_hessian(masked):
    """Row 6: the Hessian is the true one — diagonal, Σ_n w·1[|u| ≤ κ]/(κ N_valid Q) — not zeros."""
    g = torch.Generator().manual_seed(3)
    taus = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    p = torch.randn(2, 3, generator=g, dtype=torch.float64)
    t = torch.randn(2, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]]) if masked else None
    kappa = 10.0
    h = torch.autograd.functional.hessian(lambda x: prefcore.ops.pinball_loss(x, t, taus, mask, kappa=kappa), p)
    u = t.unsqueeze(-1) - p.unsqueeze(-2)
    w = torch.where(u < 0, 1 - taus, taus) * (u.abs() <= kappa)
    valid = torch.ones_like(t) if mask is None else mask.double()
    diag = (w * valid.unsqueeze(-1)).sum(1) / (kappa * valid.sum(1, keepdim=True) * 3) / 2  # mean over 2 rows
    want = torch.diag_embed(diag.reshape(-1)).reshape(2, 3, 2, 3)
    assert diag.min() > 0
    torch.testing.assert_close(h, want, rtol=1e-10, atol=1e-12)
    pr = p.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: prefcore.ops.pinball_loss(x, t, taus, mask, kappa=0.7), (pr,))
    # κ = 0 is piecewise linear: its true Hessian is 0 (away from the kinks), and stays so
    h0 = torch.autograd.functional.hessian(lambda x: prefcore.ops.pinball_loss(x, t, taus, mask), p)
    assert torch.equal(h0, torch.zeros_like(h0))
    # first-order values under create_graph=True equal the fused ones
    (g1,) = torch.autograd.grad(prefcore.ops.pinball_loss(pr, t, taus, mask, kappa=0.7), pr, create_graph=True)
    (g2,) = torch.autograd.grad(prefcore.ops.pinball_loss(pr, t, taus, mask, kappa=0.7), pr)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_pinball_non_finite_values_propagate_to_exactly_their_rows(kappa):
    """The stated contract: non-finite pred/target values reach only their own rows; a masked-out
    target is never read; the reference twin agrees."""
    taus = torch.tensor([0.2, 0.5, 0.8])
    pred = torch.randn(5, 3)
    target = torch.randn(5, 4)
    mask = torch.ones(5, 4, dtype=torch.bool)
    pred[1, 2] = float("nan")
    target[3, 0] = float("inf")
    target[4, 1] = float("nan")
    mask[4, 1] = False  # masked: must not matter
    for fn in (prefcore.ops.pinball_loss, ref.pinball_loss):
        out = fn(pred, target, taus, mask, kappa=kappa, reduction="none")
        assert torch.isnan(out[1]) and out[3] == float("inf")
        finite_rows = [0, 2, 4]
        assert torch.isfinite(out[finite_rows]).all()
        clean = fn(pred[finite_rows], target[finite_rows], taus, mask[finite_rows], kappa=kappa, reduction="none")
        torch.testing.assert_close(out[finite_rows], clean)
    with pytest.raises((ValueError, RuntimeError), match="kappa"):
        prefcore.ops.pinball_loss(pred, target, taus, kappa=float("nan"))
    with pytest.raises((ValueError, RuntimeError), match="taus"):
        prefcore.ops.pinball_loss(pred, target, torch.tensor([0.2, float("nan"), 0.8]))
