"""`diffalign steer <method>`: steer a frozen model's sampler towards a reward at test time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from diffalign.cli.common import console, fail, load_model_arg, resolve_device
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE

app = typer.Typer(
    no_args_is_help=True,
    help="Test-time alignment: best-of-N, noise search, reward guidance, FK steering, SVDD, DNO.",
)

#: Methods that need a stochastic sampler (their default: DDIM eta = 1, or flow_sde).
STOCHASTIC_METHODS = ("fk", "svdd", "dno")

HELP = {
    "bon": "Best-of-N: N plain samples per prompt, keep the reward's favourite.",
    "search": "Search initial noises (mode=random or mode=zero_order) with a deterministic sampler.",
    "guidance": "Reward-gradient guidance on the predicted x0 (needs a differentiable reward).",
    "fk": "FK steering: SMC over K particles with reward potentials and resampling.",
    "svdd": "SVDD: per-step selection among M candidate children by the reward of their x0 prediction.",
    "dno": "Direct noise optimisation of the initial and per-step noises (mode=gradient|zero_order).",
}


def sampler_for(
    method: str,
    model,
    sampler: str | None,
    steps: int,
    guidance: float,
    eta: float | None,
    noise_level: float,
):
    """The sampler config of a steering run: the model family's default, stochastic for FK/SVDD/DNO."""
    from diffalign.diffusion.sampling import SamplerConfig

    stochastic = method in STOCHASTIC_METHODS
    if sampler is None:
        if model.prediction_type == "flow":
            sampler = "flow_sde" if stochastic else "flow_euler"
        else:
            sampler = "ddim"
    if eta is None:
        eta = 1.0 if stochastic else 0.0
    try:
        config = SamplerConfig(
            sampler=sampler, num_steps=steps, guidance_scale=guidance, eta=eta, noise_level=noise_level
        )
        config.check_prediction_type(model.prediction_type)
    except ValueError as err:
        fail(str(err))
    return config


def checked_options(method: str, options: list[str], **extra: object) -> dict:
    """`--set key=value` options (and `extra`) checked against the method's config and converted to its
    field types (an integer written 1e3 becomes 1000); a `ConfigError` names a bad key or value."""
    from diffalign.align.config_io import from_dict, parse_overrides
    from diffalign.steer import METHODS

    config_cls = METHODS[method][0]
    values = {**parse_overrides(options, config_cls), **extra}
    config = from_dict(config_cls, values)  # checks names and types, naming the key
    return {name: getattr(config, name) for name in values}


def method_config(method: str, budget_nfe: int | None, sampler, options: list[str], seed: int):
    """Parse `--set key=value` options onto the method's config, sized to the budget."""
    from diffalign.align.config_io import ConfigError
    from diffalign.steer import make_config

    try:
        return make_config(method, budget_nfe, sampler, **checked_options(method, options, seed=seed))
    except (ConfigError, ValueError, TypeError) as err:
        fail(f"--set/--budget-nfe for {method}: {err}")


def load_reward_arg(spec: str, device: str):
    from diffalign.rewards.registry import RewardSpecError, load_reward

    try:
        return load_reward(spec, device=resolve_device(device))
    except (RewardSpecError, FileNotFoundError, ValueError, ImportError) as err:
        message = str(err)  # the registry's own errors already name the spec
        fail(message if repr(spec) in message else f"--reward {spec!r}: {message}")


def _prompts(prompt: list[str] | None, prompts_file: Path | None) -> list[str]:
    if prompts_file is not None:
        from diffalign.world.grammar import GrammarError
        from diffalign.world.shapeseval import load_shapeseval

        try:
            lines = [line["prompt"] for line in load_shapeseval(prompts_file)]
        except (GrammarError, OSError) as err:
            fail(f"--prompts {prompts_file}: {err}")
        return [*(prompt or []), *lines]
    if not prompt:
        fail("give at least one --prompt or a --prompts metadata file")
    return list(prompt)


def check_sampler(method: str, config) -> None:
    """Fail clearly when the sampler does not suit the method (before any sampling)."""
    if method in STOCHASTIC_METHODS and not config.stochastic:
        fail(
            f"{method} needs a stochastic sampler: pass --eta 1 (ddim), --sampler ddpm or --sampler flow_sde"
        )
    if method == "search" and config.stochastic:
        fail("search needs a deterministic sampler: pass --eta 0 (ddim) or --sampler flow_euler")


