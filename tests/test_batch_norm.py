"""batch_norm against torch.nn.functional.batch_norm (computed in float64 on the same
values): outputs, running statistics, gradients, every dimension count, training and
evaluation, affine or not, momentum, memory formats, the fused ReLU, the large-mean case,
errors, gradcheck and gradgradcheck, opcheck, torch.compile, the nn modules and SyncBatchNorm
across two processes, on every backend that runs here."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, backend_dtype_cases, check_error

import dlcv_fast

# Odd sizes, a single channel, one value per channel in eval, rows of C (2-D), 3-D to 5-D, and
# 37 channels of 35 values: whole vectors of the CPU kernels and a remainder, in either layout.
SHAPES = [(5, 3), (4, 3, 7), (2, 3, 5, 7), (1, 1, 4, 4), (3, 5, 1, 1), (2, 3, 2, 3, 5),
          (3, 37, 5, 7)]
LAYOUTS = ["contiguous", "channels_last", "strided"]
SMALL = {"triton"}  # interpreted Triton: fewer cases


def make(shape, dtype, device, layout="contiguous", seed=0, offset=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    x = x.to(device)
    if layout == "channels_last" and x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    if layout == "strided":  # every other element of the last dimension of a wider tensor
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        view = wide[..., ::2]
        view.copy_(x)
        return view
    return x


def params(C, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(device, dtype)
    rm = torch.randn(C, generator=g, dtype=torch.float64).to(device, dtype)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device, dtype)
    return w, b, rm, rv


def reference(x, rm, rv, w, b, training, momentum, eps, relu):
    """F.batch_norm (then relu) in float64 on x's values; (output, running_mean, running_var)."""
    rm64 = None if rm is None else rm.detach().double().clone()
    rv64 = None if rv is None else rv.detach().double().clone()
    out = F.batch_norm(x.detach().double(), rm64, rv64,
                       None if w is None else w.detach().double(),
                       None if b is None else b.detach().double(), training, momentum, eps)
    return (out.relu() if relu else out), rm64, rv64


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_forward_matches_torch(backend, device, dtype, training, relu):
    shapes = SHAPES[:4] if backend in SMALL else SHAPES
    for i, shape in enumerate(shapes):
        for layout in LAYOUTS if backend not in SMALL else ["contiguous", "channels_last"]:
            x = make(shape, dtype, device, layout, seed=i)
            C = shape[1]
            pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) and i % 2 else dtype
            w, b, rm, rv = params(C, pdt, device)
            affine = i % 3 != 1
            w, b = (w, b) if affine else (None, None)
            momentum = (0.1, 0.0, 1.0, 0.3)[i % 4]
            if training and i % 4 == 3:  # no running statistics
                rm = rv = None
            want, want_rm, want_rv = reference(x, rm, rv, w, b, training, momentum, 1e-5, relu)
            with dlcv_fast.use_backend(backend):
                out = dlcv_fast.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5,
                                           activation="relu" if relu else None)
            msg = f"shape {shape}, {layout}, affine={affine}"
            assert out.dtype == dtype and out.shape == x.shape, msg
            if layout == "channels_last" and x.dim() in (4, 5) and x[0, 0].numel() > 1:
                fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
                assert out.is_contiguous(memory_format=fmt), msg + ": memory format not kept"
            assert_close(out, want, dtype, msg=msg)
            if rm is not None:
                assert_close(rm, want_rm, pdt, msg=msg + " running_mean")
                assert_close(rv, want_rv, pdt, msg=msg + " running_var")


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_gradients_match_torch(backend, device, dtype, training, relu):
    shapes = [(6, 3), (2, 3, 5, 7), (2, 4, 3, 2, 3), (3, 37, 5, 7)]
    if backend in SMALL:
        shapes = shapes[:2]
    for i, shape in enumerate(shapes):
        for layout in ("contiguous", "channels_last") if len(shape) >= 4 else ("contiguous",):
            x = make(shape, dtype, device, layout, seed=i).requires_grad_()
            w, b, rm, rv = params(shape[1], dtype, device)
            affine = i != 1 or relu
            if affine:
                w.requires_grad_()
                b.requires_grad_()
            else:
                w = b = None
            with dlcv_fast.use_backend(backend):
                out = dlcv_fast.batch_norm(x, rm if not training else None,
                                           rv if not training else None, w, b, training,
                                           activation="relu" if relu else None)
            g = make(shape, dtype, device, seed=9)
            leaves = [x] + ([w, b] if affine else [])
            got = torch.autograd.grad(out, leaves, g)
            x64 = x.detach().double().requires_grad_()
            leaves64 = [x64] + ([t.detach().double().requires_grad_() for t in (w, b)]
                                if affine else [])
            want = F.batch_norm(x64, None if training else rm.double(),
                                None if training else rv.double(),
                                leaves64[1] if affine else None, leaves64[2] if affine else None,
                                training)
            want = want.relu() if relu else want
            want_grads = torch.autograd.grad(want, leaves64, g.double())
            for name, a, e in zip(("input", "weight", "bias"), got, want_grads):
                assert a.dtype == dtype
                assert_close(a, e, dtype, msg=f"grad {name}, shape {shape}, {layout}")


