"""Per-layer profile of a model: each dlcv_fast layer against its torch.nn original.

The model (a ``dlcv_fast.models`` name, or any torchvision model name, converted with
:func:`dlcv_fast.convert`) runs one forward pass in eval mode with forward hooks that
record every dlcv_fast layer's input. Each layer is then timed on its recorded input, and
so is the torch module that computes the same thing with the same parameters
(:func:`dlcv_fast.convert.torch_equivalent`), with the harness of ``dlcv_fast.bench``
(median, cold caches). Compute-bound layers (convolutions) report TFLOP/s, memory-bound
ones (pooling) GB/s; the whole forward pass of the model is timed both ways as well.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os

import torch
from torch import nn

import dlcv_fast.nn as dnn
from dlcv_fast import bench
from dlcv_fast.convert import _BY_DLCV, convert, torch_equivalent


@dataclasses.dataclass
class LayerRow:
    layer: str
    op: str
    shape: tuple[int, ...]  # the input's
    ms: float
    torch_ms: float
    flops: float  # 0 for memory-bound layers
    bytes: float

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.ms

    @property
    def rate(self) -> str:
        if self.flops:
            return f"{self.flops / self.ms / 1e9:.3g} TFLOP/s"
        return f"{self.bytes / self.ms / 1e6:.3g} GB/s"


def _conv_flops(m: nn.Conv2d, x: torch.Tensor, y: torch.Tensor) -> float:
    """2 * multiply-adds of the convolution (bias and ReLU not counted)."""
    k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
    return 2.0 * y.numel() * k


def _attention_flops(m: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor) -> float:
    """2 * multiply-adds of the projections (query, key, value, output) and of the two
    products of attention (softmax not counted)."""
    seq = 1 if m.batch_first else 0
    n_q, n_k = q.numel() // q.shape[-1], k.numel() // k.shape[-1]  # tokens, all batches
    E = m.embed_dim
    proj = 2.0 * E * (n_q * E + n_k * m.kdim + n_k * m.vdim + n_q * E)
    return proj + 4.0 * n_q * (k.shape[seq] if k.dim() == 3 else k.shape[0]) * E


def layer_cost(m: nn.Module, x: torch.Tensor, y: torch.Tensor,
               key: torch.Tensor | None = None) -> tuple[str, float, float]:
    """(op, FLOPs, bytes moved at least) of one dlcv_fast layer on input x, output y
    (``key``: an attention layer's keys, when not x)."""
    moved = float(x.numel() * x.element_size() + y.numel() * y.element_size())
    if isinstance(m, dnn.MultiheadAttention):
        moved += sum(p.numel() * p.element_size() for p in m.parameters())
        return "attention", _attention_flops(m, x, x if key is None else key), moved
    if isinstance(m, dnn.Conv2d):
        moved += sum(p.numel() * p.element_size() for p in m.parameters())
        op = "conv2d+relu" if m.activation == "relu" else "conv2d"
        return op, _conv_flops(m, x, y), moved
    if isinstance(m, dnn.MaxPool2d):
        return "max_pool2d", 0.0, moved
    relu = "+relu" if getattr(m, "activation", None) == "relu" else ""
    return type(m).__name__ + relu, 0.0, moved


class ModelChoiceError(ValueError):
    """A model name or image size the command cannot profile (a usage error)."""


def _built(builder, name: str, image_size: int | None, /, *args, **kwargs) -> nn.Module:
    """builder(*args, **kwargs), its ValueError (an image size the model cannot take, say)
    a ModelChoiceError."""
    try:
        return builder(*args, **kwargs)
    except ValueError as e:
        size = "" if image_size is None else f" for --image-size {image_size}"
        raise ModelChoiceError(f"{name} cannot be built{size}: {e}") from e


def build_model(name: str, image_size: int | None = None, num_classes: int | None = None
                ) -> tuple[nn.Module, int, int, str]:
    """(model, input channels, image size, conversion summary text) for a dlcv_fast.models
    name or a torchvision model name (random weights, converted)."""
    from dlcv_fast import models

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if name == "lenet5" and image_size not in (None, 32):
        raise ModelChoiceError(f"lenet5 takes 32x32 images (its classifier is sized for them), "
                               f"but got --image-size {image_size}")
    if name in models.MODELS:
        if image_size is not None and name.startswith(("vit_", "diffusion_unet")):
            kwargs["image_size"] = image_size  # position embeddings, attention placement
        model = _built(models.MODELS[name], name, image_size, **kwargs)
        channels, size = {"lenet5": (1, 32), "vit_tiny": (3, 32),
                          "diffusion_unet": (1, 16)}.get(name, (3, 224))
        return model, channels, image_size or size, "built from dlcv_fast layers"
    import torchvision

    if name not in torchvision.models.list_models():
        raise ModelChoiceError(f"profile: model must be one of {sorted(models.MODELS)} or a "
                               f"torchvision model name, but got {name!r}")
    if image_size is not None and name.startswith("vit_"):
        kwargs["image_size"] = image_size
    if name.startswith(("googlenet", "inception")):
        kwargs.update(aux_logits=False, init_weights=False)
    # Segmentation and detection builders default to an ImageNet backbone (a download).
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    model = _built(torchvision.models.get_model, name, image_size, name, weights=None, **kwargs)
    summary = convert(model)
    size = 299 if name.startswith("inception") else 224
    return model, 3, image_size or size, str(summary)


def extra_inputs(model: nn.Module, batch: int, device: torch.device) -> tuple:
    """The inputs after the images that the model's forward takes: a diffusion UNet's
    timesteps (random, in the range of a 1000-step schedule); none for the others."""
    from dlcv_fast.models import DiffusionUNet

    if isinstance(model, DiffusionUNet):
        return (torch.randint(0, 1000, (batch,), device=device),)
    return ()


def profile(model: nn.Module, x: torch.Tensor, progress: bool = True,
            budget_s: float = 0.2, extra: tuple = ()) -> tuple[list[LayerRow], float, float]:
    """(rows, model ms on dlcv_fast, model ms on torch) for one forward pass
    ``model(x, *extra)``."""
    from tqdm import tqdm

    device = x.device
    layers = [(n, m) for n, m in model.named_modules() if type(m) in _BY_DLCV]
    recorded: dict[str, tuple[tuple, dict, torch.Tensor]] = {}
    hooks = []
    for name, m in layers:
        def hook(mod, args, kwargs, out, name=name):
            if name not in recorded:  # a layer used twice keeps its first call
                if isinstance(out, tuple):  # attention: (output, weights or None)
                    out = out[0]
                args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
                recorded[name] = (args, dict(kwargs), out.detach())
        hooks.append(m.register_forward_hook(hook, with_kwargs=True))
    model.eval()
    with torch.no_grad():
        model(x, *extra)
    for h in hooks:
        h.remove()

    rows = []
    with torch.no_grad():
        for name, m in tqdm(layers, desc="profiling layers", unit="layer",
                            disable=not progress, dynamic_ncols=True):
            if name not in recorded:
                continue
            args, kwargs, out = recorded[name]
            ref = torch_equivalent(m)
            ms, torch_ms = bench.median_ms_many(
                [lambda: m(*args, **kwargs), lambda: ref(*args, **kwargs)], device, budget_s)
            inp = args[0]
            key = args[1] if len(args) > 1 and isinstance(m, nn.MultiheadAttention) else None
            op, flops, moved = layer_cost(m, inp, out, key)
            rows.append(LayerRow(name, op, tuple(inp.shape), ms, torch_ms, flops, moved))
        reference = torch_model(model)
        ms, torch_ms = bench.median_ms_many(
            [lambda: model(x, *extra), lambda: reference(x, *extra)], device, 4 * budget_s)
        del reference
    return rows, ms, torch_ms


def torch_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each dlcv_fast layer replaced by its torch equivalent
    (:func:`dlcv_fast.convert.torch_equivalent`): also the layers built with a fused ReLU,
    which :func:`dlcv_fast.revert` leaves as they are, become the layer then a ReLU."""
    done: dict[int, nn.Module] = {}  # a layer used in several places: replaced once

    def swap(m: nn.Module) -> nn.Module:
        if id(m) not in done:
            done[id(m)] = torch_equivalent(m) if type(m) in _BY_DLCV else m
            if done[id(m)] is m:
                for key, child in list(m._modules.items()):
                    if child is not None:
                        m._modules[key] = swap(child)
        return done[id(m)]

    return swap(copy.deepcopy(model))


def format_table(rows: list[LayerRow], model_ms: float, torch_model_ms: float) -> str:
    # Columns as wide as their longest entry (layer names of a ViT run past 40 characters).
    shapes = ["x".join(map(str, r.shape)) for r in rows]
    wl = max([28, *(len(r.layer) for r in rows)])
    wo = max([12, *(len(r.op) for r in rows)])
    ws = max([20, *map(len, shapes)])
    head = (f"{'layer':<{wl}} {'op':<{wo}} {'input shape':<{ws}} {'dlcv_fast ms':>12} "
            f"{'PyTorch ms':>11} {'speedup':>8} {'rate':>16}")
    lines = [head, "-" * len(head)]
    for r, shape in zip(rows, shapes):
        lines.append(f"{r.layer:<{wl}} {r.op:<{wo}} {shape:<{ws}} "
                     f"{r.ms:>12.3f} {r.torch_ms:>11.3f} {r.speedup:>7.2f}x {r.rate:>16}")
    lines.append("-" * len(head))
    ours, theirs = sum(r.ms for r in rows), sum(r.torch_ms for r in rows)
    label = wl + wo + ws + 2
    if rows:
        lines.append(f"{'total of these layers':<{label}} {ours:>12.3f} {theirs:>11.3f} "
                     f"{theirs / ours:>7.2f}x")
    lines.append(f"{'whole forward pass':<{label}} {model_ms:>12.3f} {torch_model_ms:>11.3f} "
                 f"{torch_model_ms / model_ms:>7.2f}x")
    return "\n".join(lines)


def plot(rows: list[LayerRow], path: str, title: str) -> None:
    """Horizontal bars: dlcv_fast and PyTorch time of each layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.22 * n + 1.5)))
    ys = range(n)
    ax.barh([y - 0.2 for y in ys], [r.ms for r in rows], height=0.4, label="dlcv_fast")
    ax.barh([y + 0.2 for y in ys], [r.torch_ms for r in rows], height=0.4, label="PyTorch")
    ax.set_yticks(list(ys), [f"{r.layer} ({r.op})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("forward time (ms, median)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(model_name: str, batch: int, dtype: torch.dtype, image_size: int | None,
         out: str | None, progress: bool = True, budget_s: float = 0.2,
         built: tuple | None = None) -> int:
    """Profiles the model (``built``: build_model's result for it, when already built).
    Raises ModelChoiceError when the model cannot take images of the size."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, channels, size, summary = built or build_model(model_name, image_size)
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    try:  # one image first: a size the model cannot take is a usage error, not a traceback
        with torch.no_grad():
            model.eval()(x[:1], *extra_inputs(model, 1, device))
    except (ValueError, RuntimeError) as e:  # RuntimeError: layers left on torch
        raise ModelChoiceError(f"{model_name} cannot take {channels}x{size}x{size} images: "
                               f"{e}") from e
    env = bench.environment(device)
    print(f"{model_name}, batch {batch}, {channels}x{size}x{size}, "
          f"{str(dtype).removeprefix('torch.')}, forward, eval mode")
    print(f"{env['device']}; torch {env['torch']}; commit {env['commit']}; {env['date']}")
    print(summary)
    rows, ms, torch_ms = profile(model, x, progress=progress, budget_s=budget_s,
                                 extra=extra_inputs(model, batch, device))
    print(format_table(rows, ms, torch_ms))
    path = out or f"demo_output/profile-{model_name}-b{batch}.png"
    plot(rows, path, f"{model_name}, batch {batch}, {str(dtype).removeprefix('torch.')}, "
                     f"{env['device']}")
    print(f"wrote {path}")
    return 0
