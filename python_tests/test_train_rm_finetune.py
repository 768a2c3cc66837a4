"""``prefcore train-rm --finetune lora|full`` (bt, bt-margin) on a tiny random Llama built in code
and the synthetic world's text pairs: training lowers the loss, the packed and plain pair forwards
give the same first step, the run directory scores on its own after it is moved and the original
backbone deleted (its rewards equal an independent recomputation from the saved weights), and
every bad setting is one line with exit code 2 and nothing left behind."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from prefcore.cli import main
from python_tests.rm_runs import text_world

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return text_world(tmp_path_factory.mktemp("ftworld"))


def finetune(world, out: Path, mode: str = "full", *extra: str, method: str = "bt") -> int:
    return main(["train-rm", "--method", method, "--finetune", mode, "--data", str(world.pairs),
                 "--backbone", str(world.backbone), "--out", str(out), "--max_length", "48",
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                 "--learning_rate", "1e-3", "--head_learning_rate", "1e-2", "--trunk_layers", "0",
                 "--log_every", "1", "--progress", "false", *extra])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetuning_lowers_the_loss_and_changes_the_backbone(world, tmp_path, mode):
    run = tmp_path / mode
    assert finetune(world, run, mode, "--max_steps", "40") == 0
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.02, losses
    from safetensors.torch import load_file

    new = load_file(str(run / "backbone" / "model.safetensors"))
    old = load_file(str(world.backbone / "model.safetensors"))
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    assert changed, "the saved backbone equals the original: nothing was fine-tuned"
    if mode == "lora":
        assert (run / "adapter" / "adapter_config.json").is_file()
        assert all("proj" in k for k in changed)  # only LoRA-adapted linear layers moved (merged)
    report = json.loads((run / "report.json").read_text())
    assert report["finetune"] == mode and 0.0 <= report["pairwise_accuracy"] <= 1.0
    stats = json.loads((run / "reward_stats.json").read_text())
    assert stats["count"] == 2 * 32 and stats["std"] > 0


def test_packed_and_plain_pair_forwards_give_the_same_first_step(world, tmp_path):
    firsts = {}
    for packing in ("packed", "plain"):
        assert finetune(world, tmp_path / packing, "full", "--max_steps", "1", "--packing", packing) == 0
        firsts[packing] = metrics(tmp_path / packing)[0]
    assert firsts["packed"]["loss"] == pytest.approx(firsts["plain"]["loss"], rel=1e-5, abs=1e-6)
    assert firsts["packed"]["grad_norm"] == pytest.approx(firsts["plain"]["grad_norm"], rel=1e-4, abs=1e-6)


def test_a_moved_run_scores_on_its_own_like_the_saved_weights(world, tmp_path):
    from prefcore.data import load_pairs
    from prefcore.models.packing import pair_features
    from prefcore.train.rm.finetune import tokenize_pairs
    from prefcore.train.rm.scoring import RunScorer
    from prefcore.train.rm.sources import load_text_encoder
    from prefcore.train.rm.trainer import load_heads
    from python_tests.tiny_transformers import make_llama, make_tokenizer

    backbone_copy = tmp_path / "backbone"
    make_llama(backbone_copy)
    make_tokenizer(backbone_copy)
    run = tmp_path / "run"
    assert main(["train-rm", "--method", "bt", "--finetune", "full", "--data", str(world.pairs), "--backbone",
                 str(backbone_copy), "--out", str(run), "--max_length", "48", "--max_steps", "5",
                 "--learning_rate", "1e-3", "--progress", "false"]) == 0
    moved = tmp_path / "moved"
    shutil.move(str(run), str(moved))
    shutil.rmtree(backbone_copy)  # the original backbone is gone
    recs = list(load_pairs(str(world.pairs)).records)[:6]
    scorer = RunScorer.load(str(moved))
    got_c = scorer.reward([r.prompt for r in recs], [r.chosen for r in recs])
    got_r = scorer.reward([r.prompt for r in recs], [r.rejected for r in recs])
    # independently: the saved weights on the trainer's split tokenisation, packed pair forward
    backbone, tok = load_text_encoder(str(moved / "backbone"))
    heads, _ = load_heads(str(moved))
    pairs, kept, _ = tokenize_pairs(tok, recs, 48, "truncate", "bt")
    assert kept == list(range(6))
    from prefcore.data.batching import collate_pairs

    p, c, r = collate_pairs(list(zip(pairs.prompt, pairs.chosen, pairs.rejected)), pad_id=0)
    with torch.no_grad():
        f = pair_features(backbone, p, c, r, packing="packed")
        want_c, want_r = (heads["scalar"](heads["trunk"](x)) for x in (f.chosen, f.rejected))
    torch.testing.assert_close(got_c, want_c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_r, want_r, rtol=1e-4, atol=1e-5)
    # and train-policy's reward adapter takes the moved run as it is
    from prefcore.train.policy.rewards import make_reward
    from prefcore.utility import parse_utility

    scored = make_reward(str(moved), parse_utility("mean"), "mean")([recs[0].prompt], [recs[0].chosen])
    assert scored.reward.shape == (1,) and float(scored.reward[0]) == pytest.approx(float(got_c[0]), abs=1e-5)


@pytest.mark.parametrize("method", ["gmm", "mean-var"])
def test_ratings_methods_finetune_and_score_from_the_moved_run(world, tmp_path, method):
    from prefcore.train.rm.scoring import RunScorer

    run = tmp_path / method
    assert main(["train-rm", "--method", method, "--finetune", "full", "--data", str(world.ratings), "--backbone",
                 str(world.backbone), "--out", str(run), "--max_length", "48", "--max_steps", "30",
                 "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--head_learning_rate", "1e-2",
                 "--trunk_layers", "0", "--log_every", "1", "--progress", "false"]) == 0
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses  # the NLL falls
    report = json.loads((run / "report.json").read_text())
    assert report["finetune"] == "full" and report["num_eval_items"] == 8
    moved = tmp_path / "moved"
    shutil.move(str(run), str(moved))
    recs = world.records[:4]
    dist = RunScorer.load(str(moved)).reward_distribution([r["prompt"] for r in recs], [r["response"] for r in recs])
    assert dist.mean().shape == (4,) and bool(torch.isfinite(dist.mean()).all())
    # the scorer's text tokenisation equals the trainer's rows: same features, same distribution
    from prefcore.train.rm.finetune import LiveFeatures, tokenize_texts
    from prefcore.train.rm.sources import load_text_encoder
    from prefcore.train.rm.trainer import load_heads

    backbone, tok = load_text_encoder(str(moved / "backbone"))
    heads, _ = load_heads(str(moved))
    from prefcore.data import load_ratings

    recs4 = list(load_ratings(str(world.ratings)).records)[:4]
    rows, kept, _ = tokenize_texts(tok, [(r.prompt, r.response) for r in recs4], 48, "truncate")
    feats = LiveFeatures(backbone, rows, backbone.config.hidden_size, False).all()
    key = "gmm" if method == "gmm" else "meanvar"
    with torch.no_grad():
        out = heads[key](heads["trunk"](feats))
    want_mean = out.mu.mul(out.logits.softmax(-1)).sum(-1) if method == "gmm" else out[0]
    torch.testing.assert_close(dist.mean(), want_mean, rtol=1e-4, atol=1e-5)


def test_qrm_finetunes_the_quantiles_then_gates_on_the_finetuned_features(world, tmp_path):
    from prefcore.train.rm.scoring import RunScorer

    run = tmp_path / "qrm"
    assert main(["train-rm", "--method", "qrm", "--finetune", "lora", "--data", str(world.ratings), "--pairs",
                 str(world.pairs), "--backbone", str(world.backbone), "--out", str(run), "--max_length", "48",
                 "--max_steps", "30", "--gate_steps", "20", "--per_device_train_batch_size", "8",
                 "--learning_rate", "1e-3", "--head_learning_rate", "1e-2", "--trunk_layers", "0", "--log_every", "1",
                 "--progress", "false"]) == 0
    recs = metrics(run)
    pinball = [m["loss"] for m in recs if m["stage"] == "finetune"]
    assert len(pinball) == 30 and sum(pinball[-5:]) / 5 < sum(pinball[:5]) / 5, pinball
    assert any(m["stage"] == "gating" for m in recs)
    report = json.loads((run / "report.json").read_text())
    assert 0.0 <= report["coverage_max_abs_error"] <= 1.0 and "gated_mean_reward" in report
    r = world.records[0]
    dist = RunScorer.load(str(run)).reward_distribution([r["prompt"]], [r["response"]])
    assert dist.values.shape == (1, 19) and bool(torch.isfinite(dist.values).all())


def test_bt_margin_finetunes_with_vote_margins(world, tmp_path):
    assert finetune(world, tmp_path / "m", "full", "--max_steps", "3", method="bt-margin") == 0
    assert len(metrics(tmp_path / "m")) == 3


@pytest.mark.parametrize("extra, message", [
    (["--method", "qrm"], "method 'qrm' needs --pairs"),
    (["--backbone", None], "pass --backbone"),
    (["--max_length", "1"], "max_length must leave room"),
    (["--finetune", "lora", "--lora_target_modules", "no_such_proj"], "lora_target_modules='no_such_proj'"),
    (["--resume", "true"], "resume: no finetune_checkpoint.pt"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be an integer >= 1"),
    (["--warmup_ratio", "1.5"], "warmup_ratio must lie in [0, 1)"),
    (["--too_long", "drop", "--max_length", "3"], "every pair is longer than max_length=3"),
    (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N'"),
])
def test_bad_settings_are_one_line_exit_2_and_leave_nothing(world, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    argv = ["train-rm", "--method", "bt", "--finetune", "full", "--data", str(world.pairs), "--backbone",
            str(world.backbone), "--out", str(out), "--max_length", "48", "--max_steps", "2", "--progress", "false"]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        if value is not None:
            argv += [flag, value]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefcore train-rm: error:") and message in err[0], err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_cuda_device_without_cuda_is_one_line(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert finetune(world, out, "full", "--max_steps", "1", "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err and not out.exists()


def test_a_crash_and_resume_end_exactly_as_the_uninterrupted_run(world, tmp_path, monkeypatch, capsys):
    import prefcore.train.rm.finetune as ft
    from safetensors.torch import load_file

    from prefcore.train.rm.trainer import TrainRMConfig, train_reward_model

    base = dict(method="bt", finetune="lora", data=str(world.pairs), backbone=str(world.backbone), max_length=48,
                max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
                head_learning_rate=1e-2, warmup_ratio=0.2, trunk_layers=0, log_every=1, checkpoint_every=2,
                progress=False)  # 4 steps per epoch: the resume lands mid-epoch and crosses an epoch boundary
    train_reward_model(TrainRMConfig(out=str(tmp_path / "whole"), **base))

    def crash(step: int) -> None:
        if step == 3:  # after the step-2 checkpoint
            raise RuntimeError("simulated crash")
    monkeypatch.setattr(ft, "AFTER_STEP", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_reward_model(TrainRMConfig(out=str(tmp_path / "cut"), **base))
    assert torch.load(tmp_path / "cut" / "finetune_checkpoint.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(ft, "AFTER_STEP", None)
    assert main(["train-rm", "--method", "bt", "--finetune", "lora", "--data", str(world.pairs), "--backbone",
                 str(world.backbone), "--out", str(tmp_path / "cut"), "--resume", "true", "--learning_rate", "0.5",
                 "--progress", "false"]) == 2  # changed settings are refused
    assert "configuration differs" in capsys.readouterr().err
    train_reward_model(TrainRMConfig(out=str(tmp_path / "cut"), resume=True, **base))
    for name in ("heads.safetensors", "backbone/model.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda recs: [{k: v for k, v in r.items() if k != "step_time"} for r in recs]  # noqa: E731
    assert strip(metrics(tmp_path / "cut")) == strip(metrics(tmp_path / "whole"))


@pytest.mark.parametrize("extra, message", [
    (["--fsdp", "true"], "--fsdp needs a torchrun launch with >= 2 processes"),
    (["--fsdp", "true", "--finetune", "none"], "--fsdp shards a backbone being fine-tuned"),
])
def test_fsdp_outside_torchrun_is_refused(world, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    assert finetune(world, out, "full", "--max_steps", "1", *extra) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_lora_without_peft_names_the_package(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    out = tmp_path / "run"
    assert main(["train-rm", "--method", "bt", "--finetune", "lora", "--data", str(world.pairs), "--backbone",
                 str(world.backbone), "--out", str(out), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert "needs peft: pip install 'prefcore[lora]'" in err and not out.exists()


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["bt", "qrm"])
def test_cuda_finetuning_equals_the_cpu_run(world, tmp_path, method):
    """``--device cuda``: the same steps as on the CPU (fp32; loss per step and saved weights within
    1e-3 — GPU kernels round differently), and the run directory scores on the CPU."""
    from safetensors.torch import load_file

    from prefcore.train.rm.scoring import RunScorer

    data = ["--data", str(world.pairs)] if method == "bt" else ["--data", str(world.ratings), "--pairs",
                                                                  str(world.pairs), "--gate_steps", "5"]
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = tmp_path / device
        assert main(["train-rm", "--method", method, "--finetune", "lora", *data, "--backbone", str(world.backbone),
                     "--out", str(runs[device]), "--max_length", "48", "--max_steps", "3", "--device", device,
                     "--learning_rate", "1e-3", "--trunk_layers", "0", "--log_every", "1", "--progress", "false"]) == 0
    ma, mb = metrics(runs["cpu"]), metrics(runs["cuda"])
    for a, b in zip([m for m in ma if m["stage"] == "finetune"], [m for m in mb if m["stage"] == "finetune"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4)
    for name in ("heads.safetensors", "backbone/model.safetensors"):
        wa, wb = load_file(str(runs["cpu"] / name)), load_file(str(runs["cuda"] / name))
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)
    r = world.records[0]
    assert torch.isfinite(RunScorer.load(str(runs["cuda"])).reward([r["prompt"]], [r["response"]])).all()


def test_ddp_looks_for_unused_parameters_only_when_the_backbone_has_some():
    from prefcore.train.rm.finetune import Encoder, _has_unused_parameters
    from python_tests.tiny_transformers import make_llama

    plain = Encoder(make_llama())
    rng = torch.get_rng_state()
    assert not _has_unused_parameters(plain)
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in plain.parameters())
    with_pooler = make_llama()
    with_pooler.pooler = torch.nn.Linear(16, 16)  # like BERT's pooler: never on the path to the features
    assert _has_unused_parameters(Encoder(with_pooler))
