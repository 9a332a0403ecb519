"""max_pool2d against torch.nn.functional.max_pool2d: values, indices (ties and NaN
included), gradients, memory formats, every parameter, errors, gradcheck, opcheck and
torch.compile, on every backend that runs here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (BACKEND_DEVICES, CUDA_EMULATED, assert_close, backend_dtype_cases,
                      dtypes_for, supported_isas)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlcv_fast
from dlcv_fast.ops._common import pool_output_size

# (input shape, kernel_size, stride, padding, dilation, ceil_mode): odd sizes, sizes that
# are no multiple of anything, a single channel, many channels, batch 1 and 0, unbatched input,
# square and asymmetric windows, overlapping windows, dilation, and both rounding modes.
CONFIGS = [
    ((2, 3, 7, 7), 2, None, 0, 1, False),
    ((1, 1, 1, 1), 1, 1, 0, 1, False),
    ((2, 3, 13, 17), 3, 2, 1, 1, False),
    ((2, 3, 13, 17), 3, 2, 1, 1, True),
    ((1, 5, 17, 13), (3, 2), (2, 1), (1, 0), (2, 1), True),
    ((2, 4, 7, 9), (2, 3), (3, 2), 1, 1, True),
    ((2, 3, 8, 8), 3, 1, 1, 2, False),
    ((1, 2, 5, 5), 5, 1, 2, 1, True),
    ((1, 1, 6, 6), 3, 3, 1, 1, True),
    ((3, 9, 8), 2, 1, 1, 2, False),
    ((1, 7, 123, 97), 3, 2, 1, 1, True),
    ((2, 16, 27, 27), 3, 2, 0, 1, False),
    ((1, 65, 11, 11), 2, 2, 0, 1, False),
    ((2, 131, 9, 10), 3, 2, 1, 2, True),  # channels_last: more channels than 4 vectors
    ((0, 3, 8, 8), 2, None, 0, 1, False),
]
LAYOUTS = ["nchw", "channels_last", "strided"]


def _ids(config):
    shape, k, s, p, d, ceil = config
    return f"{'x'.join(map(str, shape))}-k{k}-s{s}-p{p}-d{d}-{'ceil' if ceil else 'floor'}"


def make_input(shape, dtype, device, layout="nchw", values="randn", seed=0):
    """Normal values, few distinct values ("ties") or normal values with NaN and -inf
    ("nan"), of `shape`, in the requested layout (in_layout)."""
    g = torch.Generator().manual_seed(seed)
    if values == "randn":
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    elif values == "ties":  # few distinct values: ties everywhere
        x = torch.randint(0, 3, shape, generator=g).double()
    else:  # "nan": NaN and -inf sprinkled over randn
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        x.view(-1)[::7] = float("nan")
        x.view(-1)[3::11] = float("-inf")
    return in_layout(x.to(dtype=dtype, device=device), layout)


def in_layout(x, layout):
    """x as dense NCHW, channels_last, or a strided view (a slice of a wider tensor, permuted
    for 4-D)."""
    shape, dtype, device = x.shape, x.dtype, x.device
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # (N, H, C, 2W) storage seen as (N, C, H, W), every other column
        perm = (0, 2, 1, 3) if x.dim() == 4 else (1, 0, 2)
        storage_shape = [shape[i] for i in perm]
        storage_shape[-1] *= 2
        view = torch.zeros(storage_shape, dtype=dtype, device=device).permute(perm)[..., ::2]
        return view.copy_(x)
    return x.contiguous()


def torch_pool(x, config, **kw):
    """PyTorch's max_pool2d run on the CPU, the reference semantics, moved to x's device.
    (On CUDA, PyTorch's channels_last kernel gives index 0 to a window holding only -inf,
    where its CPU and NCHW kernels, and dlcv_fast everywhere, give the window's first tap.)"""
    _, k, s, p, d, ceil = config
    out = F.max_pool2d(x.detach().cpu(), k, s, p, d, ceil_mode=ceil, **kw)
    if isinstance(out, tuple):
        return tuple(t.to(x.device) for t in out)
    return out.to(x.device)


def ours(x, config, **kw):
    _, k, s, p, d, ceil = config
    return dlcv_fast.max_pool2d(x, k, s, p, d, ceil_mode=ceil, **kw)


def reference_grad(x, config, grad_out):
    """d(max_pool2d)/dx in float64 by PyTorch, with the padding made explicit (-inf) so that
    a window lying wholly in the padding passes no gradient. PyTorch's own backward adds
    such a window's gradient at its index, which then names an element outside the window
    (even in another channel): see test_window_wholly_in_padding."""
    _, k, s, p, d, ceil = config
    k, s, p, d = ([v, v] if isinstance(v, int) else list(v) for v in (k, s if s else k, p, d))
    x64 = x.detach().double().cpu().requires_grad_()
    h, w = x.shape[-2:]
    out = [pool_output_size(n, k[i], s[i], p[i], d[i], ceil) for i, n in enumerate((h, w))]
    # Right padding so that every window of the ceil_mode output fits.
    extra = [max(0, (out[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1 - (n + 2 * p[i]))
             for i, n in enumerate((h, w))]
    padded = F.pad(x64, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]), value=float("-inf"))
    y = F.max_pool2d(padded, k, s, 0, d)
    assert list(y.shape[-2:]) == out
    (grad,) = torch.autograd.grad(y, x64, grad_out.double().cpu())
    return grad.to(x.device)


def assert_same_format(actual, expected):
    assert actual.shape == expected.shape
    if actual.numel() == 0:  # an empty tensor has no memory format to speak of
        return
    for fmt in (torch.contiguous_format, torch.channels_last):
        if actual.dim() == 4:
            assert actual.is_contiguous(memory_format=fmt) == expected.is_contiguous(
                memory_format=fmt
            ), f"memory format differs from PyTorch's: strides {actual.stride()} vs {expected.stride()}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_forward_and_indices(backend, device, dtype, config, layout):
    x = make_input(config[0], dtype, device, layout)
    ref_out, ref_idx = torch_pool(x, config, return_indices=True)
    with dlcv_fast.use_backend(backend):
        out, idx = ours(x, config, return_indices=True)
    assert out.dtype == dtype and idx.dtype == torch.int64
    assert torch.equal(out, ref_out), "values differ from PyTorch's"
    assert torch.equal(idx, ref_idx), "indices differ from PyTorch's"
    assert_same_format(out, ref_out)
    assert_same_format(idx, ref_out)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_backward(backend, device, dtype, config, layout):
    x = make_input(config[0], dtype, device, layout).requires_grad_()
    with dlcv_fast.use_backend(backend):
        out = ours(x, config)
    # A non-contiguous grad_output with distinct values: a misrouted gradient shows.
    grad_out = torch.randn(out.shape[::-1], generator=torch.Generator().manual_seed(1))
    grad_out = grad_out.to(dtype=dtype, device=device).permute(*range(out.dim() - 1, -1, -1))
    (grad,) = torch.autograd.grad(out, x, grad_out)
    # The float64 reference sees the same values, so the same argmax: max is exact.
    assert grad.dtype == dtype
    assert_close(grad, reference_grad(x, config, grad_out), dtype)
    assert_same_format(grad, x.detach().contiguous(memory_format=_format_of(x)))


def _format_of(x):
    return torch._prims_common.suggest_memory_format(x) if x.dim() == 4 else torch.contiguous_format


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_cpu_instruction_set(isa, dtype):
    """The CPU forward kernels exist once per instruction set; each must match PyTorch."""
    dlcv_fast._C.set_cpu_isa(isa)
    try:
        assert dlcv_fast._C.cpu_isa() == isa
        for config in CONFIGS:
            for layout in LAYOUTS:
                for values in ("randn", "ties", "nan"):
                    x = make_input(config[0], dtype, "cpu", layout, values)
                    ref_out, ref_idx = torch_pool(x, config, return_indices=True)
                    with dlcv_fast.use_backend("cpu"):
                        out, idx = ours(x, config, return_indices=True)
                    assert torch.equal(out.nan_to_num(), ref_out.nan_to_num()), \
                        f"{_ids(config)} {layout} {values}"
                    assert torch.equal(out.isnan(), ref_out.isnan())
                    assert torch.equal(idx, ref_idx), f"{_ids(config)} {layout} {values}"
    finally:
        dlcv_fast._C.set_cpu_isa("auto")


def test_cpu_isa_errors():
    with pytest.raises(ValueError, match="expected 'auto', 'base', 'avx2' or 'avx512'"):
        dlcv_fast._C.set_cpu_isa("sse9")


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_ties_pick_the_first_max(backend, device, dtype):
    for layout in ("nchw", "channels_last"):
        x = make_input((2, 8, 11, 10), dtype, device, layout, values="ties")
        for config in [(x.shape, 3, 1, 1, 1, False), (x.shape, (2, 3), 2, 1, (1, 2), True)]:
            ref_out, ref_idx = torch_pool(x, config, return_indices=True)
            with dlcv_fast.use_backend(backend):
                out, idx = ours(x, config, return_indices=True)
            assert torch.equal(out, ref_out)
            assert torch.equal(idx, ref_idx), f"tie broken differently ({layout}, {config[1:]})"


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_nan_and_infinity(backend, device, dtype):
    x = make_input((2, 4, 9, 9), dtype, device)
    x[0, 0, 1, 1] = float("nan")
    x[0, 1, 2:5, 2:5] = float("nan")  # several NaNs in one window: PyTorch keeps the last
    x[1, 0] = float("-inf")  # windows of -inf only: index of the first in-bounds tap
    x[1, 1, 3, 3] = float("inf")
    for layout in ("nchw", "channels_last"):
        xl = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        for config in [(x.shape, 3, 2, 1, 1, True), (x.shape, 2, 1, 0, 2, False)]:
            ref_out, ref_idx = torch_pool(xl, config, return_indices=True)
            with dlcv_fast.use_backend(backend):
                out, idx = ours(xl, config, return_indices=True)
            assert torch.equal(out.isnan(), ref_out.isnan()), "NaN not propagated as PyTorch"
            assert torch.equal(out.nan_to_num(), ref_out.nan_to_num())
            assert torch.equal(idx, ref_idx), f"indices differ ({layout}, {config[1:]})"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_window_wholly_in_padding(backend_device, layout):
    """With dilation, a window can hold padding only. PyTorch gives it -inf and the index of
    a tap past the input; it passes no gradient here, where PyTorch's backward adds it to an
    unrelated element (in the case below, channel 0's gradient lands in channel 1)."""
    _, device = backend_device
    config = ((1, 2, 2, 2), (2, 2), 1, (0, 1), (1, 3), False)
    x = make_input(config[0], torch.float32, device, layout).requires_grad_()
    ref_out, ref_idx = torch_pool(x, config, return_indices=True)
    out, idx = ours(x, config, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    assert torch.isneginf(out).all()
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kernel_one_with_huge_dilation(backend_device, layout):
    """A dilation near 2**31 is legal where the kernel is 1 (it moves no tap); the loop's
    step past the only tap must not wrap a 32-bit index."""
    _, device = backend_device
    config = ((2, 4, 3, 5), (1, 2), (1, 2), 0, (2**31 - 1, 1), False)
    x = make_input(config[0], torch.float32, device, layout).requires_grad_()
    ref_out, ref_idx = torch_pool(x, config, return_indices=True)
    out, idx = ours(x, config, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert torch.equal(grad.double(), reference_grad(x, config, grad_out))


def test_backward_is_deterministic(backend_device):
    _, device = backend_device
    x = make_input((2, 8, 31, 29), torch.float32, device, values="ties").requires_grad_()
    grad_out = None
    grads = []
    for _ in range(3):
        out = dlcv_fast.max_pool2d(x, 3, 1, 1)  # each input in up to 9 windows
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        grads.append(torch.autograd.grad(out, x, grad_out)[0])
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_module(backend, device, dtype):
    x = make_input((2, 3, 10, 9), dtype, device, "channels_last")
    for args, kwargs in [((3,), {}), ((3, 2, 1), {"ceil_mode": True, "return_indices": True}),
                         (((2, 3),), {"stride": (1, 2), "dilation": 2})]:
        ours_m, ref_m = dlcv_fast.nn.MaxPool2d(*args, **kwargs), torch.nn.MaxPool2d(*args, **kwargs)
        assert repr(ours_m) == repr(ref_m)
        assert isinstance(ours_m, torch.nn.MaxPool2d)
        assert ours_m.state_dict().keys() == ref_m.state_dict().keys()
        with dlcv_fast.use_backend(backend):
            got = ours_m(x)
        want = ref_m(x)
        if kwargs.get("return_indices"):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        else:
            assert torch.equal(got, want)


# --- randomised parameters -----------------------------------------------------------------

@st.composite
def pool_problems(draw):
    k = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    s = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    ceil = draw(st.booleans())
    # At least the dilated window minus the padding, so the output is never empty.
    h = draw(st.integers(max(1, (k[0] - 1) * d[0] + 1 - 2 * p[0]), 24))
    w = draw(st.integers(max(1, (k[1] - 1) * d[1] + 1 - 2 * p[1]), 24))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 9)), h, w)
    layout = draw(st.sampled_from(LAYOUTS))
    return (shape, k, s, p, d, ceil), layout


