"""The paradigm report renderer on a synthetic report.json: sections, the numbers in the tables, n/a for
nulls, embedded images only, escaping, and clear errors for bad data."""

from __future__ import annotations

import base64
import copy
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign.demo.plots import Panel, Series, line_panels
from diffalign.demo.report_html import SECTIONS, render_html, render_report

CATEGORIES = ("single_object", "two_object")
EVIL = "<script>window.__injected = 1</script>"


def _grid(folder: Path, system: str, category: str, seed: int) -> str:
    """A tiny random PNG grid under folder/grids; returns its path relative to folder."""
    relative = f"grids/{system}/{category}.png"
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    (folder / relative).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / relative)
    return relative


def _system(folder, index, name, method, paradigm, overall, costs=None, win_rate=None, curves=(), **extra):
    evaluation = {
        "overall": overall,
        "overall_ci95": None if overall is None else [overall - 0.04, overall + 0.04],
        "categories": {
            "single_object": {"accuracy": 1.0, "ci95": [1.0, 1.0], "images": 10},
            "two_object": {"accuracy": 0.3 + 0.1 * index, "ci95": [0.1, 0.5 + 0.1 * index], "images": 10},
        },
        "win_rate": win_rate,
        "proxy_reward": {"mean": 0.05 + 0.1 * index, "ci95": [0.0, 0.1 + 0.1 * index]},
        "gold_reward": {"mean": 0.6, "ci95": [0.55, 0.65]},
        "diversity": 0.2 - 0.05 * index,
        "seconds": 10.0 + index,
    }
    evaluation.update(extra.pop("eval", {}))
    system = {
        "name": name,
        "method": method,
        "paradigm": paradigm,
        "run_dir": None if costs is None else f"runs/{name}",
        "feedback": extra.pop("feedback", "reward model"),
        "costs": costs,
        "eval": evaluation,
        "grids": {c: _grid(folder, name, c, 10 * index + k) for k, c in enumerate(CATEGORIES)},
        "curves": list(curves),
    }
    system.update(extra)
    return system


def _costs(**changes):
    costs = {"wall_s": 95.2, "forward_nfe": 40960, "backward_nfe": 10240, "peak_memory_mb": 812.4,
             "memory_kind": "cpu-rss", "reward_queries": 512, "preference_pairs": 0,
             "inference_nfe_per_image": 20}  # fmt: skip
    costs.update(changes)
    return costs


def write_synthetic_report(folder: Path) -> dict:
    """Four systems (base, GRPO with step curves and KL, DPO with epoch curves, FK steering with nulls)
    and their grids written under `folder`; returns the report.json data."""
    grpo_curves = [
        {"step": s, "reward_mean": 0.1 * s, "gold_mean": 0.6 + 0.01 * s, "kl_to_base": 0.01 * s}
        for s in range(1, 5)
    ]
    dpo_curves = [{"epoch": e, "reward_mean": 0.2 * e, "gold_mean": None} for e in range(1, 4)]
    grpo_wins = {"rate": 0.55, "ci95": [0.52, 0.6], "wins": 30, "ties": 3, "losses": 27}
    dpo_wins = {"rate": 0.4, "ci95": [0.3, 0.45], "wins": 22, "ties": 4, "losses": 34}
    dpo_costs = _costs(wall_s=30.0, backward_nfe=0, preference_pairs=270)
    systems = [
        _system(folder, 0, "base", "none", "base", 0.65, feedback=None),
        _system(folder, 1, "grpo", "grpo", "policy-gradient RL", 0.69, _costs(), grpo_wins, grpo_curves,
                curve_x="step"),
        _system(folder, 2, "dpo", "dpo", "DPO family", 0.62, dpo_costs, dpo_wins, dpo_curves, curve_x="epoch",
                feedback="270 preference pairs"),
        _system(folder, 3, "fk", "fk", "test-time steering", 0.7123,
                _costs(wall_s=4000.0, backward_nfe=0, peak_memory_mb=None, inference_nfe_per_image=80),
                eval={"proxy_reward": None, "diversity": None}),
    ]  # fmt: skip
    return {
        "schema": 1,
        "title": "diffalign demo: the alignment paradigms on the Shapes world",
        "created": "2026-11-27T10:00:00Z",
        "machine": "x86_64, 2 threads, torch 2.13.0, cpu",
        "quick": False,
        "total_seconds": 512.3,
        "commands": ["diffalign demo --out demo_out", "diffalign report runs/grpo --out demo_out"],
        "eval": {
            "prompts": 60,
            "samples_per_prompt": 1,
            "steps": 10,
            "guidance": 3.0,
            "sampler": "ddim",
            "judge": "the gold rater panel",
            "seeds": "0..59, the same for every system",
        },
        "setup": [
            {
                "name": "preferences",
                "seconds": 80.1,
                "summary": "300 pairs simulated from base",
                "figures": {"pairs": 300, "ties": 21, "agreement": 0.7412345, "rater": None},
            },
            {
                "name": "reward model",
                "seconds": 30.2,
                "summary": "Bradley-Terry reward model",
                "figures": {
                    "held_out_accuracy": 0.61,
                    "held_out_ci95": [0.55, 0.67],
                    "ceiling": 0.74,
                    "pairs": 270,
                },
            },
        ],
        "systems": systems,
        "overopt": {
            "points": [
                {
                    "system": "grpo",
                    "step": s,
                    "sqrt_kl": (0.01 * s) ** 0.5,
                    "proxy": 0.1 * s,
                    "gold": 0.6 + 0.01 * s,
                }
                for s in range(0, 5)
            ],
            "note": "gold keeps rising with the proxy over this short run",
        },
        "notes": {
            "policy-gradient RL": "samples whole trajectories per update",
            "DPO family": "offline pairs",
        },
    }


