"""What every sampler shares: noise sources, the per-step callback record, and small step helpers.

A *noise source* is ``noise(sigma, sigma_next) -> Tensor``: a standard-normal tensor shaped like
the latent, for the step from ``sigma`` to ``sigma_next`` (Python floats). Samplers draw all their
randomness from it, in a fixed order, so a test can replay exactly the draws another
implementation makes. ``gaussian_noise`` draws i.i.d. normals from torch generators (one, or one
per batch item as diffusers does for a list of generators); ``brownian_tree_noise`` returns
increments of one Brownian path (k-diffusion's BrownianTreeNoiseSampler, needs ``torchsde``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Callback",
    "NoiseSource",
    "StepInfo",
    "ancestral_step",
    "brownian_tree_noise",
    "gaussian_noise",
]

NoiseSource = Callable[[float, float], Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after each model evaluation of step ``index`` (of ``total``)."""

    index: int
    total: int
    x: Tensor  # (B, C, H, W) the latent at ``sigma``, before this step's update
    sigma: float
    sigma_next: float
    denoised: Tensor  # (B, C, H, W) the model's x0 estimate at ``sigma``


Callback = Callable[[StepInfo], None]


def gaussian_noise(
    like: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
) -> NoiseSource:
    """i.i.d. standard normals shaped like ``like`` from ``generator`` (None: torch's global RNG).

    With a list of generators, item b of the batch is drawn from generator b (as diffusers'
    ``randn_tensor`` does), so each image's noise is independent of the batch size. Draws happen
    on the generator's device and are moved to ``like``'s device, in float32.
    """
    shape, device = tuple(like.shape), like.device
    if isinstance(generator, Sequence):
        gens = list(generator)
        if len(gens) != shape[0]:
            raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}; pass one per batch item")

        def draw_each(sigma: float, sigma_next: float) -> Tensor:
            parts = [
                torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in gens
            ]
            return torch.cat([p.to(device) for p in parts])

        return draw_each

    def draw(sigma: float, sigma_next: float) -> Tensor:
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)

    return draw


def brownian_tree_noise(
    like: Tensor, sigma_min: float, sigma_max: float, seed: int | Sequence[int]
) -> NoiseSource:
    """Normalized increments of one Brownian path over [sigma_min, sigma_max] (k-diffusion's sampler).

    Noise for a sub-interval is correlated with noise for any interval containing it, which is what
    the SDE samplers expect (A1111 and ComfyUI use it for DPM++ SDE / 2M SDE / 3M SDE). A list of
    seeds gives one tree per batch item. Requires the optional ``torchsde`` package.
    """
    try:
        import torchsde
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "brownian_tree_noise needs the optional 'torchsde' package (pip install torchsde); "
            "gaussian_noise works without it"
        ) from err
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    seeds = [seed] if isinstance(seed, int) else list(seed)
    batched = not isinstance(seed, int)
    if batched and len(seeds) != like.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {like.shape[0]}; pass one per batch item")
    w0 = torch.zeros_like(like, dtype=torch.float32)
    w0 = w0[0] if batched else w0
    trees = [torchsde.BrownianTree(float(sigma_min), w0, float(sigma_max), entropy=s) for s in seeds]

    def draw(sigma: float, sigma_next: float) -> Tensor:
        lo, hi = min(sigma, sigma_next), max(sigma, sigma_next)
        sign = 1.0 if sigma_next >= sigma else -1.0  # increments follow the direction of travel
        w = torch.stack([tree(lo, hi) for tree in trees]) if batched else trees[0](lo, hi)
        scale = (
            torch.tensor(hi, dtype=torch.float32) - torch.tensor(lo, dtype=torch.float32)
        ).sqrt()  # as k-diffusion
        return (w * sign / scale).to(like.device)

    return draw


def resolve_noise(noise: NoiseSource | torch.Generator | None, like: Tensor) -> NoiseSource:
    """A noise source from a source, a generator, or None (torch's global RNG)."""
    if noise is None or isinstance(noise, torch.Generator):
        return gaussian_noise(like, noise)
    if not callable(noise):
        raise TypeError(
            f"noise must be a callable noise(sigma, sigma_next), a torch.Generator or None, "
            f"got {type(noise).__name__}"
        )
    return noise


def prepare(x: Tensor, sigmas: Tensor) -> tuple[Tensor, list[float]]:
    """Validate a schedule; return x as float32 and the sigmas as Python floats (step math in float64)."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must be a 1-D schedule with at least 2 entries, got shape {tuple(sigmas.shape)}"
        )
    sig = [float(s) for s in sigmas.detach().to("cpu", torch.float64)]
    if any(not math.isfinite(s) or s < 0 for s in sig) or any(s == 0 for s in sig[:-1]):
        raise ValueError(f"sigmas must be finite and positive (only the last may be 0), got {sig}")
    if any(b >= a for a, b in zip(sig, sig[1:], strict=False)):
        raise ValueError(f"sigmas must be strictly decreasing, got {sig}")
    return x.to(torch.float32), sig


def denoise(denoiser: Callable[..., Tensor], x: Tensor, sigma: float, extra_args: dict | None) -> Tensor:
    """Evaluate D at one noise level for the whole batch, in float32."""
    sigma_in = x.new_full((x.shape[0],), sigma)  # (B,)
    return denoiser(x, sigma_in, **(extra_args or {})).to(torch.float32)


def report(
    callback: Callback | None, i: int, total: int, x: Tensor, sig: list[float], denoised: Tensor
) -> None:
    if callback is not None:
        callback(StepInfo(index=i, total=total, x=x, sigma=sig[i], sigma_next=sig[i + 1], denoised=denoised))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion); eta=1 is DDPM, eta=0 is deterministic.

    The deterministic part goes to sigma_down, then fresh noise of std sigma_up lands at sigma_next.
    For DDIM this sigma_up equals eta * sigma_ddim / sqrt(abar_next) (Song et al. 2021).
    """
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up
