"""conv2d against torch.nn.functional.conv2d: output and the gradients of input, weight
and bias, every parameter (odd channels and sizes, AlexNet's and ResNet's layers, 1x1,
depthwise, groups, dilation, asymmetric kernels, strides and 'same' padding), memory
formats, the fused ReLU, nn.Conv2d, errors, gradcheck, opcheck and torch.compile, on every
backend that runs here.

Convolutions are sums: in float64 they match PyTorch within the float64 tolerance; in the
other dtypes, our error against a float64 computation must be at most twice PyTorch's own
error in that dtype plus a small absolute term (conftest.check_error's rule).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._prims_common import is_non_overlapping_and_dense_or_false
from conftest import (BACKEND_DEVICES, CUDA_EMULATED, TOLERANCES, assert_close,
                      backend_dtype_cases)

import dlcv_fast

# (name, input shape, out_channels, kernel, stride, padding, dilation, groups)
CASES = [
    ("c1", (2, 1, 7, 7), 3, 3, 1, 1, 1, 1),
    ("c3-13x17-s2", (1, 3, 13, 17), 7, 3, 2, 1, 1, 1),
    ("c7-k5x3-s1x2", (2, 7, 17, 13), 65, (5, 3), (1, 2), (2, 1), 1, 1),
    ("c65-valid", (1, 65, 7, 7), 7, 3, 1, "valid", 1, 1),
    ("size1", (2, 4, 1, 1), 5, 1, 1, 0, 1, 1),
    ("alexnet-11x11-s4", (1, 3, 35, 35), 8, 11, 4, 2, 1, 1),
    ("resnet-stem-7x7-s2", (1, 3, 23, 23), 8, 7, 2, 3, 1, 1),
    ("pointwise", (2, 16, 7, 7), 32, 1, 1, 0, 1, 1),
    ("pointwise-s2", (2, 16, 7, 7), 8, 1, 2, 0, 1, 1),
    ("dilation2", (2, 6, 13, 13), 4, 3, 1, 2, 2, 1),
    ("groups2", (2, 8, 9, 9), 6, 3, 1, 1, 1, 2),
    ("depthwise-7x7", (2, 8, 13, 13), 8, 7, 1, 3, 1, 8),
    ("depthwise-mult2-s2", (1, 4, 7, 9), 8, 3, 2, 1, 1, 4),
    ("same-even-kernel", (2, 4, 7, 8), 4, (4, 2), 1, "same", 1, 1),
    ("same-dilated", (1, 3, 9, 7), 5, 3, 1, "same", (2, 3), 1),
    ("kernel-fills-input", (1, 2, 5, 5), 3, 5, 1, 0, 1, 1),
    # Stride 1 takes dgrad as a convolution padded by d * (k - 1) - p: a channel multiplier,
    # and a padding beyond the kernel's reach (where that would be negative).
    ("depthwise-mult2-s1", (2, 4, 9, 7), 8, 3, 1, 1, 1, 4),
    ("pad-beyond-kernel", (2, 3, 6, 5), 4, (3, 1), 1, (3, 1), 1, 1),
    # Long enough reductions (N*OH*OW, K) for the GPU kernels' split-K wgrad, and channel
    # counts per group that are multiples of 8 and 16 for their vector and tap-major paths.
    ("c16-3x3-s2-long", (4, 16, 33, 31), 24, 3, 2, 1, 1, 1),
    ("groups2-c32", (2, 32, 12, 12), 32, 3, 1, 1, 1, 2),
    # Stride and dilation on one axis: dgrad's taps at a stride phase (every stride /
    # gcd(stride, dilation)-th tap meets an output), coprime and not.
    ("s2-d2", (2, 6, 15, 14), 4, 3, 2, 2, 2, 1),
    ("s2-d3", (1, 3, 17, 16), 4, 3, 2, 3, 3, 1),
    ("s2x3-d4x3-groups2", (1, 4, 19, 20), 6, (3, 2), (2, 3), (1, 2), (4, 3), 2),
    # Depthwise with dilation, an asymmetric kernel and unequal padding; 16 channels for the
    # GPU kernels' vector paths.
    ("depthwise-5x3-d2-s2", (2, 8, 15, 13), 8, (5, 3), 2, (4, 1), 2, 8),
    ("depthwise-c16-d2x1", (2, 16, 11, 12), 16, 3, 1, (2, 1), (2, 1), 16),
]
LAYOUTS = ["nchw", "channels_last", "strided"]


@pytest.fixture(autouse=True)
def _no_tf32():
    """float32 exactly: TF32 (PyTorch's default for convolutions on a GPU) rounds the
    operands to 10 bits; test_tf32_follows_cudnn_flag covers it."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


def make(shape, dtype, device, layout="nchw", seed=0):
    """randn in the requested layout: dense NCHW, channels_last, or a strided view (every
    other column of a wider tensor)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)
        return wide.to(device=device, dtype=dtype)[..., ::2]
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def weight_for(shape, out_channels, kernel, groups, dtype, device, seed=1):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    g = torch.Generator().manual_seed(seed)
    # Scaled as PyTorch initialises, so outputs stay O(1) at every fan-in.
    fan_in = shape[1] // groups * kh * kw
    w = torch.randn(out_channels, shape[1] // groups, kh, kw, generator=g, dtype=torch.float64)
    return (w / fan_in**0.5).to(device=device, dtype=dtype)


def _input_like(t):
    """A copy of t with the same strides that autograd can differentiate against: a dense
    clone, or for a strided view the same view of a copy of its storage."""
    if is_non_overlapping_and_dense_or_false(t):
        return t.detach().clone().requires_grad_()
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t.detach()
    return wide.requires_grad_()[..., ::2]


def run(fn, inputs, grad_seed=2):
    """fn's output and its gradients with respect to every input that is not None, on
    copies of the inputs, for a fixed random output gradient."""
    args = [None if t is None else _input_like(t) for t in inputs]
    y = fn(*args)
    g = torch.Generator().manual_seed(grad_seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)
    return (y, *torch.autograd.grad(y, [t for t in args if t is not None], gy))


def assert_within_torch_error(ours, theirs, exact, dtype, what):
    """float64: assert_close to PyTorch. Else: |ours - exact| <= 2 |torch - exact| + atol,
    elementwise maxima, with exact a float64 computation."""
    if dtype == torch.float64:
        assert_close(ours, theirs, msg=what)
        return
    exact = exact.double().cpu()
    ours_err = (ours.double().cpu() - exact).abs().max().item()
    torch_err = (theirs.double().cpu() - exact).abs().max().item()
    atol = TOLERANCES[dtype][1] * max(1.0, exact.abs().max().item())
    assert ours_err <= 2 * torch_err + atol, (
        f"{what}: error {ours_err:.3g} against float64, PyTorch's {torch_err:.3g} (atol {atol:.3g})"
    )


def check_case(backend, device, dtype, case, layout, activation, with_bias):
    name, shape, out_channels, kernel, stride, padding, dilation, groups = case
    x = make(shape, dtype, device, layout)
    w = weight_for(shape, out_channels, kernel, groups, dtype, device)
    b = make((out_channels,), dtype, device, seed=3) if with_bias else None
    relu = activation == "relu"

    def ours(x, w, b):
        with dlcv_fast.use_backend(backend):
            return dlcv_fast.conv2d(x, w, b, stride, padding, dilation, groups,
                                    activation=activation)

    def torch_conv(x, w, b):
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        return y.relu() if relu else y

    # PyTorch on the CPU is the reference (its CPU kernels take every dtype here), in the
    # dtype under test and in float64.
    mine = run(ours, [x, w, b])
    cpu = [t.cpu() if t is not None else None for t in (x, w, b)]
    theirs = run(torch_conv, cpu)
    exact = run(torch_conv, [t.double() if t is not None else None for t in cpu])
    assert mine[0].shape == theirs[0].shape and mine[0].dtype == dtype
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert mine[0].is_contiguous(memory_format=torch.channels_last)
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for what, a, t, e in zip(names, mine, theirs, exact):
        assert_within_torch_error(a, t, e, dtype, f"{name} {layout} {activation}: {what}")


# Triton's interpreter is slow: there, float16 and float64 run on a few cases, and most
# cases run in one layout each (the kernels index every layout by strides alike).
INTERPRETER_DTYPE_CASES = {"c3-13x17-s2", "groups2", "depthwise-mult2-s2", "same-even-kernel",
                           "groups2-c32"}
INTERPRETER_LAYOUT_CASES = {"c3-13x17-s2", "pointwise"}


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _cases():
    return [
        pytest.param(*p.values, case, id=f"{p.id}-{case[0]}")
        for p in backend_dtype_cases()
        for case in CASES
        if not (_interpreted(*p.values[:2]) and p.values[2] != torch.float32
                and case[0] not in INTERPRETER_DTYPE_CASES)
    ]


@pytest.mark.parametrize(("backend", "device", "dtype", "case"), _cases())
def test_matches_torch(backend, device, dtype, case):
    variants = list(enumerate(LAYOUTS))  # activation and bias vary with the layout
    if _interpreted(backend, device) and case[0] not in INTERPRETER_LAYOUT_CASES:
        variants = [variants[CASES.index(case) % len(variants)]]
    for i, layout in variants:
        check_case(backend, device, dtype, case, layout, activation=("relu", None)[i % 2],
                   with_bias=i != 2)


# Depthwise wgrads long enough that the CUDA kernel splits the N*OH*OW positions over
# blocks (at least 2048 positions on channels_last, 32768 on NCHW) and adds the slices in a
# second kernel; too slow for Triton's interpreter, so on a GPU only.
LONG_DEPTHWISE = [
    (("depthwise-long-cl", (4, 8, 32, 32), 8, 3, 1, 1, 1, 8), "channels_last"),
    (("depthwise-long-nchw", (2, 2, 128, 128), 4, 3, 1, 1, 1, 2), "nchw"),
]


# The GPU backends, on a GPU or (the CUDA kernels only) in their CPU emulation, where the
# cpu backend runs them.
if torch.cuda.is_available():
    GPU_BACKENDS = [("cuda", "cuda"), ("triton", "cuda")]
else:
    GPU_BACKENDS = [("cpu", "cpu")] if CUDA_EMULATED else []


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a GPU (or the CUDA emulation)")
@pytest.mark.parametrize(("case", "layout"), LONG_DEPTHWISE, ids=[c[0][0] for c in LONG_DEPTHWISE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("backend", "device"), GPU_BACKENDS, ids=[b for b, _ in GPU_BACKENDS])
def test_depthwise_long_reductions(backend, device, dtype, case, layout):
    if backend == "cuda" and not dlcv_fast.cuda_built():
        pytest.skip("built without CUDA kernels")
    check_case(backend, device, dtype, case, layout, activation="relu", with_bias=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_forward_in_row_tiles(layout, dtype):
    """The CPU forward builds the columns of a few output rows at a time (about 512 KiB):
    70 rows of 70 x 576 columns make tiles of 3 (float32) or 1 (float64) rows, 73 of
    4 x 64 taps for the 1x1 case, with a partial last tile, and bias + ReLU per tile."""
    x = make((2, 64, 70, 70), dtype, "cpu", layout)
    b = make((32,), dtype, "cpu", seed=3)
    for k, s, p in ((3, 1, 1), (1, 1, 0), (5, 2, 2)):
        w = weight_for((2, 64, 70, 70), 32, k, 1, dtype, "cpu")
        got = dlcv_fast.conv2d(x, w, b, s, p, activation="relu")
        want = F.conv2d(x.double(), w.double(), b.double(), s, p).relu()
        assert_within_torch_error(got, F.conv2d(x, w, b, s, p).relu(), want, dtype,
                                  f"{layout} k{k} s{s}")


@pytest.mark.parametrize(("x_shape", "out_channels", "k", "padding", "groups"), [
    ((9, 6, 14, 14), 16, 5, 0, 1),   # small images: tasks of several, the last one partial
    ((9, 3, 12, 12), 8, 3, 1, 1),    # likewise, dgrad as a flipped convolution
    ((2, 192, 28, 28), 128, 3, 1, 64),  # 64 groups in spans of 3 (columns capped), 1 left
    ((3, 12, 9, 9), 8, 1, 0, 4),     # pointwise with groups: every group in one span
], ids=["images", "images-same", "group-spans", "pointwise-groups"])
def test_cpu_batched_images_and_group_spans(x_shape, out_channels, k, padding, groups):
    """The CPU kernels batch whole small images into one GEMM per task, and groups into
    spans of one batched GEMM: forward, dgrad and wgrad against PyTorch in float64, with
    two threads so that tasks split the batch."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = make(x_shape, torch.float64, "cpu", "nchw").requires_grad_()
        w = weight_for(x_shape, out_channels, k, groups, torch.float64, "cpu").requires_grad_()
        b = make((out_channels,), torch.float64, "cpu", seed=3).requires_grad_()
        ours = dlcv_fast.conv2d(x, w, b, 1, padding, groups=groups, activation="relu")
        ref = F.conv2d(x, w, b, 1, padding, groups=groups).relu()
        g = torch.randn_like(ref)
        mine = torch.autograd.grad(ours, (x, w, b), g)
        theirs = torch.autograd.grad(ref, (x, w, b), g)
        for what, a, e in zip(("output", "grad_input", "grad_weight", "grad_bias"),
                              (ours, *mine), (ref, *theirs)):
            assert_close(a, e, msg=what)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("which", ["weight", "input", "unbatched"])
def test_output_memory_format_follows_torch(backend_device, which):
    """Channels_last output when the input or the weight is channels_last, as PyTorch's conv
    (model.to(memory_format=torch.channels_last) with NCHW images); values and gradients
    as PyTorch's."""
    _, device = backend_device
    cl = torch.channels_last
    x = make((2, 3, 8, 7), torch.float64, device)
    w = make((4, 3, 3, 3), torch.float64, device, seed=1)
    if which == "input":
        x = x.contiguous(memory_format=cl)
    else:
        w = w.contiguous(memory_format=cl)
    if which == "unbatched":
        x = x[0]
    mine = run(lambda x, w: dlcv_fast.conv2d(x, w, padding=1), [x, w])
    theirs = run(lambda x, w: F.conv2d(x, w, padding=1), [x.cpu(), w.cpu()])
    assert mine[0].stride() == theirs[0].stride()
    assert which == "unbatched" or mine[0].is_contiguous(memory_format=cl)
    for what, a, t in zip(["output", "grad_input", "grad_weight"], mine, theirs):
        assert_close(a.cpu(), t, msg=what)


TRITON_DEVICES = [d for b, d in BACKEND_DEVICES if b == "triton"]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_groups_in_several_launches(monkeypatch, device, layout):
    """Past the grid's limit of groups (65535; 2 here, so that the interpreter reaches it)
    the Triton GEMMs run on views of each run of groups: every group's output and gradients
    as PyTorch's."""
    from dlcv_fast.triton_kernels import conv2d as kernels

    monkeypatch.setattr(kernels, "MAX_GROUPS_PER_LAUNCH", 2)
    assert kernels._group_runs(5) == [(0, 2), (2, 4), (4, 5)]
    split = []  # the passes that split their groups
    runs = kernels._group_runs
    monkeypatch.setattr(kernels, "_group_runs", lambda g: split.append(g) or runs(g))
    x = make((2, 10, 7, 6), torch.float64, device, layout)
    w = make((15, 2, 3, 2), torch.float64, device, seed=1)
    b = make((15,), torch.float64, device, seed=2)

    def ours(x, w, b):
        with dlcv_fast.use_backend("triton"):
            return dlcv_fast.conv2d(x, w, b, (2, 1), 1, 1, 5, activation="relu")

    mine = run(ours, [x, w, b])
    theirs = run(lambda x, w, b: F.conv2d(x, w, b, (2, 1), 1, 1, 5).relu(),
                 [t.cpu() for t in (x, w, b)])
    assert split == [5, 5, 5]  # forward, dgrad, wgrad
    for what, a, t in zip(["output", "grad_input", "grad_weight", "grad_bias"], mine, theirs):
        assert_close(a.cpu(), t, msg=what)


@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICES)
def test_unbatched_input_and_batch_zero(backend, device):
    w = weight_for((1, 3, 1, 1), 4, 3, 1, torch.float64, device)
    x = make((3, 9, 8), torch.float64, device)
    with dlcv_fast.use_backend(backend):
        y = dlcv_fast.conv2d(x, w, None, 2, 1)
        empty = dlcv_fast.conv2d(make((0, 3, 9, 8), torch.float64, device), w, padding=1)
    assert_close(y, F.conv2d(x, w, None, 2, 1))
    assert empty.shape == (0, 4, 9, 8)


