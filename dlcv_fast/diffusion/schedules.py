"""Noise (beta) schedules of DDPM-style diffusion models, with the constructor semantics of
diffusers' DDPMScheduler / DDIMScheduler (``num_train_timesteps``, ``beta_start``,
``beta_end``, ``beta_schedule``, ``trained_betas``, ``rescale_betas_zero_snr``).

Everything is computed in float64 and rounded once to float32 at the end: near t = 0,
1 - alpha_bar is tiny (about beta_start), and a float32 cumulative product would carry
its rounding errors into it step after step."""

from __future__ import annotations

import math
import operator

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")

# Schedules that read beta_start and beta_end (the cosine one ignores them).
_RANGED_SCHEDULES = ("linear", "scaled_linear", "sigmoid")

# The cosine schedule's cap on beta: without it the last beta is 1 - ~1e-33 / alpha_bar,
# i.e. 1, and the singularity at t = T makes sampling blow up (Nichol & Dhariwal 2021).
_COSINE_MAX_BETA = 0.999


def _check_num_train_timesteps(num_train_timesteps) -> int:
    message = f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}"
    if isinstance(num_train_timesteps, bool):
        raise ValueError(message)
    try:
        steps = operator.index(num_train_timesteps)
    except TypeError:
        raise ValueError(message) from None
    if steps < 1:
        raise ValueError(message)
    return steps


def _check_beta_range(beta_start, beta_end, beta_schedule: str) -> tuple[float, float]:
    try:
        start, end = float(beta_start), float(beta_end)
    except (TypeError, ValueError):
        raise ValueError(
            f"beta_start and beta_end must be numbers, got {beta_start!r} and {beta_end!r}"
        ) from None
    for name, value in (("beta_start", start), ("beta_end", end)):
        if not 0.0 < value < 1.0:  # also rejects NaN
            raise ValueError(
                f"{name} must lie in (0, 1) for beta_schedule={beta_schedule!r}, got {value}")
    if start > end:
        raise ValueError(
            f"beta_start must be <= beta_end for beta_schedule={beta_schedule!r}, "
            f"got beta_start={start} > beta_end={end}")
    return start, end


def _as_betas64(betas, name: str) -> torch.Tensor:
    """``betas`` (a sequence or tensor) as a 1-D float64 tensor, checked to lie in (0, 1]."""
    try:
        b = torch.as_tensor(betas.detach() if isinstance(betas, torch.Tensor) else betas,
                            dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a 1-D sequence or tensor of numbers ({e})") from None
    if b.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(b.shape)}")
    # beta = 1 is allowed: a zero-terminal-SNR schedule ends with it (alpha_bar_T = 0).
    if not bool(((b > 0) & (b <= 1)).all()):  # also rejects NaN
        raise ValueError(f"{name} must have every value in (0, 1], got min {b.min().item()} "
                         f"and max {b.max().item()}")
    return b


def _linspace64(start: float, end: float, steps: int) -> torch.Tensor:
    return torch.linspace(start, end, steps, dtype=torch.float64)


def _cosine_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """alpha_bar(t) = cos(((t + s) / (1 + s)) * pi / 2)^2 with s = 0.008, t in [0, 1]: the
    offset s keeps beta from being too small near t = 0."""
    return torch.cos((t + 0.008) / 1.008 * (math.pi / 2)) ** 2


def rescale_zero_terminal_snr(betas) -> torch.Tensor:
    """Rescales ``betas`` to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", Algorithm 1).

    sqrt(alpha_bar) is shifted so that its last value is 0 and scaled so that its first is
    unchanged: s'_t = (s_t - s_T) * s_0 / (s_0 - s_T). The betas come back from the new
    alpha_bar: alpha_0 = alpha_bar_0, alpha_t = alpha_bar_t / alpha_bar_{t-1},
    beta = 1 - alpha (so the last beta is 1).

    Computed in float64; returns the input's floating dtype (float64 for a sequence or an
    integer tensor), on the input's device. Raises ValueError unless ``betas`` is 1-D with
    at least 2 values in (0, 1].
    """
    out_dtype = (betas.dtype if isinstance(betas, torch.Tensor) and betas.is_floating_point()
                 else torch.float64)
    b = _as_betas64(betas, "betas")
    if b.numel() < 2:
        raise ValueError(
            f"betas must have at least 2 values to rescale to zero terminal SNR, got {b.numel()}")
    sqrt_ab = torch.cumprod(1.0 - b, dim=0).sqrt()
    s0, sT = sqrt_ab[0].item(), sqrt_ab[-1].item()
    if not s0 > sT:
        raise ValueError("betas must make alpha_bar decrease to rescale to zero terminal SNR, "
                         f"got sqrt(alpha_bar) {s0} at the start and {sT} at the end")
    sqrt_ab = (sqrt_ab - sT) * (s0 / (s0 - sT))
    ab = sqrt_ab**2
    # Once alpha_bar is 0 (a beta of 1 before the end) it stays 0: alpha = 0 there, not 0/0.
    prev = ab[:-1]
    alphas = torch.cat([ab[:1], torch.where(prev > 0, ab[1:] / prev, torch.zeros_like(prev))])
    return (1.0 - alphas).to(out_dtype)


