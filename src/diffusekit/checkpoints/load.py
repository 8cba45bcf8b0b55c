"""Load a model from what users have: a single file, a diffusers folder, plus an optional separate VAE.

Every path ends in the single-file key space, validated key by key against a model built on the meta
device, then assigned without copying (mmap'd safetensors stay mmap'd).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..models.clip import UNUSED_KEY_SUFFIXES
from ..models.configs import UNET_PREFIX, VAE_PREFIX, ModelConfig
from ..models.sd import StableDiffusion
from ..models.tokenizer import CLIPTokenizer
from ..models.vae import AutoencoderKL
from ..params import ModelDefaults
from .detect import CONFIG_METADATA_KEY, detect_config, precheck_header, vae_config_from_shapes
from .single_file import CheckpointError, TensorInfo, cast_floats, load_state_dict
from .surgery import prune, strip_prefix

# Top-level keys of LDM/SGM training checkpoints that hold no weights of the networks.
_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "v_pred", "ztsnr", "denoiser.sigmas", "denoiser.log_sigmas",
)  # fmt: skip


@dataclass
class LoadedModel:
    """A ready model plus where it came from (for infotext and inspect)."""

    model: StableDiffusion
    tokenizer: CLIPTokenizer
    path: Path
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. dropped keys, VAE replaced
    vae_path: Path | None = None
    defaults: ModelDefaults = field(default_factory=ModelDefaults)  # recommended steps, CFG, sampler
    model_hash: str | None = None  # AutoV2 of the original file when `path` is not that file (model store)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def name(self) -> str:
        """A1111's "Model" field: the file stem (or folder name)."""
        return self.path.stem if self.path.is_file() else self.path.name


def _component_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    return (UNET_PREFIX, VAE_PREFIX, *cfg.text_prefixes)


def validate_state_dict(
    sd: Mapping[str, torch.Tensor], model: StableDiffusion, name: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Check `sd` against `model` key by key; return (the keys to load, notes on what was dropped)."""
    expected = model.state_dict()
    prefixes = _component_prefixes(model.cfg)
    keep: dict[str, torch.Tensor] = {}
    dropped_extra, dropped_unused = [], []
    for key, value in sd.items():
        if key in expected:
            want = expected[key].shape
            if value.shape != want:
                raise CheckpointError(
                    f"{name}: shape mismatch at {key}: expected {tuple(want)}, found {tuple(value.shape)}"
                )
            keep[key] = value
        elif not key.startswith(prefixes):
            dropped_extra.append(key)  # schedule buffers, training state, other top-level entries
        elif key.endswith(UNUSED_KEY_SUFFIXES):
            dropped_unused.append(key)
        else:
            raise CheckpointError(f"{name}: unexpected key {key} (not part of a {model.cfg.family} model)")
    missing = [k for k in expected if k not in keep]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{name}: missing key {missing[0]}{more}; the file is incomplete or another model"
        )
    notes = []
    if dropped_extra:
        known = sum(k in _SCHEDULE_BUFFERS for k in dropped_extra)
        notes.append(
            f"ignored {len(dropped_extra)} non-network key(s) ({known} schedule buffers), "
            f"e.g. {dropped_extra[0]}"
        )
    if dropped_unused:
        notes.append(f"ignored {len(dropped_unused)} unused text-encoder key(s), e.g. {dropped_unused[0]}")
    return keep, notes


def build_model(
    sd: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    *,
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[StableDiffusion, list[str]]:
    """Validate `sd` (single-file keys) and assign it into a model built on the meta device."""
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    keep, notes = validate_state_dict(sd, model, name)
    if dtype is not None:  # a cast never holds the mapped file and the cast copy resident together
        keep = cast_floats(keep, dtype, release_mapped=True)
    keep = {k: v.to(device) for k, v in keep.items()}
    model.load_state_dict(keep, strict=True, assign=True)
    return model.eval().requires_grad_(False), notes


def load_vae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A separate VAE file (bare, `first_stage_model.`-prefixed or diffusers keys) -> single-file keys."""
    path = Path(path)
    if path.is_dir():
        from .diffusers import read_vae_folder

        sd, _ = read_vae_folder(path)
    else:
        sd, _ = load_state_dict(path)
        if any(k.startswith(VAE_PREFIX) for k in sd):
            sd = strip_prefix(sd, VAE_PREFIX)
        elif any(k.startswith("encoder.down_blocks.") for k in sd):
            raise CheckpointError(
                f"{path}: diffusers-layout VAE weights without their config.json; pass the VAE folder instead"
            )
        sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    if "encoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{path}: not a VAE (no encoder.conv_in.weight)")
    return {VAE_PREFIX + k: v for k, v in sd.items()}


