"""LyCORIS (LoHa, LoKr) and DoRA parity: adapters made by the real `peft` library inside diffusers' U-Net and
CLIP text encoders, written to a file with LyCORIS/kohya names by the rules below (not by our writer), and
loaded by diffusekit; outputs compared in fp32.

Naming rules used here (sd-scripts networks/lora.py, LyCORIS): module name = prefix + module path with "."
turned into "_" (``lora_unet_`` + the diffusers path for SD1/SD2, the SGM path for SDXL; ``lora_te_``, or
``lora_te1_``/``lora_te2_`` for SDXL, + the transformers CLIP path); PEFT's leaf tensors keep their names
(``hada_w1_a``, ``lokr_w2_b``...), ``lora_A``/``lora_B`` become ``lora_down.weight``/``lora_up.weight``;
``alpha`` is written per module; PEFT's DoRA ``lora_magnitude_vector`` (per output row) becomes
``dora_scale`` shaped (out, 1[, 1, 1]), LyCORIS' ``wd_on_out`` layout.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from diffusekit.adapters.lora import apply_loras, load_lora
from diffusekit.checkpoints.diffusers import write_diffusers_folder
from diffusekit.checkpoints.load import load_model
from diffusekit.checkpoints.single_file import save_state_dict
from diffusekit.models.unet import size_embedding
from helpers import make_checkpoint

pytest.importorskip("peft")
warnings.filterwarnings("ignore")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"]  # fmt: skip
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
_PEFT_PARAM = re.compile(
    r"(.+)\.(hada_\w+|lokr_\w+|lora_A|lora_B|lora_magnitude_vector)\.default(\.weight)?$"
)
_LEAF = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}


def _configs(kind: str):
    """(U-Net config, text config, alpha) of one adapter kind; rank 2 keeps LoKr's w2 factor low-rank."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind == "loha":
        make = lambda t, conv: LoHaConfig(r=2, alpha=3, init_weights=False, target_modules=t,  # noqa: E731
                                          use_effective_conv2d=conv)  # fmt: skip
        return make(UNET_TARGETS, False), make(TEXT_TARGETS, False), 3.0
    if kind == "loha_tucker":  # 3x3 convs as Tucker cores hada_t1 / hada_t2
        make = lambda t: LoHaConfig(r=2, alpha=5, init_weights=False, target_modules=t,  # noqa: E731
                                    use_effective_conv2d=True)  # fmt: skip
        return make(UNET_TARGETS), make(TEXT_TARGETS), 5.0
    if kind == "lokr":
        make = lambda t: LoKrConfig(r=2, alpha=3, init_weights=False, target_modules=t,  # noqa: E731
                                    decompose_both=True, use_effective_conv2d=True)  # fmt: skip
        return make(UNET_TARGETS), make(TEXT_TARGETS), 3.0
    make = lambda t: LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, use_dora=True,  # noqa: E731
                                target_modules=t)  # fmt: skip
    return make(UNET_TARGETS), make(TEXT_TARGETS), 3.0


