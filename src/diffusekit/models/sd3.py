"""The whole SD3/SD3.5 model as one module whose state_dict keys are the single-file keys.

Submodules sit where Stability's single files keep them: ``model.diffusion_model`` (MMDiT),
``first_stage_model`` (16-channel VAE), ``text_encoders.{clip_l,clip_g,t5xxl}.transformer`` (transformers
layouts). The text encoders are optional, as in the files: SD3 Medium shipped with and without them,
and T5-XXL (4.8 B parameters) is often left out.
"""

from __future__ import annotations

import torch
from torch import nn

from .clip import CLIPTextModel
from .mmdit import MMDiT
from .sd import _attach
from .sd3_configs import CLIP_G_PREFIX, CLIP_L_PREFIX, MMDIT_PREFIX, SD3_VAE_PREFIX, T5_PREFIX, SD3Config
from .t5 import T5EncoderModel
from .vae import AutoencoderKL

COMPONENTS = ("mmdit", "vae", "clip_l", "clip_g", "t5")
PREFIXES = {
    "mmdit": MMDIT_PREFIX,
    "vae": SD3_VAE_PREFIX,
    "clip_l": CLIP_L_PREFIX,
    "clip_g": CLIP_G_PREFIX,
    "t5": T5_PREFIX,
}


class StableDiffusion3(nn.Module):
    """MMDiT + VAE + (optionally) CLIP-L, CLIP-G and T5-XXL, keyed like the original single file."""

    def __init__(
        self,
        cfg: SD3Config,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        with_clip: bool = True,
        with_t5: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        kw = {"device": device, "dtype": dtype}
        _attach(self, MMDIT_PREFIX, MMDiT(cfg.mmdit, **kw))
        _attach(self, SD3_VAE_PREFIX, AutoencoderKL(cfg.vae, **kw))
        if with_clip:
            _attach(self, CLIP_L_PREFIX, CLIPTextModel(cfg.clip_l, **kw))
            _attach(self, CLIP_G_PREFIX, CLIPTextModel(cfg.clip_g, **kw))
        if with_t5:
            _attach(self, T5_PREFIX, T5EncoderModel(cfg.t5, **kw))

    def component(self, name: str) -> nn.Module | None:
        """The submodule of a component ('mmdit', 'vae', 'clip_l', 'clip_g', 't5'), None if absent."""
        if name not in PREFIXES:
            raise ValueError(f"unknown SD3 component {name!r}; valid: {', '.join(COMPONENTS)}")
        try:
            return self.get_submodule(PREFIXES[name].rstrip("."))
        except AttributeError:
            return None

    @property
    def mmdit(self) -> MMDiT:
        return self.component("mmdit")

    @property
    def vae(self) -> AutoencoderKL:
        return self.component("vae")

    @property
    def clip_l(self) -> CLIPTextModel | None:
        return self.component("clip_l")

    @property
    def clip_g(self) -> CLIPTextModel | None:
        return self.component("clip_g")

    @property
    def t5(self) -> T5EncoderModel | None:
        return self.component("t5")
