"""The fused DDPM and DDIM steps against the formulas written here in plain PyTorch
(float64, structured as diffusers' DDPMScheduler.step and DDIMScheduler.step), for every
prediction type, variance type and clipping option, on every backend here."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import assert_close, backend_dtype_cases

import dlcv_fast
from dlcv_fast.diffusion import ddim_step, ddpm_step

T = 1000


def table():
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def x0_and_eps(prediction_type, s, m, a_t):
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        return (s - b_t.sqrt() * m) / a_t.sqrt(), m
    if prediction_type == "sample":
        return m, (s - a_t.sqrt() * m) / b_t.sqrt()
    return a_t.sqrt() * s - b_t.sqrt() * m, a_t.sqrt() * m + b_t.sqrt() * s


def clip_x0(x0, clip_sample, clip_range, thresholding, ratio=0.995, max_value=1.0):
    if thresholding:
        q = torch.quantile(x0.abs().reshape(x0.shape[0], -1), ratio, dim=1)
        q = q.clamp(min=1, max=max_value).reshape(-1, *([1] * (x0.dim() - 1)))
        return torch.clamp(x0, -q, q) / q
    if clip_sample:
        return x0.clamp(-clip_range, clip_range)
    return x0


def reference_ddpm(m, t, s, ab, prev_t, prediction_type, variance_type, clip_sample, clip_range,
                   thresholding, noise, max_value=1.0):
    ab = ab.double()
    s, m = s.double(), m.double()
    pv = None
    if variance_type in ("learned", "learned_range"):
        m, pv = torch.split(m, s.shape[1], dim=1)
    a_t = ab[t]
    a_prev = ab[prev_t] if prev_t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_a = a_t / a_prev
    cur_b = 1 - cur_a
    x0, _ = x0_and_eps(prediction_type, s, m, a_t)
    x0 = clip_x0(x0, clip_sample, clip_range, thresholding, max_value=max_value)
    prev = (a_prev.sqrt() * cur_b / b_t) * x0 + (cur_a.sqrt() * b_prev / b_t) * s
    if t > 0:
        var = (b_prev / b_t * cur_b).clamp(min=1e-20)
        std = {
            "fixed_small": lambda: var.sqrt(),
            "fixed_small_log": lambda: torch.exp(0.5 * torch.log(var)),
            "fixed_large": lambda: cur_b.sqrt(),
            "fixed_large_log": lambda: torch.exp(0.5 * torch.log(cur_b)),
            "learned": lambda: pv.sqrt() if pv is not None else None,
            "learned_range": lambda: torch.exp(
                0.5 * ((pv + 1) / 2 * torch.log(cur_b) + (1 - (pv + 1) / 2) * torch.log(var))),
        }[variance_type]()
        prev = prev + std * noise.double()
    return prev, x0


def reference_ddim(m, t, s, ab, prev_t, final_ab, eta, use_clipped, prediction_type, clip_sample,
                   clip_range, thresholding, noise, max_value=1.0):
    ab = ab.double()
    s, m = s.double(), m.double()
    a_t = ab[t]
    a_prev = ab[prev_t] if prev_t >= 0 else torch.tensor(final_ab, dtype=torch.float64)
    b_t = 1 - a_t
    x0, eps = x0_and_eps(prediction_type, s, m, a_t)
    x0 = clip_x0(x0, clip_sample, clip_range, thresholding, max_value=max_value)
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance.sqrt()
    if use_clipped:
        eps = (s - a_t.sqrt() * x0) / b_t.sqrt()
    prev = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if eta > 0:
        prev = prev + std * noise.double()
    return prev, x0


def inputs(shape, device, dtype, learned=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    m = torch.randn(shape, generator=g, dtype=torch.float64)
    if learned:  # second half: a predicted variance, positive, or a fraction in [-1, 1]
        m = torch.cat([m, torch.rand(shape, generator=g, dtype=torch.float64) * 1.8 - 0.9], 1)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    return (t.to(device, dtype) for t in (s, m, noise))


CLIPS = [(False, False), (True, False), (False, True)]  # (clip_sample, thresholding)


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_ddpm_step(backend, device, dtype):
    ab = table()
    for pred, var, (clip, thresh), t in itertools.product(
        ("epsilon", "sample", "v_prediction"),
        ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
         "learned_range"),
        CLIPS, (999, 10, 0),
    ):
        learned = var in ("learned", "learned_range")
        s, m, noise = inputs((2, 3, 5, 7), device, dtype, learned)
        if var == "learned":  # a variance: positive
            m = torch.cat([m[:, :3], m[:, 3:].abs() + 0.05], 1)
        with dlcv_fast.use_backend(backend):
            out = ddpm_step(m, t, s, ab.to(device), prediction_type=pred, variance_type=var,
                            clip_sample=clip, clip_sample_range=1.5, thresholding=thresh,
                            sample_max_value=2.0, variance_noise=noise)
        want_prev, want_x0 = reference_ddpm(m.cpu(), t, s.cpu(), ab, t - 1, pred, var, clip, 1.5,
                                            thresh, noise.cpu(), max_value=2.0)
        what = f"{pred} {var} clip={clip} threshold={thresh} t={t}"
        assert out.prev_sample.dtype == dtype
        assert_close(out.pred_original_sample.cpu(), want_x0, dtype, msg=what)
        assert_close(out.prev_sample.cpu(), want_prev, dtype, msg=what)


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_ddim_step(backend, device, dtype):
    ab = table()
    for pred, (clip, thresh), eta, clipped, (t, prev_t), final in itertools.product(
        ("epsilon", "sample", "v_prediction"), CLIPS, (0.0, 0.5, 1.0), (False, True),
        ((999, 979), (20, 0), (20, -1)), (1.0, float(ab[0])),
    ):
        s, m, noise = inputs((3, 4, 6), device, dtype)
        with dlcv_fast.use_backend(backend):
            out = ddim_step(m, t, s, ab.to(device), prev_timestep=prev_t, final_alpha_cumprod=final,
                            eta=eta, use_clipped_model_output=clipped, prediction_type=pred,
                            clip_sample=clip, clip_sample_range=1.0, thresholding=thresh,
                            sample_max_value=2.5, variance_noise=noise)
        want_prev, want_x0 = reference_ddim(m.cpu(), t, s.cpu(), ab, prev_t, final, eta, clipped,
                                            pred, clip, 1.0, thresh, noise.cpu(), max_value=2.5)
        what = f"{pred} clip={clip} threshold={thresh} eta={eta} clipped={clipped} t={t}->{prev_t}"
        assert_close(out.pred_original_sample.cpu(), want_x0, dtype, msg=what)
        assert_close(out.prev_sample.cpu(), want_prev, dtype, msg=what)


@pytest.mark.parametrize(("clip", "thresh"), [(True, False), (False, True)])
def test_nan_passes_through_clipping(backend_device, clip, thresh):
    """A diverged model's NaN stays NaN through clip_sample and thresholding (torch.clamp's
    behaviour, and diffusers'), instead of becoming a plausible clipped value."""
    backend, device = backend_device
    s, m, noise = inputs((2, 3, 4, 5), device, torch.float32)
    m[0, 1, 2, 3] = float("nan")
    ab = table()
    with dlcv_fast.use_backend(backend):
        out = ddpm_step(m, 10, s, ab.to(device), prediction_type="sample", clip_sample=clip,
                        clip_sample_range=0.5, thresholding=thresh, variance_noise=noise)
    want_prev, want_x0 = reference_ddpm(m.cpu(), 10, s.cpu(), ab, 9, "sample", "fixed_small",
                                        clip, 0.5, thresh, noise.cpu())
    assert want_x0.isnan().any()
    torch.testing.assert_close(out.pred_original_sample.cpu().double(), want_x0, equal_nan=True)
    torch.testing.assert_close(out.prev_sample.cpu().double(), want_prev, equal_nan=True)


