"""Samplers and denoisers: parity with diffusers' schedulers on a toy model, registry, names, CFG.

Parity metric: max|ours - diffusers| / max|diffusers| over the final latent, fp32, (1, 4, 8, 8).
Our ``DiscreteSchedule`` is built from the scheduler's own ``alphas_cumprod`` so that only the
sampling math is compared (the float64-vs-float32 table difference is covered in test_schedules).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from diffusekit.diffusion.denoiser import CFGDenoiser, Denoiser, HookedDenoiser
from diffusekit.diffusion.sampler_base import StepInfo
from diffusekit.diffusion.samplers import (
    SAMPLERS,
    SCHEDULE_A1111_LABELS,
    a1111_names,
    gaussian_noise,
    resolve_sampler,
    sample_ddim,
    sample_dpm2,
    sample_dpm2_ancestral,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_3m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_lms,
    sample_plms,
    sample_unipc,
    sampler_sigmas,
)
from diffusekit.diffusion.schedules import DiscreteSchedule, get_sigmas, sd_schedule

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TOL = 1e-4
SHAPE = (1, 4, 8, 8)


class ToyUNet:
    """A deterministic stand-in for a U-Net: a fixed random channel mix with t-dependent gain and shift."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g) * 0.3 + torch.eye(channels) * 0.8
        self.b = torch.randn(channels, generator=g) * 0.1
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        self.batches.append(x.shape[0])
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])  # (B,)
        mix = torch.einsum("oc,bchw->bohw", self.w, x[:, : self.w.shape[1]])
        gain = (0.9 + 0.3 * torch.sin(t / 150.0)).reshape(-1, 1, 1, 1)
        out = mix * gain + (0.05 * torch.cos(t / 70.0)).reshape(-1, 1, 1, 1) + self.b.reshape(1, -1, 1, 1)
        if "context" in cond:  # (B, T, D) -> a per-sample, per-channel offset
            out = out + cond["context"].mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return out


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def seeded(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def init_noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=seeded(1))


