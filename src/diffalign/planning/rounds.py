"""What a run of rounds costs (online DPO, SPIN): `measure_online_dpo`, `measure_spin`, a round
composed from its two measured parts.

A round (`diffalign.align.rounds`) makes its items with the round's starting model (online DPO samples
and labels `pairs_per_round` pairs; SPIN generates one image for each of its real examples), then runs
Diffusion-DPO for `dpo.steps` steps on them (loading the model, starting up and saving it once a
round). Each part is measured by two runs of different lengths, as `measure.measure_step_cost` does for
a trainer (the difference separates the per-unit cost from the fixed part):

    making     per item (runs of `short_items` and `long_items`, the config's sampler and labeller)
    training   per step and fixed part (runs of `short` and `long` DPO steps on the items just made)

    one round  = items * per item + dpo.steps * per step   (shared by N processes: each makes its share,
                                                            the global batch splits)
    fixed      = rounds * training's fixed part + making's fixed part     (does not shrink with N)

Denoiser rows and reward queries compose the same way; the simulated panel makes no reward queries.
SPIN's cost does not depend on what its real images show, so it is measured with random images of the
model's shape against the world's prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.align.online_dpo import OnlineDPOConfig, label_round, load_labeller, read_prompts
from diffalign.align.spin import SPINConfig, generate
from diffalign.evaluate.costs import CostMeter
from diffalign.planning.measure import StepCost, measure_step_cost
from diffalign.planning.trainers import trainer_runner
from diffalign.prefs.pairs import PreferencePairs
from diffalign.prefs.simulate import pair_prompts
from diffalign.prefs.store import PreferenceStore


def measure_online_dpo(
    config: OnlineDPOConfig,
    device: str,
    short: int = 1,
    long: int = 3,
    short_items: int = 2,
    long_items: int = 8,
) -> StepCost:
    """The cost of one round of `config` (unit "round") and of the run's fixed part, measured on this
    machine (module doc). The labelling runs label real pairs with the config's labeller (the
    simulated panel, or its reward, whose queries are counted)."""
    from diffalign.models.registry import load_model

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
        "online-dpo", label, device, short_items, long_items, reward_counted=reward is not None, unit="pair"
    )

    training = measure_training(config.dpo, labelled[-1], device, short, long)
    return compose_round(
        "online-dpo", config.rounds, config.pairs_per_round, "pair", config.dpo.steps, labelling, training
    )


def measure_training(dpo, pairs: PreferencePairs, device: str, short: int, long: int) -> StepCost:
    """A round's Diffusion-DPO part (`dpo`, a DPOConfig) on `pairs`, runs of `short` and `long` steps."""
    return measure_step_cost("dpo", trainer_runner("dpo", dpo, pairs), device, short, long)


def compose_round(
    method: str, rounds: int, items: int, item_unit: str, steps: int, making: StepCost, training: StepCost
) -> StepCost:
    """One round's cost (unit "round": `items` made, `steps` DPO steps) and the fixed part of a run of
    `rounds` rounds, from the measured cost of making one item and of one DPO step."""

    def per_round(per_item: float | None, per_step: float | None) -> float | None:
        if per_item is None or per_step is None:
            return None
        return items * per_item + steps * per_step

    queries = making.reward_queries_per_step
    peaks = [c.peak_memory_mb for c in (making, training) if c.peak_memory_mb is not None]
    return StepCost(
        method=method,
        unit="round",
        seconds_per_step=items * making.seconds_per_step + steps * training.seconds_per_step,
        fixed_seconds=rounds * training.fixed_seconds + making.fixed_seconds,
        forward_nfe_per_step=per_round(making.forward_nfe_per_step, training.forward_nfe_per_step),
        backward_nfe_per_step=per_round(making.backward_nfe_per_step, training.backward_nfe_per_step),
        reward_queries_per_step=None if queries is None else items * queries,
        peak_memory_mb=max(peaks) if peaks else None,
        memory_kind=training.memory_kind,
        device=training.device,
        steps_measured=None,
        source=(
            f"a round composed of {items} {item_unit}s at {making.seconds_per_step:.3g} s each (runs of "
            f"{making.steps_measured[0]} and {making.steps_measured[1]} {item_unit}s) and {steps} DPO "
            f"steps at {training.seconds_per_step:.3g} s each (runs of {training.steps_measured[0]} and "
            f"{training.steps_measured[1]} steps), measured on {training.device}; the fixed part is "
            f"{rounds} rounds x {training.fixed_seconds:.3g} s of DPO start-up and saving plus "
            f"{making.fixed_seconds:.3g} s"
        ),
    )


def measure_spin(
    config: SPINConfig,
    examples: int,
    device: str,
    short: int = 1,
    long: int = 3,
    short_items: int = 2,
    long_items: int = 8,
) -> StepCost:
    """The cost of one round of `config` over `examples` real examples (unit "round") and of the run's
    fixed part, measured on this machine (module doc)."""
    from diffalign.models.registry import load_model

    if examples < 1:
        raise ValueError(
            f"plan: SPIN needs the number of real examples a round trains on (>= 1), got {examples}"
        )
    made: list[PreferencePairs] = []

    def make(run_dir: Path, images: int, meter: CostMeter) -> None:
        model = load_model(config.dpo.model, device=device, diffusers_options=config.dpo.pipeline)
        prompts = pair_prompts(images, None, config.dpo.runtime.seed)
        own = generate(model, prompts, list(range(images)), config)
        real = torch.randint(0, 256, own.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        made.append(PreferencePairs(prompts, real, own, torch.ones(images)))

    making = measure_step_cost("spin", make, device, short_items, long_items, unit="image")

    training = measure_training(config.dpo, made[-1], device, short, long)
    return compose_round("spin", config.rounds, examples, "image", config.dpo.steps, making, training)