def test_threshold_not_positive_gives_nan(backend_device):
    """The op's thresholds are per-sample device values the host does not read: one that is
    not positive makes that sample NaN (a negative one would flip its sign), the others
    are untouched."""
    backend, device = backend_device
    op = (torch.ops.dlcv_fast.scheduler_step_triton if backend == "triton"
          else torch.ops.dlcv_fast.scheduler_step)
    s, m, _ = inputs((4, 3, 5), device, torch.float32)
    coefficients = [1.5, -0.5, 0.1, 1.0, 0.0, 0.0, 0.9, 0.05, 0.4, 0.0, 0.0, 0.0, 1.0]
    good = torch.tensor([1.5, 1.5, 1.5, 1.5], device=device)
    bad = torch.tensor([1.5, 0.0, -1.5, float("nan")], device=device)
    want_prev, want_x0 = op(m, s, None, None, good, coefficients, 2, 0, False)
    m.requires_grad_()
    prev, x0 = op(m, s, None, None, bad, coefficients, 2, 0, False)
    for got, want in ((prev, want_prev), (x0, want_x0)):
        assert torch.equal(got[0], want[0])
        assert got[1:].isnan().all()
    (grad,) = torch.autograd.grad(x0.sum(), m)  # and so are their gradients
    assert grad[0].isfinite().all() and grad[1:].isnan().all()


