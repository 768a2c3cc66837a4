"""prefcore.ops.token_logprobs against an fp64 brute-force truth (DESIGN §3.5).

The truth is the reference (``log_softmax(h @ Wᵀ / T).gather``, materialising the logits) run in
float64. Tolerances: float64 matches to 1e-10 (rel) / 1e-11 (abs); float32 to 1e-4 / 2e-5 —
the products are summed in a different order, and logits of size ~10–50 carry ~1e-6 of fp32
rounding each. bfloat16/float16: flash-attention's rule, at most 2× the error plain PyTorch
makes in that dtype (+ slack).
"""
from __future__ import annotations

import math

import pytest
import torch

import prefcore
from prefcore.ops import reference as ref
from python_tests.helpers import DEVICES, assert_within_lowp_rule, noncontiguous, run_in_every_cpu_isa

TIGHT = {torch.float64: dict(rtol=1e-10, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=2e-5)}
tlp = prefcore.ops.token_logprobs


def _inputs(lead, h, v, dtype=torch.float64, device="cpu", scale=1.0, masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, h, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(max(h, 1))).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, lead, generator=g).to(device)
    mask = None
    if masked:
        mask = (torch.rand(lead, generator=g) > 0.4).to(device)
        targets = torch.where(mask, targets, torch.full_like(targets, -7))  # masked ids out of range: ignored
    return hidden, weight, targets, mask


def _truth(hidden, weight, targets, mask=None, temperature=1.0):
    return ref.token_logprobs(hidden.double(), weight.double(), targets, mask=mask, temperature=temperature,
                              return_entropy=True)


# ---- values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead,h,v", [((7,), 16, 5), ((3, 5), 8, 33), ((37,), 24, 4099), ((3,), 32, 32768),
                                      ((2, 0), 8, 33), ((0,), 4, 5), ((300,), 12, 1030)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_fp64_truth(dtype, lead, h, v, masked):
    hidden, weight, targets, mask = _inputs(lead, h, v, dtype, scale=3.0, masked=masked)
    for temperature in (1.0, 0.7):
        lp, ent = tlp(hidden, weight, targets, mask=mask, temperature=temperature, return_entropy=True)
        lp_t, ent_t = _truth(hidden, weight, targets, mask, temperature)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert lp.dtype == ent.dtype == out_dtype and lp.shape == ent.shape == tuple(lead)
        torch.testing.assert_close(lp.double(), lp_t, **TIGHT[dtype])
        torch.testing.assert_close(ent.double(), ent_t, **TIGHT[dtype])
        # logprobs alone (no entropy sums) agree with the pair
        torch.testing.assert_close(tlp(hidden, weight, targets, mask=mask, temperature=temperature), lp, rtol=0, atol=0)


def test_bounds_logprob_nonpositive_entropy_in_0_logv():
    for v in (5, 33, 4099):
        hidden, weight, targets, _ = _inputs((64,), 16, v, torch.float32, scale=4.0, seed=v)
        lp, ent = tlp(hidden, weight, targets, return_entropy=True)
        assert (lp <= 0).all() and (ent >= 0).all() and (ent <= math.log(v) * (1 + 1e-6)).all()
    # uniform logits: entropy = log V exactly, logprob = −log V
    hidden = torch.zeros(3, 8)
    lp, ent = tlp(hidden, torch.randn(33, 8), torch.tensor([0, 5, 32]), return_entropy=True)
    torch.testing.assert_close(ent, torch.full((3,), math.log(33)))
    torch.testing.assert_close(lp, torch.full((3,), -math.log(33)))


def test_noncontiguous_inputs():
    hidden, weight, targets, mask = _inputs((6, 9), 10, 600, torch.float32, masked=True)
    nh = noncontiguous(hidden)
    nw = weight.T.contiguous().T  # (V, H) with column-major strides
    nt = noncontiguous(targets)
    assert not nw.is_contiguous()
    lp, ent = tlp(nh, nw, nt, mask=noncontiguous(mask), return_entropy=True)
    lp_t, ent_t = _truth(hidden, weight, targets, mask)
    torch.testing.assert_close(lp.double(), lp_t, **TIGHT[torch.float32])
    torch.testing.assert_close(ent.double(), ent_t, **TIGHT[torch.float32])


