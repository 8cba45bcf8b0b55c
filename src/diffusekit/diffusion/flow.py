"""Rectified-flow sampling for SD3/SD3.5 (Esser et al., 2024): shifted sigma schedules, the velocity
denoiser, guidance (CFG and skip-layer guidance) and a flow-native DPM-Solver++(2M).

A flow model sees x_sigma = (1 - sigma) * x0 + sigma * noise, sigma in [0, 1], and predicts the velocity
v = noise - x0 at timestep t = 1000 * sigma. Its denoised estimate is D = x - sigma * v. Because
(x - D) / sigma = v = dx/dsigma, the probability-flow ODE has the same form as in the VE case, so the
k-diffusion ODE samplers (Euler, Heun, LMS) walk a flow schedule unchanged; Euler is exactly the
reference ``x + (sigma_next - sigma) * v`` step. DPM++ needs its own form (``sample_flow_dpmpp_2m``):
the VE one integrates in -log(sigma), the flow one in log((1 - sigma) / sigma).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .sampler_base import Callback, NoiseSource, denoise, prepare, report
from .samplers_multistep import sample_lms
from .samplers_singlestep import sample_euler, sample_heun

FLOW_TIMESTEPS = 1000  # t = sigma * 1000, the training timestep scale of SD3


def time_shift(sigma: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift of the noise level: shift * s / (1 + (shift - 1) * s)."""
    if shift <= 0:
        raise ValueError(f"flow shift must be positive, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(steps: int, shift: float = 3.0, *, denoise_strength: float = 1.0) -> Tensor:
    """(steps + 1,) float32 schedule: timesteps evenly spaced from 1000 down to the shifted smallest training
    level, each shifted, then 0 (Stability's ``ModelSamplingDiscreteFlow`` = diffusers'
    ``FlowMatchEulerDiscreteScheduler.set_timesteps``). denoise_strength < 1 keeps the schedule's tail
    (img2img).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < denoise_strength <= 1.0:
        raise ValueError(f"denoising strength must be within (0, 1], got {denoise_strength}")
    total = steps if denoise_strength == 1.0 else max(1, int(steps / denoise_strength))
    sigma_min = float(time_shift(torch.tensor(1.0 / FLOW_TIMESTEPS, dtype=torch.float64), shift))
    t = torch.linspace(1.0, sigma_min, total, dtype=torch.float64)  # unshifted timesteps / 1000
    sigmas = time_shift(t, shift)
    sigmas = torch.cat([sigmas[total - steps :], sigmas.new_zeros(1)])
    return sigmas.to(torch.float32)


def flow_noise(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """The flow latent at noise level sigma: (1 - sigma) * x0 + sigma * noise (img2img start)."""
    return (1 - sigma) * x0 + sigma * noise


class FlowDenoiser:
    """D(x, sigma) = x - sigma * v for a velocity model ``model(x, t, **cond)`` with t = 1000 * sigma.

    ``model_dtype`` casts the model input (e.g. bfloat16); the result is in x's dtype.
    """

    def __init__(self, model: Callable[..., Tensor], *, model_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.model_dtype = model_dtype

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])  # (B,)
        x_in = x if self.model_dtype is None else x.to(self.model_dtype)
        v = self.model(x_in, sigma * FLOW_TIMESTEPS, **cond)
        if v.shape != x.shape:
            raise ValueError(f"model returned shape {tuple(v.shape)} for a latent of shape {tuple(x.shape)}")
        return x - sigma.view(-1, *([1] * (x.ndim - 1))) * v.to(x.dtype)


class SkipLayerGuidance:
    """CFG plus skip-layer guidance (SD3.5 Medium): D_u + cfg (D_c - D_u) + slg (D_c - D_c,skip) where
    D_c,skip is the conditional pass with ``layers`` of the MMDiT bypassed, on the steps i with
    start * n < i < end * n of the given schedule (Stability's ``SkipLayerCFGDenoiser``).

    The wrapped denoiser must accept ``skip_layers`` among its conditioning and pass it to the model.
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        scale: float,
        sigmas: Tensor,
        *,
        slg_scale: float = 2.5,
        layers: tuple[int, ...] = (7, 8, 9),
        start: float = 0.01,
        end: float = 0.3,
    ) -> None:
        self.denoiser = denoiser
        self.scale = float(scale)
        self.slg_scale = float(slg_scale)
        self.layers = tuple(layers)
        self.sigmas = [float(s) for s in sigmas]
        self.start, self.end = start, end

    def _active(self, sigma: float) -> bool:
        n = len(self.sigmas) - 1
        i = min(range(n), key=lambda j: abs(self.sigmas[j] - sigma))
        return self.slg_scale > 0 and self.start * n < i < self.end * n

    def __call__(self, x: Tensor, sigma: Tensor | float, *, cond: dict, uncond: dict | None = None) -> Tensor:
        if uncond is None:
            raise ValueError("skip-layer guidance needs an uncond (negative prompt) conditioning")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        d_u, d_c = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        out = d_u + self.scale * (d_c - d_u)
        if self._active(float(sigma[0])):
            d_skip = self.denoiser(x, sigma, **cond, skip_layers=self.layers)
            out = out + self.slg_scale * (d_c - d_skip)
        return out


@torch.no_grad()
def sample_flow_dpmpp_2m(
    denoiser: Callable[..., Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) for x = alpha x0 + sigma noise with alpha = 1 - sigma, in
    lambda = log(alpha / sigma); first order on the first step (lambda = -inf at sigma = 1) and the last."""
    x, sig = prepare(x, sigmas)
    if sig[0] > 1.0:
        raise ValueError(f"flow sigmas must lie within [0, 1], got {sig[0]}")
    n = len(sig) - 1

    def lam(s: float) -> float:
        return -math.inf if s >= 1.0 else math.log((1 - s) / s)

    old_denoised: Tensor | None = None
    h_last = math.inf
    for i in range(n):
        denoised = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, n, x, sig, denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = lam(sig[i + 1]) - lam(sig[i])
            d = denoised
            if old_denoised is not None and math.isfinite(h_last) and math.isfinite(h):
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            alpha_next = 1 - sig[i + 1]
            x = (sig[i + 1] / sig[i]) * x - alpha_next * math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
    return x


# Samplers valid on a flow schedule, by id (the ids of the U-Net samplers registry where they coincide).
FLOW_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "lms": sample_lms,
    "dpmpp_2m": sample_flow_dpmpp_2m,
}


def flow_sampler(name: str) -> Callable[..., Tensor]:
    """The flow sampler with id or A1111 label ``name``; a clear error listing the valid ones."""
    key = name.strip().lower().replace("++", "pp").replace(" ", "_")
    if key not in FLOW_SAMPLERS:
        raise ValueError(
            f"sampler {name!r} is not available for SD3 flow models; valid: {', '.join(FLOW_SAMPLERS)}"
        )
    return FLOW_SAMPLERS[key]
