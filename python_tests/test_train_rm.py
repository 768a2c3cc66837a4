"""``prefcore train-rm`` end to end: every method on the synthetic default, exact resume, configs
from flags/JSON/YAML, text data through a tiny local backbone, clear errors, and the papers'
claims that need a trained model (QRM calibration, GMM NLL close to the true mixture's)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from prefcore.cli import main, parse_train_rm
from prefcore.train import loop as loop_mod
from prefcore.train.rm.trainer import TrainRMConfig, load_heads, train_reward_model
from prefcore.train.rm.methods import evaluate
from prefcore.train.rm.sources import load_rm_data

SMALL = ["--num_items", "600", "--num_pairs", "600", "--steps", "120", "--gate_steps", "60",
         "--batch_size", "128", "--checkpoint_every", "25", "--progress", "false"]


def _cli(tmp_path, name: str, *args: str) -> dict:
    out = str(tmp_path / name)
    assert main(["train-rm", "--out", out, *SMALL, *args]) == 0
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("method", ["bt", "bt-margin", "qrm", "gmm", "mean-var"])
def test_each_method_trains_on_the_synthetic_default(tmp_path, method):
    report = _cli(tmp_path, method, "--method", method)
    out = tmp_path / method
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "heads.safetensors", "heads.json", "report.json"):
        assert (out / name).is_file(), name
    assert all(v == v for v in report.values() if isinstance(v, float))  # no NaN anywhere
    if method in ("bt", "bt-margin"):
        assert report["pairwise_accuracy"] > 0.6  # chance is 0.5
        assert report["pearson_vote_fraction"] > 0.3
    elif method == "qrm":
        assert report["coverage_max_abs_error"] < 0.1
        assert report["pairwise_accuracy"] > 0.55
    elif method == "gmm":
        assert report["nll"] < report["nll_true_mixture"] + 0.5
    else:
        assert report["uce"] < 0.05
    # The saved heads reproduce the report exactly.
    heads, head_cfg = load_heads(str(out))
    assert head_cfg["method"] == method
    cfg = parse_train_rm(["--method", method, "--out", str(out), *SMALL])
    _, test = load_rm_data(cfg).split(cfg.eval_fraction, cfg.seed)
    assert {"method": method, **evaluate(method, heads, test, cfg)} == report
    # Training lowered the loss (first logged vs last logged step of the first stage).
    with open(out / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    first_stage = [r for r in recs if r["stage"] == recs[0]["stage"]]
    assert first_stage[-1]["loss"] < first_stage[0]["loss"]


class _Crash(RuntimeError):
    pass


# gmm: a crash at step 30 of 120 (checkpoint at 25); qrm: stage 1 logs 24 times (120 steps / 5), so
# the 30th log is step 30 of the gating stage (checkpoint at gating step 25).
@pytest.mark.parametrize("method,crash_after_logs,stage", [("gmm", 5, "gmm"), ("qrm", 29, "gating")])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, monkeypatch, method, crash_after_logs, stage):
    _cli(tmp_path, "full", "--method", method, "--log_every", "5")
    real_write = loop_mod.MetricsLog.write
    calls = {"n": 0}

    def crashing_write(self, record):
        calls["n"] += 1
        if calls["n"] > crash_after_logs:
            raise _Crash("simulated interruption")
        real_write(self, record)

    monkeypatch.setattr(loop_mod.MetricsLog, "write", crashing_write)
    with pytest.raises(_Crash):
        _cli(tmp_path, "cut", "--method", method, "--log_every", "5")
    monkeypatch.setattr(loop_mod.MetricsLog, "write", real_write)
    assert not (tmp_path / "cut" / "report.json").exists()
    ckpt = loop_mod.load_checkpoint(str(tmp_path / "cut"))
    assert (ckpt["stage"], ckpt["step"], ckpt["finished"]) == (stage, 25, False)
    _cli(tmp_path, "cut", "--method", method, "--log_every", "5", "--resume")
    for name in ("heads.safetensors", "metrics.jsonl", "report.json"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


def test_config_from_flags_json_and_yaml_agree(tmp_path):
    flags = ["--method", "gmm", "--steps", "77", "--k", "2", "--gmm_target", "histogram", "--out", "x"]
    from_flags = parse_train_rm(flags)
    js, ym = tmp_path / "c.json", tmp_path / "c.yaml"
    d = {"method": "gmm", "steps": 77, "k": 2, "gmm_target": "histogram", "out": "x"}
    js.write_text(json.dumps(d))
    ym.write_text("".join(f"{k}: {v}\n" for k, v in d.items()))
    assert parse_train_rm([str(js)]) == from_flags == parse_train_rm([str(ym)])
    assert from_flags.steps == 77 and from_flags.k == 2
    # YAML reads 1e-3 as a string: values go through the same conversion as flags.
    ym.write_text("method: gmm\nlr: 1e-3\nresume: false\n")
    assert parse_train_rm([str(ym)]).lr == 1e-3
    # Flags after the file override it (resume a run configured by a file).
    over = parse_train_rm([str(ym), "--resume", "--lr", "0.5"])
    assert over.resume is True and over.lr == 0.5
    js.write_text(json.dumps({"method": "gmm", "learn_rate": 0.1}))
    with pytest.raises(ValueError, match=r"unknown options \['learn_rate'\]"):
        parse_train_rm([str(js)])


@pytest.mark.parametrize("target", ["em", "histogram"])
def test_gmm_on_grid_targets(tmp_path, target):
    report = _cli(tmp_path, target, "--method", "gmm", "--gmm_target", target, "--grid_size", "101")
    assert report["nll"] < report["nll_true_mixture"] + 0.5


def test_text_data_through_a_local_backbone(tmp_path):
    from prefcore.data import save_jsonl
    from prefcore.data.synthetic import RatingsWorldConfig, make_ratings_world, sample_vote_pairs
    from python_tests.tiny_transformers import make_llama, make_tokenizer

    backbone = tmp_path / "backbone"
    make_llama(backbone)
    make_tokenizer(backbone)
    world = make_ratings_world(torch.Generator().manual_seed(1), RatingsWorldConfig(num_items=40))
    save_jsonl(world.to_records(), tmp_path / "ratings.jsonl")
    save_jsonl(sample_vote_pairs(world, 40, 5, torch.Generator().manual_seed(2)).to_records(), tmp_path / "pairs.jsonl")
    common = ["--backbone", str(backbone), "--max_length", "48", "--steps", "20", "--batch_size", "16",
              "--progress", "false"]
    runs = {"gmm": ["--data", str(tmp_path / "ratings.jsonl")],
            "bt-margin": ["--data", str(tmp_path / "pairs.jsonl")],
            # qrm on text: ratings for the heads, pairs for the gate.
            "qrm": ["--data", str(tmp_path / "ratings.jsonl"), "--pairs", str(tmp_path / "pairs.jsonl")]}
    for method, data in runs.items():
        out = tmp_path / f"run-{method}"
        assert main(["train-rm", "--method", method, "--out", str(out), *data, *common]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["method"] == method
        assert all(math.isfinite(v) for v in report.values() if isinstance(v, float)), report
        heads_cfg = json.loads((out / "heads.json").read_text())
        assert heads_cfg["in_features"] == 16  # the tiny backbone's hidden size: features came from it
        assert any((out / "features" / "ratings-responses").glob("*.safetensors")) or method == "bt-margin"
    # A trained run scores new texts: the same features (up to batching) and distribution as its cache.
    from prefcore.train.rm.features import load_features
    from prefcore.train.rm.scoring import RunScorer

    records = world.to_records()[:5]
    scorer = RunScorer.load(str(tmp_path / "run-gmm"))
    prompts, responses = [r["prompt"] for r in records], [r["response"] for r in records]
    feats, _ = scorer.text_features(prompts, responses)
    cached = load_features(str(tmp_path / "run-gmm" / "features" / "ratings-responses"))[:5]
    torch.testing.assert_close(feats, cached, rtol=1e-5, atol=1e-5)
    dist = scorer.reward_distribution(prompts, responses)
    torch.testing.assert_close(dist.mean(), scorer.distribution_from_features(cached).mean(), rtol=1e-4, atol=1e-5)
    assert scorer.reward(prompts, responses, risk="cvar", alpha=0.2).shape == (5,)
    qrm = RunScorer.load(str(tmp_path / "run-qrm"))
    q = qrm.reward_distribution(prompts, responses)
    assert q.values.shape == (5, 19) and torch.isfinite(qrm.reward(prompts, responses, risk="ce", lam=1.0)).all()


def test_public_source_layouts_train_through_the_adapters(tmp_path):
    """--data_format runs the prefcore.data adapters on a source's own column layout (fixtures)."""
    from python_tests.tiny_transformers import make_llama, make_tokenizer

    backbone = tmp_path / "backbone"
    make_llama(backbone)
    make_tokenizer(backbone)
    fx = os.path.join(os.path.dirname(__file__), "fixtures")
    common = ["--backbone", str(backbone), "--max_length", "48", "--steps", "5", "--batch_size", "4",
              "--eval_fraction", "0.3", "--progress", "false"]
    assert main(["train-rm", "--method", "bt", "--data", f"{fx}/hh_rlhf.jsonl", "--data_format", "hh-rlhf",
                 "--out", str(tmp_path / "hh"), *common]) == 0
    assert main(["train-rm", "--method", "bt-margin", "--data", f"{fx}/ultrafeedback_binarized.jsonl",
                 "--data_format", "ultrafeedback-binarized", "--out", str(tmp_path / "uf"), *common]) == 0
    assert main(["train-rm", "--method", "qrm", "--data", f"{fx}/helpsteer2.jsonl", "--data_format", "helpsteer2",
                 "--pairs", f"{fx}/hh_rlhf.jsonl", "--pairs_format", "hh-rlhf", "--out", str(tmp_path / "hs"),
                 *common]) == 0
    heads_cfg = json.loads((tmp_path / "hs" / "heads.json").read_text())
    assert heads_cfg["attribute_names"] == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def test_data_that_cannot_train_the_method_is_rejected_before_training(tmp_path, capsys):
    from prefcore.data import save_jsonl
    from python_tests.tiny_transformers import make_llama, make_tokenizer

    backbone = tmp_path / "backbone"
    make_llama(backbone)
    make_tokenizer(backbone)
    pair = {"prompt": "the cat", "chosen": "sat on the mat", "rejected": "ran"}
    save_jsonl([{**pair, "votes": [1, 1, 0]}, pair, {**pair, "margin": 0.5}, pair], tmp_path / "pairs.jsonl")
    attrs = [{"prompt": "a", "response": "b", "helpfulness": 0.5, "safety": 0.1}] * 4
    save_jsonl(attrs, tmp_path / "attrs.jsonl")
    common = ["--backbone", str(backbone), "--max_length", "48", "--progress", "false"]
    out = str(tmp_path / "o")
    assert main(["train-rm", "--method", "bt-margin", "--data", str(tmp_path / "pairs.jsonl"), "--out", out, *common]) == 2
    assert "needs votes or a margin on every pair; 2 have neither (first: row 1" in capsys.readouterr().err
    assert main(["train-rm", "--method", "gmm", "--data", str(tmp_path / "attrs.jsonl"), "--attributes",
                 "helpfulness,safety", "--score_range", "0,1", "--out", out, *common]) == 2
    assert "has 2 attributes ('helpfulness', 'safety')" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))  # nothing was trained