def alphas_cumprod_from_betas(betas) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), as float32 on ``betas``' device.

    Computed in float64 and rounded once: with float32 steps the rounding errors of the
    product pile up (absolute error ~ t * 2^-24), a large relative error in the small
    1 - alpha_bar of the early steps."""
    b = torch.as_tensor(betas.detach() if isinstance(betas, torch.Tensor) else betas,
                        dtype=torch.float64)
    if b.dim() != 1:
        raise ValueError(f"betas must be 1-D, got shape {tuple(b.shape)}")
    return torch.cumprod(1.0 - b, dim=0).to(torch.float32)


def make_betas(
    num_train_timesteps: int | None = None,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The betas of a diffusion noise schedule, as a CPU tensor of shape (T,) in ``dtype``
    (float32, or float64 for the unrounded values).

    ``beta_schedule``:

    - ``"linear"``: T values evenly spaced from beta_start to beta_end inclusive (DDPM).
    - ``"scaled_linear"``: (T values evenly spaced from sqrt(beta_start) to
      sqrt(beta_end))^2 (latent diffusion / Stable Diffusion).
    - ``"squaredcos_cap_v2"``: the cosine schedule of Nichol & Dhariwal 2021,
      beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), 0.999) with
      alpha_bar(t) = cos(((t + 0.008) / 1.008) * pi / 2)^2; ignores beta_start/beta_end.
    - ``"sigmoid"``: sigmoid(x) * (beta_end - beta_start) + beta_start for T values x
      evenly spaced from -6 to 6.

    ``num_train_timesteps`` is T; None means 1000, or the length of ``trained_betas``.
    ``trained_betas`` (a 1-D sequence or tensor of values in (0, 1]) overrides
    ``beta_schedule``; a ``num_train_timesteps`` given with it must equal its length.
    ``rescale_betas_zero_snr`` applies :func:`rescale_zero_terminal_snr` (needs T >= 2).

    Computed in float64, rounded once to ``dtype``. Raises ValueError on an unknown
    schedule, T < 1, beta_start/beta_end outside (0, 1) or beta_start > beta_end (for the
    schedules that use them), or bad ``trained_betas``.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, but got {dtype}")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of "
                         + ", ".join(repr(s) for s in BETA_SCHEDULES))
    if num_train_timesteps is not None:
        num_train_timesteps = _check_num_train_timesteps(num_train_timesteps)

    if trained_betas is not None:
        betas = _as_betas64(trained_betas, "trained_betas").cpu()
        if betas.numel() < 1:
            raise ValueError("trained_betas must have at least 1 value, got 0")
        if num_train_timesteps is not None and num_train_timesteps != betas.numel():
            raise ValueError(
                f"trained_betas has {betas.numel()} values but num_train_timesteps is "
                f"{num_train_timesteps}; they must agree (or leave num_train_timesteps None)")
    else:
        steps = 1000 if num_train_timesteps is None else num_train_timesteps
        if beta_schedule in _RANGED_SCHEDULES:
            start, end = _check_beta_range(beta_start, beta_end, beta_schedule)
        if beta_schedule == "linear":
            betas = _linspace64(start, end, steps)
        elif beta_schedule == "scaled_linear":
            betas = _linspace64(math.sqrt(start), math.sqrt(end), steps) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            ab = _cosine_alpha_bar(torch.arange(steps + 1, dtype=torch.float64) / steps)
            betas = (1.0 - ab[1:] / ab[:-1]).clamp(max=_COSINE_MAX_BETA)
        else:  # sigmoid
            betas = torch.sigmoid(_linspace64(-6.0, 6.0, steps)) * (end - start) + start

    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas.to(dtype)
