"""prefcore.ops.kl_penalized_advantages, masked_whiten and the sample-layout helpers against a
naive float64 per-row loop written here, the pure-PyTorch reference, and closed forms
(DESIGN §3.4).

Tolerances. Outputs are float32, so float32/float64 inputs match the float64 truth to
rtol 1e-5 / atol 2e-6·(1 + max|truth|) (float32 summation order and output rounding only).
bfloat16/float16 inputs: flash-attention's rule — our error against the float64 truth (computed
from the same rounded inputs) is at most 2× the error of the reference run in that dtype, plus
slack. Long rows (T = 8192, float32): GAE with γ = λ = 1 sums up to 8192 terms per token, so
the bound is atol 1e-5·(1 + max|truth|)·sqrt(T/64).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import prefcore
from prefcore.ops import Advantages
from prefcore.ops import reference as ref
from python_tests.helpers import (ROOT, DEVICES, DTYPES, assert_within_lowp_rule, max_abs_err, noncontiguous,
                                  run_in_every_cpu_isa)

ESTIMATORS = ("k1", "k2", "k3", "abs")
MODES = ("rloo", "grpo", "gae")


# ---- inputs and the independent float64 loop ------------------------------------------------

def make_inputs(b: int, t: int, *, seed: int = 0, dtype=torch.float32, device="cpu", garbage: bool = True):
    """Policy/reference log-probs with per-token differences of a few tenths (some > 0.5 so k3
    takes both branches), right-padded masks with interior zeros, one row with no valid token
    (row 1) and — when ``garbage`` — ±inf/NaN under the mask that must never leak."""
    g = torch.Generator().manual_seed(seed)
    lp = -2.0 + torch.randn(b, t, generator=g, dtype=torch.float64)
    rf = lp + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)
    lens = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lens[:, None]) & (torch.rand(b, t, generator=g) > 0.2)
    if b > 1:
        mask[1] = False
    scores = torch.randn(b, generator=g, dtype=torch.float64)
    values = torch.randn(b, t, generator=g, dtype=torch.float64)
    lp, rf, values = (x.to(dtype).double() for x in (lp, rf, values))  # the values the op sees
    if garbage:
        lp = torch.where(mask, lp, torch.tensor(-math.inf, dtype=torch.float64))
        rf = torch.where(mask, rf, torch.tensor(math.nan, dtype=torch.float64))
        values = torch.where(mask, values, torch.tensor(math.inf, dtype=torch.float64))
    sc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [x.to(device) for x in (lp.to(dtype), rf.to(dtype), mask, scores.to(sc_dtype), values.to(dtype))]


def naive_fp64(lp, rf, mask, scores, *, values=None, kl_coef, estimator="k1", mode="rloo", group_size=None,
               gamma=1.0, lam=1.0, whiten=False, kl_clamp=None):
    """DESIGN §3.4 token by token in Python float64 (no torch maths)."""
    lp, rf, mask, scores = lp.double().tolist(), rf.double().tolist(), mask.bool().tolist(), scores.double().tolist()
    values = values.double().tolist() if values is not None else None
    b_n = len(lp)
    t_n = len(lp[0]) if b_n else 0
    kl = [[0.0] * t_n for _ in range(b_n)]
    r = [[0.0] * t_n for _ in range(b_n)]
    for b in range(b_n):
        valid = [t for t in range(t_n) if mask[b][t]]
        last = valid[-1] if valid else -1
        for t in valid:
            d = lp[b][t] - rf[b][t]
            k = {"k1": d, "k2": d * d / 2, "k3": math.expm1(-d) + d, "abs": abs(d)}[estimator]
            if kl_clamp is not None:
                k = min(max(k, -kl_clamp), kl_clamp)
            kl[b][t] = k
            r[b][t] = -kl_coef * k + (scores[b] if t == last else 0.0)
    adv = [[0.0] * t_n for _ in range(b_n)]
    ret = [[0.0] * t_n for _ in range(b_n)]
    if mode in ("rloo", "grpo"):
        k = group_size
        R = [math.fsum(row) for row in r]
        for g0 in range(0, b_n, k):
            grp = R[g0:g0 + k]
            mean = math.fsum(grp) / k
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in grp) / (k - 1))
            for j in range(k):
                a = grp[j] - (math.fsum(grp) - grp[j]) / (k - 1) if mode == "rloo" else (grp[j] - mean) / (std + 1e-6)
                for t in range(t_n):
                    if mask[g0 + j][t]:
                        adv[g0 + j][t] = ret[g0 + j][t] = a
    else:
        for b in range(b_n):
            g = nv = 0.0
            for t in reversed(range(t_n)):
                if not mask[b][t]:
                    continue
                delta = r[b][t] + gamma * nv - values[b][t]
                g = delta + gamma * lam * g
                nv = values[b][t]
                adv[b][t] = g
                ret[b][t] = g + values[b][t]
    if whiten:
        flat = [adv[b][t] for b in range(b_n) for t in range(t_n) if mask[b][t]]
        mean = math.fsum(flat) / len(flat)
        var = math.fsum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
        adv = [[(adv[b][t] - mean) / math.sqrt(var + 1e-8) if mask[b][t] else 0.0 for t in range(t_n)] for b in range(b_n)]
    as_t = lambda x: torch.tensor(x, dtype=torch.float64).reshape(b_n, t_n)  # noqa: E731
    return as_t(adv), as_t(ret), as_t(r), as_t(kl)


def kwargs_for(mode, *, k=4, estimator="k1", whiten=False, kl_clamp=None, values=None, gamma=0.97, lam=0.9, kl_coef=0.1):
    kw = dict(kl_coef=kl_coef, estimator=estimator, mode=mode, whiten=whiten, kl_clamp=kl_clamp)
    if mode == "gae":
        kw.update(values=values, gamma=gamma, lam=lam)
    else:
        kw.update(group_size=k)
    return kw


def assert_close_f32(out: torch.Tensor, truth: torch.Tensor, scale: float = 1.0, what: str = "") -> None:
    assert out.dtype == torch.float32
    atol = 2e-6 * scale * (1.0 + (truth.abs().max().item() if truth.numel() else 0.0))
    torch.testing.assert_close(out.double().cpu(), truth.cpu(), rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


# ---- parity with the naive loop ---------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("whiten", [False, True])
@pytest.mark.parametrize("kl_clamp", [None, 0.15])
def test_matches_naive_float64_loop(mode, estimator, whiten, kl_clamp):
    lp, rf, mask, scores, values = make_inputs(12, 29, seed=3, dtype=torch.float64)
    kw = kwargs_for(mode, k=4, estimator=estimator, whiten=whiten, kl_clamp=kl_clamp,
                    values=values if mode == "gae" else None)
    out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
    truth = naive_fp64(lp, rf, mask, scores, **kw)
    for name, o, tr in zip(out._fields, out, truth):
        assert o.shape == (12, 29) and torch.isfinite(o).all(), name
        assert_close_f32(o, tr, what=name)
        assert (o[~mask] == 0).all(), f"{name} must be 0 outside the mask"
    assert (out.advantages[1] == 0).all() and (out.token_rewards[1] == 0).all()  # the empty row
    if kl_clamp is not None:
        assert out.kl.abs().max() <= kl_clamp


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("mode", ["rloo", "grpo"])
def test_group_sizes_match_naive(k, mode):
    lp, rf, mask, scores, values = make_inputs(3 * k, 17, seed=k)
    kw = kwargs_for(mode, k=k, estimator="k3")
    out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
    truth = naive_fp64(lp, rf, mask, scores, **kw)
    for name, o, tr in zip(out._fields, out, truth):
        assert_close_f32(o, tr, what=name)


def test_empty_row_counts_in_its_group_baseline():
    # Closed form: group of 3, row 1 has no valid token (R_1 = 0): A_0 = R_0 − (R_1 + R_2)/2 = R_0 − R_2/2.
    lp = torch.zeros(3, 4)
    rf = torch.zeros(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, 7.0, -1.0])
    out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, kl_coef=0.5, group_size=3)
    assert out.advantages[0, 0].item() == pytest.approx(2.0 - (0.0 - 1.0) / 2)
    assert out.advantages[2, 0].item() == pytest.approx(-1.0 - (2.0 + 0.0) / 2)
    assert (out.advantages[1] == 0).all() and (out.returns[1] == 0).all() and (out.token_rewards[1] == 0).all()
    assert out.token_rewards[0].tolist() == [0.0, 2.0, 0.0, 0.0]  # the score sits on the last valid token
    g = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, kl_coef=0.5, group_size=3, mode="grpo")
    r = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)
    expect = (r - r.mean()) / (r.std() + 1e-6)
    torch.testing.assert_close(g.advantages[:, 0].double(), torch.where(mask[:, 0], expect, 0.0), rtol=1e-6, atol=1e-6)


# ---- dtypes, devices, the reference ------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_matches_reference_in_every_dtype(device, dtype, mode, estimator):
    lp, rf, mask, scores, values = make_inputs(16, 53, seed=5, dtype=dtype, device=device, garbage=False)
    kw = kwargs_for(mode, k=4, estimator=estimator, whiten=True, kl_clamp=2.0, values=values if mode == "gae" else None)
    out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
    kw64 = {**kw, "values": values.double() if mode == "gae" else None}
    truth = ref.kl_penalized_advantages(lp.double(), rf.double(), mask, scores, **kw64)
    for name, o, tr in zip(out._fields, out, truth):
        assert o.dtype == torch.float32 and o.device == lp.device
        if dtype in (torch.float32, torch.float64):
            assert_close_f32(o, tr, what=name)
        else:  # plain PyTorch in this dtype is the baseline
            kwl = {**kw, "values": values if mode == "gae" else None}
            base = getattr(ref.kl_penalized_advantages(lp.cpu(), rf.cpu(), mask.cpu(), scores.to(dtype).cpu(),
                                                       **{k_: (v.cpu() if isinstance(v, torch.Tensor) else v) for k_, v in kwl.items()}),
                           name)
            assert_within_lowp_rule(o.cpu(), base.cpu(), tr.cpu(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["rloo", "gae"])
def test_long_rows_float32(device, mode):
    t = 8192
    lp, rf, mask, scores, values = make_inputs(4, t, seed=11, device=device, garbage=False)
    mask[0] = True  # one full-length row
    kw = kwargs_for(mode, k=2, estimator="k2", values=values if mode == "gae" else None, gamma=1.0, lam=1.0)
    out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
    kw64 = {**kw, "values": values.double() if mode == "gae" else None}
    truth = ref.kl_penalized_advantages(lp.double(), rf.double(), mask, scores, **kw64)
    for name, o, tr in zip(out._fields, out, truth):
        assert_close_f32(o, tr, scale=5.0 * math.sqrt(t / 64), what=name)


def test_reference_vectorised_gae_equals_loop():
    lp, rf, mask, scores, values = make_inputs(6, 700, seed=2, dtype=torch.float64)
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95), (0.5, 0.3), (1.0, 0.0)):
        kw = kwargs_for("gae", values=values, gamma=gamma, lam=lam)
        a = ref.kl_penalized_advantages(lp, rf, mask, scores, **kw)
        b = ref.kl_penalized_advantages(lp, rf, mask, scores, gae_impl="vectorized", **kw)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_noncontiguous_mixed_dtypes_and_mask_dtypes():
    lp, rf, mask, scores, values = make_inputs(8, 33, seed=4, garbage=False)
    kw = kwargs_for("gae", values=values)
    base = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
    nc = prefcore.ops.kl_penalized_advantages(noncontiguous(lp), noncontiguous(rf), noncontiguous(mask), scores,
                                              **{**kw, "values": noncontiguous(values)})
    for a, b in zip(base, nc):
        assert torch.equal(a, b)
    for mdt in (torch.uint8, torch.int64, torch.float32):
        out = prefcore.ops.kl_penalized_advantages(lp, rf, mask.to(mdt), scores, **kw)
        for a, b in zip(base, out):
            assert torch.equal(a, b)
    # mixed input dtypes are promoted (bf16 values with float32 log-probs → float32 maths)
    v16 = values.to(torch.bfloat16)
    mixed = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores.double(), **{**kw, "values": v16})
    same = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **{**kw, "values": v16.float()})
    for a, b in zip(mixed, same):
        assert torch.equal(a, b)


def test_empty_shapes_and_grad_inputs():
    for b, t in ((0, 5), (4, 0)):
        lp = torch.randn(b, t, requires_grad=True)
        out = prefcore.ops.kl_penalized_advantages(lp, lp.detach(), torch.ones(b, t, dtype=torch.bool), torch.randn(b),
                                                   kl_coef=0.1, group_size=2)
        assert all(o.shape == (b, t) and o.dtype == torch.float32 for o in out)
    lp = torch.randn(4, 6, requires_grad=True)
    out = prefcore.ops.kl_penalized_advantages(lp, torch.randn(4, 6), torch.ones(4, 6, dtype=torch.bool), torch.randn(4),
                                               kl_coef=0.1, group_size=2)
    assert not any(o.requires_grad for o in out)  # no autograd: inputs are constants


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 255, 256, 300, 1000])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu_across_chunk_boundaries(t, mode):
    # T around the CUDA GAE chunk (32 lanes × 8 tokens = 256); B not a multiple of the 8 rows per block.
    lp, rf, mask, scores, values = make_inputs(36, t, seed=t)
    mask[0, 0] = mask[2, 0] = True  # at least 2 valid tokens even for T = 1
    lp[0, 0] = rf[0, 0] = lp[2, 0] = rf[2, 0] = -1.0
    values[0, 0] = values[2, 0] = 0.5
    for estimator in ESTIMATORS:
        for whiten in (False, True):
            kw = kwargs_for(mode, k=4, estimator=estimator, whiten=whiten, kl_clamp=1.0,
                            values=values if mode == "gae" else None)
            cpu = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
            kw_cuda = {**kw, "values": values.cuda() if mode == "gae" else None}
            gpu = prefcore.ops.kl_penalized_advantages(lp.cuda(), rf.cuda(), mask.cuda(), scores.cuda(), **kw_cuda)
            for name, a, b in zip(cpu._fields, cpu, gpu):
                assert b.is_cuda and b.dtype == torch.float32
                assert_close_f32(b.cpu(), a.double(), scale=2.0, what=f"{name} {estimator} whiten={whiten}")


@pytest.mark.cuda
def test_cuda_value_errors_and_determinism():
    lp, rf, mask, scores, values = make_inputs(8, 700, seed=3, device="cuda")
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1"):
        prefcore.ops.kl_penalized_advantages(lp, rf, mask.float() * 0.5, scores, kl_coef=0.1, group_size=2)
    one = torch.zeros_like(mask)
    one[0, 0] = True
    with pytest.raises(ValueError, match=r"whiten=True needs at least 2 valid tokens \(mask has 1\)"):
        prefcore.ops.kl_penalized_advantages(lp, rf, one, scores, kl_coef=0.1, mode="gae", values=values, whiten=True)
    with pytest.raises(ValueError, match=r"masked_whiten needs at least 2 valid tokens \(mask has 1\)"):
        prefcore.ops.masked_whiten(values, one)
    kw = kwargs_for("gae", whiten=True, values=values)
    a = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
    b = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    x = torch.randn(3, 50000, device="cuda")
    m = torch.rand(3, 50000, device="cuda") > 0.5
    assert torch.equal(prefcore.ops.masked_whiten(x, m), prefcore.ops.masked_whiten(x, m))


# ---- closed forms -------------------------------------------------------------------------------

def test_gae_gamma_lambda_one_is_reverse_cumsum_minus_value():
    # γ = λ = 1: A_t = Σ_{s ≥ t valid} r_s − V_t (the next-value terms telescope).
    lp, rf, mask, scores, values = make_inputs(10, 64, seed=7, dtype=torch.float64)
    out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kwargs_for("gae", values=values, gamma=1.0, lam=1.0))
    kl = ref.kl_penalty(lp, rf, mask, "k1")
    r = ref.token_rewards(kl, mask, scores, 0.1)
    expect = torch.where(mask, r.flip(-1).cumsum(-1).flip(-1) - torch.where(mask, values, 0.0), 0.0)
    assert_close_f32(out.advantages, expect)
    assert_close_f32(out.returns, torch.where(mask, r.flip(-1).cumsum(-1).flip(-1), 0.0))


def span_masks(b: int, t: int, seed: int) -> torch.Tensor:
    """Masks whose valid tokens form one contiguous span per row (the CPU kernel's chunked GAE
    path): right-padded, left-padded, a middle span, the full row, one token at either end,
    spans ending on and next to 16-token chunk boundaries, and an empty row (row 1)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, t, (b,), generator=g)
    hi = torch.randint(0, t, (b,), generator=g)
    first, last = torch.minimum(lo, hi), torch.maximum(lo, hi)
    fixed = [(0, t - 1), (0, -1), (0, t // 2), (t // 3, t - 1), (0, 0), (t - 1, t - 1),
             (0, min(t - 1, 15)), (min(t - 1, 16), t - 1), (min(t - 1, 17), min(t - 1, 31))]
    for i, (f, l) in enumerate(fixed[:b]):
        first[i], last[i] = f, l
    idx = torch.arange(t)[None]
    return (idx >= first[:, None]) & (idx <= last[:, None])


@pytest.mark.parametrize("t", [1, 15, 16, 17, 47, 100, 1027])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gae_contiguous_spans_match_naive(t, estimator):
    """Rows whose valid tokens are one contiguous span take a separate fused, chunked scan on
    the CPU; check it (every chunk/tail layout, garbage under the mask, whitening) against the
    naive float64 loop."""
    b = 12
    lp, rf, _, scores, values = make_inputs(b, t, seed=t, garbage=False)
    mask = span_masks(b, t, seed=t)
    lp = torch.where(mask, lp, -math.inf)
    rf = torch.where(mask, rf, math.nan)
    values = torch.where(mask, values, math.inf)
    for gamma, lam, whiten in ((1.0, 1.0, False), (0.97, 0.9, True), (1.0, 0.95, False), (0.5, 0.0, False)):
        kw = kwargs_for("gae", estimator=estimator, values=values, gamma=gamma, lam=lam, whiten=whiten, kl_clamp=0.9)
        out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
        truth = naive_fp64(lp, rf, mask, scores, **{**kw, "values": values})
        for name, o, tr in zip(out._fields, out, truth):
            assert_close_f32(o, tr, scale=math.sqrt(max(t, 64) / 64), what=f"{name} γ={gamma} λ={lam}")


def test_gae_lambda_zero_is_one_step_td_over_valid_tokens():
    # λ = 0: A_t = r_t + γ·V_{next valid} − V_t; interior masked tokens are skipped, not decayed.
    lp = torch.zeros(1, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    values = torch.tensor([[1.0, 9.0, 9.0, 2.0, 4.0, 9.0]], dtype=torch.float64)
    scores = torch.tensor([3.0], dtype=torch.float64)
    out = prefcore.ops.kl_penalized_advantages(lp, lp, mask, scores, kl_coef=0.1, mode="gae", values=values, gamma=0.5, lam=0.0)
    assert out.advantages[0].tolist() == pytest.approx([0.5 * 2.0 - 1.0, 0, 0, 0.5 * 4.0 - 2.0, 3.0 - 4.0, 0])
    # λ = 1, γ = 0.5: masked gaps do not discount (three valid tokens, two steps of γ).
    out = prefcore.ops.kl_penalized_advantages(lp, lp, mask, scores, kl_coef=0.1, mode="gae", values=values, gamma=0.5, lam=1.0)
    assert out.advantages[0, 0].item() == pytest.approx(0.25 * 3.0 - 1.0)
    assert out.returns[0, 0].item() == pytest.approx(0.25 * 3.0)


def test_k3_is_accurate_for_tiny_differences():
    # exp(−d) − 1 + d cancels in float32; the op's series keeps full relative precision.
    d = torch.tensor([[1e-4, -3e-3, 2e-2, 0.3, -0.49, 0.51, 2.0, -1.5]], dtype=torch.float64)
    lp = d.float()
    rf = torch.zeros_like(lp)
    out = prefcore.ops.kl_penalized_advantages(lp, rf, torch.ones_like(lp, dtype=torch.bool), torch.zeros(1),
                                               kl_coef=1.0, estimator="k3", mode="gae", values=torch.zeros_like(lp))
    dd = lp.double()
    truth = torch.special.expm1(-dd) + dd
    rel = ((out.kl.double() - truth).abs() / truth).max().item()
    assert rel < 1e-6, rel
    naive_f32 = torch.exp(-lp) - 1 + lp  # plain float32 loses most digits at d = 1e-4
    assert ((naive_f32.double() - truth).abs() / truth).max().item() > 1e-3


def test_whitened_advantages_have_zero_mean_unit_std():
    lp, rf, mask, scores, values = make_inputs(16, 40, seed=9)
    for mode in MODES:
        out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores,
                                                   **kwargs_for(mode, whiten=True, values=values if mode == "gae" else None))
        a = out.advantages[mask].double()
        assert abs(a.mean().item()) < 1e-5 and abs(a.std().item() - 1.0) < 1e-4
        assert (out.advantages[~mask] == 0).all()


# ---- masked_whiten ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_trl_formula(device, dtype, unbiased, shift_mean):
    g = torch.Generator().manual_seed(1)
    x = (3.0 + 2.0 * torch.randn(5, 7, 300, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.rand(5, 7, 300, generator=g) > 0.3
    out = prefcore.ops.masked_whiten(x.to(device), mask.to(device), unbiased, shift_mean)
    assert out.dtype == dtype and out.shape == x.shape
    xv = x.double()[mask]  # TRL/verl: (x − mean)·rsqrt(var + 1e-8), + mean when not shifting
    truth_v = (xv - xv.mean()) * torch.rsqrt(xv.var(unbiased=unbiased) + 1e-8) + (0 if shift_mean else xv.mean())
    truth = torch.zeros_like(x, dtype=torch.float64)
    truth[mask] = truth_v
    if dtype in (torch.float32, torch.float64):
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(out.double().cpu(), truth, rtol=tol, atol=tol * 10)
    else:
        base = ref.masked_whiten(x, mask, unbiased, shift_mean)
        assert_within_lowp_rule(out.cpu(), base, truth, dtype)
    assert (out.cpu()[~mask] == 0).all()


def test_masked_whiten_noncontiguous_and_deterministic_across_threads():
    x = torch.randn(64, 3000)
    mask = torch.rand(64, 3000) > 0.5
    out = prefcore.ops.masked_whiten(noncontiguous(x), noncontiguous(mask))
    torch.testing.assert_close(out.double(), ref.masked_whiten(x.double(), mask), rtol=2e-6, atol=2e-6)
    lp, rf, m, scores, values = make_inputs(64, 300, seed=1)
    kw = kwargs_for("gae", whiten=True, values=values)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (prefcore.ops.masked_whiten(x, mask), prefcore.ops.kl_penalized_advantages(lp, rf, m, scores, **kw))
        torch.set_num_threads(max(2, n))
        two = (prefcore.ops.masked_whiten(x, mask), prefcore.ops.kl_penalized_advantages(lp, rf, m, scores, **kw))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[0], two[0])
    for a, b in zip(one[1], two[1]):
        assert torch.equal(a, b)


# ---- layout helpers -----------------------------------------------------------------------------

def test_k_major_prompt_major_round_trip_and_trl_repeat_layout():
    p, k, length = 5, 3, 4
    prompts = torch.arange(p * length).reshape(p, length)
    k_major = prompts.repeat(k, 1)  # TRL's old layout: row j·P + i is sample j of prompt i
    pm = prefcore.ops.k_major_to_prompt_major(k_major, k)
    assert torch.equal(pm, prompts.repeat_interleave(k, dim=0))  # row i·k + j
    assert torch.equal(prefcore.ops.prompt_major_to_k_major(pm, k), k_major)
    sample_id = torch.arange(p * k)  # a 1-D per-row tensor, any dtype
    assert torch.equal(prefcore.ops.prompt_major_to_k_major(prefcore.ops.k_major_to_prompt_major(sample_id, k), k), sample_id)
    # group advantages computed in prompt-major order map back to the k-major rows
    scores = torch.randn(p * k)
    adv = prefcore.ops.kl_penalized_advantages(torch.zeros(p * k, 1), torch.zeros(p * k, 1), torch.ones(p * k, 1, dtype=torch.bool),
                                               prefcore.ops.k_major_to_prompt_major(scores, k), kl_coef=0.0, group_size=k)
    back = prefcore.ops.prompt_major_to_k_major(adv.advantages[:, 0], k).reshape(k, p)
    sk = scores.reshape(k, p).double()
    expect = sk - (sk.sum(0, keepdim=True) - sk) / (k - 1)
    torch.testing.assert_close(back.double(), expect, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"leading dimension divisible by k = 4"):
        prefcore.ops.k_major_to_prompt_major(k_major, 4)
    with pytest.raises(ValueError, match=r"k must be >= 1"):
        prefcore.ops.prompt_major_to_k_major(k_major, 0)


# ---- torch.library / torch.compile / ISA clones --------------------------------------------------

def test_opcheck():
    lp, rf, mask, scores, values = make_inputs(8, 13, seed=0, garbage=False)
    op = torch.ops.prefcore.kl_penalized_advantages
    torch.library.opcheck(op, (lp, rf, mask, scores, None, 0.1, 0, 0, 4, 1.0, 1.0, False, None))
    torch.library.opcheck(op, (lp, rf, mask.to(torch.uint8), scores, None, 0.1, 2, 1, 2, 1.0, 1.0, True, 0.5))
    torch.library.opcheck(op, (lp.double(), rf.double(), mask, scores.double(), values.double(), 0.1, 3, 2, 0, 0.9, 0.8, True, None))
    # outputs of >= 1 MiB in all are carved from one huge-page block: still four separate storages
    big = make_inputs(512, 1024, seed=0, garbage=False)
    torch.library.opcheck(op, (big[0], big[1], big[2], big[3], big[4], 0.1, 0, 2, 0, 1.0, 0.95, False, None))
    out = op(big[0], big[1], big[2], big[3], None, 0.1, 0, 0, 4, 1.0, 1.0, False, None)
    assert all(o.is_contiguous() and o.shape == (512, 1024) for o in out)
    assert len({o.untyped_storage().data_ptr() for o in out}) == 4
    torch.library.opcheck(torch.ops.prefcore.masked_whiten, (values, mask, True, True))
    torch.library.opcheck(torch.ops.prefcore.masked_whiten, (values.half(), mask, False, False))


@pytest.mark.parametrize("mode", MODES)
def test_large_outputs_live_independently_and_never_alias(mode):
    # Four ordinary torch allocations: each stays valid after the others are freed (and their
    # memory reused), writing one never touches another, and each is resizable in place.
    import gc

    lp, rf, mask, scores, values = make_inputs(128, 1024, seed=11, garbage=False)
    kw = kwargs_for(mode, estimator="k3", values=values if mode == "gae" else None)
    truth = naive_fp64(lp, rf, mask, scores, **kw)
    out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
    assert len({o.untyped_storage().data_ptr() for o in out}) == 4
    assert all(o.untyped_storage().nbytes() == o.numel() * 4 and o.storage_offset() == 0 for o in out)
    kl, adv = out.kl, out.advantages
    del out
    gc.collect()
    churn = [torch.full((128, 1024), math.nan) for _ in range(16)]  # would reuse freed memory
    assert_close_f32(kl, truth[3], what="kl after the others were freed")
    adv.fill_(7.0)
    assert_close_f32(kl, truth[3], what="kl after writing advantages")
    del kl
    gc.collect()
    churn += [torch.full((128, 1024), math.nan) for _ in range(16)]
    assert bool((adv == 7.0).all())
    adv.resize_(256, 1024)  # an ordinary resizable storage (the old shared block was not)
    assert adv.shape == (256, 1024) and bool((adv[:128] == 7.0).all())


def test_outputs_are_freed():
    # Every large allocation a fresh mmap, as in the bench's cold diagnostic regime: an output
    # that outlived its call would grow the resident set by 8 MiB per call.
    code = (
        "import torch, prefcore\n"
        "from python_tests.test_ops_advantages import make_inputs, kwargs_for\n"
        "lp, rf, mask, scores, values = make_inputs(512, 1024, seed=0, garbage=False)\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024\n"
        "for mode in ('rloo', 'gae'):\n"
        "    kw = kwargs_for(mode, values=values if mode == 'gae' else None)\n"
        "    for _ in range(10): prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)\n"
        "    before = rss()\n"
        "    for _ in range(100): out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)\n"
        "    print(mode, rss() - before)\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    growth = {line.split()[0]: int(line.split()[1]) for line in res.stdout.splitlines()}
    assert set(growth) == {"rloo", "gae"}
    assert all(g < 64 for g in growth.values()), f"resident set grew by {growth} MiB over 100 calls (8 MiB each)"


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    lp, rf, mask, scores, values = make_inputs(8, 21, seed=6, garbage=False)

    def step(lp, rf, mask, scores, values):
        out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, kl_coef=0.05, estimator="k3", mode="gae",
                                                   values=values, gamma=0.99, lam=0.95, whiten=True)
        return out.advantages * 2.0, prefcore.ops.masked_whiten(out.returns, mask)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(lp, rf, mask, scores, values), step(lp, rf, mask, scores, values)):
        torch.testing.assert_close(a, b)


def test_every_cpu_isa_clone_matches_reference():
    # Each clone has its own SIMD width (16/8/4 float lanes, 8/4/2 double lanes); T = 77 leaves a
    # partial block at every width and the span rows cross chunk boundaries.
    script = (
        "import torch, prefcore, sys\n"
        "from prefcore.ops import reference as ref\n"
        "torch.manual_seed(0)\n"
        "B, T = 12, 77\n"
        "lp = torch.randn(B, T); rf = lp + 0.4 * torch.randn(B, T); m = torch.rand(B, T) > 0.3; m[1] = False\n"
        "idx = torch.arange(T); m[2] = idx < 40; m[3] = idx >= 9; m[4] = (idx >= 16) & (idx < 64); m[5] = True\n"
        "sc = torch.randn(B); v = torch.randn(B, T)\n"
        "for est, mode, dt in [(e, md, d) for e in ('k1', 'k2', 'k3', 'abs') for md in ('rloo', 'grpo', 'gae')\n"
        "                      for d in (torch.float32, torch.float64)]:\n"
        "    kw = dict(kl_coef=0.1, estimator=est, mode=mode, whiten=True, kl_clamp=0.9)\n"
        "    kw.update(values=v.to(dt), gamma=0.9, lam=0.8) if mode == 'gae' else kw.update(group_size=3)\n"
        "    a = prefcore.ops.kl_penalized_advantages(lp.to(dt), rf.to(dt), m, sc.to(dt), **kw)\n"
        "    kw64 = dict(kw); kw64['values'] = v.double() if mode == 'gae' else None\n"
        "    b = ref.kl_penalized_advantages(lp.double(), rf.double(), m, sc.double(), **kw64)\n"
        "    for x, y in zip(a, b):\n"
        "      assert (x.double() - y).abs().max() < 1e-5, (est, mode, dt)\n"
        "print(prefcore._C.cpu_isa())\n"
    )
    run_in_every_cpu_isa(script)


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    lp, rf, mask, scores, values = make_inputs(6, 5, seed=0, garbage=False)
    f = prefcore.ops.kl_penalized_advantages

    def call(**over):
        args = dict(logprobs=lp, ref_logprobs=rf, mask=mask, scores=scores)
        kw = dict(kl_coef=0.1, group_size=3)
        for key, val in over.items():
            (args if key in args else kw)[key] = val
        return f(args["logprobs"], args["ref_logprobs"], args["mask"], args["scores"], **kw)

    cases = [
        (dict(group_size=4), ValueError, r"group_size must divide the batch: logprobs.size\(0\) = 6 is not a multiple of group_size = 4"),
        (dict(group_size=1), ValueError, r"group_size must be >= 2"),
        (dict(group_size=None), ValueError, r"needs group_size"),
        (dict(group_size=2.0), ValueError, r"group_size must be an int"),
        (dict(mode="gae", group_size=None), ValueError, r"mode='gae' needs values of shape \(B, T\), got None"),
        (dict(mode="gae", values=values), ValueError, r"group_size is only used by mode='rloo'/'grpo'"),
        (dict(values=values), ValueError, r"values is only used by mode='gae'"),
        (dict(mode="gae", group_size=None, values=values[:, :4]), ValueError, r"values must have the shape of logprobs \(6, 5\)"),
        (dict(estimator="k4"), ValueError, r"estimator must be one of \('k1', 'k2', 'k3', 'abs'\), got 'k4'"),
        (dict(mode="ppo"), ValueError, r"mode must be one of \('rloo', 'grpo', 'gae'\), got 'ppo'"),
        (dict(ref_logprobs=rf[:, :4]), ValueError, r"ref_logprobs must have the shape of logprobs \(6, 5\), got \(6, 4\)"),
        (dict(mask=mask[:5]), ValueError, r"mask must have the shape of logprobs \(6, 5\), got \(5, 5\)"),
        (dict(scores=scores[:5]), ValueError, r"scores must have shape \(B,\) = \(6,\), got \(5,\)"),
        (dict(logprobs=lp[0], ref_logprobs=rf[0], mask=mask[0]), ValueError, r"logprobs must have shape \(B, T\), got \(5,\)"),
        (dict(logprobs=lp.long()), ValueError, r"logprobs must be a floating tensor"),
        (dict(scores=[1.0] * 6), TypeError, r"scores must be a torch.Tensor"),
        (dict(kl_coef=math.nan), ValueError, r"kl_coef must be finite, got nan"),
        (dict(kl_coef=math.inf), ValueError, r"kl_coef must be finite, got inf"),
        (dict(kl_coef=-0.1), ValueError, r"kl_coef must be >= 0.0"),
        (dict(kl_clamp=-1.0), ValueError, r"kl_clamp must be >= 0.0"),
        (dict(gamma=1.5), ValueError, r"gamma must lie in \[0, 1\], got 1.5"),
        (dict(lam=math.nan), ValueError, r"lam must be finite"),
        (dict(whiten=1), ValueError, r"whiten must be a bool"),
        (dict(mask=mask.float() * 0.5), ValueError, r"mask must be bool or hold only 0 and 1"),
        (dict(mask=torch.zeros(6, 5, dtype=torch.bool), whiten=True), ValueError, r"whiten=True needs at least 2 valid tokens \(mask has 0\)"),
        (dict(mask=torch.eye(6, 5, dtype=torch.bool)[:, :5] & (torch.arange(6)[:, None] == 0), whiten=True), ValueError,
         r"needs at least 2 valid tokens \(mask has 1\)"),
        (dict(scores=scores.to("meta")), ValueError, r"scores must be on the same device as logprobs \(cpu\), got meta"),
    ]
    for over, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call(**over)
    with pytest.raises(ValueError, match=r"masked_whiten needs at least 2 valid tokens \(mask has 1\)"):
        prefcore.ops.masked_whiten(values, torch.eye(6, 5, dtype=torch.bool) & (torch.arange(6)[:, None] == 0))
    with pytest.raises(ValueError, match=r"mask must have the shape of x \(6, 5\)"):
        prefcore.ops.masked_whiten(values, mask[:3])
    with pytest.raises(ValueError, match=r"x must be a floating tensor"):
        prefcore.ops.masked_whiten(mask.long(), mask)
    # the raw ops check for themselves (RuntimeError for shapes/codes, ValueError for values)
    op = torch.ops.prefcore.kl_penalized_advantages
    with pytest.raises(RuntimeError, match=r"mode must be 0 \(rloo\), 1 \(grpo\) or 2 \(gae\), got 7"):
        op(lp, rf, mask, scores, None, 0.1, 0, 7, 3, 1.0, 1.0, False, None)
    with pytest.raises(RuntimeError, match=r"estimator must be 0 \(k1\), 1 \(k2\), 2 \(k3\) or 3 \(abs\), got -1"):
        op(lp, rf, mask, scores, None, 0.1, -1, 0, 3, 1.0, 1.0, False, None)
    with pytest.raises(ValueError, match=r"group_size must divide the batch"):
        op(lp, rf, mask, scores, None, 0.1, 0, 0, 4, 1.0, 1.0, False, None)
    with pytest.raises(ValueError, match=r"mode gae needs values"):
        op(lp, rf, mask, scores, None, 0.1, 0, 2, 0, 1.0, 1.0, False, None)
    with pytest.raises(ValueError, match=r"kl_coef must be a finite number >= 0, got nan"):
        op(lp, rf, mask, scores, None, math.nan, 0, 0, 3, 1.0, 1.0, False, None)
    with pytest.raises(RuntimeError, match=r"scores must have dtype Float"):
        op(lp, rf, mask, scores.double(), None, 0.1, 0, 0, 3, 1.0, 1.0, False, None)
    with pytest.raises(RuntimeError, match=r"values must have dtype Float \(the dtype of logprobs\), got Double"):
        op(lp, rf, mask, scores, values.double(), 0.1, 0, 2, 0, 1.0, 1.0, False, None)
    with pytest.raises(ValueError, match=r"ref_logprobs must be on the same device as logprobs \(cpu\), got meta"):
        f(lp, rf.to("meta"), mask, scores, kl_coef=0.1, group_size=3)
    with pytest.raises(ValueError, match=r"values must be on the same device as logprobs \(cpu\), got meta"):
        f(lp, rf, mask, scores, kl_coef=0.1, mode="gae", values=values.to("meta"))


# ---- precision regressions (issue 14 rows 7 and 9) --------------------------------------------

def test_gae_positions_are_exact_beyond_two_to_the_24():
    # One row of T = 2^24 + 64 whose valid span is [2^24 − 3, 2^24 + 31]: lane positions were
    # compared in float32, where 2^24 + 33 rounds to 2^24 + 32 ≤ … so masked tokens 2^24 + 32
    # and + 33 were taken as valid (nonzero advantages, KL and rewards there).
    n = 2**24
    t_len, f, l = n + 64, n - 3, n + 31
    mask = torch.zeros(1, t_len, dtype=torch.bool)
    mask[0, f:l + 1] = True
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(1, t_len, generator=g)
    rf = lp + 0.3 * torch.randn(1, t_len, generator=g)
    values = torch.randn(1, t_len, generator=g)
    scores = torch.tensor([-1.0])
    kw = dict(kl_coef=0.1, mode="gae", gamma=0.99, lam=0.95)
    out = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, values=values, **kw)
    # Only the span matters (GAE is per row, masked tokens carry no state): the reference on it.
    span = slice(f, l + 1)
    truth = ref.kl_penalized_advantages(lp[:, span].double(), rf[:, span].double(), mask[:, span],
                                        scores.double(), values=values[:, span].double(), **kw)
    for name, o, tr in zip(Advantages._fields, out, truth):
        outside = torch.cat([o[0, :f], o[0, l + 1:]])
        assert int(torch.count_nonzero(outside)) == 0, f"{name}: nonzero outside the mask"
        assert_close_f32(o[:, span], tr, what=name)


