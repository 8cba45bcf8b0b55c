"""Training objectives: the AutoencoderKL (reconstruction + KL) and the latent denoiser (eps MSE, DDPM)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

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


class LatentDiffusionObjective:
    """eps-prediction MSE at uniformly drawn DDPM timesteps, with caption dropout for classifier-free guidance."""

    def __init__(
        self,
        vae: AutoencoderKL,
        tokenizer: CLIPTokenizer,
        sample: SampleFn,
        *,
        batch_size: int,
        scaling_factor: float,
        caption_dropout: float = 0.1,
    ):
        self.vae = vae.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.sample = sample
        self.batch_size = batch_size
        self.scaling_factor = scaling_factor
        self.caption_dropout = caption_dropout
        self.alphas_cumprod = sd_alphas_cumprod()  # (1000,)

    def captions(self, captions: Sequence[str]) -> list[str]:
        """Replace each caption by "" with probability caption_dropout (python RNG: checkpointed)."""
        return ["" if random.random() < self.caption_dropout else c for c in captions]

    def __call__(self, model: TextToLatent, step: int) -> torch.Tensor:
        x, captions = image_batch(self.sample, self.batch_size, step)
        with torch.no_grad():
            z = self.vae.encode(x).sample().float() * self.scaling_factor  # (B, C, h, w)
        ids = self.tokenizer(self.captions(captions), pad_token_id=model.text_encoder.cfg.pad_token_id)
        context = model.text_encoder(ids).hidden  # (B, 77, W)
        t = torch.randint(0, len(self.alphas_cumprod), (z.shape[0],))
        a = self.alphas_cumprod[t].float()[:, None, None, None]
        noise = torch.randn_like(z)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        pred = model.unet(x_t, t.float(), context).float()
        return F.mse_loss(pred, noise)


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, sample: SampleFn, n: int = 256, batch: int = 64) -> float:
    """1 / std of the posterior-mean latents, as SD's 0.18215 was chosen, rounded to 5 decimals."""
    zs = []
    for start in range(0, n, batch):
        x, _ = image_batch(sample, batch, start // batch)
        zs.append(vae.encode(x).mean.float())
    return round(1.0 / torch.cat(zs).std().item(), 5)
