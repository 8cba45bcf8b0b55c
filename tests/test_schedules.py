"""Schedules: the SD table, sigma schedules vs diffusers' timestep spacings, img2img cuts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.schedulers.scheduling_euler_discrete import rescale_zero_terminal_snr as diffusers_ztsnr

from diffusekit.diffusion.schedules import (
    SCHEDULES,
    DiscreteSchedule,
    a1111_img2img_steps,
    diffusers_img2img_start,
    get_sigmas,
    img2img_sigmas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    sd_alphas_cumprod,
    sd_schedule,
)

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def diffusers_sigmas(cls, steps: int, **config) -> torch.Tensor:
    scheduler = cls(**SD, **config)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas


@pytest.fixture(scope="module")
def table() -> DiscreteSchedule:
    """Our schedule object over diffusers' own alphas_cumprod, so only the schedule logic is compared."""
    return DiscreteSchedule(EulerDiscreteScheduler(**SD).alphas_cumprod)


def test_sd_table_matches_ldm_float64_cumprod():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = torch.from_numpy(np.cumprod(1.0 - betas).astype(np.float32))
    s = sd_schedule()
    assert torch.equal(s.alphas_cumprod, ac)
    assert torch.equal(s.sigmas, ((1 - ac) / ac) ** 0.5)
    assert s.num_timesteps == 1000
    assert s.sigma_min == pytest.approx(0.0291675, rel=1e-5) and s.sigma_max == pytest.approx(
        14.614642, rel=1e-6
    )


def test_sd_alphas_cumprod_is_the_tables_copy():
    ac = sd_alphas_cumprod()
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    assert torch.equal(ac, sd_schedule().alphas_cumprod)


def test_sd_table_vs_diffusers_float32_cumprod():
    # diffusers builds betas and their cumprod in float32, LDM/A1111 (and we) in float64; the
    # accumulated rounding reaches 8.7e-6 relative at the low-noise end of the table.
    ours = sd_schedule().sigmas
    theirs = DiscreteSchedule(EulerDiscreteScheduler(**SD).alphas_cumprod).sigmas
    rel = ((ours - theirs) / theirs).abs()
    assert 1e-6 < float(rel.max()) < 1e-5


def test_sigma_to_t_inverts_the_table(table):
    t = torch.arange(1000, dtype=torch.float32)
    assert torch.allclose(table.sigma_to_t(table.sigmas), t, atol=2e-3, rtol=0)
    assert torch.equal(table.sigma_to_t(table.sigmas, quantize=True), t)
    mid = torch.tensor([0.5, 123.25, 998.75])
    assert torch.allclose(table.sigma_to_t(table.t_to_sigma(mid)), mid, atol=2e-3, rtol=0)
    # out-of-range sigmas clamp to the ends, as in k-diffusion
    assert table.sigma_to_t(torch.tensor([1e-4, 100.0])).tolist() == [0.0, 999.0]


def test_quantize_is_rounding_of_interpolated_t(table):
    sigmas = get_sigmas("karras", 25, table)[:-1]
    assert torch.equal(table.sigma_to_t(sigmas, quantize=True), table.sigma_to_t(sigmas).round())


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 7, 25])
def test_schedule_shape_and_endpoints(table, name, steps):
    sigmas = get_sigmas(name, steps, table)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32
    assert sigmas[-1] == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    if name in ("normal", "karras", "exponential", "polyexponential", "sgm_uniform", "simple", "beta", "lcm"):
        assert float(sigmas[0]) == pytest.approx(table.sigma_max, rel=1e-6)
    if name in ("normal", "karras", "exponential", "polyexponential", "beta") and steps > 1:
        assert float(sigmas[-2]) == pytest.approx(table.sigma_min, rel=1e-6)


def test_unknown_schedule_lists_valid_names(table):
    with pytest.raises(ValueError, match="valid: normal, karras, exponential"):
        get_sigmas("cosine", 10, table)
    with pytest.raises(ValueError, match="positive integer"):
        get_sigmas("normal", 0, table)


def test_normal_is_diffusers_linspace(table):
    assert torch.equal(get_sigmas("normal", 10, table), diffusers_sigmas(EulerDiscreteScheduler, 10))
    # When 999/(steps-1) is not an integer the timesteps fall between table entries: diffusers
    # interpolates sigma linearly in t, we (as k-diffusion/A1111) interpolate log-sigma.
    steps = 7
    t = torch.linspace(999, 0, steps, dtype=torch.float64)
    low, w = t.floor().long(), t - t.floor()
    s = table.sigmas.to(torch.float64)
    linear = ((1 - w) * s[low] + w * s[t.ceil().long()]).float()
    loglinear = ((1 - w) * s[low].log() + w * s[t.ceil().long()].log()).exp().float()
    theirs, ours = diffusers_sigmas(EulerDiscreteScheduler, steps), get_sigmas("normal", steps, table)
    assert torch.equal(theirs[:-1], linear) and torch.equal(ours[:-1], loglinear)
    assert not torch.equal(ours, theirs)


