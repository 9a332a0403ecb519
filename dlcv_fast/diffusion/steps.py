"""The DDPM and DDIM sampler steps, each one fused elementwise pass (dlcv_fast.ops.
scheduler_step) whose scalar coefficients are computed here, in float64, from the
timestep, with the semantics of the diffusers library's DDPMScheduler.step and
DDIMScheduler.step.

Dynamic thresholding needs a per-sample quantile of |x0| first: that is one extra pass
(x0 in float32, then torch.quantile); every other option stays in the one pass.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
from torch import Tensor

from dlcv_fast.ops.scheduler_step import (
    CLIP_NONE,
    CLIP_RANGE,
    CLIP_THRESHOLD,
    VARIANCE_LEARNED,
    VARIANCE_LEARNED_RANGE,
    VARIANCE_SCALAR,
    scheduler_step,
)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                  "learned_range")


@dataclasses.dataclass
class SchedulerStepOutput:
    """What a step returns, as diffusers' scheduler outputs: the sample at the previous
    timestep and the predicted clean sample, by attribute, by name (``out["prev_sample"]``),
    by position (``out[0]``) or as ``out.to_tuple()``."""

    prev_sample: Tensor
    pred_original_sample: Tensor

    def to_tuple(self) -> tuple[Tensor, Tensor]:
        return self.prev_sample, self.pred_original_sample

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in ("prev_sample", "pred_original_sample"):
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


def _integer(name: str, value) -> int:
    """value as an int: an int, a NumPy integer, a whole float, or a one-element tensor of
    one (a timestep from ``scheduler.timesteps``); anything else raises."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be one number, but got a tensor of shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if float(value).is_integer():
            return int(value)
        raise ValueError(f"{name} must be a whole number, but got {value}")
    raise TypeError(f"{name} must be an integer, but got {type(value).__name__}")


def _table(alphas_cumprod) -> Tensor:
    """alphas_cumprod as a tensor; its coefficients are read on the host, so no gradient
    reaches it: one that requires grad is refused rather than left without one."""
    table = torch.as_tensor(alphas_cumprod)
    if table.requires_grad and torch.is_grad_enabled():
        raise ValueError("alphas_cumprod requires grad, but the steps compute no gradient for "
                         "it; pass alphas_cumprod.detach()")
    return table


def _alpha_bar(alphas_cumprod: Tensor, t: int) -> float:
    if not 0 <= t < alphas_cumprod.shape[0]:
        raise IndexError(f"timestep {t} is outside [0, {alphas_cumprod.shape[0]}) "
                         "(the length of alphas_cumprod)")
    return float(alphas_cumprod[t])


def _prediction(prediction_type: str, ab: float, t: int) -> tuple[float, float, float, float]:
    """(A, B, C, D): x0 = A s + B m and eps = C s + D m for model output m and sample s."""
    sa, sb = math.sqrt(ab), math.sqrt(1.0 - ab)
    if prediction_type == "epsilon":  # m = eps: x0 = (s - sb m) / sa
        if sa == 0.0:
            raise ValueError(f"prediction_type 'epsilon' cannot give the clean sample at "
                             f"timestep {t}, where alphas_cumprod is 0 (zero terminal SNR, "
                             "rescale_betas_zero_snr): use 'v_prediction' or 'sample'")
        return 1.0 / sa, -sb / sa, 0.0, 1.0
    if prediction_type == "sample":  # m = x0: eps = (s - sa m) / sb
        if sb == 0.0:
            raise ValueError(f"prediction_type 'sample' cannot give the noise at timestep {t}, "
                             "where alphas_cumprod is 1")
        return 0.0, 1.0, 1.0 / sb, -sa / sb
    if prediction_type == "v_prediction":  # m = v = sa eps - sb x0
        return sa, -sb, sb, sa
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, but got "
                     f"{prediction_type!r}")


def _clip(x0_coefficients, model_output, sample, clip_sample, clip_sample_range, thresholding,
          dynamic_thresholding_ratio, sample_max_value):
    """(clip mode, thresholds): diffusers thresholds when asked, else clips when asked."""
    if thresholding:
        if not 0.0 < dynamic_thresholding_ratio <= 1.0:
            raise ValueError("dynamic_thresholding_ratio must lie in (0, 1], but got "
                             f"{dynamic_thresholding_ratio}")
        if not sample_max_value > 0:  # the threshold divides the clipped sample
            raise ValueError(f"sample_max_value must be positive, but got {sample_max_value}")
        a, b = x0_coefficients
        acc = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x0 = a * sample.to(acc) + b * model_output.to(acc)
        flat = x0.abs().reshape(x0.shape[0], math.prod(x0.shape[1:]))  # (no -1: batch 0)
        s = torch.quantile(flat, dynamic_thresholding_ratio, dim=1)
        return CLIP_THRESHOLD, s.clamp(min=1.0, max=sample_max_value)
    if clip_sample:
        if not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be positive, but got {clip_sample_range}")
        return CLIP_RANGE, None
    return CLIP_NONE, None


