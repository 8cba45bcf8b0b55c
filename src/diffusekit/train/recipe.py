"""The recipe that trains diffusekit's default model from nothing: VAE, then U-Net + text encoder.

Stage 1 trains the AutoencoderKL on shapes images; its latent scale is measured like SD's 0.18215.
Stage 2 trains the U-Net and a CLIP-architecture text encoder jointly (the real CLIP BPE tokenizer),
on latents of the frozen VAE. Stage 2b continues them with another objective (an eps model becomes a
v-prediction, zero-terminal-SNR one); the polish stages run further, gentler learning-rate cycles of
it (warm restarts). Export writes the EMA weights as one SD1-layout .safetensors file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..checkpoints.load import checkpoint_metadata
from ..checkpoints.single_file import save_state_dict
from ..data.shapes import ShapesDataset
from ..models.clip import build_text_encoder
from ..models.configs import DEFAULT, ModelConfig
from ..models.init import randomize_
from ..models.sd import StableDiffusion
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL
from ..params import ModelDefaults
from .contrast import Contrast
from .loop import TrainConfig, Trainer, save_atomic
from .objectives import (
    LatentDiffusionObjective,
    LatentPool,
    Objective,
    TextToLatent,
    image_batch,
    latent_scale,
    vae_loss,
)
from .report import image_grid, loss_curve_png


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained model; `diffusekit train` writes it next to the outputs.

    Stage 2 trains the U-Net and text encoder from scratch with `ldm_objective` (eps on SD's schedule:
    the text encoder learns shapes and colors). Stage 2b (`ldm_refine`, optional) continues from stage
    2's EMA weights with a fresh optimizer and `refine_objective`: v-prediction on the zero-terminal-SNR
    schedule, where the first step sees no image, so the layout has to come from the prompt, with the
    binding contrast (`train.contrast`), without which the model ignores relation words. Each polish
    cycle (`ldm_polish`, none to several) is a warm restart: the last stage's objective again, from the
    previous stage's EMA weights, with a fresh optimizer, a lower peak learning rate and its own seed
    (docs: how-it-was-made, "The polish stage": two cycles, 3,000 + 1,500 steps, raised held-out
    accuracy from about 0.81 to 0.89 over two seed blocks). `model` describes the exported file and must
    match the last stage's objective. The trained model is over-guided at A1111's CFG 7; `recommended` is
    what its file tells generate/eval to use instead (chosen on training compositions; docs:
    how-it-was-made).
    """

    model: ModelConfig = DEFAULT
    data_seed: int = 0
    vae: TrainConfig = TrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup=100, ema_decay=0.999, seed=1)
    kl_weight: float = 1e-6
    ldm: TrainConfig = TrainConfig(steps=8000, batch_size=64, lr=5e-4, warmup=300, ema_decay=0.999, seed=2)
    ldm_objective: Objective = Objective()
    ldm_refine: TrainConfig | None = TrainConfig(
        steps=4000, batch_size=64, lr=5e-4, warmup=100, ema_decay=0.999, seed=3
    )
    ldm_polish: tuple[TrainConfig, ...] = (
        TrainConfig(steps=3000, batch_size=64, lr=2e-4, warmup=100, ema_decay=0.999, seed=4),
        TrainConfig(steps=1500, batch_size=64, lr=2e-4, warmup=100, ema_decay=0.999, seed=5),
    )
    refine_objective: Objective = Objective(
        prediction="v", zero_terminal_snr=True, timestep_shift=2.0, contrast=Contrast(weight=1.0, samples=16)
    )
    caption_dropout: float = 0.1
    pool_size: int = 50_000  # training images encoded once for stage 2
    # what the exported file recommends (docs: how-it-was-made: chosen on training compositions)
    recommended: ModelDefaults = ModelDefaults(cfg_scale=2.0, sampler="DPM++ 2M SDE")

    def __post_init__(self):
        if not isinstance(self.ldm_polish, tuple):
            raise TypeError(
                f"ldm_polish is a tuple of TrainConfig, one per polish cycle (() for none), "
                f"not {type(self.ldm_polish).__name__}"
            )
        last = self.stages()[-1][2]
        trained = (last.prediction, last.zero_terminal_snr)
        if trained != (self.model.prediction, self.model.zero_terminal_snr):
            raise ValueError(
                f"the last U-Net stage trains prediction={trained[0]!r}, zero_terminal_snr={trained[1]}, "
                f"but the model config says prediction={self.model.prediction!r}, "
                f"zero_terminal_snr={self.model.zero_terminal_snr}; the exported file must describe it"
            )

    def stages(self) -> list[tuple[str, TrainConfig, Objective]]:
        """The U-Net stages in order: ("ldm", ...), then, if any, ("refine", ...) and the polish cycles
        ("polish", "polish2", ...), which repeat the objective of the stage before them."""
        stages = [("ldm", self.ldm, self.ldm_objective)]
        if self.ldm_refine is not None:
            stages.append(("refine", self.ldm_refine, self.refine_objective))
        objective = stages[-1][2]
        for i, cfg in enumerate(self.ldm_polish):
            stages.append(("polish" if i == 0 else f"polish{i + 1}", cfg, objective))
        return stages

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with every stage's step count and warmup multiplied by `factor` (for quick
        runs, or a recipe sized to a time budget)."""
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise ValueError(f"scale must be a finite number above 0 (0.1: a quick run), got {factor!r}")

        def steps(c: TrainConfig) -> TrainConfig:
            n = max(1, int(c.steps * factor))
            return replace(c, steps=n, warmup=max(1, min(n, round(c.warmup * factor))))

        refine = steps(self.ldm_refine) if self.ldm_refine else None
        polish = tuple(steps(c) for c in self.ldm_polish)
        return replace(self, vae=steps(self.vae), ldm=steps(self.ldm), ldm_refine=refine, ldm_polish=polish)


def dataset_sampler(recipe: Recipe, split: str = "train"):
    """index -> (PIL image, caption) from the procedural shapes data."""
    data = ShapesDataset(seed=recipe.data_seed, size=recipe.model.resolution, length=2**62, split=split)

    def sample(index: int):
        s = data[index]
        return s.image, s.caption

    return sample


def _seeded(seed: int) -> None:
    import random

    torch.manual_seed(seed)
    random.seed(seed)


def train_vae(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool,
    stop_at: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> tuple[AutoencoderKL, Trainer]:
    """Stage 1: the autoencoder. `precision`: the training loop's (auto, bf16, fp32; see train/loop.py)."""
    _seeded(recipe.vae.seed)
    vae = AutoencoderKL(recipe.model.vae)
    randomize_(vae, recipe.vae.seed)  # on the CPU, so every device starts from the same weights
    vae.to(device)
    trainer = Trainer("vae", vae, recipe.vae, out, precision=precision)
    if not (resume and trainer.resume()):
        _seeded(recipe.vae.seed)
    sample = dataset_sampler(recipe)

    def loss(module: AutoencoderKL, step: int) -> torch.Tensor:
        x, _ = image_batch(sample, recipe.vae.batch_size, step)
        return vae_loss(module, x, recipe.kl_weight)

    trainer.run(loss, stop_at=stop_at)
    trainer.ema.copy_to(vae)
    return vae.eval(), trainer


