"""torch.func's transforms over every op, on every backend: grad, vmap (one call for the
whole batch, through the ops' batching rules), per-sample gradients (vmap of grad), model
ensembles (a vmapped parameter), jacrev and second derivatives. Each against the same op
without the transform (plain autograd, a loop over the samples), which the op tests check
against PyTorch, and a few against PyTorch's own ops under the same transform."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import dlcv_fast
from dlcv_fast.diffusion import DDIMScheduler, DDPMScheduler

DT = torch.float64


def _table(device):
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DT), 0).to(device)


def _ddim_step(x, p):
    scheduler = DDIMScheduler(clip_sample=True)
    scheduler.set_timesteps(10)
    return scheduler.step(p, 901, x, eta=0.5, variance_noise=x.flip(0)).prev_sample


def _ddpm_step(x, p):
    scheduler = DDPMScheduler(variance_type="learned_range", thresholding=True)
    noise = x.flip(-1)
    return scheduler.step(torch.cat([p, x.tanh()], 1), 500, x, variance_noise=noise).prev_sample


def _cases(device):
    """name -> (fn(x, p), one batch of x, p): x is data, vmapped as a batch of batches; p a
    parameter, differentiated (and vmapped as an ensemble)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=DT).to(device)

    bias, gamma = randn(4), randn(3).abs() + 0.5
    t = torch.tensor([5, 900], device=device)
    table = _table(device)
    mask = randn(2, 1, 5)
    return {
        "conv2d": (lambda x, p: dlcv_fast.conv2d(x, p, bias, padding=1, activation="relu"),
                   randn(2, 3, 7, 7), randn(4, 3, 3, 3)),
        "conv2d_grouped": (lambda x, p: dlcv_fast.conv2d(x, p, None, 2, 1, 2, groups=2),
                           randn(2, 4, 9, 9), randn(6, 2, 3, 3)),
        "conv2d_depthwise": (lambda x, p: dlcv_fast.conv2d(x, p, padding="same", groups=4),
                             randn(1, 4, 6, 6), randn(8, 1, 3, 3)),
        "max_pool2d": (lambda x, p: dlcv_fast.max_pool2d(x * p[:, None, None], 3, 2, 1),
                       randn(2, 3, 7, 7), randn(3)),
        "batch_norm": (lambda x, p: dlcv_fast.batch_norm(x, None, None, p, gamma, True,
                                                         activation="relu"),
                       randn(4, 3, 5), randn(3)),
        "batch_norm_eval": (lambda x, p: dlcv_fast.batch_norm(x, gamma - 0.5, gamma, p),
                            randn(2, 3, 4, 4), randn(3)),
        "attention": (lambda x, p: dlcv_fast.scaled_dot_product_attention(x, p, p,
                                                                          is_causal=True),
                      randn(2, 2, 5, 4), randn(2, 2, 6, 4)),
        "attention_gqa": (lambda x, p: dlcv_fast.scaled_dot_product_attention(
            x, p, p[..., :3], enable_gqa=True), randn(2, 4, 5, 4), randn(2, 2, 6, 4)),
        "attention_mask": (lambda x, p: dlcv_fast.scaled_dot_product_attention(
            x, x, x, attn_mask=p), randn(2, 5, 4), mask),
        "add_noise": (lambda x, p: dlcv_fast.add_noise(x, p, t, table), randn(2, 3, 4),
                      randn(2, 3, 4)),
        "get_velocity": (lambda x, p: dlcv_fast.get_velocity(p, x, t, table), randn(2, 5),
                         randn(2, 5)),
        "ddim_step": (_ddim_step, randn(2, 3, 4, 4), randn(2, 3, 4, 4)),
        "ddpm_step": (_ddpm_step, randn(2, 3, 4, 4), randn(2, 3, 4, 4)),
    }


NAMES = list(_cases("cpu"))


@pytest.fixture
def case(backend_device, request):
    return _cases(backend_device[1])[request.param]


def _loss(y):
    return (y * y.sin()).sum()  # a loss whose gradient is not linear in y


def _grads(fn, x, p):
    x, p = x.clone().requires_grad_(), p.clone().requires_grad_()
    return torch.autograd.grad(_loss(fn(x, p)), (x, p))


def _close(actual, expected, what):
    for a, e in zip(actual, expected):
        assert_close(a, e, msg=what)


