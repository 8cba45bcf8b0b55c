"""diffusers folder layout <-> single-file keys.

A folder holds ``model_index.json``, ``unet/``, ``vae/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``), ``text_encoder[_2]/`` (transformers ``config.json`` +
``model.safetensors``), ``tokenizer[_2]/`` and ``scheduler/scheduler_config.json``. Reading converts
each component to the original keys, so the rest of diffusekit sees one format.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.configs import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, ModelConfig, VAEConfig
from ..models.tokenizer import CLIPTokenizer
from ..models.validate import Bool, Choice, ConfigError, Int, JsonFields, Optional, Text
from .atomic import WriteError, clean_stale, partial_path, replace_folder
from .convert_clip import (
    text_config_from_transformers,
    text_config_to_transformers,
    text_from_transformers,
    text_to_transformers,
    trim_text_encoder,
)
from .convert_unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from .convert_vae import (
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from .single_file import CheckpointError, load_state_dict, save_state_dict
from .surgery import strip_prefix

_DIFFUSERS_WEIGHTS = tuple(f"diffusion_pytorch_model{v}" for v in ("", ".fp16", ".bf16"))
_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what we write for unet/ and vae/
_WEIGHT_NAMES = {
    "unet": _DIFFUSERS_WEIGHTS,
    "vae": _DIFFUSERS_WEIGHTS,
    "text_encoder": ("model", "model.fp16", "model.bf16", "pytorch_model", "pytorch_model.fp16"),
}
_PIPELINE_CLASS = {
    ("sd1", False): "StableDiffusionPipeline",
    ("sd1", True): "StableDiffusionInpaintPipeline",
    ("sd2", False): "StableDiffusionPipeline",
    ("sd2", True): "StableDiffusionInpaintPipeline",
    ("sdxl", False): "StableDiffusionXLPipeline",
    ("sdxl", True): "StableDiffusionXLInpaintPipeline",
}


def _read_json(path: Path) -> dict:
    """A JSON object from a config file of the folder (a list, number or bad text is a clear error)."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: diffusers folder is missing {path.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a JSON text file ({type(e).__name__})") from None
    return JsonFields(data, str(path)).data