class Page(HTMLParser):
    """The parts of the report a reader sees, by section: headings, text, table cells, images."""

    def __init__(self, text: str):
        super().__init__()
        self.section: str | None = None
        self.headings: dict[str, str] = {}
        self.text: dict[str, str] = {}
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.images: list[tuple[str | None, dict]] = []
        self.captions: dict[str, list[str]] = {}
        self._cell: list[str] | None = None
        self._tag: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._tag = tag
        if tag == "section":
            self.section = attrs["id"]
            self.text[self.section] = ""
        elif tag == "table":
            self.tables.setdefault(self.section, []).append([])
        elif tag == "tr":
            self.tables[self.section][-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append((self.section, attrs))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[self.section][-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "section":
            self.section = None

    def handle_data(self, data):
        if self.section is not None:
            self.text[self.section] += data
            if self._tag == "h2":
                self.headings[self.section] = data
            elif self._tag == "figcaption":
                self.captions.setdefault(self.section, []).append(data)
        if self._cell is not None:
            self._cell.append(data)

    def table(self, section: str, index: int = 0) -> dict[str, dict[str, str]]:
        """A table as {first cell of the row: {column header: cell}}."""
        header, *rows = self.tables[section][index]
        return {row[0]: dict(zip(header, row)) for row in rows}


@pytest.fixture
def report(tmp_path: Path) -> tuple[dict, Path]:
    return write_synthetic_report(tmp_path), tmp_path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[dict, Path, Path]:
    """The synthetic report rendered once, for the tests that only read it."""
    folder = tmp_path_factory.mktemp("report")
    data = write_synthetic_report(folder)
    return data, folder, render_report(data, folder)


@pytest.fixture(scope="module")
def page(rendered) -> Page:
    return Page(rendered[2].read_text(encoding="utf-8"))


def _render(data: dict, folder: Path) -> Page:
    return Page(render_report(data, folder).read_text(encoding="utf-8"))


def test_every_section_is_present_with_a_heading(rendered, page):
    _, folder, path = rendered
    assert path == folder / "report.html"
    assert sorted(p.name for p in folder.iterdir()) == ["grids", "report.html"]  # no partial file left
    assert list(page.text) == [key for key, _ in SECTIONS]
    assert set(page.headings) == set(page.text)


def test_paradigm_table_holds_each_systems_numbers(page):
    rows = page.table("paradigms")
    assert list(rows) == ["base", "grpo", "dpo", "fk"]
    grpo, dpo, fk = rows["grpo"], rows["dpo"], rows["fk"]
    assert (grpo["paradigm"], grpo["method"], grpo["feedback"]) == (
        "policy-gradient RL",
        "grpo",
        "reward model",
    )
    assert grpo["wall time"] == "1 min 35 s"
    assert fk["wall time"] == "1 h 06 min"  # 4000 s
    assert dpo["wall time"] == "30.0 s"
    assert (grpo["forward NFEs"], grpo["backward NFEs"]) == ("40,960", "10,240")
    assert grpo["peak memory"] == "812 MB\ncpu-rss"
    assert (grpo["reward queries"], grpo["preference pairs"]) == ("512", "0")
    assert dpo["preference pairs"] == "270"
    assert fk["inference NFEs/image"] == "80"
    assert grpo["ShapesEval overall [95% CI]"] == "0.690\n[0.650, 0.730]"
    # points: 100 x the difference of the overall scores (0.69 - 0.65, 0.62 - 0.65, 0.7123 - 0.65)
    assert grpo["Δ vs base (points)"] == "+4.0"
    assert dpo["Δ vs base (points)"] == "-3.0"
    assert fk["Δ vs base (points)"] == "+6.2"
    assert grpo["gold win rate vs base [95% CI]"] == "55.0%\n[52.0%, 60.0%]\nW/T/L 30/3/27"
    assert grpo["proxy reward [95% CI]"] == "0.150\n[0.000, 0.200]"
    assert grpo["gold reward [95% CI]"] == "0.600\n[0.550, 0.650]"
    assert (grpo["diversity"], grpo["Δ diversity vs base"]) == ("0.150", "-0.050")
    assert dpo["Δ diversity vs base"] == "-0.100"


def test_null_values_render_na(page):
    rows = page.table("paradigms")
    base, fk = rows["base"], rows["fk"]
    cost_columns = ["wall time", "forward NFEs", "backward NFEs", "peak memory", "reward queries",
                    "preference pairs", "inference NFEs/image"]  # fmt: skip
    assert [base[c] for c in cost_columns] == ["n/a"] * 7  # the base model's costs are null
    assert base["feedback"] == "n/a"
    assert base["Δ vs base (points)"] == base["gold win rate vs base [95% CI]"] == "reference"
    assert fk["peak memory"] == "n/a"
    assert fk["gold win rate vs base [95% CI]"] == "n/a"
    assert fk["proxy reward [95% CI]"] == "n/a"
    assert fk["diversity"] == fk["Δ diversity vs base"] == "n/a"


def test_null_overall_gives_na_delta_and_says_so(report):
    data, folder = report
    data["systems"][1]["eval"]["overall"] = None
    page = _render(data, folder)
    grpo = page.table("paradigms")["grpo"]
    assert grpo["ShapesEval overall [95% CI]"] == grpo["Δ vs base (points)"] == "n/a"
    assert "grpo (policy-gradient RL): its ShapesEval gain over the base model is n/a" in page.text["summary"]


def test_summary_computes_each_gain(page):
    text = page.text["summary"]
    assert "4 systems ran from the same base model" in text
    assert "8 min 32 s on x86_64, 2 threads, torch 2.13.0, cpu" in text  # 512.3 s
    assert (
        "60 ShapesEval prompts x 1 sample(s), 10 sampling steps, guidance 3 (sampler: ddim; seeds: 0..59"
        in text
    )
    assert (
        "grpo (policy-gradient RL): ShapesEval 0.690 against 0.650 for base, +4.0 points; gold win rate "
        "against base 55.0% [52.0%, 60.0%] (30 wins, 3 ties, 27 losses), its 95% CI above 50%." in text
    )
    assert "dpo (DPO family): ShapesEval 0.620 against 0.650 for base, -3.0 points;" in text
    assert "(22 wins, 4 ties, 34 losses), its 95% CI below 50%." in text
    assert (
        "fk (test-time steering): ShapesEval 0.712 against 0.650 for base, +6.2 points; its gold win rate"
        in text
    )


def test_categories_table(page):
    rows = page.table("categories")
    assert list(rows) == ["single_object", "two_object", "overall (mean of tasks)"]
    assert rows["two_object"]["dpo"] == "0.500\n[0.100, 0.700]\n10 images"
    assert rows["single_object"]["base"] == "1.000\n[1.000, 1.000]\n10 images"
    assert rows["overall (mean of tasks)"]["fk"] == "0.712\n[0.672, 0.752]"


def test_a_category_a_system_lacks_shows_na_and_no_image(report):
    data, folder = report
    del data["systems"][3]["eval"]["categories"]["two_object"]
    del data["systems"][3]["grids"]["two_object"]
    page = _render(data, folder)
    assert page.table("categories")["two_object"]["fk"] == "n/a"
    assert "fk, two_object: no samples in report.json." in page.text["grids"]
    assert len([1 for section, _ in page.images if section == "grids"]) == 4 * 2 - 1


def test_grids_embed_the_files_pixels_with_captions(rendered, page):
    data, folder, _ = rendered
    grids = [attrs for section, attrs in page.images if section == "grids"]
    assert page.captions["grids"] == [f"{s}, {c}" for c in CATEGORIES for s in ("base", "grpo", "dpo", "fk")]
    assert [a["alt"] for a in grids] == page.captions["grids"]
    for attrs, caption in zip(grids, page.captions["grids"]):
        system, category = caption.split(", ")
        shown = Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1])))
        original = Image.open(
            folder / data["systems"][[s["name"] for s in data["systems"]].index(system)]["grids"][category]
        )
        np.testing.assert_array_equal(np.asarray(shown), np.asarray(original))


