"""Rewards: the protocol, gold rewards of the Shapes world, learned and external reward models."""

from diffalign.rewards.protocol import (
    FunctionReward,
    NotDifferentiableError,
    Reward,
    RewardOutputError,
    as_reward,
    check_images,
    check_output,
    require_differentiable,
)
from diffalign.rewards.registry import RewardSpecError, load_reward

__all__ = [
    "FunctionReward",
    "NotDifferentiableError",
    "Reward",
    "RewardOutputError",
    "RewardSpecError",
    "as_reward",
    "check_images",
    "check_output",
    "load_reward",
    "require_differentiable",
]