def test_int32_targets_and_1d_hidden():
    hidden, weight, targets, _ = _inputs((5,), 8, 40, torch.float64)
    torch.testing.assert_close(tlp(hidden, weight, targets.int()), tlp(hidden, weight, targets), rtol=0, atol=0)
    out = tlp(hidden[0], weight, targets[0])
    assert out.shape == ()
    torch.testing.assert_close(out, _truth(hidden[0], weight, targets[0])[0], **TIGHT[torch.float64])


def test_logits_in_the_thousands_are_stable():
    hidden, weight, targets, _ = _inputs((40,), 16, 1500, torch.float32, scale=1.0, seed=3)
    hidden = hidden * 2000.0  # logits of size ~±5000
    lp, ent = tlp(hidden, weight, targets, return_entropy=True)
    lp_t, ent_t = _truth(hidden, weight, targets)
    assert lp_t.abs().max() > 1000
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    # relative to the logit scale: fp32 rounding of logits ~5000 is ~5e-4
    torch.testing.assert_close(lp.double(), lp_t, rtol=1e-5, atol=5e-3)
    torch.testing.assert_close(ent.double(), ent_t, rtol=1e-5, atol=5e-3)
    hidden.requires_grad_()
    weight.requires_grad_()
    lp, ent = tlp(hidden, weight, targets, return_entropy=True)
    gh, gw = torch.autograd.grad((lp + ent).sum(), (hidden, weight))
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_plain_pytorch(dtype):
    hidden, weight, targets, mask = _inputs((96,), 64, 2053, torch.float64, scale=2.0, masked=True)
    lp_t, ent_t = _truth(hidden, weight, targets, mask)
    hl, wl = hidden.to(dtype), weight.to(dtype)
    lp, ent = tlp(hl, wl, targets, mask=mask, return_entropy=True)
    assert lp.dtype == torch.float32
    lp_r, ent_r = ref.token_logprobs(hl, wl, targets, mask=mask, return_entropy=True)
    assert_within_lowp_rule(lp, lp_r, lp_t, dtype)
    assert_within_lowp_rule(ent, ent_r, ent_t, dtype)
    # gradients: against the fp64 truth's gradients (upstream ones), same rule
    hl.requires_grad_()
    wl.requires_grad_()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = tlp(hl, wl, targets, mask=mask, return_entropy=True)
    g_ours = torch.autograd.grad((lp + 0.3 * ent).sum(), (hl, wl))
    lp_r, ent_r = ref.token_logprobs(hl, wl, targets, mask=mask, return_entropy=True)
    g_ref = torch.autograd.grad((lp_r + 0.3 * ent_r).sum(), (hl, wl))
    lp_t, ent_t = ref.token_logprobs(h64, w64, targets, mask=mask, return_entropy=True)
    g_t = torch.autograd.grad((lp_t + 0.3 * ent_t).sum(), (h64, w64))
    for a, b, t in zip(g_ours, g_ref, g_t):
        assert a.dtype == dtype
        assert_within_lowp_rule(a, b, t, dtype)


# ---- gradients ------------------------------------------------------------------------------

def test_gradcheck_fp64_both_outputs():
    hidden, weight, targets, mask = _inputs((2, 3), 4, 7, torch.float64, masked=True)
    mask[0, 0] = True
    targets[0, 0] = 6
    hidden.requires_grad_()
    weight.requires_grad_()
    f = lambda h, w: tlp(h, w, targets, mask=mask, temperature=0.8, return_entropy=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (hidden, weight))
    valid_t = targets.clamp(0)  # every token valid below: no out-of-range ids
    f1 = lambda h, w: tlp(h, w, valid_t, temperature=1.3)  # noqa: E731
    assert torch.autograd.gradcheck(f1, (hidden, weight))
    f2 = lambda h, w: tlp(h, w, valid_t, return_entropy=True)[1]  # noqa: E731  entropy only
    assert torch.autograd.gradcheck(f2, (hidden, weight))


