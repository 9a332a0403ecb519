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


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_set_timesteps_for_every_count(spacing):
    """n distinct descending timesteps in [0, T) for every n, each the spacing's exact value
    rounded (diffusers' float64 arithmetic may round an exact half either way). diffusers'
    trailing spacing gives n + 1 timesteps, the last -1, for some n (61, 103, ... of 1000)."""
    for T in (1000, 999):
        s = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        for n in range(1, T + 1):
            s.set_timesteps(n)
            t = s.timesteps.tolist()
            assert len(t) == n and 0 <= t[-1] and t[0] < T, (T, n)
            assert all(a > b for a, b in zip(t, t[1:])), (T, n)
            if spacing == "leading":
                assert t == expected_timesteps(spacing, T, n), (T, n)
                continue
            # |t_i - exact_i| <= 1/2 with exact_i = num_i / den, in integers.
            i = np.arange(n)
            if spacing == "trailing":
                num, den = T * (n - i) - n, n
            else:
                num, den = (T - 1) * (n - 1 - i), max(n - 1, 1)
            assert (np.abs(2 * (np.array(t) * den - num)) <= den).all(), (T, n)


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


def test_config_and_from_config():
    """scheduler.config holds the constructor's arguments, read-only, by key or attribute;
    from_config rebuilds from it (another class's config too: unknown keys are ignored)."""
    import copy
    import inspect
    import pickle

    s = DDPMScheduler(num_train_timesteps=500, variance_type="fixed_large",
                      prediction_type="v_prediction")
    names = [p for p in inspect.signature(DDPMScheduler.__init__).parameters if p != "self"]
    assert list(s.config) == names
    assert s.config.num_train_timesteps == s.config["num_train_timesteps"] == 500
    assert s.config.variance_type == "fixed_large" and s.config.steps_offset == 0
    with pytest.raises(TypeError, match="read-only"):
        s.config.prediction_type = "epsilon"
    with pytest.raises(TypeError, match="read-only"):
        s.config["prediction_type"] = "epsilon"
    for change in (lambda c: c.update(beta_start=0.5), lambda c: c.popitem(),
                   lambda c: c.__ior__({"beta_start": 0.5}), lambda c: c.pop("beta_start")):
        with pytest.raises(TypeError, match="read-only"):
            change(s.config)
    assert s.config.beta_start == 0.0001 and len(s.config) == len(names)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['prediciton_type'\]"):
        DDPMScheduler.from_config(s.config, prediciton_type="epsilon")
    with pytest.raises(AttributeError, match="no 'eta'"):
        s.config.eta
    assert copy.deepcopy(s.config) == s.config == pickle.loads(pickle.dumps(s.config))
    again = DDPMScheduler.from_config(s.config)
    assert again.config == s.config and torch.equal(again.alphas_cumprod, s.alphas_cumprod)
    ddim = DDIMScheduler.from_config({**s.config, "_class_name": "DDPMScheduler"},
                                     set_alpha_to_one=False)
    assert ddim.num_train_timesteps == 500 and ddim.prediction_type == "v_prediction"
    assert ddim.config.set_alpha_to_one is False and "variance_type" not in ddim.config


def test_step_output_reads_as_diffusers_outputs():
    s = DDPMScheduler()
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    out = s.step(m, 0, x)
    assert out[0] is out.prev_sample is out["prev_sample"]
    assert out[1] is out.pred_original_sample is out["pred_original_sample"]
    assert out.to_tuple() == out[:] == (out.prev_sample, out.pred_original_sample)
    with pytest.raises(KeyError):
        out["sample"]


def test_ddpm_step_takes_diffusers_positional_arguments():
    """diffusers: step(model_output, timestep, sample, generator, return_dict)."""
    s = DDPMScheduler()
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    prev, x0 = s.step(m, 10, x, torch.Generator().manual_seed(0), False)
    want = s.step(m, 10, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prev, want.prev_sample) and torch.equal(x0, want.pred_original_sample)


