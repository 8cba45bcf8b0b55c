"""Training objectives: the AutoencoderKL (reconstruction + KL) and the latent denoiser (eps MSE, DDPM)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..diffusion.schedules import sd_alphas_cumprod
from ..images import to_tensor
from ..models.tokenizer import CLIPTokenizer
from ..models.vae import AutoencoderKL

SampleFn = Callable[[int], tuple[Image.Image, str]]  # dataset index -> (image, caption)


def image_batch(sample: SampleFn, batch_size: int, step: int) -> tuple[torch.Tensor, list[str]]:
    """Images (B, 3, H, W) in [-1, 1] and captions of step `step` (indices step*B ... step*B+B-1)."""
    items = [sample(step * batch_size + j) for j in range(batch_size)]
    return torch.cat([to_tensor(img) for img, _ in items]), [c for _, c in items]


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """L1 + L2 reconstruction of a posterior sample plus a small KL to N(0, I) (LDM's KL-f autoencoder)."""
    post = vae.encode(x)
    recon = vae.decode(post.sample()).float()  # (B, 3, H, W)
    rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
    mean, logvar = post.mean.float(), post.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return rec + kl_weight * kl


class TextToLatent(nn.Module):
    """The jointly trained pair: U-Net and text encoder (one module, so one optimizer and one EMA)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder


@dataclass
class LatentPool:
    """Captioned posterior moments of a fixed set of training images, encoded once by the frozen VAE.

    Encoding is most of a step's cost at this model size, so stage 2 cycles over a pool instead of
    re-encoding every batch; a fresh posterior sample is still drawn per use.
    """

    moments: torch.Tensor  # (N, 2C, h, w) mean and logvar, float32
    captions: list[str]

    @classmethod
    @torch.no_grad()
    def encode(cls, vae: AutoencoderKL, sample: SampleFn, n: int, batch: int = 64) -> LatentPool:
        moments, captions = [], []
        for start in range(0, n, batch):
            items = [sample(i) for i in range(start, min(n, start + batch))]
            x = torch.cat([to_tensor(img) for img, _ in items])
            moments.append(vae.encode_moments(x).float())
            captions += [c for _, c in items]
        return cls(torch.cat(moments), captions)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        """Posterior samples (B, C, h, w) and captions of training step `step` (cycling over the pool)."""
        idx = [(step * batch_size + j) % len(self.captions) for j in range(batch_size)]
        mean, logvar = self.moments[idx].chunk(2, dim=1)
        z = mean + (0.5 * logvar.clamp(-30, 20)).exp() * torch.randn_like(mean)
        return z, [self.captions[i] for i in idx]


class LatentDiffusionObjective:
    """eps-prediction MSE at uniform DDPM timesteps, with caption dropout for classifier-free guidance.

    `min_snr_gamma` weights each sample's loss by min(SNR(t), gamma) / SNR(t) (Hang et al. 2023,
    "Efficient Diffusion Training via Min-SNR Weighting"): the nearly clean timesteps, whose easy eps
    targets otherwise dominate the gradient, count less. None: the plain unweighted MSE.
    """

    def __init__(
        self,
        pool: LatentPool,
        tokenizer: CLIPTokenizer,
        *,
        batch_size: int,
        scaling_factor: float,
        caption_dropout: float = 0.1,
        min_snr_gamma: float | None = None,
    ):
        self.pool = pool
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.scaling_factor = scaling_factor
        self.caption_dropout = caption_dropout
        self.min_snr_gamma = min_snr_gamma
        self.alphas_cumprod = sd_alphas_cumprod()  # (1000,)

    def captions(self, captions: Sequence[str]) -> list[str]:
        """Replace each caption by "" with probability caption_dropout (python RNG: checkpointed)."""
        return ["" if random.random() < self.caption_dropout else c for c in captions]

    def __call__(self, model: TextToLatent, step: int) -> torch.Tensor:
        z, captions = self.pool.batch(step, self.batch_size)
        z = z * self.scaling_factor  # (B, C, h, w)
        ids = self.tokenizer(self.captions(captions), pad_token_id=model.text_encoder.cfg.pad_token_id)
        context = model.text_encoder(ids, return_pooled=False).hidden  # (B, 77, W)
        t = torch.randint(0, len(self.alphas_cumprod), (z.shape[0],))
        a = self.alphas_cumprod[t].float()[:, None, None, None]
        noise = torch.randn_like(z)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        pred = model.unet(x_t, t.float(), context).float()
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if self.min_snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(a.flatten(), self.min_snr_gamma)
        return per_sample.mean()


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample for eps-prediction, SNR = alpha_bar / (1 - alpha_bar): 1 for the
    noisy timesteps (SNR <= gamma), gamma / SNR below that noise level."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


def latent_scale(pool: LatentPool) -> float:
    """1 / std of the posterior-mean latents, as SD's 0.18215 was chosen, rounded to 5 decimals."""
    mean = pool.moments.chunk(2, dim=1)[0]
    return round(1.0 / mean.std().item(), 5)