@pytest.fixture(autouse=True)
def _no_fallback():
    """A batching rule for every op of ours: PyTorch's per-sample fallback would warn."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule for dlcv_fast")
        yield


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_grad(case):
    fn, x, p = case
    got = torch.func.grad(lambda x, p: _loss(fn(x, p)), argnums=(0, 1))(x, p)
    _close(got, _grads(fn, x, p), "torch.func.grad against autograd")


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_vmap_over_samples_and_parameters(case):
    fn, x, p = case
    xs = torch.stack([x, x.flip(0) * 0.5, x.cos()])
    got = torch.func.vmap(fn, in_dims=(0, None))(xs, p)
    assert_close(got, torch.stack([fn(xi, p) for xi in xs]), msg="vmap over x")
    ps = torch.stack([p, p * 0.5, p.flip(0)])
    got = torch.func.vmap(fn, in_dims=(None, 0))(x, ps)
    assert_close(got, torch.stack([fn(x, pi) for pi in ps]), msg="vmap over p")
    got = torch.func.vmap(fn, in_dims=(0, 0))(xs, ps)
    assert_close(got, torch.stack([fn(xi, pi) for xi, pi in zip(xs, ps)]), msg="vmap over both")


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_per_sample_gradients(case):
    """vmap(grad): the gradient of each sample's loss, what DP-SGD and influence functions
    need."""
    fn, x, p = case
    xs = torch.stack([x, x.flip(0) * 0.5, x.cos()])
    got = torch.func.vmap(torch.func.grad(lambda x, p: _loss(fn(x, p)), argnums=(0, 1)),
                          in_dims=(0, None))(xs, p)
    want = [torch.stack(g) for g in zip(*(_grads(fn, xi, p) for xi in xs))]
    _close(got, want, "vmap(grad) against a loop of autograd")


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_grad_of_vmap(case):
    fn, x, p = case
    xs = torch.stack([x, x.flip(0) * 0.5])
    got = torch.func.grad(lambda p: _loss(torch.func.vmap(fn, in_dims=(0, None))(xs, p)))(p)
    leaf = p.clone().requires_grad_()
    want, = torch.autograd.grad(_loss(torch.stack([fn(xi, leaf) for xi in xs])), leaf)
    assert_close(got, want, msg="grad(vmap) against autograd of a loop")


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_jacrev(case):
    fn, x, p = case
    got = torch.func.jacrev(lambda p: fn(x, p).flatten()[:6])(p)
    want = torch.autograd.functional.jacobian(lambda p: fn(x, p).flatten()[:6], p)
    assert_close(got, want, msg="jacrev against autograd's jacobian")


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_second_derivative(case):
    fn, x, p = case

    def penalty(x, p):
        g = torch.func.grad(lambda x, p: _loss(fn(x, p)), argnums=(0, 1))(x, p)
        return sum((gi * gi).sum() for gi in g)

    got = torch.func.grad(penalty, argnums=(0, 1))(x, p)
    xl, pl = x.clone().requires_grad_(), p.clone().requires_grad_()
    g = torch.autograd.grad(_loss(fn(xl, pl)), (xl, pl), create_graph=True)
    want = torch.autograd.grad(sum((gi * gi).sum() for gi in g), (xl, pl))
    _close(got, want, "grad(grad) against autograd with create_graph")


def test_per_sample_gradients_of_a_cnn_against_pytorch(backend_device):
    """The torch.func tutorial's model, dlcv_fast's layers against torch.nn's."""
    device = backend_device[1]
    torch.manual_seed(0)
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4, track_running_stats=False),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 3),
    ).to(device, DT)
    ours = copy.deepcopy(ref)
    dlcv_fast.convert(ours)
    x = torch.randn(5, 1, 8, 8, dtype=DT, device=device)
    y = torch.tensor([0, 1, 2, 1, 0], device=device)
    results = []
    for model in (ours, ref):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(params, xi, yi):
            out = torch.func.functional_call(model, params, (xi[None],))
            return F.cross_entropy(out, yi[None])

        results.append(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y))
    for key in results[1]:
        assert_close(results[0][key], results[1][key], msg=key)


def test_forward_mode_is_refused(backend_device):
    x = torch.randn(1, 3, 6, 6, dtype=DT, device=backend_device[1])
    w = torch.randn(2, 3, 3, 3, dtype=DT, device=x.device)
    with pytest.raises(RuntimeError, match="jvp"):
        torch.func.jvp(lambda x: dlcv_fast.conv2d(x, w), (x,), (x,))