@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICES)
def test_batch_zero_backward(backend, device):
    x = torch.randn(0, 4, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    with dlcv_fast.use_backend(backend):
        y = dlcv_fast.conv2d(x, w, b, padding=1, groups=2, activation="relu")
    grads = torch.autograd.grad(y.sum(), (x, w, b))
    assert grads[0].shape == x.shape
    assert torch.equal(grads[1], torch.zeros_like(w)) and torch.equal(grads[2], torch.zeros_like(b))


@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICES)
def test_relu_gradient_is_masked_by_the_output(backend, device):
    # Outputs exactly zero before the ReLU do not pass gradient (PyTorch's relu backward).
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.ones(3, 2, 1, 1, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64, device=device, requires_grad=True)
    with dlcv_fast.use_backend(backend):
        y = dlcv_fast.conv2d(x, w, b, activation="relu")
    y.sum().backward()
    assert b.grad.tolist() == [16.0, 0.0, 0.0]


# --- gradcheck, opcheck, torch.compile -----------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck(backend_device, layout):
    _, device = backend_device
    x = make((2, 4, 6, 5), torch.float64, device, layout).requires_grad_()
    w = weight_for((2, 4, 6, 5), 6, (3, 2), 2, torch.float64, device).requires_grad_()
    b = make((6,), torch.float64, device, seed=3).requires_grad_()
    for activation in (None, "relu"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: dlcv_fast.conv2d(x, w, b, (2, 1), 1, (1, 2), 2,
                                             activation=activation),
            (x, w, b), fast_mode=True,
        )