@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICES, ids=lambda v: str(v))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(problem=pool_problems())
def test_random_parameters(backend, device, problem):
    config, layout = problem
    x = make_input(config[0], torch.float32, device, layout, values="ties").requires_grad_()
    ref_out, ref_idx = torch_pool(x, config, return_indices=True)
    with dlcv_fast.use_backend(backend):
        out, idx = ours(x, config, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    g = torch.randn_like(out)
    assert_close(torch.autograd.grad(out, x, g)[0], reference_grad(x, config, g), torch.float32)


# --- integer inputs (forward only, as in PyTorch) -------------------------------------------

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def make_int_input(shape, dtype, device, layout, seed=0):
    """Integers of a few distinct values, the type's extremes among them: ties everywhere,
    and a max that only exact integer comparisons get right (int64's extremes are no float64)."""
    info = torch.iinfo(dtype)
    choices = torch.tensor(sorted({info.min, info.min + 1, 0, 1, 2, info.max - 1, info.max}))
    g = torch.Generator().manual_seed(seed)
    x = choices[torch.randint(0, len(choices), shape, generator=g)]
    return in_layout(x.to(dtype=dtype, device=device), layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_integer_input(backend_device, dtype, layout):
    """Against PyTorch on the NCHW copy: PyTorch's CPU channels_last kernel keeps offsets in
    the element type and refuses uint8, int8 and int16 planes of more elements than the type
    counts (H * W > 127 for int8)."""
    backend, device = backend_device
    for i, config in enumerate(CONFIGS):
        if backend_device == ("triton", "cpu") and torch.Size(config[0]).numel() > 3000:
            continue  # the interpreter is slow: the small problems cover the same code
        x = make_int_input(config[0], dtype, device, layout, seed=i)
        ref_out, ref_idx = torch_pool(x.contiguous(), config, return_indices=True)
        with dlcv_fast.use_backend(backend):
            out, idx = ours(x, config, return_indices=True)
        assert out.dtype == dtype and idx.dtype == torch.int64
        assert torch.equal(out, ref_out), f"values differ from PyTorch's ({_ids(config)})"
        assert torch.equal(idx, ref_idx), f"indices differ from PyTorch's ({_ids(config)})"
        fmt = torch.channels_last if layout == "channels_last" and x.dim() == 4 else None
        assert out.numel() == 0 or fmt is None or out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_integer_window_wholly_in_padding(backend_device, dtype):
    """A window of padding only gives the type's lowest value, as in PyTorch (not -inf
    rounded, nor the lowest value of a wider type the kernel computes in)."""
    backend, device = backend_device
    config = ((1, 2, 2, 2), (2, 2), 1, (0, 1), (1, 3), False)
    for layout in ("nchw", "channels_last"):
        x = make_int_input(config[0], dtype, device, layout)
        ref_out, ref_idx = torch_pool(x.contiguous(), config, return_indices=True)
        with dlcv_fast.use_backend(backend):
            out, idx = ours(x, config, return_indices=True)
        assert (ref_out == torch.iinfo(dtype).min).all()
        assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)


def test_integer_input_has_no_gradient(backend_device):
    backend, device = backend_device
    x = make_int_input((2, 3, 8, 8), torch.int32, device, "nchw")
    with dlcv_fast.use_backend(backend):
        out, idx = dlcv_fast.max_pool2d(x, 2, return_indices=True)
    bwd = {"triton": torch.ops.dlcv_fast.max_pool2d_backward_triton}.get(
        backend, torch.ops.dlcv_fast.max_pool2d_backward)
    with pytest.raises(TypeError, match="grad_output must be float32, float64, float16 or bfloat16"):
        bwd(out, x, idx, [2, 2], [2, 2], [0, 0], [1, 1], False)
    module = dlcv_fast.nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    with dlcv_fast.use_backend(backend):
        assert torch.equal(module(x), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)(x.cpu()).to(device))


