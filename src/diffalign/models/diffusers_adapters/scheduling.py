"""A diffusers scheduler's configuration -> our `DDPMSchedule` or `FlowSchedule`.

The adapters sample with `diffalign.diffusion.sampling`, not with the pipeline's scheduler, so only
the training-time noise schedule is read from the scheduler: the betas (hence alphas_cumprod) of a
DDPM-family scheduler, or the time shift of `FlowMatchEulerDiscreteScheduler`. Options that change
the schedule in a way our schedules cannot express are refused with an error naming the option
(never silently dropped).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from diffalign.diffusion.schedules import BETA_SCHEDULES, DDPMSchedule, FlowSchedule

#: Scheduler classes whose config describes a rectified flow (x_t = (1 - t) x0 + t eps).
FLOW_SCHEDULERS: tuple[str, ...] = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


class UnsupportedScheduleError(ValueError):
    """A scheduler option that `DDPMSchedule` / `FlowSchedule` cannot represent."""


def is_flow_scheduler(class_name: str) -> bool:
    """Whether a scheduler class (by name) belongs to the flow-matching family."""
    return class_name in FLOW_SCHEDULERS


def prediction_type_of(class_name: str, config: Mapping) -> str:
    """The model's prediction type: "flow" for flow-matching schedulers, else the config's
    `prediction_type` ("epsilon" or "v_prediction"; "sample" is refused)."""
    if is_flow_scheduler(class_name):
        return "flow"
    kind = config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise UnsupportedScheduleError(
            f"{class_name}: prediction_type {kind!r} is not supported (epsilon or v_prediction)"
        )
    return kind


def ddpm_schedule_from_config(class_name: str, config: Mapping) -> DDPMSchedule:
    """The DDPM schedule of a DDIM/DDPM/Euler/... scheduler config (Ho et al. 2020, eq. 4 betas)."""
    if config.get("trained_betas") is not None:
        raise UnsupportedScheduleError(
            f"{class_name}: trained_betas (an explicit beta table) is not supported"
        )
    if config.get("rescale_betas_zero_snr"):
        raise UnsupportedScheduleError(
            f"{class_name}: rescale_betas_zero_snr=True (Lin et al. 2024) is not supported by DDPMSchedule"
        )
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise UnsupportedScheduleError(
            f"{class_name}: beta_schedule {beta_schedule!r} is not supported (one of {BETA_SCHEDULES})"
        )
    return DDPMSchedule(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 1e-4)),
        beta_end=float(config.get("beta_end", 0.02)),
        beta_schedule=beta_schedule,
        steps_offset=int(config.get("steps_offset", 0)),
    )


def flow_schedule_from_config(class_name: str, config: Mapping, image_seq_len: int) -> FlowSchedule:
    """The flow schedule of a `FlowMatchEulerDiscreteScheduler` config.

    A static `shift` maps directly (SD3: t' = shift t / (1 + (shift - 1) t), Esser et al. 2024). With
    `use_dynamic_shifting` and the exponential time shift, diffusers shifts by
    exp(mu) t / (1 + (exp(mu) - 1) t), mu interpolated linearly in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift); that is a static shift
    exp(mu) at this adapter's resolution (`image_seq_len` latent tokens).
    """
    for option in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if config.get(option):
            raise UnsupportedScheduleError(f"{class_name}: {option}=True is not supported by FlowSchedule")
    if config.get("shift_terminal"):
        raise UnsupportedScheduleError(f"{class_name}: shift_terminal is not supported by FlowSchedule")
    if not config.get("use_dynamic_shifting"):
        return FlowSchedule(shift=float(config.get("shift", 1.0)))
    if config.get("time_shift_type", "exponential") != "exponential":
        raise UnsupportedScheduleError(
            f"{class_name}: time_shift_type {config.get('time_shift_type')!r} is not supported (exponential)"
        )
    base_len, max_len = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
    base_shift, max_shift = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = base_shift + slope * (image_seq_len - base_len)
    return FlowSchedule(shift=math.exp(mu))


def schedule_from_scheduler(
    class_name: str, config: Mapping, image_seq_len: int
) -> tuple[str, DDPMSchedule | FlowSchedule]:
    """(prediction_type, schedule) for a pipeline's scheduler (class name and config)."""
    prediction_type = prediction_type_of(class_name, config)
    if prediction_type == "flow":
        return prediction_type, flow_schedule_from_config(class_name, config, image_seq_len)
    return prediction_type, ddpm_schedule_from_config(class_name, config)
