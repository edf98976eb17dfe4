"""A reward model on its own device (`rewards.placement`)."""

from __future__ import annotations

import pytest
import torch

from diffalign.align.backprop_config import BackpropConfig
from diffalign.align.pg_config import PGConfig
from diffalign.rewards.placement import OnDevice, check_reward_device, place_reward


class Brightness:
    name = "brightness"
    differentiable = True

    def __init__(self) -> None:
        self.devices = []

    def __call__(self, images, prompts):
        self.devices.append(images.device)
        return images.mean(dim=(1, 2, 3)) * 2.0


def _devices():
    yield "cpu"
    if torch.cuda.is_available():
        yield "cuda"


@pytest.mark.parametrize("device", list(_devices()))
def test_on_device_moves_images_there_and_rewards_back_with_gradients(device):
    inner = Brightness()
    reward = OnDevice(inner, device)
    assert reward.name == "brightness" and reward.differentiable
    images = torch.rand(3, 3, 4, 4, requires_grad=True)
    out = reward(images, ["a"] * 3)
    assert [d.type for d in inner.devices] == [torch.device(device).type]
    assert out.device == images.device
    out.sum().backward()
    # d(2 * mean)/d pixel = 2 / (3 * 4 * 4) for every pixel
    assert torch.allclose(images.grad, torch.full_like(images, 2.0 / 48))


def test_place_reward_loads_on_the_reward_device_and_keeps_a_given_reward():
    given = Brightness()
    assert place_reward("shapes:faithfulness", given, torch.device("cpu"), "cuda:3") is given
    same = place_reward("shapes:faithfulness", None, torch.device("cpu"), "cpu")
    assert not isinstance(same, OnDevice) and same.name
    default = place_reward("shapes:faithfulness", None, torch.device("cpu"), None)
    assert not isinstance(default, OnDevice)


def test_a_bad_reward_device_is_refused_by_name():
    check_reward_device(None)
    check_reward_device("cuda:1")
    with pytest.raises(ValueError, match="reward_device"):
        check_reward_device("tpu")
    with pytest.raises(ValueError, match="reward_device"):
        PGConfig(reward_device="nowhere")
    with pytest.raises(ValueError, match="reward_device"):
        BackpropConfig(reward="x", reward_device="mps")
