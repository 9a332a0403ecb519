"""DDPMScheduler and DDIMScheduler: constructor defaults, set_timesteps in every spacing,
steps that land on the schedule's next timestep, noising, and an end-to-end check that
DDIM with the true noise recovers the clean sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close

from dlcv_fast.diffusion import DDIMScheduler, DDPMScheduler, ddim_step, ddpm_step


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_defaults(cls):
    s = cls()
    assert s.num_train_timesteps == 1000 and len(s) == 1000
    assert s.prediction_type == "epsilon" and s.clip_sample and s.timestep_spacing == "leading"
    assert s.init_noise_sigma == 1.0
    assert s.alphas_cumprod.dtype == torch.float32 and s.alphas_cumprod.shape == (1000,)
    assert torch.equal(s.timesteps, torch.arange(999, -1, -1))
    betas = np.linspace(1e-4, 0.02, 1000)
    assert np.allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-6)
    x = torch.randn(2, 3)
    assert s.scale_model_input(x, 5) is x


def expected_timesteps(spacing, T, n, offset=0):
    """The spacings, written out as diffusers defines them."""
    if spacing == "leading":
        return [i * (T // n) + offset for i in range(n)][::-1]
    if spacing == "trailing":
        return [int(round(T - i * T / n)) - 1 for i in range(n)]
    return [int(round(i * (T - 1) / (n - 1))) if n > 1 else 0 for i in range(n)][::-1]


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 50, 1000])
def test_set_timesteps(cls, spacing, n):
    offset = 1 if spacing == "leading" and n < 1000 else 0
    s = cls(timestep_spacing=spacing, steps_offset=offset)
    s.set_timesteps(n)
    assert s.timesteps.tolist() == expected_timesteps(spacing, 1000, n, offset)
    assert s.num_inference_steps == n


def test_set_timesteps_errors():
    with pytest.raises(ValueError, match=r"num_inference_steps must lie in \[1, 1000\]"):
        DDIMScheduler().set_timesteps(1001)
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        DDIMScheduler(timestep_spacing="uniform")
    s = DDPMScheduler()
    with pytest.raises(ValueError, match="exactly one of"):
        s.set_timesteps(10, timesteps=[5, 1])
    with pytest.raises(ValueError, match="strictly descending"):
        s.set_timesteps(timesteps=[5, 5, 1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
        s.set_timesteps(timesteps=[1000, 1])
    with pytest.raises(ValueError, match="call set_timesteps"):
        DDIMScheduler().step(torch.zeros(1, 2), 10, torch.zeros(1, 2))


def test_ddpm_custom_timesteps_step_to_the_next_one():
    s = DDPMScheduler(clip_sample=False)
    s.set_timesteps(timesteps=[900, 500, 20, 0])
    assert [s.previous_timestep(t) for t in (900, 500, 20, 0)] == [500, 20, 0, -1]
    x, m, z = (torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    got = s.step(m, 500, x, variance_noise=z)
    want = ddpm_step(m, 500, x, s.alphas_cumprod, prev_timestep=20, clip_sample=False,
                     variance_noise=z)
    assert torch.equal(got.prev_sample, want.prev_sample)
    prev, x0 = s.step(m, 500, x, variance_noise=z, return_dict=False)
    assert torch.equal(prev, want.prev_sample) and torch.equal(x0, want.pred_original_sample)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_steps_to_the_next_timestep_of_the_schedule(spacing):
    """diffusers steps to t - T // n, which misses the schedule under linspace and
    trailing spacing; here every step lands on the next timestep, and the last on t < 0."""
    s = DDIMScheduler(timestep_spacing=spacing)
    s.set_timesteps(7)
    steps = s.timesteps.tolist()
    assert [s.previous_timestep(t) for t in steps] == steps[1:] + [-1]
    if spacing == "leading":  # where diffusers' rule holds, it agrees
        assert all(s.previous_timestep(t) == t - 1000 // 7 for t in steps[:-1])


def test_ddim_uses_final_alpha():
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    for set_alpha_to_one, final in ((True, 1.0), (False, None)):
        s = DDIMScheduler(set_alpha_to_one=set_alpha_to_one, clip_sample=False)
        s.set_timesteps(10)
        last = int(s.timesteps[-1])
        want_final = final if final is not None else float(s.alphas_cumprod[0])
        want = ddim_step(m, last, x, s.alphas_cumprod, prev_timestep=-1,
                         final_alpha_cumprod=want_final, clip_sample=False)
        assert torch.equal(s.step(m, last, x).prev_sample, want.prev_sample)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_with_the_true_noise_recovers_the_clean_sample(spacing, prediction_type):
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps. A model that predicts eps (or v, or x0)
    exactly makes every deterministic DDIM step land on sqrt(a_prev) x0 + sqrt(1 - a_prev)
    eps, so the run ends on x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 1.6 - 0.8
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    s = DDIMScheduler(timestep_spacing=spacing, prediction_type=prediction_type)
    s.set_timesteps(25)
    t0 = torch.full((4,), int(s.timesteps[0]))
    x = s.add_noise(x0, eps, t0)
    for t in s.timesteps:
        tt = torch.full((4,), int(t))
        if prediction_type == "epsilon":
            model_output = eps
        elif prediction_type == "v_prediction":
            model_output = s.get_velocity(x0, eps, tt)
        else:
            model_output = x0
        x = s.step(model_output, t, x).prev_sample
    assert_close(x, x0, torch.float32)


def test_add_noise_and_get_velocity_match_the_formula():
    s = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x0, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t = torch.tensor([0, 400, 999])
    a = s.alphas_cumprod.double()[t].view(-1, 1, 1)
    assert_close(s.add_noise(x0, eps, t), a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double())
    assert_close(s.get_velocity(x0, eps, t),
                 a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double())


def test_ddpm_sampling_is_reproducible_with_a_generator():
    s = DDPMScheduler()
    s.set_timesteps(5)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, 4, 4, generator=g)
        for t in s.timesteps:
            x = s.step(torch.zeros_like(x), t, x, generator=g).prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


def test_constructor_errors():
    with pytest.raises(ValueError, match="variance_type must be one of"):
        DDPMScheduler(variance_type="small")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDIMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        DDPMScheduler(beta_schedule="cosine")
    trained = DDPMScheduler(trained_betas=[0.1, 0.2, 0.3])
    assert trained.num_train_timesteps == 3