def run_diffusers(scheduler, steps, noise, model, generator=None, **step_kwargs) -> torch.Tensor:
    """The standard diffusers denoising loop (no guidance)."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        if generator is not None:
            step_kwargs["generator"] = generator
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


PRED = {"eps": "epsilon", "v": "v_prediction"}

# name: (diffusers scheduler, its config, our sampler, our schedule, steps, options)
# options: vp = diffusers works on the VP latent (init_noise_sigma 1), start from noise * sqrt(1 + s0^2);
#          noise = replay the per-step randn_tensor draws; quantize = diffusers feeds rounded timesteps;
#          final_min = diffusers ends at abar_0 (set_alpha_to_one=False / final_sigmas_type="sigma_min"),
#          so our schedule ends at sigma_min and the result is scaled back to VP.
CASES = {
    "euler": (EulerDiscreteScheduler, {}, sample_euler, "normal", 10, {}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}, sample_euler, "karras", 10, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, sample_euler_ancestral, "normal", 10, {"noise": True}),
    "heun": (HeunDiscreteScheduler, {}, sample_heun, "normal", 10, {}),
    "heun_karras": (HeunDiscreteScheduler, {"use_karras_sigmas": True}, sample_heun, "karras", 10, {}),
    "dpm2": (KDPM2DiscreteScheduler, {}, sample_dpm2, "normal", 10, {}),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {}, sample_dpm2_ancestral, "normal", 10, {"noise": True}),
    "lms": (LMSDiscreteScheduler, {}, sample_lms, "normal", 10, {}),
    "lms_karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}, sample_lms, "karras", 10, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}, sample_dpmpp_2m, "sgm_uniform", 9, {"vp": True}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"use_karras_sigmas": True},
        sample_dpmpp_2m,
        "karras",
        10,
        {"vp": True, "quantize": True},
    ),
    "dpmpp_2m_sde": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++"},
        sample_dpmpp_2m_sde,
        "sgm_uniform",
        9,
        {"vp": True, "noise": True},
    ),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        sample_dpmpp_2m_sde,
        "karras",
        10,
        {"vp": True, "noise": True, "quantize": True},
    ),
    "dpmpp_2m_sde_heun": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
        sample_dpmpp_2m_sde_heun,
        "sgm_uniform",
        9,
        {"vp": True, "noise": True},
    ),
    # eta=0 turns 3M SDE into DPM-Solver++(3M) with the "heun" second-order start; diffusers drops to
    # order 2 at the second-to-last step below 15 steps, hence 15.
    "dpmpp_3m_eta0": (
        DPMSolverMultistepScheduler,
        {"solver_order": 3, "solver_type": "heun", "use_karras_sigmas": True},
        sample_dpmpp_3m_sde,
        "karras",
        15,
        {"vp": True, "quantize": True, "kwargs": {"eta": 0.0}},
    ),
    "unipc": (UniPCMultistepScheduler, {}, sample_unipc, "sgm_uniform", 9, {"vp": True}),
    "unipc_karras": (
        UniPCMultistepScheduler,
        {"use_karras_sigmas": True},
        sample_unipc,
        "karras",
        10,
        {"vp": True, "quantize": True},
    ),
    # diffusers' "bh1" variant returns NaN when the schedule ends at sigma 0 (B(h) = -inf times 0 in
    # its last predictor), so bh1 is compared with final_sigmas_type="sigma_min".
    "unipc_o3_bh1": (
        UniPCMultistepScheduler,
        {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        sample_unipc,
        "sgm_uniform",
        9,
        {"vp": True, "final_min": True, "kwargs": {"order": 3, "variant": "bh1"}},
    ),
    "ddim": (
        DDIMScheduler,
        {"steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False},
        sample_ddim,
        "ddim_uniform",
        10,
        {"vp": True, "final_min": True},
    ),
    "ddim_alpha_one": (
        DDIMScheduler,
        {"steps_offset": 1, "set_alpha_to_one": True, "clip_sample": False},
        sample_ddim,
        "ddim_uniform",
        10,
        {"vp": True},
    ),
    "ddim_eta": (
        DDIMScheduler,
        {"steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False},
        sample_ddim,
        "ddim_uniform",
        10,
        {"vp": True, "final_min": True, "noise": True, "kwargs": {"eta": 0.5}, "step_kwargs": {"eta": 0.5}},
    ),
    "lcm": (LCMScheduler, {}, sample_lcm, "lcm", 4, {"vp": True, "noise": True, "quantize": True}),
}


def run_case(name: str, prediction: str, init_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cls, config, sampler, schedule_id, steps, opt = CASES[name]
    model = ToyUNet()
    scheduler = cls(**SD, prediction_type=PRED[prediction], **config)
    generator = seeded() if opt.get("noise") else None
    ref = run_diffusers(scheduler, steps, init_noise, model, generator, **opt.get("step_kwargs", {}))

    table = DiscreteSchedule(scheduler.alphas_cumprod)
    sigmas = get_sigmas(schedule_id, steps, table)
    if opt.get("final_min"):
        sigmas[-1] = table.sigma_min
    x = init_noise * (math.sqrt(1 + float(sigmas[0]) ** 2) if opt.get("vp") else float(sigmas[0]))
    kwargs = dict(opt.get("kwargs", {}))
    if opt.get("noise"):
        kwargs["noise"] = gaussian_noise(x, seeded())  # replays diffusers' randn_tensor draws
    denoiser = Denoiser(model, table, prediction, quantize=opt.get("quantize", False))
    out = sampler(denoiser, x, sigmas, **kwargs)
    if opt.get("final_min"):
        out = out / math.sqrt(1 + float(sigmas[-1]) ** 2)  # VE -> VP latent at the final noise level
    return out, ref


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name, prediction, init_noise):
    out, ref = run_case(name, prediction, init_noise)
    assert torch.isfinite(ref).all()
    assert rel(out, ref) < TOL


class _AlternatingQuantize:
    """KDPM2(A) with Karras sigmas rounds the timesteps of its main sigmas but not of the midpoints;
    our samplers call the model main, mid, main, mid, ..., so odd calls are quantized."""

    def __init__(self, model, table, prediction):
        self.rounded = Denoiser(model, table, prediction, quantize=True)
        self.plain = Denoiser(model, table, prediction)
        self.calls = 0

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        return (self.rounded if self.calls % 2 == 1 else self.plain)(x, sigma, **cond)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(
    ("cls", "sampler"),
    [(KDPM2DiscreteScheduler, sample_dpm2), (KDPM2AncestralDiscreteScheduler, sample_dpm2_ancestral)],
)
def test_parity_kdpm2_karras(cls, sampler, prediction, init_noise):
    model = ToyUNet()
    scheduler = cls(**SD, prediction_type=PRED[prediction], use_karras_sigmas=True)
    ancestral = sampler is sample_dpm2_ancestral
    ref = run_diffusers(scheduler, 10, init_noise, model, seeded() if ancestral else None)
    table = DiscreteSchedule(scheduler.alphas_cumprod)
    sigmas = get_sigmas("karras", 10, table)
    x = init_noise * sigmas[0]
    kwargs = {"noise": gaussian_noise(x, seeded())} if ancestral else {}
    out = sampler(_AlternatingQuantize(model, table, prediction), x, sigmas, **kwargs)
    assert rel(out, ref) < TOL


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule_id", ["normal", "karras"])
def test_parity_dpmpp_sde_brownian(schedule_id, prediction, init_noise):
    pytest.importorskip("torchsde")
    from diffusers import DPMSolverSDEScheduler
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    from diffusekit.diffusion.sampler_base import brownian_tree_noise

    model = ToyUNet()
    scheduler = DPMSolverSDEScheduler(
        **SD,
        prediction_type=PRED[prediction],
        noise_sampler_seed=1234,
        use_karras_sigmas=schedule_id == "karras",
    )
    ref = run_diffusers(scheduler, 10, init_noise, model)
    table = DiscreteSchedule(scheduler.alphas_cumprod)
    sigmas = get_sigmas(schedule_id, 10, table)
    x = init_noise * sigmas[0]
    lo, hi = float(sigmas[-2]), float(sigmas[0])
    for noise in (BrownianTreeNoiseSampler(x, lo, hi, 1234), brownian_tree_noise(x, lo, hi, 1234)):
        assert rel(sample_dpmpp_sde(Denoiser(model, table, prediction), x, sigmas, noise=noise), ref) < TOL


def test_brownian_tree_noise_is_k_diffusions():
    pytest.importorskip("torchsde")
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    from diffusekit.diffusion.sampler_base import brownian_tree_noise

    x = torch.zeros(2, 4, 8, 8)
    theirs, ours = BrownianTreeNoiseSampler(x, 0.03, 14.6, 5), brownian_tree_noise(x, 0.03, 14.6, 5)
    for query in [(14.6, 9.0), (9.0, 3.3), (14.6, 11.0), (0.5, 0.03)]:
        assert torch.equal(theirs(*query), ours(*query))
    batched, single = brownian_tree_noise(x, 0.03, 14.6, [5, 6]), brownian_tree_noise(x[:1], 0.03, 14.6, 6)
    assert torch.equal(batched(14.6, 9.0)[1:], single(14.6, 9.0))


def test_plms_v_prediction_converts_each_output(init_noise):
    """diffusers' PNDM combines raw v outputs and converts the mix to eps with the current sample,
    so a v-model does not match it (13% here); LDM/A1111 convert every output to eps at its own
    latent, which we do. Check that: feed diffusers (epsilon mode) the v-model converted per call."""
    model = ToyUNet()
    scheduler = PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    ac = scheduler.alphas_cumprod

    def as_eps(x, t):
        a = ac[int(t)]
        return a.sqrt() * model(x, t) + (1 - a).sqrt() * x  # eps from v at this latent

    ref = run_diffusers(scheduler, 10, init_noise, as_eps)
    table = DiscreteSchedule(ac)
    sigmas = get_sigmas("ddim_uniform", 10, table)
    sigmas[-1] = table.sigma_min
    out = sample_plms(
        Denoiser(model, table, "v", quantize=True), init_noise * math.sqrt(1 + sigmas[0] ** 2), sigmas
    )
    assert rel(out / math.sqrt(1 + sigmas[-1] ** 2), ref) < TOL


def test_plms_eps_parity(init_noise):
    model = ToyUNet()
    scheduler = PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    ref = run_diffusers(scheduler, 10, init_noise, model)
    table = DiscreteSchedule(scheduler.alphas_cumprod)
    sigmas = get_sigmas("ddim_uniform", 10, table)
    sigmas[-1] = table.sigma_min
    out = sample_plms(Denoiser(model, table), init_noise * math.sqrt(1 + sigmas[0] ** 2), sigmas)
    assert rel(out / math.sqrt(1 + sigmas[-1] ** 2), ref) < TOL
    assert len(model.batches) == 2 * 11  # 11 calls each: the first step is pseudo improved Euler


def test_full_stack_with_our_table(init_noise):
    """Our float64-accumulated SD table (LDM/A1111) against diffusers' float32 one, end to end."""
    model = ToyUNet()
    ref = run_diffusers(EulerDiscreteScheduler(**SD), 10, init_noise, model)
    table = sd_schedule()
    sigmas = get_sigmas("normal", 10, table)
    assert rel(sample_euler(Denoiser(model, table), init_noise * sigmas[0], sigmas), ref) < TOL