def _promoted(model_output: Tensor, sample: Tensor) -> tuple[Tensor, Tensor]:
    """Both in their promoted dtype, as diffusers' formulas in PyTorch ops would compute (a
    float16 model output with a float32 sample gives a float32 step). Checks their shapes
    first (before the noise is drawn or checked against them)."""
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output must have the shape of sample {list(sample.shape)}, "
                         f"but got {list(model_output.shape)}")
    if model_output.dtype == sample.dtype:
        return model_output, sample
    dtype = torch.promote_types(model_output.dtype, sample.dtype)
    return model_output.to(dtype), sample.to(dtype)


# A generator, or diffusers' list of one generator per sample.
Generators = torch.Generator | list[torch.Generator] | None


def _noise(variance_noise, generator: Generators, like: Tensor) -> Tensor:
    if variance_noise is not None and generator is not None:
        raise ValueError("pass generator or variance_noise, not both")
    if variance_noise is not None:
        if variance_noise.shape != like.shape:
            raise ValueError(f"variance_noise must have shape {list(like.shape)}, but got "
                             f"{list(variance_noise.shape)}")
        return variance_noise.to(device=like.device, dtype=like.dtype)
    if isinstance(generator, (list, tuple)):
        # diffusers' randn_tensor: one generator per sample, each drawing its sample's noise.
        if len(generator) == 1:
            return _draw(generator[0], like.shape, like)
        if like.dim() == 0 or len(generator) != like.shape[0]:
            batch = like.shape[0] if like.dim() else "no batch dim"
            raise ValueError(f"generator is a list of {len(generator)} generators; it must "
                             f"hold one per sample of the batch ({batch})")
        return torch.cat([_draw(g, (1, *like.shape[1:]), like) for g in generator])
    return _draw(generator, like.shape, like)


