"""Which implementation runs an op: ``auto`` | ``cuda`` | ``triton`` | ``cpu``.

- ``cuda``: the CUDA C++ kernels (csrc/cuda), for CUDA tensors.
- ``triton``: the Triton kernels (dlcv_fast/triton_kernels), for CUDA tensors, and for CPU
  tensors when Triton's interpreter is on (``TRITON_INTERPRET=1`` set before triton is
  imported): that is how the tests run them on a machine without a GPU.
- ``cpu``: the C++ CPU kernels (csrc/cpu), for CPU tensors.
- ``auto`` (the default): CUDA tensors go to the faster of cuda and triton for the op
  (``AUTO_GPU``), CPU tensors to cpu.

Choose with :func:`set_backend`, the context manager :func:`use_backend`, or the
environment variable ``DLCV_FAST_BACKEND``. The choice is process-wide (not per thread).
A backend that cannot run a call raises :class:`BackendError`; it never falls back to
another backend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from dlcv_fast._ext import _C

BACKENDS = ("auto", "cuda", "triton", "cpu")

# The GPU backend that `auto` picks for each op. Without a committed GPU benchmark that
# shows triton faster for an op, the CUDA kernels are the default.
AUTO_GPU: dict[str, str] = {
    "conv2d": "cuda", "batch_norm": "cuda", "max_pool2d": "cuda", "add_noise": "cuda",
    "get_velocity": "cuda", "scheduler_step": "cuda",
}
# Attention: the CUDA kernels use tensor cores (WMMA tiles through shared memory) for 16-bit
# types only, the Triton ones (FlashAttention-2's structure) throughout through tl.dot.
AUTO_GPU["scaled_dot_product_attention"] = "triton"

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


class BackendError(RuntimeError):
    """A backend was asked to run a call it cannot run."""

    def __init__(self, op: str, backend: str, reason: str):
        super().__init__(f"dlcv_fast.{op}: the '{backend}' backend cannot run this call: {reason}")
        self.op, self.backend, self.reason = op, backend, reason


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown dlcv_fast backend {name!r}; expected one of {BACKENDS}")
    return name


class _State:
    name = _checked(os.environ.get("DLCV_FAST_BACKEND", "auto"))


def get_backend() -> str:
    """The backend in force: ``auto``, ``cuda``, ``triton`` or ``cpu``."""
    return _State.name


def set_backend(name: str) -> None:
    """Makes ``name`` the backend of every later dlcv_fast call in this process."""
    _State.name = _checked(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs the body of the ``with`` statement on backend ``name``, then restores the last."""
    previous = _State.name
    _State.name = _checked(name)
    try:
        yield
    finally:
        _State.name = previous


def cuda_built() -> bool:
    """Whether the compiled extension holds the CUDA kernels."""
    return _C.cuda_built()


def triton_interpreted() -> bool:
    """Whether Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(backend: str, x: torch.Tensor) -> str | None:
    """The reason ``backend`` cannot run a call on ``x``, or None if it can."""
    if backend == "cpu":
        if x.device.type != "cpu":
            return f"the input is on {x.device}; this backend runs CPU tensors only"
    elif backend == "cuda":
        if x.device.type != "cuda":
            return f"the input is on {x.device}; this backend runs CUDA tensors only"
        if not cuda_built():
            return "dlcv_fast was built without its CUDA kernels (no nvcc or a CPU-only torch)"
    elif backend == "triton":
        if not _TRITON_INSTALLED:
            return "triton is not installed"
        if x.device.type == "cpu":
            if not triton_interpreted():
                return ("the input is on the CPU, which Triton runs only through its "
                        "interpreter (set TRITON_INTERPRET=1 before importing triton)")
            if x.dtype == torch.bfloat16:
                return "Triton's interpreter computes bfloat16 wrongly; run bfloat16 on a GPU"
        elif x.device.type != "cuda":
            return f"the input is on {x.device}; this backend runs CUDA tensors"
    return None


def resolve(op: str, x: torch.Tensor) -> str:
    """The concrete backend (``cuda``, ``triton`` or ``cpu``) that runs ``op`` on ``x``,
    or :class:`BackendError` saying why the chosen one cannot."""
    name = _State.name
    if x.is_cpu and (name == "auto" or name == "cpu"):  # the common case, decided quickly
        return "cpu"
    if x.device.type == "meta":  # shapes only: every backend's ops have fake kernels
        return "cpu" if name == "auto" else name
    if name == "auto":
        if x.device.type == "cpu":
            name = "cpu"
        elif x.device.type == "cuda":
            name = AUTO_GPU.get(op, "cuda")
            if name == "cuda" and not cuda_built():
                name = "triton"
        else:
            raise BackendError(op, "auto", f"no dlcv_fast backend runs tensors on {x.device}")
    reason = _why_not(name, x)
    if reason is not None:
        raise BackendError(op, name, reason)
    return name