def test_img2img_parity_diffusers_semantics():
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffusekit.diffusion.schedules import img2img_sigmas

    model, steps, strength = ToyUNet(), 10, 0.6
    init, noise = torch.randn(SHAPE, generator=seeded(3)), torch.randn(SHAPE, generator=seeded(4))
    scheduler = EulerDiscreteScheduler(**SD)
    scheduler.set_timesteps(steps)
    holder = type("Holder", (), {"scheduler": scheduler})()
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
    x = scheduler.add_noise(init, noise, timesteps[:1])
    for t in timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    table = DiscreteSchedule(scheduler.alphas_cumprod)
    sigmas = img2img_sigmas(lambda n: get_sigmas("normal", n, table), steps, strength, semantics="diffusers")
    out = sample_euler(Denoiser(model, table), init + noise * sigmas[0], sigmas)
    assert rel(out, x) < TOL


# ------------------------------------------------------------------ every registry entry


@pytest.mark.parametrize("sampler_id", list(SAMPLERS))
def test_every_sampler_runs_with_cfg_and_returns_finite(sampler_id):
    spec = SAMPLERS[sampler_id]
    table = sd_schedule()
    sigmas = sampler_sigmas(sampler_id, spec.default_schedule, 4, table)
    model = ToyUNet()
    x = torch.randn(2, 4, 8, 8, generator=seeded(2)) * sigmas[0]
    x_before = x.clone()
    cond = {"context": torch.randn(2, 3, 5, generator=seeded(5))}
    uncond = {"context": torch.zeros(2, 3, 5)}
    steps: list[StepInfo] = []
    out = spec.fn(
        CFGDenoiser(Denoiser(model, table), 5.0),
        x,
        sigmas,
        extra_args={"cond": cond, "uncond": uncond},
        callback=steps.append,
        noise=seeded(6),
    )
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(x, x_before)  # the input latent is not modified
    assert [s.index for s in steps] == [0, 1, 2, 3] and all(s.total == 4 for s in steps)
    assert set(model.batches) == {4}  # cond and uncond always in one call
    calls = len(model.batches)
    assert calls == (8 - 1 if spec.second_order else 4) + (1 if sampler_id == "plms" else 0)
    # the same noise source replays the same result; other noise changes stochastic samplers only
    again = spec.fn(
        CFGDenoiser(Denoiser(model, table), 5.0),
        x,
        sigmas,
        extra_args={"cond": cond, "uncond": uncond},
        noise=seeded(6),
    )
    assert torch.equal(out, again)
    other = spec.fn(
        CFGDenoiser(Denoiser(model, table), 5.0),
        x,
        sigmas,
        extra_args={"cond": cond, "uncond": uncond},
        noise=seeded(99),
    )
    assert torch.equal(out, other) != spec.stochastic


