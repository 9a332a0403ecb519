"""Vision Transformer (Dosovitskiy et al., 2020) as torchvision lays it out: patches by a
strided convolution, a class token, learned position embeddings, pre-norm encoder blocks
(self-attention, then a GELU MLP) and a linear head, with torchvision's arguments,
initialisation and state_dict keys. The patch convolution is dlcv_fast's Conv2d and the
attention dlcv_fast's MultiheadAttention on its fused path; layer norms, linear layers,
GELU and dropout are torch's."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

import dlcv_fast.nn as dnn
from dlcv_fast.models._weights import (
    load_torchvision_weights,
    override_param,
    verified_weights,
)


class ConvStemConfig(NamedTuple):
    """One convolution + norm + activation of a convolutional stem (Xiao et al., 2021), as
    torchvision's ``ConvStemConfig`` (which is accepted as well)."""

    out_channels: int
    kernel_size: int
    stride: int
    norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d
    activation_layer: Callable[..., nn.Module] = nn.ReLU


def _conv_norm_act(cin: int, cfg) -> nn.Sequential:
    """torchvision's Conv2dNormActivation for one stem layer (keys 0, 1, 2): "same"-style
    padding, no convolution bias when there is a norm; torch.nn's batch norm becomes
    dlcv_fast's."""
    norm_layer = dnn.BatchNorm2d if cfg.norm_layer is nn.BatchNorm2d else cfg.norm_layer
    layers: list[nn.Module] = [dnn.Conv2d(cin, cfg.out_channels, cfg.kernel_size, cfg.stride,
                                          padding=(cfg.kernel_size - 1) // 2,
                                          bias=norm_layer is None)]
    if norm_layer is not None:
        layers.append(norm_layer(cfg.out_channels))
    if cfg.activation_layer is not None:
        layers.append(cfg.activation_layer(inplace=True))
    return nn.Sequential(*layers)


