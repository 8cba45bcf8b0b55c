"""Load a model from what users have: a single file, a diffusers folder, plus an optional separate VAE.

Every path ends in the single-file key space, validated key by key against a model built on the meta
device, then assigned without copying (mmap'd safetensors stay mmap'd).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.clip import UNUSED_KEY_SUFFIXES
from ..models.configs import VAE_PREFIX, ModelConfig
from ..models.sd import StableDiffusion
from ..models.tokenizer import CLIPTokenizer
from .detect import CONFIG_METADATA_KEY, detect_config
from .single_file import CheckpointError, cast_floats, load_state_dict, prune

# Top-level keys of LDM/SGM training checkpoints that hold no weights of the networks.
_SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "v_pred", "denoiser.sigmas", "denoiser.log_sigmas",
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

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def name(self) -> str:
        """A1111's "Model" field: the file stem (or folder name)."""
        return self.path.stem if self.path.is_file() else self.path.name


def _component_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    return ("model.diffusion_model.", VAE_PREFIX, *cfg.text_prefixes)


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
    if dtype is not None:
        keep = cast_floats(keep, dtype)
    keep = {k: v.to(device) for k, v in keep.items()}
    model.load_state_dict(keep, strict=True, assign=True)
    _materialize_buffers(model, device)
    return model.eval().requires_grad_(False), notes


def _materialize_buffers(model: torch.nn.Module, device: torch.device | str) -> None:
    """Non-persistent buffers built on meta (e.g. position ids) are rebuilt by their modules."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        reset = getattr(module, "reset_buffers", None)
        if reset is None:
            raise RuntimeError(f"{type(module).__name__} has meta buffers {meta} and no reset_buffers()")
        reset(device)


def load_vae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A separate VAE file (bare, `first_stage_model.`-prefixed or diffusers keys) -> single-file keys."""
    from .convert_vae import vae_config_from_diffusers, vae_from_diffusers

    path = Path(path)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise CheckpointError(f"{path}: VAE folder has no diffusion_pytorch_model weights")
        sd, _ = load_state_dict(files[0])
        sd = vae_from_diffusers(sd, vae_config_from_diffusers(config))
    else:
        sd, _ = load_state_dict(path)
        if any(k.startswith(VAE_PREFIX) for k in sd):
            sd = {k[len(VAE_PREFIX) :]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
        elif any(k.startswith("encoder.down_blocks.") for k in sd):
            raise CheckpointError(
                f"{path}: diffusers-layout VAE weights without their config.json; pass the VAE folder instead"
            )
        sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.") and k != "model_ema.num_updates"}
    if "encoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{path}: not a VAE (no encoder.conv_in.weight)")
    return {VAE_PREFIX + k: v for k, v in sd.items()}


def replace_vae(sd: dict[str, torch.Tensor], vae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not vae_sd:
        return sd
    return {k: v for k, v in sd.items() if not k.startswith(VAE_PREFIX)} | vae_sd


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
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    notes = []
    vae_sd = load_vae_state_dict(vae) if vae is not None else {}
    if vae is not None:
        notes.append(f"VAE replaced by {Path(vae).name}")
    if path.is_dir():
        from .diffusers import read_diffusers_folder

        sd, cfg, tokenizer, metadata = read_diffusers_folder(path, prediction=prediction)
        sd = replace_vae(sd, vae_sd)
    else:
        sd, metadata = load_state_dict(path)
        sd = replace_vae(prune(sd, keep_ema=keep_ema), vae_sd)  # before detection: the file may lack a VAE
        cfg = detect_config(sd, metadata, prediction=prediction, name=path.name)
        tokenizer = CLIPTokenizer.bundled()
    model, load_notes = build_model(sd, cfg, name=path.name, device=device, dtype=dtype)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=path,
        metadata=dict(metadata),
        notes=notes + load_notes,
        vae_path=Path(vae) if vae is not None else None,
    )


def checkpoint_metadata(cfg: ModelConfig, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Safetensors metadata diffusekit writes: the exact config and the prediction type."""
    meta = {CONFIG_METADATA_KEY: cfg.to_json(), "diffusekit.prediction": cfg.prediction}
    meta.update(extra or {})
    return meta