# --- gradcheck, opcheck, torch.compile -----------------------------------------------------

def _distinct_input(shape, device):
    """float64 values spaced far apart, so finite differences never swap an argmax."""
    n = torch.Size(shape).numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return (perm.double() * 0.1).reshape(shape).to(device)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck(backend_device, layout):
    _, device = backend_device
    x = _distinct_input((2, 3, 7, 6), device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    for k, s, p, d, ceil in [(3, 1, 1, 1, False), ((2, 3), 2, (1, 0), (2, 1), True)]:
        fn = lambda t: dlcv_fast.max_pool2d(t, k, s, p, d, ceil)  # noqa: E731
        # Triton's interpreter is slow: check random projections of the Jacobians there.
        fast = backend_device == ("triton", "cpu")
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=fast)
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=fast)


def test_second_order_gradient_of_windows_in_the_padding(backend_device):
    """Windows wholly in the padding (width 2, padding 1, dilation 3: columns -1 and 2) pass
    no gradient forward, so none back either: grad of grad_output is 0 there, whatever
    index they hold (PyTorch's, inside the plane but outside the window)."""
    backend, device = backend_device
    x = _distinct_input((1, 2, 3, 2), device).requires_grad_()
    k, s, p, d = (2, 2), 1, (0, 1), (1, 3)
    with dlcv_fast.use_backend(backend):
        out = dlcv_fast.max_pool2d(x, k, s, p, d)
        g = torch.randn(out.shape, dtype=out.dtype, device=device).requires_grad_()
        gx, = torch.autograd.grad(out, x, g, create_graph=True)
        ggo, = torch.autograd.grad(gx, g, torch.randn_like(gx))
    assert out.shape == (1, 2, 2, 1) and bool((out == -math.inf).all())
    assert not gx.any() and not ggo.any()