# channels_last shapes that reach every path of the row reductions: rows wider than 2 KiB
# (four rows per visit of the accumulators; 300 channels only in float64), a row count that is
# not a multiple of four, channels off the vector width, and more rows than one block.
WIDE_AND_LONG = [(5, 515, 3, 3), (2, 300, 5, 5), (3, 70, 11, 13)]


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_channels_last_wide_and_long_rows(backend, device, dtype):
    """Against float64 with the rule for reductions (conftest.check_error): the weight and
    bias gradients sum hundreds of terms of both signs."""
    for i, shape in enumerate(WIDE_AND_LONG):
        for relu in (False, True):
            x = make(shape, dtype, device, "channels_last", seed=i, offset=3.0, scale=2.0)
            w, b, rm, rv = params(shape[1], dtype, device, seed=i)
            g = make(shape, dtype, device, "channels_last", seed=9 + i)

            def run(fn, dt):
                leaves = [t.detach().to(dt).requires_grad_() for t in (x, w, b)]
                buffers = [rm.to(dt, copy=True), rv.to(dt, copy=True)]
                out = fn(leaves[0], *buffers, *leaves[1:])
                grads = torch.autograd.grad(out, leaves, g.to(dt))
                return [out, *buffers, *grads]

            def torch_fn(x, rm, rv, w, b):
                out = F.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-5)
                return out.relu() if relu else out

            def ours(x, rm, rv, w, b):
                return dlcv_fast.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-5,
                                            activation="relu" if relu else None)

            with dlcv_fast.use_backend(backend):
                got = run(ours, dtype)
            theirs, exact = run(torch_fn, dtype), run(torch_fn, torch.float64)
            msg = f"shape {shape}, relu={relu}"
            assert got[0].is_contiguous(memory_format=torch.channels_last), msg
            names = ("output", "running_mean", "running_var", "grad input", "grad weight",
                     "grad bias")
            for name, a, t, e in zip(names, got, theirs, exact):
                check_error(a, e, t, dtype, f"{name}, {msg}")


def test_fused_relu_masks_by_the_output(backend_device):
    """Where relu clips, no gradient flows; the mask is the forward's."""
    backend, device = backend_device
    x = make((4, 3, 3, 3), torch.float32, device).requires_grad_()
    out = dlcv_fast.batch_norm(x, None, None, training=True, activation="relu")
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(F.batch_norm(x64, None, None, training=True).relu(), x64,
                                  torch.ones_like(x64))
    assert (out == 0).any() and (out > 0).any()
    assert_close(gx, want, torch.float32)


