"""Noise (beta) schedules: each schedule against an independent float64 computation
(plain Python ``math``), the cosine cap, zero-terminal-SNR rescaling, trained_betas, the
float64-then-float32 rounding of alphas_cumprod, and the argument errors."""

import math

import pytest
import torch

from dlcv_fast.diffusion import (
    BETA_SCHEDULES,
    DDPMScheduler,
    alphas_cumprod_from_betas,
    make_betas,
    rescale_zero_terminal_snr,
)

# float32 rounding of a float64 value: relative error <= 2^-24 ~ 6e-8.
RTOL32 = 1e-6


def ref_betas(schedule: str, T: int, beta_start: float, beta_end: float) -> list[float]:
    """The schedule's betas in float64, written out from the formulas."""
    def lin(a, b, i):
        return a + (b - a) * i / (T - 1) if T > 1 else a

    if schedule == "linear":
        return [lin(beta_start, beta_end, i) for i in range(T)]
    if schedule == "scaled_linear":
        return [lin(math.sqrt(beta_start), math.sqrt(beta_end), i) ** 2 for i in range(T)]
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    if schedule == "sigmoid":
        return [1 / (1 + math.exp(-lin(-6.0, 6.0, i))) * (beta_end - beta_start) + beta_start
                for i in range(T)]
    raise AssertionError(schedule)


def ref_cumprod(betas) -> list[float]:
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - float(b)
        out.append(acc)
    return out


def as64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("T, beta_start, beta_end", [
    (1000, 0.0001, 0.02),
    (1000, 0.00085, 0.012),  # Stable Diffusion
    (50, 0.001, 0.3),
    (2, 0.0001, 0.02),
])
def test_schedule_matches_formula(schedule, T, beta_start, beta_end):
    betas = make_betas(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
                       beta_schedule=schedule)
    assert betas.dtype == torch.float32 and betas.shape == (T,)
    expected = ref_betas(schedule, T, beta_start, beta_end)
    torch.testing.assert_close(betas.double(), as64(expected), rtol=RTOL32, atol=0)

    ac = alphas_cumprod_from_betas(betas)
    assert ac.dtype == torch.float32 and ac.shape == (T,)
    # From the float32 betas, so that only the cumulative product is under test.
    torch.testing.assert_close(ac.double(), as64(ref_cumprod(betas.tolist())), rtol=RTOL32,
                               atol=0)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("rescale", [False, True])
def test_scheduler_alphas_cumprod_from_float64_betas(schedule, rescale):
    """The schedulers' alpha_bar is the float64 product of the float64 betas, rounded once:
    from the float32 betas, the cosine schedule's late alpha_bar is off by about 1e-5."""
    s = DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=rescale)
    betas = as64(ref_betas(schedule, 1000, 0.0001, 0.02))
    if rescale:
        betas = rescale_zero_terminal_snr(betas)
    want = as64(ref_cumprod(betas.tolist()))
    torch.testing.assert_close(s.alphas_cumprod.double(), want, rtol=RTOL32, atol=1e-30)
    assert torch.equal(s.betas, betas.float())


def test_defaults_are_ddpm_linear():
    betas = make_betas()
    assert betas.shape == (1000,)
    assert betas[0].item() == torch.tensor(0.0001).item()
    assert betas[-1].item() == torch.tensor(0.02).item()


def test_single_step_schedules():
    for schedule in ("linear", "scaled_linear"):
        assert make_betas(1, beta_schedule=schedule).tolist() == [torch.tensor(0.0001).item()]
    assert make_betas(1, beta_schedule="sigmoid").item() == pytest.approx(
        0.0001 + 0.0199 / (1 + math.exp(6)), rel=RTOL32)
    assert make_betas(1, beta_schedule="squaredcos_cap_v2").item() == torch.tensor(0.999).item()


def test_cosine_cap():
    betas = make_betas(beta_schedule="squaredcos_cap_v2")
    # alpha_bar(1) = cos(pi/2)^2 ~ 4e-33: the uncapped last beta would be 1.
    assert betas[-1].item() == torch.tensor(0.999, dtype=torch.float32).item()
    assert betas.max().item() == torch.tensor(0.999, dtype=torch.float32).item()
    assert bool((betas[:-1] < 0.999).all())  # only the end reaches the cap at T = 1000
    assert bool((betas[1:] > betas[:-1]).all())


