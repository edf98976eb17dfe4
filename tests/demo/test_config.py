"""`diffalign demo --set`: a config that cannot run is refused, naming the field, before anything runs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from diffalign.cli import app
from diffalign.demo.config import DemoConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("grpo_lr", -1e-5),  # was accepted: the demo ran GRPO climbing its loss
        ("dpo_lr", 0.0),
        ("threads", -1),  # was refused together with rm_pretrain_steps, unnamed
        ("device", "tpu"),  # was a torch RuntimeError traceback once the demo started
    ],
)
def test_a_field_that_cannot_run_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        DemoConfig.quick(**{field: value}).check()


def test_the_command_refuses_it_with_exit_code_2_before_writing(tmp_path):
    for option in ("device=tpu", "grpo_lr=-1"):
        result = CliRunner().invoke(
            app, ["demo", "--quick", "--out", str(tmp_path / "demo"), "--set", option]
        )
        assert result.exit_code == 2, result.output
        assert option.split("=")[0] in result.output
    assert not (tmp_path / "demo").exists()
    DemoConfig.quick().check()  # the presets run
    DemoConfig().check()
