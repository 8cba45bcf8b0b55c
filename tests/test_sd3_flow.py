"""Flow matching (SD3): schedules and samplers against diffusers' flow schedulers, guidance wrappers."""

from __future__ import annotations

import pytest
import torch

from diffusekit.diffusion.flow import (
    FlowDenoiser,
    SkipLayerGuidance,
    flow_noise,
    flow_sampler,
    flow_sigmas,
    sample_flow_dpmpp_2m,
    time_shift,
)
from diffusekit.models.init import randomize_
from diffusekit.models.mmdit import MMDiT
from diffusekit.models.sd3_configs import TINY_SD35

diffusers = pytest.importorskip("diffusers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_sigmas_equal_diffusers(shift: float, steps: int) -> None:
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    ours = flow_sigmas(steps, shift)
    assert ours.shape == (steps + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
    assert torch.allclose(ours, ref.sigmas, rtol=0, atol=1e-7)


def _tiny_model():
    cfg = TINY_SD35.mmdit
    model = randomize_(MMDiT(cfg), seed=3).eval()
    g = torch.Generator().manual_seed(5)
    cond = {"context": torch.randn(1, 6, cfg.context_dim, generator=g), "y": torch.randn(1, 64, generator=g)}
    noise = torch.randn(1, 16, 8, 8, generator=g)
    return model, cond, noise


def test_euler_final_latent_equals_diffusers_scheduler() -> None:
    model, cond, noise = _tiny_model()
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(8)
    x = noise.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            v = model(x, t.expand(1), **cond)
            x = ref.step(v, t, x).prev_sample
    ours = flow_sampler("Euler")(FlowDenoiser(model), noise.clone(), flow_sigmas(8, 3.0), extra_args=cond)
    rel = ((ours - x).abs().max() / x.abs().max()).item()
    assert rel < 1e-5, rel


def test_dpmpp_2m_equals_diffusers_flow_dpm_solver() -> None:
    model, cond, noise = _tiny_model()
    ref = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )
    ref.set_timesteps(10)
    sigmas = ref.sigmas.clone()
    x = noise * sigmas[0]
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            v = model(x, (sigmas[i] * 1000).expand(1), **cond)
            x = ref.step(v, t, x).prev_sample
    ours = sample_flow_dpmpp_2m(FlowDenoiser(model), noise * sigmas[0], sigmas, extra_args=cond)
    rel = ((ours - x).abs().max() / x.abs().max()).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "DPM++ 2M"])
def test_exact_velocity_reaches_the_data(name: str) -> None:
    """With the exact velocity of a single data point, every flow ODE solver lands on it."""
    x0 = torch.randn(2, 4, 6, 6)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t / 1000).view(-1, 1, 1, 1)
        return (x - x0) / s

    noise = torch.randn(2, 4, 6, 6)
    out = flow_sampler(name)(FlowDenoiser(velocity), noise, flow_sigmas(6, 3.0))
    assert torch.allclose(out, x0, atol=1e-5)


def test_img2img_schedule_and_noise() -> None:
    full = flow_sigmas(20, 3.0)
    part = flow_sigmas(10, 3.0, denoise_strength=0.5)
    assert torch.equal(part, full[10:])
    x0, n = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    assert torch.allclose(flow_noise(x0, n, 0.25), torch.full_like(x0, 0.75))
    assert time_shift(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="not available for SD3"):
        flow_sampler("euler a")
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(0)


def test_skip_layer_guidance_window() -> None:
    model, cond, noise = _tiny_model()
    den = FlowDenoiser(model)
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    sigmas = flow_sigmas(10, 3.0)
    slg = SkipLayerGuidance(den, 4.0, sigmas, slg_scale=2.5, layers=(1,), start=0.01, end=0.3)
    plain = SkipLayerGuidance(den, 4.0, sigmas, slg_scale=0.0)
    with torch.no_grad():
        for i, active in [(0, False), (1, True), (2, True), (3, False)]:
            s = sigmas[i].expand(1)
            a, b = slg(noise, s, cond=cond, uncond=uncond), plain(noise, s, cond=cond, uncond=uncond)
            assert torch.allclose(a, b) is not active, i