def test_large_mean_normalises(backend_device):
    """Values near 1e4 with unit variance: sums of squares in float32 would lose the variance
    entirely; Welford / shifted two-pass statistics keep it."""
    backend, device = backend_device
    for shape, layout in (((8, 3, 16, 16), "contiguous"), ((8, 3, 16, 16), "channels_last"),
                          ((4096, 5), "contiguous")):
        x = make(shape, torch.float32, device, layout, offset=1e4)
        rm, rv = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
        out = dlcv_fast.batch_norm(x, rm, rv, training=True, momentum=1.0)
        exact, exact_rm, exact_rv = reference(x, torch.zeros_like(rm), torch.ones_like(rv), None,
                                              None, True, 1.0, 1e-5, False)
        dims = [0] + list(range(2, x.dim()))
        assert out.double().mean(dims).abs().max() < 1e-3
        assert (out.double().var(dims, unbiased=False) - 1).abs().max() < 1e-3
        # Within twice PyTorch's own float32 error, plus a small absolute term.
        torch_out = F.batch_norm(x, None, None, training=True)
        torch_err = (torch_out.double() - exact).abs().max().item()
        err = (out.double() - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-5, (err, torch_err)
        assert_close(rm, exact_rm, torch.float32)
        assert (rv.double() - exact_rv).abs().max() < 1e-3


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(backend_device, training):
    backend, device = backend_device
    cases = (((4, 3, 2, 3), False), ((5, 2), True), ((3, 2, 4), False))
    if backend in SMALL:  # every call is interpreted: one tiny case
        cases = (((3, 2, 2), True),)
    for shape, relu in cases:
        x = make(shape, torch.float64, device).requires_grad_()
        w, b, rm, rv = params(shape[1], torch.float64, device)
        w.requires_grad_()
        b.requires_grad_()
        act = "relu" if relu else None
        fn = lambda x, w, b: dlcv_fast.batch_norm(  # noqa: E731
            x, None if training else rm, None if training else rv, w, b, training,
            activation=act)
        assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck(backend_device, training):
    """Second derivatives in grad_output, input and weight (batch statistics differentiated as
    functions of the input in training), with and without ReLU, affine or not."""
    backend, device = backend_device
    cases = [((3, 4, 3, 2), "channels_last", True, True), ((5, 3), "nchw", False, True),
             ((2, 3, 4), "nchw", True, False)]
    if backend in SMALL:
        cases = cases[:2]
    for shape, layout, relu, affine in cases:
        x = make(shape, torch.float64, device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        w, b, rm, rv = params(shape[1], torch.float64, device)
        leaves = [x] + ([w, b] if affine else [])
        for t in leaves:
            t.requires_grad_()
        act = "relu" if relu else None
        fn = lambda x, *wb: dlcv_fast.batch_norm(  # noqa: E731
            x, None if training else rm, None if training else rv, *wb, training=training,
            activation=act)
        assert torch.autograd.gradgradcheck(fn, tuple(leaves))


def test_double_backward_matches_torch(backend_device):
    """A gradient penalty through batch norm + ReLU: d/d(x, w, b) of |d loss / dx|^2."""
    backend, device = backend_device
    x = make((4, 3, 3, 3), torch.float64, device)
    w, b, _, _ = params(3, torch.float64, device)
    results = []
    for bn in (lambda *a: dlcv_fast.batch_norm(*a, activation="relu"),
               lambda *a: F.batch_norm(*a).relu()):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = bn(leaves[0], None, None, leaves[1], leaves[2], True)
        (gx,) = torch.autograd.grad((out * out.detach().cos()).sum(), leaves[0],
                                    create_graph=True)
        # The bias enters gx only through the ReLU's mask: a zero gradient.
        results.append(torch.autograd.grad(gx.square().sum(), leaves, materialize_grads=True))
    for name, ours, theirs in zip(("input", "weight", "bias"), *results):
        assert_close(ours, theirs, msg=name)


def test_opcheck(backend_device):
    backend, device = backend_device
    s = "_triton" if backend == "triton" else ""
    ops = torch.ops.dlcv_fast
    for shape in [(3, 4, 5, 5), (6, 3)]:
        # The Triton forward op mutates the running statistics, and a mutating custom op takes
        # no registered autograd formula: its gradient is the functional entry point's
        # autograd.Function, so it is checked without inputs that require grad.
        grad = backend != "triton"
        x = torch.randn(shape, device=device, requires_grad=grad)
        C = shape[1]
        w = torch.rand(C, device=device, requires_grad=grad)
        b = torch.randn(C, device=device, requires_grad=grad)
        for training in (True, False):
            for relu in (False, True):
                rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
                torch.library.opcheck(getattr(ops, "batch_norm" + s).default,
                                      (x, w, b, rm, rv, training, 0.1, 1e-5, relu))
        out, mean, invstd = getattr(ops, "batch_norm" + s)(x.detach(), w.detach(), b.detach(),
                                                          None, None, True, 0.1, 1e-5, True)
        g = torch.randn_like(out)
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            torch.library.opcheck(getattr(ops, "batch_norm_backward" + s).default,
                                  (g, x.detach(), w.detach(), b.detach(), mean, invstd, True,
                                   True, mask))
        for training in (True, False):  # the double backward, shared by both backends
            torch.library.opcheck(ops.batch_norm_double_backward.default,
                                  (torch.randn_like(g), torch.randn(C, device=device), None, g,
                                   x.detach(), w.detach(), b.detach(), mean, invstd, training,
                                   True, [True, True, True]))
        torch.library.opcheck(getattr(ops, "batch_norm_stats" + s).default, (x.detach(),))
        torch.library.opcheck(getattr(ops, "batch_norm_elemt" + s).default,
                              (x.detach(), w.detach(), None, mean, invstd, True))
        sums = getattr(ops, "batch_norm_backward_reduce" + s)(g, x.detach(), w.detach(), None,
                                                              mean, invstd, False)
        torch.library.opcheck(getattr(ops, "batch_norm_backward_reduce" + s).default,
                              (g, x.detach(), w.detach(), None, mean, invstd, False))
        torch.library.opcheck(getattr(ops, "batch_norm_backward_elemt" + s).default,
                              (g, x.detach(), None, b.detach(), mean, invstd, *sums,
                               x.numel() // C, False))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    w = torch.rand(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)

    def step(x, rm, rv):
        y = dlcv_fast.batch_norm(conv(x), rm, rv, w, b, True, 0.1, 1e-5, activation="relu")
        return dlcv_fast.batch_norm(y, rm, rv, w, b, False).square().mean()

    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    rm1, rv1 = torch.zeros(4), torch.ones(4)
    rm2, rv2 = torch.zeros(4), torch.ones(4)
    with dlcv_fast.use_backend("cpu"):
        want = step(x, rm1, rv1)
        got = torch.compile(step, fullgraph=True)(x, rm2, rv2)
    assert_close(got, want)
    assert_close(rm2, rm1)
    assert_close(rv2, rv1)
    assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0])


def test_batch_one_and_empty(backend_device):
    backend, device = backend_device
    w, b, rm, rv = params(3, torch.float32, device)
    x = make((1, 3), torch.float32, device)
    out = dlcv_fast.batch_norm(x, rm, rv, w, b, training=False)  # batch 1 is fine in eval
    assert_close(out, reference(x, rm, rv, w, b, False, 0.1, 1e-5, False)[0], torch.float32)
    one_value = "Expected more than 1 value per channel when training"
    for shape in ((1, 3), (1, 3, 1, 1)):
        with pytest.raises(ValueError, match=one_value):
            dlcv_fast.batch_norm(make(shape, torch.float32, device), rm, rv, training=True)
        with pytest.raises(ValueError, match=one_value):
            torch.ops.dlcv_fast.batch_norm(make(shape, torch.float32, device), None, None, None,
                                           None, True, 0.1, 1e-5, False)
    before = rm.clone()
    empty = torch.empty(0, 3, 4, device=device)
    out = dlcv_fast.batch_norm(empty, rm, rv, w, b, training=True)
    assert out.shape == empty.shape
    assert torch.equal(rm, before)  # no values: running statistics untouched


def test_running_buffers_in_other_dtypes(backend_device):
    """16-bit running buffers (a module moved to half) are updated in float32 then rounded;
    a non-contiguous buffer is updated in place."""
    backend, device = backend_device
    x = make((4, 3, 5), torch.float16, device)
    store = torch.zeros(3, 2, device=device)
    rm, rv = store[:, 0], torch.ones(3, device=device, dtype=torch.float16)
    _, want_rm, want_rv = reference(x, rm, rv.float(), None, None, True, 0.1, 1e-5, False)
    with dlcv_fast.use_backend(backend):
        dlcv_fast.batch_norm(x, rm, rv, training=True)
    assert_close(store[:, 0], want_rm, torch.float32)
    assert_close(rv, want_rv, torch.float16)


def test_eps_zero_only_in_eval(backend_device):
    """torch's rule: eps > 0 in training (the variance of a constant channel is 0), eps >= 0 in
    evaluation; for the functional API, the nn modules and SyncBatchNorm alike."""
    backend, device = backend_device
    x = make((4, 3, 5), torch.float32, device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    positive = "eps must be positive during training"
    for buffers in ((rm, rv), (None, None)):
        with pytest.raises(ValueError, match=positive):
            dlcv_fast.batch_norm(x, *buffers, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        dlcv_fast.batch_norm(x, rm, rv, training=False, eps=-1.0)
    out = dlcv_fast.batch_norm(x, rm, rv, training=False, eps=0)
    assert_close(out, reference(x, rm, rv, None, None, False, 0.1, 0.0, False)[0], torch.float32)
    op = (torch.ops.dlcv_fast.batch_norm_triton if backend == "triton"
          else torch.ops.dlcv_fast.batch_norm)
    with pytest.raises(ValueError, match=positive):  # the op by itself checks too
        op(x, None, None, rm, rv, True, 0.1, 0.0, False)
    for cls, shape in ((dlcv_fast.nn.BatchNorm1d, (4, 3, 5)), (dlcv_fast.nn.BatchNorm2d,
                                                              (4, 3, 2, 2)),
                       (dlcv_fast.nn.SyncBatchNorm, (4, 3, 2, 2))):
        x = make(shape, torch.float32, device)
        m = cls(3, eps=0.0).to(device)
        with pytest.raises(ValueError, match=positive):
            m(x)
        ref = torch.nn.BatchNorm2d(3, eps=0.0).to(device).eval()
        assert_close(m.eval()(x), ref(x.view(4, 3, -1, 1)).view(shape), msg=cls.__name__)


def test_running_buffer_checks(backend_device):
    """As torch: running statistics never require grad, and ``training`` is a bool. An
    expanded buffer (one element for every channel), which the training update cannot write,
    is refused by name; read-only in evaluation, it is fine."""
    backend, device = backend_device
    x = make((4, 3, 5), torch.float32, device)
    for name in ("running_mean", "running_var"):
        for training in (True, False):
            bufs = {"running_mean": torch.zeros(3, device=device),
                    "running_var": torch.ones(3, device=device)}
            bufs[name].requires_grad_()
            with pytest.raises(RuntimeError, match=f"{name} must not require grad"):
                dlcv_fast.batch_norm(x, bufs["running_mean"], bufs["running_var"],
                                     training=training)
            if not training:
                with torch.no_grad():  # torch takes it when no graph is recorded
                    dlcv_fast.batch_norm(x, bufs["running_mean"], bufs["running_var"])
        bufs = {"running_mean": torch.zeros(3, device=device),
                "running_var": torch.ones(3, device=device)}
        bufs[name] = bufs[name][:1].expand(3)
        with pytest.raises(RuntimeError, match=f"{name} is updated in place"):
            dlcv_fast.batch_norm(x, bufs["running_mean"], bufs["running_var"], training=True)
        if backend != "triton":  # the C++ op by itself checks too
            with pytest.raises(RuntimeError, match=f"{name} is updated in place"):
                torch.ops.dlcv_fast.batch_norm(x, None, None, bufs["running_mean"],
                                               bufs["running_var"], True, 0.1, 1e-5, False)
        out = dlcv_fast.batch_norm(x, bufs["running_mean"], bufs["running_var"], training=False)
        want = reference(x, bufs["running_mean"], bufs["running_var"], None, None, False, 0.1,
                         1e-5, False)[0]
        assert_close(out, want, torch.float32, msg=name)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    for bad in (1, None, "yes", torch.tensor(True)):
        with pytest.raises(TypeError, match="training must be a bool"):
            dlcv_fast.batch_norm(x, rm, rv, training=bad)


BAD = [
    # (what, kwargs changes, exception, message)
    ("weight size", dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(3,\)"),
    ("bias 2-D", dict(bias=torch.ones(3, 1)), ValueError, r"bias must have shape \(3,\)"),
    ("running_mean size", dict(running_mean=torch.zeros(2)), ValueError,
     r"running_mean must have shape \(3,\)"),
    ("weight dtype", dict(weight=torch.ones(3, dtype=torch.float64)), TypeError,
     "weight must have the input's dtype"),
    ("running_var dtype", dict(running_var=torch.ones(3, dtype=torch.float16)), TypeError,
     "running_var must have the input's dtype"),
    ("only one buffer", dict(running_var=None), ValueError, "must both be given or both be None"),
    ("eval without buffers", dict(running_mean=None, running_var=None, training=False),
     ValueError, "needed in evaluation mode"),
    ("1-D input", dict(input=torch.ones(3)), ValueError, "at least 2 dimensions"),
    ("integer input", dict(input=torch.ones(2, 3, dtype=torch.int32)), TypeError,
     "input must be float32, float64"),
    ("buffer on another device", dict(running_mean=torch.zeros(3, device="meta")), RuntimeError,
     "running_mean is on meta but input is on cpu"),
    ("activation", dict(activation="gelu"), ValueError, "activation must be None or 'relu'"),
]


@pytest.mark.parametrize(("what", "change", "exc", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(backend_device, what, change, exc, match):
    backend, device = backend_device
    if device != "cpu":
        change = {k: (v.to(device) if isinstance(v, torch.Tensor) and v.device.type == "cpu"
                      else v) for k, v in change.items()}
        if what == "buffer on another device":
            pytest.skip("covered on the CPU")
    args = dict(input=torch.randn(4, 3, 5, device=device),
                running_mean=torch.zeros(3, device=device),
                running_var=torch.ones(3, device=device), weight=None, bias=None, training=True)
    args.update(change)
    with pytest.raises(exc, match=match):
        dlcv_fast.batch_norm(**args)


def test_bad_backward_arguments(backend_device):
    backend, device = backend_device
    s = "_triton" if backend == "triton" else ""
    bwd = getattr(torch.ops.dlcv_fast, "batch_norm_backward" + s)
    x = torch.randn(4, 3, device=device)
    mean, invstd = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match="grad_output must have the input's shape"):
        bwd(torch.ones(4, 2, device=device), x, None, None, mean, invstd, True, False, [True] * 3)
    with pytest.raises(TypeError, match="save_mean must be torch.float32"):
        bwd(x, x, None, None, mean.double(), invstd, True, False, [True] * 3)


# --- nn modules ---------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_modules_match_torch(kind, momentum):
    torch.manual_seed(0)
    cls, ref_cls = ((dlcv_fast.nn.BatchNorm1d, torch.nn.BatchNorm1d) if kind == "1d"
                    else (dlcv_fast.nn.BatchNorm2d, torch.nn.BatchNorm2d))
    for affine, track in ((True, True), (False, True), (True, False)):
        ours = cls(5, momentum=momentum, affine=affine, track_running_stats=track).double()
        ref = ref_cls(5, momentum=momentum, affine=affine, track_running_stats=track).double()
        assert repr(ours) == repr(ref)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict())
        shapes = [(6, 5), (3, 5, 7)] if kind == "1d" else [(3, 5, 4, 4)]
        for step in range(3):
            for shape in shapes:
                x = torch.randn(shape, dtype=torch.float64)
                assert_close(ours(x), ref(x), msg=f"step {step} shape {shape}")
        for key, value in ref.state_dict().items():
            if value.dtype == torch.int64:  # num_batches_tracked
                assert torch.equal(ours.state_dict()[key], value), key
            else:
                assert_close(ours.state_dict()[key], value, msg=key)
        ours.eval()
        ref.eval()
        # Batch 1 in eval; without running statistics eval uses the batch's, as in torch.
        x = torch.randn((1, 5, 4, 4) if kind == "2d" else (1 if track else 2, 5),
                        dtype=torch.float64)
        assert_close(ours(x), ref(x), msg="eval")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        cls(5)(torch.randn((1, 5, 1, 1) if kind == "2d" else (1, 5)))
    wrong_dims = "expected 4D input" if kind == "2d" else "expected 2D or 3D"
    with pytest.raises(ValueError, match=wrong_dims):
        cls(5)(torch.randn(2, 5, 3, 3, 3))


def test_modules_are_drop_in():
    m = dlcv_fast.nn.BatchNorm2d(8)
    assert isinstance(m, torch.nn.BatchNorm2d)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    m(x).sum().backward()
    assert m.weight.grad is not None and int(m.num_batches_tracked) == 1
    sync = dlcv_fast.nn.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.BatchNorm2d(8).eval()))
    assert isinstance(sync[1], dlcv_fast.nn.SyncBatchNorm) and not sync[1].training
    # Without a process group, SyncBatchNorm is a plain batch norm.
    ref = torch.nn.BatchNorm2d(8)
    ours = dlcv_fast.nn.SyncBatchNorm(8)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert_close(ours(x.detach()), ref(x.detach()))


def test_sync_batch_norm_keeps_fused_relu():
    """SyncBatchNorm takes activation='relu' like the other layers; convert_sync_batchnorm
    keeps it (and bias=False), so the converted model computes what the original did."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(4, bias=False),
        torch.nn.Sequential(dlcv_fast.nn.BatchNorm2d(4, affine=False)),
        dlcv_fast.nn.BatchNorm2d(4, eps=1e-3, momentum=0.2, activation="relu")).double()
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.normal_()
    original = copy.deepcopy(model)
    sync = dlcv_fast.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    layers = (sync[0], sync[1][0], sync[2])
    assert [type(m) for m in layers] == [dlcv_fast.nn.SyncBatchNorm] * 3
    assert [m.activation for m in layers] == [None, None, "relu"]
    assert sync[0].bias is None and sync[0].weight is not None
    assert repr(sync[2]) == repr(torch.nn.SyncBatchNorm(4, 1e-3, 0.2))[:-1] + \
        ", activation='relu')"
    for train in (True, False):
        original.train(train)
        sync.train(train)
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
        want, got = original(x), sync(x)
        assert (got == 0).any() and (got > 0).any()  # the ReLU is live
        assert_close(got, want, msg=f"train={train}")
        assert_close(sync[2].running_mean, original[2].running_mean)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        dlcv_fast.nn.SyncBatchNorm(4, activation="gelu")


# --- SyncBatchNorm over two processes (gloo, CPU) --------------------------------------------

# One spawn of two processes runs every case (a spawn costs seconds). A case: per-process
# batches, the per-sample shape (C, ...), the input's memory format, SyncBatchNorm's keywords,
# training steps, eval mode, or the error every process must raise (alike, so none hangs).
SYNC_CASES = {
    "4d-uneven": dict(batches=(2, 5), shape=(3, 4, 5), kw=dict(momentum=0.3)),
    "4d-channels-last": dict(batches=(2, 5), shape=(3, 4, 5), fmt="channels_last",
                             kw=dict(momentum=0.3)),
    "2d-batch-one": dict(batches=(1, 4), shape=(3,)),  # the last, uneven batch under DDP
    "3d-batch-zero": dict(batches=(0, 3), shape=(3, 5)),
    "5d-cumulative": dict(batches=(2, 3), shape=(3, 2, 3, 2), fmt="channels_last_3d",
                          kw=dict(momentum=None), steps=2),
    "not-affine": dict(batches=(3, 2), shape=(3, 4), kw=dict(affine=False)),
    "no-running-stats": dict(batches=(2, 3), shape=(3, 2, 2),
                             kw=dict(track_running_stats=False)),
    "relu": dict(batches=(2, 3), shape=(3, 2, 3), kw=dict(activation="relu")),
    "eval": dict(batches=(1, 3), shape=(3, 2, 2), eval=True),
    "one-value-in-all": dict(batches=(1, 0), shape=(3,),
                             error="Expected more than 1 value per channel"),
    "eps-zero": dict(batches=(2, 2), shape=(3, 2), kw=dict(eps=0.0),
                     error="eps must be positive during training"),
}


def _sync_run(case: dict, rank: int | None) -> dict:
    """A case on ``rank``'s share of the batch with dlcv_fast's SyncBatchNorm, or (rank None)
    on the whole batch with torch's BatchNorm1d/2d/3d (then a ReLU where the case fuses one)."""
    batches, shape = case["batches"], case["shape"]
    C, kw = shape[0], dict(case.get("kw", {}))
    relu = kw.get("activation") == "relu"
    if rank is None:
        kw.pop("activation", None)
        cls = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)[
            max(len(shape) - 2, 0)]
        start, stop = 0, sum(batches)
    else:
        cls = dlcv_fast.nn.SyncBatchNorm
        start, stop = sum(batches[:rank]), sum(batches[:rank + 1])
    m = cls(C, **kw).double().train(not case.get("eval", False))
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(torch.linspace(0.5, 2.0, C))
            m.bias.copy_(torch.linspace(-0.2, 0.3, C))
        if m.running_mean is not None:
            m.running_mean.copy_(torch.linspace(2.0, 4.0, C))
            m.running_var.copy_(torch.linspace(3.0, 5.0, C))
    result = {"out": [], "gx": []}
    for step in range(case.get("steps", 1)):
        g = torch.Generator().manual_seed(step)
        full = torch.randn(sum(batches), *shape, generator=g, dtype=torch.float64) * 2 + 3
        grad = torch.randn(full.shape, generator=g, dtype=torch.float64)
        x = full[start:stop].clone()
        if "fmt" in case:
            x = x.contiguous(memory_format=getattr(torch, case["fmt"]))
        x.requires_grad_()
        out = m(x)
        if rank is None and relu:
            out = out.relu()
        out.backward(grad[start:stop])
        result["out"].append(out.detach())
        result["gx"].append(x.grad)
    result.update(gw=None if m.weight is None else m.weight.grad,
                  gb=None if m.bias is None else m.bias.grad, rm=m.running_mean,
                  rv=m.running_var, nbt=m.num_batches_tracked)
    return result


def _sync_worker(rank, world, init, out_dir):
    import datetime

    import torch.distributed as dist

    # A timeout, so that processes that disagree fail instead of hanging.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, case in SYNC_CASES.items():
            try:
                results[name] = _sync_run(case, rank)
            except Exception as e:  # compared with the case's error
                results[name] = f"{type(e).__name__}: {e}"
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_batch_norm_two_processes(tmp_path):
    """Whole-group statistics against torch's batch norm on the whole batch: outputs, input
    gradients, parameter gradients (summed over processes, as DDP does), running statistics."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'init'}"
    mp.spawn(_sync_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, case in SYNC_CASES.items():
        if "error" in case:
            for r in range(2):
                assert isinstance(got[r][name], str) and case["error"] in got[r][name], \
                    (name, r, got[r][name])
            continue
        for r in range(2):
            assert not isinstance(got[r][name], str), (name, r, got[r][name])
        want = _sync_run(case, None)
        ours = [g[name] for g in got]
        for step in range(len(want["out"])):
            for key in ("out", "gx"):
                assert_close(torch.cat([o[key][step] for o in ours]), want[key][step],
                             msg=f"{name} step {step} {key}")
        for key in ("gw", "gb"):
            if want[key] is None:
                assert all(o[key] is None for o in ours), (name, key)
            else:
                assert_close(ours[0][key] + ours[1][key], want[key], msg=f"{name} {key}")
        for o in ours:
            for key in ("rm", "rv", "nbt"):
                if want[key] is None:
                    assert o[key] is None, (name, key)
                elif key == "nbt":
                    assert torch.equal(o[key], want[key]), name
                else:
                    assert_close(o[key], want[key], msg=f"{name} {key}")


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_modules_with_fused_relu(kind):
    """activation='relu': relu(batch_norm(x)) in train and eval mode, gradients included;
    torch's state_dict; convert gives converted layers no ReLU, revert keeps a fused one
    (no single torch layer computes it), torch_equivalent appends the ReLU."""
    from dlcv_fast.convert import torch_equivalent

    cls, ref_cls = ((dlcv_fast.nn.BatchNorm1d, torch.nn.BatchNorm1d) if kind == "1d"
                    else (dlcv_fast.nn.BatchNorm2d, torch.nn.BatchNorm2d))
    torch.manual_seed(0)
    ours = cls(5, eps=1e-3, activation="relu").double()
    ref = ref_cls(5, eps=1e-3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours) == repr(ref)[:-1] + ", activation='relu')"
    shape = (6, 5, 3) if kind == "1d" else (3, 5, 4, 4)
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = ours(x)
        y_ref = torch.relu(ref(x))
        assert_close(y, y_ref)
        assert (y == 0).any() and (y > 0).any()  # the ReLU is live
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, ours.weight, ours.bias), g)
        grads_ref = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), g)
        for a, b, what in zip(grads, grads_ref, ("input", "weight", "bias")):
            assert_close(a, b, msg=what)
    assert_close(ours.running_mean, ref.running_mean)
    twin = torch_equivalent(ours)
    assert type(twin[0]) is ref_cls and type(twin[1]) is torch.nn.ReLU
    assert twin[0].weight is ours.weight
    assert_close(twin(x), ours(x))
    model = torch.nn.Sequential(ours, ref_cls(5))
    assert dlcv_fast.convert(model).converted[ref_cls.__name__] == 1
    assert model[1].activation is None
    dlcv_fast.revert(model)
    assert type(model[0]) is cls and type(model[1]) is ref_cls
