"""Reward over-optimisation analysis (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
Overoptimization").

Optimising a proxy reward moves the policy away from the base model; Gao et al. measure the distance as
d = sqrt(KL(pi || pi_base)) and find the gold reward (relative to the base model's) follows
- RL:         R(d) = d (a - b log d)   (their eq. 2, R_RL),
- best-of-n:  R(d) = d (a - b d)       (their eq. 1, R_bon), with KL_bon = log n - (n - 1) / n,
while the proxy keeps rising. The gold curve peaks where dR/dd = 0: d* = exp(a / b - 1) with
R* = b d* (RL), d* = a / (2 b) with R* = a^2 / (4 b) (best-of-n); past d* more optimisation lowers
the true reward, so the checkpoint nearest d* is where to stop.

Here:
- `fit_gao` fits a form by least squares (`scipy.optimize.curve_fit`) with standard errors;
- `analyse` takes (step, KL, proxy, gold[, penalised]) points, centres each reward on the base model's
  (the point at step 0, where d = 0, required: Gao's forms have R(0) = 0), fits gold and proxy, and
  reports the gold peak (observed and fitted) and the step to stop at; with the uncertainty-penalised
  ensemble reward (mean - k std, `diffalign.rewards.ensemble`) it also reports the step that reward
  would have stopped at and the gold reward there (the mitigation: stopping when the penalised reward
  peaks instead of the proxy). The penalised reward is evaluated on the run's checkpoints; the run is
  not retrained with it.
- `checkpoint_points` builds the points from a run folder's checkpoints: it loads the run's base model,
  applies each checkpoint's trainable weights, samples the same prompts and seeds, scores the samples
  with the rewards and estimates KL to the base model from trajectories (`diffalign.evaluate.kl`).
- `measurement_record` describes what a base point depends on (the reference model, prompts, seeds,
  sampler and rewards, each model or reward folder by a fingerprint of its files), and
  `reused_base_point` takes the base point of an earlier report only when that record matches, so
  several runs of one base model are judged without sampling the base again.
- `plot_overopt` draws the curves and fits (matplotlib, no display needed).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from diffalign.align.run_checkpoints import list_checkpoints, load_checkpoint_model, run_base

FORMS: tuple[str, ...] = ("rl", "bon")


def gao_rl(d: np.ndarray, a: float, b: float) -> np.ndarray:
    """R_RL(d) = d (a - b log d) (Gao et al. 2022, eq. 2), 0 at d = 0."""
    d = np.asarray(d, dtype=np.float64)
    safe = np.where(d > 0, d, 1.0)
    return np.where(d > 0, d * (a - b * np.log(safe)), 0.0)


def gao_bon(d: np.ndarray, a: float, b: float) -> np.ndarray:
    """R_bon(d) = d (a - b d) (Gao et al. 2022, eq. 1)."""
    d = np.asarray(d, dtype=np.float64)
    return d * (a - b * d)


def bon_kl(n: int) -> float:
    """The KL of best-of-n sampling to the base distribution: log n - (n - 1) / n."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


FORM_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {"rl": gao_rl, "bon": gao_bon}


@dataclass
class GaoFit:
    """A fitted Gao et al. curve.

    Attributes:
        form: "rl" or "bon".
        a, b: the fitted coefficients.
        a_stderr, b_stderr: their standard errors (sqrt of the covariance diagonal; NaN when the fit
            has no residual degrees of freedom).
        peak_d: d* where the curve peaks (None when b <= 0, or for the RL form when d* > e^50: no
            peak, the curve keeps rising).
        peak_reward: R(d*) (None without a peak).
        rmse: root-mean-square residual of the fit.
    """

    form: str
    a: float
    b: float
    a_stderr: float
    b_stderr: float
    peak_d: float | None
    peak_reward: float | None
    rmse: float

    def __call__(self, d: np.ndarray) -> np.ndarray:
        return FORM_FUNCTIONS[self.form](d, self.a, self.b)


