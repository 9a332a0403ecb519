"""The C++ ops skip their autograd::Function when nothing is recorded (no input requires
grad, or grad mode is off). That path must give the same values, no graph, the running
statistics' version bumps, and still refuse forward-mode AD."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import dlcv_fast


def _table():
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()


def _cases():
    """(name, fn of the differentiable input, that input)."""
    g = torch.Generator().manual_seed(0)
    x4 = torch.randn(2, 3, 9, 9, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    b = torch.randn(4, generator=g)
    noise = torch.randn(2, 3, 9, 9, generator=g)
    t = torch.tensor([5, 900])
    table = _table()
    gamma, beta = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    return [
        ("conv2d", lambda x: dlcv_fast.conv2d(x, w, b, padding=1, activation="relu"), x4),
        ("max_pool2d", lambda x: dlcv_fast.max_pool2d(x, 3, 2, 1), x4),
        ("batch_norm", lambda x: dlcv_fast.batch_norm(
            x, torch.zeros(3), torch.ones(3), gamma, beta, True), x4),
        ("add_noise", lambda x: dlcv_fast.add_noise(x, noise, t, table), x4),
        ("get_velocity", lambda x: dlcv_fast.get_velocity(x, noise, t, table), x4),
    ]


@pytest.mark.parametrize("name,fn,x", _cases(), ids=[c[0] for c in _cases()])
def test_same_values_with_and_without_a_graph(name, fn, x):
    plain = fn(x)
    assert plain.grad_fn is None and not plain.requires_grad
    leaf = x.clone().requires_grad_()
    with torch.no_grad():
        under_no_grad = fn(leaf)
    assert under_no_grad.grad_fn is None and not under_no_grad.requires_grad
    recorded = fn(leaf)
    assert recorded.grad_fn is not None
    torch.testing.assert_close(plain, recorded.detach(), rtol=0, atol=0)
    torch.testing.assert_close(under_no_grad, plain, rtol=0, atol=0)
    recorded.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == x.shape


@pytest.mark.parametrize("grad_mode", [True, False])
def test_batch_norm_training_bumps_running_stat_versions(grad_mode):
    x = torch.randn(4, 3, 5, 5)
    ours_mean, ours_var = torch.zeros(3), torch.ones(3)
    torch_mean, torch_var = torch.zeros(3), torch.ones(3)
    with torch.set_grad_enabled(grad_mode):
        dlcv_fast.batch_norm(x, ours_mean, ours_var, training=True)
        torch.nn.functional.batch_norm(x, torch_mean, torch_var, training=True)
    # Updated in place, so bumped as an in-place op's would be (torch's CPU kernel does not).
    assert ours_mean._version > 0 and ours_var._version > 0
    torch.testing.assert_close(ours_mean, torch_mean)
    torch.testing.assert_close(ours_var, torch_var)


def _ddim_step(x):
    from dlcv_fast.diffusion import DDIMScheduler

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    return scheduler.step(x, 901, torch.ones_like(x)).prev_sample


FORWARD_AD_CASES = _cases() + [
    ("attention", lambda x: dlcv_fast.scaled_dot_product_attention(x, x, x),
     torch.randn(1, 2, 5, 8)),
    ("scheduler_step", _ddim_step, torch.randn(2, 3, 4, 4)),
]


@pytest.mark.parametrize("name,fn,x", FORWARD_AD_CASES, ids=[c[0] for c in FORWARD_AD_CASES])
def test_forward_mode_ad_is_refused_not_dropped(backend_device, name, fn, x):
    """On every backend: an output without the tangent would be a silently wrong jvp (what
    torch.library's Python-registered autograd formulas give)."""
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            fn(dual)


@pytest.fixture
def two_threads():
    """At least two ATen threads, so that parallel regions have worker threads (which start
    without the caller's thread-local state)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, 2))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_inference_mode(two_threads, channels_last):
    """Every op under torch.inference_mode, where outputs are inference tensors: the same
    values as under no_grad, on inputs large enough to be split among threads."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 64, 28, 28, generator=g).to(memory_format=fmt)
    w = torch.randn(64, 64, 3, 3, generator=g).to(memory_format=fmt)
    dw = torch.randn(64, 1, 5, 5, generator=g)
    b = torch.randn(64, generator=g)
    t = torch.tensor([5, 900])
    q = torch.randn(2, 4, 96, 32, generator=g)
    calls = [
        lambda: dlcv_fast.conv2d(x, w, b, padding=1, activation="relu"),
        lambda: dlcv_fast.conv2d(x, w, stride=2),
        lambda: dlcv_fast.conv2d(x, dw, b, padding=2, groups=64),
        lambda: dlcv_fast.nn.Conv2d(64, 64, 3, padding=1).eval()(x),
        lambda: dlcv_fast.max_pool2d(x, 3, 2, 1),
        lambda: dlcv_fast.batch_norm(x, torch.zeros(64), torch.ones(64), b, b, True),
        lambda: dlcv_fast.add_noise(x, x, t, _table()),
        lambda: dlcv_fast.scaled_dot_product_attention(q, q, q, is_causal=True),
    ]
    for call in calls:
        torch.manual_seed(0)
        with torch.no_grad():
            want = call()
        torch.manual_seed(0)
        with torch.inference_mode():
            got = call()
        assert got.is_inference()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