def test_integer_like_arguments():
    """What PyTorch takes as an int (NumPy integers, 0-d integer tensors); ceil_mode must be
    a bool, as in PyTorch."""
    x = _distinct_input((1, 2, 7, 7), "cpu")
    want = F.max_pool2d(x, 3, 2)
    for k in (np.int64(3), torch.tensor(3), (np.int32(3), 3)):
        assert torch.equal(dlcv_fast.max_pool2d(x, k, 2), want)
    for bad in (None, 1):
        with pytest.raises(TypeError, match="ceil_mode must be a bool"):
            dlcv_fast.max_pool2d(x, 3, 2, ceil_mode=bad)


def _opcheck_args(device, requires_grad):
    x = _distinct_input((2, 3, 9, 8), device).float().requires_grad_(requires_grad)
    return x, [3, 2], [2, 1], [1, 0], [1, 2], True


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend_device, requires_grad):
    backend, device = backend_device
    fwd = {"triton": torch.ops.dlcv_fast.max_pool2d_triton}.get(
        backend, torch.ops.dlcv_fast.max_pool2d)
    bwd = {"triton": torch.ops.dlcv_fast.max_pool2d_backward_triton}.get(
        backend, torch.ops.dlcv_fast.max_pool2d_backward)
    x, *params = _opcheck_args(device, requires_grad)
    for inp in (x, x.detach().contiguous(memory_format=torch.channels_last), x.detach()[0]):
        torch.library.opcheck(fwd.default, (inp, *params))
        out, idx = fwd(inp.detach(), *params)
        grad = torch.randn_like(out).requires_grad_(requires_grad)
        torch.library.opcheck(bwd.default, (grad, inp.detach(), idx, *params))
    if not requires_grad:
        torch.library.opcheck(fwd.default, (x.detach().to(torch.int16), *params))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        dlcv_fast.nn.MaxPool2d(3, 2, 1, ceil_mode=True),
        torch.nn.ReLU(),
        dlcv_fast.nn.MaxPool2d(2),
        torch.nn.Flatten(),
    )
    x = torch.randn(2, 3, 17, 15, requires_grad=True)
    with dlcv_fast.use_backend("cpu"):
        want = model(x)
        compiled = torch.compile(model, fullgraph=True)  # a graph break raises
        got = compiled(x)
        g = torch.randn_like(want)
        assert torch.equal(got, want)
        assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


