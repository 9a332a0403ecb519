"""Helpers shared by the ops and the Triton launchers: output allocation, memory formats
and pooling arithmetic. Pure Python on torch: the fake (meta) implementations use them too,
so they must work on symbolic sizes."""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.autograd.forward_ad as fwAD
from torch._prims_common import suggest_memory_format


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an op's output takes from its 4-D input (PyTorch's rule)."""
    return suggest_memory_format(x) if x.dim() == 4 else torch.contiguous_format


def empty_output(
    shape, like: torch.Tensor, dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format, poison=None,
) -> torch.Tensor:
    """A new output tensor. With ``DLCV_FAST_POISON=1`` it starts as ``poison``, by default
    NaN (int64, which holds indices: its minimum; other integers: their maximum) so that a
    test catches any element a kernel fails to write."""
    dtype = like.dtype if dtype is None else dtype
    out = torch.empty(shape, dtype=dtype, device=like.device, memory_format=memory_format)
    if os.environ.get("DLCV_FAST_POISON") == "1":
        if poison is None:
            if dtype.is_floating_point:
                poison = math.nan
            else:
                poison = torch.iinfo(dtype).min if dtype == torch.int64 else torch.iinfo(dtype).max
        out.fill_(poison)
    return out


def refuse_forward_ad(op: str, *tensors) -> None:
    """Raises if a tensor carries a forward-mode tangent. The autograd formulas registered
    from Python (torch.library.register_autograd: attention, the scheduler step, the Triton
    ops) give outputs no tangent, silently; the C++ ops' autograd::Function refuses one, and
    so does this, with the same word (jvp)."""
    if torch.compiler.is_compiling():  # (no forward-mode AD under torch.compile)
        return
    for t in tensors:
        if t is not None and fwAD.unpack_dual(t).tangent is not None:
            raise forward_ad_error(op)


def forward_ad_error(op: str) -> RuntimeError:
    return RuntimeError(f"{op}: forward-mode AD (jvp) is not implemented; use reverse mode "
                        f"(backward)")


def relu_flag(op: str, activation) -> bool:
    """The ``activation`` keyword of the ops and layers (None or ``"relu"``) as a flag."""
    if activation is None or activation == "relu":
        return activation is not None
    raise ValueError(f"{op}: activation must be None or 'relu', but got {activation!r}")


def pool_output_size(size, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool):
    """torch.nn.functional.max_pool2d's output length along one dimension:
    floor((size + 2p - d(k-1) - 1) / s) + 1, rounded up instead with ceil_mode, where a
    window that would start past the input and its left padding is dropped."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out = out - 1
    return out


def on_device_of(t: torch.Tensor):
    """A context that makes ``t``'s GPU the current one: Triton launches on the current
    device, not on the device of its arguments."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def device_constants(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor of ``values`` on ``device``, copied without waiting for the GPU.
    ``torch.tensor(values, device="cuda")`` copies from pageable memory, which synchronises
    the host with the current stream on every call; a pinned staging copy goes
    asynchronously, and PyTorch's caching host allocator keeps it until the copy is done.
    Not for use under CUDA graph capture: a replay would copy from the host buffer again,
    which the allocator may have handed to someone else by then."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def autotune_bucket(n: int) -> int:
    """The power of two at or above n: a Triton autotune key for a size that varies between
    calls (batch size, sequence length), so that sizes in one bucket reuse one tuning instead
    of benchmarking every config again."""
    return 1 << max(0, int(n) - 1).bit_length()
