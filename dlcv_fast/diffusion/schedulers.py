"""DDPMScheduler and DDIMScheduler: drop-ins for the diffusers classes of the same names
(constructor arguments and defaults, set_timesteps, step, add_noise, get_velocity,
scale_model_input, init_noise_sigma, timesteps, alphas_cumprod), running the fused
kernels of dlcv_fast for noising and for each step.

One difference, on purpose: diffusers' DDIMScheduler.step takes the previous timestep as
t - num_train_timesteps // num_inference_steps, which with "linspace" and "trailing"
spacing is not the next timestep of the schedule (the last step can even skip t = 0 or
land between schedule points). Here both schedulers step to the next timestep of
self.timesteps (and past the last one to "before t = 0"); with "leading" spacing, the
default, that is the same timestep diffusers uses. A step from a timestep that is not in
the schedule takes diffusers' rule.

Like diffusers' ConfigMixin, ``scheduler.config`` holds the constructor's arguments
(``config.num_train_timesteps``, ``config["prediction_type"]``) and ``from_config`` builds
a scheduler from such a mapping, ignoring the keys it does not take (so a diffusers
scheduler's config, or the other class's, works).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from dlcv_fast.diffusion.schedules import alphas_cumprod_from_betas, make_betas
from dlcv_fast.diffusion.steps import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    Generators,
    _integer,
    SchedulerStepOutput,
    ddim_step,
    ddpm_step,
)
from dlcv_fast.ops.noise import add_noise, get_velocity

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


class SchedulerConfig(dict):
    """The constructor's arguments, read-only, by key or by attribute (diffusers'
    ``scheduler.config``)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the scheduler's config has no {name!r}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("a scheduler's config is read-only: build a new scheduler with "
                        "from_config(config, name=value)")

    __setattr__ = __setitem__ = __delitem__ = __ior__ = _read_only
    update = pop = popitem = setdefault = clear = _read_only

    def __reduce__(self):  # copies and pickles are built whole, not key by key
        return SchedulerConfig, (dict(self),)