# --- errors --------------------------------------------------------------------------------

BAD_CALLS = [
    # (input shape, dtype, kwargs, exception, message fragment)
    ((2, 3, 8, 8), torch.float32, {"kernel_size": 0}, ValueError, "kernel_size must be positive"),
    ((2, 3, 8, 8), torch.float32, {"kernel_size": 2, "stride": 0}, ValueError, "stride must be positive"),
    ((2, 3, 8, 8), torch.float32, {"kernel_size": 2, "dilation": (1, 0)}, ValueError, "dilation must be positive"),
    ((2, 3, 8, 8), torch.float32, {"kernel_size": 2, "padding": -1}, ValueError, "padding must be non-negative"),
    ((2, 3, 8, 8), torch.float32, {"kernel_size": 3, "padding": 2}, ValueError, "at most half of kernel_size"),
    ((2, 3, 4, 4), torch.float32, {"kernel_size": 5}, ValueError, "too small"),
    ((2, 3, 4, 4), torch.float32, {"kernel_size": 3, "dilation": 2}, ValueError, "too small"),
    ((2, 3, 8, 8), torch.float32, {"kernel_size": 1, "stride": 2**32}, ValueError, "stride must be below 2"),
    ((2, 3, 8, 8), torch.float32, {"kernel_size": 2**32 + 1, "padding": 2**31}, ValueError, "kernel_size must be below 2"),
    ((2, 3, 8, 8), torch.float32, {"kernel_size": (1, 2, 3)}, TypeError, "kernel_size must be an int or a pair"),
    ((2, 3, 8, 8), torch.float32, {"kernel_size": 2.5}, TypeError, "kernel_size must be an int or a pair"),
    ((8, 8), torch.float32, {"kernel_size": 2}, ValueError, "3-D .* or 4-D"),
    ((1, 2, 3, 8, 8), torch.float32, {"kernel_size": 2}, ValueError, "3-D .* or 4-D"),
    ((2, 0, 8, 8), torch.float32, {"kernel_size": 2}, ValueError, "non-zero C, H and W"),
    ((2, 3, 8, 8), torch.bool, {"kernel_size": 2}, TypeError, "must be float32, .* or int64, but got (Bool|torch.bool)"),
]


