"""U-Net (Ronneberger, Fischer and Brox, 2015) for segmentation, with padded 3x3
convolutions so that the output has the input's size, and a batch norm after every
convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dlcv_fast.nn as dnn

UPSAMPLING = ("transpose", "bilinear")


class DoubleConv(nn.Sequential):
    """(3x3 convolution, padding 1, no bias - BatchNorm2d - ReLU) twice. The bias is left
    out because the batch norm's shift replaces it."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            dnn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            dnn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            dnn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            dnn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(dnn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Doubles the resolution and halves the channels, concatenates the encoder's map of
    that level (the skip), then a DoubleConv.

    "transpose": a 2x2 transposed convolution with stride 2, the paper's "up-convolution"
    (torch's ConvTranspose2d: dlcv_fast has no kernel for it). "bilinear": bilinear 2x
    upsampling then a 1x1 dlcv_fast convolution, fewer parameters and no checkerboard
    pattern. When the encoder's map is one row or column larger (an odd size was pooled
    down), the upsampled map gets a zero row or column at its bottom or right."""

    def __init__(self, in_channels: int, out_channels: int, upsampling: str) -> None:
        super().__init__()
        if upsampling == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                dnn.Conv2d(in_channels, in_channels // 2, 1))
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dh, dw = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
        if isinstance(x, torch.fx.Proxy) or dh or dw:  # fx: sizes unknown, pad (maybe by 0)
            x = F.pad(x, (0, dw, 0, dh))
        return self.conv(torch.cat([skip, x], dim=1))


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"unet: {name} must be a positive int, but got {value!r}")
    return value


class UNet(nn.Module):
    """Encoder of ``depth`` max-pool + DoubleConv stages (channels doubling from
    ``base_channels``), decoder of as many Up stages with skip connections, and a 1x1
    convolution to ``num_classes`` logits per pixel. Input (N, in_channels, H, W) with H and
    W at least 2 ** depth, any parity; output (N, num_classes, H, W)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, *, base_channels: int = 64,
                 depth: int = 4, upsampling: str = "transpose") -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("num_classes", num_classes)
        _positive_int("base_channels", base_channels)
        _positive_int("depth", depth)
        if upsampling not in UPSAMPLING:
            raise ValueError(f"unet: upsampling must be one of {UPSAMPLING}, but got "
                             f"{upsampling!r}")
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        widths = [base_channels * 2 ** i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.down = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], upsampling)
                                for i in reversed(range(depth)))
        self.outc = dnn.Conv2d(widths[0], num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: input must be (N, {self.in_channels}, H, W), but got "
                             f"shape {tuple(x.shape)}")
        if min(x.shape[2:]) < 2 ** self.depth:
            raise ValueError(f"UNet: H and W must be at least 2 ** depth = {2 ** self.depth}, "
                             f"but got {tuple(x.shape[2:])}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):  # torch.fx: no sizes to check
            self._check(x)
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up in self.up:
            h = up(h, skips.pop())
        return self.outc(h)


def unet(in_channels: int = 3, num_classes: int = 2, *, base_channels: int = 64,
         depth: int = 4, upsampling: str = "transpose") -> UNet:
    """U-Net for per-pixel classification.

    Args:
        in_channels: channels of the input images.
        num_classes: logits per pixel in the output.
        base_channels: channels of the first level; each of the ``depth`` poolings doubles
            them (the paper: 64 and 4, 1024 channels at the bottom).
        depth: number of 2x2 max-pools (and of upsamplings).
        upsampling: "transpose" (2x2 transposed convolution, stride 2, as the paper; torch's
            layer) or "bilinear" (bilinear 2x, then a 1x1 dlcv_fast convolution).

    Differs from the paper where it is usual to: 3x3 convolutions padded by 1, so the
    output has the input's size (the paper's unpadded ones shrink it and need a larger
    input tile), and BatchNorm2d + ReLU after each convolution. Inputs of any size from
    2 ** depth up work, odd ones included: a pooling floors, and the decoder pads the
    upsampled map by a row or column to the skip's size. torchvision has no U-Net, so there
    are no pretrained weights.
    """
    return UNet(in_channels, num_classes, base_channels=base_channels, depth=depth,
                upsampling=upsampling)