def test_sampler_math_is_float32_for_half_models():
    table = sd_schedule()

    def half_model(x, t):
        assert x.dtype == torch.float16
        return ToyUNet()(x.float(), t).half()

    sigmas = get_sigmas("karras", 3, table)
    out = sample_dpmpp_2m(
        Denoiser(half_model, table, model_dtype=torch.float16), torch.randn(SHAPE) * sigmas[0], sigmas
    )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_invalid_schedules_raise():
    model, table = ToyUNet(), sd_schedule()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_euler(Denoiser(model, table), x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2 entries"):
        sample_euler(Denoiser(model, table), x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="only the last may be 0"):
        sample_euler(Denoiser(model, table), x, torch.tensor([1.0, 0.0, 0.0]))


def test_euler_churn_draws_noise():
    table, model = sd_schedule(), ToyUNet()
    sigmas = get_sigmas("normal", 5, table)
    x = torch.randn(SHAPE, generator=seeded(2)) * sigmas[0]
    plain = sample_euler(Denoiser(model, table), x, sigmas)
    churned = sample_euler(Denoiser(model, table), x, sigmas, s_churn=1.0, noise=seeded(3))
    assert not torch.equal(plain, churned)
    assert torch.equal(churned, sample_euler(Denoiser(model, table), x, sigmas, s_churn=1.0, noise=seeded(3)))


# ------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("name", "schedule", "expected"),
    [
        ("Euler a", None, ("euler_a", "normal")),
        ("euler A", "Automatic", ("euler_a", "normal")),
        ("Euler", "Karras", ("euler", "karras")),
        ("LMS", None, ("lms", "normal")),
        ("Heun", None, ("heun", "normal")),
        ("DPM2", None, ("dpm2", "karras")),
        ("DPM2 a", None, ("dpm2_a", "karras")),
        ("DPM++ 2S a", None, ("dpmpp_2s_a", "karras")),
        ("DPM++ 2M", None, ("dpmpp_2m", "karras")),
        ("DPM++ 2M", "Uniform", ("dpmpp_2m", "normal")),
        ("DPM++ 2M", "Normal", ("dpmpp_2m", "normal")),
        ("DPM++ SDE", None, ("dpmpp_sde", "karras")),
        ("DPM++ 2M SDE", None, ("dpmpp_2m_sde", "exponential")),
        ("DPM++ 2M SDE Heun", None, ("dpmpp_2m_sde_heun", "exponential")),
        ("DPM++ 3M SDE", None, ("dpmpp_3m_sde", "exponential")),
        ("DDIM", None, ("ddim", "ddim_uniform")),
        ("PLMS", None, ("plms", "ddim_uniform")),
        ("UniPC", None, ("unipc", "sgm_uniform")),
        ("LCM", None, ("lcm", "normal")),
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
        ("Euler a Karras", None, ("euler_a", "karras")),
        ("DPM++ SDE Karras", None, ("dpmpp_sde", "karras")),
        ("DPM++ 2M SDE Exponential", None, ("dpmpp_2m_sde", "exponential")),
        ("DPM++ 2M SDE Heun Karras", None, ("dpmpp_2m_sde_heun", "karras")),
        ("DPM2 a Karras", "Karras", ("dpm2_a", "karras")),
        ("DPM++ 2M SGM Uniform", None, ("dpmpp_2m", "sgm_uniform")),
        ("Euler SGMUniform", None, ("euler", "sgm_uniform")),
        ("DDIM DDIM", None, ("ddim", "ddim_uniform")),
        ("dpmpp_2m", "exponential", ("dpmpp_2m", "exponential")),
        ("dpmpp_2m", "sgm_uniform", ("dpmpp_2m", "sgm_uniform")),
        ("euler", "lcm", ("euler", "lcm")),
        ("k_euler_a", None, ("euler_a", "normal")),
        ("k_dpmpp_2m_ka", None, ("dpmpp_2m", "karras")),
        ("k_dpmpp_3m_sde_exp", None, ("dpmpp_3m_sde", "exponential")),
        ("  DPM++   2M  karras ", None, ("dpmpp_2m", "karras")),
    ],
)
def test_resolve_sampler(name, schedule, expected):
    assert resolve_sampler(name, schedule) == expected


