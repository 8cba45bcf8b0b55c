"""Denoisers: turn a noise-predicting U-Net into D(x, sigma) -> x0, plus classifier-free guidance.

Every sampler only needs a callable ``D(x, sigma, **extra_args) -> x0`` where ``x`` is the VE
latent (B, C, H, W) at noise level ``sigma`` (B,) and the result is the denoised latent, float32.

Conditioning interface (a plain dict of tensors, batch-first, passed through as keyword args):

* ``context``: (B, T, D) cross-attention states (text embeddings);
* ``y``: (B, adm) class/size vector (SDXL's pooled text + size ids);
* ``c_concat``: (B, C', H, W) extra input channels (inpainting: mask + masked-image latent),
  concatenated by ``Denoiser`` after the input scaling, unscaled, as LDM does;
* anything else is handed to the model untouched.

``Denoiser(model, schedule)`` takes such a dict directly: ``D(x, sigma, context=c)``.
``CFGDenoiser`` takes it twice: ``D(x, sigma, cond={...}, uncond={...})``, so a sampler's
``extra_args`` is ``{"cond": cond, "uncond": uncond}``. Per-step hooks (e.g. blending the known
region of an inpainting latent) wrap any denoiser with ``HookedDenoiser``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .schedules import DiscreteSchedule

__all__ = [
    "CFGDenoiser",
    "Denoiser",
    "HookedDenoiser",
    "PREDICTIONS",
    "denoised_to_output",
    "output_to_denoised",
]

PREDICTIONS = ("eps", "v")

DenoiserFn = Callable[..., Tensor]  # D(x (B,C,H,W), sigma (B,), **extra_args) -> x0 (B,C,H,W)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def _per_sample(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as a (B,) float32 tensor on x's device (a scalar is broadcast over the batch)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(
            f"sigma must be a scalar or shape ({x.shape[0]},) for a batch of {x.shape[0]}, "
            f"got {tuple(sigma.shape)}"
        )
    return sigma


def _dims(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def output_to_denoised(x: Tensor, sigma: Tensor, output: Tensor, prediction: str) -> Tensor:
    """x0 from a model output (eps or v) at VE latent x (Karras et al. 2022 preconditioning)."""
    _check_prediction(prediction)
    s = _dims(_per_sample(sigma, x), x)  # (B,1,1,1)
    if prediction == "eps":
        return x - s * output
    return x / (s**2 + 1) - output * s / (s**2 + 1) ** 0.5


def denoised_to_output(x: Tensor, sigma: Tensor, denoised: Tensor, prediction: str) -> Tensor:
    """The model output (eps or v) that yields ``denoised``; inverse of ``output_to_denoised``."""
    _check_prediction(prediction)
    s = _dims(_per_sample(sigma, x), x)  # (B,1,1,1)
    if prediction == "eps":
        return (x - denoised) / s
    return (x / (s**2 + 1) - denoised) * (s**2 + 1) ** 0.5 / s


class Denoiser:
    """D(x, sigma) for a discrete eps- or v-prediction model (k-diffusion's DiscreteEps/VDDPMDenoiser).

    ``model(x_in, t, **cond)`` sees x_in = x / sqrt(sigma^2 + 1) (the VP latent, with ``c_concat``
    appended on channels) and t = ``schedule.sigma_to_t(sigma)``, float32 (B,). ``quantize`` rounds
    t to the nearest training timestep. ``model_dtype`` casts the model input (e.g. float16);
    the result is always returned in x's dtype.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: DiscreteSchedule,
        prediction: str = "eps",
        *,
        quantize: bool = False,
        model_dtype: torch.dtype | None = None,
    ) -> None:
        _check_prediction(prediction)
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.quantize = quantize
        self.model_dtype = model_dtype

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        sigma = _per_sample(sigma, x)  # (B,)
        c_in = _dims((sigma**2 + 1) ** -0.5, x)  # (B,1,1,1)
        x_in = x * c_in  # (B, C, H, W)
        c_concat = cond.pop("c_concat", None)
        if c_concat is not None:
            if c_concat.shape[0] != x.shape[0] or c_concat.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"c_concat must match the latent's batch and spatial size {tuple(x.shape)}, "
                    f"got {tuple(c_concat.shape)}"
                )
            x_in = torch.cat([x_in, c_concat.to(x_in)], dim=1)  # (B, C + C', H, W)
        if self.model_dtype is not None:
            x_in = x_in.to(self.model_dtype)
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize).to(x.device)  # (B,)
        out = self.model(x_in, t, **cond)
        if out.shape != x.shape:
            raise ValueError(
                f"model returned shape {tuple(out.shape)} for a latent of shape {tuple(x.shape)}; "
                "it must predict one value per latent element (eps or v)"
            )
        return output_to_denoised(x, sigma, out.to(x.dtype), self.prediction)