# (groups, out_channels): grouped with a 2x1 kernel; depthwise (groups == channels) with a
# channel multiplier of 2, which takes the depthwise kernels.
@pytest.mark.parametrize("groups,out_channels", [(2, 6), (4, 8)])
def test_gradgradcheck(backend_device, groups, out_channels):
    """Second derivatives (gradient penalties, Hessian-vector products) in every input,
    through the bias/ReLU epilogue, on NCHW and channels_last."""
    _, device = backend_device
    layout = "channels_last" if groups == 4 else "nchw"
    x = make((2, 4, 5, 5), torch.float64, device, layout).requires_grad_()
    w = weight_for((2, 4, 5, 5), out_channels, (2, 3), groups, torch.float64,
                   device).requires_grad_()
    b = make((out_channels,), torch.float64, device, seed=3).requires_grad_()
    for activation in (None, "relu"):
        assert torch.autograd.gradgradcheck(
            lambda x, w, b: dlcv_fast.conv2d(x, w, b, (2, 1), (1, 0), (1, 2), groups,
                                             activation=activation),
            (x, w, b), fast_mode=True,
        )


def test_gradient_penalty_matches_torch(backend_device):
    """d/dw of |d(sum conv)/dx|^2, the WGAN-GP pattern, equals PyTorch's."""
    _, device = backend_device
    x = make((2, 3, 6, 6), torch.float64, device)
    w = weight_for((2, 3, 6, 6), 4, 3, 1, torch.float64, device)
    b = make((4,), torch.float64, device, seed=3)
    grads = []
    for conv in (lambda *a: dlcv_fast.conv2d(*a, activation="relu"),
                 lambda *a: torch.relu(torch.nn.functional.conv2d(*a))):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        bi = b.clone().requires_grad_()
        y = conv(xi, wi, bi, 2, 1)
        (gx,) = torch.autograd.grad((y * y).sum(), xi, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), (wi, bi)))
    for ours, theirs in zip(*grads):
        assert_close(ours, theirs)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend_device, requires_grad):
    backend, device = backend_device
    suffix = "_triton" if backend == "triton" else ""
    ops = torch.ops.dlcv_fast
    fwd = getattr(ops, "conv2d" + suffix).default
    dgrad = getattr(ops, "conv2d_backward_input" + suffix).default
    wgrad = getattr(ops, "conv2d_backward_weight" + suffix).default
    bias_relu = getattr(ops, "conv2d_bias_relu_backward" + suffix).default
    x = make((2, 4, 7, 6), torch.float32, device).requires_grad_(requires_grad)
    w = weight_for((2, 4, 7, 6), 6, 3, 2, torch.float32, device).requires_grad_(requires_grad)
    b = make((6,), torch.float32, device, seed=3).requires_grad_(requires_grad)
    params = ([2, 1], [1, 0, 2, 1], [1, 2], 2)
    for inp in (x, x.detach().contiguous(memory_format=torch.channels_last)):
        for relu in (False, True):
            torch.library.opcheck(fwd, (inp, w, b, *params, relu))
        y = fwd(inp.detach(), w.detach(), b.detach(), *params, True)
        gy = torch.randn_like(y)
        torch.library.opcheck(dgrad, (gy, inp.detach(), w.detach(), *params))
        torch.library.opcheck(wgrad, (gy, inp.detach(), w.detach(), *params))
        for output, bias in ((y, True), (None, True), (y, False)):
            torch.library.opcheck(bias_relu, (gy, output, bias))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        dlcv_fast.nn.Conv2d(3, 8, 3, padding=1, activation="relu"),
        dlcv_fast.nn.Conv2d(8, 8, 3, stride=2, padding="valid", groups=4, bias=False),
        torch.nn.Flatten(),
    )
    x = torch.randn(2, 3, 9, 10, requires_grad=True)
    with dlcv_fast.use_backend("cpu"):
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        actual = compiled(x)
        assert_close(actual, expected)
        actual.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    with dlcv_fast.use_backend("cpu"):
        expected.sum().backward()
    assert_close(grad, x.grad)


