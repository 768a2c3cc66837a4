"""``prefcore export-rm``: the exported directory, loaded by plain transformers in a child process
that never imports prefcore, gives logits equal to prefcore's utility of the same texts; the
weights of the linear functionals agree with :mod:`prefcore.utility` on random quantile sets;
non-linear rewards are refused with the reason."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from prefcore.cli import main
from prefcore.distributions import QuantileDistribution
from prefcore.train.rm.export import quantile_weights
from prefcore.utility import parse_utility
from python_tests.rm_runs import shared_runs

QRM_TAUS = [0.05 * i for i in range(1, 20)]


@pytest.mark.parametrize("taus", [QRM_TAUS, [0.3], [0.1, 0.5, 0.7], [0.25, 0.9]])
@pytest.mark.parametrize("spec", ["mean", "cvar:0.1", "cvar:0.03", "cvar:0.6", "cvar:1",
                                  "quantile:0.5", "quantile:0.02", "quantile:0.97", "quantile:0.05"])
def test_quantile_weights_equal_the_utilities_on_random_quantile_sets(taus, spec):
    g = torch.Generator().manual_seed(len(taus))
    v = (3 * torch.randn(64, len(taus), generator=g, dtype=torch.float64)).sort(-1).values
    expected = parse_utility(spec)(QuantileDistribution(v, torch.tensor(taus, dtype=torch.float64)))
    torch.testing.assert_close(v @ quantile_weights(taus, spec), expected, rtol=0, atol=1e-12)


CHILD = r"""
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
texts, result = json.loads(sys.stdin.read()), {}
for path in sys.argv[1:]:
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with torch.no_grad():
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=48)
        logits = model(**enc).logits
    result[path] = {"logits": logits.tolist(), "trl": logits[:, 0].tolist(),
                    "config": model.config.to_dict()["prefcore_export"]}
assert "prefcore" not in sys.modules
print(json.dumps(result))
"""


def _child_logits(paths, texts: list[str]) -> list[dict]:
    """Each exported model's logits on ``texts``, from one child process with plain transformers."""
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], input=json.dumps(texts),
                         capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return [result[str(p)] for p in paths]


@pytest.fixture(scope="module")
def runs():
    return shared_runs()


def test_exported_models_give_prefcores_utilities_in_plain_transformers(tmp_path, capsys, runs):
    from prefcore.train.rm.scoring import RunScorer
    from prefcore.train.rm.sources import response_text

    world, qrm, bt = runs
    prompts = [r["prompt"] for r in world.records[:6]]
    responses = [r["response"] for r in world.records[:6]]
    texts = [response_text(p, r) for p, r in zip(prompts, responses)]

    # A Llama score layer has no bias: refused without --drop_bias, and nothing is left behind.
    assert main(["export-rm", str(qrm), "--out", str(tmp_path / "nobias")]) == 2
    assert "--drop_bias" in capsys.readouterr().err and not (tmp_path / "nobias").exists()

    hf = tmp_path / "hf-qrm"
    assert main(["export-rm", str(qrm), "--out", str(hf), "--utility", "cvar:0.1", "--all_quantiles",
                 "--drop_bias"]) == 0
    hf_bt = tmp_path / "hf-bt"
    assert main(["export-rm", str(bt), "--out", str(hf_bt), "--drop_bias"]) == 0
    got, got_bt = _child_logits([hf, hf_bt], texts)
    shift = torch.tensor(got["config"]["logit_shift"], dtype=torch.float64)
    logits = torch.tensor(got["logits"], dtype=torch.float64) + shift
    dist = RunScorer.load(str(qrm)).reward_distribution(prompts, responses)
    v = dist.values.double()
    assert bool((v[:, 1:] >= v[:, :-1]).all())  # uncrossed quantiles: the exported row is exact here
    assert got["config"]["levels"] == pytest.approx(QRM_TAUS)
    torch.testing.assert_close(logits[:, 0], parse_utility("cvar:0.1")(dist).double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, 1:], v, rtol=0, atol=1e-5)
    assert len(got["logits"][0]) == 20
    torch.testing.assert_close(torch.tensor(got["trl"], dtype=torch.float64) + shift[0], logits[:, 0])

    got = got_bt
    reward = RunScorer.load(str(bt)).reward(prompts, responses).double()
    assert len(got["logits"][0]) == 1
    torch.testing.assert_close(torch.tensor(got["trl"], dtype=torch.float64) + got["config"]["logit_shift"][0],
                               reward, rtol=0, atol=1e-5)


def _heads_only_run(path, hc: dict) -> str:
    """A run directory holding only config.json and freshly initialised heads of ``hc`` (export
    checks the heads before it loads any backbone)."""
    from prefcore._io import atomic_write_json
    from prefcore.train.rm.methods import build_heads
    from prefcore.train.rm.trainer import save_heads

    path.mkdir()
    atomic_write_json(path / "config.json", {"backbone": None})
    save_heads(build_heads(hc), hc, str(path))
    return str(path)


def test_non_linear_rewards_are_refused_with_the_reason(tmp_path, capsys, runs):
    _, qrm, _ = runs
    base = {"trunk_layers": 0, "trunk_width": 8, "in_features": 16}
    qrm_hc = {**base, "method": "qrm", "num_attributes": 1, "prompt_features": 16, "non_crossing": False,
              "attribute_names": ["score"]}
    cases = [([str(qrm), "--utility", "ce:2"], "log-sum-exp"),
             ([str(qrm), "--utility", "mean-var:0.5"], "square"),
             ([str(qrm), "--utility", "cvar:0"], "α of cvar"),
             ([_heads_only_run(tmp_path / "mlp", {**base, "method": "bt", "trunk_layers": 1})], "MLP trunk"),
             ([_heads_only_run(tmp_path / "gmm", {**base, "method": "gmm", "k": 3})], "softmax"),
             ([_heads_only_run(tmp_path / "attr", {**qrm_hc, "num_attributes": 3})], "gate"),
             ([_heads_only_run(tmp_path / "nc", {**qrm_hc, "non_crossing": True})], "non_crossing"),
             ([_heads_only_run(tmp_path / "feat", {**base, "method": "bt"})], "synthetic default")]
    for i, (args, reason) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(["export-rm", *args, "--out", str(out), "--drop_bias"]) == 2
        err = capsys.readouterr().err
        assert reason in err and err.count("\n") == 1, err
        assert not out.exists()
    exists = tmp_path / "exists"
    exists.mkdir()
    assert main(["export-rm", str(qrm), "--out", str(exists)]) == 2
    assert "already exists" in capsys.readouterr().err and exists.is_dir()