def test_cosine_ignores_beta_range():
    base = make_betas(beta_schedule="squaredcos_cap_v2")
    other = make_betas(beta_schedule="squaredcos_cap_v2", beta_start=5.0, beta_end=-1.0)
    assert torch.equal(base, other)


@pytest.mark.parametrize("schedule, beta_start, beta_end", [
    ("linear", 0.0001, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02),
])
def test_rescale_zero_terminal_snr(schedule, beta_start, beta_end):
    original = as64(ref_betas(schedule, 1000, beta_start, beta_end))
    rescaled = rescale_zero_terminal_snr(original)
    assert rescaled.dtype == torch.float64 and rescaled.shape == (1000,)

    ab_old = as64(ref_cumprod(original.tolist()))
    ab_new = as64(ref_cumprod(rescaled.tolist()))
    assert abs(ab_new[-1].item()) <= 1e-12
    assert rescaled[-1].item() == 1.0
    assert ab_new[0].item() == pytest.approx(ab_old[0].item(), rel=1e-12)

    # sqrt(alpha_bar') = (s - s_T) * s_0 / (s_0 - s_T) with s = sqrt(alpha_bar).
    s_old, s_new = ab_old.sqrt(), ab_new.clamp(min=0).sqrt()
    s0, sT = s_old[0].item(), s_old[-1].item()
    torch.testing.assert_close(s_new, (s_old - sT) * (s0 / (s0 - sT)), rtol=1e-10, atol=1e-12)
    # Affine: the ratio of differences is constant.
    slope = (s_new[1:] - s_new[:-1]) / (s_old[1:] - s_old[:-1])
    torch.testing.assert_close(slope, torch.full_like(slope, s0 / (s0 - sT)), rtol=1e-6, atol=0)