def test_bad_configs_give_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="method must be one of"):
        TrainRMConfig(method="ppo")
    with pytest.raises(ValueError, match="eval_fraction"):
        TrainRMConfig(method="bt", eval_fraction=1.0)
    with pytest.raises(ValueError, match="score_range"):
        TrainRMConfig(method="gmm", score_range="1,-1")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_reward_model(TrainRMConfig(method="gmm", out=str(tmp_path / "none"), resume=True, progress=False))
    with pytest.raises(ValueError, match="needs --backbone"):
        train_reward_model(TrainRMConfig(method="gmm", data=__file__, out=str(tmp_path / "t"), progress=False))
    with pytest.raises(FileNotFoundError, match="existing JSONL"):
        train_reward_model(TrainRMConfig(method="gmm", data=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "m")))
    for bad, match in ((dict(risk_alpha=0.0), "risk_alpha"), (dict(grid_size=1), "grid_size"),
                       (dict(num_items=1), "num_items"), (dict(trunk_layers=-1), "trunk_layers")):
        with pytest.raises(ValueError, match=match):
            TrainRMConfig(method="gmm", **bad)
    with pytest.raises(ValueError, match="leave no held-out rows"):  # checked before any training
        train_reward_model(TrainRMConfig(method="gmm", num_items=2, out=str(tmp_path / "tiny"), progress=False))
    _cli(tmp_path, "base", "--method", "gmm", "--steps", "10")
    capsys.readouterr()
    # The CLI reports configuration errors as one line on stderr and exit status 2, not a traceback.
    rc = main(["train-rm", "--out", str(tmp_path / "base"), *SMALL, "--method", "gmm", "--steps", "11", "--resume"])
    assert rc == 2
    assert "error: resume: the configuration differs from the checkpointed run in ['steps']" in capsys.readouterr().err
    # argparse's rejection of an unknown method is one line with exit status 2 too (no usage block)
    assert main(["train-rm", "--method", "ppo"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'ppo'" in err and len(err.strip().splitlines()) == 1


# ---- the papers' claims that need a trained reward model -------------------------------------

def test_qrm_heads_are_calibrated_on_held_out_bimodal_targets(tmp_path):
    """QRM: quantile heads trained with the pinball loss are calibrated — on held-out items of
    the synthetic world (bimodal ratings in the contentious region), |coverage(τ) − τ| ≤ 0.03."""
    report = _cli(tmp_path, "qrm", "--method", "qrm", "--num_items", "4000", "--steps", "600",
                  "--batch_size", "256", "--gate_steps", "50")
    assert report["coverage_max_abs_error"] <= 0.03, report


def test_gmm_head_held_out_nll_is_within_5_percent_of_the_true_mixture(tmp_path):
    """DFL: a GMM head trained with gmm_nll on raw scores comes within 5% of the true
    (data-generating) per-item mixture on held-out items.

    "Within 5%" is read on the likelihood, the scale-free quantity: the model's geometric-mean
    likelihood per held-out score is at least 95% of the true mixture's, i.e.
    ``|NLL − NLL_true| ≤ −ln 0.95 ≈ 0.051`` nats. (A relative difference of NLLs is not meaningful
    for continuous scores: NLL shifts by ``log c`` when scores are rescaled by ``c``, and here it is
    close to 0.) The ratings are clipped to [−1, 1], so the true density is the pre-clipping mixture."""
    report = _cli(tmp_path, "gmm", "--method", "gmm", "--num_items", "8000", "--steps", "1500", "--batch_size", "256")
    assert abs(report["nll"] - report["nll_true_mixture"]) <= -math.log(0.95), report
