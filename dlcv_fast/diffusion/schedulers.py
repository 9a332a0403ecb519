"""DDPMScheduler and DDIMScheduler: drop-ins for the diffusers classes of the same names
(constructor arguments and defaults, set_timesteps, step, add_noise, get_velocity,
scale_model_input, init_noise_sigma, timesteps, alphas_cumprod), running the fused
kernels of dlcv_fast for noising and for each step.

One difference, on purpose: diffusers' DDIMScheduler.step takes the previous timestep as
t - num_train_timesteps // num_inference_steps, which with "linspace" and "trailing"
spacing is not the next timestep of the schedule (the last step can even skip t = 0 or
land between schedule points). Here both schedulers step to the next timestep of
self.timesteps (and past the last one to "before t = 0"); with "leading" spacing, the
default, that is the same timestep diffusers uses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dlcv_fast.diffusion.schedules import alphas_cumprod_from_betas, make_betas
from dlcv_fast.diffusion.steps import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    SchedulerStepOutput,
    ddim_step,
    ddpm_step,
)
from dlcv_fast.ops.noise import add_noise, get_velocity

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class _Scheduler:
    """What the two schedulers share: the schedule, the timesteps, noising."""

    order = 1
    init_noise_sigma = 1.0  # the initial noise is standard normal

    def __init__(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                 prediction_type, clip_sample, clip_sample_range, thresholding,
                 dynamic_thresholding_ratio, sample_max_value, timestep_spacing, steps_offset,
                 rescale_betas_zero_snr):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, but got "
                             f"{prediction_type!r}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, but got "
                             f"{timestep_spacing!r}")
        if trained_betas is not None and num_train_timesteps == 1000:
            num_train_timesteps = None  # diffusers' default: the length of trained_betas
        self.betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                trained_betas, rescale_betas_zero_snr)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas.double())
        self.num_train_timesteps = self.betas.shape[0]
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.thresholding = thresholding
        self.dynamic_thresholding_ratio = dynamic_thresholding_ratio
        self.sample_max_value = sample_max_value
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.num_inference_steps = None
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._tables: dict[torch.device, Tensor] = {}

    # --- timesteps --------------------------------------------------------------------------

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        if not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must lie in [1, {self.num_train_timesteps}] "
                             f"(num_train_timesteps), but got {n}")
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            steps = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64)
            return steps + self.steps_offset
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """The descending timesteps of an n-step sampling run, spaced as
        ``timestep_spacing`` says (with ``steps_offset`` for "leading")."""
        self.timesteps = torch.from_numpy(self._spaced_timesteps(int(num_inference_steps)))
        self.timesteps = self.timesteps.to(device)
        self.num_inference_steps = int(num_inference_steps)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep a step from ``timestep`` lands on: the next one of self.timesteps, -1
        after the last (before t = 0), or timestep - 1 before set_timesteps."""
        if self.num_inference_steps is None and not getattr(self, "custom_timesteps", False):
            return int(timestep) - 1
        where = (self.timesteps.cpu() == int(timestep)).nonzero()
        if where.numel() == 0:
            raise ValueError(f"timestep {int(timestep)} is not one of the scheduler's timesteps")
        index = int(where[0, 0])
        return -1 if index == len(self.timesteps) - 1 else int(self.timesteps[index + 1])

    # --- noising --------------------------------------------------------------------------

    def _table(self, device: torch.device) -> Tensor:
        if device not in self._tables:
            self._tables[device] = self.alphas_cumprod.to(device)
        return self._tables[device]

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """sqrt(a_t) x0 + sqrt(1 - a_t) noise, per sample, in one fused pass."""
        t = timesteps.to(original_samples.device)
        return add_noise(original_samples, noise, t, self._table(original_samples.device))

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) sample, in one pass."""
        t = timesteps.to(sample.device)
        return get_velocity(sample, noise, t, self._table(sample.device))

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        """The identity: these schedulers do not scale the model's input."""
        return sample

    def __len__(self) -> int:
        return self.num_train_timesteps

    def _clip_kwargs(self) -> dict:
        return dict(prediction_type=self.prediction_type, clip_sample=self.clip_sample,
                    clip_sample_range=self.clip_sample_range, thresholding=self.thresholding,
                    dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                    sample_max_value=self.sample_max_value)


def _as_int(timestep) -> int:
    return int(timestep.item() if isinstance(timestep, Tensor) else timestep)


class DDPMScheduler(_Scheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020): ancestral sampling, with
    the arguments and defaults of diffusers' DDPMScheduler."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas=None,
                 variance_type: str = "fixed_small", clip_sample: bool = True,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         prediction_type, clip_sample, clip_sample_range, thresholding,
                         dynamic_thresholding_ratio, sample_max_value, timestep_spacing,
                         steps_offset, rescale_betas_zero_snr)
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, but got "
                             f"{variance_type!r}")
        self.variance_type = variance_type
        self.custom_timesteps = False

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None,
                      timesteps: list[int] | None = None):
        """n evenly spaced timesteps, or custom ``timesteps`` (strictly descending, below
        num_train_timesteps); not both."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("set_timesteps takes exactly one of num_inference_steps and "
                             "timesteps")
        if timesteps is None:
            self.custom_timesteps = False
            return super().set_timesteps(num_inference_steps, device)
        steps = [int(t) for t in timesteps]
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"custom timesteps must be strictly descending, but got {steps}")
        if not steps or steps[0] >= self.num_train_timesteps or steps[-1] < 0:
            raise ValueError(f"custom timesteps must lie in [0, {self.num_train_timesteps}), "
                             f"but got {steps}")
        self.custom_timesteps = True
        self.num_inference_steps = len(steps)
        self.timesteps = torch.tensor(steps, dtype=torch.int64, device=device)

    def step(self, model_output: Tensor, timestep, sample: Tensor,
             generator: torch.Generator | None = None, variance_noise: Tensor | None = None,
             return_dict: bool = True):
        """One ancestral step from ``timestep`` to the previous timestep."""
        t = _as_int(timestep)
        out = ddpm_step(model_output, t, sample, self.alphas_cumprod,
                        prev_timestep=self.previous_timestep(t),
                        variance_type=self.variance_type, generator=generator,
                        variance_noise=variance_noise, **self._clip_kwargs())
        return out if return_dict else (out.prev_sample, out.pred_original_sample)


class DDIMScheduler(_Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021), with the arguments and
    defaults of diffusers' DDIMScheduler."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas=None,
                 clip_sample: bool = True, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         prediction_type, clip_sample, clip_sample_range, thresholding,
                         dynamic_thresholding_ratio, sample_max_value, timestep_spacing,
                         steps_offset, rescale_betas_zero_snr)
        # alpha_bar "before t = 0": 1 (a clean sample), or alpha_bar_0.
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: Tensor | None = None, return_dict: bool = True):
        """One DDIM step from ``timestep`` to the next timestep of self.timesteps."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step")
        t = _as_int(timestep)
        out = ddim_step(model_output, t, sample, self.alphas_cumprod,
                        prev_timestep=self.previous_timestep(t),
                        final_alpha_cumprod=self.final_alpha_cumprod, eta=eta,
                        use_clipped_model_output=use_clipped_model_output, generator=generator,
                        variance_noise=variance_noise, **self._clip_kwargs())
        return out if return_dict else (out.prev_sample, out.pred_original_sample)


__all__ = ["DDIMScheduler", "DDPMScheduler", "SchedulerStepOutput", "TIMESTEP_SPACINGS"]