def test_masked_whiten_subtracts_the_float64_mean():
    x = torch.tensor([10000.0, 10000.001, 10000.002, 10000.003])
    out = prefcore.ops.masked_whiten(x, torch.ones(4, dtype=torch.bool))
    xv = x.double()  # the float32 values the op sees, whitened in float64
    truth = (xv - xv.mean()) / torch.sqrt(xv.var() + 1e-8)
    torch.testing.assert_close(out.double(), truth, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, torch.tensor([-1.158, -0.386, 0.386, 1.158]), rtol=0, atol=2e-3)  # issue 14 row 9
    out = prefcore.ops.masked_whiten(x, torch.ones(4, dtype=torch.bool), shift_mean=False)
    torch.testing.assert_close(out.double(), truth + xv.mean(), rtol=0, atol=1e-3)  # + mean, then float32


def test_fp64_gae_whitening_keeps_float64_precision():
    # γ = 0, kl_coef = 0: A_t = r_t − V_t with V_t = −(1e4 + 1e-4·t + …): advantages ≈ 1e4 apart by
    # ~1e-4, which float32 (spacing ~1e-3 there) cannot tell apart. The op's advantages are
    # float32, but whitened from the float64 values.
    g = torch.Generator().manual_seed(3)
    b, t = 4, 300
    mask = torch.rand(b, t, generator=g) > 0.2
    values = -(1e4 + 1e-4 * torch.arange(t, dtype=torch.float64) + 1e-5 * torch.randn(b, t, generator=g, dtype=torch.float64))
    lp = torch.zeros(b, t, dtype=torch.float64)
    scores = torch.zeros(b, dtype=torch.float64)
    for whiten in (False, True):
        kw = dict(kl_coef=0.0, mode="gae", values=values, gamma=0.0, lam=0.5, whiten=whiten)
        out = prefcore.ops.kl_penalized_advantages(lp, lp, mask, scores, **kw)
        truth = naive_fp64(lp, lp, mask, scores, **kw)
        if whiten:
            torch.testing.assert_close(out.advantages.double(), truth[0], rtol=1e-5, atol=1e-5)
            assert truth[0][mask].std() > 0.5  # the test can fail: distinct whitened values
        torch.testing.assert_close(out.returns.double(), truth[1], rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("whiten", [False, True])
def test_outputs_subset_matches_the_full_call(mode, whiten):
    # outputs= computes only the named fields; the rest are None and the computed ones equal
    # the full call's bit for bit (and the naive loop's).
    lp, rf, mask, scores, values = make_inputs(8, 77, seed=21, garbage=True)
    kw = kwargs_for(mode, k=4, estimator="k3", whiten=whiten, values=values if mode == "gae" else None)
    full = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, **kw)
    truth = naive_fp64(lp, rf, mask, scores, **kw)
    for names in (("advantages",), ("advantages", "kl"), ("advantages", "returns"), ("kl", "advantages", "token_rewards")):
        part = prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, outputs=names, **kw)
        assert isinstance(part, Advantages)
        for i, field in enumerate(Advantages._fields):
            if field in names:
                assert torch.equal(part[i], full[i]), f"{names}: {field} differs from the full call"
                assert_close_f32(part[i], truth[i], what=f"{names} {field}")
            else:
                assert part[i] is None, f"{names}: {field} should be None"