class _Scheduler:
    """What the two schedulers share: the schedule, the timesteps, noising, the config."""

    order = 1
    init_noise_sigma = 1.0  # the initial noise is standard normal

    @classmethod
    def from_config(cls, config: Mapping, **kwargs):
        """A scheduler built from ``config`` (a mapping, e.g. another scheduler's
        ``config``), its keys overridden by ``kwargs``; keys of ``config`` the constructor
        does not take are ignored, a keyword it does not take is an error."""
        params = inspect.signature(cls.__init__).parameters
        unknown = sorted(k for k in kwargs if k not in params or k == "self")
        if unknown:
            raise TypeError(f"{cls.__name__}.from_config: unexpected keyword arguments "
                            f"{unknown}")
        args = {k: v for k, v in dict(config).items() if k in params and k != "self"}
        return cls(**{**args, **kwargs})

    def _register_config(self, arguments: dict) -> None:
        params = inspect.signature(type(self).__init__).parameters
        self.config = SchedulerConfig({k: arguments[k] for k in params if k != "self"})

    def __init__(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                 prediction_type, clip_sample, clip_sample_range, thresholding,
                 dynamic_thresholding_ratio, sample_max_value, timestep_spacing, steps_offset,
                 rescale_betas_zero_snr):
        steps_offset = _integer("steps_offset", steps_offset)
        if steps_offset < 0:
            raise ValueError(f"steps_offset must be non-negative, but got {steps_offset}")
        if thresholding and not sample_max_value > 0:
            raise ValueError(f"sample_max_value must be positive, but got {sample_max_value}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, but got "
                             f"{prediction_type!r}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, but got "
                             f"{timestep_spacing!r}")
        if trained_betas is not None and num_train_timesteps == 1000:
            num_train_timesteps = None  # diffusers' default: the length of trained_betas
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule,
                           trained_betas, rescale_betas_zero_snr, dtype=torch.float64)
        self.betas = betas.float()
        self.alphas = 1.0 - self.betas
        # From the float64 betas: the cosine schedule's float32 betas would put a relative
        # error of 1e-5 into its late alpha_bar (diffusers takes the float32 ones).
        self.alphas_cumprod = alphas_cumprod_from_betas(betas)
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
        self.one = torch.tensor(1.0)
        # device -> (alphas_cumprod, its version, its copy there): a reassigned or edited
        # alphas_cumprod (alphas_cumprod[-1] = 2**-24, say) is copied again.
        self._tables: dict[torch.device, tuple[Tensor, int, Tensor]] = {}

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
            if steps[0] + self.steps_offset >= T:
                raise ValueError(f"steps_offset {self.steps_offset} puts the first of "
                                 f"{n} timesteps at {steps[0] + self.steps_offset}, past "
                                 f"num_train_timesteps - 1 = {T - 1}")
            return steps + self.steps_offset
        # trailing: diffusers' values, but n of them: np.arange(T, 0, -T / n) has n + 1 for some
        # n (61 of T = 1000), from rounding in its length, and the last one would be -1.
        return np.round(np.arange(T, 0, -T / n))[:n].astype(np.int64) - 1

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None):
        """The descending timesteps of an n-step sampling run, spaced as
        ``timestep_spacing`` says (with ``steps_offset`` for "leading")."""
        n = _integer("num_inference_steps", num_inference_steps)
        self.timesteps = torch.from_numpy(self._spaced_timesteps(n)).to(device)
        self.num_inference_steps = n

    def previous_timestep(self, timestep) -> int:
        """The timestep a step from ``timestep`` lands on: the next one of self.timesteps, -1
        after the last (before t = 0), timestep - 1 before set_timesteps, and diffusers'
        timestep - num_train_timesteps // num_inference_steps from a timestep that is not in
        an evenly spaced schedule."""
        t = _integer("timestep", timestep)
        custom = getattr(self, "custom_timesteps", False)
        if self.num_inference_steps is None and not custom:
            return t - 1
        where = (self.timesteps.cpu() == t).nonzero()
        if where.numel() == 0:
            if custom:
                raise ValueError(f"timestep {t} is not one of the custom timesteps "
                                 f"{self.timesteps.tolist()}")
            return t - self.num_train_timesteps // self.num_inference_steps
        index = int(where[0, 0])
        return -1 if index == len(self.timesteps) - 1 else int(self.timesteps[index + 1])

    # --- noising --------------------------------------------------------------------------

    def _table(self, device: torch.device) -> Tensor:
        src = self.alphas_cumprod
        cached = self._tables.get(device)
        if cached is None or cached[0] is not src or cached[1] != src._version:
            cached = self._tables[device] = (src, src._version, src.to(device))
        return cached[2]

    @staticmethod
    def _per_sample(timesteps, x: Tensor) -> Tensor:
        """timesteps on x's device, flattened: like diffusers, any shape holding one timestep
        per sample, or a single one for all (add_noise reads a one-element tensor as that)."""
        t = torch.as_tensor(timesteps, device=x.device)
        return t.flatten() if t.dim() > 1 else t

    def _noising_args(self, x: Tensor, noise: Tensor, timesteps) -> tuple:
        """As diffusers' formula takes them: noise that broadcasts to the samples, the two in
        their promoted dtype, timesteps and the table on the samples' device."""
        if not isinstance(x, Tensor) or not isinstance(noise, Tensor):
            raise TypeError(f"the samples and noise must be Tensors, but got "
                            f"{type(x).__name__} and {type(noise).__name__}")
        if noise.dtype != x.dtype and noise.is_floating_point() and x.is_floating_point():
            dtype = torch.promote_types(x.dtype, noise.dtype)
            x, noise = x.to(dtype), noise.to(dtype)
        if noise.shape != x.shape and torch.broadcast_shapes(noise.shape, x.shape) == x.shape:
            noise = noise.expand(x.shape)
        return x, noise, self._per_sample(timesteps, x), self._table(x.device)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """sqrt(a_t) x0 + sqrt(1 - a_t) noise, per sample, in one fused pass."""
        return add_noise(*self._noising_args(original_samples, noise, timesteps))

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) sample, in one pass."""
        return get_velocity(*self._noising_args(sample, noise, timesteps))

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
        self._register_config(locals())
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
        steps = [_integer("timesteps", t) for t in timesteps]
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"custom timesteps must be strictly descending, but got {steps}")
        if not steps or steps[0] >= self.num_train_timesteps or steps[-1] < 0:
            raise ValueError(f"custom timesteps must lie in [0, {self.num_train_timesteps}), "
                             f"but got {steps}")
        self.custom_timesteps = True
        self.num_inference_steps = len(steps)
        self.timesteps = torch.tensor(steps, dtype=torch.int64, device=device)

    def step(self, model_output: Tensor, timestep, sample: Tensor,
             generator: Generators = None, return_dict: bool = True, *,
             variance_noise: Tensor | None = None):
        """One ancestral step from ``timestep`` to the previous timestep; the noise comes
        from ``generator`` or is given as ``variance_noise`` (not in diffusers)."""
        t = _integer("timestep", timestep)
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
        self._register_config(locals())
        super().__init__(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                         prediction_type, clip_sample, clip_sample_range, thresholding,
                         dynamic_thresholding_ratio, sample_max_value, timestep_spacing,
                         steps_offset, rescale_betas_zero_snr)
        # alpha_bar "before t = 0": 1 (a clean sample), or alpha_bar_0.
        self.final_alpha_cumprod = (torch.tensor(1.0) if set_alpha_to_one
                                    else self.alphas_cumprod[0].clone())

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Generators = None,
             variance_noise: Tensor | None = None, return_dict: bool = True):
        """One DDIM step from ``timestep`` to the next timestep of self.timesteps."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step")
        t = _integer("timestep", timestep)
        out = ddim_step(model_output, t, sample, self.alphas_cumprod,
                        prev_timestep=self.previous_timestep(t),
                        final_alpha_cumprod=float(self.final_alpha_cumprod), eta=eta,
                        use_clipped_model_output=use_clipped_model_output, generator=generator,
                        variance_noise=variance_noise, **self._clip_kwargs())
        return out if return_dict else (out.prev_sample, out.pred_original_sample)


__all__ = ["DDIMScheduler", "DDPMScheduler", "SchedulerConfig", "SchedulerStepOutput",
           "TIMESTEP_SPACINGS"]
