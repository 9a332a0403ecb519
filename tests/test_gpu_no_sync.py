"""On a GPU the ops queue their kernels and return: no call waits for the device (a
``.item()``, a copy from pageable host memory, a stream synchronisation), so the host runs
ahead of the GPU as it does with PyTorch's own ops. torch.cuda.set_sync_debug_mode("error")
turns any such wait into an error. add_noise and get_velocity are left out: they read the
timesteps' range on the host to raise a clear IndexError (documented)."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKEND_DEVICES

import dlcv_fast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = [b for b, d in BACKEND_DEVICES if d == "cuda"]


def _conv(dtype):
    x = torch.randn(2, 8, 9, 9, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(16, device="cuda", dtype=dtype, requires_grad=True)
    return lambda: dlcv_fast.conv2d(x, w, b, padding=1, activation="relu").sum().backward()


def _batch_norm(dtype):
    x = torch.randn(4, 8, 5, 5, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.rand(8, device="cuda", requires_grad=True)
    b = torch.randn(8, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
    return lambda: dlcv_fast.batch_norm(x, rm, rv, w, b, True).sum().backward()


def _max_pool(dtype):
    x = torch.randn(2, 8, 9, 9, device="cuda", dtype=dtype, requires_grad=True)
    return lambda: dlcv_fast.max_pool2d(x, 3, 2, 1).sum().backward()


def _attention(dtype):
    q, k, v = (torch.randn(2, 4, 33, 64, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    return lambda: dlcv_fast.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()


def _scheduler_step(dtype):
    from dlcv_fast.ops.scheduler_step import scheduler_step

    s = torch.randn(2, 4, 8, 8, device="cuda", dtype=dtype)
    m, z = torch.randn_like(s), torch.randn_like(s)
    coefficients = [1.2, -0.3, 0.0, 1.0, 0.0, 0.0, 0.4, 0.5, 0.0, 0.1, 0.0, 0.0, 1.0]
    return lambda: scheduler_step(m, s, z, None, None, coefficients, 1, 0, False)


CASES = {"conv2d": _conv, "batch_norm": _batch_norm, "max_pool2d": _max_pool,
         "scaled_dot_product_attention": _attention, "scheduler_step": _scheduler_step}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_synchronisation(backend, op, dtype):
    with dlcv_fast.use_backend(backend):
        run = CASES[op](dtype)
        run()  # compiles and tunes the kernels: that may wait
        run()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