def test_images_are_data_uris_only(rendered):
    _, folder, path = rendered
    text = path.read_text(encoding="utf-8")
    sources = re.findall(r"""\bsrc\s*=\s*['"]?([^'" >]+)""", text)
    assert len(sources) == 4 * 2 + 2  # the grids, the curves and the over-optimisation plot
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "grids/" not in text and str(folder) not in text


def test_missing_grid_is_an_error_naming_system_category_and_path(report):
    data, folder = report
    missing = folder / data["systems"][2]["grids"]["two_object"]
    missing.unlink()
    with pytest.raises(ValueError, match=r"'dpo'.*'two_object'") as error:
        render_report(data, folder)
    assert str(missing) in str(error.value)
    assert not (folder / "report.html").exists()


def test_unreadable_grid_is_an_error(report):
    data, folder = report
    (folder / data["systems"][1]["grids"]["single_object"]).write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"'grpo'.*'single_object'.*cannot be read"):
        render_html(data, folder)


@pytest.mark.parametrize("schema", [2, None, "1"])
def test_wrong_schema_is_an_error(report, schema):
    data, folder = report
    data["schema"] = schema
    with pytest.raises(ValueError, match=r"schema .* is not supported"):
        render_report(data, folder)


def _pop(*path):
    """An edit that deletes data[path[0]][path[1]]...[path[-1]]."""

    def edit(data):
        for key in path[:-1]:
            data = data[key]
        del data[path[-1]]

    return edit


