"""Every bad setting of policy training gives a one-line error naming it, before any model is loaded;
and the ``prefcore train-policy`` CLI end to end (flags, a YAML file then overriding flags)."""
from __future__ import annotations

import json

import pytest

from prefcore.cli import main
from prefcore.train.policy import PolicyConfig
from python_tests.test_train_policy_common import make_policy, make_tokenizer, read_metrics

REWARD_FN = "python_tests.test_train_policy_common:count_a"


@pytest.mark.parametrize("kwargs, match", [
    ({"num_generations": 1}, "num_generations must be >= 2 for algo='rloo'"),
    ({"algo": "grpo", "num_generations": 1}, "num_generations must be >= 2 for algo='grpo'"),
    ({"algo": "dpo"}, "algo must be one of"),
    ({"utility": "ce:abc"}, "utility: λ in 'ce:abc' must be a number"),
    ({"utility": "ce:nan"}, "utility: λ in 'ce:nan' must be a finite number"),
    ({"utility": "mean-var:inf"}, "utility: α in 'mean-var:inf' must be a finite number"),
    ({"utility": "cvar:1.5"}, r"utility: α of cvar must lie in \(0, 1\]"),
    ({"utility": "quantile:0"}, r"utility: τ of quantile must lie strictly inside \(0, 1\)"),
    ({"utility": "median"}, "utility: unknown utility 'median'"),
    ({"utility": "mean:2"}, "utility: 'mean' takes no parameter"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_p": 1.5}, "top_p must be <= 1"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"epsilon": 0.0}, "epsilon must be > 0"),
    ({"clip_ratio_c": 0.5}, "clip_ratio_c must be > 1"),
    ({"loss_agg_mode": "mean"}, "loss_agg_mode must be one of"),
    ({"kl_estimator": "k4"}, "kl_estimator must be one of"),
    ({"kl_coef": -0.1}, "kl_coef must be >= 0"),
    ({"target_kl": 1.0, "kl_coef": 0.0}, "kl_coef must be > 0 when target_kl is set"),
    ({"kl_in_reward": False}, "kl_in_reward=False .* is a grpo option"),
    ({"gamma": 1.5}, "gamma must be <= 1"),
    ({"lam": -0.1}, "lam must be >= 0"),
    ({"max_completion_length": 0}, "max_completion_length must be an integer >= 1"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
    ({"reward_clip": 0.0}, "reward_clip must be > 0"),
    ({"device": "tpu"}, "device must be"),
    ({"output_dir": "a", "out": "b"}, "output_dir and out name different directories"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyConfig(**kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy-files")
    make_policy(path=d / "policy")
    make_tokenizer(d / "policy")
    with open(d / "prompts.jsonl", "w") as f:
        for p in ("a b c", "d e", "f g h i", "j"):
            f.write(json.dumps({"prompt": p}) + "\n")
    with open(d / "bad.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "a b"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    from transformers import LlamaModel

    make_policy().model.save_pretrained(d / "trunk-only")  # a LlamaModel: no LM head
    make_tokenizer(d / "trunk-only")
    for name, kw in (("no-pad", {"pad": False}), ("no-eos", {"eos": False})):
        make_policy(path=d / name)
        make_tokenizer(d / name, **kw)
    assert LlamaModel  # imported for the saved architecture above
    return d


def _run(files, tmp_path, *extra, model="policy"):
    return main(["train-policy", "--model_name_or_path", str(files / model), "--dataset", str(files / "prompts.jsonl"),
                 "--reward_model", REWARD_FN, "--out", str(tmp_path / "run"), "--no_progress", "true",
                 "--num_generations", "2", "--per_device_train_batch_size", "2", "--max_completion_length", "4",
                 *extra])


@pytest.mark.parametrize("extra, model, match", [
    (["--utility", "cvar:x"], "policy", "utility: α in 'cvar:x' must be a number"),
    (["--num_generations", "1"], "policy", "num_generations must be >= 2"),
    (["--reward_model", "/nonexistent/rm"], "policy", "reward_model: no such directory '/nonexistent/rm'"),
    (["--reward_model", "MODEL_DIR"], "policy", "reward_model: .* is neither a prefcore train-rm run"),
    (["--reward_model", "no_such_module_xyz:f"], "policy", "reward_model: cannot import"),
    (["--dataset", "/nonexistent/p.jsonl"], "policy", "no such file"),
    (["--dataset", "BAD"], "policy", r"bad.jsonl, row 1, field 'prompt': expected a non-empty string"),
    ([], "missing-dir", "model_name_or_path: no such directory"),
    ([], "trunk-only", "model_name_or_path: .* holds a LlamaModel, not a causal LM"),
    ([], "no-pad", "tokenizer: needs a pad token and an eos token"),
    ([], "no-eos", "tokenizer: needs a pad token and an eos token"),
])
def test_cli_errors_before_any_model_is_loaded(files, tmp_path, monkeypatch, capsys, extra, model, match):
    import re

    import transformers

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    extra = [str(files / "policy") if e == "MODEL_DIR" else str(files / "bad.jsonl") if e == "BAD" else e
             for e in extra]
    assert _run(files, tmp_path, *extra, model=model) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]  # after datasets' progress bars
    assert err.startswith("prefcore train-policy: error:")
    assert re.search(match, err), err


def test_cli_yaml_then_flags_end_to_end(files, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {files / 'policy'}\ndataset: {files / 'prompts.jsonl'}\n"
                   f"reward_model: {REWARD_FN}\nout: {tmp_path / 'run'}\nnum_generations: 2\n"
                   "per_device_train_batch_size: 2\nmax_completion_length: 4\nmax_steps: 5\nno_progress: true\n")
    assert main(["train-policy", str(cfg), "--max_steps", "2", "--algo", "grpo"]) == 0
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["algo"] == "grpo" and "max_steps" not in saved  # a resumed run may run longer
    assert (tmp_path / "run" / "policy" / "config.json").exists()
    assert "prefcore train-policy →" in capsys.readouterr().out


def test_embedded_default_runs_on_the_text_world(tmp_path, monkeypatch):
    """No model/prompts/reward: the text world's pretrained policy, its 48 default prompts and the
    population's exact rating distribution as the reward (pretraining shortened for the test)."""
    from prefcore.data.text_world import TextWorld
    from prefcore.train.policy import embedded

    monkeypatch.setattr(embedded, "PRETRAIN_STEPS", 5)
    out = tmp_path / "default"
    assert main(["train-policy", "--utility", "cvar:0.25", "--max_steps", "2", "--no_progress", "true",
                 "--output_dir", str(out)]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    # a distributional reward: the population's left-tail quantiles are logged
    assert all("reward_quantile/0.05" in r for r in recs)
    saved = json.loads((out / "config.json").read_text())
    assert saved["utility"] == "cvar:0.25"
    # the policy is the world's causal LM over its vocabulary
    assert json.loads((out / "policy" / "config.json").read_text())["vocab_size"] == len(TextWorld().tokenizer)


def test_prompt_sources(tmp_path):
    import datasets

    from prefcore.data.schemas import DataValidationError
    from prefcore.train.policy.prompts import load_prompts

    rows = [{"prompt": "a b", "id": 1}, {"prompt": "c", "id": 2}]
    assert load_prompts(datasets.Dataset.from_list(rows)) == ["a b", "c"]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    assert load_prompts(str(tmp_path / "p.parquet")) == ["a b", "c"]
    assert load_prompts(["x y", "z"]) == ["x y", "z"]
    with pytest.raises(ValueError, match="has no 'prompt' column"):
        load_prompts(datasets.Dataset.from_list([{"text": "a"}]))
    with pytest.raises(DataValidationError, match=r"<prompts>, row 1, field 'prompt': expected a non-empty string"):
        load_prompts(["ok", "   "])
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts([])