def latent_pool(recipe: Recipe, vae: AutoencoderKL, out: Path, *, resume: bool) -> LatentPool:
    """The stage-2 latent pool, encoded once and kept in `out` so a resumed run reuses it."""
    path = out / "latents.pt"
    if resume and path.is_file():
        saved = torch.load(path, weights_only=True)
        return LatentPool(saved["moments"], saved["captions"])
    pool = LatentPool.encode(vae.eval(), dataset_sampler(recipe), recipe.pool_size)
    save_atomic({"moments": pool.moments, "captions": pool.captions}, path)
    return pool


def train_ldm(
    recipe: Recipe,
    pool: LatentPool,
    scale: float,
    out: Path,
    *,
    resume: bool,
    stop_at: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> tuple[TextToLatent, list[Trainer]]:
    """Stage 2: U-Net and text encoder jointly, on the frozen VAE's latents; then stage 2b and the polish
    cycles if the recipe has them. `stop_at` counts steps over all of them (stage 2b's step k is step
    ldm.steps + k)."""
    _seeded(recipe.ldm.seed)
    model = TextToLatent(UNetModel(recipe.model.unet), build_text_encoder(recipe.model.text_encoders[0]))
    _init_ldm(model, recipe.ldm.seed)
    model.to(device)
    trainers, done = [], 0
    for name, cfg, objective in recipe.stages():
        if stop_at is not None and stop_at <= done:
            break
        trainer = Trainer(name, model, cfg, out, precision=precision)
        if not (resume and trainer.resume()):
            _seeded(cfg.seed)
        loss = LatentDiffusionObjective(
            pool, CLIPTokenizer.bundled(), batch_size=cfg.batch_size, scaling_factor=scale,
            caption_dropout=recipe.caption_dropout, objective=objective,
        )  # fmt: skip
        trainer.run(loss, stop_at=None if stop_at is None else stop_at - done)
        trainer.ema.copy_to(model)  # the next stage starts from (and the export takes) the EMA weights
        trainers.append(trainer)
        done += cfg.steps
    return model.eval(), trainers


@torch.no_grad()
def _init_ldm(model: TextToLatent, seed: int) -> None:
    """Seeded init; residual outputs start at zero (LDM's zero_module) so every block begins as identity."""
    randomize_(model, seed)
    zero = ("out_layers.3.weight", "out_layers.3.bias", "proj_out.weight", "proj_out.bias")
    for name, p in model.unet.named_parameters():
        if name.endswith(zero) or name.startswith("out.2."):
            p.zero_()
    for name, p in model.text_encoder.named_parameters():
        if "embedding" in name:
            p.mul_(0.02 / p.std())  # CLIP's N(0, 0.02) token and position embeddings


def export(recipe: Recipe, vae: AutoencoderKL, ldm: TextToLatent, scale: float, path: Path) -> ModelConfig:
    """Write the trained networks as one SD1-layout single file (fp16) carrying its exact config."""
    cfg = replace(recipe.model, vae=replace(recipe.model.vae, scaling_factor=scale))
    model = StableDiffusion(cfg)
    model.unet.load_state_dict(ldm.unet.state_dict())
    model.vae.load_state_dict(vae.state_dict())
    model.text_encoders[0].load_state_dict(ldm.text_encoder.state_dict())
    sd = {k: v.to("cpu", torch.float16) for k, v in model.state_dict().items()}
    extra = {"diffusekit.recipe": json.dumps(asdict(recipe))} | recipe.recommended.to_metadata()
    save_state_dict(sd, path, metadata=checkpoint_metadata(cfg, extra))
    return cfg


def run_recipe(
    recipe: Recipe,
    out: str | Path,
    *,
    resume: bool = True,
    model_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
) -> Path:
    """Train every stage in `out` (resumable) on `device`, export the model, draw the loss curves and
    a sample grid. A run may resume on another device or precision than the one that wrote its
    checkpoints. `precision` is the training loop's: auto (bf16 autocast where native), bf16, fp32."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2, default=str))
    vae, vae_trainer = train_vae(recipe, out, resume=resume, device=device, precision=precision)
    pool = latent_pool(recipe, vae, out, resume=resume)
    scale = latent_scale(pool)
    ldm, ldm_trainers = train_ldm(recipe, pool, scale, out, resume=resume, device=device, precision=precision)
    path = Path(model_path) if model_path else out / "model.safetensors"
    export(recipe, vae, ldm, scale, path)
    curves = {"vae": vae_trainer.state.losses} | {t.name: t.state.losses for t in ldm_trainers}
    loss_curve_png(curves, out / "loss.png")
    sample_grid(path, out / "samples.png", device=device)
    return path


GRID_PROMPTS = (
    "a red circle", "two blue squares", "a green triangle to the left of a yellow star",
    "a purple star", "three orange diamonds", "a cyan cross above a pink circle",
    "a green square on the right", "a yellow circle and a blue cross",
)  # fmt: skip


def sample_grid(
    model_path: Path,
    out: Path,
    prompts: tuple[str, ...] = GRID_PROMPTS,
    seeds: int = 2,
    device: str | torch.device = "cpu",
) -> Path:
    """A grid of `seeds` images per prompt from the exported model, captioned."""
    from ..params import GenerationParams
    from ..pipeline import Pipeline

    pipe = Pipeline.from_file(model_path, device=device)
    images, captions = [], []
    for prompt in prompts:
        for seed in range(seeds):
            images += pipe.generate(GenerationParams(prompt=prompt, seed=seed)).images
            captions.append(prompt)
    image_grid(images, captions, cols=seeds * 4).save(out)
    return out
