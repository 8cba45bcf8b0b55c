"""CLIP text encoder weights and configs: our layouts <-> transformers ``CLIPTextModel[WithProjection]``.

Our "hf" layout *is* transformers' layout, so its map is the identity. The "openclip" layout differs by
names (``transformer.resblocks.N.ln_1`` <-> ``text_model.encoder.layers.N.layer_norm1`` ...), by the packed
attention in-projection (one (3W, W) ``in_proj_weight`` <-> ``q_proj/k_proj/v_proj``), and by the
projection (open_clip's (W, P) matrix used as ``x @ P`` <-> a bias-free Linear with a (P, W) weight).

transformers state dicts come in two spellings: files written by transformers < 5 (and every diffusers
repo on the hub) prefix the tower with ``text_model.``; transformers 5 saves a plain ``CLIPTextModel``
without it. ``text_from_transformers`` accepts both; ``text_to_transformers`` writes the prefixed form,
which every transformers version loads.

Truncated encoders. diffusers keeps only what the pipeline uses: SD2's OpenCLIP ViT-H is stored as a
23-layer ``CLIPTextModel`` without projection (SD2 conditions on layer 23 + final LayerNorm, so layer 24
and ``text_projection`` of the original file are dropped); SDXL's bigG is a full 32-layer
``CLIPTextModelWithProjection``. Such a file converts to a config with ``layers=23`` and
``projection_dim=None``: its ``hidden`` output equals the original model's, while ``pooled`` is then the
unprojected final-LN state of layer 23, which SD2 never uses. ``trim_text_encoder`` performs that
truncation on a full state dict (refusing to drop a layer the hidden state needs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch

from ..models.clip import UNUSED_KEY_SUFFIXES, build_text_encoder
from ..models.configs import TextEncoderConfig
from ..models.validate import MAX_COUNT, MAX_WIDTH, Choice, Float, Int, Items, JsonFields, Optional, Text

_TOWER = "text_model."
_TOWER_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
_BOS, _EOS = 49406, 49407

# open_clip module name -> transformers module name, inside one transformer block.
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # transposed: (W, P) <-> (P, W)
}
_BLOCK_PREFIX = ("transformer.resblocks.", "text_model.encoder.layers.")


# ---------------------------------------------------------------------------------------------
# Configs


def text_config_to_transformers(cfg: TextEncoderConfig) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` dict (its ``config.json``) for `cfg`, in either layout."""
    arch = "CLIPTextModelWithProjection" if cfg.projection_dim is not None else "CLIPTextModel"
    return {
        "architectures": [arch],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        # transformers always carries a projection_dim; it only matters for the WithProjection class.
        "projection_dim": cfg.projection_dim if cfg.projection_dim is not None else cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.max_positions,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": _BOS,
        "eos_token_id": _EOS,  # pool at the first <|endoftext|>, like our argmax
    }


def text_config_from_transformers(
    d: object,
    *,
    layout: str,
    use_layers: int | Callable[[int], int],
    final_norm: bool,
    with_projection: bool | None = None,
    pad_token_id: int | None = None,
    source: str = "text_encoder/config.json",
) -> TextEncoderConfig:
    """TextEncoderConfig from a transformers ``CLIPTextConfig`` dict.

    The projection exists iff `with_projection` (default: ``architectures`` names
    ``CLIPTextModelWithProjection``). The tokenizer pad id defaults to the layout's convention (49407 for
    OpenAI CLIP, 0 for open_clip) because the ``pad_token_id`` in diffusers' text encoder configs is a
    placeholder (often 1) that no SD tokenizer uses. `use_layers` may be a function of the layer count.
    Every field is type- and range-checked; a ConfigError names `source` and the field.
    """
    if layout not in ("hf", "openclip"):
        raise ValueError(f"unknown text encoder layout {layout!r}; valid: 'hf', 'openclip'")
    f = JsonFields(d, source)
    width = f.get("hidden_size", Int(1, MAX_WIDTH))
    layers = f.get("num_hidden_layers", Int(1, MAX_COUNT))
    heads = f.get("num_attention_heads", Int(1, 1024))
    mlp = f.get("intermediate_size", Int(1, MAX_WIDTH))
    act = f.get("hidden_act", Choice(("quick_gelu", "gelu")), "quick_gelu")
    if with_projection is None:
        archs = f.get("architectures", Optional(Items(Text(), 0, 8)), None) or ()
        with_projection = "CLIPTextModelWithProjection" in archs
    if pad_token_id is None:
        pad_token_id = _EOS if layout == "hf" else 0
    projection = f.get("projection_dim", Optional(Int(1, MAX_WIDTH)), None) or width
    return f.build(
        TextEncoderConfig,
        {"width": "hidden_size", "heads": "num_attention_heads", "layers": "num_hidden_layers"},
        layout=layout,
        width=width,
        layers=layers,
        heads=heads,
        mlp_width=mlp,
        vocab_size=f.get("vocab_size", Int(1, MAX_WIDTH), 49408),
        max_positions=f.get("max_position_embeddings", Int(77, 65536), 77),
        activation=act,
        projection_dim=projection if with_projection else None,
        layer_norm_eps=f.get("layer_norm_eps", Float(0.0, 1.0), 1e-5),
        pad_token_id=pad_token_id,
        use_layers=use_layers(layers) if callable(use_layers) else use_layers,
        final_norm=final_norm,
    )


# ---------------------------------------------------------------------------------------------
# Key maps