def test_noising_follows_edits_to_alphas_cumprod():
    """An edited (in place) or replaced alphas_cumprod is what add_noise and get_velocity
    use next, as in diffusers, though the table is cached per device."""
    s = DDPMScheduler()
    x0, eps, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([999, 5])

    def formula(table):
        a = table.double()[t].view(-1, 1)
        return a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()

    s.add_noise(x0, eps, t)
    s.alphas_cumprod[999] = 0.5
    assert_close(s.add_noise(x0, eps, t), formula(s.alphas_cumprod))
    s.alphas_cumprod = s.alphas_cumprod.clone()
    s.alphas_cumprod[5] = 0.25
    assert_close(s.add_noise(x0, eps, t), formula(s.alphas_cumprod))
    v = s.get_velocity(x0, eps, t)
    a = s.alphas_cumprod.double()[t].view(-1, 1)
    assert_close(v, a.sqrt() * eps.double() - (1 - a).sqrt() * x0.double())


def test_noising_takes_timesteps_as_diffusers_does():
    """One timestep per sample in any shape ((B,), (B, 1)), or one for all ((1,), 0-d, int)."""
    s = DDPMScheduler()
    x0, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    want = s.add_noise(x0, eps, torch.tensor([7, 7, 7]))
    for t in (torch.tensor([7]), torch.tensor(7), torch.full((3, 1), 7), 7):
        assert torch.equal(s.add_noise(x0, eps, t), want)
    with pytest.raises(ValueError, match="one timestep per sample"):
        s.add_noise(x0, eps, torch.tensor([7, 7]))


def test_timesteps_and_offsets_must_be_whole_numbers():
    s = DDIMScheduler()
    with pytest.raises(ValueError, match="num_inference_steps must be a whole number"):
        s.set_timesteps(2.5)
    with pytest.raises(TypeError, match="num_inference_steps must be an integer"):
        s.set_timesteps("10")
    s.set_timesteps(np.int64(10))
    assert s.num_inference_steps == 10
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="timestep must be a whole number"):
        s.step(m, 900.5, x)
    want = s.step(m, 900, x).prev_sample
    for t in (900.0, np.int32(900), torch.tensor(900), torch.tensor([900.0])):
        assert torch.equal(s.step(m, t, x).prev_sample, want)
    with pytest.raises(ValueError, match="timesteps must be a whole number"):
        DDPMScheduler().set_timesteps(timesteps=[999.5, 500, 0])
    with pytest.raises(ValueError, match="steps_offset must be non-negative"):
        DDIMScheduler(steps_offset=-1)
    with pytest.raises(ValueError, match="past num_train_timesteps - 1 = 999"):
        DDIMScheduler(steps_offset=1).set_timesteps(1000)


def test_a_step_off_the_schedule_takes_diffusers_rule():
    s = DDIMScheduler(timestep_spacing="trailing")
    s.set_timesteps(10)
    assert s.previous_timestep(555) == 555 - 100
    d = DDPMScheduler()
    d.set_timesteps(timesteps=[900, 500, 0])
    with pytest.raises(ValueError, match="not one of the custom timesteps"):
        d.previous_timestep(555)


def test_zero_terminal_snr_needs_a_prediction_that_defines_x0():
    """With rescale_betas_zero_snr, alphas_cumprod[T - 1] = 0: an epsilon prediction gives
    no clean sample there (diffusers divides by zero); v_prediction does."""
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    ddpm = DDPMScheduler(rescale_betas_zero_snr=True)
    ddim = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ddim.set_timesteps(10)
    for s in (ddpm, ddim):
        assert float(s.alphas_cumprod[999]) == 0.0
        with pytest.raises(ValueError, match="'epsilon' cannot give the clean sample at "
                                             "timestep 999"):
            s.step(m, 999, x)
    for cls in (DDPMScheduler, DDIMScheduler):
        s = cls(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                timestep_spacing="trailing")
        s.set_timesteps(10)
        out = s.step(m, 999, x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.pred_original_sample, (-m).clamp(-1, 1))
        assert out.prev_sample.isfinite().all()


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_a_generator_per_sample(cls):
    """A list of generators, one per sample (as diffusers' pipelines pass them): sample k's
    noise is drawn from the k-th, as (1, ...) noise; a list of one is that generator."""
    x, m = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    s = cls(clip_sample=False)
    s.set_timesteps(10)
    t = int(s.timesteps[2])
    extra = {"eta": 1.0} if cls is DDIMScheduler else {}
    seeds = [3, 1, 4]
    z = torch.cat([torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(k))
                   for k in seeds])
    gens = [torch.Generator().manual_seed(k) for k in seeds]
    got = s.step(m, t, x, generator=gens, **extra)
    want = s.step(m, t, x, variance_noise=z, **extra)
    assert torch.equal(got.prev_sample, want.prev_sample)
    one = s.step(m, t, x, generator=[torch.Generator().manual_seed(7)], **extra)
    single = s.step(m, t, x, generator=torch.Generator().manual_seed(7), **extra)
    assert torch.equal(one.prev_sample, single.prev_sample)
    with pytest.raises(ValueError, match=r"list of 2 generators; it must hold one per sample "
                                         r"of the batch \(3\)"):
        s.step(m, t, x, generator=gens[:2], **extra)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or a list"):
        s.step(m, t, x, generator=[1, 2, 3], **extra)


