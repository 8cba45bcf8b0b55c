"""Train a LoRA on a folder of captioned images (kohya's layout: ``img.png`` + ``img.txt``), for any model.

The base model stays frozen; the LoRA's down/up matrices are the only parameters (kohya's init: down
Kaiming-uniform, up zero, so step 0 is the base model). They act through the same forward hooks as a
loaded LoRA (``lora.apply_loras``), so what is trained is exactly what is applied later. Images are put
in resolution buckets (sides multiples of 64 near the target area, aspect ratio kept), encoded once by
the frozen VAE, and each step's batch, timesteps and noise are a pure function of (seed, step), which
with ``train.loop.Trainer``'s checkpoints makes ``--resume`` exact after a kill. The result is written
as a kohya-format .safetensors with ``ss_*`` metadata (or in the diffusers format on request).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..diffusion.schedules import sd_alphas_cumprod
from ..images import to_tensor
from ..models.configs import ModelConfig
from ..models.sd import StableDiffusion
from ..prompts import encode_prompt
from .keys import Target, preferred_names
from .lora import LoraError, LoraModule, LoraNetwork, apply_loras

__all__ = ["LoraTrainConfig", "CaptionedImages", "LoraTraining", "lora_targets", "new_network"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TARGET_SETS = ("attn", "attn+conv", "xattn-kv")
_KV_LAYERS = ("attn2.to_k", "attn2.to_v")  # cross-attention keys/values: they read only the text
BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass(frozen=True)
class LoraTrainConfig:
    """What to train: rank/alpha (kohya's network_dim/network_alpha), targets, optimisation and data."""

    rank: int = 4
    alpha: float = 1.0
    # "attn": transformer blocks (+ text attention/MLP); "attn+conv": + ResBlock convs; "xattn-kv": only the
    # U-Net cross-attention keys and values, which see nothing but the text (Kumari et al. 2023)
    targets: str = "attn"
    conv_rank: int | None = None  # rank of conv layers (default: rank)
    train_text_encoder: bool = False
    resolution: int = 512
    min_snr_gamma: float | None = None  # Hang et al. 2023 loss weighting; None: plain MSE
    # weight of the penalty on the change the LoRA makes to the cross-attention keys/values of prior
    # captions (LoraTraining.kv_change); 0: off
    preserve_kv: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.targets not in TARGET_SETS:
            raise LoraError(f"unknown targets {self.targets!r}; valid: {', '.join(TARGET_SETS)}")
        if self.rank < 1 or (self.conv_rank is not None and self.conv_rank < 1):
            raise LoraError(f"rank must be >= 1, got {self.rank}")
        if self.resolution % 64:
            raise LoraError(f"resolution must be a multiple of 64, got {self.resolution}")
        if self.preserve_kv < 0:
            raise LoraError(f"the key/value preservation weight must be >= 0, got {self.preserve_kv}")


def lora_targets(cfg: ModelConfig, targets: str, text: bool) -> list[Target]:
    """The layers kohya's networks.lora adapts: U-Net transformer blocks (+ conv layers), text attn/MLP."""
    out = []
    for target in preferred_names(cfg, "kohya"):
        if target.is_text:
            if text and ("self_attn" in _hf(target) or ".mlp." in _hf(target)):
                out.append(target)
        elif targets == "xattn-kv":
            if target.path.endswith(_KV_LAYERS):
                out.append(target)
        elif ".transformer_blocks." in target.path or target.path.endswith(("proj_in", "proj_out")):
            out.append(target)
        elif targets == "attn+conv" and target.kind == "conv" and _is_block_conv(target.path):
            out.append(target)
    return out


def _hf(target: Target) -> str:
    return target.path if target.kind != "packed" else target.path + ".self_attn"


def _is_block_conv(path: str) -> bool:
    """ResBlock convs, skip convs, down/upsampler convs; not the U-Net's conv_in/conv_out."""
    return path.endswith(("in_layers.2", "out_layers.3", "skip_connection", ".op", ".conv"))


def new_network(model: StableDiffusion, name: str, cfg: LoraTrainConfig, seed: int) -> LoraNetwork:
    """A fresh LoRA over `lora_targets`: down Kaiming-uniform (a=sqrt(5)), up zero, alpha as given."""
    g = torch.Generator().manual_seed(seed)
    comps = {k: m for k, (_, m) in model.components().items()}
    names = preferred_names(model.cfg, "kohya")
    modules = {}
    for target in lora_targets(model.cfg, cfg.targets, cfg.train_text_encoder):
        comp = comps[target.component]
        if target.kind == "packed":
            w = comp.get_submodule(target.path.rpartition(".")[0]).in_proj_weight
            out_f, shape_in = w.shape[0] // 3, (w.shape[1],)
        else:
            w = comp.get_submodule(target.path).weight
            out_f, shape_in = w.shape[0], tuple(w.shape[1:])
        spatial = target.kind == "conv" and w.shape[-1] > 1  # a 3x3 conv, not a 1x1 projection
        rank = (cfg.conv_rank or cfg.rank) if spatial else cfg.rank
        down = torch.empty(rank, *shape_in)
        bound = 1 / math.sqrt(math.prod(shape_in))  # kaiming_uniform(a=sqrt(5)) on a (rank, fan_in) weight
        down.uniform_(-bound, bound, generator=g)
        up = torch.zeros(out_f, rank, *([1, 1] if len(shape_in) == 3 else []))
        modules[names[target]] = LoraModule(nn.Parameter(down), nn.Parameter(up), alpha=cfg.alpha)
    return LoraNetwork(name, modules)


class LoraParameters(nn.Module):
    """The trainable tensors of a LoraNetwork as one module (so the Trainer's optimizer/EMA/checkpoint
    see exactly them and nothing of the frozen base)."""

    def __init__(self, net: LoraNetwork) -> None:
        super().__init__()
        self.names = list(net.modules)
        self.down = nn.ParameterList([net.modules[n].down for n in self.names])
        self.up = nn.ParameterList([net.modules[n].up for n in self.names])


# ---------------------------------------------------------------------------------------------
# Data


def bucket_sizes(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, with area at most resolution^2 and aspect <= max_ratio."""
    area = resolution * resolution
    out = set()
    w = step
    while w <= resolution * max_ratio:
        h = min(int(area // w) // step * step, int(w * max_ratio) // step * step)
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += step
    return sorted(out)


def _bucket_for(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1] / ratio)), -b[0] * b[1]))


def _fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover `size`, then center-crop to it."""
    w, h = size
    scale = max(w / img.width, h / img.height)
    img = img.resize(
        (max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.Resampling.LANCZOS
    )
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h))


class CaptionedImages:
    """Images with same-named .txt captions under a folder (recursive); missing caption: empty prompt."""

    def __init__(self, folder: str | Path, resolution: int) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LoraError(f"training data folder {self.folder} does not exist")
        paths = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise LoraError(f"{self.folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        pairs = []
        for p in paths:
            caption_file = p.with_suffix(".txt")
            caption = caption_file.read_text().strip() if caption_file.is_file() else ""
            pairs.append((Image.open(p).convert("RGB"), caption))
        self._index(pairs, resolution)
        self.anchors: frozenset[int] = frozenset()

    @classmethod
    def from_pairs(
        cls, pairs: list[tuple[Image.Image, str]], resolution: int, anchors: frozenset[int] = frozenset()
    ) -> CaptionedImages:
        """The same from (image, caption) pairs in memory (e.g. a rendered shapes dataset); `anchors`:
        indices of images whose target is the frozen model's own prediction (see LoraTraining.loss)."""
        if not pairs:
            raise LoraError("no training images given")
        self = cls.__new__(cls)
        self.folder = None
        self._index(pairs, resolution)
        self.anchors = frozenset(anchors)
        return self

    def _index(self, pairs: list[tuple[Image.Image, str]], resolution: int) -> None:
        buckets = bucket_sizes(resolution)
        self.items: list[tuple[Image.Image, str, tuple[int, int]]] = []
        for img, caption in pairs:
            size = _bucket_for(img.size, buckets)
            self.items.append((_fit(img.convert("RGB"), size), caption, size))
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, (_, _, size) in enumerate(self.items):
            self.by_bucket.setdefault(size, []).append(i)

    def __len__(self) -> int:
        return len(self.items)

    def batch_indices(self, seed: int, step: int, batch: int) -> list[int]:
        """The images of step `step`: one bucket (drawn by its size), without replacement where possible."""
        rng = random.Random(seed * 1_000_003 + step)
        buckets = sorted(self.by_bucket)
        bucket = rng.choices(buckets, weights=[len(self.by_bucket[b]) for b in buckets])[0]
        pool = self.by_bucket[bucket]
        return rng.sample(pool, batch) if batch <= len(pool) else [rng.choice(pool) for _ in range(batch)]


# ---------------------------------------------------------------------------------------------
# The objective


class LoraTraining:
    """The loss of a LoRA on a frozen model: eps/v MSE (optionally min-SNR weighted) on cached latents."""

    def __init__(
        self,
        model: StableDiffusion,
        tokenizer,
        data: CaptionedImages,
        cfg: LoraTrainConfig,
        prior_captions: Sequence[str] = (),
    ) -> None:
        self.model, self.tokenizer, self.data, self.cfg = model, tokenizer, data, cfg
        self.prior_captions = sorted(set(prior_captions))  # what kv_change keeps the conditioning of
        if cfg.preserve_kv and not self.prior_captions:
            raise LoraError("key/value preservation needs prior captions (text without the new concept)")
        model.requires_grad_(False)
        scale = model.cfg.vae.scaling_factor
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(data.items)  # type: ignore[list-item]
        with torch.no_grad():  # VAE posterior moments of every image, once, a bucket's images 32 at a time
            for indices in data.by_bucket.values():
                for start in range(0, len(indices), 32):
                    chunk = indices[start : start + 32]
                    post = model.vae.encode(torch.cat([to_tensor(data.items[i][0]) for i in chunk]))
                    for j, i in enumerate(chunk):
                        self.moments[i] = (
                            post.mean[j : j + 1] * scale,
                            post.std[j : j + 1] * scale,
                        )  # (1, 4, h, w)
        self.alphas = sd_alphas_cumprod(zero_terminal_snr=model.cfg.zero_terminal_snr).float()
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._base_cache: dict[str, torch.Tensor] = {}

    def encode(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context (1, T, C), pooled or None); cached unless the text encoder is being trained."""
        if not self.cfg.train_text_encoder and caption in self._text_cache:
            return self._text_cache[caption]
        with torch.set_grad_enabled(self.cfg.train_text_encoder):
            emb = encode_prompt(caption, self.tokenizer, self.model.text_encoders)
        out = (emb.context, emb.pooled)
        if not self.cfg.train_text_encoder:
            self._text_cache[caption] = out
        return out

    def _forward(self, step: int, batch: int) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, prediction, data target, timesteps) of step `step`'s batch, which depends on (seed,
        step) only; the prediction is made with whatever LoRA is applied at the time."""
        model, cfg = self.model, self.cfg
        idx = self.data.batch_indices(cfg.seed, step, batch)
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        z = torch.cat([m + s * torch.randn(m.shape, generator=g) for m, s in (self.moments[i] for i in idx)])
        t = torch.randint(0, len(self.alphas), (len(idx),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        a = self.alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise  # (B, 4, h, w)
        texts = [self.encode(self.data.items[i][1]) for i in idx]
        context = torch.cat([c for c, _ in texts])
        y = None
        if model.cfg.unet.adm_in_channels is not None:  # SDXL: pooled text + size/crop ids
            from ..models.unet import size_embedding

            w, h = self.data.items[idx[0]][2]
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(len(idx), -1)
            y = torch.cat(
                [torch.cat([p for _, p in texts]), size_embedding(ids, model.cfg.unet.size_embed_dim)], 1
            )
        pred = model.unet(x_t, t.float(), context, y).float()
        target = noise if model.cfg.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * z
        return idx, pred, target, t

    def base_prediction(self, step: int, batch: int) -> torch.Tensor | None:
        """The frozen model's own prediction on step `step`'s batch (call it with no LoRA applied), the
        target of its anchor images; None when the batch has none."""
        idx = self.data.batch_indices(self.cfg.seed, step, batch)
        if not any(i in self.data.anchors for i in idx):
            return None
        with torch.no_grad():
            return self._forward(step, batch)[1]

    def loss(self, step: int, batch: int, base_pred: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of step `step`: denoising MSE, except that anchor images (with `base_pred`)
        are pulled toward the frozen model's prediction, so the LoRA learns to leave them as they were."""
        cfg = self.cfg
        idx, pred, target, t = self._forward(step, batch)
        if base_pred is not None:
            anchor = torch.tensor([i in self.data.anchors for i in idx]).view(-1, 1, 1, 1)
            target = torch.where(anchor, base_pred, target)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if cfg.min_snr_gamma is not None:
            snr = self.alphas[t] / (1 - self.alphas[t])
            base = snr + 1 if self.model.cfg.prediction == "v" else snr
            per_sample = per_sample * base.clamp(max=cfg.min_snr_gamma) / base
        return per_sample.mean()

    def kv_change(self, net: LoraNetwork, step: int, captions: int = 8) -> torch.Tensor:
        """How much the LoRA moves what the U-Net reads of the prior captions: over every cross-attention
        key and value layer (`attn2.to_k`/`to_v`), the mean of ||K' - K||² / ||K||², where K is the
        layer's output on the base model's text context of `captions` prior captions drawn by (seed, step)
        (every token position) and K' the same with the LoRA applied, to the text encoder as well if it
        is trained. Zero keeps every prompt made of them exactly where the base model had it: nothing
        else in the U-Net reads the text."""
        rng = random.Random(self.cfg.seed * 1_000_033 + step)
        picked = rng.sample(self.prior_captions, min(captions, len(self.prior_captions)))
        layers = [m for path, m in self.model.unet.named_modules() if path.endswith(_KV_LAYERS)]
        with torch.no_grad():
            base_ctx = torch.cat([self._base_context(c) for c in picked])  # (N, T, C)
            base_kv = [layer(base_ctx) for layer in layers]  # (N, T, out) each
        with apply_loras(self.model, [(net, 1.0, 1.0)]):
            ctx = base_ctx
            if self.cfg.train_text_encoder:
                ctx = torch.cat(
                    [encode_prompt(c, self.tokenizer, self.model.text_encoders).context for c in picked]
                )
            ratios = [(layer(ctx) - b).square().sum() / b.square().sum().clamp_min(1e-12)
                      for layer, b in zip(layers, base_kv, strict=True)]  # fmt: skip
        return torch.stack(ratios).mean()

    def _base_context(self, caption: str) -> torch.Tensor:
        """The frozen text encoder's context of a caption (1, T, C), cached."""
        if caption not in self._base_cache:
            with torch.no_grad():
                self._base_cache[caption] = encode_prompt(
                    caption, self.tokenizer, self.model.text_encoders
                ).context
        return self._base_cache[caption]


def make_loss_fn(
    training: LoraTraining, net: LoraNetwork, batch: int
) -> Callable[[nn.Module, int], torch.Tensor]:
    """A Trainer loss function: the LoRA hooked in for the step's forward pass only (the anchor images'
    targets, if any, are predicted first without it), plus the key/value preservation term if asked."""

    def loss_fn(_module: nn.Module, step: int) -> torch.Tensor:
        base_pred = training.base_prediction(step, batch) if training.data.anchors else None
        with apply_loras(training.model, [(net, 1.0, 1.0)]):
            loss = training.loss(step, batch, base_pred)
        if training.cfg.preserve_kv:  # (applies the LoRA itself, after its frozen reference)
            loss = loss + training.cfg.preserve_kv * training.kv_change(net, step)
        return loss

    return loss_fn


def training_metadata(cfg: LoraTrainConfig, model_cfg: ModelConfig, name: str, steps: int, lr: float,
                      n_images: int, base_name: str) -> dict[str, str]:  # fmt: skip
    """The ``ss_*`` fields sd-scripts writes and A1111/ComfyUI read (network, base, training settings)."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_args": json.dumps(
            {"conv_dim": str(cfg.conv_rank or cfg.rank), "conv_alpha": str(cfg.alpha)}
        )
        if cfg.targets == "attn+conv"
        else "{}",
        "ss_output_name": name,
        "ss_base_model_version": BASE_VERSIONS[model_cfg.family],
        "ss_v2": str(model_cfg.family == "sd2"),
        "ss_sd_model_name": base_name,
        "ss_max_train_steps": str(steps),
        "ss_learning_rate": str(lr),
        "ss_unet_lr": str(lr),
        "ss_text_encoder_lr": str(lr if cfg.train_text_encoder else 0),
        "ss_network_train_unet_only": str(not cfg.train_text_encoder),
        "ss_num_train_images": str(n_images),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_seed": str(cfg.seed),
        "ss_training_comment": "trained with diffusekit train-lora",
    }


def sample_with_lora(pipe, net: LoraNetwork, prompt: str, *, seed: int, steps: int, **kw):
    """One sample image of `prompt` with the LoRA as trained so far (weight 1), on `pipe`, a Pipeline over
    the model being trained (`Pipeline(loaded, dtype=torch.float32)`): the base weights come back
    bit-identical, so training goes on as if no sample was made. `kw`: pipe.generate's (cancel, ...)."""
    from ..params import GenerationParams

    params = GenerationParams(prompt=prompt, seed=seed, steps=steps)
    with torch.no_grad():
        return pipe.generate(params, loras=[(net, 1.0, 1.0)], **kw)