# --- nn.Conv2d ---------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_module_matches_torch(padding_mode):
    kwargs = dict(stride=(2, 1), padding=(2, 1), dilation=(1, 2), groups=2, bias=True,
                  padding_mode=padding_mode, dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(4, 6, (3, 2), **kwargs)
    torch.manual_seed(0)
    ours = dlcv_fast.nn.Conv2d(4, 6, (3, 2), **kwargs)
    assert isinstance(ours, torch.nn.Conv2d)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():  # same initialisation from the same seed
        assert torch.equal(ours.state_dict()[key], value), key
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    assert_close(ours(x), theirs(x))
    same = dlcv_fast.nn.Conv2d(4, 6, 4, padding="same", dtype=torch.float64)
    reference = torch.nn.Conv2d(4, 6, 4, padding="same", dtype=torch.float64)
    reference.load_state_dict(same.state_dict())
    assert_close(same(x), reference(x))


def test_module_activation():
    conv = dlcv_fast.nn.Conv2d(3, 5, 3, padding=1, activation="relu", dtype=torch.float64)
    assert "activation='relu'" in repr(conv)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1).relu())
    with pytest.raises(ValueError, match="activation"):
        dlcv_fast.nn.Conv2d(3, 5, 3, activation="gelu")


# --- errors ----------------------------------------------------------------------------------