def test_rescale_through_make_betas():
    plain = make_betas(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    betas = make_betas(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                       rescale_betas_zero_snr=True)
    assert betas.dtype == torch.float32
    expected = rescale_zero_terminal_snr(as64(ref_betas("scaled_linear", 1000, 0.00085, 0.012)))
    torch.testing.assert_close(betas.double(), expected, rtol=RTOL32, atol=0)
    assert betas[-1].item() == 1.0
    ac = alphas_cumprod_from_betas(betas)
    assert ac[-1].item() == 0.0
    assert ac[0].item() == pytest.approx(alphas_cumprod_from_betas(plain)[0].item(), rel=RTOL32)


def test_rescale_dtype_and_idempotence():
    betas32 = make_betas()
    once = rescale_zero_terminal_snr(betas32)
    assert once.dtype == torch.float32
    assert rescale_zero_terminal_snr(betas32.tolist()).dtype == torch.float64
    # Already zero-terminal: the shift is 0 and the scale 1.
    twice = rescale_zero_terminal_snr(rescale_zero_terminal_snr(betas32.double()))
    torch.testing.assert_close(twice, rescale_zero_terminal_snr(betas32.double()),
                               rtol=1e-9, atol=1e-12)


def test_trained_betas_round_trip():
    betas = make_betas(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(make_betas(trained_betas=betas), betas)
    assert torch.equal(make_betas(num_train_timesteps=1000, trained_betas=betas), betas)
    # A list of any length sets T; beta_schedule is overridden.
    values = [0.1, 0.2, 0.5, 1.0]
    out = make_betas(trained_betas=values, beta_schedule="squaredcos_cap_v2")
    assert torch.equal(out, torch.tensor(values, dtype=torch.float32))
    assert torch.equal(make_betas(trained_betas=torch.tensor(values, dtype=torch.float64)), out)
    # float64 trained betas are rounded once.
    fine = as64([1e-4 + 1e-12, 0.5])
    assert torch.equal(make_betas(trained_betas=fine), fine.float())
    # Rescaling applies to trained betas too.
    rescaled = make_betas(trained_betas=values[:3], rescale_betas_zero_snr=True)
    torch.testing.assert_close(rescaled.double(), rescale_zero_terminal_snr(as64(values[:3])),
                               rtol=RTOL32, atol=0)


@pytest.mark.parametrize("schedule, beta_start, beta_end", [
    ("linear", 0.0001, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("sigmoid", 0.0001, 0.02),
])
def test_one_minus_alpha_bar_at_t0(schedule, beta_start, beta_end):
    betas = make_betas(beta_schedule=schedule, beta_start=beta_start, beta_end=beta_end)
    ac = alphas_cumprod_from_betas(betas)
    ref = ref_cumprod(betas.tolist())
    # alpha_bar is the float64 value rounded once to float32, at t = 0 and everywhere.
    assert torch.equal(ac, as64(ref).float())
    one_minus = (1 - ac[0]).item()
    assert one_minus > 0
    # 1 - alpha_bar_0 ~ 1e-4: exact to half a float32 ulp of 1 (2^-25), about 3e-4 of it.
    assert abs(one_minus - (1 - ref[0])) <= 2.0**-25
    assert one_minus == pytest.approx(betas[0].item(), rel=1e-3)


def test_alphas_cumprod_accepts_sequences():
    ac = alphas_cumprod_from_betas([0.5, 0.5, 1.0])
    assert ac.dtype == torch.float32
    assert ac.tolist() == [0.5, 0.25, 0.0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_schedule="cosine"), r"beta_schedule 'cosine'.*'linear', 'scaled_linear', "
                                   r"'squaredcos_cap_v2', 'sigmoid'"),
    (dict(beta_schedule="cosine", trained_betas=[0.1]), "beta_schedule"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be an integer >= 1"),
    (dict(num_train_timesteps=-5), "num_train_timesteps"),
    (dict(num_train_timesteps=10.0), "num_train_timesteps"),
    (dict(num_train_timesteps=True), "num_train_timesteps"),
    (dict(num_train_timesteps=0, beta_schedule="squaredcos_cap_v2"), "num_train_timesteps"),
    (dict(beta_start=0.0), r"beta_start must lie in \(0, 1\)"),
    (dict(beta_start=-0.1), "beta_start"),
    (dict(beta_start=float("nan")), "beta_start"),
    (dict(beta_end=1.0), r"beta_end must lie in \(0, 1\)"),
    (dict(beta_end=1.5, beta_schedule="scaled_linear"), "beta_end"),
    (dict(beta_start=0.0, beta_schedule="sigmoid"), "beta_start"),
    (dict(beta_start=0.02, beta_end=0.0001), "beta_start must be <= beta_end"),
    (dict(beta_start="a"), "beta_start and beta_end must be numbers"),
    (dict(trained_betas=[[0.1, 0.2]]), "trained_betas must be 1-D"),
    (dict(trained_betas=0.1), "trained_betas must be 1-D"),
    (dict(trained_betas=[]), "trained_betas must have at least 1 value"),
    (dict(trained_betas=[0.1, 0.0]), r"trained_betas must have every value in \(0, 1\]"),
    (dict(trained_betas=[0.1, 1.5]), "trained_betas"),
    (dict(trained_betas=[0.1, -0.2]), "trained_betas"),
    (dict(trained_betas=[0.1, float("nan")]), "trained_betas"),
    (dict(trained_betas=["x"]), "trained_betas must be a 1-D sequence"),
    (dict(trained_betas=[0.1, 0.2], num_train_timesteps=1000),
     "trained_betas has 2 values but num_train_timesteps is 1000"),
    (dict(trained_betas=[0.1, 0.2], num_train_timesteps=0), "num_train_timesteps"),
    (dict(num_train_timesteps=1, rescale_betas_zero_snr=True), "at least 2 values"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_betas(**kwargs)


@pytest.mark.parametrize("betas, match", [
    ([0.1], "at least 2 values"),
    ([], "at least 2 values"),
    ([[0.1, 0.2]], "betas must be 1-D"),
    ([0.1, 0.0], r"betas must have every value in \(0, 1\]"),
    ([0.1, 2.0], r"\(0, 1\]"),
])
def test_rescale_errors(betas, match):
    with pytest.raises(ValueError, match=match):
        rescale_zero_terminal_snr(betas)


def test_alphas_cumprod_error():
    with pytest.raises(ValueError, match="betas must be 1-D"):
        alphas_cumprod_from_betas([[0.1]])
