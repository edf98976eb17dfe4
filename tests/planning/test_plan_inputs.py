"""`diffalign plan` refuses figures it cannot project (not numbers, overflowing) and outputs it cannot
write, with the option named and before anything is measured."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.planning.measure import StepCost
from diffalign.planning.projection import RunShape, project


@pytest.mark.parametrize(
    "seconds, fixed", [(math.nan, 0.0), (math.inf, 0.0), (1.0, math.nan), (1.0, math.inf)]
)
def test_figures_given_by_hand_must_be_numbers(seconds, fixed):
    with pytest.raises(ValueError, match="seconds per step"):
        StepCost.given("draft", seconds, fixed)


@pytest.mark.parametrize("field", ["price_per_device_hour", "price_per_label"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_prices_must_be_numbers(field, value):
    with pytest.raises(ValueError, match=field):
        project(StepCost.given("draft", 1.0), RunShape(steps=5, **{field: value}))


def test_a_projection_that_overflows_is_refused():
    with pytest.raises(ValueError, match=r"overflows.*wall time"):
        project(StepCost.given("draft", 1e308), RunShape(steps=1_000_000))


def _plan(*args: str):
    return CliRunner().invoke(app, ["plan", "draft", *args])


def test_the_command_refuses_what_it_cannot_project_or_write(tmp_path):
    result = _plan("--seconds-per-step", "nan", "steps=10")
    assert result.exit_code == 2 and "seconds per step" in result.output
    result = _plan("--seconds-per-step", "1", "--json", str(tmp_path), "steps=10")
    assert result.exit_code == 2 and "--json" in result.output and "folder" in result.output
    (tmp_path / "file").write_text("x")
    result = _plan("--seconds-per-step", "1", "--json", str(tmp_path / "file" / "plan.json"), "steps=10")
    assert result.exit_code == 2 and "is a file" in result.output
    # the order of the measuring runs is checked before the reward is loaded or a step is run
    result = _plan("--measure", "--measure-steps", "3,1", "--reward", "no-such-reward", "steps=10")
    assert result.exit_code == 2 and "--measure-steps" in result.output, result.output