def test_generator_makes_steps_reproducible(backend_device):
    _, device = backend_device
    ab = table().to(device)
    s, m, _ = inputs((2, 3, 4, 4), device, torch.float32)
    runs = [ddpm_step(m, 500, s, ab, generator=torch.Generator(device).manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0].prev_sample, runs[1].prev_sample)
    noise = torch.randn(m.shape, generator=torch.Generator(device).manual_seed(7), device=device)
    explicit = ddpm_step(m, 500, s, ab, variance_noise=noise)
    assert torch.equal(runs[0].prev_sample, explicit.prev_sample)
    other = ddpm_step(m, 500, s, ab, generator=torch.Generator(device).manual_seed(8))
    assert not torch.equal(runs[0].prev_sample, other.prev_sample)
    # DDIM with eta > 0 draws noise the same way.
    d1 = ddim_step(m, 500, s, ab, prev_timestep=480, eta=1.0,
                   generator=torch.Generator(device).manual_seed(3))
    d2 = ddim_step(m, 500, s, ab, prev_timestep=480, eta=1.0,
                   generator=torch.Generator(device).manual_seed(3))
    assert torch.equal(d1.prev_sample, d2.prev_sample)


def test_layouts_are_kept(backend_device):
    _, device = backend_device
    ab = table().to(device)
    s, m, noise = inputs((2, 3, 5, 5), device, torch.float32)
    s_cl = s.contiguous(memory_format=torch.channels_last)
    out = ddpm_step(m, 100, s_cl, ab, variance_noise=noise)
    assert out.prev_sample.is_contiguous(memory_format=torch.channels_last)
    ref = ddpm_step(m, 100, s, ab, variance_noise=noise)
    assert_close(out.prev_sample, ref.prev_sample)


def test_opcheck(backend_device):
    backend, device = backend_device
    op = (torch.ops.dlcv_fast.scheduler_step_triton if backend == "triton"
          else torch.ops.dlcv_fast.scheduler_step)
    s, m, noise = inputs((2, 3, 4), device, torch.float32)
    coefficients = [1.5, -0.5, 0.1, 1.0, 0.3, -0.2, 0.9, 0.05, 0.4, 0.2, -3.0, -2.0, 1.0]
    th = torch.tensor([1.2, 1.0], device=device)
    for clip, mode, recompute, z, v in [(0, 0, False, None, None), (1, 0, True, noise, None),
                                        (2, 1, False, noise, noise.abs()),
                                        (2, 2, True, noise, noise.tanh())]:
        torch.library.opcheck(op.default, (m, s, z, v, th, coefficients, clip, mode, recompute))


BAD = [
    (dict(prediction_type="x0"), ValueError, "prediction_type must be one of"),
    (dict(variance_type="fixed"), ValueError, "variance_type must be one of"),
    (dict(variance_type="learned"), ValueError, "twice the channels"),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.0), ValueError,
     "dynamic_thresholding_ratio"),
    (dict(thresholding=True, sample_max_value=0.0), ValueError,
     "sample_max_value must be positive"),
    (dict(timestep=1000), IndexError, r"timestep 1000 is outside \[0, 1000\)"),
    (dict(variance_noise=torch.zeros(1, 3, 4, 4)), ValueError, "variance_noise must have shape"),
    (dict(model_output=torch.zeros(1, 3, 4, 4), variance_noise=torch.zeros(1, 3, 4, 4)),
     ValueError, r"model_output must have the shape of sample \[2, 3, 4, 4\], but got "
                 r"\[1, 3, 4, 4\]"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD, ids=[b[2] for b in BAD])
def test_bad_arguments(kwargs, exc, match):
    s, m, _ = inputs((2, 3, 4, 4), "cpu", torch.float32)
    kwargs = dict(kwargs)
    t = kwargs.pop("timestep", 500)
    m = kwargs.pop("model_output", m)
    with pytest.raises(exc, match=match):
        ddpm_step(m, t, s, table(), **kwargs)


