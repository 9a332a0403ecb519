"""Fused noise scheduling for diffusion models: add_noise and get_velocity.

For sample b at timestep t = timesteps[b], with a = alphas_cumprod[t]:

- ``add_noise``:    x_t = sqrt(a) * x0 + sqrt(1 - a) * noise   (the forward process)
- ``get_velocity``: v   = sqrt(a) * noise - sqrt(1 - a) * x0   (the v-prediction target)

One pass over memory: the per-sample coefficients are gathered from the table inside the
kernel (and computed in float64 when the table is float64), the arithmetic is in float32
(float64 for float64 samples) and the result is rounded once. (The plain PyTorch formula, as in the diffusers library, gathers, takes
square roots, casts the coefficients to the sample's dtype and makes three passes.)

Ops (namespace ``dlcv_fast``): ``add_noise``, ``get_velocity``, ``noise_backward`` in C++
(CPU, CUDA, with autograd in C++), and ``*_triton`` twins on the Triton kernels. Both are
differentiable in the sample and the noise, twice.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from dlcv_fast import backend
from dlcv_fast.ops import _func
from dlcv_fast.ops._common import refuse_forward_ad

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_args(op: str, x: Tensor, noise: Tensor, timesteps: Tensor, table: Tensor,
               x_name: str, check_range: bool = True) -> None:
    """The checks of the C++ entry points (csrc/noise.cpp), for the Triton and fake paths."""
    for name, t in ((x_name, x), ("noise", noise), ("timesteps", timesteps),
                    ("alphas_cumprod", table)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, but got {type(t).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: {x_name} must be float32, float64, float16 or bfloat16, "
                        f"but got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: {x_name} must have a batch dimension, but is 0-d")
    for name, t in (("noise", noise), ("timesteps", timesteps), ("alphas_cumprod", table)):
        if t.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {x_name} is on {x.device}; "
                               "expected both on the same device")
    if noise.dtype != x.dtype:
        raise TypeError(f"{op}: noise has dtype {noise.dtype} but {x_name} has {x.dtype}")
    if noise.shape != x.shape:
        raise ValueError(f"{op}: noise must have the shape of {x_name} {tuple(x.shape)}, "
                         f"but got {tuple(noise.shape)}")
    if table.dim() != 1 or table.numel() == 0:
        raise ValueError(f"{op}: alphas_cumprod must be a non-empty 1-D tensor, but got shape "
                         f"{tuple(table.shape)}")
    if not table.dtype.is_floating_point:
        raise TypeError(f"{op}: alphas_cumprod must be floating point, but got {table.dtype}")
    if timesteps.dtype.is_floating_point or timesteps.dtype.is_complex or \
            timesteps.dtype == torch.bool:
        raise TypeError(f"{op}: timesteps must be an integer tensor, but got {timesteps.dtype}")
    if not (timesteps.dim() == 0 or (timesteps.dim() == 1 and timesteps.shape[0] == x.shape[0])):
        raise ValueError(f"{op}: timesteps must hold one timestep per sample (shape "
                         f"({x.shape[0]},)) or be 0-d, but got shape {tuple(timesteps.shape)}")
    if check_range and timesteps.numel() > 0:
        steps = table.shape[0]
        t = timesteps.to(torch.int64)  # in a narrow type the table length would wrap
        if bool(((t < 0) | (t >= steps)).any()):
            raise IndexError(f"{op}: timesteps must lie in [0, {steps}) (the length of "
                             f"alphas_cumprod), but got {int(t.min())} .. {int(t.max())}")


# --- fake implementations -------------------------------------------------------------------

def _combine_fake(x, noise, timesteps, table):
    return torch.empty_like(x, memory_format=suggest_memory_format(x))


def _backward_fake(grad, timesteps, table, velocity):
    fmt = suggest_memory_format(grad)
    return torch.empty_like(grad, memory_format=fmt), torch.empty_like(grad, memory_format=fmt)


for _name in ("add_noise", "get_velocity"):
    torch.library.register_fake(f"dlcv_fast::{_name}")(_combine_fake)
torch.library.register_fake("dlcv_fast::noise_backward")(_backward_fake)


# --- the Triton backend ---------------------------------------------------------------------

def _triton_inputs(x, timesteps, table):
    fmt = suggest_memory_format(x)
    table_type = torch.float64 if table.dtype == torch.float64 else torch.float32
    t = timesteps.to(torch.int64).expand(x.shape[0]).contiguous()
    return x.contiguous(memory_format=fmt), fmt, t, table.to(table_type).contiguous()


def _triton_combine(op, x, noise, timesteps, table, velocity, x_name):
    from dlcv_fast.triton_kernels import noise as kernels

    check_args(op, x, noise, timesteps, table, x_name)
    xc, fmt, t, tab = _triton_inputs(x, timesteps, table)
    return kernels.combine(xc, noise.contiguous(memory_format=fmt), t, tab, velocity)


@torch.library.custom_op("dlcv_fast::add_noise_triton", mutates_args=())
def _add_noise_triton(original_samples: Tensor, noise: Tensor, timesteps: Tensor,
                      alphas_cumprod: Tensor) -> Tensor:
    return _triton_combine("add_noise", original_samples, noise, timesteps, alphas_cumprod,
                           False, "original_samples")


@torch.library.custom_op("dlcv_fast::get_velocity_triton", mutates_args=())
def _get_velocity_triton(sample: Tensor, noise: Tensor, timesteps: Tensor,
                         alphas_cumprod: Tensor) -> Tensor:
    return _triton_combine("get_velocity", sample, noise, timesteps, alphas_cumprod, True,
                           "sample")


@torch.library.custom_op("dlcv_fast::noise_backward_triton", mutates_args=())
def _noise_backward_triton(grad: Tensor, timesteps: Tensor, alphas_cumprod: Tensor,
                           velocity: bool) -> tuple[Tensor, Tensor]:
    from dlcv_fast.triton_kernels import noise as kernels

    check_args("noise_backward", grad, grad, timesteps, alphas_cumprod, "grad")
    g, _, t, tab = _triton_inputs(grad, timesteps, alphas_cumprod)
    return kernels.backward(g, t, tab, velocity)


_add_noise_triton.register_fake(_combine_fake)
_get_velocity_triton.register_fake(_combine_fake)
_noise_backward_triton.register_fake(_backward_fake)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2], inputs[3])


def _backward_with(backward_op, velocity: bool):
    def backward(ctx, grad):
        timesteps, table = ctx.saved_tensors
        gx, ge = backward_op(grad, timesteps, table, velocity)
        return gx, ge, None, None

    return backward


def _setup_double(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.velocity = inputs[3]


def _double_backward_with(forward_ops: dict):
    def backward(ctx, grad_x, grad_e):
        # noise_backward is (cx g, ce g): its adjoint is cx gx + ce ge, the forward op again.
        timesteps, table = ctx.saved_tensors
        grad_x = torch.zeros_like(grad_e) if grad_x is None else grad_x
        grad_e = torch.zeros_like(grad_x) if grad_e is None else grad_e
        op = forward_ops["get_velocity" if ctx.velocity else "add_noise"]
        return op(grad_x, grad_e, timesteps, table), None, None, None

    return backward


# Batching rules (torch.vmap): the vmapped samples fold into the batch dim, each sample's
# timestep repeated over it. A vmapped table is rare: looped.

def _timesteps_folded(timesteps, dim, n: int, batch: int) -> Tensor:
    t = _func.batched(timesteps, dim, n)
    return (t.unsqueeze(1).expand(n, batch) if t.dim() == 1 else t).reshape(-1)


def _combine_vmap_with(op):
    def rule(info, in_dims, x, noise, timesteps, table):
        if in_dims[3] is not None:
            return _func.looped(op, info, in_dims, x, noise, timesteps, table)
        n = info.batch_size
        xb, eb = _func.batched(x, in_dims[0], n), _func.batched(noise, in_dims[1], n)
        t = _timesteps_folded(timesteps, in_dims[2], n, xb.shape[1])
        return op(xb.flatten(0, 1), eb.flatten(0, 1), t, table).unflatten(0, xb.shape[:2]), 0

    return rule


def _backward_vmap_with(op):
    def rule(info, in_dims, grad, timesteps, table, velocity):
        if in_dims[2] is not None:
            return _func.looped(op, info, in_dims, grad, timesteps, table, velocity)
        g = _func.batched(grad, in_dims[0], info.batch_size)
        t = _timesteps_folded(timesteps, in_dims[1], info.batch_size, g.shape[1])
        gx, ge = op(g.flatten(0, 1), t, table, velocity)
        return (gx.unflatten(0, g.shape[:2]), ge.unflatten(0, g.shape[:2])), (0, 0)

    return rule


def _ops(suffix: str) -> dict:
    return {name: _func.Op(getattr(torch.ops.dlcv_fast, name + suffix))
            for name in ("add_noise", "get_velocity", "noise_backward")}


# The C++ ops have their autograd in C++ (csrc/dlcv_fast.cpp); the same formulas in Python
# serve torch.func.
_CPP, _TRITON = _ops(""), _ops("_triton")
for _table in (_CPP, _TRITON):
    _library = _table is _TRITON
    for _name, _velocity in (("add_noise", False), ("get_velocity", True)):
        _func.register_autograd(_table[_name], _backward_with(_table["noise_backward"], _velocity),
                                _setup, library=_library)
        _func.register_vmap(_table[_name], _combine_vmap_with(_table[_name]))
    _func.register_autograd(_table["noise_backward"], _double_backward_with(_table),
                            _setup_double, library=_library)
    _func.register_vmap(_table["noise_backward"], _backward_vmap_with(_table["noise_backward"]))


# --- the functional entry points -------------------------------------------------------------

def _timesteps(timesteps, device) -> Tensor:
    """A tensor of timesteps: from an int (NumPy's too), a sequence or an array of them, on
    the samples' device; a one-element tensor is one timestep for every sample."""
    if not isinstance(timesteps, Tensor):
        if isinstance(timesteps, bool) or not isinstance(
                timesteps, (numbers.Integral, list, tuple, np.ndarray)):
            raise TypeError(f"timesteps must be an integer tensor, an int or a sequence of "
                            f"ints, but got {type(timesteps).__name__}")
        timesteps = torch.as_tensor(timesteps, device=device)
    if timesteps.dim() == 1 and timesteps.numel() == 1:
        return timesteps.reshape(())  # torch.tensor([t]): one timestep for every sample
    return timesteps


def _run(op: str, x: Tensor, noise: Tensor, timesteps, alphas_cumprod: Tensor) -> Tensor:
    for name, value in (("the samples", x), ("noise", noise), ("alphas_cumprod", alphas_cumprod)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, but got {type(value).__name__}")
    if alphas_cumprod.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: alphas_cumprod requires grad, but its gradient is not "
                         "computed; pass alphas_cumprod.detach()")
    name = backend.resolve(op, x)
    if name == "triton":
        refuse_forward_ad(op, x, noise)
    table = _TRITON if name == "triton" else _CPP
    return table[op](x, noise, _timesteps(timesteps, x.device), alphas_cumprod)


def add_noise(original_samples: Tensor, noise: Tensor, timesteps: Tensor | int,
              alphas_cumprod: Tensor) -> Tensor:
    """sqrt(a_t) * original_samples + sqrt(1 - a_t) * noise, a_t = alphas_cumprod[t] per
    sample, in one pass.

    Args:
        original_samples: (B, ...) float32, float64, float16 or bfloat16, any layout; the
            result takes its memory format.
        noise: same shape and dtype.
        timesteps: (B,) integer tensor (or sequence or array of ints), one per sample, or
            a 0-d or one-element tensor or an int for all.
        alphas_cumprod: 1-D table of alpha_bar (float32 or float64) on the same device; not
            differentiated (one that requires grad is refused).

    Stricter than diffusers' formula, which the schedulers' ``add_noise`` follows (noise
    broadcast and dtype promotion, timesteps and table moved to the samples' device).
    Differentiable in original_samples and noise. Timesteps outside the table raise
    IndexError (checking costs one host synchronisation on a GPU).
    """
    return _run("add_noise", original_samples, noise, timesteps, alphas_cumprod)


def get_velocity(sample: Tensor, noise: Tensor, timesteps: Tensor | int,
                 alphas_cumprod: Tensor) -> Tensor:
    """The v-prediction target sqrt(a_t) * noise - sqrt(1 - a_t) * sample, in one pass;
    arguments as :func:`add_noise`."""
    return _run("get_velocity", sample, noise, timesteps, alphas_cumprod)


__all__ = ["add_noise", "get_velocity"]
