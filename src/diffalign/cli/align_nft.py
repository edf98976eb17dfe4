"""`diffalign align nft`: DiffusionNFT, online RL on the forward process (registered onto the `align`
command group)."""

from __future__ import annotations

from pathlib import Path

from diffalign.cli.align import register_reward_trainer, reward_trainer_config, run_reward_trainer
from diffalign.cli.common import console


def _run_nft(
    method: str,
    out: Path,
    overrides: list[str] | None,
    model: str | None,
    reward: str | None,
    prompts: str | None,
    config_file: Path | None,
    resume: bool,
    device: str | None,
) -> None:
    from diffalign.align.nft import train_nft
    from diffalign.align.nft_config import NFTConfig

    config = reward_trainer_config(NFTConfig, method, overrides, model, reward, prompts, config_file, device)
    console.print(
        f"{method}: {config.epochs} epochs x {config.samples_per_epoch} samples, reward {config.reward}; "
        f"run folder {out}"
    )

    def train() -> None:
        train_nft(config, out, resume=resume, show_progress=True)

    def summary(last: dict) -> str:
        gold = f", gold {last['gold_mean']:.3f}" if "gold_mean" in last else ""
        kl = last["kl_to_base"]
        return f"epoch {last['step']}: reward {last['reward_mean']:.3f}{gold}, KL to base {kl:.2e}"

    run_reward_trainer(out, config.runtime.device, train, summary)


register_reward_trainer(
    "nft",
    "DiffusionNFT (Zheng et al. 2025): group advantages on the forward process; any sampler, no log-probs.",
    _run_nft,
)
