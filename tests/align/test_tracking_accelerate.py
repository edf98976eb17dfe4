from diffalign.align.dpo import train_dpo
from tests.align.helpers import config


def test_tensorboard_tracker_writes_events(tmp_path, eps_model_dir, pairs):
    train_dpo(config(eps_model_dir, steps=2, log_with="tensorboard"), pairs, tmp_path / "run")
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))


def test_gradient_accumulation_and_bf16_run(tmp_path, eps_model_dir, pairs):
    cfg = config(eps_model_dir, steps=2)
    cfg.runtime.gradient_accumulation_steps = 2
    cfg.runtime.mixed_precision = "bf16"
    train_dpo(cfg, pairs, tmp_path / "run")
    assert (tmp_path / "run" / "model").is_dir()
