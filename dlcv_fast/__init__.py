"""dlcv_fast: hand-written CUDA, Triton and CPU kernels for vision networks, as drop-in
PyTorch ops (``dlcv_fast.max_pool2d``, ...) and layers (``dlcv_fast.nn``).

Every op is registered with torch.library under ``torch.ops.dlcv_fast`` (with fake
implementations and autograd formulas, so torch.compile traces through it), and runs on
the backend chosen with :func:`set_backend` / :func:`use_backend` / ``DLCV_FAST_BACKEND``.
"""

from dlcv_fast._ext import _C  # noqa: F401  (registers the C++ ops)
from dlcv_fast.backend import (
    BACKENDS,
    BackendError,
    cuda_built,
    get_backend,
    set_backend,
    use_backend,
)
from dlcv_fast.ops.conv2d import conv2d
from dlcv_fast.ops.max_pool2d import max_pool2d
from dlcv_fast.ops.batch_norm import batch_norm
from dlcv_fast.ops.noise import add_noise, get_velocity
from dlcv_fast.ops.attention import scaled_dot_product_attention
from dlcv_fast import nn  # noqa: E402
from dlcv_fast.convert import convert, revert  # noqa: E402
from dlcv_fast import models  # noqa: E402
from dlcv_fast import diffusion  # noqa: E402

__version__ = "0.1.0"

# Ops with kernels in every backend, in the order the command line lists them (the sampler
# steps live in dlcv_fast.diffusion).
OPS = ("conv2d", "batch_norm", "scaled_dot_product_attention", "max_pool2d", "add_noise",
       "get_velocity", "ddpm_step", "ddim_step")

__all__ = [
    "BACKENDS",
    "BackendError",
    "OPS",
    "add_noise",
    "batch_norm",
    "conv2d",
    "convert",
    "cuda_built",
    "diffusion",
    "get_backend",
    "get_velocity",
    "max_pool2d",
    "models",
    "nn",
    "revert",
    "scaled_dot_product_attention",
    "set_backend",
    "use_backend",
]