@pytest.mark.parametrize("need", ["both", "hidden", "weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_reference_many_tiles(need, dtype):
    # 300 tokens (two token blocks), V = 1100 (three vocabulary tiles), masked tokens in between
    hidden, weight, targets, mask = _inputs((3, 100), 20, 1100, dtype, scale=2.0, masked=True)
    hidden.requires_grad_(need in ("both", "hidden"))
    weight.requires_grad_(need in ("both", "weight"))
    leaves = [t for t in (hidden, weight) if t.requires_grad]
    g = torch.Generator().manual_seed(1)
    gl, ge = torch.randn(3, 100, generator=g, dtype=torch.float64), torch.randn(3, 100, generator=g, dtype=torch.float64)
    lp, ent = tlp(hidden, weight, targets, mask=mask, temperature=0.9, return_entropy=True)
    ours = torch.autograd.grad((lp * gl.to(lp.dtype)).sum() + (ent * ge.to(lp.dtype)).sum(), leaves)
    h64 = hidden.detach().double().requires_grad_(hidden.requires_grad)
    w64 = weight.detach().double().requires_grad_(weight.requires_grad)
    lp_t, ent_t = ref.token_logprobs(h64, w64, targets, mask=mask, temperature=0.9, return_entropy=True)
    truth = torch.autograd.grad((lp_t * gl).sum() + (ent_t * ge).sum(), [t for t in (h64, w64) if t.requires_grad])
    for a, b, leaf in zip(ours, truth, leaves):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape
        torch.testing.assert_close(a.double(), b, **TIGHT[dtype])
    if hidden.requires_grad:
        assert (ours[0][~mask] == 0).all()  # masked tokens get exactly zero gradient


def test_weight_without_grad_and_grad_from_one_output():
    hidden, weight, targets, _ = _inputs((9,), 6, 50, torch.float64)
    hidden.requires_grad_()
    lp, ent = tlp(hidden, weight, targets, return_entropy=True)
    ent.sum().backward()  # only the entropy output receives a gradient
    assert weight.grad is None
    h2 = hidden.detach().clone().requires_grad_()
    ref.token_logprobs(h2, weight, targets, return_entropy=True)[1].sum().backward()
    torch.testing.assert_close(hidden.grad, h2.grad, **TIGHT[torch.float64])


def test_masked_rows_zero_and_ignored():
    hidden, weight, targets, mask = _inputs((4, 6), 8, 21, torch.float32, masked=True)
    targets = torch.where(mask, targets, torch.full_like(targets, 10**9))
    hidden.requires_grad_()
    weight.requires_grad_()
    lp, ent = tlp(hidden, weight, targets, mask=mask, return_entropy=True)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all() and (lp[mask] < 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (hidden.grad[~mask] == 0).all()
    # the masked tokens' hidden states do not influence anything
    h2 = hidden.detach().clone()
    h2[~mask] = 1e6
    torch.testing.assert_close(tlp(h2, weight.detach(), targets, mask=mask), lp.detach(), rtol=0, atol=0)
    # all masked: zeros, zero gradient
    none = torch.zeros_like(mask)
    out = tlp(hidden, weight, targets, mask=none)
    assert (out == 0).all()
    out.sum().backward()


def test_no_grad_equals_grad_forward_and_double_backward_raises():
    hidden, weight, targets, _ = _inputs((5,), 6, 30, torch.float64)
    with torch.no_grad():
        a = tlp(hidden, weight, targets)
    hidden.requires_grad_()
    b = tlp(hidden, weight, targets)
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    (gh,) = torch.autograd.grad(b.sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gh.sum().backward()


# ---- torch.library / torch.compile ----------------------------------------------------------

def test_opcheck():
    hidden, weight, targets, mask = _inputs((6,), 5, 9, torch.float32, masked=True)
    mask[0] = True
    for m, t in ((None, targets.clamp(0)), (mask, targets)):
        for ent in (False, True):
            h = hidden.clone().requires_grad_()
            w = weight.clone().requires_grad_()
            torch.library.opcheck(torch.ops.prefcore.token_logprobs, (h, w, t, m, 0.9, ent))
    lp, ent, lse = torch.ops.prefcore.token_logprobs(hidden, weight, targets, mask, 0.9, True)
    torch.library.opcheck(torch.ops.prefcore._token_logprobs_backward,
                          (torch.randn(6), torch.randn(6), hidden, weight, targets, mask, lse, ent, 0.9, True, True))
    torch.library.opcheck(torch.ops.prefcore._token_logprobs_backward,
                          (torch.randn(6), None, hidden, weight, targets.clamp(0), None, lse, ent[:0], 1.0, True, False))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def objective(h, w, t, m):
        lp, ent = tlp(h, w, t, mask=m, temperature=0.7, return_entropy=True)
        return (lp + 0.1 * ent).sum()

    hidden, weight, targets, mask = _inputs((2, 5), 8, 40, torch.float32, masked=True)
    hidden.requires_grad_()
    weight.requires_grad_()
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    out_c = compiled(hidden, weight, targets, mask)
    grads_c = torch.autograd.grad(out_c, (hidden, weight))
    out_e = objective(hidden, weight, targets, mask)
    grads_e = torch.autograd.grad(out_e, (hidden, weight))
    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


# ---- bad input ------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    hidden, weight, targets, mask = _inputs((4,), 6, 10, torch.float32, masked=True)
    cases = [
        (dict(weight=torch.randn(10, 5)), ValueError, "weight must have shape"),
        (dict(weight=torch.randn(10)), ValueError, "weight must have shape"),
        (dict(weight=torch.randn(0, 6)), ValueError, "at least one vocabulary row"),
        (dict(weight=weight.double()), ValueError, "weight must have the dtype of hidden"),
        (dict(hidden=torch.randn(4, 6).int()), ValueError, "hidden must be a floating tensor"),
        (dict(hidden=torch.tensor(1.0)), ValueError, "hidden must have shape"),
        (dict(targets=targets.float()), ValueError, "targets must be an integer tensor"),
        (dict(targets=targets[:3]), ValueError, "targets must have shape"),
        (dict(targets=[1, 2, 3, 4]), TypeError, "targets must be a torch.Tensor"),
        (dict(mask=mask.float()), ValueError, "mask must be a bool tensor"),
        (dict(mask=mask[:2]), ValueError, "mask must have shape"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature="1"), ValueError, "temperature must be a float"),
        (dict(targets=torch.tensor([0, 1, 10, 2])), RuntimeError, r"targets must lie in \[0, V\) = \[0, 10\)"),
        (dict(targets=torch.tensor([0, -1, 3, 2])), RuntimeError, r"targets must lie in \[0, V\)"),
    ]
    for change, exc, msg in cases:
        kw = dict(hidden=hidden, weight=weight, targets=targets)
        kw.update(change)
        with pytest.raises(exc, match=msg):
            tlp(kw["hidden"], kw["weight"], kw["targets"], mask=change.get("mask"),
                temperature=change.get("temperature", 1.0))
    if torch.device("meta") != hidden.device:
        with pytest.raises(ValueError, match="weight must be on the same device as hidden"):
            tlp(hidden, weight.to("meta"), targets)
    # the C++ op checks on its own, too (no out-of-bounds read when called directly)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.prefcore.token_logprobs(hidden, torch.randn(10, 5), targets, None, 1.0, False)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        torch.ops.prefcore.token_logprobs(hidden, weight, targets, None, -2.0, False)
    with pytest.raises(RuntimeError, match="targets must lie in"):
        torch.ops.prefcore.token_logprobs(hidden, weight, torch.tensor([0, 1, 99, 2]), None, 1.0, False)


# ---- every ISA clone ------------------------------------------------------------------------

def test_every_cpu_isa_clone_matches_truth():
    script = (
        "import torch, prefcore\n"
        "from prefcore.ops import reference as ref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "h = torch.randn(70, 12, generator=g, dtype=torch.float64) * 2; w = torch.randn(1037, 12, generator=g, dtype=torch.float64) / 3\n"
        "t = torch.randint(0, 1037, (70,), generator=g); m = torch.rand(70, generator=g) > 0.3\n"
        "lp_t, e_t = ref.token_logprobs(h, w, t, mask=m, temperature=0.8, return_entropy=True)\n"
        "hh = h.clone().requires_grad_(); ww = w.clone().requires_grad_()\n"
        "gt = torch.autograd.grad(*[(lambda a, b: a.sum() + 0.5 * b.sum())(*ref.token_logprobs(hh, ww, t, mask=m, temperature=0.8, return_entropy=True))], (hh, ww))\n"
        "for dt, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):\n"
        "  hd = h.to(dt).requires_grad_(); wd = w.to(dt).requires_grad_()\n"
        "  lp, e = prefcore.ops.token_logprobs(hd, wd, t, mask=m, temperature=0.8, return_entropy=True)\n"
        "  assert (lp.double() - lp_t).abs().max() < tol, dt\n"
        "  assert (e.double() - e_t).abs().max() < tol, dt\n"
        "  gh, gw = torch.autograd.grad(lp.sum() + 0.5 * e.sum(), (hd, wd))\n"
        "  assert (gh.double() - gt[0]).abs().max() < tol and (gw.double() - gt[1]).abs().max() < tol, dt\n"
        "print(prefcore._C.cpu_isa())\n"
    )
    run_in_every_cpu_isa(script)


# ---- CUDA -----------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_matches_truth(dtype):
    hidden, weight, targets, mask = _inputs((3, 211), 64, 4099, torch.float64, scale=2.0, masked=True)
    lp_t, ent_t = _truth(hidden, weight, targets, mask, 0.8)
    hd = hidden.to("cuda", dtype).requires_grad_()
    wd = weight.to("cuda", dtype).requires_grad_()
    td, md = targets.cuda(), mask.cuda()
    lp, ent = tlp(hd, wd, td, mask=md, temperature=0.8, return_entropy=True)
    gh, gw = torch.autograd.grad(lp.sum() + 0.3 * ent.sum(), (hd, wd))
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lpt, entt = ref.token_logprobs(h64, w64, targets, mask=mask, temperature=0.8, return_entropy=True)
    gt = torch.autograd.grad(lpt.sum() + 0.3 * entt.sum(), (h64, w64))
    if dtype in TIGHT:
        tol = TIGHT[dtype]
        torch.testing.assert_close(lp.cpu().double(), lp_t, **tol)
        torch.testing.assert_close(ent.cpu().double(), ent_t, **tol)
        torch.testing.assert_close(gh.cpu().double(), gt[0], **tol)
        torch.testing.assert_close(gw.cpu().double(), gt[1], **tol)
    else:
        hl, wl = hidden.to("cuda", dtype).requires_grad_(), weight.to("cuda", dtype).requires_grad_()
        lp_r, ent_r = ref.token_logprobs(hl, wl, td, mask=md, temperature=0.8, return_entropy=True)
        gr = torch.autograd.grad(lp_r.sum() + 0.3 * ent_r.sum(), (hl, wl))
        assert_within_lowp_rule(lp.cpu(), lp_r.cpu(), lp_t, dtype)
        assert_within_lowp_rule(ent.cpu(), ent_r.cpu(), ent_t, dtype)
        assert_within_lowp_rule(gh.cpu(), gr[0].cpu(), gt[0], dtype)
        assert_within_lowp_rule(gw.cpu(), gr[1].cpu(), gt[1], dtype)
    assert (gh[~md] == 0).all()


@pytest.mark.cuda
def test_cuda_bad_target_and_empty():
    hidden, weight, targets, mask = _inputs((8,), 16, 50, torch.float32, device="cuda", masked=True)
    bad = torch.where(mask, torch.full_like(targets, 50), targets)
    with pytest.raises(RuntimeError, match="targets must lie in"):
        tlp(hidden, weight, bad, mask=mask)
    out = tlp(hidden[:0], weight, targets[:0])
    assert out.shape == (0,)
    none = torch.zeros_like(mask)
    assert (tlp(hidden, weight, targets, mask=none) == 0).all()