class MLPBlock(nn.Sequential):
    """Linear, GELU, dropout, linear, dropout (keys 0 and 3), initialised as torchvision
    does: Xavier-uniform weights, biases of std 1e-6."""

    _version = 2  # version 1 named the linear layers linear_1 and linear_2

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(mlp_dim, in_dim), nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # torchvision's published ViT weights predate the renaming: map the old keys
        if local_metadata.get("version", None) is None or local_metadata["version"] < 2:
            for old, new in (("linear_1", "0"), ("linear_2", "3")):
                for kind in ("weight", "bias"):
                    if f"{prefix}{old}.{kind}" in state_dict:
                        state_dict[f"{prefix}{new}.{kind}"] = \
                            state_dict.pop(f"{prefix}{old}.{kind}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + dropout(attention(ln_1(x))), then + mlp(ln_2(.))."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float,
                 attention_dropout: float,
                 norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6)) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = dnn.MultiheadAttention(hidden_dim, num_heads,
                                                     dropout=attention_dropout,
                                                     batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm_layer(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.fx.Proxy) and input.dim() != 3:  # fx: no sizes
            raise ValueError(f"EncoderBlock: input must be (batch_size, seq_length, "
                             f"hidden_dim), but got shape {tuple(input.shape)}")
        x = self.ln_1(input)
        # need_weights=False: the fused attention kernel, no (L, L) weights materialised
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Position embeddings (std 0.02), dropout, ``num_layers`` blocks, a final norm."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, dropout: float, attention_dropout: float,
                 norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6)) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout,
                                                attention_dropout, norm_layer))
            for i in range(num_layers)))
        self.ln = norm_layer(hidden_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.fx.Proxy) and input.dim() != 3:  # fx: no sizes
            raise ValueError(f"Encoder: input must be (batch_size, seq_length, hidden_dim), "
                             f"but got shape {tuple(input.shape)}")
        return self.ln(self.layers(self.dropout(input + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """Same arguments, initialisation, state_dict keys and outputs as
    ``torchvision.models.VisionTransformer``.

    Args:
        image_size: height and width of the (square) input; a multiple of ``patch_size``.
        patch_size: side of the square patches, each one token.
        num_layers, num_heads, hidden_dim, mlp_dim: the encoder's depth, attention heads,
            token width and MLP width (``hidden_dim`` a multiple of ``num_heads``).
        dropout: after the position embeddings, the attention block and in the MLPs.
        attention_dropout: on the attention weights.
        num_classes: outputs of the head.
        representation_size: when given, a linear layer to this width and a tanh before the
            head (``heads.pre_logits``).
        norm_layer: the encoder's norm (default LayerNorm, eps 1e-6).
        conv_stem_configs: a list of :class:`ConvStemConfig` (or torchvision's): a
            convolutional stem, then a 1x1 convolution to ``hidden_dim``, in place of the
            patch convolution (``image_size`` and ``patch_size`` must still describe the
            token grid the stem produces).
    """

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int,
                 hidden_dim: int, mlp_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0, num_classes: int = 1000,
                 representation_size: int | None = None,
                 norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 conv_stem_configs: list[ConvStemConfig] | None = None) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"VisionTransformer: input shape indivisible by patch size: "
                             f"image_size ({image_size}) must be a multiple of patch_size "
                             f"({patch_size})")
        if hidden_dim % num_heads != 0:
            raise ValueError(f"VisionTransformer: hidden_dim ({hidden_dim}) must be a multiple "
                             f"of num_heads ({num_heads})")
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.num_classes = num_classes
        self.representation_size = representation_size
        self.norm_layer = norm_layer

        if conv_stem_configs is not None:
            stem = nn.Sequential()
            channels = 3
            for i, cfg in enumerate(conv_stem_configs):
                stem.add_module(f"conv_bn_relu_{i}", _conv_norm_act(channels, cfg))
                channels = cfg.out_channels
            stem.add_module("conv_last", dnn.Conv2d(channels, hidden_dim, kernel_size=1))
            self.conv_proj: nn.Module = stem
        else:
            self.conv_proj = dnn.Conv2d(3, hidden_dim, kernel_size=patch_size,
                                        stride=patch_size)

        seq_length = (image_size // patch_size) ** 2 + 1  # the patches and the class token
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout,
                               attention_dropout, norm_layer)
        self.seq_length = seq_length

        heads: OrderedDict[str, nn.Module] = OrderedDict()
        if representation_size is None:
            heads["head"] = nn.Linear(hidden_dim, num_classes)
        else:
            heads["pre_logits"] = nn.Linear(hidden_dim, representation_size)
            heads["act"] = nn.Tanh()
            heads["head"] = nn.Linear(representation_size, num_classes)
        self.heads = nn.Sequential(heads)

        # torchvision's initialisation, in its order (a seed gives its weights)
        if isinstance(self.conv_proj, nn.Conv2d):
            fan_in = self.conv_proj.in_channels * math.prod(self.conv_proj.kernel_size)
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(self.conv_proj.bias)
        else:
            last = self.conv_proj.conv_last
            nn.init.normal_(last.weight, mean=0.0, std=math.sqrt(2.0 / last.out_channels))
            nn.init.zeros_(last.bias)
        if representation_size is not None:
            pre = self.heads.pre_logits
            nn.init.trunc_normal_(pre.weight, std=math.sqrt(1 / pre.in_features))
            nn.init.zeros_(pre.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) images -> (n, patches, hidden_dim) tokens."""
        # The checks need real sizes: under torch.fx's symbolic tracing they are proxies.
        checked = not isinstance(x, torch.fx.Proxy)
        if checked:
            if x.dim() != 4:
                raise ValueError(f"VisionTransformer: input must be (N, 3, H, W), but got "
                                 f"shape {tuple(x.shape)}")
            _, _, h, w = x.shape
            if h != self.image_size:
                raise ValueError(f"VisionTransformer: wrong image height: expected "
                                 f"{self.image_size} (image_size) but got {h}")
            if w != self.image_size:
                raise ValueError(f"VisionTransformer: wrong image width: expected "
                                 f"{self.image_size} (image_size) but got {w}")
        side = self.image_size // self.patch_size
        x = self.conv_proj(x)
        if checked and tuple(x.shape[2:]) != (side, side):  # a conv stem of other strides
            raise ValueError(f"VisionTransformer: conv_proj gives a {x.shape[2]}x{x.shape[3]} "
                             f"grid of tokens, but image_size / patch_size is {side}: the "
                             f"strides of conv_stem_configs must multiply to patch_size")
        return x.reshape(x.shape[0], self.hidden_dim, side * side).permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])  # the class token's output


def _vision_transformer(name: str, patch_size: int, num_layers: int, num_heads: int,
                        hidden_dim: int, mlp_dim: int, weights, progress: bool,
                        **kwargs: Any) -> VisionTransformer:
    weights = verified_weights(name, weights, kwargs)
    if weights is not None:
        override_param(kwargs, "image_size", weights.meta["min_size"][0])
    image_size = kwargs.pop("image_size", 224)
    model = VisionTransformer(image_size=image_size, patch_size=patch_size,
                              num_layers=num_layers, num_heads=num_heads,
                              hidden_dim=hidden_dim, mlp_dim=mlp_dim, **kwargs)
    return load_torchvision_weights(model, name, weights, progress)


def vit_b_16(*, weights=None, progress: bool = True, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 (12 layers, 12 heads, width 768, MLP 3072, 16x16 patches) with
    ``torchvision.models.vit_b_16``'s arguments; keywords (``image_size`` default 224,
    ``dropout``, ``attention_dropout``, ``num_classes``, ``representation_size``, ...) go
    to :class:`VisionTransformer`. ``weights`` sets ``num_classes`` and ``image_size`` to
    theirs (another value given is an error)."""
    return _vision_transformer("vit_b_16", 16, 12, 12, 768, 3072, weights, progress, **kwargs)


def vit_b_32(*, weights=None, progress: bool = True, **kwargs: Any) -> VisionTransformer:
    """ViT-B/32 (as ViT-B/16 with 32x32 patches) with ``torchvision.models.vit_b_32``'s
    arguments; see :func:`vit_b_16`."""
    return _vision_transformer("vit_b_32", 32, 12, 12, 768, 3072, weights, progress, **kwargs)


def vit_l_16(*, weights=None, progress: bool = True, **kwargs: Any) -> VisionTransformer:
    """ViT-L/16 (24 layers, 16 heads, width 1024, MLP 4096, 16x16 patches) with
    ``torchvision.models.vit_l_16``'s arguments; see :func:`vit_b_16`."""
    return _vision_transformer("vit_l_16", 16, 24, 16, 1024, 4096, weights, progress, **kwargs)


def vit_tiny(image_size: int = 32, num_classes: int = 10, *, patch_size: int = 4,
             **kwargs: Any) -> VisionTransformer:
    """A small ViT for 32x32 images (CIFAR-sized) that trains on one GPU in minutes.

    The widths are DeiT-Tiny's (Touvron et al., 2020): 12 layers, 3 heads, width 192,
    MLP 768; with 4x4 patches a 32x32 image is 64 tokens plus the class token. torchvision
    has no such model: it is :class:`VisionTransformer` with these hyper-parameters, so
    ``torchvision.models.VisionTransformer(image_size, patch_size, 12, 3, 192, 768, ...)``
    has the same state_dict. Other keywords (``dropout``, ``attention_dropout``,
    ``num_layers``, ...) go to :class:`VisionTransformer`; no pretrained weights.
    """
    config = dict(num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768)
    config.update(kwargs)
    return VisionTransformer(image_size=image_size, patch_size=patch_size,
                             num_classes=num_classes, **config)
