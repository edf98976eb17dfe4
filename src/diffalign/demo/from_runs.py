"""`diffalign report RUN...`: the paradigm report from existing runs.

- A demo folder (it holds `report.json`): the report is rendered again from its data (and copied to
  `--out` when given), so a report can be rebuilt after a change of the renderer without rerunning.
- Align run folders (`diffalign align ...`; each holds `config.json` and `model/`): every run's final
  model and the base model they share are evaluated on the same ShapesEval prompts and seeds
  (`diffalign.demo.evaluation`), each run's training curves come from its `metrics.jsonl` and its costs
  from `costs.json` (written by `diffalign align` and by the demo, with every other process's
  `costs-rank-N.json` added; "n/a" where a run has none).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from diffalign.demo.evaluation import EvalJudges, eval_metadata, evaluate_system, system_record
from diffalign.demo.pipeline import assemble_report, curves
from diffalign.demo.report_html import render_report
from diffalign.devices import resolve_device
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.evaluate.costs import read_run_costs
from diffalign.evaluate.features import load_feature_net
from diffalign.guidance import DEFAULT_GUIDANCE_SCALE
from diffalign.models.registry import load_model
from diffalign.rewards.registry import load_reward
from diffalign.world.raters import RaterPanel

#: The paradigm of each trainer, by the `trainer` (or config `method`) name in a run's config.json.
PARADIGMS = {
    "ddpo": "policy-gradient RL",
    "dpok": "policy-gradient RL",
    "grpo": "policy-gradient RL",
    "alignprop": "reward backpropagation",
    "draft": "reward backpropagation",
    "draft-lv": "reward backpropagation",
    "refl": "reward backpropagation",
    "dpo": "DPO family",
    "kto": "DPO family",
    "online-dpo": "DPO family",
    "spin": "DPO family",
}


class ReportRunsError(ValueError):
    """The folders given to `diffalign report` cannot make one report (the message names the folder)."""


def read_run(run_dir: Path) -> dict:
    """What a run folder says about itself: method, base model spec, reward spec, costs, training curves."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ReportRunsError(
            f"{run_dir}: not a run folder (no config.json) and not a demo folder (no report.json)"
        )
    if not (run_dir / "model").is_dir():
        raise ReportRunsError(f"{run_dir}: the run has no final model/ yet (finish it with --resume first)")
    try:
        record = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportRunsError(f"{config_file}: not readable JSON ({err})") from err
    config = record.get("config") if isinstance(record, dict) else None
    if (
        not isinstance(config, dict)
        or not (record.get("trainer") or config.get("method"))
        or "model" not in config
    ):
        raise ReportRunsError(
            f"{config_file}: not a diffalign run record (an object whose 'config' names the 'method' and "
            "the 'model')"
        )
    method = str(record.get("trainer") or config["method"])
    model = str(config["model"])
    try:
        costs = read_run_costs(run_dir)  # every process's counts of a multi-process run
        logged = curves(run_dir)  # read before any model is sampled, so a broken log fails at once
    except ValueError as err:
        raise ReportRunsError(str(err)) from err
    return {
        "method": method,
        "model": model,
        "reward": config.get("reward"),
        "costs": costs,
        "curves": logged,
    }


def system_names(runs: Sequence[Path]) -> list[str]:
    """A distinct report name for each run folder: its folder name, or as many of its last path parts
    as tell it from the base model and the runs before it (always a relative path, as the names become
    folders under the report's). A folder given twice is refused."""
    resolved = [Path(r).resolve() for r in runs]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise ReportRunsError(f"{runs[i]}: the same run folder is given twice")
    taken, names = {"base"}, []
    for path in resolved:
        parts = path.parts[1:]  # without the root, so a name never makes an absolute path
        name = next(
            (n for k in range(1, len(parts) + 1) if (n := "/".join(parts[-k:])) not in taken),
            f"{'/'.join(parts)}-{len(names) + 1}",  # /base itself beside the base model
        )
        taken.add(name)
        names.append(name)
    return names


def report_from_runs(
    runs: Sequence[Path],
    out: Path | None = None,
    *,
    prompts_per_task: int = 6,
    samples_per_prompt: int = 2,
    steps: int = 10,
    guidance: float = DEFAULT_GUIDANCE_SCALE,
    proxy: str | None = None,
    seed: int = 0,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> Path:
    """Write the report (see the module doc); returns the path of report.html."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ReportRunsError("diffalign report: give a demo folder or one or more run folders")
    if len(runs) == 1 and (runs[0] / "report.json").is_file():
        try:
            data = json.loads((runs[0] / "report.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReportRunsError(f"{runs[0] / 'report.json'}: not readable JSON ({err})") from err
        html = render_report(data, runs[0])
        if out is None:
            return html
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(html, out / "report.html"))
    started = time.perf_counter()
    infos = [read_run(r) for r in runs]
    names = system_names(runs)
    bases = {info["model"] for info in infos}
    if len(bases) != 1:
        named = ", ".join(f"{r} ({info['model']})" for r, info in zip(runs, infos))
        raise ReportRunsError(f"diffalign report: the runs start from different base models: {named}")
    base_spec = bases.pop()
    out = out or Path("report")
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    base = load_model(base_spec, device=dev)
    rewards = {info["reward"] for info in infos if info["reward"]}
    proxy_spec = proxy or (rewards.pop() if len(rewards) == 1 else None)
    judges = EvalJudges(
        panel=RaterPanel(),
        proxy=load_reward(proxy_spec, device=dev) if proxy_spec else None,
        features=load_feature_net(),
    )
    sampler = SamplerConfig(
        sampler="flow_euler" if base.prediction_type == "flow" else "ddim",
        num_steps=steps,
        guidance_scale=guidance,
    )
    metadata = eval_metadata(prompts_per_task, seed)
    plain_nfe = steps * (2 if guidance != 1.0 else 1)

    def evaluate(name: str, model, base_eval=None):
        log(f"evaluating {name} on {len(metadata)} prompts x {samples_per_prompt}")
        return evaluate_system(
            name,
            model,
            sampler,
            metadata,
            samples_per_prompt,
            out,
            judges,
            base=base_eval,
            seed=seed,
        )

    base_eval = evaluate("base", base)
    systems = [system_record("base", "none", "base", base_eval)]
    for run_dir, info, name in zip(runs, infos, names):
        result = evaluate(name, load_model(str(run_dir), device=dev), base_eval)
        costs = None
        if info["costs"] is not None:
            costs = {"preference_pairs": None, **info["costs"], "inference_nfe_per_image": plain_nfe}
        feedback = f"reward {info['reward']}" if info["reward"] else "preference pairs"
        paradigm = PARADIGMS.get(info["method"], "other")
        systems.append(
            system_record(
                name,
                info["method"],
                paradigm,
                result,
                run_dir=str(run_dir),
                feedback=feedback,
                costs=costs,
                curves=info["curves"],
                curve_x="epoch" if paradigm == "policy-gradient RL" else "step",
            )
        )
    data = assemble_report(
        "diffalign report: alignment runs on the Shapes world",
        [],
        systems,
        time.perf_counter() - started,
        {
            "prompts": len(metadata),
            "samples_per_prompt": samples_per_prompt,
            "steps": steps,
            "guidance": guidance,
            "sampler": sampler.sampler,
        },
        ["diffalign report " + " ".join(str(r) for r in runs)],
        str(dev),
    )
    (out / "report.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return render_report(data, out)
