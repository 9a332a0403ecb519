"""torch.autocast for dlcv_fast's ops, with PyTorch's policy for their counterparts.

Under ``torch.autocast(device_type, dtype)`` PyTorch runs convolution and attention in the
autocast dtype (its "lower precision" list, on CUDA and on the CPU): every floating tensor
argument on that device except float64 is cast to it. Batch norm and max pooling have no
rule and run in their input's dtype, which dlcv_fast's do too (batch norm takes a 16-bit
input with float32 parameters). Without this, a converted model under autocast met a
bfloat16 activation with a float32 weight and raised.

The casts are applied twice over, both cheap: by the Python entry points
(:func:`cast_for_autocast`), before their argument checks, and by Autocast kernels
registered for the ops themselves (:func:`register_lower_precision`), for code that calls
``torch.ops.dlcv_fast`` directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

_DEVICE_TYPES = ("cpu", "cuda")
_LIB = torch.library.Library("dlcv_fast", "IMPL")


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, Tensor):
        eligible = (value.is_floating_point() and value.dtype != torch.float64
                    and value.device.type == device_type)
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def cast_for_autocast(device: torch.device, *values):
    """``values`` as autocast would pass them to a convolution or attention on ``device``:
    floating tensors other than float64 in the autocast dtype when autocast is on there,
    else unchanged."""
    if device.type not in _DEVICE_TYPES or not torch.is_autocast_enabled(device.type):
        return values
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(_cast(v, device.type, dtype) for v in values)


def register_lower_precision(name: str) -> None:
    """Registers Autocast kernels (CPU and CUDA) for ``dlcv_fast::name`` that cast its
    eligible arguments to the autocast dtype and run it with autocast off below."""
    op = getattr(torch.ops.dlcv_fast, name).default
    for device_type in _DEVICE_TYPES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        _LIB.impl(name, _autocast_kernel(op, device_type, key), key, with_keyset=True)


def _autocast_kernel(op, device_type: str, key: str):
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*_cast(args, device_type, dtype),
                      **{k: _cast(v, device_type, dtype) for k, v in kwargs.items()})

    return kernel