def fit_gao(
    d: Sequence[float] | np.ndarray, reward: Sequence[float] | np.ndarray, form: str = "rl"
) -> GaoFit:
    """Least-squares fit of R(d) (rewards relative to the base model's) with scipy's curve_fit."""
    from scipy.optimize import curve_fit

    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    x = np.asarray(d, dtype=np.float64).reshape(-1)
    y = np.asarray(reward, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"fit_gao: {x.size} distances but {y.size} rewards")
    if (x < 0).any() or not np.isfinite(x).all() or not np.isfinite(y).all():
        raise ValueError("fit_gao: distances must be finite and >= 0, rewards finite")
    if int((x > 0).sum()) < 2:
        raise ValueError("fit_gao needs at least two points with d > 0")
    func = FORM_FUNCTIONS[form]
    # Initial guess: a from the first slope, b small and positive.
    first = x > 0
    a0 = float(np.median(y[first] / x[first]))
    params, cov = curve_fit(func, x, y, p0=(a0, 0.1 * abs(a0) + 1e-3), maxfev=20000)
    a, b = (float(v) for v in params)
    with np.errstate(invalid="ignore"):
        stderr = np.sqrt(np.diag(cov)) if np.isfinite(cov).all() else np.full(2, np.nan)
    peak_d = peak_reward = None
    if b > 0:
        if form == "rl":
            # log d* = a / b - 1; a peak past d = e^50 (b ~ 0: a straight line) is no peak at all.
            if a / b - 1 < 50:
                peak_d = math.exp(a / b - 1)
                peak_reward = b * peak_d
        else:
            peak_d = a / (2 * b)
            peak_reward = a * a / (4 * b)
    rmse = float(np.sqrt(np.mean((func(x, a, b) - y) ** 2)))
    return GaoFit(form, a, b, float(stderr[0]), float(stderr[1]), peak_d, peak_reward, rmse)


@dataclass
class OveroptPoint:
    """One checkpoint's measurements.

    Attributes:
        step: optimiser steps (0: the base model).
        kl: estimated KL to the base model (nats).
        kl_stderr: its standard error.
        proxy: mean proxy (training) reward of the checkpoint's samples.
        gold: mean gold reward of the same samples.
        penalised: mean uncertainty-penalised ensemble reward, or None.
        extra: mean of every other reward measured on the same samples (e.g. the gold accuracy next
            to the gold utility), by name.
        values: per-sample rewards by name ("proxy", "gold", "penalised" and the extra ones), in the
            order of the prompts and seeds every point shares; `analyse` compares them sample by
            sample with the base model's. Empty when only the means are known.
    """

    step: int
    kl: float
    kl_stderr: float
    proxy: float
    gold: float
    penalised: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)

    @property
    def d(self) -> float:
        """sqrt(KL), clipped at 0 (a Monte Carlo KL estimate can be slightly negative)."""
        return math.sqrt(max(self.kl, 0.0))


def paired_changes(point: OveroptPoint, base: OveroptPoint) -> dict[str, dict]:
    """Each reward of `point` against the base model's on the same prompts and seeds: the mean of the
    per-sample differences, its standard error and a 95% percentile-bootstrap interval
    (`diffalign.evaluate.stats.bootstrap_mean_ci`). Pairing removes the prompts' and seeds' own
    spread, so a change is read against the noise of the change, not of the level. Rewards without
    per-sample values on both points are left out."""
    from diffalign.evaluate.stats import bootstrap_mean_ci

    out = {}
    for name, values in point.values.items():
        own = np.asarray(values, dtype=np.float64)
        reference = np.asarray(base.values.get(name, []), dtype=np.float64)
        if reference.shape != own.shape or own.size < 2:
            continue
        delta = own - reference
        low, high = bootstrap_mean_ci(delta)
        out[name] = {
            "mean": float(delta.mean()),
            "stderr": float(delta.std(ddof=1) / math.sqrt(delta.size)),
            "ci95": [low, high],
        }
    return out