def test_unknown_names_raise_with_valid_list():
    with pytest.raises(
        ValueError, match=r"unknown sampler 'DPM fast'.*euler_a \('Euler a'\).*dpmpp_2m \('DPM\+\+ 2M'\)"
    ):
        resolve_sampler("DPM fast")
    with pytest.raises(
        ValueError, match=r"unknown schedule type 'Align Your Steps'; valid: normal, karras.*SGM Uniform"
    ):
        resolve_sampler("Euler", "Align Your Steps")
    with pytest.raises(ValueError, match="unknown sampler 'Euler Cosine'"):
        resolve_sampler("Euler Cosine")
    with pytest.raises(ValueError, match="implies schedule 'karras'.*'exponential'"):
        resolve_sampler("DPM++ 2M Karras", "Exponential")
    with pytest.raises(ValueError, match="non-empty"):
        resolve_sampler("")
    with pytest.raises(ValueError, match="unknown sampler id"):
        a1111_names("k_euler", "normal")


def test_a1111_names_for_infotext():
    assert a1111_names("euler", "normal") == ("Euler", "Automatic")
    assert a1111_names("euler", "karras") == ("Euler", "Karras")
    assert a1111_names("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras")  # A1111 writes the resolved label
    assert a1111_names("dpmpp_2m", "normal") == ("DPM++ 2M", "Uniform")
    assert a1111_names("ddim", "ddim_uniform") == ("DDIM", "Automatic")
    assert a1111_names("dpmpp_2m", "lcm") == ("DPM++ 2M", "lcm")  # no A1111 equivalent


