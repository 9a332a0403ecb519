"""Benchmark harness: each op of each backend against PyTorch on the same inputs, in the
same run, as medians after warm-up.

GPU times come from ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
run); CPU times from a synchronous host clock. Memory-bound ops report GB/s and the
fraction of the copy bandwidth measured in the same run (``x.copy_(y)`` on a buffer far
larger than the caches), which is the ceiling a streaming kernel can reach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

import dlcv_fast


@dataclasses.dataclass
class Result:
    op: str
    case: str
    shape: tuple
    dtype: str
    layout: str
    direction: str  # forward | backward
    backend: str
    ms: float
    torch_ms: float
    bytes: int
    flops: int = 0  # compute-bound ops: floating-point operations of one call

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.ms

    @property
    def tflops(self) -> float:
        return self.flops / self.ms / 1e9

    @property
    def gbps(self) -> float:
        return self.bytes / self.ms / 1e6


_CPU_FLUSH_BYTES = 256 << 20  # larger than any CPU's last-level cache


def median_ms(fn: Callable[[], object], device: torch.device, budget_s: float = 0.5) -> float:
    """Median time of fn() in milliseconds, with cold caches: on a GPU the L2 is flushed
    before each run (do_bench), on the CPU a buffer larger than the caches is written."""
    return median_ms_many([fn], device, budget_s)[0]


def median_ms_many(fns: Sequence[Callable[[], object]], device: torch.device,
                   budget_s: float = 0.5) -> list[float]:
    """median_ms of each of fns. On the CPU they run in turns, one run of each per round, so
    that whatever else the machine does (other processes, page faults of fresh outputs,
    frequency changes) falls on all of them alike: timed one after the other, the same
    PyTorch op moved by up to 3x between runs of the benchmark on a shared 2-core machine."""
    with dlcv_fast.use_backend(dlcv_fast.get_backend()):  # in_backend's fns change it
        if device.type == "cuda":
            import triton.testing

            return [float(triton.testing.do_bench(fn, warmup=25, rep=max(100, budget_s * 200),
                                                  return_mode="median")) for fn in fns]
        return _cpu_medians_ms(fns, budget_s)


def _cpu_medians_ms(fns: Sequence[Callable[[], object]], budget_s: float) -> list[float]:
    flush = torch.empty(_CPU_FLUSH_BYTES // 4, dtype=torch.float32)
    for fn in fns:
        for _ in range(3):  # warm-up, also of the allocator
            fn()
    times: list[list[float]] = [[] for _ in fns]
    deadline = time.perf_counter() + budget_s * len(fns)
    while len(times[0]) < 5 or (time.perf_counter() < deadline and len(times[0]) < 50):
        for fn, runs in zip(fns, times):
            flush.zero_()
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(runs) for runs in times]


def against_torch(device: torch.device, torch_fn: Callable[[], object],
                  ours: dict[str, Callable[[], object]],
                  budget_s: float = 0.5) -> tuple[float, dict[str, float]]:
    """(PyTorch's median ms, {backend: median ms}), measured together (median_ms_many)."""
    times = median_ms_many([torch_fn, *ours.values()], device, budget_s)
    return times[0], dict(zip(ours, times[1:]))


def within(context: Callable[[], object], fn: Callable[[], object]) -> Callable[[], object]:
    """fn, run inside a new ``context()`` each time."""
    def run():
        with context():
            return fn()

    return run


def in_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    """fn, run with dlcv_fast's layers on ``backend``. The backend is set by assignment, not
    in a ``with`` block: with cold caches a context manager's enter and exit cost 30-60 us
    (2-core Zen 4), which would be charged to dlcv_fast alone. median_ms_many restores the
    backend it found."""
    def run():
        dlcv_fast.set_backend(backend)
        return fn()

    return run


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / ms / 1e6


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matrix-product throughput in TFLOP/s (torch.mm on square matrices), measured
    now: the ceiling a compute-bound kernel in that dtype can approach."""
    n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b), device)
    return 2 * n**3 / ms / 1e9


# --- max_pool2d ------------------------------------------------------------------------------

# (network.layer, C, H, W, kernel, stride, padding): the max-pooling layers of AlexNet,
# VGG-16 and ResNet-50 (torchvision's, 224 x 224 input).
POOL_LAYERS = [
    ("alexnet.pool1", 64, 55, 55, 3, 2, 0),
    ("alexnet.pool2", 192, 27, 27, 3, 2, 0),
    ("alexnet.pool3", 256, 13, 13, 3, 2, 0),
    ("vgg16.pool1", 64, 224, 224, 2, 2, 0),
    ("vgg16.pool2", 128, 112, 112, 2, 2, 0),
    ("vgg16.pool3", 256, 56, 56, 2, 2, 0),
    ("vgg16.pool4", 512, 28, 28, 2, 2, 0),
    ("vgg16.pool5", 512, 14, 14, 2, 2, 0),
    ("resnet50.pool", 64, 112, 112, 3, 2, 1),
]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def bench_max_pool2d(device: torch.device, dtypes, batch: int, backends, layers=None,
                     layouts=("nchw", "channels_last")) -> Iterator[Result]:
    for name, c, h, w, k, s, p in layers or POOL_LAYERS:
        for dtype in dtypes:
            for layout in layouts:
                x = _layout(torch.randn(batch, c, h, w, device=device, dtype=dtype), layout)
                args = ([k, k], [s, s], [p, p], [1, 1], False)
                ref_out, ref_idx = F.max_pool2d(x, k, s, p, return_indices=True)
                grad = torch.randn_like(ref_out)
                e = x.element_size()
                fwd_bytes = x.numel() * e + ref_out.numel() * (e + 8)
                bwd_bytes = ref_out.numel() * (e + 8) + x.numel() * e
                common = dict(op="max_pool2d", case=name, shape=tuple(x.shape),
                              dtype=str(dtype).removeprefix("torch."), layout=layout)
                fwds, bwds = {}, {}
                for backend in backends:
                    fwd, bwd = _forward_op(backend), _backward_op(backend)
                    out, idx = fwd(x, *args)
                    if not (torch.equal(out, ref_out) and torch.equal(idx, ref_idx)):
                        raise AssertionError(f"max_pool2d {backend} disagrees with PyTorch on "
                                             f"{name} {dtype} {layout}")
                    fwds[backend] = lambda fwd=fwd: fwd(x, *args)
                    bwds[backend] = lambda bwd=bwd, idx=idx: bwd(grad, x, idx, *args)
                torch_fwd, fwd_ms = against_torch(device, lambda: F.max_pool2d(x, k, s, p), fwds)
                torch_bwd, bwd_ms = against_torch(
                    device, lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                        grad, x, *args[:4], False, ref_idx), bwds)
                for backend in backends:
                    yield Result(**common, direction="forward", backend=backend,
                                 ms=fwd_ms[backend], torch_ms=torch_fwd, bytes=fwd_bytes)
                    yield Result(**common, direction="backward", backend=backend,
                                 ms=bwd_ms[backend], torch_ms=torch_bwd, bytes=bwd_bytes)


def _forward_op(backend: str):
    if backend == "triton":
        return torch.ops.dlcv_fast.max_pool2d_triton
    return torch.ops.dlcv_fast.max_pool2d


def _backward_op(backend: str):
    if backend == "triton":
        return torch.ops.dlcv_fast.max_pool2d_backward_triton
    return torch.ops.dlcv_fast.max_pool2d_backward


# --- add_noise, get_velocity ----------------------------------------------------------------

def ddpm_alphas_cumprod():
    """alpha_bar of DDPM's linear schedule (1000 steps, betas 1e-4 to 0.02), float32."""
    from dlcv_fast.diffusion import alphas_cumprod_from_betas, make_betas

    return alphas_cumprod_from_betas(make_betas(dtype=torch.float64))


# (name, shape): latent-diffusion latents and pixel-space images.
NOISE_SHAPES = [("latents", (64, 4, 64, 64)), ("pixels", (16, 3, 256, 256))]


def torch_noise_formula(op: str, x, noise, timesteps, alphas_cumprod):
    """The formula as plain PyTorch ops, written the way the diffusers library writes it:
    gather, square roots, cast to the sample's dtype, broadcast, then three passes."""
    a = alphas_cumprod[timesteps]
    signal = (a**0.5).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    noise_scale = ((1 - a) ** 0.5).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    if op == "add_noise":
        return signal * x + noise_scale * noise
    return signal * noise - noise_scale * x


def _noise_bench(op: str):
    def bench(device: torch.device, dtypes, batch: int, backends) -> Iterator[Result]:
        table = ddpm_alphas_cumprod().to(device)
        for name, shape in NOISE_SHAPES:
            for dtype in dtypes:
                x = torch.randn(shape, device=device, dtype=dtype)
                noise = torch.randn_like(x)
                t = torch.randint(0, 1000, (shape[0],), device=device)
                fns = {b: getattr(torch.ops.dlcv_fast, op + ("_triton" if b == "triton" else ""))
                       for b in backends}
                torch_ms, ms = against_torch(
                    device, lambda: torch_noise_formula(op, x, noise, t, table),
                    {b: (lambda fn=fn: fn(x, noise, t, table)) for b, fn in fns.items()})
                for backend in backends:
                    yield Result(op=op, case=name, shape=tuple(shape),
                                 dtype=str(dtype).removeprefix("torch."), layout="nchw",
                                 direction="forward", backend=backend, ms=ms[backend],
                                 torch_ms=torch_ms, bytes=3 * x.numel() * x.element_size())

    return bench


# --- ddpm_step, ddim_step ---------------------------------------------------------------

def torch_step_formula(op: str, model_output, sample, noise, alphas_cumprod, t: int,
                       prev_t: int):
    """One step as plain PyTorch ops, the way diffusers writes it (epsilon prediction, x0
    clipped to [-1, 1]; DDPM: fixed_small variance; DDIM: eta = 0)."""
    a_t, a_prev = float(alphas_cumprod[t]), float(alphas_cumprod[prev_t])
    x0 = (sample - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
    x0 = x0.clamp(-1, 1)
    if op == "ddpm_step":
        cur_a = a_t / a_prev
        prev = (a_prev**0.5 * (1 - cur_a) / (1 - a_t)) * x0 + (
            cur_a**0.5 * (1 - a_prev) / (1 - a_t)) * sample
        variance = (1 - a_prev) / (1 - a_t) * (1 - cur_a)
        return prev + variance**0.5 * noise, x0
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * model_output, x0


def fused_step(op: str, model_output, sample, noise, alphas_cumprod, t: int, prev_t: int):
    """The same step as torch_step_formula, by dlcv_fast: (prev_sample, x0)."""
    from dlcv_fast.diffusion import ddim_step, ddpm_step

    if op == "ddpm_step":
        out = ddpm_step(model_output, t, sample, alphas_cumprod, prev_timestep=prev_t,
                        variance_noise=noise)
    else:
        out = ddim_step(model_output, t, sample, alphas_cumprod, prev_timestep=prev_t)
    return out.prev_sample, out.pred_original_sample


def _step_bench(op: str):
    def bench(device: torch.device, dtypes, batch: int, backends) -> Iterator[Result]:
        table = ddpm_alphas_cumprod()
        t, prev_t = 500, 480
        for name, shape in NOISE_SHAPES:
            for dtype in dtypes:
                m = torch.randn(shape, device=device, dtype=dtype)
                s = torch.randn_like(m)
                z = torch.randn_like(m)
                moved = (5 if op == "ddpm_step" else 4) * m.numel() * m.element_size()
                torch_ms, ms = against_torch(
                    device, lambda: torch_step_formula(op, m, s, z, table, t, prev_t),
                    {b: in_backend(b, lambda: fused_step(op, m, s, z, table, t, prev_t))
                     for b in backends})
                for backend in backends:
                    yield Result(op=op, case=name, shape=tuple(shape),
                                 dtype=str(dtype).removeprefix("torch."), layout="nchw",
                                 direction="forward", backend=backend, ms=ms[backend],
                                 torch_ms=torch_ms, bytes=moved)

    return bench


# --- conv2d ------------------------------------------------------------------------------------

# (name, C, H, W, O, kernel, stride, padding): the distinct convolutions of torchvision's
# ResNet-50 (224 x 224 input; the stride of a bottleneck sits on its 3x3 convolution).
CONV_LAYERS = [
    ("stem.7x7s2", 3, 224, 224, 64, 7, 2, 3),
    ("l1.1x1.64-64", 64, 56, 56, 64, 1, 1, 0),
    ("l1.3x3.64", 64, 56, 56, 64, 3, 1, 1),
    ("l1.1x1.64-256", 64, 56, 56, 256, 1, 1, 0),
    ("l1.1x1.256-64", 256, 56, 56, 64, 1, 1, 0),
    ("l2.1x1.256-128", 256, 56, 56, 128, 1, 1, 0),
    ("l2.3x3s2.128", 128, 56, 56, 128, 3, 2, 1),
    ("l2.ds.256-512s2", 256, 56, 56, 512, 1, 2, 0),
    ("l2.1x1.128-512", 128, 28, 28, 512, 1, 1, 0),
    ("l2.1x1.512-128", 512, 28, 28, 128, 1, 1, 0),
    ("l2.3x3.128", 128, 28, 28, 128, 3, 1, 1),
    ("l3.1x1.512-256", 512, 28, 28, 256, 1, 1, 0),
    ("l3.3x3s2.256", 256, 28, 28, 256, 3, 2, 1),
    ("l3.ds.512-1024s2", 512, 28, 28, 1024, 1, 2, 0),
    ("l3.1x1.256-1024", 256, 14, 14, 1024, 1, 1, 0),
    ("l3.1x1.1024-256", 1024, 14, 14, 256, 1, 1, 0),
    ("l3.3x3.256", 256, 14, 14, 256, 3, 1, 1),
    ("l4.1x1.1024-512", 1024, 14, 14, 512, 1, 1, 0),
    ("l4.3x3s2.512", 512, 14, 14, 512, 3, 2, 1),
    ("l4.ds.1024-2048s2", 1024, 14, 14, 2048, 1, 2, 0),
    ("l4.1x1.512-2048", 512, 7, 7, 2048, 1, 1, 0),
    ("l4.1x1.2048-512", 2048, 7, 7, 512, 1, 1, 0),
    ("l4.3x3.512", 512, 7, 7, 512, 3, 1, 1),
]


def _close_enough(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """A sanity check for benchmarks: the largest difference against the largest value,
    loose enough for TF32 and 16-bit rounding."""
    tol = 5e-2 if actual.dtype in (torch.float16, torch.bfloat16) else 1e-2
    scale = expected.abs().max().item() or 1.0
    return (actual.double() - expected.double()).abs().max().item() <= tol * scale


def bench_conv2d(device: torch.device, dtypes, batch: int, backends, layers=None,
                 layouts=None) -> Iterator[Result]:
    """Forward, backward (dgrad + wgrad) and conv + bias + ReLU, against F.conv2d,
    aten.convolution_backward and F.conv2d followed by relu."""
    layouts = layouts or (("channels_last",) if device.type == "cuda"
                          else ("nchw", "channels_last"))
    for name, c, h, w, o, k, s, p in layers or CONV_LAYERS:
        for dtype in dtypes:
            for layout in layouts:
                x = _layout(torch.randn(batch, c, h, w, device=device, dtype=dtype), layout)
                weight = _layout(torch.randn(o, c, k, k, device=device, dtype=dtype)
                                 / (c * k * k) ** 0.5, layout)
                bias = torch.randn(o, device=device, dtype=dtype)
                ref = F.conv2d(x, weight, None, s, p)
                gy = torch.randn_like(ref)
                params = ([s, s], [p, p, p, p], [1, 1], 1)
                flops = 2 * ref.numel() * c * k * k
                e = x.element_size()
                moved = (x.numel() + weight.numel() + ref.numel()) * e
                torch_fns = {
                    "forward": lambda: F.conv2d(x, weight, None, s, p),
                    "backward": lambda: torch.ops.aten.convolution_backward(
                        gy, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                        [True, True, False]),
                    "fused": lambda: F.conv2d(x, weight, bias, s, p).relu(),
                }
                common = dict(op="conv2d", case=name, shape=tuple(x.shape),
                              dtype=str(dtype).removeprefix("torch."), layout=layout)
                runs: dict[str, dict[str, Callable[[], object]]] = {d: {} for d in torch_fns}
                for backend in backends:
                    suffix = "_triton" if backend == "triton" else ""
                    fwd = getattr(torch.ops.dlcv_fast, "conv2d" + suffix)
                    dgrad = getattr(torch.ops.dlcv_fast, "conv2d_backward_input" + suffix)
                    wgrad = getattr(torch.ops.dlcv_fast, "conv2d_backward_weight" + suffix)
                    if not _close_enough(fwd(x, weight, None, *params, False), ref):
                        raise AssertionError(f"conv2d {backend} disagrees with PyTorch on "
                                             f"{name} {dtype} {layout}")
                    runs["forward"][backend] = lambda fwd=fwd: fwd(x, weight, None, *params, False)
                    runs["backward"][backend] = lambda dgrad=dgrad, wgrad=wgrad: (
                        dgrad(gy, x, weight, *params), wgrad(gy, x, weight, *params))
                    runs["fused"][backend] = lambda fwd=fwd: fwd(x, weight, bias, *params, True)
                for direction, torch_fn in torch_fns.items():
                    torch_ms, ms = against_torch(device, torch_fn, runs[direction])
                    for backend in backends:
                        yield Result(**common, direction=direction, backend=backend,
                                     ms=ms[backend], torch_ms=torch_ms, bytes=moved,
                                     flops=2 * flops if direction == "backward" else flops)
# --- batch_norm ------------------------------------------------------------------------------

# (layer, C, H, W): the distinct batch-norm shapes of torchvision's ResNet-50 at 224 x 224.
BN_LAYERS = [
    ("resnet50.bn1", 64, 112, 112),
    ("layer1.64", 64, 56, 56),
    ("layer1.256", 256, 56, 56),
    ("layer2.128a", 128, 56, 56),
    ("layer2.128", 128, 28, 28),
    ("layer2.512", 512, 28, 28),
    ("layer3.256a", 256, 28, 28),
    ("layer3.256", 256, 14, 14),
    ("layer3.1024", 1024, 14, 14),
    ("layer4.512a", 512, 14, 14),
    ("layer4.512", 512, 7, 7),
    ("layer4.2048", 2048, 7, 7),
]


def _bn_train_step(fn, x, w, b, rm, rv, g):
    """One training step of a batch norm: forward with batch statistics, then the gradients
    of input, weight and bias."""
    def step():
        out = fn(x, rm, rv, w, b)
        return torch.autograd.grad(out, (x, w, b), g)

    return step


def bench_batch_norm(device: torch.device, dtypes, batch: int, backends, layers=None,
                     layouts=("nchw", "channels_last")) -> Iterator[Result]:
    """Training forward + backward against F.batch_norm, and batch norm + ReLU fused
    against F.batch_norm followed by F.relu. Bytes: the two passes of each direction
    (forward reads x twice and writes y; backward reads x and dy twice and writes dx)."""
    for name, c, h, w_ in layers or BN_LAYERS:
        for dtype in dtypes:
            for layout in layouts:
                x = _layout(torch.randn(batch, c, h, w_, device=device, dtype=dtype), layout)
                x.requires_grad_()
                pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
                weight = torch.rand(c, device=device, dtype=pdt, requires_grad=True)
                bias = torch.randn(c, device=device, dtype=pdt, requires_grad=True)
                rm = torch.zeros(c, device=device, dtype=pdt)
                rv = torch.ones(c, device=device, dtype=pdt)
                g = torch.randn_like(x)
                moved = 8 * x.numel() * x.element_size()

                def torch_bn(x, rm, rv, w, b):
                    return F.batch_norm(x, rm, rv, w, b, True)

                def torch_bn_relu(x, rm, rv, w, b):
                    return F.relu(F.batch_norm(x, rm, rv, w, b, True))

                def ours(x, rm, rv, w, b):
                    return dlcv_fast.batch_norm(x, rm, rv, w, b, True)

                def ours_relu(x, rm, rv, w, b):
                    return dlcv_fast.batch_norm(x, rm, rv, w, b, True, activation="relu")

                common = dict(op="batch_norm", case=name, shape=tuple(x.shape),
                              dtype=str(dtype).removeprefix("torch."), layout=layout,
                              bytes=moved)
                for direction, ref_fn, fn in (("fwd+bwd", torch_bn, ours),
                                              ("fwd+bwd+relu", torch_bn_relu, ours_relu)):
                    for backend in backends:
                        with dlcv_fast.use_backend(backend):
                            want = ref_fn(x, rm.clone(), rv.clone(), weight, bias)
                            got = fn(x, rm.clone(), rv.clone(), weight, bias)
                        tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
                        if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
                            raise AssertionError(f"batch_norm {backend} disagrees with "
                                                 f"PyTorch on {name} {dtype} {layout}")
                    torch_ms, ms = against_torch(
                        device, _bn_train_step(ref_fn, x, weight, bias, rm, rv, g),
                        {b: in_backend(b, _bn_train_step(fn, x, weight, bias, rm, rv, g))
                         for b in backends})
                    for backend in backends:
                        yield Result(**common, direction=direction, backend=backend,
                                     ms=ms[backend], torch_ms=torch_ms)
# --- scaled_dot_product_attention ------------------------------------------------------------

def _attention_cases(device: torch.device):
    """(B, H, L, D, causal). GPU: B * L = 16k tokens, H * D = 2048, L = 512 .. 16k, D = 64
    and 128. CPU: one sequence of 8 heads, L = 256 .. 2048, D = 64."""
    if device.type == "cuda":
        return [(16384 // L, 2048 // D, L, D, causal) for D in (64, 128)
                for L in (512, 1024, 2048, 4096, 8192, 16384) for causal in (False, True)]
    return [(1, 8, L, 64, causal) for L in (256, 512, 1024, 2048) for causal in (False, True)]


def _torch_sdpa_variants(device: torch.device, dtype: torch.dtype):
    """(label, context or None) of PyTorch's SDPA to compare with: its own choice of backend,
    and on a GPU also its FlashAttention-2 backend alone (float16 / bfloat16 only)."""
    out = [("vs sdpa", None)]
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        out.append(("vs flash", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)))
    return out


def bench_attention(device: torch.device, dtypes, batch: int, backends) -> Iterator[Result]:
    """Forward and backward against F.scaled_dot_product_attention on the same inputs.
    FLOPs: 4 B H L S D forward (half when causal), 2.5 times that backward. (``batch`` is
    unused: the cases fix the number of tokens.)"""
    from dlcv_fast.ops.attention import _FORWARD

    for B, H, L, D, causal in _attention_cases(device):
        for dtype in dtypes:
            q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            grad = torch.randn(B, H, L, D, device=device, dtype=dtype)
            flops = 4 * B * H * L * L * D // (2 if causal else 1)
            moved = 4 * B * H * L * D * q.element_size()
            case = f"L{L}-D{D}{'-causal' if causal else ''}"
            scale = D ** -0.5
            for label, ctx in _torch_sdpa_variants(device, dtype):
                with ctx() if ctx else contextlib.nullcontext():
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                common = dict(op="scaled_dot_product_attention", case=case, shape=(B, H, L, D),
                              dtype=str(dtype).removeprefix("torch."), layout=label)
                fwds, bwds = {}, {}
                for backend in backends:
                    op = _FORWARD[backend]
                    out = op(q, k, v, None, 0.0, causal, scale, 0)[0]
                    err = (out - ref).abs().max().item()
                    if err > (1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4):
                        raise AssertionError(f"attention {backend} disagrees with PyTorch on "
                                             f"{case} {dtype}: {err}")
                    fwds[backend] = lambda op=op: op(q, k, v, None, 0.0, causal, scale, 0)
                    bwds[backend] = lambda out=out: torch.autograd.grad(
                        out, (q, k, v), grad, retain_graph=True)
                torch_sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                torch_fwd, fwd_ms = against_torch(
                    device, torch_sdpa if ctx is None else within(ctx, torch_sdpa), fwds)
                torch_bwd, bwd_ms = against_torch(device, lambda: torch.autograd.grad(
                    ref, (q, k, v), grad, retain_graph=True), bwds)
                for backend in backends:
                    yield Result(**common, direction="forward", backend=backend,
                                 ms=fwd_ms[backend], torch_ms=torch_fwd, bytes=moved, flops=flops)
                    yield Result(**common, direction="backward", backend=backend,
                                 ms=bwd_ms[backend], torch_ms=torch_bwd, bytes=2 * moved,
                                 flops=flops * 5 // 2)


# --- whole models ------------------------------------------------------------------------------

# (model, pass, batch divisor, image size, layout): the issue's model benchmarks. A "train
# step" is forward, cross-entropy, backward and an SGD step; "fwd+bwd" stops before the step.
# The batch is the command's (GPU default 128, so ViT-B/16 runs 64).
MODEL_CASES = [
    ("resnet50", "train step", 1, 224, "channels_last"),
    ("vit_b_16", "fwd+bwd", 2, 224, "nchw"),
]


def _model_pair(name: str, image_size: int, device, dtype, layout):
    """dlcv_fast's and torchvision's model with the same random weights."""
    import torchvision

    from dlcv_fast import models

    kwargs = {"image_size": image_size} if name.startswith("vit") else {}
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(name, weights=None, **kwargs)
    ours = models.MODELS[name](**kwargs)
    ours.load_state_dict(theirs.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [m.to(device=device, dtype=dtype, memory_format=fmt).train() for m in (ours, theirs)]


def _model_step(model, x, target, train_step: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if train_step else None

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        if opt is not None:
            opt.step()

    return step


def bench_models(device: torch.device, dtypes, batch: int, backends, cases=None,
                 budget_s: float = 5.0) -> Iterator[Result]:
    """ResNet-50 training steps and ViT-B/16 forward+backward: dlcv_fast's model (its
    layers on each backend) against torchvision's in PyTorch eager, same weights and inputs.
    FLOPs of one step are counted by torch's FlopCounterMode on torchvision's model."""
    from torch.utils.flop_counter import FlopCounterMode

    for name, kind, divisor, size, layout in cases or MODEL_CASES:
        n = max(1, batch // divisor)
        for dtype in dtypes:
            ours, theirs = _model_pair(name, size, device, dtype, layout)
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.randn(n, 3, size, size, device=device, dtype=dtype).contiguous(
                memory_format=fmt)
            target = torch.randint(0, 1000, (n,), device=device)
            train_step = kind == "train step"
            # Sanity check first, in float32 and eval mode (no batch statistics).
            check_pair = [m.float().eval() for m in _model_pair(name, size, device,
                                                                 torch.float32, layout)]
            with torch.no_grad():
                probe = x[:2].float()
                expected = check_pair[1](probe)
                for backend in backends:
                    with dlcv_fast.backend.use_backend(backend):
                        if not _close_enough(check_pair[0](probe), expected):
                            raise AssertionError(f"{name} on {backend} disagrees with "
                                                 "torchvision's")
            del check_pair
            with FlopCounterMode(display=False) as counter:
                _model_step(theirs, x, target, False)()
            flops = counter.get_total_flops()
            params = sum(p.numel() for p in ours.parameters()) * x.element_size()
            torch_ms, ms = against_torch(
                device, _model_step(theirs, x, target, train_step),
                {b: in_backend(b, _model_step(ours, x, target, train_step)) for b in backends},
                budget_s)
            del theirs, ours
            for backend in backends:
                yield Result(op="models", case=name, shape=tuple(x.shape),
                             dtype=str(dtype).removeprefix("torch."), layout=layout,
                             direction=kind, torch_ms=torch_ms, flops=flops,
                             bytes=x.numel() * x.element_size() + 3 * params, backend=backend,
                             ms=ms[backend])


BENCHMARKS = {
    "conv2d": bench_conv2d,
    "max_pool2d": bench_max_pool2d,
    "add_noise": _noise_bench("add_noise"),
    "get_velocity": _noise_bench("get_velocity"),
    "ddpm_step": _step_bench("ddpm_step"),
    "ddim_step": _step_bench("ddim_step"),
    "batch_norm": bench_batch_norm,
    "scaled_dot_product_attention": bench_attention,
    "models": bench_models,  # not an op: only when asked for (--op models)
}

# Default CPU batch where the common one (8) would take too long on a small machine.
CPU_BATCH = {"conv2d": 2, "models": 2}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}


def default_backends(device: torch.device) -> list[str]:
    if device.type == "cpu":
        return ["cpu"]
    return (["cuda"] if dlcv_fast.cuda_built() else []) + ["triton"]


def environment(device: torch.device) -> dict:
    """What a committed result must say about where it was measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


# Ops whose table gives TFLOP/s and a fraction of the measured matrix-product throughput;
# the others give GB/s and a fraction of the copy bandwidth.
COMPUTE_BOUND = {"conv2d", "scaled_dot_product_attention", "models"}


def peak_fraction(r: Result, peak_gbps: float, peak_tflops: dict[str, float]) -> float:
    return r.tflops / peak_tflops[r.dtype] if r.flops else r.gbps / peak_gbps


def format_table(results: list[Result], peak_gbps: float,
                 peak_tflops: dict[str, float] | None = None) -> str:
    compute = any(r.flops for r in results)
    rate = "TFLOP/s" if compute else "GB/s"
    head = (f"{'case':<18} {'shape':<20} {'dtype':<9} {'layout':<13} {'pass':<8} "
            f"{'backend':<7} {'ms':>8} {'torch ms':>9} {'speedup':>7} {rate:>8} {'peak':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.case:<18} {'x'.join(map(str, r.shape)):<20} {r.dtype:<9} {r.layout:<13} "
            f"{r.direction:<8} {r.backend:<7} {r.ms:8.3f} {r.torch_ms:9.3f} {r.speedup:6.2f}x "
            f"{r.tflops if compute else r.gbps:8.3g} "
            f"{peak_fraction(r, peak_gbps, peak_tflops or {}):6.1%}"
        )
    return "\n".join(lines)


def geomean_speedups(results: list[Result]) -> dict[str, float]:
    """Geometric mean of the speedup over PyTorch per (backend, dtype, pass)."""
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(f"{r.backend} {r.dtype} {r.direction}", []).append(r.speedup)
    return {key: statistics.geometric_mean(v) for key, v in groups.items()}
