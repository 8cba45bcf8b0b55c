"""Training objectives: the AutoencoderKL (reconstruction + KL) and the latent denoiser (eps/v MSE, DDPM)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data.shapes import KINDS, has_near_color_pair, parse_caption
from ..diffusion.schedules import sd_alphas_cumprod
from ..images import to_tensor
from ..models.configs import PREDICTIONS
from ..models.tokenizer import CLIPTokenizer
from ..models.vae import AutoencoderKL
from ..prompts import after_first_eos
from .contrast import Contrast, contrast_captions, contrast_loss

SampleFn = Callable[[int], tuple[Image.Image, str]]  # dataset index -> (image, caption)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's parameters are (training keeps each module on one device)."""
    return next(module.parameters()).device


def image_batch(sample: SampleFn, batch_size: int, step: int) -> tuple[torch.Tensor, list[str]]:
    """Images (B, 3, H, W) in [-1, 1] and captions of step `step` (indices step*B ... step*B+B-1)."""
    items = [sample(step * batch_size + j) for j in range(batch_size)]
    return torch.cat([to_tensor(img) for img, _ in items]), [c for _, c in items]


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """L1 + L2 reconstruction of a posterior sample plus a small KL to N(0, I) (LDM's KL-f autoencoder)."""
    x = x.to(module_device(vae))
    post = vae.encode(x)
    recon = vae.decode(post.sample(torch.default_generator)).float()  # (B, 3, H, W); noise from the CPU RNG
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
            x = torch.cat([to_tensor(img) for img, _ in items]).to(module_device(vae))
            moments.append(vae.encode_moments(x).float().cpu())
            captions += [c for _, c in items]
        return cls(torch.cat(moments), captions)

    def batch(
        self, step: int, batch_size: int, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Posterior samples (B, C, h, w) and captions of training step `step`: cycling over the pool, or
        drawn with replacement in proportion to `weights` (N,) from torch's RNG (a checkpoint holds it)."""
        if weights is None:
            idx = [(step * batch_size + j) % len(self.captions) for j in range(batch_size)]
        else:
            idx = torch.multinomial(weights, batch_size, replacement=True).tolist()
        mean, logvar = self.moments[idx].chunk(2, dim=1)
        z = mean + (0.5 * logvar.clamp(-30, 20)).exp() * torch.randn_like(mean)
        return z, [self.captions[i] for i in idx]


@dataclass(frozen=True)
class Objective:
    """How the U-Net is trained; checked on construction, so a bad recipe fails before any training.

    `prediction` "eps" regresses the noise; "v" regresses v = sqrt(abar) eps - sqrt(1 - abar) x0
    (Salimans & Ho 2022), which stays well defined at zero SNR, so `zero_terminal_snr` (Lin et al. 2023)
    needs it. `min_snr_gamma` caps the weight of the nearly clean timesteps, whose easy targets
    otherwise dominate the gradient (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting"); see `min_snr_weights`. None: the plain unweighted MSE.

    `timestep_shift` s draws t = T * s u / (1 + (s - 1) u) for uniform u instead of a uniform t: s = 1 is
    DDPM's uniform draw, s = 3 trains the noisiest fifth of the schedule (where the layout is decided,
    from the text alone at zero SNR) about twice as often (SD3's resolution shift, Esser et al. 2024).
    `weight_floor` changes the weighting to an x0 weight of min(SNR, gamma) + floor (`min_snr_weights`).
    `kind_weights` ((caption kind, factor), ...) draws the pool's images of those kinds (data.KINDS:
    "relation", "list", ...) that many times as often as the pool holds them; kinds not named keep 1.
    (Relations 2x in the default model's stage 2b left its relation score where it was: docs,
    how-it-was-made.)
    `near_color_weight` draws the images whose caption has two groups of different shapes in colors at
    most one ring step apart (`data.has_near_color_pair`: "a red circle and an orange star", about 18% of
    the training data) that many times as often; it multiplies `kind_weights`. Such pairs are what the
    default model draws as one shape twice (docs: how-it-was-made).
    `contrast` adds the binding contrast (`train.contrast`): at high noise, a caption with its relation
    reversed, its position mirrored or its colors exchanged must predict worse than the true one.
    `pad_dropout` p gives a captioned row, with probability p, the empty caption's hidden states at the
    positions after its EOS. A causal CLIP encoder's padding states summarize the whole caption, and a
    jointly trained U-Net reads the prompt mostly there; dropping them makes it read the word positions.
    (Tried on the default model, docs: how-it-was-made: it did not help two objects; off there.)
    Inference is unchanged: every tool feeds the prompt's own padding, which the model still sees in
    the other rows.
    """

    prediction: str = "eps"
    zero_terminal_snr: bool = False
    timestep_shift: float = 1.0
    min_snr_gamma: float | None = 5.0
    weight_floor: float | None = None
    kind_weights: tuple[tuple[str, float], ...] = ()
    near_color_weight: float = 1.0
    contrast: Contrast = Contrast()
    pad_dropout: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.pad_dropout < 1.0:
            raise ValueError(
                f"pad_dropout must be in [0, 1) (the model must still see prompts' own padding), "
                f"got {self.pad_dropout}"
            )
        for kind, factor in self.kind_weights:
            if kind not in KINDS:
                raise ValueError(f"unknown caption kind {kind!r} in kind_weights; valid: {', '.join(KINDS)}")
            if not factor > 0:
                raise ValueError(f"kind_weights factor for {kind!r} must be positive, got {factor}")
        if not self.near_color_weight > 0:
            raise ValueError(f"near_color_weight must be positive, got {self.near_color_weight}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if self.zero_terminal_snr and self.prediction != "v":
            raise ValueError("zero_terminal_snr needs prediction='v' (eps is undefined at zero SNR)")
        if not self.timestep_shift > 0:
            raise ValueError(f"timestep_shift must be positive, got {self.timestep_shift}")
        if self.weight_floor is not None and (self.min_snr_gamma is None or self.weight_floor < 0):
            raise ValueError(
                f"weight_floor={self.weight_floor} needs min_snr_gamma set and a floor >= 0 "
                "(the x0 weight is min(SNR, gamma) + floor)"
            )


class LatentDiffusionObjective:
    """Denoising MSE at DDPM timesteps as `objective` says, with caption dropout for classifier-free
    guidance."""

    def __init__(
        self,
        pool: LatentPool,
        tokenizer: CLIPTokenizer,
        *,
        batch_size: int,
        scaling_factor: float,
        caption_dropout: float = 0.1,
        objective: Objective = Objective(),
    ):
        self.pool = pool
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.scaling_factor = scaling_factor
        self.caption_dropout = caption_dropout
        self.objective = objective
        self.alphas_cumprod = sd_alphas_cumprod(zero_terminal_snr=objective.zero_terminal_snr)  # (1000,)
        self.weights = caption_draw_weights(
            pool.captions, dict(objective.kind_weights), objective.near_color_weight
        )  # (N,) or None
        self._contrast_captions: dict[str, tuple[str, ...]] = {}

    def captions(self, captions: Sequence[str]) -> list[str]:
        """Replace each caption by "" with probability caption_dropout (python RNG: checkpointed)."""
        return ["" if random.random() < self.caption_dropout else c for c in captions]

    def __call__(self, model: TextToLatent, step: int) -> torch.Tensor:
        z, captions = self.pool.batch(step, self.batch_size, self.weights)
        z = z * self.scaling_factor  # (B, C, h, w)
        captions = self.captions(captions)
        obj = self.objective
        t = shifted_timesteps(z.shape[0], len(self.alphas_cumprod), obj.timestep_shift)  # (B,)
        a = self.alphas_cumprod[t].float()[:, None, None, None]  # (B, 1, 1, 1)
        noise = torch.randn_like(z)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        target = denoising_target(z, noise, a, obj.prediction)
        weight = torch.ones(z.shape[0])  # (B,)
        if obj.min_snr_gamma is not None:
            weight = min_snr_weights(a.flatten(), obj.min_snr_gamma, obj.prediction, obj.weight_floor)
        idx, false, use = self.contrast_pairs(captions, a.flatten())
        # one pass over the batch and its contradicting captions (K more rows, same x_t and target);
        # everything random above was drawn on the CPU, the pass runs where the model is
        device = module_device(model)
        x_in, t_in = torch.cat([x_t, x_t[idx]]).to(device), torch.cat([t, t[idx]]).float().to(device)
        context = self.encode(model, captions + false, self.padding_drops(captions, idx))  # (B + K, 77, W)
        pred = model.unet(x_in, t_in, context).float()
        err = (pred - torch.cat([target, target[idx]]).to(device)).pow(2).mean(dim=(1, 2, 3))  # (B + K,)
        err = err * torch.cat([weight, weight[idx]]).to(device)
        b = z.shape[0]
        loss = err[:b].mean()
        if idx:
            loss = loss + contrast_loss(err[idx], err[b:], b, obj.contrast, use.to(device))  # err[idx]: true
        return loss

    def contrast_pairs(
        self, captions: list[str], alphas: torch.Tensor
    ) -> tuple[list[int], list[str], torch.Tensor]:
        """The binding contrast's pairs (`train.contrast`): batch rows whose SNR is at most max_snr and
        whose caption has a contradicting one, as (rows, contradicting captions, use (K,)); padded by
        repeats to exactly `samples` rows with use 0, since oneDNN re-plans every kernel for a new batch
        shape at a cost above the rows' own; no rows when the contrast is off or none qualify. A caption
        with several contradicting ones gets one drawn from the python RNG (a checkpoint holds it)."""
        c = self.objective.contrast
        if c.weight == 0:
            return [], [], torch.zeros(0)
        snr = alphas / (1 - alphas)  # (B,)
        rows = [i for i, cap in enumerate(captions) if snr[i] <= c.max_snr and self.contrast_captions(cap)]
        rows = rows[: c.samples]
        if not rows:
            return [], [], torch.zeros(0)
        n = len(rows)
        false = []
        for i in rows:
            options = self.contrast_captions(captions[i])
            false.append(options[random.randrange(len(options))] if len(options) > 1 else options[0])
        rows += [rows[k % n] for k in range(c.samples - n)]
        false += [false[k % n] for k in range(c.samples - n)]
        use = (torch.arange(c.samples) < n).float()  # (K,)
        return rows, false, use

    def padding_drops(self, captions: Sequence[str], rows: Sequence[int]) -> list[bool]:
        """Which rows of the pass get the empty caption's padding states (`Objective.pad_dropout`, drawn
        from the python RNG for each captioned row); a contrast row follows the batch row it repeats, so
        the true and the contradicting caption are compared alike. [] when pad_dropout is 0."""
        p = self.objective.pad_dropout
        if p == 0:
            return []
        drops = [bool(c) and random.random() < p for c in captions]
        return drops + [drops[i] for i in rows]

    def encode(
        self, model: TextToLatent, captions: Sequence[str], drops: Sequence[bool] = ()
    ) -> torch.Tensor:
        """The text encoder's last hidden states (N, 77, W) for captions; where drops[i], the positions
        after row i's first EOS take the empty caption's states (encoded in the same pass)."""
        captions = list(captions)
        if drops and len(drops) != len(captions):
            raise ValueError(f"got {len(drops)} padding drops for {len(captions)} captions")
        texts = captions + [""] if drops else captions  # the same batch shape on every step
        ids = self.tokenizer(texts, pad_token_id=model.text_encoder.cfg.pad_token_id)  # (N [+ 1], 77)
        hidden = model.text_encoder(ids.to(module_device(model)), return_pooled=False).hidden
        if not drops:
            return hidden
        hidden, empty = hidden[:-1], hidden[-1:]  # (N, 77, W), (1, 77, W)
        after = after_first_eos(ids[:-1], self.tokenizer.eos_id)  # (N, 77)
        mask = (after & torch.tensor(drops)[:, None]).to(hidden.device)
        return torch.where(mask[:, :, None], empty.to(hidden.dtype), hidden)

    def contrast_captions(self, caption: str) -> tuple[str, ...]:
        """`train.contrast.contrast_captions` with the objective's breaks, memoized over the pool."""
        if caption not in self._contrast_captions:
            self._contrast_captions[caption] = contrast_captions(caption, self.objective.contrast.breaks)
        return self._contrast_captions[caption]


def caption_draw_weights(
    captions: Sequence[str], kind_factors: dict[str, float], near_color: float = 1.0
) -> torch.Tensor | None:
    """Per-caption draw weights (N,): the factor of each caption's kind (1 if unnamed), times `near_color`
    where the caption has a near-color pair (`data.has_near_color_pair`); None when nothing is reweighted.
    An empty caption (none in a pool; dropout happens later) has no kind and keeps 1."""
    if not kind_factors and near_color == 1.0:
        return None
    specs = [parse_caption(c) if c else None for c in captions]
    return torch.tensor(
        [
            1.0 if spec is None
            else kind_factors.get(spec.kind, 1.0) * (near_color if has_near_color_pair(spec) else 1.0)
            for spec in specs
        ],
        dtype=torch.float64,
    )  # fmt: skip


def shifted_timesteps(n: int, num_timesteps: int, shift: float) -> torch.Tensor:
    """n integer timesteps in [0, T): uniform for shift 1, towards the noisy end for shift > 1."""
    if shift == 1.0:
        return torch.randint(0, num_timesteps, (n,))
    u = torch.rand(n, dtype=torch.float64)
    shifted = shift * u / (1 + (shift - 1) * u)  # in [0, 1), increasing in u
    return (shifted * num_timesteps).long().clamp(max=num_timesteps - 1)


def denoising_target(z: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the U-Net regresses at x_t = sqrt(a) z + sqrt(1 - a) noise (a: alpha_bar, broadcastable):
    the noise ("eps") or v = sqrt(a) noise - sqrt(1 - a) z ("v")."""
    return noise if prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * z


def min_snr_weights(
    alphas_cumprod: torch.Tensor, gamma: float, prediction: str = "eps", floor: float | None = None
) -> torch.Tensor:
    """Per-sample loss weights that cap the clean end, SNR = alpha_bar / (1 - alpha_bar).

    Measured as a weight on the x0 error, the eps loss is SNR * |x0 error|^2 and the v loss is
    (SNR + 1) * |x0 error|^2. "eps": min(SNR, gamma) / SNR (Hang et al.), 1 up to SNR gamma.
    "v": min(SNR + 1, gamma) / (SNR + 1), the same cap on the v loss's own x0 weight. Hang et al.'s v
    variant, min(SNR, gamma) / (SNR + 1), would give the zero-SNR timestep no weight at all, and that
    step is where the layout has to come from the text alone.

    `floor`: the x0 weight is min(SNR, gamma) + floor instead, for either prediction. Without it, a
    v model's noisiest steps weigh about 1 on an x0 error that is mostly irreducible (the layout is a
    guess there) and make up most of the loss; a small floor keeps the zero-SNR step trained at a lower
    weight. (Tried on the default model, docs: how-it-was-made: it did not help there.)
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if floor is not None:
        return (snr.clamp(max=gamma) + floor) / (snr + 1 if prediction == "v" else snr)
    if prediction == "v":
        return (snr + 1).clamp(max=gamma) / (snr + 1)
    return snr.clamp(max=gamma) / snr


def latent_scale(pool: LatentPool) -> float:
    """1 / std of the posterior-mean latents, as SD's 0.18215 was chosen, rounded to 5 decimals."""
    mean = pool.moments.chunk(2, dim=1)[0]
    return round(1.0 / mean.std().item(), 5)
