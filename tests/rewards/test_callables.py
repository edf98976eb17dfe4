"""User rewards given as `path/to/file.py:name` or `package.module:name`."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from diffalign.rewards import FunctionReward, Reward, RewardOutputError
from diffalign.rewards.callables import _split, load_callable_reward

REWARD_FILE = """
import torch


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def redness(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


redness.differentiable = True
redness.name = "red"


class PromptLength:
    differentiable = False

    def __init__(self):
        self.scale = 2.0

    def __call__(self, images, prompts):
        return [self.scale * len(p) for p in prompts]


scorer = PromptLength()
THRESHOLD = 0.5


def wrong_shape(images, prompts):
    return torch.zeros(len(prompts), 2)


def not_finite(images, prompts):
    return torch.full((len(prompts),), float("nan"))


class NeedsArgs:
    def __init__(self, weights):
        self.weights = weights

    def __call__(self, images, prompts):
        return torch.zeros(len(prompts))
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    return path


@pytest.fixture
def reward_package(tmp_path, monkeypatch):
    """A package `userpkg.scores` importable through sys.path."""
    root = tmp_path / "site"
    (root / "userpkg").mkdir(parents=True)
    (root / "userpkg" / "__init__.py").write_text("")
    (root / "userpkg" / "scores.py").write_text(REWARD_FILE)
    (root / "userpkg" / "broken.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(root))
    yield "userpkg.scores"
    for name in [n for n in sys.modules if n == "userpkg" or n.startswith("userpkg.")]:
        del sys.modules[name]


IMAGES = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a", "bb", "ccc"]


def test_function_from_file(reward_file):
    reward = load_callable_reward(f"{reward_file}:brightness")
    assert isinstance(reward, FunctionReward) and isinstance(reward, Reward)
    assert reward.name == "brightness" and not reward.differentiable
    assert torch.allclose(reward(IMAGES, PROMPTS), IMAGES.mean(dim=(1, 2, 3)))


def test_differentiable_and_name_attributes_are_honoured(reward_file):
    reward = load_callable_reward(f"{reward_file}:redness")
    assert reward.differentiable and reward.name == "red"
    images = IMAGES.clone().requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    assert images.grad[:, 0].abs().sum() > 0 and images.grad[:, 1:].abs().sum() == 0
    override = load_callable_reward(f"{reward_file}:redness", name="r2", differentiable=False)
    assert override.name == "r2" and not override.differentiable


def test_callable_object_and_class(reward_file):
    obj = load_callable_reward(f"{reward_file}:scorer")
    assert obj.name == "scorer" and not obj.differentiable
    assert torch.allclose(obj(IMAGES, PROMPTS), torch.tensor([2.0, 4.0, 6.0]))
    cls = load_callable_reward(f"{reward_file}:PromptLength")  # instantiated with no arguments
    assert torch.allclose(cls(IMAGES, PROMPTS), torch.tensor([2.0, 4.0, 6.0]))
    method = load_callable_reward(f"{reward_file}:scorer.__call__")
    assert torch.allclose(method(IMAGES, PROMPTS), torch.tensor([2.0, 4.0, 6.0]))


def test_file_is_imported_under_a_unique_name(reward_file, tmp_path):
    other = tmp_path / "other" / "my_rewards.py"
    other.parent.mkdir()
    other.write_text("def brightness(images, prompts):\n    return images.mean(dim=(1, 2, 3)) * 0\n")
    first = load_callable_reward(f"{reward_file}:brightness")
    second = load_callable_reward(f"{other}:brightness")
    assert first.fn.__module__ != second.fn.__module__
    assert first.fn.__module__ in sys.modules and "my_rewards" not in sys.modules
    assert torch.all(second(IMAGES, PROMPTS) == 0) and torch.all(first(IMAGES, PROMPTS) > 0)


def test_function_from_module(reward_package):
    reward = load_callable_reward(f"{reward_package}:brightness")
    assert torch.allclose(reward(IMAGES, PROMPTS), IMAGES.mean(dim=(1, 2, 3)))
    assert load_callable_reward(f"{reward_package}:redness").differentiable


def test_outputs_are_checked(reward_file):
    with pytest.raises(RewardOutputError, match="one number per image"):
        load_callable_reward(f"{reward_file}:wrong_shape")(IMAGES, PROMPTS)
    with pytest.raises(RewardOutputError, match="non-finite"):
        load_callable_reward(f"{reward_file}:not_finite")(IMAGES, PROMPTS)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        load_callable_reward(f"{reward_file}:brightness")(IMAGES, PROMPTS[:2])


@pytest.mark.parametrize("spec", ["my_rewards.py", "userpkg.scores", "x.py:", ":brightness", "m:not-a-name"])
def test_bad_spec_format(spec):
    with pytest.raises(ValueError, match="reward spec"):
        load_callable_reward(spec)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "reward.py"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_callable_reward(f"{missing}:fn")


def test_file_that_fails_to_execute(tmp_path):
    bad = tmp_path / "bad_syntax.py"
    bad.write_text("def f(:\n")
    with pytest.raises(ImportError, match=r"bad_syntax\.py.*SyntaxError"):
        load_callable_reward(f"{bad}:f")
    raising = tmp_path / "raising.py"
    raising.write_text("raise RuntimeError('no weights here')\n")
    with pytest.raises(ImportError, match="no weights here"):
        load_callable_reward(f"{raising}:f")
    assert not any("raising" in name for name in sys.modules)


def test_module_not_importable_shows_the_cause(reward_package):
    with pytest.raises(ImportError, match="not_a_real_package_xyz"):
        load_callable_reward("not_a_real_package_xyz.rewards:fn")
    with pytest.raises(ImportError, match="not_a_real_dependency_xyz"):
        load_callable_reward("userpkg.broken:fn")


def test_missing_attribute_lists_callables(reward_file):
    with pytest.raises(AttributeError, match="brightnes") as info:
        load_callable_reward(f"{reward_file}:brightnes")
    message = str(info.value)
    for name in ("brightness", "redness", "scorer", "PromptLength"):
        assert name in message
    assert "torch" not in message.split("callables:")[1]  # imported names are not offered


def test_not_callable_and_class_needing_arguments(reward_file):
    with pytest.raises(TypeError, match=r"THRESHOLD.*float"):
        load_callable_reward(f"{reward_file}:THRESHOLD")
    with pytest.raises(TypeError, match="no arguments"):
        load_callable_reward(f"{reward_file}:NeedsArgs")


def test_relative_path_and_windows_drive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.py").write_text(textwrap.dedent(REWARD_FILE))
    assert load_callable_reward("./r.py:brightness").name == "brightness"
    assert _split(r"C:\work\r.py:brightness") == (r"C:\work\r.py", "brightness")  # the last colon splits


OUTPUTS_FILE = """
import numpy as np
import torch


def half(images, prompts):
    return images.mean(dim=(1, 2, 3)).half()


def double(images, prompts):
    return images.mean(dim=(1, 2, 3)).double()


def one_number(images, prompts):
    return 0.25


def tensors(images, prompts):
    return [image.mean() for image in images]


tensors.differentiable = True


def three(images, prompts):
    return torch.zeros(3)


def nan_at_2(images, prompts):
    out = np.zeros(len(prompts))
    out[2] = np.nan
    return out


def complex_values(images, prompts):
    return torch.zeros(len(prompts), dtype=torch.complex64)


def words(images, prompts):
    return ["0.5"] * len(prompts)


def images_only(images):
    return images.mean(dim=(1, 2, 3))


def keyword_prompts(images, *, prompts):
    return images.mean(dim=(1, 2, 3))


def fails(images, prompts):
    raise KeyError("no score for this image")
"""


@pytest.fixture
def outputs_file(tmp_path):
    path = tmp_path / "outputs.py"
    path.write_text(OUTPUTS_FILE)
    return path


def test_outputs_become_float32_and_keep_gradients(outputs_file):
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a", "b", "c", "d"]
    for name in ("half", "double"):
        out = load_callable_reward(f"{outputs_file}:{name}")(images, prompts)
        assert out.dtype == torch.float32 and out.shape == (4,), name
    one = load_callable_reward(f"{outputs_file}:one_number")(images[:1], prompts[:1])  # a batch of one
    assert one.dtype == torch.float32 and one.tolist() == [0.25]
    leaf = images.clone().requires_grad_(True)
    out = load_callable_reward(f"{outputs_file}:tensors")(leaf, prompts)  # a list of 0-d tensors
    assert torch.allclose(out, images.mean(dim=(1, 2, 3)))
    out.sum().backward()
    assert leaf.grad is not None and torch.allclose(leaf.grad, torch.full_like(leaf, 1 / (3 * 8 * 8)))


def test_bad_outputs_say_what_is_wrong_and_name_the_spec(outputs_file):
    images, prompts = torch.rand(4, 3, 8, 8), ["a", "b", "c", "d"]
    cases = {
        "three": r"returned 3 values for 4 images",
        "one_number": r"returned a single number for 4 images",
        "nan_at_2": r"NaN for image 2\b",
        "complex_values": r"complex",
        "words": r"strings, not numbers",
    }
    for name, message in cases.items():
        with pytest.raises(RewardOutputError, match=message) as info:
            load_callable_reward(f"{outputs_file}:{name}")(images, prompts)
        assert f"{outputs_file}:{name}" in str(info.value), name


def test_images_only_function_and_a_signature_that_fits_nothing(outputs_file):
    images = torch.rand(2, 3, 8, 8)
    reward = load_callable_reward(f"{outputs_file}:images_only")
    assert torch.allclose(reward(images, ["a", "b"]), images.mean(dim=(1, 2, 3)))
    with pytest.raises(TypeError, match=r"keyword_prompts.*cannot be called as \(images, prompts\)"):
        load_callable_reward(f"{outputs_file}:keyword_prompts")  # refused when loaded, not when first called


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_an_exception_in_the_reward_says_which_reward_raised_it(outputs_file):
    reward = load_callable_reward(f"{outputs_file}:fails")
    with pytest.raises(KeyError, match="no score") as info:
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])
    assert any(f"{outputs_file}:fails" in note for note in info.value.__notes__)