def analyse(points: Sequence[OveroptPoint], form: str = "rl") -> dict:
    """Fits and stopping points from measured checkpoints (see the module doc).

    Returns a JSON-ready dict: "points", "form", "fits" ({"gold", "proxy"[, "penalised"]} as
    `GaoFit` dicts, on rewards relative to step 0; empty, with a "fit_note", when there is only one
    checkpoint besides the base or fewer than two with a positive KL estimate), "gold_peak" (the
    observed best checkpoint: step, d, gold), "fitted_peak" (d*, R* + base gold, and the first
    checkpoint at or past d*, or None when the run stops short of it), "stop_step" (the observed best
    gold step) and, with penalised rewards, "penalised_stop" (the step where the penalised reward
    peaks and the gold reward there). Every point carries "vs_base" (`paired_changes`: each reward's
    change from the base model, sample by sample, with its interval), and the gold peak its gold change.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    pts = sorted(points, key=lambda p: p.step)
    if not pts or pts[0].step != 0:
        raise ValueError("analyse needs the base model's point at step 0 (rewards are relative to it)")
    steps = [p.step for p in pts]
    d = np.array([p.d for p in pts])
    gold = np.array([p.gold for p in pts])
    proxy = np.array([p.proxy for p in pts])
    # Gao et al.'s forms have two parameters: with one checkpoint only the paired changes are reported.
    # A checkpoint whose KL estimate is <= 0 sits at d = 0, where every form is 0: it cannot count.
    moved = int((d > 0).sum())
    can_fit = len(pts) >= 3 and moved >= 2
    fits = {}
    if can_fit:
        fits = {"gold": fit_gao(d, gold - gold[0], form), "proxy": fit_gao(d, proxy - proxy[0], form)}
    best = int(np.argmax(gold))
    changes = [paired_changes(p, pts[0]) for p in pts]
    out: dict = {
        "form": form,
        "points": [{**asdict(p), "d": p.d, "vs_base": change} for p, change in zip(pts, changes)],
        "gold_peak": {
            "step": steps[best],
            "d": float(d[best]),
            "gold": float(gold[best]),
            "vs_base": changes[best].get("gold"),
        },
        "stop_step": steps[best],
    }
    if len(pts) < 3:
        out["fit_note"] = "no fit: Gao et al.'s curves need two checkpoints besides the base"
    elif not can_fit:
        out["fit_note"] = (
            f"no fit: Gao et al.'s curves need two checkpoints with a positive KL to the base, "
            f"{moved} of {len(pts) - 1} have one"
        )
    fitted = fits.get("gold")
    peak: dict | None = None
    if fitted is not None and fitted.peak_d is not None:
        past = [s for s, di in zip(steps, d) if di >= fitted.peak_d]
        peak = {
            "d": fitted.peak_d,
            "gold": float(gold[0] + fitted.peak_reward),
            "first_step_past_peak": past[0] if past else None,
        }
    out["fitted_peak"] = peak
    if all(p.penalised is not None for p in pts):
        penalised = np.array([p.penalised for p in pts], dtype=np.float64)
        if can_fit:
            fits["penalised"] = fit_gao(d, penalised - penalised[0], form)
        stop = int(np.argmax(penalised))
        out["penalised_stop"] = {"step": steps[stop], "gold": float(gold[stop]), "d": float(d[stop])}
        proxy_stop = int(np.argmax(proxy))
        out["proxy_stop"] = {
            "step": steps[proxy_stop],
            "gold": float(gold[proxy_stop]),
            "d": float(d[proxy_stop]),
        }
    out["fits"] = {name: asdict(fit) for name, fit in fits.items()}
    return out


def plot_overopt(report: dict, path: str | Path) -> Path:
    """Gold, proxy (and penalised) reward against d = sqrt(KL), with the fitted curves; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = report["points"]
    d = np.array([p["d"] for p in pts])
    grid = np.linspace(0, max(float(d.max()), 1e-6) * 1.1, 200)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series = [("gold", "tab:orange"), ("proxy", "tab:blue"), ("penalised", "tab:green")]
    for name, colour in series:
        if any(p.get(name) is None for p in pts):
            continue
        values = np.array([p[name] for p in pts], dtype=np.float64)
        ax.plot(d, values - values[0], "o", color=colour, label=f"{name} (measured)")
        if name in report["fits"]:
            fit = GaoFit(**report["fits"][name])
            label = f"{name} fit a={fit.a:.3g} b={fit.b:.3g}"
            ax.plot(grid, fit(grid), "-", color=colour, alpha=0.7, label=label)
    peak = report.get("fitted_peak")
    if peak is not None:
        ax.axvline(peak["d"], color="tab:orange", linestyle=":", label=f"gold peak d*={peak['d']:.3g}")
    ax.set_xlabel("d = sqrt(KL to base) (nats^0.5)")
    ax.set_ylabel("reward - base model's reward")
    ax.set_title(f"Over-optimisation ({report['form']} form, Gao et al. 2022)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write overopt.json and overopt.png under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "overopt.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return json_path, plot_overopt(report, out / "overopt.png")


# --- reusing the base model's point --------------------------------------------------------------------

#: Files up to this size are fingerprinted by content, larger ones (diffusers weights) by size and mtime.
_HASHED_BYTES = 64 * 2**20


def _file_fingerprint(path: Path, digest) -> None:
    stat = path.stat()
    if stat.st_size <= _HASHED_BYTES:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    else:
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())