def _transformers_names(key: str, layout: str) -> tuple[str, ...]:
    """The transformers key(s) holding our `key`: one, or q/k/v for a packed in-projection."""
    if layout == "hf":
        return (key,)
    if key in _TOP_RENAMES:
        return (_TOP_RENAMES[key],)
    if not key.startswith(_BLOCK_PREFIX[0]):
        raise ValueError(f"no transformers counterpart for open_clip key {key!r}")
    n, _, rest = key[len(_BLOCK_PREFIX[0]) :].partition(".")
    base = f"{_BLOCK_PREFIX[1]}{n}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        param = "weight" if rest.endswith("weight") else "bias"
        return tuple(f"{base}self_attn.{p}_proj.{param}" for p in "qkv")
    module, _, param = rest.rpartition(".")
    if module not in _BLOCK_RENAMES:
        raise ValueError(f"no transformers counterpart for open_clip key {key!r}")
    return (f"{base}{_BLOCK_RENAMES[module]}.{param}",)


def _expected(cfg: TextEncoderConfig) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in build_text_encoder(cfg, device="meta").state_dict().items()}


def text_key_map(cfg: TextEncoderConfig) -> dict[str, tuple[str, ...]]:
    """{our key: transformers key(s)} for every parameter of a text encoder with config `cfg`."""
    return {k: _transformers_names(k, cfg.layout) for k in _expected(cfg)}


def _is_unused(key: str) -> bool:
    return key.endswith(UNUSED_KEY_SUFFIXES) or key == "embeddings.position_ids"


def _with_tower_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the ``text_model.`` prefix that transformers 5 leaves out when saving a plain CLIPTextModel."""
    return {_TOWER + k if k.startswith(_TOWER_PARTS) else k: v for k, v in sd.items()}


def _first(keys: list[str]) -> str:
    return repr(keys[0]) + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _check_keys(given: set[str], expected: set[str], what: str, cfg: TextEncoderConfig) -> None:
    unexpected, missing = sorted(given - expected), sorted(expected - given)
    parts = [f"unexpected key {_first(unexpected)}"] if unexpected else []
    parts += [f"missing key {_first(missing)}"] if missing else []
    if parts:
        shape = f"{cfg.layers} layers, projection {'yes' if cfg.projection_dim is not None else 'no'}"
        raise ValueError(
            f"{what} state dict does not match the text encoder config ({shape}): " + "; ".join(parts)
        )


def _is_projection(key: str, layout: str) -> bool:
    return layout == "openclip" and key == "text_projection"


def text_from_transformers(sd: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel[WithProjection] state dict -> our state dict for `cfg` (exact).

    Keys with or without the ``text_model.`` prefix are accepted; ``position_ids`` buffers are dropped.
    """
    sd = {k: v for k, v in _with_tower_prefix(sd).items() if not _is_unused(k)}
    key_map = text_key_map(cfg)
    _check_keys(set(sd), {t for ts in key_map.values() for t in ts}, "transformers CLIPTextModel", cfg)
    shapes = _expected(cfg)
    out: dict[str, torch.Tensor] = {}
    for key, tkeys in key_map.items():
        if len(tkeys) == 3:
            value = torch.cat([sd[t] for t in tkeys], dim=0)  # q, k, v -> (3W, W) / (3W,)
        elif _is_projection(key, cfg.layout):
            value = sd[tkeys[0]].t().contiguous()  # Linear (P, W) -> matrix (W, P)
        else:
            value = sd[tkeys[0]]
        if value.shape != shapes[key]:
            raise ValueError(
                f"{' + '.join(tkeys)}: shape {tuple(value.shape)} does not fit {key} {tuple(shapes[key])}"
            )
        out[key] = value
    return out


def text_to_transformers(sd: Mapping[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Our state dict for `cfg` -> transformers CLIPTextModel[WithProjection] keys (prefixed form)."""
    sd = {k: v for k, v in sd.items() if not _is_unused(k)}
    shapes = _expected(cfg)
    _check_keys(set(sd), set(shapes), f"text encoder ({cfg.layout} layout)", cfg)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if value.shape != shapes[key]:
            raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {tuple(shapes[key])}")
        tkeys = _transformers_names(key, cfg.layout)
        if len(tkeys) == 3:
            for tkey, part in zip(tkeys, value.chunk(3, dim=0), strict=True):
                out[tkey] = part.clone()  # own storage, so the dict can be saved with safetensors
        elif _is_projection(key, cfg.layout):
            out[tkeys[0]] = value.t().contiguous()  # (W, P) -> Linear weight (P, W)
        else:
            out[tkeys[0]] = value
    return out


def trim_text_encoder(
    sd: Mapping[str, torch.Tensor],
    cfg: TextEncoderConfig,
    *,
    layers: int | None = None,
    projection: bool = True,
) -> tuple[dict[str, torch.Tensor], TextEncoderConfig]:
    """Drop transformer layers past `layers` (default ``cfg.use_layers``) and, unless `projection`, the
    text projection, from our state dict; returns it with the matching config.

    This is how diffusers stores SD2's encoder (23 layers, no projection). The hidden state is unchanged;
    the pooled output becomes the unprojected final-LN state of the last kept layer.
    """
    layers = cfg.use_layers if layers is None else layers
    if not cfg.use_layers <= layers <= cfg.layers:
        raise ValueError(
            f"cannot keep {layers} layers: the hidden state needs {cfg.use_layers}, "
            f"the model has {cfg.layers}"
        )
    new_cfg = replace(cfg, layers=layers, projection_dim=cfg.projection_dim if projection else None)
    keep = set(_expected(new_cfg))
    _check_keys({k for k in sd if not _is_unused(k)}, set(_expected(cfg)), "text encoder", cfg)
    return {k: v for k, v in sd.items() if k in keep}, new_cfg
