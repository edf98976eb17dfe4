"""Making pairs: prompts files, sampling a model into pairs, active selection, and the CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.collect.tasks import (
    GenerateConfig,
    candidate_pairs,
    make_pair_tasks,
    read_prompts,
    sample_images,
)
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.models.registry import load_model
from diffalign.rewards.ensemble import RewardEnsemble
from diffalign.rewards.learned import build_reward_model
from tests.align.helpers import save_tiny_model

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square", "two triangles"]


def test_read_prompts_text_and_jsonl(tmp_path: Path):
    text = tmp_path / "p.txt"
    text.write_text("# comment\na red circle\n\n  a blue square  \n")
    assert read_prompts(text) == ["a red circle", "a blue square"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "two triangles", "tag": "counting"}\n')
    assert read_prompts(jsonl) == ["two triangles"]
    jsonl.write_text('{"tag": "counting"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_prompts(jsonl)
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "epsilon")
    return folder, load_model(str(folder), device="cpu")


def test_active_mode_queues_the_pairs_the_ensemble_disagrees_on_most(tiny):
    _, model = tiny
    sampler = SamplerConfig(sampler="ddim", num_steps=2, eta=0.0, guidance_scale=1.0)
    config = GenerateConfig(per_prompt=3, seed=5, max_pairs=4)
    ensemble = RewardEnsemble([build_reward_model(PROMPTS, seed=s) for s in range(3)])
    tasks = make_pair_tasks(model, "tiny", PROMPTS, sampler, config, ensemble)
    # Independently: every pair's variance over members of sigmoid(r_a - r_b), highest four.
    images = sample_images(model, PROMPTS, sampler, config)
    scores = []
    for p, prompt in enumerate(PROMPTS):
        for i, j in itertools.combinations(range(3), 2):
            a = torch.from_numpy(images[p][i]).permute(2, 0, 1)[None].float() / 255
            b = torch.from_numpy(images[p][j]).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                members = torch.stack([m(a, [prompt]) - m(b, [prompt]) for m in ensemble.members])
            scores.append(torch.sigmoid(members).var(correction=0).item())
    expected = sorted(scores, reverse=True)[:4]
    # The variances are ~1e-6 differences of sigmoids near 0.5; the batched and the one-by-one forwards
    # round differently (seen: 1e-10 absolute, 3e-5 relative), far below the gaps between pairs.
    assert [t.priority for t in tasks] == pytest.approx(expected, rel=1e-3, abs=1e-9)
    assert len(candidate_pairs(PROMPTS, images)) == 9
    plain = make_pair_tasks(model, "tiny", PROMPTS, sampler, GenerateConfig(per_prompt=3, seed=5))
    assert len(plain) == 9 and all(t.priority == 0.0 for t in plain)
    assert {t.image_a for t in tasks} <= {t.image_a for t in plain}


def test_cli_add_tasks_add_rater_and_status(tiny, tmp_path: Path):
    folder, _ = tiny
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    store = tmp_path / "prefs.db"
    runner = CliRunner()
    common = ["--store", str(store)]
    result = runner.invoke(
        app,
        ["collect", "add-tasks", "--model", str(folder), "--prompts", str(prompts), "--per-prompt", "3",
         "--raters-per-pair", "2", "--steps", "2", "--device", "cpu", *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "queued 6 new pairs" in result.output
    again = runner.invoke(
        app,
        ["collect", "add-tasks", "--model", str(folder), "--prompts", str(prompts), "--per-prompt", "3",
         "--steps", "2", "--device", "cpu", *common],
    )  # fmt: skip
    assert "queued 0 new pairs (6 already queued)" in again.output
    rater = runner.invoke(app, ["collect", "add-rater", "ann", *common])
    assert rater.exit_code == 0 and len(rater.stdout.strip().splitlines()[-1]) == 43
    twice = runner.invoke(app, ["collect", "add-rater", "ann", *common])
    assert twice.exit_code == 2 and "--rotate" in twice.output
    status = runner.invoke(app, ["collect", "status", *common])
    assert status.exit_code == 0 and "0 of 12 votes" in status.output
    bad = runner.invoke(app, ["collect", "add-tasks", "--prompts", str(tmp_path / "none.txt"), *common])
    assert bad.exit_code == 2 and "none.txt" in bad.output
