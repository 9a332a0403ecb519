"""add_noise and get_velocity against the formulas computed in float64 here: values,
dtypes, memory formats, gradients (twice), opcheck, torch.compile and bad arguments, on
every backend that runs here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close, backend_dtype_cases

import dlcv_fast

# The last: 61305 values, which the CPU kernel splits between threads inside a sample.
SHAPES = [(1,), (3,), (5, 97), (2, 3, 7, 7), (4, 1, 1, 1), (2, 3, 4, 5, 6), (3, 4, 8, 8),
          (3, 5, 61, 67)]


def alphas_cumprod(steps=1000, dtype=torch.float32):
    """The linear DDPM schedule, computed here in float64."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(dtype)


def reference(kind, x, noise, timesteps, table):
    """The formula in float64: a_t gathered per sample, broadcast over the sample."""
    a = table.double()[timesteps.long().cpu()].to(x.device)
    a = a.expand(x.shape[0]).reshape(-1, *([1] * (x.dim() - 1)))
    signal, noise_scale = a.sqrt(), (1 - a).sqrt()
    if kind == "add_noise":
        return signal * x.double() + noise_scale * noise.double()
    return signal * noise.double() - noise_scale * x.double()


def layout(x, name):
    if name == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if name == "channels_last" and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if name == "strided":
        return torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]
    return x


def run(kind, *args):
    return getattr(dlcv_fast, kind)(*args)