ERRORS = [
    # (input shape, weight shape, kwargs, exception, message)
    ((1, 4, 8, 8), (6, 3, 3, 3), {}, ValueError, "input has 4 channels"),
    ((1, 4, 8, 8), (8, 2, 3, 3), {"groups": 4}, ValueError, "input has 4 channels"),
    ((1, 6, 8, 8), (4, 2, 3, 3), {"groups": 3}, ValueError, "divisible by groups"),
    ((1, 3, 4, 4), (2, 3, 7, 7), {}, ValueError, "larger than the padded input"),
    ((1, 3, 4, 4), (2, 3, 3, 3), {"stride": 0}, ValueError, "stride must be positive"),
    ((1, 3, 4, 4), (2, 3, 3, 3), {"padding": -1}, ValueError, "padding must be non-negative"),
    ((1, 3, 4, 4), (2, 3, 3, 3), {"dilation": 0}, ValueError, "dilation must be positive"),
    ((1, 3, 4, 4), (2, 3, 3, 3), {"groups": 0}, ValueError, "groups must be positive"),
    ((1, 3, 4, 4), (2, 3, 3, 3), {"padding": "same", "stride": 2}, ValueError, "strided"),
    ((1, 3, 4, 4), (2, 3, 3, 3), {"padding": "full"}, ValueError, "'same' or 'valid'"),
    ((1, 3, 4, 4), (2, 3, 3, 3), {"stride": (1, 2, 3)}, TypeError, "stride"),
    ((1, 3, 4, 4), (2, 3, 3, 3), {"activation": "tanh"}, ValueError, "activation"),
    ((1, 3, 4, 4), (2, 3, 3), {}, ValueError, "weight must be 4-D"),
    # 'same' padding reads the kernel size: the weight's dimensions are checked first
    ((1, 3, 6, 6), (3,), {"padding": "same"}, ValueError, "weight must be 4-D"),
    ((1, 3, 6, 6), (), {"padding": "same"}, ValueError, "weight must be 4-D"),
    # Integers only, as in torch: bools and floats (Python, NumPy or tensor) are refused
    ((1, 4, 6, 6), (2, 4, 3, 3), {"stride": True}, TypeError, "stride"),
    ((1, 4, 6, 6), (2, 4, 3, 3), {"stride": torch.tensor(2.0)}, TypeError, "stride"),
    ((1, 4, 6, 6), (2, 4, 3, 3), {"stride": torch.tensor([1, 2])}, TypeError, "stride"),
    ((1, 4, 6, 6), (2, 4, 3, 3), {"padding": (1, 2.0)}, TypeError, "padding"),
    ((1, 4, 6, 6), (2, 4, 3, 3), {"padding": np.bool_(True)}, TypeError, "padding"),
    ((1, 4, 6, 6), (2, 4, 3, 3), {"dilation": np.float64(2.0)}, TypeError, "dilation"),
    ((1, 4, 6, 6), (2, 4, 3, 3), {"dilation": (torch.tensor(True), 1)}, TypeError, "dilation"),
    ((1, 4, 6, 6), (2, 2, 3, 3), {"groups": True}, TypeError, "groups"),
    ((1, 4, 6, 6), (2, 2, 3, 3), {"groups": 2.0}, TypeError, "groups"),
    ((1, 4, 6, 6), (2, 2, 3, 3), {"groups": (2,)}, TypeError, "groups"),
    ((3, 4, 4, 4, 4), (2, 3, 3, 3), {}, ValueError, "input must be 3-D"),
]


