"""`diffalign demo`: the whole alignment loop on the Shapes world, measured, in one command.

From the shipped base model:
1. **preferences**: sample pairs from the base model and label them with the simulated rater panel
   (`diffalign.prefs.simulate`), into a preference store `OUT/prefs.db`;
2. **reward model**: a Bradley-Terry reward model trained on those pairs (`OUT/reward_model`), with its
   held-out accuracy beside the raters' own agreement;
3. **alignment**, one method per paradigm, each against the same reward model or pairs:
   GRPO (policy-gradient RL), DRaFT-1 (reward backpropagation), Diffusion-DPO (the DPO family, on the
   pairs themselves) and FK steering (test time, no training); each trainer writes a run folder
   `OUT/runs/<method>` and its measured costs (`costs.json`, `diffalign.evaluate.costs`);
4. **evaluation** of every system on the same ShapesEval prompts and seeds (`diffalign.demo.evaluation`);
5. **report**: `OUT/report.json` and the self-contained `OUT/report.html` (`diffalign.demo.report_html`).

Each finished stage leaves a record under `OUT/stages/`, so running the demo again with the same `--out`
and config skips what is done (an interrupted demo continues); a different config is refused.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from diffalign.align.backprop_config import BackpropConfig
from diffalign.align.dpo import DPOConfig, train_dpo
from diffalign.align.pg_config import PGConfig
from diffalign.align.policy_gradient import train_pg
from diffalign.align.reward_backprop import train_backprop
from diffalign.align.runtime import RuntimeConfig
from diffalign.demo.config import DemoConfig
from diffalign.demo.evaluation import EvalJudges, SystemEval, eval_metadata, evaluate_system, system_record
from diffalign.demo.report_html import render_report
from diffalign.devices import resolve_device
from diffalign.diffusion.sampling import SamplerConfig
from diffalign.evaluate.costs import CostMeter
from diffalign.evaluate.features import load_feature_net
from diffalign.jsonl import json_lines
from diffalign.models.registry import load_model
from diffalign.prefs.simulate import simulate_preferences
from diffalign.prefs.store import PreferenceStore
from diffalign.rewards.bt_training import RewardTrainConfig, train_reward_model
from diffalign.rewards.ensemble import load_reward_dir
from diffalign.rewards.rm_metrics import pairwise_accuracy, panel_ceiling, reward_margins
from diffalign.steer import steered_sample_fn
from diffalign.world.raters import RaterPanel

Log = Callable[[str], None]

#: What the report says about how each paradigm scales (the measured costs are beside it).
SCALABILITY = {
    "policy-gradient RL": (
        "Needs only reward values (any black-box reward, a human in the loop, a detector). Pays a full "
        "sampled trajectory per reward query plus a forward and backward pass per step of it; sample "
        "efficiency is the weak point, and it grows with the number of sampling steps."
    ),
    "reward backpropagation": (
        "Needs a differentiable reward. Few reward queries for a large gain per query, but each step "
        "backpropagates through the sampler (K steps for DRaFT-K, all for AlignProp), so memory grows "
        "with the truncation depth; the most prone to reward hacking, watch the gold curve."
    ),
    "DPO family": (
        "Offline: needs preference pairs, not a reward model, and costs about one training forward and "
        "backward per pair image plus a frozen reference forward; it does not sample while training, so it "
        "scales like supervised fine-tuning, but it only learns what the pairs show."
    ),
    "test-time steering": (
        "No training and no change to the model; pays its cost at every image drawn (the inference NFEs "
        "column), so it suits small volumes or as a teacher for later fine-tuning."
    ),
}


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


class _Stages:
    """The demo's stage records: `OUT/stages/<name>.json`, and the config they were made with."""

    def __init__(self, out: Path, config: DemoConfig) -> None:
        self.folder = out / "stages"
        self.folder.mkdir(parents=True, exist_ok=True)
        config_file = self.folder / "config.json"
        wanted = asdict(config)
        if config_file.is_file():
            had = json.loads(config_file.read_text(encoding="utf-8"))
            if had != wanted:
                changed = sorted(k for k in set(had) | set(wanted) if had.get(k) != wanted.get(k))
                raise ValueError(
                    f"{out}: holds a demo made with another config (differs in {', '.join(changed)}); "
                    "use another --out or the same options"
                )
        _write_json(config_file, wanted)

    def done(self, name: str) -> dict | None:
        path = self.folder / f"{name}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def save(self, name: str, record: dict) -> dict:
        _write_json(self.folder / f"{name}.json", record)
        return record


