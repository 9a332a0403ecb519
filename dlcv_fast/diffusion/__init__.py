"""Diffusion-model utilities: noise (beta) schedules with the semantics of diffusers'
DDPMScheduler / DDIMScheduler constructors, computed in float64 and returned as float32."""

from dlcv_fast.diffusion.schedules import (
    BETA_SCHEDULES,
    alphas_cumprod_from_betas,
    make_betas,
    rescale_zero_terminal_snr,
)

__all__ = [
    "BETA_SCHEDULES",
    "alphas_cumprod_from_betas",
    "make_betas",
    "rescale_zero_terminal_snr",
]