def _config(path: Path, read: Callable[[dict, str], Any]) -> Any:
    """`read(json, source)` on a config file; a ValueError it raises becomes one naming the file."""
    data = _read_json(path)
    try:
        return read(data, str(path))
    except ConfigError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _read_weights(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    for stem in _WEIGHT_NAMES[kind]:
        for ext in (".safetensors", ".bin"):
            if (folder / f"{stem}{ext}").is_file():
                sd, _ = load_state_dict(folder / f"{stem}{ext}")
                return sd
    names = ", ".join(f"{s}.safetensors" for s in _WEIGHT_NAMES[kind])
    raise CheckpointError(f"{folder}: no weights file; looked for {names} (or .bin)")


def _family(root: Path, index: Mapping) -> str:
    if "text_encoder_2" in index or (root / "text_encoder_2").is_dir():
        return "sdxl"
    path = root / "text_encoder" / "config.json"
    act = JsonFields(_read_json(path), str(path)).get("hidden_act", Choice(("quick_gelu", "gelu")), "")
    return "sd2" if act == "gelu" else "sd1"


def read_vae_folder(folder: Path) -> tuple[dict[str, torch.Tensor], VAEConfig]:
    """A diffusers ``vae/`` folder -> (AutoencoderKL state dict in LDM keys, its config)."""
    vae_cfg = _config(folder / "config.json", vae_config_from_diffusers)
    return vae_from_diffusers(_read_weights(folder, "vae"), vae_cfg), vae_cfg


def read_diffusers_folder(
    root: str | Path, *, prediction: str | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig, CLIPTokenizer, dict[str, str]]:
    """(single-file state dict, config, tokenizer, metadata) from a diffusers pipeline folder."""
    root = Path(root)
    index = _read_json(root / "model_index.json")
    family = _family(root, index)
    unet_json = _read_json(root / "unet" / "config.json")
    unet_cfg = _config(root / "unet" / "config.json", unet_config_from_diffusers)
    unet_sd = unet_from_diffusers(_read_weights(root / "unet", "unet"), unet_cfg)
    vae_sd, vae_cfg = read_vae_folder(root / "vae")
    sd = {UNET_PREFIX + k: v for k, v in unet_sd.items()} | {VAE_PREFIX + k: v for k, v in vae_sd.items()}
    layouts = {"sd1": ("hf",), "sd2": ("openclip",), "sdxl": ("hf", "openclip")}[family]
    text_cfgs = []
    for i, (layout, prefix) in enumerate(zip(layouts, TEXT_PREFIXES[family], strict=True)):
        sub = root / ("text_encoder" if i == 0 else f"text_encoder_{i + 1}")
        # SD1/SD2 folders hold the layers they use, then the final norm; SDXL: the penultimate state
        sdxl = family == "sdxl"
        tcfg = _config(
            sub / "config.json",
            lambda d, source, layout=layout, sdxl=sdxl: text_config_from_transformers(
                d,
                layout=layout,
                use_layers=(lambda n: max(1, n - 1)) if sdxl else (lambda n: n),
                final_norm=not sdxl,
                source=source,
            ),
        )
        text_cfgs.append(tcfg)
        sd |= {
            prefix + k: v for k, v in text_from_transformers(_read_weights(sub, "text_encoder"), tcfg).items()
        }
    sched = root / "scheduler" / "scheduler_config.json"
    sched_cfg = JsonFields(_read_json(sched) if sched.is_file() else {}, str(sched))
    pred = prediction
    if pred is None and sched_cfg.data:
        kind = sched_cfg.get("prediction_type", Choice(("epsilon", "v_prediction")), "epsilon")
        pred = "v" if kind == "v_prediction" else "eps"
    zero_snr = sched_cfg.get("rescale_betas_zero_snr", Bool(), False)
    if zero_snr and pred != "v":
        raise CheckpointError(f"{sched}: rescale_betas_zero_snr needs prediction_type v_prediction")
    index_fields = JsonFields(index, str(root / "model_index.json"))
    pipeline = index_fields.get("_class_name", Text(), "")
    size = JsonFields(unet_json, str(root / "unet" / "config.json")).get(
        "sample_size", Optional(Int(1, 4096)), None
    )
    cfg = _build_config(
        root,
        family=family,
        unet=unet_cfg,
        vae=vae_cfg,
        text_encoders=tuple(text_cfgs),
        prediction=pred or "eps",
        zero_terminal_snr=zero_snr,
        resolution=size * vae_cfg.downscale if size else {"sd1": 512, "sd2": 768, "sdxl": 1024}[family],
        name=root.name,
    )
    tok_dir = root / "tokenizer"
    tokenizer = CLIPTokenizer.from_folder(tok_dir) if tok_dir.is_dir() else CLIPTokenizer.bundled()
    return (
        sd,
        cfg,
        tokenizer,
        {"diffusekit.source": "diffusers", "diffusers.pipeline": pipeline or "None"},
    )


def _build_config(root: Path, **fields: Any) -> ModelConfig:
    """The folder's ModelConfig; components that do not fit together are an error naming the folder."""
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{root}: its components do not fit together: {e}") from None


def write_diffusers_folder(
    sd: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    root: str | Path,
    *,
    tokenizer: CLIPTokenizer | None = None,
) -> Path:
    """Write a single-file state dict as a diffusers pipeline folder that diffusers can load offline.

    Atomic: the folder is built complete in a partial sibling and swapped in by rename, so an existing
    model at `root` is replaced whole or not at all. A non-empty folder that is not a diffusers model,
    or a file, at `root` is refused.
    """
    root = Path(root)
    check_folder_target(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(root.parent)
    built = partial_path(root)
    if built.exists():
        shutil.rmtree(built)
    try:
        _write_folder(sd, cfg, built, tokenizer or CLIPTokenizer.bundled())
        replace_folder(built, root)
    except BaseException as e:
        shutil.rmtree(built, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"{root}: cannot write the diffusers folder ({e.strerror or e})") from None
        raise
    return root


def check_folder_target(root: Path) -> None:
    """Refuse a destination that would lose unrelated files: a file, or a non-empty non-model folder."""
    if root.is_symlink():
        raise CheckpointError(f"{root}: is a symbolic link; give the folder it points to")
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root}: exists and is not a folder; --format diffusers writes a folder")
    if root.is_dir() and any(root.iterdir()) and not (root / "model_index.json").is_file():
        raise CheckpointError(
            f"{root}: is a non-empty folder that is not a diffusers model (no model_index.json); "
            "refusing to replace it: choose a new or empty folder, or an existing diffusers model"
        )


def _write_folder(
    sd: Mapping[str, torch.Tensor], cfg: ModelConfig, root: Path, tokenizer: CLIPTokenizer
) -> None:
    root.mkdir()

    def write(sub: str, config: dict, weights: dict[str, torch.Tensor], weights_name: str) -> None:
        (root / sub).mkdir(exist_ok=True)
        (root / sub / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_state_dict(weights, root / sub / weights_name)

    unet_config = {"_class_name": "UNet2DConditionModel", **unet_config_to_diffusers(cfg.unet)}
    unet_config["sample_size"] = cfg.resolution // cfg.vae.downscale
    write(
        "unet",
        unet_config,
        unet_to_diffusers(strip_prefix(sd, UNET_PREFIX), cfg.unet),
        _WEIGHTS_FILE,
    )
    vae_config = {
        "_class_name": "AutoencoderKL",
        **vae_config_to_diffusers(cfg.vae),
        "sample_size": cfg.resolution,
    }
    write("vae", vae_config, vae_to_diffusers(strip_prefix(sd, VAE_PREFIX), cfg.vae), _WEIGHTS_FILE)
    components: dict[str, list] = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    for i, (prefix, tcfg) in enumerate(zip(cfg.text_prefixes, cfg.text_encoders, strict=True)):
        suffix = "" if i == 0 else f"_{i + 1}"
        weights, out_cfg = strip_prefix(sd, prefix), tcfg
        if cfg.family == "sd2":  # diffusers keeps only what SD2 uses: use_layers layers, no projection
            weights, out_cfg = trim_text_encoder(weights, tcfg, projection=False)
        arch = "CLIPTextModelWithProjection" if out_cfg.projection_dim else "CLIPTextModel"
        write(
            f"text_encoder{suffix}",
            {"architectures": [arch], **text_config_to_transformers(out_cfg)},
            text_to_transformers(weights, out_cfg),
            "model.safetensors",
        )
        tokenizer.save_folder(
            root / f"tokenizer{suffix}", pad_token="<|endoftext|>" if tcfg.pad_token_id else "!"
        )
        components[f"text_encoder{suffix}"] = ["transformers", arch]
        components[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    (root / "scheduler").mkdir(exist_ok=True)
    scheduler = {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction" if cfg.prediction == "v" else "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }
    if cfg.zero_terminal_snr:  # diffusers' flag for Lin et al.'s rescale, sampled with trailing spacing
        scheduler |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": _PIPELINE_CLASS[(cfg.family, cfg.is_inpaint)], "_diffusers_version": "0.42.1"}
    index |= components
    if cfg.family != "sdxl":
        index |= {
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