class Family:
    """A tiny model as our single file and as a diffusers folder; fresh diffusers modules on demand."""

    def __init__(self, name: str, tmp_path):
        self.cfg, self.sd, self.path = make_checkpoint(name, tmp_path)
        self.folder = write_diffusers_folder(self.sd, self.cfg, tmp_path / "folder")
        self.xl = self.cfg.family == "sdxl"
        self.ours = load_model(self.path).model
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(1, self.cfg.unet.in_channels, 8, 8, generator=g)
        self.t = torch.tensor([500.0])
        self.ctx = torch.randn(1, 77, self.cfg.unet.context_dim, generator=g)
        self.ids = torch.randint(0, 49406, (1, 77), generator=g)
        self.pooled = torch.randn(1, 32, generator=g)
        self.time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        self.sgm = self._sgm_paths() if self.xl else None

    def fresh(self) -> dict[str, nn.Module]:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        out = {"unet": UNet2DConditionModel.from_pretrained(self.folder / "unet")}
        out["text_encoder"] = CLIPTextModel.from_pretrained(self.folder / "text_encoder")
        if self.xl:
            out["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                self.folder / "text_encoder_2"
            )
        return {k: m.eval() for k, m in out.items()}

    def _sgm_paths(self) -> dict[str, str]:
        """{diffusers U-Net module path: SGM module path}, read off diffusers' LDM -> diffusers converter."""
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        prefix = "model.diffusion_model."
        keys = [k for k in self.sd if k.startswith(prefix)]
        tagged = {k: torch.full(self.sd[k].shape, float(i)) for i, k in enumerate(keys)}
        converted = convert_ldm_unet_checkpoint(tagged, dict(self.fresh()["unet"].config))
        return {
            dk.removesuffix(".weight"): keys[int(v.flatten()[0])].removeprefix(prefix).removesuffix(".weight")
            for dk, v in converted.items()
            if dk.endswith(".weight")
        }

    @torch.no_grad()
    def ref_outputs(self, mods: dict[str, nn.Module]) -> list[torch.Tensor]:
        extra = (
            {"added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}} if self.xl else {}
        )
        outs = [mods["unet"](self.x, self.t, self.ctx, **extra).sample]
        if self.cfg.family == "sd2":  # what SD2 conditions on: the last kept layer + final LayerNorm
            return outs + [mods["text_encoder"](self.ids).last_hidden_state]
        encoders = [mods["text_encoder"]] + ([mods["text_encoder_2"]] if self.xl else [])
        return outs + [te(self.ids, output_hidden_states=True).hidden_states[-1] for te in encoders]

    @torch.no_grad()
    def our_outputs(self) -> list[torch.Tensor]:
        m = self.ours
        y = torch.cat([self.pooled, size_embedding(self.time_ids, self.cfg.unet.size_embed_dim)], 1)
        outs = [m.unet(self.x, self.t, self.ctx, y=y if self.xl else None)]
        if self.cfg.family == "sd2":
            return outs + [m.text_encoders[0](self.ids, final_norm=True).hidden]
        return outs + [
            te(self.ids, use_layers=te.cfg.layers, final_norm=False).hidden for te in m.text_encoders
        ]

    def kohya_name(self, comp: str, path: str) -> str:
        if comp == "unet":
            return "lora_unet_" + (self.sgm[path] if self.xl else path).replace(".", "_")
        if not path.startswith("text_model."):
            path = "text_model." + path  # kohya trains on transformers < 5's CLIPTextModel
        prefix = {"text_encoder": "lora_te1" if self.xl else "lora_te", "text_encoder_2": "lora_te2"}[comp]
        return f"{prefix}_{path.replace('.', '_')}"


def _lycoris_file(fam: Family, mods: dict[str, nn.Module], alpha: float) -> dict[str, torch.Tensor]:
    """The injected PEFT adapters as a LyCORIS/kohya state dict (rules in the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for comp, model in mods.items():
        for pname, p in model.named_parameters():
            m = _PEFT_PARAM.match(pname)
            if m is None:
                continue
            path, leaf = m.group(1), m.group(2)
            name = fam.kohya_name(comp, path)
            t = p.detach().clone()
            if leaf == "lora_magnitude_vector":
                ndim = model.get_submodule(path).base_layer.weight.ndim
                t = t.reshape(-1, *([1] * (ndim - 1)))  # per output row: (out, 1[, 1, 1])
            out[f"{name}.{_LEAF.get(leaf, leaf)}"] = t
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(f"tiny_{name}", tmp_path_factory.mktemp(name))
        return cache[name]

    return get


CASES = [(f, k) for f in ("sd1", "sdxl") for k in ("loha", "loha_tucker", "lokr", "dora")]
CASES += [("sd2", "loha"), ("sd2", "dora")]  # SD2: q/k/v adapters land in the packed OpenCLIP in_proj


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_peft_adapter_in_lycoris_file_matches_peft(family, kind, families, tmp_path):
    from peft import inject_adapter_in_model

    fam = families(family)
    mods = fam.fresh()
    base_ref = fam.ref_outputs(mods)
    ucfg, tcfg, alpha = _configs(kind)
    torch.manual_seed(0)
    for comp, model in mods.items():
        inject_adapter_in_model(ucfg if comp == "unet" else tcfg, model)
    if kind == "dora":  # PEFT starts the magnitude at ||W + s B A||, where DoRA equals LoRA: move it
        g = torch.Generator().manual_seed(2)
        for model in mods.values():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.data *= 0.5 + torch.rand(p.shape, generator=g)
    ref = fam.ref_outputs(mods)
    sd = _lycoris_file(fam, mods, alpha)
    leaves = {k.partition(".")[2] for k in sd}
    if kind == "loha_tucker":
        assert "hada_t1" in leaves
    if kind == "lokr":
        assert {"lokr_w1_a", "lokr_w2_b", "lokr_t2"} <= leaves
    path = tmp_path / f"{kind}.safetensors"
    save_state_dict(sd, path)
    net = load_lora(path)
    assert len(net.resolve(fam.cfg)[0]) == len(net.modules) == len({k.partition(".")[0] for k in sd})
    with apply_loras(fam.ours, [(net, 1.0, 1.0)]) as applied:
        assert applied.unmatched == {net.name: []}
        got = fam.our_outputs()
    assert _max_rel(base_ref, ref) > 1e-2, "the adapter changes nothing: the comparison would prove nothing"
    diff = _max_rel(got, ref)
    print(f"{family} {kind}: max relative difference vs peft {diff:.2e}")
    assert diff <= 1e-4
    with apply_loras(fam.ours, [(net, 1.0, 1.0)], merge=True):
        merged = fam.our_outputs()
    assert _max_rel(merged, ref) <= 1e-4
    if kind == "dora":
        # the same adapters in diffusers' own DoRA file (PEFT keys, lora_magnitude_vector, alpha in metadata)
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from peft.utils import get_peft_model_state_dict

        kw = {}
        for comp, model in mods.items():
            kw[f"{comp}_lora_layers"] = get_peft_model_state_dict(model)
            kw[f"{comp}_lora_adapter_metadata"] = (ucfg if comp == "unet" else tcfg).to_dict()
        cls = StableDiffusionXLPipeline if fam.xl else StableDiffusionPipeline
        cls.save_lora_weights(tmp_path / "peft", **kw)
        peft_net = load_lora(tmp_path / "peft" / "pytorch_lora_weights.safetensors")
        assert all(m.dora_scale is not None for m in peft_net.modules.values())
        with apply_loras(fam.ours, [(peft_net, 1.0, 1.0)]) as applied:
            assert applied.unmatched == {peft_net.name: []}
            assert _max_rel(fam.our_outputs(), ref) <= 1e-4
        # the magnitude matters: without it the same file gives other outputs
        plain = load_lora(path)
        for m in plain.modules.values():
            m.dora_scale = None
        with apply_loras(fam.ours, [(plain, 1.0, 1.0)]):
            assert _max_rel(fam.our_outputs(), ref) > 1e-3