def test_sgm_uniform_is_dpmsolver_linspace(table):
    assert torch.equal(get_sigmas("sgm_uniform", 9, table), diffusers_sigmas(DPMSolverMultistepScheduler, 9))
    # diffusers' multistep solvers round these timesteps to integers; with 999/steps fractional it shows
    steps = 10
    t = torch.linspace(999, 0, steps + 1, dtype=torch.float64)[:-1]
    rounded = torch.cat([table.t_to_sigma(t.round()), torch.zeros(1)])
    assert torch.equal(diffusers_sigmas(DPMSolverMultistepScheduler, steps), rounded)


@pytest.mark.parametrize("steps", [10, 7, 30])
def test_ddim_uniform_is_leading_with_offset_one(table, steps):
    theirs = diffusers_sigmas(EulerDiscreteScheduler, steps, timestep_spacing="leading", steps_offset=1)
    assert torch.equal(get_sigmas("ddim_uniform", steps, table), theirs)


@pytest.mark.parametrize("steps", [10, 8])
def test_simple_is_trailing(table, steps):
    theirs = diffusers_sigmas(EulerDiscreteScheduler, steps, timestep_spacing="trailing")
    assert torch.equal(get_sigmas("simple", steps, table), theirs)


@pytest.mark.parametrize("steps", [10, 7])
@pytest.mark.parametrize(
    ("name", "flag"), [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")]
)
def test_karras_and_exponential_match_diffusers(table, steps, name, flag):
    assert torch.equal(
        get_sigmas(name, steps, table), diffusers_sigmas(EulerDiscreteScheduler, steps, **{flag: True})
    )


@pytest.mark.parametrize("steps", [10, 7])
def test_beta_matches_diffusers(table, steps):
    pytest.importorskip("scipy")  # diffusers needs scipy for its beta sigmas; ours are torch/math only
    theirs = diffusers_sigmas(EulerDiscreteScheduler, steps, use_beta_sigmas=True)
    assert torch.allclose(get_sigmas("beta", steps, table), theirs, rtol=1e-6, atol=0)


def test_polyexponential_rho_one_is_exponential(table):
    assert torch.allclose(
        get_sigmas("polyexponential", 9, table), get_sigmas("exponential", 9, table), rtol=1e-6
    )
    assert not torch.allclose(
        get_sigmas("polyexponential", 9, table, rho=2.0), get_sigmas("exponential", 9, table)
    )


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_matches_lcm_scheduler_timesteps(table, steps):
    scheduler = LCMScheduler(**SD)
    scheduler.set_timesteps(steps)
    expected = torch.cat([table.sigmas[scheduler.timesteps], torch.zeros(1)])
    assert torch.equal(get_sigmas("lcm", steps, table), expected)


def test_zero_terminal_snr_matches_diffusers():
    ours = rescale_zero_terminal_snr(scaled_linear_betas())
    theirs = diffusers_ztsnr(torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0)
    s = sd_schedule(zero_terminal_snr=True)
    assert float(s.alphas_cumprod[-1]) == 2.0**-24
    assert s.sigma_max == pytest.approx(4096.0, rel=1e-6)


def test_invalid_tables_raise():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DiscreteSchedule(torch.tensor([0.9, 0.5, 0.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteSchedule(torch.tensor([0.5, 0.9]))


# ------------------------------------------------------------------ img2img


def test_a1111_img2img_steps():
    assert a1111_img2img_steps(20, 0.75) == (20, 15)  # runs t_enc + 1 = 16 steps
    assert a1111_img2img_steps(20, 1.0) == (20, 19)  # strength is capped at 0.999
    assert a1111_img2img_steps(20, 0.5, fix_steps=True) == (40, 19)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        a1111_img2img_steps(20, 0.0)


def test_img2img_cuts(table):
    full = get_sigmas("karras", 20, table)
    a1111 = img2img_sigmas(lambda n: get_sigmas("karras", n, table), 20, 0.75)
    assert torch.equal(a1111, full[4:])  # sigmas[steps - t_enc - 1:], 16 steps
    ours_diffusers = img2img_sigmas(lambda n: get_sigmas("karras", n, table), 20, 0.75, semantics="diffusers")
    assert torch.equal(ours_diffusers, full[5:])  # int(20 * 0.75) = 15 steps
    assert torch.equal(img2img_sigmas(lambda n: get_sigmas("karras", n, table), 20, 1.0), full)
    stretched = img2img_sigmas(lambda n: get_sigmas("karras", n, table), 20, 0.5, fix_steps=True)
    assert torch.equal(stretched, get_sigmas("karras", 40, table)[20:]) and len(stretched) == 21
    with pytest.raises(ValueError, match="valid: 'a1111', 'diffusers'"):
        img2img_sigmas(lambda n: full, 20, 0.5, semantics="comfy")
    with pytest.raises(ValueError, match="no step to run"):
        diffusers_img2img_start(4, 0.2)


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.75), (10, 0.33), (7, 1.0)])
def test_diffusers_semantics_match_img2img_pipeline(table, steps, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    scheduler = EulerDiscreteScheduler(**SD)
    scheduler.set_timesteps(steps)
    holder = type("Holder", (), {"scheduler": scheduler})()
    timesteps, run = StableDiffusionImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
    ours = img2img_sigmas(lambda n: get_sigmas("normal", n, table), steps, strength, semantics="diffusers")
    assert len(ours) - 1 == run == len(timesteps)
    assert torch.allclose(table.sigma_to_t(ours[:-1]), timesteps, atol=2e-3, rtol=0)