def test_scheduler_noising_takes_what_diffusers_formula_takes():
    """Noise that broadcasts to the samples, another floating dtype (the result in the
    promoted one), a (1,) or (B, 1) timesteps tensor: as diffusers' add_noise computes."""
    s = DDPMScheduler()
    x = torch.randn(3, 2, 4, 4)
    noise = torch.randn(1, 2, 4, 4)
    ab = s.alphas_cumprod.double()
    for t in (torch.tensor([500]), torch.tensor([[10], [500], [999]])):
        tt = t.flatten().expand(3)
        a = ab[tt].view(3, 1, 1, 1)
        want = a.sqrt() * x.double() + (1 - a).sqrt() * noise.double()
        assert_close(s.add_noise(x, noise, t), want.float())
        v = a.sqrt() * noise.double() - (1 - a).sqrt() * x.double()
        assert_close(s.get_velocity(x, noise, t), v.float())
    half = s.add_noise(x, noise.expand(3, 2, 4, 4).half(), torch.tensor([500]))
    a = ab[500]
    want = a.sqrt() * x.double() + (1 - a).sqrt() * noise.half().double()
    assert half.dtype == torch.float32 and half.shape == x.shape
    assert_close(half, want.float())
    with pytest.raises(TypeError, match="the samples and noise must be Tensors"):
        s.add_noise(x, None, torch.tensor([5]))


def test_steps_check_their_timestep_and_table():
    s = DDPMScheduler(clip_sample=False)
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="timestep must be a whole number, but got 10.7"):
        ddpm_step(m, 10.7, x, s.alphas_cumprod)
    with pytest.raises(ValueError, match="timestep must be a whole number"):
        ddim_step(m, 10.5, x, s.alphas_cumprod, prev_timestep=0)
    table = s.alphas_cumprod.clone().requires_grad_()
    with pytest.raises(ValueError, match="alphas_cumprod requires grad"):
        ddpm_step(m, 10, x, table)
    # A plain sequence is a table too.
    got = ddpm_step(m, 10, x, s.alphas_cumprod.tolist(), variance_noise=torch.zeros(2, 3))
    want = ddpm_step(m, 10, x, s.alphas_cumprod, variance_noise=torch.zeros(2, 3))
    assert torch.equal(got.prev_sample, want.prev_sample)


def test_generator_and_variance_noise_exclude_each_other():
    x, m = torch.randn(2, 3), torch.randn(2, 3)
    s = DDIMScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="generator or variance_noise, not both"):
        s.step(m, 901, x, eta=1.0, generator=torch.Generator(), variance_noise=torch.randn(2, 3))
    with pytest.raises(ValueError, match="generator or variance_noise, not both"):
        DDPMScheduler().step(m, 10, x, torch.Generator(), variance_noise=torch.randn(2, 3))


def test_mixed_dtypes_promote():
    """A float16 model output with a float32 sample steps in float32, as the formula in
    PyTorch ops would."""
    s = DDIMScheduler()
    s.set_timesteps(10)
    x, m = torch.randn(2, 3), torch.randn(2, 3).half()
    out = s.step(m, 901, x)
    assert out.prev_sample.dtype == torch.float32
    assert torch.equal(out.prev_sample, s.step(m.float(), 901, x).prev_sample)


def test_diffusers_attributes():
    ddpm, ddim = DDPMScheduler(), DDIMScheduler(set_alpha_to_one=False)
    assert torch.equal(ddpm.one, torch.tensor(1.0))
    assert torch.equal(DDIMScheduler().final_alpha_cumprod, torch.tensor(1.0))
    assert torch.equal(ddim.final_alpha_cumprod, ddim.alphas_cumprod[0])
    assert ddpm.order == 1 and ddpm.init_noise_sigma == 1.0


def test_the_package_exposes_diffusion():
    import subprocess
    import sys

    code = "import dlcv_fast; print(dlcv_fast.diffusion.DDPMScheduler.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "DDPMScheduler"