@pytest.mark.parametrize(("shape", "dtype", "kwargs", "exc", "match"), BAD_CALLS,
                         ids=[c[-1] for c in BAD_CALLS])
def test_bad_arguments(backend_device, shape, dtype, kwargs, exc, match):
    _, device = backend_device
    x = torch.zeros(shape, dtype=dtype, device=device)
    with pytest.raises(exc, match=match):
        dlcv_fast.max_pool2d(x, **kwargs)
    if exc is ValueError and "kernel_size must" not in match and dtype.is_floating_point:
        with pytest.raises(Exception):  # PyTorch refuses it too
            F.max_pool2d(x, **kwargs)


def _pairs(kwargs):
    def two(v, default):
        v = kwargs.get(v, default)
        return list(v) if isinstance(v, tuple) else [v, v]
    k = two("kernel_size", 1)
    return k, two("stride", k[0]), two("padding", 0), two("dilation", 1)


@pytest.mark.parametrize(("shape", "dtype", "kwargs", "exc", "match"),
                         [c for c in BAD_CALLS if "pair" not in c[-1]],
                         ids=[c[-1] for c in BAD_CALLS if "pair" not in c[-1]])
def test_bad_arguments_to_the_cpp_op(shape, dtype, kwargs, exc, match):
    """The registered op checks on its own: a direct call never reaches a kernel with
    bad arguments."""
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(exc, match=match):
        torch.ops.dlcv_fast.max_pool2d(x, *_pairs(kwargs), False)