def test_bad_arguments_to_the_op():
    s, m, _ = inputs((2, 3, 4), "cpu", torch.float32)
    op = torch.ops.dlcv_fast.scheduler_step
    coefficients = [0.0] * 13
    with pytest.raises(ValueError, match="expected 13 coefficients"):
        op(m, s, None, None, None, [0.0] * 12, 0, 0, False)
    with pytest.raises(ValueError, match="needs thresholds"):
        op(m, s, None, None, None, coefficients, 2, 0, False)
    with pytest.raises(ValueError, match="needs the predicted variance"):
        op(m, s, None, None, None, coefficients, 0, 1, False)
    with pytest.raises(ValueError, match="model_output must have the shape of sample"):
        op(m[:1], s, None, None, None, coefficients, 0, 0, False)
    with pytest.raises(TypeError, match="noise has dtype"):
        op(m, s, m.double(), None, None, coefficients, 0, 0, False)


GRAD_CASES = [(clip, mode, recompute) for clip in (0, 1, 2) for mode in (0, 1, 2)
              for recompute in (False, True)]


@pytest.mark.parametrize(("clip", "mode", "recompute"), GRAD_CASES)
def test_op_gradients(backend_device, clip, mode, recompute):
    """The step's autograd formula against finite differences of the kernel itself, in
    float64, in every input (thresholds included), once and twice."""
    backend, device = backend_device
    op = (torch.ops.dlcv_fast.scheduler_step_triton if backend == "triton"
          else torch.ops.dlcv_fast.scheduler_step)
    g = torch.Generator().manual_seed(clip * 6 + mode * 2 + recompute)

    def leaf(t):
        return t.to(device).requires_grad_()

    m, s, z = (leaf(torch.randn(3, 2, 4, generator=g, dtype=torch.float64)) for _ in range(3))
    v = None
    if mode == 1:  # a variance: positive
        v = leaf(torch.rand(3, 2, 4, generator=g, dtype=torch.float64) + 0.2)
    elif mode == 2:  # a fraction in [-1, 1]
        v = leaf(torch.rand(3, 2, 4, generator=g, dtype=torch.float64) * 1.8 - 0.9)
    th = leaf(torch.tensor([1.3, 0.9, 2.0], dtype=torch.float64)) if clip == 2 else None
    coefficients = [1.5, -0.5, 0.1, 1.0, 0.3, -0.2, 0.9, 0.05, 0.4, 0.2, -3.0, -2.0, 0.8]

    def step(*tensors):
        return op(*tensors, coefficients, clip, mode, recompute)

    inputs = (m, s, z, v, th)
    assert torch.autograd.gradcheck(step, inputs)
    assert torch.autograd.gradgradcheck(step, inputs)
    # A sample that is only a batch (1-D), and no noise (the variance is then unread).
    fm, fs, fv = (None if t is None else t.detach()[:, 0, 0].clone().requires_grad_()
                  for t in (m, s, v))
    assert torch.autograd.gradcheck(step, (fm, fs, None, fv, th))


@pytest.mark.parametrize("thresh", [False, True])
def test_step_gradient_matches_the_formula(backend_device, thresh):
    """Guidance backpropagates through pred_original_sample: the gradient of a loss on the
    fused step's outputs (thresholds from the quantile included) is that of the formula."""
    _, device = backend_device
    s, m, noise = inputs((2, 3, 4, 5), device, torch.float64, learned=True)
    m.requires_grad_()
    ab = table().double()
    out = ddpm_step(m, 300, s, ab.to(device), prediction_type="v_prediction",
                    variance_type="learned_range", clip_sample=not thresh, clip_sample_range=1.2,
                    thresholding=thresh, sample_max_value=1.5, variance_noise=noise)
    weights = torch.randn(2, 3, 4, 5, dtype=torch.float64).to(device)
    (got,) = torch.autograd.grad(((out.prev_sample + out.pred_original_sample) * weights).sum(),
                                 m)
    mr = m.detach().cpu().requires_grad_()
    prev, x0 = reference_ddpm(mr, 300, s.cpu(), ab, 299, "v_prediction", "learned_range",
                              not thresh, 1.2, thresh, noise.cpu(), max_value=1.5)
    (want,) = torch.autograd.grad(((prev + x0) * weights.cpu()).sum(), mr)
    assert_close(got.cpu(), want, torch.float64)
