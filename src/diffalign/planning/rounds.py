"""What an online DPO run costs: `measure_online_dpo`, a round composed from its two measured parts.

A round of online DPO (`diffalign.align.online_dpo`) samples and labels `pairs_per_round` pairs with
the round's starting model, then runs Diffusion-DPO for `dpo.steps` steps on them (loading the model,
starting up and saving it once a round). Each part is measured by two runs of different lengths, as
`measure.measure_step_cost` does for a trainer (the difference separates the per-unit cost from the
fixed part):

    labelling  per pair  (runs of `short_pairs` and `long_pairs` pairs, the config's sampler and labeller)
    training   per step and fixed part (runs of `short` and `long` DPO steps on the pairs just labelled)

    one round  = pairs_per_round * per pair + dpo.steps * per step   (shared by N processes: each samples
                                                                      its share, the global batch splits)
    fixed      = rounds * training's fixed part + labelling's fixed part     (does not shrink with N)

Denoiser rows and reward queries compose the same way; the simulated panel makes no reward queries.
"""

from __future__ import annotations

from pathlib import Path

from diffalign.align.dpo import train_dpo
from diffalign.align.online_dpo import OnlineDPOConfig, label_round, load_labeller, read_prompts
from diffalign.evaluate.costs import CostMeter
from diffalign.planning.measure import StepCost, measure_step_cost
from diffalign.prefs.pairs import PreferencePairs
from diffalign.prefs.store import PreferenceStore


def measure_online_dpo(
    config: OnlineDPOConfig,
    device: str,
    short: int = 1,
    long: int = 3,
    short_pairs: int = 2,
    long_pairs: int = 8,
) -> StepCost:
    """The cost of one round of `config` (unit "round") and of the run's fixed part, measured on this
    machine (module doc). The labelling runs label real pairs with the config's labeller (the
    simulated panel, or its reward, whose queries are counted)."""
    from diffalign.models.registry import load_model

    if not 1 <= short_pairs < long_pairs:
        raise ValueError(
            f"plan: the labelling runs need 1 <= short < long pairs, got {short_pairs} and {long_pairs}"
        )
    reward = load_labeller(config)
    prompts = read_prompts(config.prompts) if config.prompts else None
    labelled: list[PreferencePairs] = []

    def label(run_dir: Path, pairs: int, meter: CostMeter) -> None:
        model = load_model(config.dpo.model, device=device, diffusers_options=config.dpo.pipeline)
        run_dir.mkdir(parents=True, exist_ok=True)
        store = PreferenceStore.open(run_dir / "prefs.db")
        counted = None if reward is None else meter.count_reward(reward)
        label_round(
            config, model, store, pairs, seed=config.dpo.runtime.seed, reward=counted, prompts=prompts
        )
        labelled.append(store.pairs(size=model.image_shape[-1]))

    labelling = measure_step_cost(
        "online-dpo", label, device, short_pairs, long_pairs, reward_counted=reward is not None, unit="pair"
    )

    def train(run_dir: Path, stop_after: int, meter: CostMeter) -> None:
        train_dpo(config.dpo, labelled[-1], run_dir, stop_after=stop_after)

    training = measure_step_cost("dpo", train, device, short, long)
    return compose_round(config, labelling, training)


def compose_round(config: OnlineDPOConfig, labelling: StepCost, training: StepCost) -> StepCost:
    """One round's cost (unit "round") and the run's fixed part from its parts' measurements."""
    pairs, steps = config.pairs_per_round, config.dpo.steps

    def per_round(per_pair: float | None, per_step: float | None) -> float | None:
        if per_pair is None or per_step is None:
            return None
        return pairs * per_pair + steps * per_step

    queries = labelling.reward_queries_per_step
    peaks = [c.peak_memory_mb for c in (labelling, training) if c.peak_memory_mb is not None]
    return StepCost(
        method="online-dpo",
        unit="round",
        seconds_per_step=pairs * labelling.seconds_per_step + steps * training.seconds_per_step,
        fixed_seconds=config.rounds * training.fixed_seconds + labelling.fixed_seconds,
        forward_nfe_per_step=per_round(labelling.forward_nfe_per_step, training.forward_nfe_per_step),
        backward_nfe_per_step=per_round(labelling.backward_nfe_per_step, training.backward_nfe_per_step),
        reward_queries_per_step=None if queries is None else pairs * queries,
        peak_memory_mb=max(peaks) if peaks else None,
        memory_kind=training.memory_kind,
        device=training.device,
        steps_measured=None,
        source=(
            f"a round composed of {pairs} pairs at {labelling.seconds_per_step:.3g} s each (labelling "
            f"runs of {labelling.steps_measured[0]} and {labelling.steps_measured[1]} pairs) and {steps} "
            f"DPO steps at {training.seconds_per_step:.3g} s each (runs of {training.steps_measured[0]} "
            f"and {training.steps_measured[1]} steps), measured on {training.device}; the fixed part is "
            f"{config.rounds} rounds x {training.fixed_seconds:.3g} s of DPO start-up and saving plus "
            f"{labelling.fixed_seconds:.3g} s"
        ),
    )
