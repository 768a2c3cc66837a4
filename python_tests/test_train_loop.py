"""prefcore.train.loop and prefcore.train.checkpoint: stateless batching, exact resume, atomic writes."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from prefcore._io import atomic_torch_save
from prefcore.train.loop import CHECKPOINT, METRICS, LoopConfig, MetricsLog, batch_indices, load_checkpoint, run_stage


def test_batch_indices_cover_each_epoch_once_and_are_stateless():
    n, bs = 23, 5
    epoch0 = torch.cat([batch_indices(n, bs, s, seed=3, stage_index=0) for s in range(5)])
    assert sorted(epoch0.tolist()) == list(range(n))
    epoch1 = torch.cat([batch_indices(n, bs, s, seed=3, stage_index=0) for s in range(5, 10)])
    assert sorted(epoch1.tolist()) == list(range(n))
    assert not torch.equal(epoch0, epoch1)  # a new permutation per epoch
    assert torch.equal(batch_indices(n, bs, 7, 3, 0), batch_indices(n, bs, 7, 3, 0))
    assert not torch.equal(batch_indices(n, bs, 0, 3, 0), batch_indices(n, bs, 0, 3, 1))
    with pytest.raises(ValueError, match="empty"):
        batch_indices(0, bs, 0, 0, 0)


class _Boom(RuntimeError):
    pass


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(64, generator=g)
    return x, y


def _run(run_dir, *, fail_at: int | None = None, resume: bool = False):
    x, y = _problem()
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    cfg = LoopConfig(steps=150, batch_size=8, lr=0.1, warmup_steps=5, log_every=3, checkpoint_every=20)
    state = None
    if resume:
        state = load_checkpoint(str(run_dir))
        model.load_state_dict(state["module"])
        MetricsLog(os.path.join(run_dir, METRICS)).truncate_after(lambda r: r["step"] <= state["step"])
    calls = {"n": state["step"] if state else 0}

    def batch_loss(idx):
        if fail_at is not None and calls["n"] == fail_at:
            raise _Boom("simulated crash")
        calls["n"] += 1
        return ((model(x[idx]).squeeze(-1) - y[idx]) ** 2).mean(), {"n": float(len(idx))}

    run_stage("fit", 0, model, model.parameters(), batch_loss, len(x), cfg, str(run_dir),
              done_stages=[], resume_state=state, progress=False)
    return model


def test_resume_after_crash_is_bit_identical(tmp_path):
    full = _run(tmp_path / "full")
    with pytest.raises(_Boom):
        _run(tmp_path / "cut", fail_at=67)
    ckpt = load_checkpoint(str(tmp_path / "cut"))
    assert ckpt["step"] == 60 and not ckpt["finished"]
    resumed = _run(tmp_path / "cut", resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with open(tmp_path / "full" / METRICS) as f1, open(tmp_path / "cut" / METRICS) as f2:
        assert f1.read() == f2.read()
    final = load_checkpoint(str(tmp_path / "cut"))
    assert final["finished"] and final["step"] == 150 and final["done_stages"] == ["fit"]
    # and training did something: the fit is far better than the initial model's
    x, y = _problem()
    assert ((full(x).squeeze(-1) - y) ** 2).mean() < 0.1


def test_non_finite_loss_is_an_error_not_a_silent_nan(tmp_path):
    model = nn.Linear(2, 1)
    cfg = LoopConfig(steps=3, batch_size=2)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        run_stage("s", 0, model, model.parameters(), lambda idx: (torch.tensor(float("nan"), requires_grad=True), {}),
                  4, cfg, str(tmp_path), done_stages=[], progress=False)


def test_atomic_save_never_leaves_a_truncated_file(tmp_path):
    path = str(tmp_path / CHECKPOINT)
    atomic_torch_save(path, {"step": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # the mode open() would give, not mkstemp's 0600

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save(path, {"step": 2, "bad": Unpicklable()})
    assert torch.load(path)["step"] == 1  # the old checkpoint survives intact
    assert os.listdir(tmp_path) == [CHECKPOINT]  # no temp file left behind


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=0), dict(lr=0.0), dict(lr=float("inf")),
                                 dict(weight_decay=-1.0)])
def test_loop_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        LoopConfig(**bad)