def _network_types(model) -> tuple[type, ...]:
    return (type(model.denoiser),)


def curves_source(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (none when it has no log). A line that is not a JSON object with
    a numeric "step" (what every trainer writes) is a ValueError naming the file and the line."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the training log ({err})") from None
    records = []
    for where, record in json_lines(text.split("\n"), str(path)):
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int | float):
            raise ValueError(f"{where}: expected a metrics record with a numeric 'step'")
        records.append(record)
    return records


def curves(run_dir: Path) -> list[dict]:
    """The training log's reward, gold and KL per logged step."""
    keys = ("reward_mean", "gold_mean", "kl_to_base", "loss", "implicit_acc")
    return [
        {"step": line["step"], **{k: line[k] for k in keys if isinstance(line.get(k), int | float)}}
        for line in curves_source(run_dir)
    ]


class Demo:
    """One demo run (see the module doc); `run()` does every stage and returns the report's path."""

    def __init__(self, config: DemoConfig, out: str | Path, log: Log = print, command: str = "") -> None:
        config.check()
        self.command = command or "diffalign demo --out OUT"
        self.config = config
        self.out = Path(out)
        self.log = log
        self.stages = _Stages(self.out, config)
        self.device = resolve_device(config.device)
        self.base = load_model(config.model, device=self.device)
        self.plain = SamplerConfig(
            sampler="flow_euler" if self.base.prediction_type == "flow" else "ddim",
            num_steps=config.num_steps,
            guidance_scale=config.guidance_scale,
        )
        self.runtime = RuntimeConfig(device=config.device, seed=config.seed)
        self.store_path = self.out / "prefs.db"
        self.rm_dir = self.out / "reward_model"

    def _meter(self) -> CostMeter:
        return CostMeter(_network_types(self.base), self.device)

    # 1. preferences ----------------------------------------------------------------------------------
    def preferences(self) -> dict:
        if (record := self.stages.done("preferences")) is not None:
            return record
        c = self.config
        self.log(
            f"[1/5] preferences: sampling {c.pairs} pairs from {c.model}, labelled by the simulated panel"
        )
        store = PreferenceStore.open(str(self.store_path))
        with self._meter() as meter:
            report = simulate_preferences(
                self.base,
                store,
                c.pairs,
                sampler_config=self.plain,
                seed=c.seed,
                batch_size=c.batch_size,
                model_name=c.model,
            )
        agreement = report.agreement.two_rater if report.agreement is not None else None
        return self.stages.save(
            "preferences",
            {
                "name": "preferences",
                "seconds": meter.cost.wall_s,
                "summary": f"{report.sampled} pairs sampled from {c.model} and labelled by the simulated "
                f"panel ({report.ties} ties); two raters agree on "
                + (f"{agreement:.0%}" if agreement is not None else "n/a")
                + " of them",
                "figures": {"pairs": report.sampled, "ties": report.ties, "agreement": agreement},
                "costs": meter.cost.to_dict(),
            },
        )

    # 2. reward model --------------------------------------------------------------------------------
    def reward_model(self) -> dict:
        if (record := self.stages.done("reward_model")) is not None:
            return record
        c = self.config
        pairs = PreferenceStore.open(str(self.store_path), create=False).pairs(
            size=self.base.latent_shape[-1], include_ties=True
        )
        self.log(f"[2/5] reward model: Bradley-Terry on {len(pairs)} pairs")
        # A fifth held out: early stopping, and the accuracy the report shows beside the raters' agreement.
        config = RewardTrainConfig(
            epochs=c.rm_epochs,
            pretrain_steps=c.rm_pretrain_steps,
            held_out_fraction=0.2,
            seed=c.seed,
            device=str(self.device),
        )
        started = time.perf_counter()
        result = train_reward_model(pairs, config)
        seconds = time.perf_counter() - started
        result.model.save(self.rm_dir)
        figures: dict = {"pairs": len(result.train_pairs), "held_out_pairs": 0}
        summary = f"trained on {len(result.train_pairs)} pairs"
        if result.held_out is not None and len(result.held_out) > 0:
            ra, rb = reward_margins(result.model, result.held_out)
            acc = pairwise_accuracy(ra - rb, result.held_out.prob_a)
            ceiling = panel_ceiling(RaterPanel(), result.held_out)["two_rater"]
            figures |= {
                "held_out_pairs": len(result.held_out),
                "held_out_accuracy": acc["accuracy"],
                "held_out_ci95": list(acc["ci95"]),
                "ceiling": ceiling,
            }
            summary += (
                f"; held-out accuracy {acc['accuracy']:.3f} on {len(result.held_out)} pairs, beside the "
                f"raters' two-rater agreement {ceiling:.3f}"
            )
        return self.stages.save(
            "reward_model",
            {"name": "reward model", "seconds": seconds, "summary": summary, "figures": figures},
        )

    # 3. alignment -----------------------------------------------------------------------------------
    def _train(self, name: str, train: Callable[[CostMeter], None], feedback: Callable[[dict], str]) -> dict:
        if (record := self.stages.done(name)) is not None:
            return record
        run_dir = self.out / "runs" / name
        with self._meter() as meter:
            train(meter)
        cost = meter.cost.to_dict()
        logged = curves_source(run_dir)
        if logged and isinstance(logged[-1].get("reward_queries"), int | float):
            # The trainer's own count: the queries its algorithm made, without the reward evaluations
            # its logging adds (the meter counts both).
            cost["reward_queries"] = int(logged[-1]["reward_queries"])
        _write_json(run_dir / "costs.json", cost)
        return self.stages.save(
            name,
            {"run_dir": str(run_dir.relative_to(self.out)), "costs": cost, "feedback": feedback(cost)},
        )

    def _reward(self, meter: CostMeter):
        return meter.count_reward(load_reward_dir(self.rm_dir, self.device))

    def grpo(self) -> dict:
        c = self.config
        self.log(f"[3/5] GRPO: {c.grpo_epochs} epochs x {c.grpo_prompts} prompts x {c.grpo_group} samples")
        per_epoch = c.grpo_prompts * c.grpo_group
        config = PGConfig(
            method="grpo",
            model=c.model,
            reward=str(self.rm_dir),
            num_steps=c.num_steps,
            guidance_scale=c.guidance_scale,
            epochs=c.grpo_epochs,
            prompts_per_epoch=c.grpo_prompts,
            samples_per_prompt=c.grpo_group,
            sample_batch_size=min(per_epoch, c.batch_size),
            train_batch_size=min(per_epoch, 16),
            lr=c.grpo_lr,
            checkpoint_every=max(1, c.grpo_epochs),
            grid_every=0,
            log_with="none",
            runtime=self.runtime,
        )
        return self._train(
            "grpo",
            lambda meter: train_pg(
                config, self.out / "runs" / "grpo", reward=self._reward(meter), show_progress=True
            ),
            lambda cost: f"reward model, {cost['reward_queries']} queries",
        )

    def draft(self) -> dict:
        c = self.config
        self.log(f"[3/5] DRaFT-1: {c.draft_steps} steps x {c.draft_batch} images")
        config = BackpropConfig(
            method="draft",
            model=c.model,
            reward=str(self.rm_dir),
            num_steps=c.num_steps,
            guidance_scale=c.guidance_scale,
            steps=c.draft_steps,
            batch_size=c.draft_batch,
            draft_k=1,
            lr=c.draft_lr,
            checkpoint_every=c.draft_steps,
            log_every=max(1, c.draft_steps // 5),
            log_with="none",
            runtime=self.runtime,
        )
        return self._train(
            "draft",
            lambda meter: train_backprop(
                config, self.out / "runs" / "draft", reward=self._reward(meter), show_progress=True
            ),
            lambda cost: f"reward-model gradients, {cost['reward_queries']} queries",
        )

    def dpo(self) -> dict:
        c = self.config
        pairs = PreferenceStore.open(str(self.store_path), create=False).pairs(
            size=self.base.latent_shape[-1], include_ties=True
        )
        self.log(f"[3/5] Diffusion-DPO: {c.dpo_steps} steps x {c.dpo_batch} of {len(pairs)} pairs")
        config = DPOConfig(
            method="dpo",
            model=c.model,
            steps=c.dpo_steps,
            batch_size=c.dpo_batch,
            lr=c.dpo_lr,
            log_every=max(1, c.dpo_steps // 10),
            checkpoint_every=c.dpo_steps,
            log_with="none",
            runtime=self.runtime,
        )
        used = c.dpo_steps * c.dpo_batch
        distinct = int(sum(~pairs.is_tie))
        return self._train(
            "dpo",
            lambda meter: train_dpo(
                config,
                pairs,
                self.out / "runs" / "dpo",
                data_spec={"store": str(self.store_path)},
                show_progress=True,
            ),
            lambda cost: f"{distinct} preference pairs ({used} pair draws), no reward model",
        )

    # 4. evaluation ----------------------------------------------------------------------------------
    def _steering_sampler(self) -> SamplerConfig:
        """FK needs a stochastic sampler: DDIM with eta 1 (epsilon models) or the flow SDE."""
        name = "flow_sde" if self.base.prediction_type == "flow" else self.plain.sampler
        return SamplerConfig(
            sampler=name, num_steps=self.config.num_steps, guidance_scale=self.config.guidance_scale, eta=1.0
        )

    def evaluate(self, trained: dict[str, dict]) -> list[dict]:
        c = self.config
        metadata = eval_metadata(c.eval_prompts_per_task, c.seed)
        n_images = len(metadata) * c.eval_samples_per_prompt
        judges = EvalJudges(
            panel=RaterPanel(),
            proxy=load_reward_dir(self.rm_dir, self.device),
            features=load_feature_net(),
        )
        plain_nfe = c.num_steps * (2 if c.guidance_scale != 1.0 else 1)
        systems: list[dict] = []
        base_eval: SystemEval | None = None

        def run(name: str, model, sampler, sample_fn=None) -> SystemEval:
            self.log(f"[4/5] evaluating {name} on {len(metadata)} prompts x {c.eval_samples_per_prompt}")
            return evaluate_system(
                name,
                model,
                sampler,
                metadata,
                c.eval_samples_per_prompt,
                self.out,
                judges,
                base=base_eval,
                sample_fn=sample_fn,
                batch_size=c.batch_size,
                seed=c.seed,
            )

        base_eval = run("base", self.base, self.plain)
        systems.append(system_record("base", "none", "base", base_eval))
        for name, method, paradigm, curve_x in (
            ("grpo", "grpo", "policy-gradient RL", "epoch"),
            ("draft", "draft", "reward backpropagation", "step"),
            ("dpo", "dpo", "DPO family", "step"),
        ):
            record = trained[name]
            run_dir = self.out / record["run_dir"]
            model = load_model(str(run_dir), device=self.device)
            result = run(name, model, self.plain)
            costs = dict(record["costs"], preference_pairs=0, inference_nfe_per_image=plain_nfe)
            if method == "dpo":
                costs["preference_pairs"] = self.config.dpo_steps * self.config.dpo_batch
            systems.append(
                system_record(
                    name,
                    method,
                    paradigm,
                    result,
                    run_dir=record["run_dir"],
                    feedback=record["feedback"],
                    costs=costs,
                    curves=curves(run_dir),
                    curve_x=curve_x,
                )
            )
        # Test time: FK steering of the base model, its cost measured over the evaluation set.
        steer_sampler = self._steering_sampler()
        rm = load_reward_dir(self.rm_dir, self.device)
        with self._meter() as meter:
            sample_fn = steered_sample_fn(
                "fk", meter.count_reward(rm), c.fk_particles * plain_nfe, lam=c.fk_lambda
            )
            result = run("fk", self.base, steer_sampler, sample_fn)
        costs = dict(meter.cost.to_dict(), preference_pairs=0)
        costs["wall_s"] = result.summary["seconds"]
        costs["inference_nfe_per_image"] = meter.cost.forward_nfe / n_images
        feedback = f"reward model, {meter.cost.reward_queries} queries over the evaluation set"
        systems.append(
            system_record(
                f"fk-{c.fk_particles}", "fk", "test-time steering", result, feedback=feedback, costs=costs
            )
        )
        return systems

    # 5. report --------------------------------------------------------------------------------------
    def run(self) -> Path:
        started = time.perf_counter()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        setup = [self.preferences(), self.reward_model()]
        trained = {"grpo": self.grpo(), "draft": self.draft(), "dpo": self.dpo()}
        evaluated = self.stages.done("evaluation")
        if evaluated is None:
            evaluated = self.stages.save("evaluation", {"systems": self.evaluate(trained)})
        systems = evaluated["systems"]
        self.log("[5/5] writing the report")
        data = report_data(self.config, setup, systems, time.perf_counter() - started, [self.command])
        _write_json(self.out / "report.json", data)
        return render_report(data, self.out)


def overopt_points(systems: list[dict]) -> dict | None:
    """Proxy and gold reward against sqrt(KL to base) from the training logs that record all three."""
    points = []
    for system in systems:
        for line in system["curves"]:
            if all(k in line for k in ("reward_mean", "gold_mean", "kl_to_base")):
                points.append(
                    {
                        "system": system["name"],
                        "step": line["step"],
                        "sqrt_kl": math.sqrt(max(0.0, line["kl_to_base"])),
                        "proxy": line["reward_mean"],
                        "gold": line["gold_mean"],
                    }
                )
    if not points:
        return None
    return {
        "points": points,
        "note": "From the training logs: the training (proxy) reward and the gold faithfulness of the "
        "samples drawn while training, against the square root of the estimated KL to the base model. "
        "Gold falling while the proxy rises is over-optimisation; `diffalign overopt RUN_DIR` measures it "
        "from checkpoints with held-out prompts.",
    }


def assemble_report(
    title: str,
    setup: list[dict],
    systems: list[dict],
    seconds: float,
    eval_settings: dict,
    commands: list[str],
    device: str,
) -> dict:
    """The report's JSON (schema 1; see `diffalign.demo.report_html`)."""
    threads = torch.get_num_threads()
    paradigms = {system["paradigm"] for system in systems}
    return {
        "schema": 1,
        "title": title,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": f"{platform.machine()}, {threads} threads, torch {torch.__version__}, {device}",
        "quick": any("--quick" in command for command in commands),
        "total_seconds": seconds,
        "commands": commands,
        "eval": {
            "judge": "the gold rater panel (win rate) and the Shapes-world detector (ShapesEval)",
            "seeds": "the same prompts and seeds for every system",
            **eval_settings,
        },
        "setup": setup,
        "systems": systems,
        "overopt": overopt_points(systems),
        "notes": {name: note for name, note in SCALABILITY.items() if name in paradigms},
    }


def report_data(
    config: DemoConfig, setup: list[dict], systems: list[dict], seconds: float, commands: list[str]
) -> dict:
    """The demo's report JSON."""
    c = config
    return assemble_report(
        "diffalign demo: the alignment paradigms on the Shapes world",
        setup,
        systems,
        seconds,
        {
            "prompts": 6 * c.eval_prompts_per_task,
            "samples_per_prompt": c.eval_samples_per_prompt,
            "steps": c.num_steps,
            "guidance": c.guidance_scale,
            "sampler": "the model family's default (DDIM eta 0 or flow Euler); FK: stochastic (eta 1)",
        },
        commands,
        str(resolve_device(c.device)),
    )


def run_demo(config: DemoConfig, out: str | Path, log: Log = print, command: str = "") -> Path:
    """Run the demo into `out`; returns the path of `out/report.html`. `command` is how it was started
    (shown in the report's reproduce section)."""
    return Demo(config, out, log, command).run()
