"""Discrete-time diffusion: schedules, prediction objectives, samplers and classifier-free guidance."""

from ldm.diffusion.guidance import cfg_denoiser, concat_conditions, model_denoiser
from ldm.diffusion.objectives import (
    OBJECTIVES,
    loss_weight,
    q_sample,
    sample_noise,
    to_eps,
    to_v,
    to_x0,
    training_target,
)
from ldm.diffusion.samplers import SAMPLERS, ddim, ddpm, dpmpp_2m, get_sampler, initial_noise
from ldm.diffusion.schedules import SCHEDULES, make_alphas_cumprod, make_betas, snr, spaced_timesteps

__all__ = [
    "OBJECTIVES",
    "SAMPLERS",
    "SCHEDULES",
    "cfg_denoiser",
    "concat_conditions",
    "ddim",
    "ddpm",
    "dpmpp_2m",
    "get_sampler",
    "initial_noise",
    "loss_weight",
    "make_alphas_cumprod",
    "make_betas",
    "model_denoiser",
    "q_sample",
    "sample_noise",
    "snr",
    "spaced_timesteps",
    "to_eps",
    "to_v",
    "to_x0",
    "training_target",
]