@pytest.mark.parametrize(("x_shape", "w_shape", "kwargs", "error", "message"), ERRORS)
def test_errors(backend_device, x_shape, w_shape, kwargs, error, message):
    _, device = backend_device
    x = torch.randn(x_shape, device=device)
    w = torch.randn(w_shape, device=device)
    with pytest.raises(error, match=message):
        dlcv_fast.conv2d(x, w, **kwargs)


# What torch takes as an int: NumPy integers and integer tensors of one element, alone or
# in a tuple.
INT_LIKE = [
    {"stride": np.int64(2), "padding": np.int32(1), "dilation": torch.tensor(1),
     "groups": np.int64(2)},
    {"stride": (torch.tensor(1), np.int64(2)), "padding": torch.tensor([1]),
     "dilation": [np.uint8(2)], "groups": torch.tensor(2)},
    {"stride": [np.int16(1)], "padding": "same", "dilation": (np.int64(2), 1),
     "groups": torch.tensor([2])},
]


@pytest.mark.parametrize("kwargs", INT_LIKE)
def test_integer_like_arguments(backend_device, kwargs):
    _, device = backend_device
    x = make((1, 4, 7, 6), torch.float64, device)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, device=device)
    assert_close(dlcv_fast.conv2d(x, w, **kwargs), F.conv2d(x, w, **kwargs))