def spec_fingerprint(spec: str) -> str | None:
    """A fingerprint of the files a model or reward spec names, or None when it names none.

    Every ':'-separated part of `spec` that is an existing file or folder counts ("penalised:DIR",
    "rewards.py:fn", a model folder), and what follows an '@' ("shapes:utility@panel.yaml"); a folder
    by its files' relative paths and contents (size and modification time for files over 64 MiB).
    Built-in names ("base", "gold-utility") name no file.
    """
    parts = [spec, *str(spec).split(":"), *str(spec).split("@")[1:]]  # "@": a gold reward's panel file
    paths = [Path(part) for part in parts if part and Path(part).exists()]
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in dict.fromkeys(p.resolve() for p in paths):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            _file_fingerprint(file, digest)
    return digest.hexdigest()


def measurement_record(
    reference: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config,
    rewards: dict[str, str],
    device: str = "cpu",
) -> dict:
    """What the base model's point depends on, JSON-ready: the reference model spec and fingerprint,
    the prompts, the seeds, the sampler config, every reward's spec and fingerprint (`rewards`:
    {name in the report: spec}) and the device type (a seed draws other noise on CPU and CUDA)."""
    return {
        "reference": {"spec": str(reference), "fingerprint": spec_fingerprint(str(reference))},
        "device": str(device).split(":")[0],
        "prompts": list(prompts),
        "seeds": [int(s) for s in seeds],
        "sampler": json.loads(json.dumps(asdict(config))),
        "rewards": {
            name: {"spec": str(spec), "fingerprint": spec_fingerprint(str(spec))}
            for name, spec in sorted(rewards.items())
        },
    }


def _first_difference(recorded: dict, measurement: dict) -> str | None:
    """What differs between two `measurement_record`s, in words, or None."""
    for key in ("reference", "device", "prompts", "seeds", "sampler"):
        if recorded.get(key) != measurement[key]:
            return "the reference model or its files" if key == "reference" else f"the {key}"
    there, here = recorded.get("rewards") or {}, measurement["rewards"]
    if set(there) != set(here):
        return f"the rewards ({sorted(there)} there, {sorted(here)} here)"
    for name in here:
        if there[name] != here[name]:
            return f"reward {name!r} ({here[name]['spec']}: its spec or files)"
    return None


def reused_base_point(report: dict, measurement: dict, source: str = "the report") -> OveroptPoint:
    """The base model's point (step 0) of an earlier `analyse` report written with `measurement`.

    Raises ValueError naming the first thing that differs (the reference model or its files, the
    device type, the prompts, the seeds, the sampler, a reward or its files), or when the report
    records no measurement (written before it was recorded) or no per-sample values at step 0.
    """
    recorded = report.get("measurement") if isinstance(report, dict) else None
    if not isinstance(recorded, dict):
        raise ValueError(f"{source} records no measurement settings (written by an older version)")
    differs = _first_difference(recorded, measurement)
    if differs is not None:
        raise ValueError(
            f"{source}: its base point was measured with other settings (they differ in {differs})"
        )
    first = next((p for p in report.get("points", []) if p.get("step") == 0), None)
    if first is None or not first.get("values"):
        raise ValueError(f"{source} has no base point with per-sample rewards")
    fields = ("step", "kl", "kl_stderr", "proxy", "gold", "penalised", "extra", "values")
    return OveroptPoint(**{name: first.get(name) for name in fields if name in first})


# --- measuring a run's checkpoints ---------------------------------------------------------------------