def replace_vae(sd: dict[str, torch.Tensor], vae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not vae_sd:
        return sd
    return {k: v for k, v in sd.items() if not k.startswith(VAE_PREFIX)} | vae_sd


def read_checkpoint(
    path: str | Path,
    *,
    prediction: str | None = None,
    vae: str | Path | None = None,
    prune_training: bool = False,
    keep_ema: bool = False,
) -> tuple[dict[str, torch.Tensor], ModelConfig, CLIPTokenizer | None, dict[str, str], list[str]]:
    """(single-file state dict, config, the folder's tokenizer or None, metadata, notes) of a file or folder.

    `prune_training` drops a single file's EMA/optimizer entries (`keep_ema`: the EMA U-Net weights win);
    `vae` replaces the VAE before the family is detected, so a file without a VAE works too.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    notes = []
    vae_sd = load_vae_state_dict(vae) if vae is not None else {}
    if vae is not None:
        notes.append(f"VAE replaced by {Path(vae).name}")
    if path.is_dir():
        from .diffusers import read_diffusers_folder

        sd, cfg, tokenizer, metadata = read_diffusers_folder(path, prediction=prediction)
        if vae is not None:
            cfg = fit_vae(cfg, vae_sd, Path(vae), path.name)
        return replace_vae(sd, vae_sd), cfg, tokenizer, metadata, notes

    def precheck(entries: Mapping[str, TensorInfo], meta: Mapping[str, str]) -> None:
        precheck_header({k: e.shape for k, e in entries.items()}, meta, path.name)

    sd, metadata = load_state_dict(path, check_header=precheck)
    if prune_training:
        before = len(sd)
        try:
            sd = prune(sd, keep_ema=keep_ema)
        except CheckpointError as e:
            raise CheckpointError(f"{path.name}: {e}") from None
        if len(sd) < before:
            kept = " (EMA weights kept)" if keep_ema else ""
            notes.append(f"pruned {before - len(sd)} EMA/training entries{kept}")
    sd = replace_vae(sd, vae_sd)
    cfg = detect_config(sd, metadata, prediction=prediction, name=path.name)
    if vae is not None:
        cfg = fit_vae(cfg, vae_sd, Path(vae), path.name)
    return sd, cfg, None, metadata, notes


def fit_vae(cfg: ModelConfig, vae_sd: Mapping[str, torch.Tensor], vae: Path, model_name: str) -> ModelConfig:
    """`cfg` with the VAE structure of a replacement VAE (its shapes decide; the model keeps its latent
    scaling factor); a VAE that cannot serve this model is an error naming the VAE file."""
    shapes = {k: v.shape for k, v in vae_sd.items()}
    try:
        derived = vae_config_from_shapes(shapes, cfg.family, vae.name)
        fitted = replace(cfg, vae=replace(derived, scaling_factor=cfg.vae.scaling_factor))
    except CheckpointError:
        raise
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as e:
        problem = f"missing key {e.args[0]}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{vae.name}: this VAE does not fit {model_name}: {problem}") from None
    with torch.device("meta"):
        expected = AutoencoderKL(fitted.vae).state_dict()
    extra = sorted(k for k in vae_sd if k.removeprefix(VAE_PREFIX) not in expected)
    if extra:
        raise CheckpointError(f"{vae.name}: this VAE does not fit {model_name}: unexpected key {extra[0]}")
    for key, want in expected.items():
        found = vae_sd.get(VAE_PREFIX + key)
        if found is None or found.shape != want.shape:
            what = "missing" if found is None else f"shape {tuple(found.shape)}, expected {tuple(want.shape)}"
            raise CheckpointError(f"{vae.name}: this VAE does not fit {model_name}: {key} {what}")
    return fitted


def load_model(
    path: str | Path,
    *,
    prediction: str | None = None,
    vae: str | Path | None = None,
    keep_ema: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a single-file checkpoint or a diffusers folder (optionally replacing its VAE)."""
    path = Path(path)
    sd, cfg, tokenizer, metadata, notes = read_checkpoint(
        path, prediction=prediction, vae=vae, prune_training=True, keep_ema=keep_ema
    )
    defaults = ModelDefaults.from_metadata(metadata, path.name)  # a bad entry fails before the build
    model, load_notes = build_model(sd, cfg, name=path.name, device=device, dtype=dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer or CLIPTokenizer.bundled(),
        path=path,
        metadata=dict(metadata),
        notes=notes + load_notes,
        vae_path=Path(vae) if vae is not None else None,
        defaults=defaults,
    )


def checkpoint_metadata(cfg: ModelConfig, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Safetensors metadata diffusekit writes: the exact config and the prediction type."""
    meta = {CONFIG_METADATA_KEY: cfg.to_json(), "diffusekit.prediction": cfg.prediction}
    meta.update(extra or {})
    return meta
