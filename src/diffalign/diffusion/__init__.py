"""Diffusion maths: noise schedules, pure sampler steps with log-probs, and the sampling loop.

This package imports nothing else of diffalign except `diffalign.diffusion.protocol`.
"""

from diffalign.diffusion.protocol import PREDICTION_TYPES, Conditioning, DiffusionModel, PredictionType
from diffalign.diffusion.sampling import (
    SAMPLERS,
    Callback,
    SamplerConfig,
    StepInfo,
    Trajectory,
    guided_predict,
    recompute_step,
    sample,
    sampler_step,
)
from diffalign.diffusion.schedules import (
    DDPMSchedule,
    FlowSchedule,
    broadcast_time,
    compute_dtype,
    predict_x0_and_eps,
    training_target,
)
from diffalign.diffusion.steps import (
    StepOutput,
    ddim_step,
    ddpm_step,
    flow_euler_step,
    flow_sde_step,
    gaussian_log_prob,
    step_log_prob,
)

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "Callback",
    "Conditioning",
    "DDPMSchedule",
    "DiffusionModel",
    "FlowSchedule",
    "PredictionType",
    "SamplerConfig",
    "StepInfo",
    "StepOutput",
    "Trajectory",
    "broadcast_time",
    "compute_dtype",
    "ddim_step",
    "ddpm_step",
    "flow_euler_step",
    "flow_sde_step",
    "gaussian_log_prob",
    "guided_predict",
    "predict_x0_and_eps",
    "recompute_step",
    "sample",
    "sampler_step",
    "step_log_prob",
    "training_target",
]