def _draw(generator: torch.Generator | None, shape, like: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` on like's device and dtype, drawn on the
    generator's device (a CPU generator gives the same noise whatever the sample's device)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, but got "
                        f"{type(generator).__name__}")
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device,
                       dtype=like.dtype).to(like.device)


def ddpm_step(
    model_output: Tensor, timestep: int, sample: Tensor, alphas_cumprod: Tensor, *,
    prev_timestep: int | None = None, prediction_type: str = "epsilon",
    variance_type: str = "fixed_small", clip_sample: bool = True,
    clip_sample_range: float = 1.0, thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
    generator: Generators = None, variance_noise: Tensor | None = None,
) -> SchedulerStepOutput:
    """One DDPM ancestral step from ``timestep`` to ``prev_timestep`` (default
    ``timestep - 1``; below 0 means alpha_bar = 1), as diffusers' DDPMScheduler.step.

    With ``variance_type`` "learned" or "learned_range", ``model_output`` carries the
    predicted variance as its second half along dim 1. Noise (from ``generator``, or
    ``variance_noise``) is added only for timestep > 0. "fixed_large_log" uses
    sqrt(beta_t), where diffusers takes the square root of log(beta_t) (NaN).
    """
    t = _integer("timestep", timestep)
    prev_t = t - 1 if prev_timestep is None else _integer("prev_timestep", prev_timestep)
    alphas_cumprod = _table(alphas_cumprod)
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, but got "
                         f"{variance_type!r}")
    predicted_variance = None
    if variance_type in ("learned", "learned_range"):
        if model_output.dim() < 2 or model_output.shape[1] != 2 * sample.shape[1]:
            raise ValueError(f"variance_type {variance_type!r} needs model_output with twice "
                             f"the channels of sample ({2 * sample.shape[1]}), but got shape "
                             f"{list(model_output.shape)}")
        model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
    model_output, sample = _promoted(model_output, sample)
    if predicted_variance is not None:
        predicted_variance = predicted_variance.to(sample.dtype)

    ab_t = _alpha_bar(alphas_cumprod, t)
    ab_prev = _alpha_bar(alphas_cumprod, prev_t) if prev_t >= 0 else 1.0
    beta_prod_t, beta_prod_prev = 1.0 - ab_t, 1.0 - ab_prev
    current_alpha = ab_t / ab_prev
    current_beta = 1.0 - current_alpha

    a, b, _, _ = _prediction(prediction_type, ab_t, t)
    clip, thresholds = _clip((a, b), model_output, sample, clip_sample, clip_sample_range,
                             thresholding, dynamic_thresholding_ratio, sample_max_value)
    # prev = P x0 + Q s: the mean of q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 7).
    p = math.sqrt(ab_prev) * current_beta / beta_prod_t
    q = math.sqrt(current_alpha) * beta_prod_prev / beta_prod_t
    variance = max(beta_prod_prev / beta_prod_t * current_beta, 1e-20)
    sigma, mode, min_log, max_log = 0.0, VARIANCE_SCALAR, 0.0, 0.0
    if variance_type in ("fixed_small", "fixed_small_log"):
        sigma = math.sqrt(variance)
    elif variance_type in ("fixed_large", "fixed_large_log"):
        sigma = math.sqrt(current_beta)
    elif variance_type == "learned":
        mode = VARIANCE_LEARNED
    else:
        mode, min_log, max_log = VARIANCE_LEARNED_RANGE, math.log(variance), math.log(current_beta)
    noise = _noise(variance_noise, generator, model_output) if t > 0 else None
    coefficients = [a, b, 0.0, 0.0, 0.0, 0.0, p, q, 0.0, sigma, min_log, max_log,
                    clip_sample_range]
    prev, x0 = scheduler_step(model_output, sample, noise,
                              predicted_variance if mode != VARIANCE_SCALAR else None,
                              thresholds, coefficients, clip, mode, False)
    return SchedulerStepOutput(prev, x0)


def ddim_step(
    model_output: Tensor, timestep: int, sample: Tensor, alphas_cumprod: Tensor, *,
    prev_timestep: int, final_alpha_cumprod: float = 1.0, eta: float = 0.0,
    use_clipped_model_output: bool = False, prediction_type: str = "epsilon",
    clip_sample: bool = True, clip_sample_range: float = 1.0, thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
    generator: Generators = None, variance_noise: Tensor | None = None,
) -> SchedulerStepOutput:
    """One DDIM step (Song et al. 2021, eq. 12) from ``timestep`` to ``prev_timestep``
    (below 0 means alpha_bar = ``final_alpha_cumprod``: 1 with diffusers'
    set_alpha_to_one, else alphas_cumprod[0]), as diffusers' DDIMScheduler.step.

    ``eta`` scales the noise (0: deterministic DDIM, 1: DDPM-like); noise comes from
    ``variance_noise`` or ``generator`` and is drawn only when eta > 0. Above 1, eta can make
    the noise's variance exceed 1 - alpha_bar_prev: the direction term is then 0 (diffusers
    takes the square root of a negative number, a NaN).
    ``use_clipped_model_output`` recomputes the predicted noise from the clipped x0.
    """
    t, prev_t = _integer("timestep", timestep), _integer("prev_timestep", prev_timestep)
    alphas_cumprod = _table(alphas_cumprod)
    if eta < 0:
        raise ValueError(f"eta must be non-negative, but got {eta}")
    model_output, sample = _promoted(model_output, sample)
    ab_t = _alpha_bar(alphas_cumprod, t)
    ab_prev = _alpha_bar(alphas_cumprod, prev_t) if prev_t >= 0 else float(final_alpha_cumprod)
    beta_prod_t = 1.0 - ab_t

    a, b, c, d = _prediction(prediction_type, ab_t, t)
    clip, thresholds = _clip((a, b), model_output, sample, clip_sample, clip_sample_range,
                             thresholding, dynamic_thresholding_ratio, sample_max_value)
    variance = (1.0 - ab_prev) / beta_prod_t * (1.0 - ab_t / ab_prev)
    std = eta * math.sqrt(max(variance, 0.0))
    # eps = E s + F x0 = (s - sqrt(a_t) x0) / sqrt(1 - a_t), from the clipped x0.
    e, f = (1.0 / math.sqrt(beta_prod_t), -math.sqrt(ab_t) / math.sqrt(beta_prod_t))
    direction = math.sqrt(max(1.0 - ab_prev - std * std, 0.0))
    noise = _noise(variance_noise, generator, model_output) if eta > 0 else None
    coefficients = [a, b, c, d, e, f, math.sqrt(ab_prev), 0.0, direction, std, 0.0, 0.0,
                    clip_sample_range]
    prev, x0 = scheduler_step(model_output, sample, noise, None, thresholds, coefficients, clip,
                              VARIANCE_SCALAR, use_clipped_model_output)
    return SchedulerStepOutput(prev, x0)
