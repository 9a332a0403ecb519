"""A denoising UNet for DDPM (Ho et al., 2020): a sinusoidal timestep embedding and an MLP,
residual blocks that add the embedding, self-attention at low resolutions, down- and
upsampling with skip connections. Called as ``model(x, timesteps)``.

Convolutions are ``dlcv_fast.nn.Conv2d`` and attention is ``dlcv_fast.nn.MultiheadAttention``
on its fused path (``need_weights=False``); GroupNorm, SiLU, the linear layers and the
nearest-neighbour upsampling stay torch's (dlcv_fast has no kernels for them)."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

import dlcv_fast.nn as dnn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0):
    """(N,) timesteps -> (N, dim) sinusoids, as in the Transformer: sin over the first half,
    cos over the second, frequencies from 1 down to 1 / max_period."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, GroupNorm-SiLU-dropout-conv,
    and the input (through a 1x1 convolution when the channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, time_channels: int,
                 dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = dnn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = dnn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else dnn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions of a feature map (GroupNorm first, residual)."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = dnn.MultiheadAttention(channels, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # (N, H*W, C)
        out, _ = self.attn(seq, seq, seq, need_weights=False)  # the fused kernel
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class Downsample(nn.Module):
    """A 3x3 convolution with stride 2 (learned, rather than a fixed pooling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = dnn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (no checkerboard artefacts
    of a transposed convolution)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = dnn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """The residual blocks (each followed by attention or nothing) and the resampling of one
    resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.resample: nn.Module = nn.Identity()


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"diffusion_unet: {name} must be a positive int, but got {value!r}")
    return value


