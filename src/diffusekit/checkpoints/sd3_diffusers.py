"""SD3/SD3.5 single-file keys <-> a diffusers ``StableDiffusion3Pipeline`` folder, both directions.

Folder: ``transformer/`` (SD3Transformer2DModel), ``vae/`` (AutoencoderKL, 16 channels, shift factor),
``text_encoder/`` and ``text_encoder_2/`` (CLIPTextModelWithProjection), ``text_encoder_3/``
(T5EncoderModel, optional), ``tokenizer[_2]/`` (CLIP BPE), ``tokenizer_3/`` (``spiece.model``),
``scheduler/`` (FlowMatchEulerDiscreteScheduler with the model's shift).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..models.sd3_configs import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    MMDIT_PREFIX,
    SD3_VAE_PREFIX,
    T5_PREFIX,
    T5_XXL,
    SD3Config,
    T5Config,
)
from ..models.t5 import TIED_EMBED_KEY
from ..models.tokenizer import CLIPTokenizer
from .convert_clip import (
    text_config_from_transformers,
    text_config_to_transformers,
    text_from_transformers,
    text_to_transformers,
)
from .convert_mmdit import (
    mmdit_config_from_diffusers,
    mmdit_diffusers_config,
    mmdit_from_diffusers,
    mmdit_to_diffusers,
)
from .convert_vae import vae_config_to_diffusers, vae_to_diffusers
from .diffusers import _read_json, _read_weights, read_vae_folder
from .single_file import CheckpointError, save_state_dict
from .surgery import strip_prefix

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_T5_LENGTH_KEY = "_diffusekit_t5_max_length"  # a model's own T5 length when not the default 256


def t5_config_to_transformers(cfg: T5Config) -> dict:
    """A transformers ``T5Config`` dict (``config.json``) of a T5 v1.1 encoder."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def t5_config_from_transformers(d: Mapping) -> T5Config:
    """T5Config from a transformers T5 ``config.json``; rejects non-v1.1 feed-forwards."""
    if d.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise CheckpointError(
            f"T5 feed_forward_proj {d['feed_forward_proj']!r} is not supported (gated-gelu)"
        )
    base = T5Config()
    return T5Config(**{k: type(v)(d.get(k, v)) for k, v in asdict(base).items()})


