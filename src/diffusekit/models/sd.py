"""The whole latent diffusion model as one module whose state_dict keys are the single-file keys.

Submodules sit at the attribute paths of the original LatentDiffusion / SGM DiffusionEngine
(``model.diffusion_model``, ``first_stage_model``, ``cond_stage_model.transformer`` ...), so
``StableDiffusion(cfg).state_dict()`` has exactly the keys of an original checkpoint and loading
one is ``load_state_dict`` with no key map at all.
"""

from __future__ import annotations

import torch
from torch import nn

from .clip import build_text_encoder
from .configs import UNET_PREFIX, VAE_PREFIX, ModelConfig
from .unet import UNetModel
from .vae import AutoencoderKL


def _attach(root: nn.Module, prefix: str, module: nn.Module) -> None:
    """Place `module` at the dotted `prefix` (e.g. 'conditioner.embedders.1.model.') under `root`."""
    *parents, leaf = prefix.rstrip(".").split(".")
    node = root
    for name in parents:
        if name.isdigit():  # an index into a ModuleList
            assert isinstance(node, nn.ModuleList)
            while len(node) <= int(name):
                node.append(nn.Module())
            node = node[int(name)]
            continue
        if not hasattr(node, name):
            # 'embedders' holds numbered children: a ModuleList keeps the original key names
            node.add_module(name, nn.ModuleList() if name == "embedders" else nn.Module())
        node = getattr(node, name)
    node.add_module(leaf, module)


class StableDiffusion(nn.Module):
    """U-Net + AutoencoderKL + text encoder(s) of one SD family, keyed like the original checkpoint."""

    def __init__(
        self, cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.cfg = cfg
        _attach(self, UNET_PREFIX, UNetModel(cfg.unet, device=device, dtype=dtype))
        _attach(self, VAE_PREFIX, AutoencoderKL(cfg.vae, device=device, dtype=dtype))
        for prefix, tcfg in zip(cfg.text_prefixes, cfg.text_encoders, strict=True):
            _attach(self, prefix, build_text_encoder(tcfg, device=device, dtype=dtype))

    def _at(self, prefix: str) -> nn.Module:
        return self.get_submodule(prefix.rstrip("."))

    @property
    def unet(self) -> UNetModel:
        return self._at(UNET_PREFIX)

    @property
    def vae(self) -> AutoencoderKL:
        return self._at(VAE_PREFIX)

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self._at(p) for p in self.cfg.text_prefixes]

    def components(self) -> dict[str, tuple[str, nn.Module]]:
        """{'unet': (prefix, module), 'vae': ..., 'text_encoder': ..., 'text_encoder_2': ...}."""
        out = {"unet": (UNET_PREFIX, self.unet), "vae": (VAE_PREFIX, self.vae)}
        for i, p in enumerate(self.cfg.text_prefixes):
            out["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = (p, self._at(p))
        return out