@pytest.mark.parametrize("kind", ["add_noise", "get_velocity"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_matches_the_formula(backend, device, dtype, shape, kind):
    g = torch.Generator().manual_seed(0)
    table = alphas_cumprod().to(device)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    t[0] = 0  # 1 - a_t is smallest at t = 0
    t = t.to(device)
    for name in ("contiguous", "channels_last", "strided"):
        x = layout(torch.randn(shape, generator=g).to(device, dtype), name)
        noise = layout(torch.randn(shape, generator=g).to(device, dtype), name)
        with dlcv_fast.use_backend(backend):
            out = run(kind, x, noise, t, table)
        assert out.dtype == dtype and out.shape == x.shape
        if name == "channels_last" and x.dim() in (4, 5):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert out.is_contiguous(memory_format=fmt), "output must keep the memory format"
        assert_close(out, reference(kind, x, noise, t, table), dtype, msg=f"{name} layout")


@pytest.mark.parametrize("kind", ["add_noise", "get_velocity"])
def test_timestep_forms_and_tables(backend_device, kind):
    backend, device = backend_device
    x = torch.randn(3, 2, 5, 5, device=device)
    noise = torch.randn_like(x)
    # 1000 entries: more than int8 or uint8 can count (the range check must not wrap).
    for table in (alphas_cumprod(1000).to(device), alphas_cumprod(1000, torch.float64).to(device)):
        for t in (7, torch.tensor(49, device=device), torch.tensor([0, 3, 49], device=device),
                  torch.tensor([1, 2, 3], dtype=torch.int32, device=device),
                  torch.tensor([1, 2, 3], dtype=torch.int8, device=device),
                  torch.tensor([5, 20, 49], dtype=torch.uint8, device=device)):
            out = run(kind, x, noise, t, table)
            tt = torch.as_tensor(t, device=device)
            assert_close(out, reference(kind, x, noise, tt, table), torch.float32)


@pytest.mark.parametrize("seed", [0, 209])
def test_float32_arithmetic_for_half_samples(backend_device, seed):
    """One rounding to half at the end of float32 arithmetic: the half result is the float64
    formula within one unit in the last place of half, plus the float32 error of the two
    products and their sum (a few float32 units of |sqrt(a) x| + |sqrt(1 - a) noise|, which
    matters only where the terms cancel to below half's normal range: seed 209 has such an
    element). The diffusers formula rounds the coefficients to half first and misses by
    far more."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, 8, 8, generator=g).half().to(device)
    noise = torch.randn(64, 4, 8, 8, generator=g).half().to(device)
    t = torch.randint(0, 1000, (64,), generator=g).to(device)
    table = alphas_cumprod().to(device)
    out = dlcv_fast.add_noise(x, noise, t, table)
    exact = reference("add_noise", x, noise, t, table)
    terms = reference("add_noise", x.abs(), noise.abs(), t, table)  # |sqrt(a) x| + |...|
    ulp = torch.finfo(torch.float16).eps * exact.abs().clamp(min=2**-14)
    float32_error = 4 * torch.finfo(torch.float32).eps * terms
    assert ((out.double() - exact).abs() <= ulp + float32_error).all()


@pytest.mark.parametrize("kind", ["add_noise", "get_velocity"])
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_gradients(backend, device, dtype, kind):
    table = alphas_cumprod().to(device)
    t = torch.tensor([0, 500, 999], device=device)
    x = torch.randn(3, 4, 6, 6, device=device, dtype=dtype).requires_grad_()
    noise = torch.randn_like(x).requires_grad_()
    with dlcv_fast.use_backend(backend):
        out = run(kind, x, noise, t, table)
    g = torch.randn_like(out)
    gx, ge = torch.autograd.grad(out, (x, noise), g)
    a = table.double()[t].view(-1, 1, 1, 1)
    cx, ce = (a.sqrt(), (1 - a).sqrt()) if kind == "add_noise" else (-(1 - a).sqrt(), a.sqrt())
    assert_close(gx, cx * g.double(), dtype)
    assert_close(ge, ce * g.double(), dtype)


@pytest.mark.parametrize("kind", ["add_noise", "get_velocity"])
def test_gradcheck(backend_device, kind):
    _, device = backend_device
    table = alphas_cumprod(20, torch.float64).to(device)
    t = torch.tensor([0, 7, 19], device=device)
    x = torch.randn(3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    noise = torch.randn_like(x).requires_grad_()
    fn = lambda a, b: run(kind, a, b, t, table)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, noise))
    assert torch.autograd.gradgradcheck(fn, (x, noise))


def test_opcheck(backend_device):
    backend, device = backend_device
    suffix = "_triton" if backend == "triton" else ""
    table = alphas_cumprod(30).to(device)
    for shape in [(3, 2, 5, 5), (2, 7)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        noise = torch.randn(shape, device=device, requires_grad=True)
        t = torch.tensor([0, 29, 5][: shape[0]], device=device)
        for name in ("add_noise", "get_velocity"):
            torch.library.opcheck(getattr(torch.ops.dlcv_fast, name + suffix).default,
                                  (x, noise, t, table))
        bwd = getattr(torch.ops.dlcv_fast, "noise_backward" + suffix).default
        for velocity in (False, True):
            torch.library.opcheck(bwd, (torch.randn(shape, device=device, requires_grad=True),
                                        t, table, velocity))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    table = alphas_cumprod()

    def noisy_loss(x0, noise, t):
        x_t = dlcv_fast.add_noise(x0, noise, t, table)
        return (x_t - dlcv_fast.get_velocity(x0, noise, t, table)).square().mean()

    x0 = torch.randn(4, 3, 8, 8, requires_grad=True)
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 10, 100, 999])
    with dlcv_fast.use_backend("cpu"):
        want = noisy_loss(x0, noise, t)
        got = torch.compile(noisy_loss, fullgraph=True)(x0, noise, t)
    assert_close(got, want)
    assert_close(torch.autograd.grad(got, x0)[0], torch.autograd.grad(want, x0)[0])


BAD = [
    # (description, x shape, noise shape, timesteps, table length, exception, message)
    ("timestep past the table", (2, 3), (2, 3), [0, 1000], 1000, IndexError, r"timesteps must lie in \[0, 1000\)"),
    ("negative timestep", (2, 3), (2, 3), [-1, 0], 1000, IndexError, "timesteps must lie in"),
    ("batch mismatch", (2, 3), (2, 3), [0, 1, 2], 1000, ValueError, r"one timestep per sample \(shape \(2,\)\)"),
    ("noise shape", (2, 3), (2, 4), [0, 1], 1000, ValueError, "noise must have the shape"),
    ("0-d sample", (), (), [0], 1000, ValueError, "must have a batch dimension"),
]


@pytest.mark.parametrize(("what", "xs", "ns", "ts", "steps", "exc", "match"), BAD,
                         ids=[b[0] for b in BAD])
def test_bad_arguments(backend_device, what, xs, ns, ts, steps, exc, match):
    _, device = backend_device
    x, noise = torch.randn(xs, device=device), torch.randn(ns, device=device)
    t = torch.tensor(ts, device=device)
    for kind in ("add_noise", "get_velocity"):
        with pytest.raises(exc, match=match):
            run(kind, x, noise, t, alphas_cumprod(steps).to(device))


def test_bad_types(backend_device):
    _, device = backend_device
    x = torch.randn(2, 3, device=device)
    t = torch.tensor([0, 1], device=device)
    table = alphas_cumprod().to(device)
    with pytest.raises(TypeError, match="timesteps must be an integer tensor"):
        dlcv_fast.add_noise(x, x, t.float(), table)
    with pytest.raises(TypeError, match="noise has dtype"):
        dlcv_fast.add_noise(x, x.double(), t, table)
    with pytest.raises(TypeError, match="must be float32, float64"):
        dlcv_fast.add_noise(x.int(), x.int(), t, table)
    with pytest.raises(ValueError, match="alphas_cumprod must be a non-empty 1-D"):
        dlcv_fast.add_noise(x, x, t, table.view(10, 100))
    with pytest.raises(TypeError, match="alphas_cumprod must be floating point"):
        dlcv_fast.add_noise(x, x, t, torch.ones(10, dtype=torch.int64, device=device))


def test_table_gradient_is_refused_not_dropped(backend_device):
    """alphas_cumprod gets no gradient: one that requires it is an error, through the
    functional API and the raw op, not a silently missing .grad."""
    backend, device = backend_device
    x = torch.randn(2, 3, device=device, requires_grad=True)
    table = alphas_cumprod().to(device).requires_grad_()
    t = torch.tensor([0, 1], device=device)
    with dlcv_fast.use_backend(backend):
        for fn in (dlcv_fast.add_noise, dlcv_fast.get_velocity):
            with pytest.raises(ValueError, match="alphas_cumprod requires grad"):
                fn(x, x, t, table)
            with torch.no_grad():
                fn(x, x, t, table)  # nothing is recorded: fine
    for op in (torch.ops.dlcv_fast.add_noise, torch.ops.dlcv_fast.get_velocity):
        with pytest.raises(ValueError, match="alphas_cumprod requires grad"):
            op(x.cpu(), x.cpu(), t.cpu(), table.cpu())


def test_one_element_timesteps_and_argument_types(backend_device):
    backend, device = backend_device
    x = torch.randn(3, 4, device=device)
    noise = torch.randn_like(x)
    table = alphas_cumprod().to(device)
    with dlcv_fast.use_backend(backend):
        want = dlcv_fast.add_noise(x, noise, torch.tensor(7, device=device), table)
        got = dlcv_fast.add_noise(x, noise, torch.tensor([7], device=device), table)
        assert torch.equal(got, want)
        with pytest.raises(TypeError, match="add_noise: noise must be a Tensor, but got "
                                            "NoneType"):
            dlcv_fast.add_noise(x, None, 7, table)
        with pytest.raises(TypeError, match="alphas_cumprod must be a Tensor"):
            dlcv_fast.add_noise(x, noise, 7, table.tolist())
        per_sample = dlcv_fast.add_noise(x, noise, torch.tensor([3, 7, 9], device=device),
                                         table)
        for t in ([3, 7, 9], (3, 7, 9), np.array([3, 7, 9])):
            assert torch.equal(dlcv_fast.add_noise(x, noise, t, table), per_sample)
        assert torch.equal(dlcv_fast.add_noise(x, noise, np.int64(7), table), want)
        with pytest.raises(TypeError, match="timesteps must be an integer tensor, an int or a "
                                            "sequence of ints, but got str"):
            dlcv_fast.add_noise(x, noise, "7", table)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    x = torch.randn(2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="timesteps is on cpu"):
        dlcv_fast.add_noise(x, x, torch.tensor([0, 1]), alphas_cumprod().cuda())
    with pytest.raises(RuntimeError, match="alphas_cumprod is on cpu"):
        dlcv_fast.add_noise(x, x, torch.tensor([0, 1], device="cuda"), alphas_cumprod())
