"""Property-based fuzzing of the fused ops against float64 references (issue 14).

Random shapes with empty and size-1 dims, broadcast (stride-0) / strided / transposed views and
storage offsets, masks with all-false and single-true rows, all four dtypes, extreme values.
Every example checks: no crash; the fused result within the stated tolerance of the float64
reference run on the *same* (dtype-rounded) inputs; gradients likewise; no NaN where the
contract says none.

Tolerances (error bounds, not fudge factors). The inputs are rounded to their dtype first and the
reference sees those rounded values, so the only differences are the kernel's accumulation
(float32, float64 for float64: ``ACC_EPS``) and the rounding of the output to its dtype
(``OUT_EPS``). Each bound is ``ACC_EPS · (magnitude of the terms summed) + OUT_EPS · |ref|``.

Budget: the ``default`` profile (python_tests/conftest.py) keeps the whole file at ~30–60 s on
2 cores; ``HYPOTHESIS_PROFILE=long`` runs many more examples.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import prefcore
from prefcore.ops import reference as ref

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Relative error of the accumulation over the few hundred terms an example sums.
ACC_EPS = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# Rounding of the result to the output dtype (half an ulp, with a factor 2 of room).
OUT_EPS = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
# ... plus an absolute half-spacing of the dtype's subnormals (a tiny result rounds to 0 or a subnormal).
OUT_ABS = {torch.float64: 5e-324, torch.float32: 1.5e-45, torch.bfloat16: 1e-40, torch.float16: 6e-8}
# Largest magnitude an input may have per dtype so that the op's outputs stay representable.
MAX_MAG = {torch.float64: 1e30, torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 300.0}

dtypes = st.sampled_from(DTYPES)
small = st.sampled_from([0, 1, 1, 2, 3, 5])  # sizes of leading dims: empty and size 1 often


# ---- layouts ---------------------------------------------------------------------------------

@st.composite
def layouts(draw, shape: tuple[int, ...]) -> str:
    options = ["contiguous", "offset", "strided"]
    if len(shape) >= 2:
        options.append("transposed")
    return draw(st.sampled_from(options))


def lay_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``x`` (already in its final dtype) in the given memory layout."""
    if layout == "contiguous" or x.dim() == 0:
        return x.contiguous()
    if layout == "offset":  # a view starting 3 elements into a larger storage
        buf = torch.full((x.numel() + 5,), float("nan"), dtype=x.dtype)
        out = buf[3 : 3 + x.numel()].view(x.shape)
        out.copy_(x)
        return out
    if layout == "strided":  # every other element of the last dim of a wider tensor
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise AssertionError(layout)


@st.composite
def tensors(draw, shape: tuple[int, ...], dtype: torch.dtype, *, scale: float = 1.0,
            extreme: bool = False, low: float | None = None, high: float | None = None,
            allow_expand: bool = True, max_mag: float | None = None) -> torch.Tensor:
    """A tensor of ``shape`` in ``dtype`` with values ~ N(0, scale) (or uniform in [low, high]),
    occasionally with extreme magnitudes (at most ``max_mag``, default ``MAX_MAG[dtype]``), in a
    random layout — possibly broadcast (stride 0) along one of its dims."""
    max_mag = MAX_MAG[dtype] if max_mag is None else max_mag
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    base_shape = list(shape)
    expand_dim = None
    if allow_expand and shape and draw(st.booleans()) and draw(st.booleans()):
        expand_dim = draw(st.integers(0, len(shape) - 1))
        base_shape[expand_dim] = 1 if shape[expand_dim] > 0 else 0
    if low is not None:
        v = low + (high - low) * torch.rand(base_shape, generator=g, dtype=torch.float64)
    else:
        v = torch.randn(base_shape, generator=g, dtype=torch.float64) * scale
        if extreme and v.numel():
            mag = draw(st.sampled_from([1e-30, 1e-6, 1e3, 1e8, 1e20]))
            v = v * min(mag, max_mag)
    v = v.clamp(-max_mag, max_mag).to(dtype)
    if expand_dim is not None:
        return v.expand(shape)
    return lay_out(v, draw(layouts(tuple(shape))))