def test_dtype_and_bias_errors(backend_device):
    _, device = backend_device
    x = torch.randn(1, 3, 5, 5, device=device)
    w = torch.randn(2, 3, 3, 3, device=device)
    with pytest.raises(TypeError, match="weight has dtype"):
        dlcv_fast.conv2d(x, w.double())
    with pytest.raises(TypeError, match="bias has dtype"):
        dlcv_fast.conv2d(x, w, torch.zeros(2, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="bias must be 1-D with out_channels"):
        dlcv_fast.conv2d(x, w, torch.zeros(3, device=device))
    with pytest.raises(TypeError, match="input must be float32"):
        dlcv_fast.conv2d(x.int(), w.int())
    with pytest.raises(RuntimeError, match="weight is on meta"):
        dlcv_fast.conv2d(x, w.to("meta"))


@pytest.fixture
def _fp32_settings():
    """Restores PyTorch's float32-precision settings (conv, cuDNN-wide and global)."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, cudnn.fp32_precision,
             torch.backends.fp32_precision)
    yield
    (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, cudnn.fp32_precision,
     torch.backends.fp32_precision) = saved


def _set_tf32(api: str, allow: bool) -> None:
    if api == "legacy":
        torch.backends.cudnn.allow_tf32 = allow
    else:
        torch.backends.cudnn.conv.fp32_precision = "tf32" if allow else "ieee"


@pytest.mark.usefixtures("_fp32_settings")
def test_tf32_setting_read_as_pytorch_reads_it(backend_device):
    """Both of PyTorch's APIs, and the new one's inheritance ("none" defers to cuDNN's, then
    the global setting). After conv.fp32_precision = "ieee" the legacy flag cannot be read
    at all (conv and RNN differ), which once made every Triton convolution raise."""
    from dlcv_fast.ops.conv2d import _allow_tf32

    cudnn = torch.backends.cudnn
    for api in ("legacy", "fp32_precision"):
        for allow in (False, True):
            _set_tf32(api, allow)
            assert _allow_tf32() is allow, (api, allow)
    cudnn.conv.fp32_precision = "none"
    cudnn.fp32_precision = "tf32"
    assert _allow_tf32() is True
    cudnn.fp32_precision = "none"
    assert _allow_tf32() is False
    cudnn.conv.fp32_precision = "ieee"
    with pytest.raises(RuntimeError):
        _ = cudnn.allow_tf32
    _, device = backend_device
    x, w = torch.randn(1, 2, 5, 5, device=device), torch.randn(3, 2, 3, 3, device=device)
    torch.testing.assert_close(dlcv_fast.conv2d(x, w), F.conv2d(x, w))


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a GPU (or the CUDA emulation)")
@pytest.mark.usefixtures("_fp32_settings")
@pytest.mark.parametrize("api", ["legacy", "fp32_precision"])
@pytest.mark.parametrize(("backend", "device"), GPU_BACKENDS, ids=[b for b, _ in GPU_BACKENDS])
def test_tf32_follows_cudnn_flag(backend, device, api):
    if backend == "cuda" and not dlcv_fast.cuda_built():
        pytest.skip("built without CUDA kernels")
    x = torch.randn(4, 64, 16, 16, device=device, requires_grad=True)
    w = (torch.randn(64, 64, 3, 3, device=device) / 24).requires_grad_()
    gy = torch.randn(4, 64, 16, 16, device=device)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    y64 = F.conv2d(x64, w64, padding=1)
    exact = (y64, *torch.autograd.grad(y64, (x64, w64), gy.double()))
    errors = {}
    for allow in (False, True):  # the fixtures restore the settings
        _set_tf32(api, allow)
        with dlcv_fast.use_backend(backend):
            y = dlcv_fast.conv2d(x, w, padding=1)
            got = (y, *torch.autograd.grad(y, (x, w), gy))
        errors[allow] = [(a.double() - e).abs().max().item() / e.abs().max().item()
                         for a, e in zip(got, exact)]
    # Output, dgrad and wgrad: float32 exact to ~1e-6 relative; TF32 to ~1e-3.
    assert max(errors[False]) < 1e-5 < min(errors[True]), errors