def _set(value, *path):
    """An edit that sets data[path[0]]...[path[-1]] = value."""

    def edit(data):
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return edit


BAD_DATA = [
    (_pop("machine"), r"the top level is missing the key 'machine'"),
    (_pop("eval", "judge"), r"eval is missing the key 'judge'"),
    (
        _pop("systems", 2, "eval", "overall"),
        r"system 'dpo' \(systems\[2\]\) eval is missing the key 'overall'",
    ),
    (_pop("systems", 1, "costs", "forward_nfe"), r"system 'grpo' .* costs is missing the key 'forward_nfe'"),
    (_pop("systems", 1, "eval", "win_rate", "wins"), r"'grpo' .* eval.win_rate is missing the key 'wins'"),
    (_pop("systems", 1, "curve_x"), r"system 'grpo' \(systems\[1\]\) is missing the key 'curve_x'"),
    (_set("grpo", "systems", 3, "name"), r"system 'grpo' \(systems\[3\]\): the name is used"),
    (_set([], "systems"), r"systems is empty"),
    (_pop("overopt", "points", 1, "gold"), r"overopt.points\[1\] is missing the key 'gold'"),
    (_set("95 s", "systems", 1, "costs", "wall_s"), r"'grpo' .* costs.wall_s must be a number"),
    (_pop("systems", 2, "curves", 0, "epoch"), r"'dpo' .* curves\[0\] has neither 'epoch' nor 'step'"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_DATA)
def test_bad_data_is_an_error_naming_what_is_wrong(report, edit, message):
    data, folder = report
    edit(data)
    with pytest.raises(ValueError, match=message):
        render_report(data, folder)
    assert not (folder / "report.html").exists()


def test_text_from_the_data_is_escaped(report):
    data, folder = report
    data["title"] += EVIL
    data["systems"][1]["name"] = EVIL
    data["systems"][2]["feedback"] = EVIL
    data["notes"]["DPO family"] = EVIL
    data["commands"].append(f"diffalign demo --note '{EVIL}'")
    data["setup"][0]["summary"] = EVIL
    data["overopt"]["points"] = [dict(p, system=EVIL) for p in data["overopt"]["points"]]
    text = render_report(data, folder).read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    page = Page(text)
    assert EVIL in page.table("paradigms")  # shown as text, tag and all
    assert f"{EVIL} (policy-gradient RL): ShapesEval 0.690" in page.text["summary"]
    assert EVIL in page.text["notes"] and EVIL in page.text["reproduce"] and EVIL in page.text["setup"]


def test_setup_shows_the_reward_model_beside_the_ceiling(page):
    stages = page.table("setup", 0)
    assert stages["preferences"]["time"] == "1 min 20 s"
    assert stages["preferences"]["figures"] == "pairs = 300, ties = 21, agreement = 0.741, rater = n/a"
    assert stages["reward model"]["figures"] == (
        "held_out_accuracy = 0.61, held_out_ci95 = [0.55, 0.67], ceiling = 0.74, pairs = 270"
    )
    accuracy = page.table("setup", 1)
    column = "agreement with held-out rater labels"
    assert accuracy["reward model: held-out accuracy"][column] == "0.610 [0.550, 0.670]"
    assert accuracy["raters' ceiling (two raters agree)"][column] == "0.740"
    assert page.table("setup", 2)["fk"]["evaluation time"] == "13.0 s"


def test_setup_without_a_reward_model_says_so(report):
    data, folder = report
    data["setup"] = data["setup"][:1]
    assert "No reward model was trained in the setup" in _render(data, folder).text["setup"]


def test_notes_and_commands(page):
    assert "policy-gradient RL (grpo)samples whole trajectories per update" in page.text["notes"]
    assert "DPO family (dpo)offline pairs" in page.text["notes"]
    assert (
        "diffalign demo --out demo_out\ndiffalign report runs/grpo --out demo_out" in page.text["reproduce"]
    )


def _colour_pixels(image: Image.Image, rgb: tuple[int, int, int]) -> int:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) < 12).sum())