def _write_t5_tokenizer(spiece: Path, folder: Path) -> None:
    """tokenizer_3/: the SentencePiece model, plus tokenizer.json when the `tokenizers` package exists."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spiece, folder / "spiece.model")
    config = {"tokenizer_class": "T5TokenizerFast", "model_max_length": 512, "extra_ids": 0}
    config |= {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    try:
        import sentencepiece
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        return
    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(str(spiece))
    vocab = [(sp.IdToPiece(i), sp.GetScore(i)) for i in range(sp.GetPieceSize())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id()))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", sp.eos_id())]
    )
    tok.decoder = decoders.Metaspace()
    tok.save(str(folder / "tokenizer.json"))


def write_sd3_diffusers_folder(
    sd: Mapping[str, torch.Tensor],
    cfg: SD3Config,
    root: str | Path,
    *,
    t5_tokenizer: str | Path | None = None,
) -> Path:
    """Write an SD3 single-file state dict as a diffusers folder that diffusers loads offline."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def write(sub: str, config: dict, weights: Mapping[str, torch.Tensor], name: str) -> None:
        (root / sub).mkdir(exist_ok=True)
        (root / sub / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_state_dict(weights, root / sub / name)

    mmdit = strip_prefix(sd, MMDIT_PREFIX)
    write("transformer", {"_class_name": "SD3Transformer2DModel", **mmdit_diffusers_config(cfg.mmdit)},
          mmdit_to_diffusers(mmdit, cfg.mmdit.depth), _WEIGHTS)  # fmt: skip
    vae_config = {
        "_class_name": "AutoencoderKL",
        **vae_config_to_diffusers(cfg.vae),
        "sample_size": cfg.resolution,
    }
    write("vae", vae_config, vae_to_diffusers(strip_prefix(sd, SD3_VAE_PREFIX), cfg.vae), _WEIGHTS)
    index: dict = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1"}
    index |= {"transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    index |= {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    index |= {"image_encoder": [None, None], "feature_extractor": [None, None]}
    bpe = CLIPTokenizer.bundled()
    for suffix, prefix, tcfg in (("", CLIP_L_PREFIX, cfg.clip_l), ("_2", CLIP_G_PREFIX, cfg.clip_g)):
        weights = strip_prefix(sd, prefix)
        if not weights:
            raise CheckpointError(
                f"no {prefix} weights to write; a diffusers SD3 folder needs both CLIP encoders"
            )
        if tcfg.projection_dim is None:  # an unprojected pooled output = an identity projection in diffusers
            eye = torch.eye(tcfg.width, dtype=weights["text_model.final_layer_norm.weight"].dtype)
            weights, tcfg = (
                {**weights, "text_projection.weight": eye},
                replace(tcfg, projection_dim=tcfg.width),
            )
        write(f"text_encoder{suffix}", text_config_to_transformers(tcfg), text_to_transformers(weights, tcfg),
              "model.safetensors")  # fmt: skip
        bpe.save_folder(
            root / f"tokenizer{suffix}", pad_token="!" if tcfg.pad_token_id == 0 else "<|endoftext|>"
        )
        index[f"text_encoder{suffix}"] = ["transformers", "CLIPTextModelWithProjection"]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    t5 = strip_prefix(sd, T5_PREFIX)
    if t5 and t5_tokenizer is not None:
        t5 = {k: v for k, v in t5.items() if k != TIED_EMBED_KEY}
        write("text_encoder_3", t5_config_to_transformers(cfg.t5), t5, "model.safetensors")
        _write_t5_tokenizer(Path(t5_tokenizer), root / "tokenizer_3")
        index |= {"text_encoder_3": ["transformers", "T5EncoderModel"]}
        index |= {"tokenizer_3": ["transformers", "T5TokenizerFast"]}
    else:  # diffusers runs with zeros in place of T5
        index |= {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    (root / "scheduler").mkdir(exist_ok=True)
    sched = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": cfg.shift,
    }
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    if cfg.t5_max_length != SD3Config.t5_max_length:  # diffusers has no field for it; "_" keys it skips
        index[_T5_LENGTH_KEY] = cfg.t5_max_length
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def read_sd3_diffusers_folder(root: str | Path) -> tuple[dict[str, torch.Tensor], SD3Config]:
    """(single-file state dict, config) from a diffusers SD3 folder (text_encoder_3 optional)."""
    root = Path(root)
    index = _read_json(root / "model_index.json")
    if index.get("_class_name") != "StableDiffusion3Pipeline":
        raise CheckpointError(f"{root}: not a StableDiffusion3Pipeline folder ({index.get('_class_name')})")
    mmdit_cfg = mmdit_config_from_diffusers(_read_json(root / "transformer" / "config.json"))
    sd = {
        MMDIT_PREFIX + k: v
        for k, v in mmdit_from_diffusers(_read_weights(root / "transformer", "unet"), mmdit_cfg.depth).items()
    }
    vae_sd, vae_cfg = read_vae_folder(root / "vae")
    sd |= {SD3_VAE_PREFIX + k: v for k, v in vae_sd.items()}
    texts = []
    for sub, prefix, pad in (("text_encoder", CLIP_L_PREFIX, 49407), ("text_encoder_2", CLIP_G_PREFIX, 0)):
        tjson = _read_json(root / sub / "config.json")
        layers = int(tjson["num_hidden_layers"])
        tcfg = text_config_from_transformers(
            tjson,
            layout="hf",
            use_layers=layers - 1,
            final_norm=False,
            with_projection=True,
            pad_token_id=pad,
        )
        texts.append(tcfg)
        sd |= {
            prefix + k: v
            for k, v in text_from_transformers(_read_weights(root / sub, "text_encoder"), tcfg).items()
        }
    t5_cfg = None
    if (root / "text_encoder_3" / "config.json").is_file():
        t5_cfg = t5_config_from_transformers(_read_json(root / "text_encoder_3" / "config.json"))
        t5_sd = _read_weights(root / "text_encoder_3", "text_encoder")
        if "shared.weight" not in t5_sd and TIED_EMBED_KEY in t5_sd:
            t5_sd = {**t5_sd, "shared.weight": t5_sd[TIED_EMBED_KEY]}
        sd |= {T5_PREFIX + k: v for k, v in t5_sd.items() if k != TIED_EMBED_KEY}
    sched_file = root / "scheduler" / "scheduler_config.json"
    shift = float(_read_json(sched_file).get("shift", 1.0)) if sched_file.is_file() else 3.0
    t5 = t5_cfg or replace(T5_XXL, d_model=mmdit_cfg.context_dim)
    size = _read_json(root / "vae" / "config.json").get("sample_size")
    resolution = size if isinstance(size, int) else 1024
    t5_length = int(index.get(_T5_LENGTH_KEY, SD3Config.t5_max_length))
    cfg = SD3Config(mmdit_cfg, vae_cfg, texts[0], texts[1], t5, shift=shift, resolution=resolution,
                    t5_max_length=t5_length, name=root.name)  # fmt: skip
    return sd, cfg


def load_t5_tokenizer_path(root: Path) -> Path | None:
    """tokenizer_3/spiece.model of a diffusers SD3 folder, if present."""
    p = root / "tokenizer_3" / "spiece.model"
    return p if p.is_file() else None