@pytest.mark.parametrize("sampler_id", list(SAMPLERS))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_a1111_names_round_trip(sampler_id, zero_snr):
    for schedule_id in SCHEDULE_A1111_LABELS:
        names = a1111_names(sampler_id, schedule_id, zero_terminal_snr=zero_snr)
        assert resolve_sampler(*names, zero_terminal_snr=zero_snr) == (sampler_id, schedule_id)


def test_automatic_schedule_of_a_zero_terminal_snr_model_is_trailing():
    """Lin et al. 2023: sample a zero-SNR model from its last timestep with trailing spacing."""
    assert resolve_sampler("DPM++ 2M", zero_terminal_snr=True) == ("dpmpp_2m", "simple")
    assert resolve_sampler("Euler a", "Automatic", zero_terminal_snr=True) == ("euler_a", "simple")
    assert resolve_sampler("DDIM", zero_terminal_snr=True) == ("ddim", "simple")
    # a schedule the user names is kept
    assert resolve_sampler("DPM++ 2M Karras", zero_terminal_snr=True) == ("dpmpp_2m", "karras")
    assert resolve_sampler("Euler", "karras", zero_terminal_snr=True) == ("euler", "karras")
    assert a1111_names("euler", "simple", zero_terminal_snr=True) == ("Euler", "Simple")
    table = sd_schedule(zero_terminal_snr=True)
    trailing = sampler_sigmas("dpmpp_2m", "simple", 20, table)
    karras = sampler_sigmas("dpmpp_2m", "karras", 20, table)
    pinned = float(torch.tensor(2.0**24 - 1).sqrt())  # sqrt((1 - 2^-24) / 2^-24), correctly rounded
    assert trailing[0] == karras[0] == table.sigma_max == pinned  # both start at the zero-SNR step
    assert int((trailing > 15).sum()) == 3 and int((karras > 15).sum()) == 13  # SD's own max is 14.6


def test_spec_accepts_reports_keyword_options():
    assert SAMPLERS["ddim"].accepts("eta") and SAMPLERS["euler_a"].accepts("eta")
    assert SAMPLERS["euler"].accepts("s_churn") and not SAMPLERS["euler"].accepts("eta")
    assert SAMPLERS["unipc"].accepts("order") and SAMPLERS["dpmpp_2m_sde"].accepts("solver_type")
    assert all(spec.accepts("noise") and spec.accepts("callback") for spec in SAMPLERS.values())


def test_sampler_sigmas_discards_penultimate_for_dpm2():
    table = sd_schedule()
    longer = get_sigmas("karras", 11, table)
    assert torch.equal(sampler_sigmas("dpm2", "karras", 10, table), torch.cat([longer[:-2], longer[-1:]]))
    assert torch.equal(sampler_sigmas("euler", "karras", 10, table), get_sigmas("karras", 10, table))
    assert [k for k, s in SAMPLERS.items() if s.discard_penultimate] == ["dpm2", "dpm2_a", "dpmpp_3m_sde"]


# ------------------------------------------------------------------ denoisers


def test_cfg_scale_one_is_a_single_uncond_free_call():
    model, table = ToyUNet(), sd_schedule()
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0])
    cond = {"context": torch.randn(2, 3, 5)}
    out = CFGDenoiser(Denoiser(model, table), 1.0)(x, sigma, cond=cond, uncond=None)
    assert model.batches == [2]
    assert torch.equal(out, Denoiser(ToyUNet(), table)(x, sigma, **cond))


