"""Single-step samplers: each step uses only the current latent (one or two model calls).

Same contract as every sampler (see ``samplers``): ``sample_x(denoiser, x, sigmas, *, extra_args,
callback, noise, ...)`` walks the VE latent ``x`` (B, C, H, W) down ``sigmas`` (steps + 1,) and
returns it in float32. Step coefficients are computed from float64 scalars.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .sampler_base import Callback, NoiseSource, ancestral_step, denoise, prepare, report, resolve_noise
from .samplers_multistep import sample_dpmpp_2m_sde

__all__ = [
    "sample_ddim",
    "sample_dpm2",
    "sample_dpm2_ancestral",
    "sample_dpmpp_2m_sde_heun",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
]

DenoiserFn = Callable[..., Tensor]
_MAX_CHURN_GAMMA = 2**0.5 - 1


def _churn(
    x: Tensor,
    i: int,
    sig: list[float],
    noise: NoiseSource | torch.Generator | None,
    churn: tuple[float, float, float, float],
) -> tuple[Tensor, float]:
    """Karras et al. (2022) Algorithm 2 "churn": raise sigma to sigma_hat by adding fresh noise."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    gamma = min(s_churn / (len(sig) - 1), _MAX_CHURN_GAMMA) if s_tmin <= sig[i] <= s_tmax else 0.0
    sigma_hat = sig[i] * (gamma + 1)
    if gamma > 0:
        fresh = resolve_noise(noise, x)(sig[i], sigma_hat)
        x = x + fresh * s_noise * math.sqrt(sigma_hat**2 - sig[i] ** 2)
    return x, sigma_hat


