"""Diffusion-model utilities: noise (beta) schedules with the semantics of diffusers'
DDPMScheduler / DDIMScheduler constructors (computed in float64, returned as float32),
the DDPM and DDIM sampler steps as fused kernels, and DDPMScheduler / DDIMScheduler
classes that stand in for diffusers' own. The noising ops themselves are
dlcv_fast.add_noise and dlcv_fast.get_velocity."""

from dlcv_fast.diffusion.schedulers import TIMESTEP_SPACINGS, DDIMScheduler, DDPMScheduler
from dlcv_fast.diffusion.schedules import (
    BETA_SCHEDULES,
    alphas_cumprod_from_betas,
    make_betas,
    rescale_zero_terminal_snr,
)
from dlcv_fast.diffusion.steps import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    SchedulerStepOutput,
    ddim_step,
    ddpm_step,
)

__all__ = [
    "BETA_SCHEDULES",
    "DDIMScheduler",
    "DDPMScheduler",
    "TIMESTEP_SPACINGS",
    "PREDICTION_TYPES",
    "SchedulerStepOutput",
    "VARIANCE_TYPES",
    "alphas_cumprod_from_betas",
    "ddim_step",
    "ddpm_step",
    "make_betas",
    "rescale_zero_terminal_snr",
]