def test_cfg_batches_cond_and_uncond_in_one_call():
    model, table = ToyUNet(), sd_schedule()
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0])
    cond, uncond = {"context": torch.randn(2, 3, 5)}, {"context": torch.randn(2, 3, 5)}
    out = CFGDenoiser(Denoiser(model, table), 7.5)(x, sigma, cond=cond, uncond=uncond)
    assert model.batches == [4]
    plain = Denoiser(ToyUNet(), table)
    d_c, d_u = plain(x, sigma, **cond), plain(x, sigma, **uncond)
    assert torch.allclose(out, d_u + 7.5 * (d_c - d_u), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="needs an uncond"):
        CFGDenoiser(plain, 7.5)(x, sigma, cond=cond)
    with pytest.raises(ValueError, match="pad the shorter prompt"):
        CFGDenoiser(plain, 7.5)(x, sigma, cond=cond, uncond={"context": torch.randn(2, 6, 5)})
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(plain, 7.5)(x, sigma, cond=cond, uncond={})


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cfg_rescale_matches_diffusers_guidance_rescale(prediction):
    """diffusers rescales the guided model output (eps or v); so do we, via the denoised latent."""
    model, table = ToyUNet(), sd_schedule()
    x, sigma, scale, phi = torch.randn(2, 4, 8, 8) * 5, torch.tensor([5.0, 5.0]), 7.0, 0.7
    cond, uncond = {"context": torch.randn(2, 3, 5)}, {"context": torch.randn(2, 3, 5)}
    ours = CFGDenoiser(Denoiser(model, table, prediction), scale, rescale=phi)(
        x, sigma, cond=cond, uncond=uncond
    )

    t = table.sigma_to_t(sigma)
    x_in = x / (sigma**2 + 1).sqrt().reshape(-1, 1, 1, 1)
    out_c, out_u = model(x_in, t, **cond), model(x_in, t, **uncond)
    guided = rescale_noise_cfg(out_u + scale * (out_c - out_u), out_c, guidance_rescale=phi)
    s = sigma.reshape(-1, 1, 1, 1)
    ref = x - s * guided if prediction == "eps" else x / (s**2 + 1) - guided * s / (s**2 + 1).sqrt()
    assert rel(ours, ref) < 1e-5


def test_denoiser_concatenates_c_concat_unscaled():
    seen = {}

    def model(x_in, t, **cond):
        seen["x_in"], seen["cond"] = x_in, cond
        return torch.zeros_like(x_in[:, :4])

    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([2.0])
    extra = torch.randn(1, 5, 8, 8)
    out = Denoiser(model, sd_schedule())(x, sigma, c_concat=extra, context=torch.ones(1, 2, 3))
    assert seen["x_in"].shape == (1, 9, 8, 8)
    assert torch.allclose(seen["x_in"][:, :4], x / math.sqrt(5.0)) and torch.equal(seen["x_in"][:, 4:], extra)
    assert set(seen["cond"]) == {"context"}
    assert torch.equal(out, x)  # eps = 0 -> x0 = x
    with pytest.raises(ValueError, match="c_concat must match"):
        Denoiser(model, sd_schedule())(x, sigma, c_concat=torch.randn(1, 5, 4, 4))
    with pytest.raises(ValueError, match="valid: eps, v"):
        Denoiser(model, sd_schedule(), "x0")


def test_denoiser_rejects_wrong_output_shape():
    with pytest.raises(ValueError, match="one value per latent element"):
        Denoiser(lambda x, t: torch.zeros(1, 8, 8, 8), sd_schedule())(torch.randn(SHAPE), 1.0)


def test_hooked_denoiser_runs_pre_and_post():
    table = sd_schedule()
    init, mask = torch.randn(SHAPE), (torch.arange(8) < 4).float().reshape(1, 1, 1, 8)

    def keep_known(x, sigma, denoised):
        return init * mask + denoised * (1 - mask)

    hooked = HookedDenoiser(Denoiser(ToyUNet(), table), post=keep_known, pre=lambda x, s: x * 1.0)
    sigmas = get_sigmas("karras", 4, table)
    out = sample_euler(hooked, torch.randn(SHAPE) * sigmas[0], sigmas)
    assert torch.allclose(out * mask, init * mask, atol=1e-6)  # the last step lands on the blended x0
    assert hooked.prediction == "eps"


def test_gaussian_noise_matches_diffusers_randn_tensor():
    x = torch.zeros(3, 4, 8, 8)
    ours = gaussian_noise(x, [seeded(s) for s in (1, 2, 3)])(1.0, 0.5)
    theirs = randn_tensor((3, 4, 8, 8), generator=[seeded(s) for s in (1, 2, 3)], dtype=torch.float32)
    assert torch.equal(ours, theirs)
    assert torch.equal(
        gaussian_noise(x, seeded(1))(1.0, 0.5), randn_tensor((3, 4, 8, 8), generator=seeded(1))
    )
    with pytest.raises(ValueError, match="one per batch item"):
        gaussian_noise(x, [seeded(1)])
    with pytest.raises(TypeError, match="noise must be"):
        sample_euler_ancestral(Denoiser(ToyUNet(), sd_schedule()), x, torch.tensor([1.0, 0.0]), noise=3)