class DiffusionUNet(nn.Module):
    """The DDPM denoiser: ``forward(x, timesteps)`` maps a noisy batch (N, in_channels, H, W)
    and its timesteps to a tensor of the same size with ``out_channels`` channels (the
    predicted noise, for epsilon prediction). H and W must be multiples of
    2 ** (len(channel_mults) - 1); ``image_size`` only places the attention blocks (at the
    levels whose resolution, for an image_size input, is in ``attention_resolutions``)."""

    def __init__(self, in_channels: int = 1, image_size: int = 16, *, base_channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                 attention_resolutions: tuple[int, ...] | None = None, num_heads: int = 4,
                 dropout: float = 0.0, out_channels: int | None = None,
                 norm_groups: int = 8) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("image_size", image_size)
        _positive_int("base_channels", base_channels)
        _positive_int("num_res_blocks", num_res_blocks)
        _positive_int("num_heads", num_heads)
        _positive_int("norm_groups", norm_groups)
        out_channels = in_channels if out_channels is None else out_channels
        _positive_int("out_channels", out_channels)
        channel_mults = tuple(channel_mults)
        if not channel_mults:
            raise ValueError("diffusion_unet: channel_mults must not be empty")
        for m in channel_mults:
            _positive_int("each of channel_mults", m)
        self.factor = 2 ** (len(channel_mults) - 1)
        if image_size % self.factor:
            raise ValueError(f"diffusion_unet: image_size must be a multiple of "
                             f"2 ** (len(channel_mults) - 1) = {self.factor}, but got "
                             f"{image_size}")
        resolutions = [image_size // 2 ** i for i in range(len(channel_mults))]
        attention_resolutions = ((resolutions[-1],) if attention_resolutions is None
                                 else tuple(attention_resolutions))
        for r in attention_resolutions:
            if r not in resolutions:
                raise ValueError(f"diffusion_unet: attention_resolutions must be among the "
                                 f"model's resolutions {resolutions}, but got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"diffusion_unet: dropout must lie in [0, 1), but got {dropout}")
        for c in (base_channels * m for m in channel_mults):
            if c % norm_groups:
                raise ValueError(f"diffusion_unet: every channel count (base_channels * "
                                 f"channel_mults) must be a multiple of norm_groups = "
                                 f"{norm_groups}, but {c} is not")
        for r, m in zip(resolutions, channel_mults):
            if r in attention_resolutions and (base_channels * m) % num_heads:
                raise ValueError(f"diffusion_unet: the channels at an attention resolution "
                                 f"({base_channels * m}) must be a multiple of num_heads = "
                                 f"{num_heads}")
        if (base_channels * channel_mults[-1]) % num_heads:  # the middle attention block
            raise ValueError(f"diffusion_unet: base_channels * channel_mults[-1] = "
                             f"{base_channels * channel_mults[-1]} must be a multiple of "
                             f"num_heads = {num_heads}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.image_size, self.base_channels = image_size, base_channels

        time_channels = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, time_channels), nn.SiLU(),
                                      nn.Linear(time_channels, time_channels))
        self.conv_in = dnn.Conv2d(in_channels, base_channels, 3, padding=1)

        def res(cin, cout):
            return ResBlock(cin, cout, time_channels, dropout, norm_groups)

        def attn(c, r):
            return (AttentionBlock(c, num_heads, norm_groups) if r in attention_resolutions
                    else nn.Identity())

        skips, ch = [base_channels], base_channels
        self.down = nn.ModuleList()
        for i, (m, r) in enumerate(zip(channel_mults, resolutions)):
            level = _Level()
            for _ in range(num_res_blocks):
                level.res.append(res(ch, base_channels * m))
                ch = base_channels * m
                level.attn.append(attn(ch, r))
                skips.append(ch)
            if i < len(channel_mults) - 1:
                level.resample = Downsample(ch)
                skips.append(ch)
            self.down.append(level)

        self.mid_res1 = res(ch, ch)
        self.mid_attn = AttentionBlock(ch, num_heads, norm_groups)
        self.mid_res2 = res(ch, ch)

        self.up = nn.ModuleList()
        for i in reversed(range(len(channel_mults))):
            level = _Level()
            for _ in range(num_res_blocks + 1):  # one more: the resampled map's skip too
                level.res.append(res(ch + skips.pop(), base_channels * channel_mults[i]))
                ch = base_channels * channel_mults[i]
                level.attn.append(attn(ch, resolutions[i]))
            if i > 0:
                level.resample = Upsample(ch)
            self.up.append(level)

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = dnn.Conv2d(ch, out_channels, 3, padding=1)

    def _timesteps(self, timesteps, x: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps on x's device from a number (Python's or NumPy's), a 0-d tensor or
        an (N,) tensor."""
        n = x.shape[0]
        if isinstance(timesteps, torch.fx.Proxy):  # torch.fx: a 0-d or (N,) tensor, unchecked
            return timesteps.to(x.device).expand(n)
        if not isinstance(timesteps, torch.Tensor):
            if isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Real):
                raise TypeError(f"DiffusionUNet: timesteps must be a tensor of shape (N,) or a "
                                f"scalar, but got {type(timesteps).__name__}")
            timesteps = torch.tensor(timesteps)
        if timesteps.dtype == torch.bool or timesteps.is_complex():
            raise TypeError(f"DiffusionUNet: timesteps must be integer or floating point, but "
                            f"got {timesteps.dtype}")
        if timesteps.dim() == 0:
            return timesteps.to(x.device).expand(n)
        if timesteps.shape != (n,):
            raise ValueError(f"DiffusionUNet: timesteps must be a scalar or of shape (N,) = "
                             f"({n},), but got shape {tuple(timesteps.shape)}")
        return timesteps.to(x.device)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DiffusionUNet: x must be (N, {self.in_channels}, H, W), but got "
                             f"shape {tuple(x.shape)}")
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"DiffusionUNet: H and W must be multiples of {self.factor} "
                             f"(2 ** (len(channel_mults) - 1)), but got {tuple(x.shape[2:])}")

    def forward(self, x: torch.Tensor, timesteps) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):  # torch.fx: no sizes to check
            self._check(x)
        t = self._timesteps(timesteps, x)
        temb = timestep_embedding(t, self.base_channels).to(x.dtype)
        temb = self.time_mlp(temb)

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, temb))
                skips.append(h)
            if not isinstance(level.resample, nn.Identity):
                h = level.resample(h)
                skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb)), temb)
        for level in self.up:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(torch.cat([h, skips.pop()], dim=1), temb))
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def diffusion_unet(in_channels: int = 1, image_size: int = 16, *, base_channels: int = 32,
                   channel_mults: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                   attention_resolutions: tuple[int, ...] | None = None, num_heads: int = 4,
                   dropout: float = 0.0, out_channels: int | None = None,
                   norm_groups: int = 8) -> DiffusionUNet:
    """The DDPM denoising UNet, called as ``model(x, timesteps)``.

    Args:
        in_channels: channels of the images.
        image_size: the side of the training images; a multiple of
            2 ** (len(channel_mults) - 1). Inputs of other sizes (multiples of that) work.
        base_channels: channels after the first convolution; also the width of the
            sinusoidal timestep embedding (its MLP has 4 * base_channels).
        channel_mults: channels of each resolution level, in units of base_channels; each
            level but the last halves the resolution.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: the resolutions (sides, for an image_size input) with a
            self-attention block after each residual block; the middle always has one.
            None: the lowest resolution, image_size // 2 ** (len(channel_mults) - 1).
        num_heads: attention heads.
        dropout: in every residual block.
        out_channels: channels of the output (default in_channels: the predicted noise).
        norm_groups: GroupNorm groups; every channel count must be a multiple of it.

    The defaults (16x16 grey images, 32-64-64 channels, attention at 4x4: about 1.1 M
    parameters) fit the CPU budget of ``python -m dlcv_fast diffuse``. torchvision has no
    such model; the structure follows DDPM's, at a smaller size.
    """
    return DiffusionUNet(in_channels, image_size, base_channels=base_channels,
                         channel_mults=channel_mults, num_res_blocks=num_res_blocks,
                         attention_resolutions=attention_resolutions, num_heads=num_heads,
                         dropout=dropout, out_channels=out_channels, norm_groups=norm_groups)