def _batch_conds(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    """Concatenate uncond and cond along the batch: [uncond, cond] for every tensor entry."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must carry the same keys, got {sorted(cond)} and {sorted(uncond)}")
    batched: dict[str, Any] = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, Tensor) and isinstance(u, Tensor):
            if c.shape[1:] != u.shape[1:]:
                raise ValueError(
                    f"cond[{key!r}] has shape {tuple(c.shape)} but uncond[{key!r}] has {tuple(u.shape)}; "
                    "they are batched into one call, so all but the batch size must match "
                    "(pad the shorter prompt embedding to the same token count)"
                )
            batched[key] = torch.cat([u, c])
        elif c is u or c == u:
            batched[key] = c
        else:
            raise ValueError(
                f"cond[{key!r}] and uncond[{key!r}] differ and are not tensors; cannot batch them"
            )
    return batched


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022), cond and uncond in one batched model call.

    D = D_u + scale * (D_c - D_u); at ``scale == 1`` the uncond pass is skipped entirely. ``rescale``
    is phi of CFG rescale (Lin et al. 2023), applied like diffusers' ``guidance_rescale`` in the
    model-output space (``prediction``: "v" for v-models, "eps" otherwise; default: the wrapped
    denoiser's ``prediction`` attribute).
    """

    def __init__(
        self, denoiser: DenoiserFn, scale: float, rescale: float = 0.0, *, prediction: str | None = None
    ) -> None:
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"CFG rescale (phi) must be within [0, 1], got {rescale}")
        if prediction is None:
            prediction = getattr(denoiser, "prediction", "eps")
        _check_prediction(prediction)
        self.denoiser = denoiser
        self.scale = float(scale)
        self.rescale = float(rescale)
        self.prediction = prediction

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor | float,
        *,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any] | None = None,
    ) -> Tensor:
        sigma = _per_sample(sigma, x)  # (B,)
        if self.scale == 1.0:
            return self.denoiser(x, sigma, **cond)
        if uncond is None:
            raise ValueError(
                f"CFG scale {self.scale} needs an uncond (negative prompt) conditioning; "
                "pass uncond=... or use scale 1.0"
            )
        x_in = torch.cat([x, x])  # (2B, C, H, W)
        out = self.denoiser(x_in, torch.cat([sigma, sigma]), **_batch_conds(cond, uncond))
        d_uncond, d_cond = out.chunk(2)  # (B, C, H, W) each
        guided = d_uncond + self.scale * (d_cond - d_uncond)
        if self.rescale == 0.0:
            return guided
        return self._rescale(x, sigma, guided, d_cond)

    def _rescale(self, x: Tensor, sigma: Tensor, guided: Tensor, d_cond: Tensor) -> Tensor:
        """Match the guided output's std to the cond output's std, blended by phi (Lin et al. 2023)."""
        out_guided = denoised_to_output(x, sigma, guided, self.prediction)
        out_cond = denoised_to_output(x, sigma, d_cond, self.prediction)
        dims = list(range(1, x.ndim))
        ratio = out_cond.std(dim=dims, keepdim=True) / out_guided.std(dim=dims, keepdim=True)
        mixed = self.rescale * out_guided * ratio + (1.0 - self.rescale) * out_guided
        return output_to_denoised(x, sigma, mixed, self.prediction)


class HookedDenoiser:
    """A denoiser with per-step hooks: ``pre(x, sigma) -> x`` before, ``post(x, sigma, x0) -> x0`` after.

    E.g. inpainting keeps the known region by blending the denoised latent with the init latent
    in ``post`` (A1111's k-diffusion behaviour).
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        *,
        pre: Callable[[Tensor, Tensor], Tensor] | None = None,
        post: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.pre = pre
        self.post = post
        self.prediction = getattr(denoiser, "prediction", "eps")

    def __call__(self, x: Tensor, sigma: Tensor | float, **extra_args: Any) -> Tensor:
        sigma = _per_sample(sigma, x)
        if self.pre is not None:
            x = self.pre(x, sigma)
        denoised = self.denoiser(x, sigma, **extra_args)
        if self.post is not None:
            denoised = self.post(x, sigma, denoised)
        return denoised
