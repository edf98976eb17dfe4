"""`diffalign align ddpo|dpok|grpo|nft`: online RL against a reward, by policy gradients or DiffusionNFT
(registered onto the `align` command group)."""

from __future__ import annotations

from pathlib import Path

from diffalign.cli.align import register_reward_trainer, reward_trainer_config, run_reward_trainer
from diffalign.cli.common import console, fail


def _run_pg(
    method: str,
    out: Path,
    overrides: list[str] | None,
    model: str | None,
    reward: str | None,
    prompts: str | None,
    config_file: Path | None,
    resume: bool,
    device: str | None,
    extend: bool = False,
) -> None:
    from diffalign.align.nft import train_nft
    from diffalign.align.nft_config import NFTConfig
    from diffalign.align.pg_config import PGConfig
    from diffalign.align.policy_gradient import RatioCheckError, train_pg

    config_class, trainer = (NFTConfig, train_nft) if method == "nft" else (PGConfig, train_pg)
    options = (overrides, model, reward, prompts, config_file, device)
    config = reward_trainer_config(config_class, method, *options)
    console.print(
        f"{method}: {config.epochs} epochs x {config.samples_per_epoch} samples, reward {config.reward}; "
        f"run folder {out}"
    )

    def train() -> None:
        try:
            trainer(config, out, resume=resume, show_progress=True, extend=extend)
        except RatioCheckError as err:
            fail(str(err))

    def summary(last: dict) -> str:
        gold = f", gold {last['gold_mean']:.3f}" if "gold_mean" in last else ""
        kl = last["kl_to_base"]
        return f"epoch {last['step']}: reward {last['reward_mean']:.3f}{gold}, KL to base {kl:.2e}"

    run_reward_trainer(out, config.runtime.device, train, summary)


register_reward_trainer(
    "ddpo",
    "DDPO (Black et al. 2023): PPO clipping over sampled trajectories, per-prompt reward statistics.",
    _run_pg,
)
register_reward_trainer(
    "dpok",
    "DPOK (Fan et al. 2023): DDPO's objective plus a KL to the base model (kl_beta, default 0.01).",
    _run_pg,
)
register_reward_trainer(
    "grpo",
    "GRPO with group-standardised advantages; on a flow model, Flow-GRPO's SDE sampler and KL.",
    _run_pg,
)
register_reward_trainer(
    "nft",
    "DiffusionNFT (Zheng et al. 2025): group advantages on the forward process; any sampler, no log-probs.",
    _run_pg,
)