def eval_sample_fn(
    steer: str | None, reward: str | None, budget_nfe: int | None, options, config, seed, device
):
    """The sampler hook of `diffalign eval --steer ...`, or None without --steer."""
    if steer is None:
        if reward is not None or budget_nfe is not None or options:
            fail("--steer-reward, --budget-nfe and --steer-set need --steer")
        return None
    from diffalign.steer import steered_sample_fn

    if steer not in HELP:
        fail(f"--steer {steer!r}: choose one of {', '.join(HELP)}")
    if reward is None:
        fail("--steer needs --steer-reward")
    check_sampler(steer, config)
    method_config(steer, budget_nfe, config, options or [], seed)  # fails early on a bad option or budget
    return steered_sample_fn(
        steer, load_reward_arg(reward, device), budget_nfe, **checked_options(steer, options or [])
    )


def _command(method: str):
    def command(
        reward: Annotated[
            str,
            typer.Option(
                help="The reward: shapes:faithfulness-partial, a reward-model folder, file.py:fn, ..."
            ),
        ],
        out: Annotated[Path, typer.Option(help="Folder for the images and summary.json.")],
        prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeatable).")] = None,
        prompts: Annotated[
            Path | None, typer.Option(help="A metadata JSONL in GenEval's schema (all its prompts).")
        ] = None,
        model: Annotated[
            str, typer.Option(help="'base', 'base-flow', or a model, run or pipeline folder.")
        ] = "base",
        budget_nfe: Annotated[
            int | None,
            typer.Option(help="Denoiser calls per prompt to spend (sizes N, K, M or the iterations)."),
        ] = None,
        set_: Annotated[
            list[str] | None, typer.Option("--set", help="A method option key=value (repeatable).")
        ] = None,
        sampler: Annotated[str | None, typer.Option(help="ddim | ddpm | flow_euler | flow_sde.")] = None,
        steps: int = 20,
        guidance: Annotated[
            float, typer.Option(help="Classifier-free guidance scale.")
        ] = DEFAULT_GUIDANCE_SCALE,
        eta: Annotated[
            float | None, typer.Option(help="DDIM eta (default 1 for fk/svdd/dno, else 0).")
        ] = None,
        noise_level: float = 0.7,
        seed: int = 0,
        device: str = "auto",
    ) -> None:
        from diffalign.models.tokenizer import UnknownWordError
        from diffalign.rewards.protocol import NotDifferentiableError, RewardOutputError
        from diffalign.steer import run_method
        from diffalign.world.render import to_uint8

        texts = _prompts(prompt, prompts)
        m = load_model_arg(model, device)
        config = sampler_for(method, m, sampler, steps, guidance, eta, noise_level)
        check_sampler(method, config)
        r = load_reward_arg(reward, device)
        method_cfg = method_config(method, budget_nfe, config, set_ or [], seed)
        try:
            result = run_method(method, m, texts, r, config, method_cfg)
        except (NotDifferentiableError, RewardOutputError, UnknownWordError, ValueError) as err:
            fail(str(err))
        from PIL import Image

        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(to_uint8(result.images)):
            Image.fromarray(image).save(out / f"{i:04d}.png")
        summary = {
            **result.summary(),
            "prompts": texts,
            "rewards": result.rewards.tolist(),
            "reward": reward,
            "model": model,
            "budget_nfe": budget_nfe,
            "config": vars(method_cfg),
            "sampler": vars(config),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        per = summary["per_prompt"]
        console.print(
            f"{method}: mean reward {summary['mean_reward']:.3f} at {per['cost']:.0f} NFE-equivalents "
            f"per prompt ({per['nfe']:.0f} forward, {per['grad_nfe']:.0f} backward, "
            f"{per['reward_calls']:.0f} reward calls) in {result.seconds:.1f} s; wrote {out}"
        )

    command.__doc__ = HELP[method]
    return command


for _method in HELP:
    app.command(_method, help=HELP[_method])(_command(_method))
