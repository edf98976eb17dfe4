"""The paradigm report: `report.json` (schema 1, as `diffalign demo` writes it) -> one self-contained page.

`render_report(data, folder)` checks the data, then writes `folder/report.html` with these sections
(each a `<section id=...>` with an `<h2>`):

- `summary`: what ran, how long it took and where; one sentence per aligned system with its ShapesEval
  gain over the base model in points and its gold win rate, both computed from the data;
- `paradigms`: the paradigm table, one row per system: what aligning cost (wall time, NFEs, memory,
  feedback used), what it gained (ShapesEval, win rate, proxy and gold reward) and the diversity change;
- `categories`: ShapesEval accuracy per category and system;
- `grids`: per category, one figure of samples per system (the same seeds for every system);
- `curves`: the training curves (reward_mean, gold_mean, kl_to_base against step or epoch);
- `overopt`: proxy and gold reward against sqrt(KL to base) (Gao et al. 2022);
- `setup`: the shared stages (preferences, reward model) with their time, and the reward model's
  held-out accuracy beside the raters' ceiling;
- `notes`: the scalability note of each paradigm;
- `reproduce`: the commands that rebuild the report.

Every image is embedded as a PNG data URI (the page is one file); every text from the data is escaped.
The first system is the reference ("base") that deltas are computed against; any number may be null
and is shown as "n/a". Bad data (a wrong schema, a missing key, a grid file that does not exist, a
value that is not a number) raises ValueError naming what is wrong before anything is written.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from diffalign.demo.plots import Panel, Series, line_panels
from diffalign.evaluate.report import html_page, html_table, png_data_uri

SCHEMA = 1
REPORT_FILE = "report.html"
NA = "n/a"

SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("paradigms", "The paradigms: what each cost and gained"),
    ("categories", "ShapesEval accuracy per category"),
    ("grids", "Samples per category"),
    ("curves", "Training curves"),
    ("overopt", "Over-optimisation"),
    ("setup", "Shared setup"),
    ("notes", "Scalability notes"),
    ("reproduce", "Reproduce"),
)

TOP_KEYS = ("schema", "title", "created", "machine", "quick", "total_seconds", "commands", "eval", "setup",
            "systems", "overopt", "notes")  # fmt: skip
EVAL_SETTINGS_KEYS = ("prompts", "samples_per_prompt", "steps", "guidance", "sampler", "judge", "seeds")
SYSTEM_KEYS = ("name", "method", "paradigm", "feedback", "costs", "eval", "grids", "curves")
COST_KEYS = ("wall_s", "forward_nfe", "backward_nfe", "peak_memory_mb", "memory_kind", "reward_queries",
             "preference_pairs", "inference_nfe_per_image")  # fmt: skip
SYSTEM_EVAL_KEYS = ("overall", "overall_ci95", "categories", "win_rate", "proxy_reward", "gold_reward",
                    "diversity", "seconds")  # fmt: skip
WIN_RATE_KEYS = ("rate", "ci95", "wins", "ties", "losses")
MEAN_KEYS = ("mean", "ci95")
CATEGORY_KEYS = ("accuracy", "ci95", "images")
STAGE_KEYS = ("name", "seconds", "summary", "figures")
OVEROPT_KEYS = ("points", "note")
POINT_KEYS = ("system", "sqrt_kl", "proxy", "gold")
CURVE_METRICS: tuple[tuple[str, str, str], ...] = (  # (key in a curve point, panel title, y label)
    ("reward_mean", "training reward (reward_mean)", "reward"),
    ("gold_mean", "gold reward (gold_mean)", "gold reward"),
    ("kl_to_base", "KL to the base model (kl_to_base)", "KL (nats)"),
)

PARADIGM_HEADER = (
    "system", "paradigm", "method", "feedback", "wall time", "forward NFEs", "backward NFEs", "peak memory",
    "reward queries", "preference pairs", "inference NFEs/image", "ShapesEval overall [95% CI]",
    "Δ vs base (points)", "gold win rate vs base [95% CI]", "proxy reward [95% CI]", "gold reward [95% CI]",
    "diversity", "Δ diversity vs base",
)  # fmt: skip

EXTRA_STYLE = """
body { max-width: 1600px; padding: 0 1em; }
section { margin-top: 2.5em; }
td { vertical-align: top; }
th { vertical-align: bottom; }
.wide { overflow-x: auto; }
.wide table { font-size: 0.82em; }
.wide th, .wide td { padding: 3px 6px; }
.wide td { white-space: pre; }
.left td:nth-child(-n+4), .left th:nth-child(-n+4) { text-align: left; white-space: pre-line; }
.prose td:nth-child(n+3), .prose th:nth-child(n+3) { text-align: left; }
figure img { max-width: 100%; }
figure.plot figcaption { max-width: none; }
pre { background: #f4f4f4; padding: 0.8em; overflow-x: auto; }
dt { font-weight: 600; margin-top: 0.6em; }
.missing { color: #a33; }
"""


# --- checking the data ----------------------------------------------------------------------------------


def _require(obj: object, keys: Sequence[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"report.json: {where} must be a JSON object, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise ValueError(f"report.json: {where} is missing the key {key!r}")
    return obj


def _system_where(system: dict, index: int) -> str:
    return f"system {system['name']!r} (systems[{index}])"


def validate(data: dict) -> None:
    """Raise ValueError naming the first problem: the schema version, a missing key, a system's shape."""
    if not isinstance(data, dict):
        raise ValueError(f"report.json must hold a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise ValueError(
            f"report.json: schema {data.get('schema')!r} is not supported (this renderer reads {SCHEMA})"
        )
    _require(data, TOP_KEYS, "the top level")
    _require(data["eval"], EVAL_SETTINGS_KEYS, "eval")
    for key, kind in (("commands", list), ("setup", list), ("systems", list), ("notes", dict)):
        if not isinstance(data[key], kind):
            raise ValueError(f"report.json: {key} must be a JSON {'array' if kind is list else 'object'}")
    for i, stage in enumerate(data["setup"]):
        _require(stage, STAGE_KEYS, f"setup[{i}]")
    if not data["systems"]:
        raise ValueError("report.json: systems is empty (it needs the base model first)")
    names = set()
    for i, system in enumerate(data["systems"]):
        _require(system, ("name",), f"systems[{i}]")
        where = _system_where(system, i)
        if system["name"] in names:
            raise ValueError(f"report.json: {where}: the name is used by an earlier system")
        names.add(system["name"])
        _require(system, SYSTEM_KEYS, where)
        if system["costs"] is not None:
            _require(system["costs"], COST_KEYS, f"{where} costs")
        evaluation = _require(system["eval"], SYSTEM_EVAL_KEYS, f"{where} eval")
        _require(evaluation["categories"], (), f"{where} eval.categories")
        for category, record in evaluation["categories"].items():
            _require(record, CATEGORY_KEYS, f"{where} eval.categories[{category!r}]")
        if evaluation["win_rate"] is not None:
            _require(evaluation["win_rate"], WIN_RATE_KEYS, f"{where} eval.win_rate")
        for key in ("proxy_reward", "gold_reward"):
            if evaluation[key] is not None:
                _require(evaluation[key], MEAN_KEYS, f"{where} eval.{key}")
        _require(system["grids"], (), f"{where} grids")
        if not isinstance(system["curves"], list):
            raise ValueError(f"report.json: {where} curves must be a JSON array")
        if system["curves"]:
            _require(system, ("curve_x",), where)
    if data["overopt"] is not None:
        _require(data["overopt"], OVEROPT_KEYS, "overopt")
        if not isinstance(data["overopt"]["points"], list):
            raise ValueError("report.json: overopt.points must be a JSON array")
        for i, point in enumerate(data["overopt"]["points"]):
            _require(point, POINT_KEYS, f"overopt.points[{i}]")


# --- formatting values ----------------------------------------------------------------------------------


def _number(value: object, where: str) -> float | None:
    """A JSON number as float, None for null; anything else is a ValueError naming `where`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"report.json: {where} must be a number or null, got {value!r}")
    return float(value)


def _fmt(value: object, spec: str, where: str) -> str:
    number = _number(value, where)
    return NA if number is None else format(number, spec)


def _count(value: object, where: str) -> str:
    return _fmt(value, ",.0f", where)


def _seconds(value: object, where: str) -> str:
    seconds = _number(value, where)
    if seconds is None:
        return NA
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _ci(ci: object, spec: str, where: str, scale: float = 1.0, suffix: str = "") -> str:
    """'[lo, hi]' from a two-number list, '' for null."""
    if ci is None:
        return ""
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        raise ValueError(f"report.json: {where} must be [low, high] or null, got {ci!r}")
    low, high = (_number(v, where) for v in ci)
    if low is None or high is None:
        return ""
    return f"[{format(low * scale, spec)}{suffix}, {format(high * scale, spec)}{suffix}]"


def _estimate(value: object, ci: object, spec: str, where: str, sep: str = " ") -> str:
    """'0.690 [0.650, 0.730]', or 'n/a' when the value is null."""
    text = _fmt(value, spec, where)
    interval = _ci(ci, spec, f"{where} CI")
    return text if text == NA or not interval else f"{text}{sep}{interval}"


def _mean(record: dict | None, where: str, sep: str = " ") -> str:
    return NA if record is None else _estimate(record["mean"], record["ci95"], ".3f", where, sep)


def _win_rate(record: dict | None, where: str, sep: str = " ") -> str:
    """'55.0% [50.0%, 60.0%]' (wins/ties/losses given after it), or 'n/a'."""
    if record is None:
        return NA
    rate = _number(record["rate"], f"{where}.rate")
    if rate is None:
        return NA
    interval = _ci(record["ci95"], ".1f", f"{where}.ci95", scale=100, suffix="%")
    return f"{100 * rate:.1f}%" + (f"{sep}{interval}" if interval else "")


def _tally(record: dict, where: str) -> str:
    counts = [_count(record[k], f"{where}.{k}") for k in ("wins", "ties", "losses")]
    return f"{counts[0]} wins, {counts[1]} ties, {counts[2]} losses"


def delta_points(score: object, base_score: object, where: str) -> float | None:
    """The ShapesEval difference in percentage points (scores are fractions), None if either is null."""
    score, base_score = _number(score, where), _number(base_score, f"{where} (base)")
    if score is None or base_score is None:
        return None
    return round(100.0 * (score - base_score), 1) + 0.0  # + 0.0 turns -0.0 into 0.0


def _signed(value: float | None, spec: str) -> str:
    return NA if value is None else format(value, "+" + spec)


def _text(value: object) -> str:
    """Free text from the data, escaped (null shows as n/a)."""
    return html.escape(NA if value is None else str(value))


# --- sections ------------------------------------------------------------------------------------------


def _summary(data: dict) -> str:
    systems, settings = data["systems"], data["eval"]
    base = systems[0]
    listed = ", ".join(f"{s['name']} ({s['paradigm']})" for s in systems)
    quick = "in quick mode (--quick) " if data["quick"] else ""
    prompts = _count(settings["prompts"], "eval.prompts")
    per_prompt = _count(settings["samples_per_prompt"], "eval.samples_per_prompt")
    steps, guidance = (
        _count(settings["steps"], "eval.steps"),
        _fmt(settings["guidance"], "g", "eval.guidance"),
    )
    total = _seconds(data["total_seconds"], "total_seconds")
    paragraph = (
        f"{len(systems)} systems ran {quick}from the same base model: {listed}; {base['name']} is the "
        f"reference. Each was evaluated on {prompts} ShapesEval prompts x {per_prompt} sample(s), "
        f"{steps} sampling steps, guidance {guidance} (sampler: {settings['sampler']}; seeds: "
        f"{settings['seeds']}; judge: {settings['judge']}). The whole run took {total} on "
        f"{data['machine']} (created {data['created']})."
    )
    base_score = base["eval"]["overall"]
    sentences = []
    for i, system in enumerate(systems[1:], start=1):
        where = _system_where(system, i)
        score = _number(system["eval"]["overall"], f"{where} eval.overall")
        delta = delta_points(score, base_score, f"{where} eval.overall")
        if score is None or delta is None:
            gain = "its ShapesEval gain over the base model is n/a (a score is null)"
        else:
            shown = _fmt(base_score, ".3f", "systems[0] eval.overall")
            gain = (
                f"ShapesEval {score:.3f} against {shown} for {base['name']}, {_signed(delta, '.1f')} points"
            )
        record = system["eval"]["win_rate"]
        rate = _win_rate(record, f"{where} eval.win_rate")
        if rate == NA:
            wins = f"its gold win rate against {base['name']} is n/a"
        else:
            wins = f"gold win rate against {base['name']} {rate} ({_tally(record, f'{where} eval.win_rate')})"
            wins += _win_verdict(record["ci95"], f"{where} eval.win_rate.ci95")
        sentences.append(
            f"<li>{_text(system['name'])} ({_text(system['paradigm'])}): {_text(gain)}; {_text(wins)}.</li>"
        )
    listing = (
        f"<ul>{''.join(sentences)}</ul>"
        if sentences
        else "<p>No aligned system: only the base model ran.</p>"
    )
    return f"<p>{_text(paragraph)}</p>{listing}"


def _win_verdict(ci: object, where: str) -> str:
    """Whether the win rate's 95% CI lies above, below or across 50% (no better and no worse than base)."""
    if ci is None:
        return ""
    low, high = (_number(v, where) for v in ci)
    if low is None or high is None:
        return ""
    if low > 0.5:
        return ", its 95% CI above 50%"
    if high < 0.5:
        return ", its 95% CI below 50%"
    return ", its 95% CI includes 50%"


def _paradigm_rows(systems: list[dict]) -> list[list[str]]:
    base_eval = systems[0]["eval"]
    rows = []
    for i, system in enumerate(systems):
        where = _system_where(system, i)
        costs, evaluation = system["costs"], system["eval"]
        if costs is None:
            cost_cells = [NA] * 7
        else:
            memory = _fmt(costs["peak_memory_mb"], ",.0f", f"{where} costs.peak_memory_mb")
            if memory != NA:
                memory += " MB" + (f"\n{costs['memory_kind']}" if costs["memory_kind"] else "")
            cost_cells = [
                _seconds(costs["wall_s"], f"{where} costs.wall_s"),
                _count(costs["forward_nfe"], f"{where} costs.forward_nfe"),
                _count(costs["backward_nfe"], f"{where} costs.backward_nfe"),
                memory,
                _count(costs["reward_queries"], f"{where} costs.reward_queries"),
                _count(costs["preference_pairs"], f"{where} costs.preference_pairs"),
                _count(costs["inference_nfe_per_image"], f"{where} costs.inference_nfe_per_image"),
            ]
        overall = _estimate(
            evaluation["overall"], evaluation["overall_ci95"], ".3f", f"{where} eval.overall", "\n"
        )
        diversity = _fmt(evaluation["diversity"], ".3f", f"{where} eval.diversity")
        if i == 0:
            delta, win_rate, diversity_change = "reference", "reference", "reference"
        else:
            delta = _signed(
                delta_points(evaluation["overall"], base_eval["overall"], f"{where} eval.overall"), ".1f"
            )
            win_rate = _win_rate(evaluation["win_rate"], f"{where} eval.win_rate", "\n")
            if win_rate != NA:
                record = evaluation["win_rate"]
                counts = [_count(record[k], f"{where} eval.win_rate.{k}") for k in ("wins", "ties", "losses")]
                win_rate += "\nW/T/L " + "/".join(counts)
            change = _number(evaluation["diversity"], f"{where} eval.diversity")
            base_diversity = _number(base_eval["diversity"], "systems[0] eval.diversity")
            diversity_change = (
                NA if change is None or base_diversity is None else f"{change - base_diversity:+.3f}"
            )
        rows.append(
            [
                str(system["name"]),
                str(system["paradigm"]),
                str(system["method"]),
                str(system["feedback"] or NA),
            ]
            + cost_cells
            + [overall, delta, win_rate]
            + [_mean(evaluation[k], f"{where} eval.{k}", "\n") for k in ("proxy_reward", "gold_reward")]
            + [diversity, diversity_change]
        )
    return rows


def _paradigms(data: dict) -> str:
    kinds = sorted(
        {s["costs"]["memory_kind"] for s in data["systems"] if s["costs"] and s["costs"]["memory_kind"]}
    )
    explained = (
        "Costs are what aligning took: wall time of training (or of steering over the evaluation set); "
        "forward NFEs count denoiser rows evaluated (a guided step counts 2 per sample), backward NFEs "
        f"the rows backpropagated; peak memory is measured as {', '.join(kinds) or NA} (cuda: allocated "
        "GPU memory; cpu-rss: the increase of the process's resident memory); inference NFEs/image is "
        "what drawing one image costs once aligned (steering pays its multiple there). Δ vs base is the "
        "difference of ShapesEval overall scores in percentage points; the gold win rate is how often a "
        "system's image beats the base model's on the same prompt and seed, ties counted as the data "
        f"gives them (judge: {data['eval']['judge']})."
    )
    table = html_table(PARADIGM_HEADER, _paradigm_rows(data["systems"]))
    return f"<p>{_text(explained)}</p><div class='wide left'>{table}</div>"


def _categories_in_order(systems: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for system in systems:
        seen.update(dict.fromkeys(system["eval"]["categories"]))
    for system in systems:
        seen.update(dict.fromkeys(system["grids"]))
    return list(seen)


def _categories(data: dict) -> str:
    systems = data["systems"]
    rows = []
    for category in _categories_in_order(systems):
        row = [category]
        for i, system in enumerate(systems):
            record = system["eval"]["categories"].get(category)
            where = f"{_system_where(system, i)} eval.categories[{category!r}]"
            if record is None:
                row.append(NA)
                continue
            cell = _estimate(record["accuracy"], record["ci95"], ".3f", f"{where}.accuracy", "\n")
            row.append(f"{cell}\n{_count(record['images'], f'{where}.images')} images")
        rows.append(row)
    rows.append(
        ["overall (mean of tasks)"]
        + [
            _estimate(
                s["eval"]["overall"],
                s["eval"]["overall_ci95"],
                ".3f",
                f"{_system_where(s, i)} eval.overall",
                "\n",
            )
            for i, s in enumerate(systems)
        ]
    )
    table = html_table(["category"] + [str(s["name"]) for s in systems], rows)
    intro = "<p>Accuracy with its 95% bootstrap CI and the number of images judged.</p>"
    return f"{intro}<div class='wide'>{table}</div>"


def _grid_image(folder: Path, relative: object, where: str) -> Image.Image:
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"report.json: {where}: the grid path must be a non-empty string, got {relative!r}")
    path = folder / relative
    if not path.is_file():
        raise ValueError(f"report.json: {where}: the grid image {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except OSError as error:
        raise ValueError(f"report.json: {where}: the grid image {path} cannot be read ({error})") from error


def _grids(data: dict, folder: Path) -> str:
    systems = data["systems"]
    seeds = data["eval"]["seeds"]
    parts = [
        f"<p>{_text(f'The evaluation prompts and seeds, the same for every system (seeds: {seeds}).')}</p>"
    ]
    for category in _categories_in_order(systems):
        parts.append(f"<h3>{_text(category)}</h3><div>")
        for i, system in enumerate(systems):
            caption = _text(f"{system['name']}, {category}")
            if category not in system["grids"]:
                parts.append(f"<p class='missing'>{caption}: no samples in report.json.</p>")
                continue
            where = f"{_system_where(system, i)}, category {category!r}"
            image = _grid_image(folder, system["grids"][category], where)
            parts.append(
                f"<figure><img src='{png_data_uri(image)}' alt='{caption}' width='{image.width}' "
                f"height='{image.height}'><figcaption>{caption}</figcaption></figure>"
            )
        parts.append("</div>")
    return "".join(parts)


def _colour(index: int) -> str:
    return f"C{index % 10}"  # matplotlib's default cycle: one colour per system across every plot


def _curve_series(system: dict, index: int) -> dict[str, Series]:
    """The system's curves as one Series per metric that has at least one value.

    x is read from the key named by `curve_x` ("step" or "epoch"); points that do not hold it are read
    from "step" (the schema's example keeps "step" in every point and lets `curve_x` name its unit).
    """
    where = _system_where(system, index)
    unit = str(system["curve_x"])
    found: dict[str, Series] = {}
    for k, point in enumerate(system["curves"]):
        point = _require(point, (), f"{where} curves[{k}]")
        x_key = unit if unit in point else "step"
        if x_key not in point:
            raise ValueError(f"report.json: {where} curves[{k}] has neither {unit!r} nor 'step'")
        x = _number(point[x_key], f"{where} curves[{k}].{x_key}")
        for metric, _, _ in CURVE_METRICS:
            y = _number(point.get(metric), f"{where} curves[{k}].{metric}")
            if x is None or y is None:
                continue
            series = found.setdefault(metric, Series(str(system["name"]), [], [], colour=_colour(index)))
            series.x.append(x)
            series.y.append(y)
    return found


def _figure(image: Image.Image, caption: str) -> str:
    text = _text(caption)
    img = f"<img src='{png_data_uri(image)}' alt='{text}'>"
    return f"<figure class='plot'>{img}<figcaption>{text}</figcaption></figure>"


def _curves(data: dict) -> str:
    with_curves = [(i, s) for i, s in enumerate(data["systems"]) if s["curves"]]
    if not with_curves:
        return "<p>No system has training curves in report.json (none was trained with a logged curve).</p>"
    metrics = ", ".join(metric for metric, _, _ in CURVE_METRICS)
    found = [(s, _curve_series(s, i)) for i, s in with_curves]
    plotted = [(s, series) for s, series in found if series]
    silent = [str(s["name"]) for s, series in found if not series]
    note = f"<p>{_text(', '.join(silent))}: the training log holds none of {metrics}.</p>" if silent else ""
    if not plotted:
        return note
    units = {str(s["curve_x"]) for s, _ in plotted}
    if len(units) > 1:  # systems count in different units: say which in the legend
        for s, series in plotted:
            for line in series.values():
                line.label += f" (per {s['curve_x']})"
    xlabel = "step or epoch (see legend)" if len(units) > 1 else units.pop()
    panels = [
        Panel(title, xlabel, ylabel, [series[metric] for _, series in plotted if metric in series])
        for metric, title, ylabel in CURVE_METRICS
    ]
    panels = [p for p in panels if p.series]
    shown = ", ".join(p.title for p in panels)
    caption = f"Training curves of {', '.join(str(s['name']) for s, _ in plotted)}: {shown}."
    return _figure(line_panels(panels), caption) + note


def _overopt(data: dict) -> str:
    overopt, systems = data["overopt"], data["systems"]
    if overopt is None:
        if any("kl_to_base" in p for s in systems for p in s["curves"]):
            why = (
                "the over-optimisation analysis was not run for this report (overopt is null in report.json)."
            )
        else:
            why = "no system logged its KL to the base model, which the analysis plots rewards against."
        return f"<p>{_text('No over-optimisation plot: ' + why)}</p>"
    note = f"<p>{_text(overopt['note'])}</p>" if overopt["note"] else ""
    order = {s["name"]: i for i, s in enumerate(systems)}
    grouped: dict[str, tuple[Series, Series]] = {}
    for k, point in enumerate(overopt["points"]):
        name, where = point["system"], f"overopt.points[{k}]"
        d = _number(point["sqrt_kl"], f"{where}.sqrt_kl")
        colour = _colour(order.get(name, len(order) + len(grouped)))
        proxy, gold = grouped.setdefault(
            name, (Series(str(name), [], [], colour), Series(str(name), [], [], colour))
        )
        for series, key in ((proxy, "proxy"), (gold, "gold")):
            value = _number(point[key], f"{where}.{key}")
            if d is not None and value is not None:
                series.x.append(d)
                series.y.append(value)
    xlabel = "sqrt(KL to base) (nats^0.5)"
    panels = [
        Panel(
            "proxy reward (the learned reward model)",
            xlabel,
            "proxy reward",
            [p for p, _ in grouped.values() if p.x],
        ),
        Panel("gold reward", xlabel, "gold reward", [g for _, g in grouped.values() if g.x]),
    ]
    if not any(p.series for p in panels):
        return (
            note
            + "<p>No over-optimisation plot: overopt.points holds no point with sqrt_kl and a reward.</p>"
        )
    caption = "Proxy and gold reward against sqrt(KL to base), per system (Gao et al. 2022)."
    return note + _figure(line_panels(panels), caption)


def _figures_text(figures: object) -> str:
    if figures is None:
        return NA
    if not isinstance(figures, dict):
        raise ValueError(f"report.json: a setup stage's figures must be an object or null, got {figures!r}")
    return ", ".join(f"{k} = {_figure_value(v)}" for k, v in figures.items())


def _figure_value(value: object) -> str:
    """A setup figure for reading: floats to 3 significant digits, lists item by item, null as n/a."""
    if value is None:
        return NA
    if isinstance(value, float):
        return format(value, ".3g")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_figure_value(v) for v in value) + "]"
    return str(value)


def _setup(data: dict) -> str:
    rows = [
        [str(stage["name"]), _seconds(stage["seconds"], f"setup[{i}].seconds"), str(stage["summary"] or NA),
         _figures_text(stage["figures"])]
        for i, stage in enumerate(data["setup"])
    ]  # fmt: skip
    parts = [
        f"<div class='prose'>{html_table(['stage', 'time', 'summary', 'figures'], rows)}</div>"
        if rows
        else "<p>No shared setup stage.</p>"
    ]
    models = [
        (i, s)
        for i, s in enumerate(data["setup"])
        if isinstance(s["figures"], dict) and "held_out_accuracy" in s["figures"]
    ]
    for i, stage in models:
        figures, where = stage["figures"], f"setup[{i}].figures"
        accuracy = _estimate(
            figures["held_out_accuracy"], figures.get("held_out_ci95"), ".3f", f"{where}.held_out_accuracy"
        )
        ceiling = _fmt(figures.get("ceiling"), ".3f", f"{where}.ceiling")
        parts.append(
            html_table(
                ["", "agreement with held-out rater labels"],
                [
                    [f"{stage['name']}: held-out accuracy", accuracy],
                    ["raters' ceiling (two raters agree)", ceiling],
                ],
            )
        )
    if not models:
        parts.append(
            "<p>No reward model was trained in the setup (no stage reports a held-out accuracy).</p>"
        )
    evaluation = [[str(s["name"]), _seconds(s["eval"]["seconds"], f"{_system_where(s, i)} eval.seconds")]
                  for i, s in enumerate(data["systems"])]  # fmt: skip
    parts.append("<p>Evaluation time per system:</p>" + html_table(["system", "evaluation time"], evaluation))
    return "".join(parts)


def _notes(data: dict) -> str:
    notes, systems = data["notes"], data["systems"]
    order = list(dict.fromkeys([s["paradigm"] for s in systems] + list(notes)))
    items = []
    for paradigm in order:
        if paradigm not in notes:
            continue
        members = ", ".join(str(s["name"]) for s in systems if s["paradigm"] == paradigm)
        heading = f"{paradigm} ({members})" if members else str(paradigm)
        items.append(f"<dt>{_text(heading)}</dt><dd>{_text(notes[paradigm])}</dd>")
    return f"<dl>{''.join(items)}</dl>" if items else "<p>No scalability notes in report.json.</p>"


def _reproduce(data: dict) -> str:
    if not data["commands"]:
        return "<p>No commands recorded in report.json.</p>"
    return f"<p>From the repository's root:</p><pre>{_text(chr(10).join(map(str, data['commands'])))}</pre>"


# --- the page ------------------------------------------------------------------------------------------


def render_html(data: dict, folder: Path) -> str:
    """The report page as a string (grid paths are read relative to `folder`); see `render_report`."""
    validate(data)
    folder = Path(folder)
    builders: dict[str, Callable[[], str]] = {
        "summary": lambda: _summary(data),
        "paradigms": lambda: _paradigms(data),
        "categories": lambda: _categories(data),
        "grids": lambda: _grids(data, folder),
        "curves": lambda: _curves(data),
        "overopt": lambda: _overopt(data),
        "setup": lambda: _setup(data),
        "notes": lambda: _notes(data),
        "reproduce": lambda: _reproduce(data),
    }
    sections = [
        f"<section id='{key}'><h2>{html.escape(heading)}</h2>{builders[key]()}</section>"
        for key, heading in SECTIONS
    ]
    page = html_page(str(data["title"]), sections)
    return page.replace("</head>", f"<style>{EXTRA_STYLE}</style></head>", 1)


def render_report(data: dict, folder: Path) -> Path:
    """Check `data` (report.json, schema 1) and write `folder/report.html`; returns its path.

    Nothing is written when the data is bad: the page is built in memory first, then written through a
    temporary file that replaces the report in one step.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"the report folder {folder} does not exist")
    page = render_html(data, folder)
    path = folder / REPORT_FILE
    partial = folder / f".{REPORT_FILE}.partial"
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, path)
    return path