@st.composite
def masks(draw, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool masks with random rows, all-false rows and single-true rows mixed."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    if m.dim() >= 1 and m.numel():
        rows = m.reshape(-1, m.shape[-1])
        kinds = torch.randint(0, 3, (rows.shape[0],), generator=g)
        for r in range(rows.shape[0]):
            if kinds[r] == 1:
                rows[r] = False
            elif kinds[r] == 2 and rows.shape[1] > 0:
                rows[r] = False
                rows[r, int(torch.randint(0, rows.shape[1], (1,), generator=g))] = True
        m = rows.reshape(shape)
    return lay_out(m, draw(st.sampled_from(["contiguous", "strided"]))) if m.dim() else m


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: torch.Tensor | float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any() or torch.isnan(want).any(), f"{what}: NaN where the reference has none"
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: finiteness differs: {got} vs {want}"
    assert torch.equal(got[~finite], want[~finite]) or torch.isnan(want[~finite]).all(), what
    if finite.any():
        tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(want)
        err = (got - want).abs()[finite]
        bound = tol[finite]
        worst = int((err - bound).argmax())
        assert (err <= bound).all(), f"{what}: error {err[worst]:.3g} > bound {bound[worst]:.3g}"


# ---- pinball_loss ----------------------------------------------------------------------------

@st.composite
def pinball_cases(draw):
    dtype = draw(dtypes)
    lead = tuple(draw(st.lists(small, min_size=0, max_size=2)))
    q = draw(st.sampled_from([1, 2, 3, 7, 19]))
    per_row_n = draw(st.booleans())
    n = draw(st.sampled_from([0, 1, 2, 5, 11])) if per_row_n else None
    if not lead and not per_row_n:
        lead = (draw(small),)
    extreme = draw(st.booleans()) and draw(st.booleans())
    pred = draw(tensors(lead + (q,), dtype, scale=draw(st.sampled_from([0.1, 1.0, 30.0])), extreme=extreme))
    tshape = lead + ((n,) if per_row_n else ())
    # targets in pred's dtype, or float32 scores with a half-precision pred
    tdtype = dtype if dtype == torch.float64 or draw(st.booleans()) else torch.float32
    target = draw(tensors(tshape, tdtype, scale=draw(st.sampled_from([0.1, 1.0, 30.0])), extreme=extreme,
                          max_mag=MAX_MAG[dtype]))
    taus = draw(tensors((q,), torch.float64, low=1e-6, high=1 - 1e-6, allow_expand=False))
    mask = draw(masks(tshape)) if draw(st.booleans()) and tshape else None
    kappa = draw(st.sampled_from([0.0, 0.0, 1e-40, 1e-3, 0.5, 3.0]))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    return dtype, pred, target, taus, mask, kappa, reduction


@given(pinball_cases())
def test_fuzz_pinball_loss(case):
    dtype, pred, target, taus, mask, kappa, reduction = case
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p = p_in = pred.detach().requires_grad_(True)  # keeps pred's layout (strides, offset, stride 0)
    out = prefcore.ops.pinball_loss(p_in, target, taus, mask, kappa=kappa, reduction="none")
    # The op takes a κ whose reciprocal overflows its accumulation dtype as 0 (documented); the
    # float64 reference gets the κ the op uses.
    kappa = ref._effective_kappa(kappa, dtype)
    want = ref.pinball_loss(pred.double(), target.to(acc).double(), taus.to(acc).double(), mask, kappa=kappa,
                            reduction="none")
    assert out.dtype == dtype and out.shape == pred.shape[:-1]
    assert torch.isfinite(out).all(), "finite inputs must give a finite loss"
    # |error| ≤ ACC_EPS · mean(|t| + |p|) per row (u = t − p is formed in the accumulation dtype)
    t2 = target.to(acc).double()
    t2 = t2.unsqueeze(-1) if t2.dim() == pred.dim() - 1 else t2
    mag = t2.abs().amax(-1, keepdim=True).nan_to_num(0) if t2.shape[-1] else torch.zeros(*t2.shape[:-1], 1, dtype=torch.float64)
    mag = (mag + pred.double().abs().amax(-1, keepdim=True) if pred.numel() else mag).squeeze(-1)
    term_mag = mag  # |∂ρ/∂u| ≤ 1, so an error δu in u moves ρ by at most δu
    tol = 4 * ACC_EPS[dtype] * (term_mag + 1e-30) + (OUT_EPS[dtype] * want.abs() + OUT_ABS[dtype])
    assert_within(out, want, tol, "pinball_loss rows")
    red = prefcore.ops.pinball_loss(p_in, target, taus, mask, kappa=case[5], reduction=reduction)
    want_red = ref.pinball_loss(pred.double(), t2.squeeze(-1) if target.dim() == pred.dim() - 1 else t2, taus.to(acc).double(),
                                mask, kappa=kappa, reduction=reduction)
    if reduction != "none":
        assert_within(red, want_red, 4 * ACC_EPS[dtype] * (term_mag.sum() + 1e-30) + (2 * OUT_EPS[dtype] * want_red.abs() + OUT_ABS[dtype]),
                      f"pinball_loss {reduction}")
    if pred.numel():
        (g,) = torch.autograd.grad(red.float().sum() if red.dim() else red.float(), p)
        pr = pred.detach().double().requires_grad_(True)
        r = ref.pinball_loss(pr, t2.squeeze(-1) if target.dim() == pred.dim() - 1 else t2, taus.to(acc).double(),
                             mask, kappa=kappa, reduction=reduction)
        (g_ref,) = torch.autograd.grad(r.sum(), pr)
        assert torch.isfinite(g).all()
        gmag = 1.0 if kappa in (0.0, 1e-40) else (1 + mag.unsqueeze(-1) / kappa)
        gtol = 8 * ACC_EPS[dtype] * gmag * g_ref.abs().amax().clamp_min(1e-30) + (2 * OUT_EPS[dtype] * g_ref.abs() + OUT_ABS[dtype])
        assert_within(g, g_ref, gtol, "pinball_loss grad")


# ---- gmm_nll ---------------------------------------------------------------------------------

@st.composite
def gmm_cases(draw):
    dtype = draw(dtypes)
    lead = tuple(draw(st.lists(small, min_size=1, max_size=2)))
    k = draw(st.sampled_from([1, 2, 3, 4, 5, 9]))
    logits = draw(tensors(lead + (k,), dtype, scale=2.0))
    mu = draw(tensors(lead + (k,), dtype, scale=2.0))
    # float16 losses must stay below 65504: z = (x − μ)/σ ≤ ~100 there
    log_sigma = draw(tensors(lead + (k,), dtype, low=-1.5 if dtype == torch.float16 else -3.0, high=2.0))
    per_row = draw(st.booleans())
    normalize = (not per_row) and draw(st.booleans())
    if per_row:
        p_count = draw(st.sampled_from([1, 2, 4, 10, 70]))  # 70 > the CPU row-tile kernel's limit
        pshape = lead + (p_count,)
    else:
        p_count = draw(st.sampled_from([1, 2, 5, 13]))
        pshape = (p_count,)
    points = draw(tensors(pshape, torch.float64 if dtype == torch.float64 else torch.float32, scale=3.0))
    wkind = draw(st.sampled_from(["none", "full", "row-broadcast", "column-broadcast", "with-zero-rows"]))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    full = lead + (p_count,)
    weights = None
    if wkind == "full":
        weights = draw(tensors(full, acc, low=0.0, high=2.0, allow_expand=True))
    elif wkind == "row-broadcast":
        weights = draw(tensors((p_count,), acc, low=0.0, high=2.0, allow_expand=False))
    elif wkind == "column-broadcast":
        weights = draw(tensors(lead + (1,), acc, low=0.0, high=2.0, allow_expand=False))
    elif wkind == "with-zero-rows":
        w = draw(tensors(full, acc, low=0.0, high=2.0, allow_expand=False)).contiguous()
        m = draw(masks(full))
        weights = torch.where(m, w, torch.zeros_like(w))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    return dtype, logits, mu, log_sigma, points, weights, normalize, reduction


def _gmm_term_magnitude(logits, mu, log_sigma, points, weights, normalize) -> torch.Tensor:
    """Per row: Σ_g w̄_g · max_k |a_k(x_g)| (plus |lse| when normalising), in float64 — the size of
    the terms the kernel sums, which bounds its accumulation error."""
    l, m, s = (t.double() for t in (logits, mu, log_sigma))
    x = points.double()
    log_pi = torch.log_softmax(l, -1)
    z = (x.unsqueeze(-2) - m.unsqueeze(-1)) / s.exp().unsqueeze(-1)
    a = (log_pi - s - 0.5 * math.log(2 * math.pi)).unsqueeze(-1) - 0.5 * z * z
    amag = a.abs().amax(-2) + (z * z).amax(-2) + 1
    if normalize:
        amag = amag + torch.logsumexp(torch.logsumexp(a, -2), -1, keepdim=True).abs()
    w = torch.ones_like(amag) if weights is None else weights.double().expand_as(amag)
    total = w.sum(-1, keepdim=True)
    wbar = torch.where(total > 0, w / total.clamp_min(1e-300), torch.zeros_like(w))
    return (wbar * amag).sum(-1)


@given(gmm_cases())
def test_fuzz_gmm_nll(case):
    dtype, logits, mu, log_sigma, points, weights, normalize, reduction = case
    params = [t.detach().clone().requires_grad_(True) for t in (logits, mu, log_sigma)]
    out = prefcore.ops.gmm_nll(*params, points, weights, normalize_grid=normalize, reduction="none")
    want = ref.gmm_nll(*(t.double() for t in (logits, mu, log_sigma)), points.double(),
                       weights.double() if weights is not None else None, normalize_grid=normalize, reduction="none")
    assert out.dtype == dtype and out.shape == logits.shape[:-1]
    assert torch.isfinite(out).all(), "finite inputs in the stable range must give a finite loss"
    mag = _gmm_term_magnitude(logits, mu, log_sigma, points, weights, normalize)
    tol = 16 * ACC_EPS[dtype] * mag + (OUT_EPS[dtype] * want.abs() + OUT_ABS[dtype])
    assert_within(out, want, tol, "gmm_nll rows")
    red = prefcore.ops.gmm_nll(*params, points, weights, normalize_grid=normalize, reduction=reduction)
    rp = [t.detach().double().requires_grad_(True) for t in (logits, mu, log_sigma)]
    r = ref.gmm_nll(*rp, points.double(), weights.double() if weights is not None else None,
                    normalize_grid=normalize, reduction=reduction)
    if reduction != "none":
        assert_within(red, r, 16 * ACC_EPS[dtype] * (mag.sum() + 1) + (2 * OUT_EPS[dtype] * r.abs() + OUT_ABS[dtype]), f"gmm_nll {reduction}")
    if logits.numel():
        grads = torch.autograd.grad(red.float().sum(), params)
        grads_ref = torch.autograd.grad(r.sum(), rp)
        for name, g, g_ref, s in zip(("logits", "mu", "log_sigma"), grads, grads_ref, (None, log_sigma, None)):
            assert torch.isfinite(g).all(), name
            scale = mag.sum().clamp_min(1.0) * (1 if s is None else (-s.double()).exp().amax())
            gtol = 32 * ACC_EPS[dtype] * scale * (g_ref.abs().amax() + 1) + (2 * OUT_EPS[dtype] * g_ref.abs() + OUT_ABS[dtype])
            assert_within(g, g_ref, gtol, f"gmm_nll grad {name}")


@given(dtype=dtypes, seed=st.integers(0, 2 ** 31 - 1), log_sigma_lo=st.sampled_from([-80.0, -20.0, -6.0]),
       spread=st.sampled_from([1e2, 1e4, 1e8]), per_row=st.booleans())
def test_fuzz_gmm_nll_extremes_never_nan(dtype, seed, log_sigma_lo, spread, per_row):
    """Tiny/huge σ and far points: the loss may be +∞ (documented: log p underflows), never NaN;
    gradients are finite wherever the loss is."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    b, k = 6, 3
    logits = (torch.randn(b, k, generator=g) * 5).to(dtype).requires_grad_(True)
    mu = (torch.randn(b, k, generator=g) * spread).clamp(-6e4, 6e4).to(dtype).requires_grad_(True)
    ls = (log_sigma_lo + (10 - log_sigma_lo) * torch.rand(b, k, generator=g)).to(dtype).requires_grad_(True)
    pts = (torch.randn((b, 10) if per_row else (20,), generator=g) * spread).to(acc)
    out = prefcore.ops.gmm_nll(logits, mu, ls, pts, reduction="none")
    assert not torch.isnan(out).any()
    fin = torch.isfinite(out)
    if fin.any():
        grads = torch.autograd.grad(out[fin].float().sum(), [logits, mu, ls])
        for t in grads:
            assert not torch.isnan(t[fin]).any()


# ---- exp_utility (restricted) ------------------------------------------------------------------

@st.composite
def utility_cases(draw):
    dtype = draw(dtypes)
    b = draw(small)
    q = draw(st.sampled_from([1, 2, 3, 16, 19]))
    gated = draw(st.booleans())
    # M = 0 (an empty mixture: the utility of all-zero quantiles) is drawn too (issue 14 rows 1/1b);
    # non-finite λ and extreme λ·Q have their own properties below (rows 3 and 4).
    m = draw(st.sampled_from([0, 1, 2, 5])) if gated else None
    qshape = (b, m, q) if gated else (b, q)
    kind = draw(st.sampled_from(["ce", "utility"]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    quantiles = draw(tensors(qshape, dtype, scale=scale))
    gate = draw(tensors((b, m), dtype, low=0.0, high=1.0)) if gated else None
    qmax = scale * 6 * max(m or 1, 1)
    lam_hi = min((10.0 if kind == "utility" else 30.0) / qmax, 50.0)
    if draw(st.booleans()):
        lam = draw(st.sampled_from([0.0, 1e-7, 1e-3, -1e-3, lam_hi, -lam_hi, 0.5 * lam_hi]))
    else:
        lam = draw(tensors((b,), torch.float64, low=-lam_hi, high=lam_hi, allow_expand=False)).to(
            torch.float64 if dtype == torch.float64 else torch.float32)
    return dtype, quantiles, lam, gate, kind


@given(utility_cases())
def test_fuzz_exp_utility(case):
    dtype, quantiles, lam, gate, kind = case
    qs = quantiles.detach().clone().requires_grad_(True)
    gt = gate.detach().clone().requires_grad_(True) if gate is not None else None
    out = prefcore.ops.exp_utility(qs, lam, gt, kind=kind)
    lam_ref = lam.double() if isinstance(lam, torch.Tensor) else lam
    qr = quantiles.detach().double().requires_grad_(True)
    gr = gate.detach().double().requires_grad_(True) if gate is not None else None
    want = ref.exp_utility(qr, lam_ref, gr, kind=kind)
    assert out.dtype == dtype and out.shape == (quantiles.shape[0],)
    assert torch.isfinite(out).all()
    qmix = (qr * gr.unsqueeze(-1)).sum(1) if gr is not None else qr
    mag = qmix.detach().abs().amax(-1) + 1 if qmix.numel() else torch.zeros(quantiles.shape[0], dtype=torch.float64)
    if kind == "utility":
        lam_v = lam_ref.abs() if isinstance(lam_ref, torch.Tensor) else abs(lam_ref)
        mag = mag * torch.exp(torch.as_tensor(lam_v) * mag) * (1 + torch.as_tensor(lam_v) * mag)
    gmag = mag * ((gate.double().abs().sum(-1) + 1) if gate is not None else 1)
    tol = 64 * ACC_EPS[dtype] * gmag + (OUT_EPS[dtype] * want.abs() + OUT_ABS[dtype])
    if kind == "ce":
        # the float64 reference's own error: logsumexp(−λQ) − log Q cancels, leaving ~ε·|log Q|/|λ|
        # (the fused op uses the expm1 form for small |λ| and is the more accurate of the two)
        lam_abs = torch.as_tensor(lam_ref, dtype=torch.float64).abs()
        tol = tol + torch.where(lam_abs > 0, 8e-16 * (math.log(quantiles.shape[-1]) + lam_abs * mag + 1)
                                / lam_abs.clamp_min(1e-300), torch.zeros_like(lam_abs))
    assert_within(out, want, tol, "exp_utility")
    if quantiles.numel():
        inputs = [qs] + ([gt] if gt is not None else [])
        grads = torch.autograd.grad(out.float().sum(), inputs)
        grads_ref = torch.autograd.grad(want.sum(), [qr] + ([gr] if gr is not None else []))
        for g, g_ref in zip(grads, grads_ref):
            assert torch.isfinite(g).all()
            tol = 64 * ACC_EPS[dtype] * gmag.amax() * (g_ref.abs().amax() + 1) + (2 * OUT_EPS[dtype] * g_ref.abs() + OUT_ABS[dtype])
            assert_within(g, g_ref, tol, "exp_utility grad")


@given(dtype=dtypes, b=st.integers(1, 5), q=st.sampled_from([1, 2, 5, 16, 17, 19]),
       bad=st.sampled_from([math.nan, math.inf, -math.inf]), row=st.integers(0, 4))
def test_fuzz_exp_utility_non_finite_lam_raises(dtype, b, q, bad, row):
    """A NaN/±inf λ — a float or any entry of a (B,) tensor — is a ValueError naming ``lam``, in
    the op and its reference twin alike (issue 14 row 3)."""
    x = torch.randn(b, q).to(dtype)
    lam = torch.rand(b)
    lam[row % b] = bad
    for fn in (prefcore.ops.exp_utility, ref.exp_utility):
        with pytest.raises(ValueError, match="lam"):
            fn(x, lam)
        with pytest.raises(ValueError, match="lam"):
            fn(x, bad)


@given(q=st.sampled_from([1, 2, 3, 15, 16, 17, 19, 33]), gated=st.booleans(),
       value=st.sampled_from([0.0, 2.0, -3.5, 1e30, -1e30, 3e-38]),
       lam=st.sampled_from([1e-3, 2.0, -2.0, 1e10, -1e10, 2e38, -2e38]))
def test_fuzz_exp_utility_constant_rows_are_exact(q, gated, value, lam):
    """Every quantile equal to v: CE = v for any λ, however large λ·v is — padding lanes and
    overflow never turn it into NaN (issue 14 row 4); the gradient is 1/Q per quantile. Limit
    (documented in the README): when λ times one ulp of the row mean overflows float32 (e.g.
    v = 1e30 with λ = 2e38) the mean's rounding is amplified to ±inf and the value is NaN."""
    assume(abs(lam * value) * 1.2e-7 < 3e38)  # λ · ulp(v) finite in float32
    x = torch.full((3, q), value, requires_grad=True)
    if gated:
        out = prefcore.ops.exp_utility(x.unsqueeze(1), lam, torch.ones(3, 1))
    else:
        out = prefcore.ops.exp_utility(x, lam)
    torch.testing.assert_close(out.detach(), torch.full((3,), value), rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.full((3, q), 1.0 / q), rtol=1e-5, atol=0)


# ---- kl_penalized_advantages and masked_whiten (restricted) ------------------------------------

@st.composite
def advantage_cases(draw):
    k = draw(st.sampled_from([2, 3, 4]))
    groups = draw(st.sampled_from([1, 2, 3]))
    b = k * groups
    # T stays small: the 2^24-token position case (issue 14 row 7) has its own regression test in
    # test_ops_advantages.py, too large for a fuzz example.
    t = draw(st.sampled_from([1, 2, 5, 17]))
    mask = draw(masks((b, t)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    lp = draw(tensors((b, t), dtype, scale=1.0))
    rlp = draw(tensors((b, t), dtype, scale=1.0))
    scores = draw(tensors((b,), torch.float32, scale=draw(st.sampled_from([0.1, 1.0, 10.0])), allow_expand=False))
    mode = draw(st.sampled_from(["rloo", "grpo", "gae"]))
    values = draw(tensors((b, t), dtype, scale=1.0)) if mode == "gae" else None
    estimator = draw(st.sampled_from(["k1", "k2", "k3", "abs"]))
    whiten = draw(st.booleans()) and int(mask.sum()) >= 2
    kl_clamp = draw(st.sampled_from([None, 0.5, 5.0]))
    gamma = draw(st.sampled_from([1.0, 0.99, 0.5]))
    lam = draw(st.sampled_from([1.0, 0.95, 0.0]))
    kl_coef = draw(st.sampled_from([0.0, 0.05, 1.0]))
    return dict(logprobs=lp, ref_logprobs=rlp, mask=mask, scores=scores, kl_coef=kl_coef, estimator=estimator,
                mode=mode, group_size=k if mode != "gae" else None, values=values, gamma=gamma, lam=lam,
                whiten=whiten, kl_clamp=kl_clamp)


@given(advantage_cases())
def test_fuzz_kl_penalized_advantages(kw):
    out = prefcore.ops.kl_penalized_advantages(**kw)
    d = {name: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for name, v in kw.items()}
    want = ref.kl_penalized_advantages(**d)
    mask = kw["mask"]
    tmag = kw["logprobs"].shape[1] + 1
    for name in ("advantages", "returns", "token_rewards", "kl"):
        got, w = getattr(out, name), getattr(want, name)
        assert got.dtype == torch.float32 and got.shape == mask.shape
        assert torch.isfinite(got).all(), name
        assert (got[~mask.bool()] == 0).all(), f"{name} outside the mask"
        scale = 1 + w.abs().amax() if w.numel() else 1.0
        if kw["whiten"] and name == "advantages":
            scale = scale * 1e2  # whitening divides by the spread of the valid advantages
        assert_within(got, w, 1e-4 * tmag * scale, name)


@given(seed=st.integers(0, 2 ** 31 - 1), shape=st.sampled_from([(2,), (7,), (3, 5), (2, 1, 9), (0, 4)]),
       dtype=dtypes, unbiased=st.booleans(), shift_mean=st.booleans(),
       spread=st.sampled_from([1e-2, 1.0, 1e3]), offset=st.sampled_from([0.0, 10.0, 1e4]))
def test_fuzz_masked_whiten(seed, shape, dtype, unbiased, shift_mean, spread, offset):
    g = torch.Generator().manual_seed(seed)
    # large common offsets (up to 1e4× the spread) lose nothing since whitening is in float64 (row 9)
    x = ((torch.randn(shape, generator=g) + offset * torch.rand((), generator=g)) * spread).to(dtype)
    assume(bool(torch.isfinite(x).all()))  # offset × spread beyond float16's range is not an input
    mask = torch.rand(shape, generator=g) > 0.3
    need = 2 if unbiased else 1
    if int(mask.sum()) < need:
        with pytest.raises(ValueError):
            prefcore.ops.masked_whiten(x, mask, unbiased=unbiased, shift_mean=shift_mean)
        return
    out = prefcore.ops.masked_whiten(x, mask, unbiased=unbiased, shift_mean=shift_mean)
    want = ref.masked_whiten(x.double(), mask, unbiased=unbiased, shift_mean=shift_mean)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out[~mask] == 0).all()
    # mean and variance in float64 (issue 14 row 9), so the only error left is the output's
    # rounding to its dtype, whatever the common offset
    rel = 1e-10 if dtype == torch.float64 else 1e-6
    assert_within(out, want, rel * (1 + want.abs()) + 2 * OUT_EPS[dtype] * want.abs() + OUT_ABS[dtype], "masked_whiten")


# ---- token_logprobs ----------------------------------------------------------------------------

@st.composite
def token_logprob_cases(draw):
    dtype = draw(dtypes)
    lead = draw(st.sampled_from([(0,), (1,), (5,), (2, 3), (3, 0)]))
    h = draw(st.sampled_from([1, 3, 8, 17]))
    v = draw(st.sampled_from([1, 2, 5, 33, 130]))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    hidden = draw(tensors((*lead, h), dtype, scale=scale))
    weight = draw(tensors((v, h), dtype, scale=scale))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    targets = torch.randint(0, v, lead, generator=torch.Generator().manual_seed(seed))
    targets = targets.int() if draw(st.booleans()) else targets
    mask = draw(masks(lead)) if draw(st.booleans()) else None
    if mask is not None:
        targets = torch.where(mask, targets, torch.full_like(targets, v + 7))  # ignored where masked
    temperature = draw(st.sampled_from([1.0, 0.5, 2.0, 1e-2]))
    return hidden, weight, targets, mask, temperature


@given(token_logprob_cases(), st.booleans())
def test_fuzz_token_logprobs(case, entropy):
    """Fused vs the float64 reference on the same (rounded) inputs: leading dims incl. empty ones,
    broadcast/strided views, all-false and single-true masks with out-of-range ids under them, four
    dtypes, small temperatures; values, entropy and both gradients; masked positions exactly 0."""
    hidden, weight, targets, mask, temperature = case
    hs, ws = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    out = prefcore.ops.token_logprobs(hs, ws, targets, mask=mask, temperature=temperature, return_entropy=entropy)
    hr, wr = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    want = ref.token_logprobs(hr, wr, targets, mask=mask, temperature=temperature, return_entropy=entropy)
    outs, wants = (out, want) if entropy else ((out,), (want,))
    zmag = (hr.detach().abs().amax() if hr.numel() else torch.tensor(0.0)) * (
        wr.detach().abs().amax() if wr.numel() else 0.0) * hidden.shape[-1] / temperature + 1
    for got, w in zip(outs, wants):
        assert got.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        assert got.shape == targets.shape and torch.isfinite(got).all()
        if mask is not None:
            assert (got[~mask] == 0).all()
        assert_within(got, w, 64 * ACC_EPS[hidden.dtype] * float(zmag) * (1 + w.abs()), "token_logprobs")
    if targets.numel():
        total = sum(o.sum() for o in outs)
        total_ref = sum(o.sum() for o in wants)
        gh, gw = torch.autograd.grad(total, (hs, ws))
        gh_r, gw_r = torch.autograd.grad(total_ref, (hr, wr))
        for g, g_ref in zip((gh, gw), (gh_r, gw_r)):
            assert torch.isfinite(g).all()
            tol = 64 * ACC_EPS[hidden.dtype] * float(zmag) * (g_ref.abs().amax() + 1) + 2 * OUT_EPS[hidden.dtype] * g_ref.abs() + OUT_ABS[hidden.dtype]
            assert_within(g, g_ref, tol, "token_logprobs grad")
        if mask is not None:
            assert (gh[~mask] == 0).all()
