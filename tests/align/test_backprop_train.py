"""The reward-backpropagation trainers end to end on a tiny model: the reward rises and the weights
move for every method, exact resume, the NaN/inf stop, LoRA, flow models, the saved model folder."""

import json

import pytest
import torch

from diffalign.align.guard import NonFiniteError
from diffalign.align.reward_backprop import train_backprop
from diffalign.align.tracking import read_metrics
from diffalign.models.registry import load_model
from tests.align.backprop_helpers import DiffNaNAfter, DiffRedness, bp_config, trainable


def _lines(run):
    return [
        {k: v for k, v in r.items() if k != "seconds_per_step"} for r in read_metrics(run / "metrics.jsonl")
    ]


@pytest.mark.parametrize("method", ["alignprop", "draft", "draft-lv", "refl"])
def test_each_method_raises_the_reward_and_moves_the_weights(tmp_path, eps_model_dir, method):
    before = trainable(load_model(str(eps_model_dir)))
    model = train_backprop(bp_config(eps_model_dir, method, steps=3), tmp_path / "run", reward=DiffRedness())
    after = trainable(model)
    assert all(not torch.equal(before[n], after[n]) for n in ("conv_in.weight", "conv_out.weight"))
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[-1]["train_reward"] > lines[0]["train_reward"] + 0.05
    assert lines[-1]["reward_mean"] > lines[0]["reward_mean"] + 0.05
    per_step = 4 * (2 if method == "draft-lv" else 1)
    assert [r["reward_queries"] for r in lines] == [per_step, 2 * per_step, 3 * per_step]
    assert lines[0]["drift_to_base"] > 0 and all(r["grad_norm"] > 0 for r in lines)
    assert (lines[-1]["pretrain_loss"] > 0) == (method == "refl")
    if method == "draft":
        assert [r["grad_calls"] for r in lines] == [4, 8, 12]
    reloaded = trainable(load_model(str(tmp_path / "run")))
    assert all(torch.equal(reloaded[n], after[n]) for n in after)


def test_kl_weight_holds_the_policy_near_the_base_and_logs_its_penalty(tmp_path, eps_model_dir):
    lines = {}
    for kl_weight in (0.0, 3e3):
        cfg = bp_config(eps_model_dir, "alignprop", steps=4, kl_weight=kl_weight, kl_steps=2, eta=1.0)
        train_backprop(cfg, tmp_path / str(kl_weight), reward=DiffRedness())
        lines[kl_weight] = read_metrics(tmp_path / str(kl_weight) / "metrics.jsonl")
    free, held = lines[0.0], lines[3e3]
    assert "kl_penalty" not in free[0] and all(r["kl_penalty"] >= 0 for r in held)
    # the first step starts at the base, where the penalty has no gradient: both runs take it alike
    assert held[0]["kl_to_base"] == pytest.approx(free[0]["kl_to_base"], rel=1e-3)
    assert held[-1]["kl_to_base"] < 0.5 * free[-1]["kl_to_base"]
    for r in held:  # the weighted penalty is part of the loss
        assert r["loss"] == pytest.approx(-r["train_reward"] + 3e3 * r["kl_penalty"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["alignprop", "refl"])
def test_resume_matches_uninterrupted_run(tmp_path, eps_model_dir, method):
    kl = dict(kl_weight=10.0, kl_steps=2) if method == "refl" else {}  # the penalty's draws resume too
    cfg = bp_config(
        eps_model_dir, method, steps=4, num_steps=3, log_every=2, checkpoint_every=1, eta=0.5, **kl
    )
    whole = train_backprop(cfg, tmp_path / "whole", reward=DiffRedness())
    train_backprop(cfg, tmp_path / "parts", stop_after=3, reward=DiffRedness())  # mid log window
    assert not (tmp_path / "parts" / "model").exists()
    resumed = train_backprop(cfg, tmp_path / "parts", resume=True, reward=DiffRedness())
    assert [r["step"] for r in _lines(tmp_path / "whole")] == [2, 4]
    assert "kl_to_base" in _lines(tmp_path / "whole")[0]  # eta > 0: a stochastic sampler
    assert _lines(tmp_path / "whole") == _lines(tmp_path / "parts")
    for (name, a), b in zip(whole.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b), name
    # a finished 2-step run, extended to 4 steps, is the 4-step run
    short = bp_config(
        eps_model_dir, method, steps=2, num_steps=3, log_every=2, checkpoint_every=1, eta=0.5, **kl
    )
    train_backprop(short, tmp_path / "short", reward=DiffRedness())
    extended = train_backprop(cfg, tmp_path / "short", extend=True, reward=DiffRedness())
    assert _lines(tmp_path / "whole") == _lines(tmp_path / "short")
    for (name, a), b in zip(whole.unet.state_dict().items(), extended.unet.state_dict().values()):
        assert torch.equal(a, b), name


def test_nan_reward_stops_and_keeps_last_good_checkpoint(tmp_path, eps_model_dir):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step 3: the reward became NaN or inf") as err:
        # the reward is called twice a step (training, then the logged metrics): NaN from step 3 on
        train_backprop(bp_config(eps_model_dir, "draft", steps=5), run, reward=DiffNaNAfter(4))
    assert err.value.last_checkpoint == run / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert not (run / "model").exists()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_lora_trains_only_the_adapters_and_flow_models_train(tmp_path, eps_model_dir, flow_model_dir):
    model = train_backprop(
        bp_config(eps_model_dir, "draft", steps=2, lora_rank=4), tmp_path / "lora", reward=DiffRedness()
    )
    names = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.unet.named_parameters() if "lora_B" in n)
    base = load_model(str(eps_model_dir)).unet.state_dict()
    merged = load_model(str(tmp_path / "lora")).unet.state_dict()
    assert any(not torch.equal(base[k], merged[k]) for k in base)

    flow = train_backprop(
        bp_config(flow_model_dir, "alignprop", steps=2), tmp_path / "flow", reward=DiffRedness()
    )
    record = json.loads((tmp_path / "flow" / "config.json").read_text())
    assert flow.prediction_type == "flow" and record["resolved"]["sampler"]["sampler"] == "flow_euler"
    before = trainable(load_model(str(flow_model_dir)))
    assert not torch.equal(before["conv_out.weight"], trainable(flow)["conv_out.weight"])
