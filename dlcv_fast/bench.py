"""Benchmark harness: each op of each backend against PyTorch on the same inputs, in the
same run, as medians after warm-up.

GPU times come from ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
run); CPU times from a synchronous host clock. Memory-bound ops report GB/s and the
fraction of the copy bandwidth measured in the same run (``x.copy_(y)`` on a buffer far
larger than the caches), which is the ceiling a streaming kernel can reach.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator

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
    flops: int = 0  # compute-bound ops (attention): floating-point operations of one call

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
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    flush = torch.empty(_CPU_FLUSH_BYTES // 4, dtype=torch.float32)
    for _ in range(3):  # warm-up, also of the allocator
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 50):
        flush.zero_()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / ms / 1e6


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
                torch_fwd = median_ms(lambda: F.max_pool2d(x, k, s, p), device)
                torch_bwd = median_ms(
                    lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                        grad, x, *args[:4], False, ref_idx), device)
                e = x.element_size()
                fwd_bytes = x.numel() * e + ref_out.numel() * (e + 8)
                bwd_bytes = ref_out.numel() * (e + 8) + x.numel() * e
                common = dict(op="max_pool2d", case=name, shape=tuple(x.shape),
                              dtype=str(dtype).removeprefix("torch."), layout=layout)
                for backend in backends:
                    fwd = _forward_op(backend)
                    bwd = _backward_op(backend)
                    out, idx = fwd(x, *args)
                    if not (torch.equal(out, ref_out) and torch.equal(idx, ref_idx)):
                        raise AssertionError(f"max_pool2d {backend} disagrees with PyTorch on "
                                             f"{name} {dtype} {layout}")
                    yield Result(**common, direction="forward", backend=backend,
                                 ms=median_ms(lambda: fwd(x, *args), device),
                                 torch_ms=torch_fwd, bytes=fwd_bytes)
                    yield Result(**common, direction="backward", backend=backend,
                                 ms=median_ms(lambda: bwd(grad, x, idx, *args), device),
                                 torch_ms=torch_bwd, bytes=bwd_bytes)


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

    return alphas_cumprod_from_betas(make_betas())


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
                torch_ms = median_ms(lambda: torch_noise_formula(op, x, noise, t, table), device)
                for backend in backends:
                    fn = getattr(torch.ops.dlcv_fast, op + ("_triton" if backend == "triton" else ""))
                    yield Result(op=op, case=name, shape=tuple(shape),
                                 dtype=str(dtype).removeprefix("torch."), layout="nchw",
                                 direction="forward", backend=backend,
                                 ms=median_ms(lambda: fn(x, noise, t, table), device),
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
                torch_ms = median_ms(
                    lambda: torch_step_formula(op, m, s, z, table, t, prev_t), device)
                moved = (5 if op == "ddpm_step" else 4) * m.numel() * m.element_size()
                for backend in backends:
                    with dlcv_fast.use_backend(backend):
                        ms = median_ms(lambda: fused_step(op, m, s, z, table, t, prev_t), device)
                    yield Result(op=op, case=name, shape=tuple(shape),
                                 dtype=str(dtype).removeprefix("torch."), layout="nchw",
                                 direction="forward", backend=backend, ms=ms, torch_ms=torch_ms,
                                 bytes=moved)

    return bench


# --- scaled_dot_product_attention ------------------------------------------------------------

def _attention_cases(device: torch.device):
    """(B, H, L, D, causal). GPU: B * L = 16k tokens, H * D = 2048, L = 512 .. 16k, D = 64
    and 128. CPU: one sequence of 8 heads, L = 256 .. 2048, D = 64."""
    if device.type == "cuda":
        return [(16384 // L, 2048 // D, L, D, causal) for D in (64, 128)
                for L in (512, 1024, 2048, 4096, 8192, 16384) for causal in (False, True)]
    return [(1, 8, L, 64, causal) for L in (256, 512, 1024, 2048) for causal in (False, True)]


def _torch_sdpa_variants(device: torch.device, dtype: torch.dtype):
    """(label, context) of PyTorch's SDPA to compare with: its own choice of backend, and on
    a GPU also its FlashAttention-2 backend alone (float16 / bfloat16 only)."""
    import contextlib

    out = [("vs sdpa", contextlib.nullcontext)]
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
            for label, ctx in _torch_sdpa_variants(device, dtype):
                with ctx():
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    torch_fwd = median_ms(
                        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                        device)
                    torch_bwd = median_ms(lambda: torch.autograd.grad(
                        ref, (q, k, v), grad, retain_graph=True), device)
                common = dict(op="scaled_dot_product_attention", case=case, shape=(B, H, L, D),
                              dtype=str(dtype).removeprefix("torch."), layout=label)
                for backend in backends:
                    op = _FORWARD[backend]
                    scale = D ** -0.5
                    out = op(q, k, v, None, 0.0, causal, scale, 0)[0]
                    err = (out - ref).abs().max().item()
                    if err > (1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4):
                        raise AssertionError(f"attention {backend} disagrees with PyTorch on "
                                             f"{case} {dtype}: {err}")
                    yield Result(**common, direction="forward", backend=backend,
                                 ms=median_ms(lambda: op(q, k, v, None, 0.0, causal, scale, 0),
                                              device),
                                 torch_ms=torch_fwd, bytes=moved, flops=flops)
                    yield Result(**common, direction="backward", backend=backend,
                                 ms=median_ms(lambda: torch.autograd.grad(
                                     out, (q, k, v), grad, retain_graph=True), device),
                                 torch_ms=torch_bwd, bytes=2 * moved, flops=flops * 5 // 2)


BENCHMARKS = {
    "max_pool2d": bench_max_pool2d,
    "add_noise": _noise_bench("add_noise"),
    "get_velocity": _noise_bench("get_velocity"),
    "ddpm_step": _step_bench("ddpm_step"),
    "ddim_step": _step_bench("ddim_step"),
    "scaled_dot_product_attention": bench_attention,
}

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


def format_table(results: list[Result], peak_gbps: float) -> str:
    head = (f"{'case':<15} {'shape':<20} {'dtype':<9} {'layout':<13} {'pass':<8} "
            f"{'backend':<7} {'ms':>8} {'torch ms':>9} {'speedup':>7} {'GB/s':>8} {'peak':>6}")
    with_flops = any(r.flops for r in results)
    if with_flops:  # compute-bound: TFLOP/s, ours and PyTorch's
        head += f" {'TFLOP/s':>8} {'torch':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.case:<15} {'x'.join(map(str, r.shape)):<20} {r.dtype:<9} {r.layout:<13} "
            f"{r.direction:<8} {r.backend:<7} {r.ms:8.3f} {r.torch_ms:9.3f} {r.speedup:6.2f}x "
            f"{r.gbps:8.1f} {r.gbps / peak_gbps:6.1%}"
            + (f" {r.tflops:8.2f} {r.flops / r.torch_ms / 1e9:7.2f}" if with_flops else "")
        )
    return "\n".join(lines)


def geomean_speedups(results: list[Result]) -> dict[str, float]:
    """Geometric mean of the speedup over PyTorch per (backend, dtype, pass)."""
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(f"{r.backend} {r.dtype} {r.direction}", []).append(r.speedup)
    return {key: statistics.geometric_mean(v) for key, v in groups.items()}