@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Euler steps on the probability-flow ODE, Karras et al. 2022 Algorithm 2 (churn optional)."""
    x, sig = prepare(x, sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, i, sig, noise, (s_churn, s_tmin, s_tmax, s_noise))
        denoised = denoise(denoiser, x, sigma_hat, extra_args)
        report(callback, i, n, x, sig, denoised)
        x = x + (x - denoised) / sigma_hat * (sig[i + 1] - sigma_hat)
    return x


def _ancestral_euler_loop(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None,
    callback: Callback | None,
    noise: NoiseSource | torch.Generator | None,
    eta: float,
    s_noise: float,
) -> Tensor:
    x, sig = prepare(x, sigmas)
    noise_fn = resolve_noise(noise, x) if eta else None
    n = len(sig) - 1
    for i in range(n):
        denoised = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, n, x, sig, denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        x = x + (x - denoised) / sig[i] * (sigma_down - sig[i])
        if sigma_up > 0 and noise_fn is not None:
            x = x + noise_fn(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral sampling with Euler steps (k-diffusion's "Euler a"): step to sigma_down, add noise."""
    return _ancestral_euler_loop(denoiser, x, sigmas, extra_args, callback, noise, eta, s_noise)


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DDIM, Song et al. 2021, in sigma form: deterministic Euler for eta=0, ancestral noise for eta>0.

    In the VE latent x / sqrt(abar) the DDIM update is exactly an Euler step, and DDIM's eta
    noise is k-diffusion's ancestral sigma_up, so this is Euler-ancestral with eta defaulting to 0.
    """
    return _ancestral_euler_loop(denoiser, x, sigmas, extra_args, callback, noise, eta, s_noise)


@torch.no_grad()
def sample_heun(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's second-order method, Karras et al. 2022 Algorithm 2; the last step (to 0) is Euler."""
    x, sig = prepare(x, sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, i, sig, noise, (s_churn, s_tmin, s_tmax, s_noise))
        denoised = denoise(denoiser, x, sigma_hat, extra_args)
        report(callback, i, n, x, sig, denoised)
        d = (x - denoised) / sigma_hat
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(denoiser, x_2, sig[i + 1], extra_args)) / sig[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm2(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 style midpoint steps (Lu et al. 2022, as k-diffusion's sample_dpm_2); last step Euler."""
    x, sig = prepare(x, sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, i, sig, noise, (s_churn, s_tmin, s_tmax, s_noise))
        denoised = denoise(denoiser, x, sigma_hat, extra_args)
        report(callback, i, n, x, sig, denoised)
        d = (x - denoised) / sigma_hat
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sigma_hat)
        else:
            sigma_mid = math.sqrt(sigma_hat * sig[i + 1])  # geometric midpoint = midpoint in log-sigma
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = (x_2 - denoise(denoiser, x_2, sigma_mid, extra_args)) / sigma_mid
            x = x + d_2 * (sig[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm2_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 midpoint steps to sigma_down (k-diffusion's "DPM2 a")."""
    x, sig = prepare(x, sigmas)
    noise_fn = resolve_noise(noise, x) if eta else None
    n = len(sig) - 1
    for i in range(n):
        denoised = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, n, x, sig, denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        d = (x - denoised) / sig[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - sig[i])
            continue
        sigma_mid = math.sqrt(sig[i] * sigma_down)
        x_2 = x + d * (sigma_mid - sig[i])
        d_2 = (x_2 - denoise(denoiser, x_2, sigma_mid, extra_args)) / sigma_mid
        x = x + d_2 * (sigma_down - sig[i])
        if sigma_up > 0 and noise_fn is not None:
            x = x + noise_fn(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps, Lu et al. 2022 (k-diffusion)."""
    x, sig = prepare(x, sigmas)
    noise_fn = resolve_noise(noise, x) if eta else None
    n = len(sig) - 1
    for i in range(n):
        denoised = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, n, x, sig, denoised)
        sigma_down, sigma_up = ancestral_step(sig[i], sig[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sigma_down)
            sigma_mid = math.sqrt(sig[i] * sigma_down)  # lambda + h / 2
            x_2 = (sigma_mid / sig[i]) * x - math.expm1(-h / 2) * denoised
            denoised_2 = denoise(denoiser, x_2, sigma_mid, extra_args)
            x = (sigma_down / sig[i]) * x - math.expm1(-h) * denoised_2
        if sigma_up > 0 and noise_fn is not None:
            x = x + noise_fn(sig[i], sig[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ (stochastic), Lu et al. 2022 / k-diffusion: two ancestral half-steps per step.

    The two draws of a step cover (sigma, sigma_mid) and (sigma, sigma_next); A1111 feeds them from
    one Brownian tree (``brownian_tree_noise``) so they are correlated, i.i.d. normals also work.
    """
    if not 0.0 < r < 1.0:
        raise ValueError(f"r (the intermediate point in log-sigma) must be in (0, 1), got {r}")
    x, sig = prepare(x, sigmas)
    noise_fn = resolve_noise(noise, x) if eta else None
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(denoiser, x, s, extra_args)
        report(callback, i, n, x, sig, denoised)
        if s_next == 0:
            x = denoised
            continue
        # Brownian increments move by ~sqrt(dt) when a query time moves by dt, so the noise levels
        # of this step are computed as k-diffusion does (float32 via lambda = -log sigma): then a
        # Brownian noise source sees bit-identical query times and replays A1111/diffusers exactly.
        lam = -torch.tensor([s, s_next], dtype=torch.float32).log()  # (2,)
        lam_mid = lam[0] + (lam[1] - lam[0]) * r
        s, s_next, sigma_mid = (float(v) for v in torch.stack([lam[0], lam[1], lam_mid]).neg().exp())
        sd, su = ancestral_step(s, sigma_mid, eta)
        x_2 = (sd / s) * x - (sd / s - 1) * denoised
        if su > 0 and noise_fn is not None:
            x_2 = x_2 + noise_fn(s, sigma_mid) * s_noise * su
        denoised_2 = denoise(denoiser, x_2, sigma_mid, extra_args)
        sd, su = ancestral_step(s, s_next, eta)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / s) * x - (sd / s - 1) * denoised_d
        if su > 0 and noise_fn is not None:
            x = x + noise_fn(s, s_next) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE with the Heun-type second-order term (A1111's "DPM++ 2M SDE Heun")."""
    return sample_dpmpp_2m_sde(
        denoiser,
        x,
        sigmas,
        extra_args=extra_args,
        callback=callback,
        noise=noise,
        eta=eta,
        s_noise=s_noise,
        solver_type="heun",
    )


@torch.no_grad()
def sample_lcm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
) -> Tensor:
    """Latent Consistency Model multistep sampling, Luo et al. 2023: denoise, then re-noise to sigma_next.

    diffusers' LCMScheduler also applies consistency boundary scalings, c_skip = 0.25 / (100 t^2 + 0.25)
    (7e-6 at t = 19, 4e-8 at t = 259); like ComfyUI we leave them out.
    """
    x, sig = prepare(x, sigmas)
    noise_fn = resolve_noise(noise, x)
    n = len(sig) - 1
    for i in range(n):
        denoised = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, n, x, sig, denoised)
        x = denoised
        if sig[i + 1] > 0:
            x = x + noise_fn(sig[i], sig[i + 1]) * sig[i + 1]
    return x