def measure_point(
    model, base, step: int, prompts, seeds, config, rewards: dict, batch_size: int = 64
) -> OveroptPoint:
    """Sample the prompts once; score the images with `rewards` ({"proxy", "gold"[, "penalised"]}, and
    any other name, kept in `extra`) and estimate KL to `base` from the same trajectories."""
    import torch

    from diffalign.diffusion.sampling import sample
    from diffalign.evaluate.kl import kl_from_log_probs, trajectory_log_ratios

    prompts = list(prompts)
    values: dict[str, list[float]] = {name: [] for name in rewards}
    ratios = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            traj = sample(model, chunk, config=config, seeds=list(seeds[i : i + batch_size]))
            if model is base:  # the base model's KL to itself is 0: skip the recomputation
                ratios.append(torch.zeros(len(chunk), traj.num_steps, dtype=torch.float64))
            else:
                ratios.append(trajectory_log_ratios(model, base, traj))
            for name, reward in rewards.items():
                values[name] += reward(traj.images, chunk).double().reshape(-1).tolist()
    ratio = torch.cat(ratios)
    kl = kl_from_log_probs(ratio, torch.zeros_like(ratio), dims=int(np.prod(model.latent_shape)))
    means = {name: float(np.mean(scores)) for name, scores in values.items()}
    extra = {name: mean for name, mean in means.items() if name not in ("proxy", "gold", "penalised")}
    return OveroptPoint(
        step, kl.kl, kl.stderr, means["proxy"], means["gold"], means.get("penalised"), extra, values
    )


def checkpoint_points(
    run_dir: str | Path,
    rewards: dict,
    prompts: Sequence[str],
    config,
    seeds: Sequence[int] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    max_checkpoints: int | None = None,
    on_point: Callable[[OveroptPoint], None] | None = None,
    base_point: OveroptPoint | None = None,
    only_steps: Sequence[int] | None = None,
    base=None,
) -> list[OveroptPoint]:
    """The base model (step 0) and every checkpoint of `run_dir`, measured by `measure_point`.

    Args:
        run_dir: a trainer's run folder (config.json + checkpoints/).
        rewards: {"proxy": Reward, "gold": Reward[, "penalised": Reward]}, and any other name: a
            reward recorded on the same samples (`OveroptPoint.extra`), not fitted.
        prompts: one sample per entry, the same for every checkpoint.
        config: a stochastic `SamplerConfig` (KL needs step densities).
        seeds: per-sample seeds (default 0..n-1), shared by all checkpoints.
        batch_size: samples per batch.
        device: where models run.
        max_checkpoints: keep this many checkpoints, evenly spaced (None: all).
        only_steps: measure the checkpoints of these steps only (ValueError naming any the run does
            not keep); applied before `max_checkpoints`.
        on_point: called after each measured point (progress).
        base_point: the base model's point measured before with the same reference, prompts, seeds,
            sampler and rewards (`reused_base_point` checks that); None measures it.
        base: the run's reference model already loaded on `device` (None loads it), so a caller that
            loaded it does not load a pipeline twice.
    """
    from diffalign.models.registry import load_model

    if not config.stochastic:
        raise ValueError(f"overopt needs a stochastic sampler for KL, got {config.sampler!r}")
    missing = {"proxy", "gold"} - set(rewards)
    if missing:
        raise ValueError(f"overopt: rewards lack {sorted(missing)}")
    info = run_base(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{Path(run_dir) / 'checkpoints'}: no checkpoints to analyse")
    if only_steps is not None:
        wanted, kept = set(only_steps), {step for step, _ in checkpoints}
        if wanted - kept:
            raise ValueError(
                f"{run_dir}: no checkpoint at step(s) {sorted(wanted - kept)}; it keeps steps {sorted(kept)}"
            )
        checkpoints = [(step, path) for step, path in checkpoints if step in wanted]
    if max_checkpoints is not None and len(checkpoints) > max_checkpoints:
        keep = np.unique(np.linspace(0, len(checkpoints) - 1, max_checkpoints).round().astype(int))
        checkpoints = [checkpoints[i] for i in keep]
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if base is None:
        base = load_model(info["reference"], device=device)
    if base_point is not None:
        if base_point.step != 0 or set(base_point.values) != set(rewards):
            raise ValueError("base_point must be a step-0 point with per-sample values of the same rewards")
        if any(len(v) != len(prompts) for v in base_point.values.values()):
            raise ValueError(f"base_point has per-sample values for other than {len(prompts)} prompts")
    points = [base_point or measure_point(base, base, 0, prompts, seeds, config, rewards, batch_size)]
    if on_point is not None:
        on_point(points[-1])
    for step, path in checkpoints:
        model = load_checkpoint_model(
            info["model"], path, info["lora_rank"], info["lora_alpha"], device, info["pipeline"]
        )
        points.append(measure_point(model, base, step, prompts, seeds, config, rewards, batch_size))
        if on_point is not None:
            on_point(points[-1])
    return points