def test_outputs_argument_errors_and_compile():
    lp, rf, mask, scores, values = make_inputs(4, 9, seed=22, garbage=False)
    kw = kwargs_for("rloo", k=2)
    for bad, msg in ((("kl",), "must include 'advantages'"), (("advantages", "bogus"), "unknown name"),
                     ("advantages", "sequence of output names")):
        with pytest.raises(ValueError, match=msg):
            prefcore.ops.kl_penalized_advantages(lp, rf, mask, scores, outputs=bad, **kw)
    with pytest.raises(ValueError, match="outputs must be a bit set"):
        torch.ops.prefcore.kl_penalized_advantages(lp, rf, mask, scores, None, 0.1, 0, 0, 2, 1.0, 1.0, False, None, 6)
    torch.library.opcheck(torch.ops.prefcore.kl_penalized_advantages,
                          (lp, rf, mask, scores, None, 0.1, 2, 1, 2, 1.0, 1.0, True, None, 9))
    torch._dynamo.reset()
    step = lambda *a: prefcore.ops.kl_penalized_advantages(*a, outputs=("advantages", "kl"), **kw)  # noqa: E731
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(lp, rf, mask, scores)
    want = step(lp, rf, mask, scores)
    assert got.returns is None and got.token_rewards is None
    torch.testing.assert_close(got.advantages, want.advantages)
    torch.testing.assert_close(got.kl, want.kl)