TAB_BLUE, TAB_ORANGE, TAB_GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)  # matplotlib's C0, C1, C2


def _section_image(page: Page, section: str) -> Image.Image:
    (src,) = [attrs["src"] for where, attrs in page.images if where == section]
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_curves_plot_every_system_with_curves_in_its_colour(page):
    image = _section_image(page, "curves")
    assert image.size == (3 * 460, 340)  # reward, gold and KL panels
    assert _colour_pixels(image, TAB_ORANGE) > 50  # grpo (systems[1])
    assert _colour_pixels(image, TAB_GREEN) > 50  # dpo (systems[2])
    assert _colour_pixels(image, TAB_BLUE) == 0  # base (systems[0]) has no curves
    assert page.captions["curves"] == [
        "Training curves of grpo, dpo: training reward (reward_mean), gold reward (gold_mean), "
        "KL to the base model (kl_to_base)."
    ]


def test_a_curve_without_plotted_metrics_is_named_not_drawn(report):
    data, folder = report
    data["systems"][3].update(curves=[{"step": 1, "loss": 0.3}], curve_x="step")
    page = _render(data, folder)
    assert page.captions["curves"][0].startswith("Training curves of grpo, dpo: ")
    assert "fk: the training log holds none of reward_mean, gold_mean, kl_to_base." in page.text["curves"]
    assert _colour_pixels(_section_image(page, "curves"), (214, 39, 40)) == 0  # C3, fk's colour