def test_backward_op_checks_its_arguments():
    x = torch.randn(2, 3, 8, 8)
    out, idx = torch.ops.dlcv_fast.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    params = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    bwd = torch.ops.dlcv_fast.max_pool2d_backward
    with pytest.raises(ValueError, match="grad_output must have the output's shape"):
        bwd(out[:, :2], x, idx, *params)
    with pytest.raises(ValueError, match="indices must have the output's shape"):
        bwd(out, x, idx[..., :3], *params)
    with pytest.raises(TypeError, match="indices must be int64"):
        bwd(out, x, idx.int(), *params)
    with pytest.raises(TypeError, match="grad_output has dtype"):
        bwd(out.double(), x, idx, *params)
    if CUDA_EMULATED:
        # The CUDA backward gathers over the windows that hold each element: an index that
        # names none of them passes nothing (a check would make the host wait for the GPU).
        assert torch.count_nonzero(bwd(out, x, idx + 1000, *params)) == 0
    else:
        with pytest.raises(IndexError, match="outside an input plane"):
            bwd(out, x, idx + 1000, *params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    x = torch.randn(2, 3, 8, 8, device="cuda")
    out, idx = torch.ops.dlcv_fast.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="grad_output is on cpu"):
        torch.ops.dlcv_fast.max_pool2d_backward(out.cpu(), x, idx, [2, 2], [2, 2], [0, 0],
                                                [1, 1], False)


def test_backend_refuses_what_it_cannot_run():
    x = torch.randn(1, 2, 4, 4)
    with dlcv_fast.use_backend("cuda"), pytest.raises(
        dlcv_fast.BackendError, match=r"max_pool2d: the 'cuda' backend cannot run this call: "
        r"the input is on cpu"
    ):
        dlcv_fast.max_pool2d(x, 2)
    if torch.cuda.is_available():
        with dlcv_fast.use_backend("cpu"), pytest.raises(dlcv_fast.BackendError, match="'cpu'"):
            dlcv_fast.max_pool2d(x.cuda(), 2)
    if ("triton", "cpu") in BACKEND_DEVICES:
        assert torch.bfloat16 not in dtypes_for("triton", "cpu")
        with dlcv_fast.use_backend("triton"), pytest.raises(
            dlcv_fast.BackendError, match="interpreter computes bfloat16 wrongly"
        ):
            dlcv_fast.max_pool2d(x.bfloat16(), 2)