def test_running_stats_in_training_under_vmap():
    x = torch.randn(2, 4, 3, 5, dtype=DT)
    with pytest.raises(RuntimeError, match="running_mean must be vmapped too"):
        torch.func.vmap(lambda xi: dlcv_fast.batch_norm(
            xi, torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT), training=True))(x)
    means, variances = torch.zeros(2, 3, dtype=DT), torch.ones(2, 3, dtype=DT)
    torch.func.vmap(lambda xi, m, v: dlcv_fast.batch_norm(xi, m, v, training=True))(
        x, means, variances)
    for i in range(2):
        m, v = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
        F.batch_norm(x[i], m, v, training=True)
        assert_close(means[i], m, msg="running_mean")
        assert_close(variances[i], v, msg="running_var")


def test_attention_dropout_under_vmap_same_randomness():
    """randomness='same': every sample gets the dropout mask of one call."""
    q = torch.randn(3, 2, 2, 5, 4, dtype=DT)
    torch.manual_seed(1)
    got = torch.func.vmap(lambda q: dlcv_fast.scaled_dot_product_attention(
        q, q, q, dropout_p=0.5), randomness="same")(q)
    for i in range(3):
        torch.manual_seed(1)
        want = dlcv_fast.scaled_dot_product_attention(q[i], q[i], q[i], dropout_p=0.5)
        assert_close(got[i], want, msg=f"sample {i}")


@pytest.mark.parametrize("randomness", ["different", "error"])
def test_attention_dropout_under_vmap_other_randomness_is_refused(randomness):
    """Folded, each sample would get masks of its own, but the mask's gradient and the
    double backward would regenerate the wrong ones: refused rather than wrong."""
    q = torch.randn(3, 1, 5, 4, dtype=DT)
    with pytest.raises(RuntimeError, match="needs randomness='same'"):
        torch.func.vmap(lambda q: dlcv_fast.scaled_dot_product_attention(
            q, q, q, dropout_p=0.5), randomness=randomness)(q)


def test_attention_dropout_jacobian():
    """jacrev vmaps the backward pass alone: every row takes the forward's dropout masks."""
    q, k, v = (torch.randn(2, 2, n, 3, dtype=DT) for n in (4, 5, 5))

    def f(q):
        torch.manual_seed(3)
        return dlcv_fast.scaled_dot_product_attention(q, k, v, dropout_p=0.5).flatten()[:8]

    got = torch.func.jacrev(f)(q)
    assert_close(got, torch.autograd.functional.jacobian(f, q), msg="jacrev with dropout")


def test_vmap_channels_last_weight():
    """model.to(memory_format=torch.channels_last) with NCHW samples, as F.conv2d takes."""
    w = torch.randn(4, 3, 3, 3, dtype=DT).contiguous(memory_format=torch.channels_last)
    x = torch.randn(5, 2, 3, 6, 6, dtype=DT)

    def loss(w, x):
        return _loss(dlcv_fast.conv2d(x, w, padding=1))

    got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, x)
    want = torch.func.vmap(torch.func.grad(
        lambda w, x: _loss(F.conv2d(x, w, padding=1))), in_dims=(None, 0))(w, x)
    assert_close(got, want, msg="per-sample weight gradients")


# (Not ddpm_step: its dynamic thresholding calls torch.quantile, which has no batching rule,
# and PyTorch's per-sample fallback refuses a batch of none.)
@pytest.mark.parametrize("case", [n for n in NAMES if n != "ddpm_step"], indirect=True)
def test_vmap_over_no_samples(case):
    fn, x, p = case
    got = torch.func.vmap(fn, in_dims=(0, None))(x[None][:0], p)
    assert got.shape == (0, *fn(x, p).shape)
    got = torch.func.vmap(fn, in_dims=(None, 0))(x, p[None][:0])
    assert got.shape == (0, *fn(x, p).shape)


def test_under_torch_compile():
    """torch.compile of a transform over the ops: not one graph (the transform runs behind a
    graph break, vmap through PyTorch's per-sample fallback), but the same values."""
    x = torch.randn(3, 2, 3, 6, 6, dtype=DT)
    w, b = torch.randn(4, 3, 3, 3, dtype=DT), torch.randn(4, dtype=DT)

    def loss(w, x):
        return _loss(dlcv_fast.max_pool2d(dlcv_fast.conv2d(x, w, b, 1, 1), 2))

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))
    forward = torch.func.vmap(lambda x: dlcv_fast.conv2d(x, w, b, padding=1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule for dlcv_fast")
        got = torch.compile(per_sample)(w, x), torch.compile(forward)(x)
    _close(got, (per_sample(w, x), forward(x)), "torch.compile")