def test_curves_without_kl_have_two_panels(report):
    data, folder = report
    for point in data["systems"][1]["curves"]:
        del point["kl_to_base"]
    assert _section_image(_render(data, folder), "curves").size == (2 * 460, 340)


def test_no_curves_and_no_overopt_are_said_in_text(report):
    data, folder = report
    for system in data["systems"]:
        system["curves"] = []
    data["overopt"] = None
    page = _render(data, folder)
    assert [section for section, _ in page.images if section in ("curves", "overopt")] == []
    assert "No system has training curves" in page.text["curves"]
    assert "no system logged its KL to the base model" in page.text["overopt"]


def test_overopt_null_with_kl_curves_says_it_was_not_run(report):
    data, folder = report
    data["overopt"] = None
    assert (
        "the over-optimisation analysis was not run for this report" in _render(data, folder).text["overopt"]
    )


def test_overopt_plots_proxy_and_gold_with_the_note(page):
    image = _section_image(page, "overopt")
    assert image.size == (2 * 460, 340)
    assert _colour_pixels(image, TAB_ORANGE) > 50  # grpo's colour, as in the curves
    assert "gold keeps rising with the proxy over this short run" in page.text["overopt"]


def test_line_panels_draws_in_memory_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    panel = Panel("t", "x", "y", [Series("a", [0.0, 1.0, 2.0], [0.0, 1.0, float("nan")], colour="C0")])
    image = line_panels([panel, Panel("empty", "x", "y")])
    assert image.size == (920, 340) and image.mode == "RGB"
    assert _colour_pixels(image, TAB_BLUE) > 20
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="series 'a' of panel 't': 3 x values but 2 y values"):
        line_panels([Panel("t", "x", "y", [Series("a", [0.0, 1.0, 2.0], [0.0, 1.0])])])
    with pytest.raises(ValueError, match="at least one panel"):
        line_panels([])


def test_log_axis_ticks_are_thinned_where_labels_would_overlap():
    from diffalign.demo.plots import _spread_ticks

    assert _spread_ticks([80, 240, 256, 480, 2048, 2816, 3840]) == [80, 240, 480, 2048, 3840]
    assert _spread_ticks([500, 2000, 8000]) == [500, 2000, 8000]
    assert _spread_ticks([]) == []


def test_line_panels_band_and_reference_lines():
    band_blue = (221, 235, 244)  # C0 at alpha 0.15 over white
    plain = Panel("t", "x", "y", [Series("a", [1.0, 10.0, 100.0], [0.5, 0.6, 0.55], colour="C0")])
    assert _colour_pixels(line_panels([plain]), band_blue) < 500  # only the line's anti-aliased edges
    banded = Panel(
        "t",
        "x",
        "y",
        [Series("a", [1.0, 10.0, 100.0], [0.5, 0.6, 0.55], colour="C0", lower=[0.4] * 3, upper=[0.7] * 3)],
        references=[(0.65, "target")],
        xscale="log",
    )
    assert _colour_pixels(line_panels([banded]), band_blue) > 20_000  # the band between 0.4 and 0.7
    # one point has no band to shade: its interval is an error bar in the line's colour
    point = Panel("t", "x", "y", [Series("a", [10.0], [0.55], colour="C0", marker="o")], xscale="log")
    interval = Series("a", [10.0], [0.55], colour="C0", marker="o", lower=[0.2], upper=[0.9])
    single = Panel("t", "x", "y", [interval], xscale="log")
    assert (
        _colour_pixels(line_panels([single]), TAB_BLUE) > _colour_pixels(line_panels([point]), TAB_BLUE) + 100
    )
    with pytest.raises(ValueError, match="series 'a' of panel 't': lower without upper"):
        line_panels([Panel("t", "x", "y", [Series("a", [0.0], [0.0], lower=[0.0])])])
    with pytest.raises(ValueError, match="series 'a' of panel 't': 1 upper values for 2 points"):
        line_panels([Panel("t", "x", "y", [Series("a", [0.0, 1.0], [0.0, 1.0], lower=[0, 0], upper=[1])])])


def test_render_does_not_change_the_data(report):
    data, folder = report
    before = copy.deepcopy(data)
    render_html(data, folder)
    assert data == before
