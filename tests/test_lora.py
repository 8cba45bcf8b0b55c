"""LoRA parity: our run-time LoRA against diffusers' load_lora_weights (PEFT and kohya paths), A1111's merge
math, our writer read back by diffusers, and the base model left bit-identical."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from diffusekit.adapters.keys import adapter_names
from diffusekit.adapters.lora import (
    LoraError,
    LoraModule,
    LoraNetwork,
    apply_loras,
    load_lora,
    merge_loras,
    network_from_state_dict,
)
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


class Setup:
    """A tiny model as our file and as a diffusers folder, and a PEFT-made LoRA saved by diffusers."""

    def __init__(self, name: str, tmp_path):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        self.cfg, self.sd, self.path = make_checkpoint(name, tmp_path)
        self.folder = write_diffusers_folder(self.sd, self.cfg, tmp_path / "folder")
        self.xl = self.cfg.family == "sdxl"
        self.cls = StableDiffusionXLPipeline if self.xl else StableDiffusionPipeline
        pipe = self.load_pipe()
        torch.manual_seed(0)
        ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS)
        tcfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=TEXT_TARGETS)
        pipe.unet.add_adapter(ucfg)
        encoders = ["text_encoder", "text_encoder_2"] if self.xl else ["text_encoder"]
        kw = {
            "unet_lora_layers": get_peft_model_state_dict(pipe.unet),
            "unet_lora_adapter_metadata": ucfg.to_dict(),
        }
        for enc in encoders:
            getattr(pipe, enc).add_adapter(tcfg)
            kw[f"{enc}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, enc))
            kw[f"{enc}_lora_adapter_metadata"] = tcfg.to_dict()
        self.cls.save_lora_weights(tmp_path / "peft", **kw)
        self.peft_file = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
        self.ref = self.load_pipe()  # a clean pipeline that loads LoRA files
        self.ours = load_model(self.path).model
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(1, self.cfg.unet.in_channels, 8, 8, generator=g)
        self.t = torch.tensor([500.0])
        self.ctx = torch.randn(1, 77, self.cfg.unet.context_dim, generator=g)
        self.ids = torch.randint(0, 49406, (1, 77), generator=g)
        self.pooled = torch.randn(1, 32, generator=g)
        self.time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])

    def load_pipe(self):
        pipe = self.cls.from_pretrained(self.folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def ref_outputs(self) -> list[torch.Tensor]:
        """diffusers' U-Net output and each text encoder's last hidden state (SD2: what the U-Net reads)."""
        p = self.ref
        extra = (
            {"added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}} if self.xl else {}
        )
        outs = [p.unet(self.x, self.t, self.ctx, **extra).sample]
        encoders = [p.text_encoder, p.text_encoder_2] if self.xl else [p.text_encoder]
        if self.cfg.family == "sd2":  # what SD2 conditions on: the last kept layer + final LayerNorm
            return outs + [p.text_encoder(self.ids).last_hidden_state]
        return outs + [te(self.ids, output_hidden_states=True).hidden_states[-1] for te in encoders]

    @torch.no_grad()
    def our_outputs(self) -> list[torch.Tensor]:
        m = self.ours
        y = torch.cat([self.pooled, size_embedding(self.time_ids, self.cfg.unet.size_embed_dim)], 1)
        outs = [m.unet(self.x, self.t, self.ctx, y=y if self.xl else None)]
        if self.cfg.family == "sd2":  # diffusers stores SD2's encoder cut at the layer SD2 uses
            return outs + [m.text_encoders[0](self.ids, final_norm=True).hidden]
        return outs + [
            te(self.ids, use_layers=te.cfg.layers, final_norm=False).hidden for te in m.text_encoders
        ]


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return Setup("tiny_sd1", tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return Setup("tiny_sd2", tmp_path_factory.mktemp("sd2"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return Setup("tiny_sdxl", tmp_path_factory.mktemp("sdxl"))


def _kohya_from_peft(peft_sd: dict[str, torch.Tensor], alpha_of, sgm_unet: dict[str, str] | None = None):
    """A kohya file built from kohya's naming rules: lora_<prefix>_<module path with '_'> + down/up/alpha.

    `sgm_unet` maps diffusers U-Net module paths to the SGM paths an SDXL kohya file uses.
    """
    out = {}
    te_prefix = {"text_encoder": "lora_te1" if sgm_unet else "lora_te", "text_encoder_2": "lora_te2"}
    for key, value in peft_sd.items():
        module, leaf = key.rsplit(".lora_", 1)
        comp, path = module.split(".", 1)
        if comp == "unet":
            path = sgm_unet[path] if sgm_unet else path
            name = "lora_unet_" + path.replace(".", "_")
        else:
            if not path.startswith("text_model."):
                path = "text_model." + path  # kohya trains on transformers < 5's CLIPTextModel
            name = te_prefix[comp] + "_" + path.replace(".", "_")
        out[f"{name}.{'lora_down' if leaf == 'A.weight' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(alpha_of(comp))
    return out


def _check_pair(setup: Setup, file, ours_net: LoraNetwork, te: float = 1.0, unet: float = 1.0) -> float:
    setup.ref.load_lora_weights(file)
    if (te, unet) != (1.0, 1.0):
        comps = {"unet": unet, "text_encoder": te} | ({"text_encoder_2": te} if setup.xl else {})
        setup.ref.set_adapters(setup.ref.get_active_adapters(), adapter_weights=[comps])
    try:
        ref = setup.ref_outputs()
    finally:
        setup.ref.unload_lora_weights()
    base = setup.our_outputs()
    with apply_loras(setup.ours, [(ours_net, te, unet)]) as applied:
        assert applied.unmatched == {ours_net.name: []}
        got = setup.our_outputs()
    assert _max_rel(base, ref) > 1e-2, "the LoRA changes nothing: the comparison would prove nothing"
    diff = _max_rel(got, ref)
    print(f"max relative difference vs diffusers: {diff:.2e}")
    return diff


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_peft_file_matches_diffusers(family, request):
    s = request.getfixturevalue(family)
    net = load_lora(s.peft_file)
    assert len(net.resolve(s.cfg)[0]) == len(net.modules)
    assert _check_pair(s, s.peft_file, net) <= 1e-4


def test_peft_file_with_separate_te_and_unet_weights(sd1):
    net = load_lora(sd1.peft_file)
    assert _check_pair(sd1, sd1.peft_file, net, te=0.5, unet=-0.7) <= 1e-4


def _sgm_paths(setup: Setup) -> dict[str, str]:
    names = adapter_names(setup.cfg)
    return {n.removeprefix("unet."): t.path for n, t in names.items() if n.startswith("unet.")}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_independent_kohya_file_matches_diffusers(family, request, tmp_path):
    s = request.getfixturevalue(family)
    from safetensors.torch import load_file

    peft_sd = load_file(s.peft_file)
    kohya = _kohya_from_peft(
        peft_sd, lambda comp: 8.0 if comp == "unet" else 3.0, _sgm_paths(s) if s.xl else None
    )
    path = tmp_path / "kohya.safetensors"
    save_state_dict(kohya, path)
    net = load_lora(path)
    assert _check_pair(s, path, net) <= 1e-4


@pytest.mark.parametrize("style", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_our_writer_loads_in_diffusers(style, family, request, tmp_path):
    s = request.getfixturevalue(family)
    net = load_lora(s.peft_file)
    path = net.save(tmp_path / f"ours_{style}.safetensors", s.cfg, style=style)
    again = load_lora(path)
    assert _check_pair(s, path, again) <= 1e-4


def test_remove_leaves_base_bit_identical(sd1):
    net = load_lora(sd1.peft_file)
    before_sd = {k: v.clone() for k, v in sd1.ours.state_dict().items()}
    before = sd1.our_outputs()
    applied = apply_loras(sd1.ours, [(net, 1.0, 1.0)])
    changed = sd1.our_outputs()
    applied.remove()
    after = sd1.our_outputs()
    assert any(not torch.equal(a, b) for a, b in zip(before, changed, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.equal(v, before_sd[k]) for k, v in sd1.ours.state_dict().items())


def test_merge_equals_runtime_and_a1111_formula(sd1):
    """Merged weights (W + m * alpha/r * up @ down) give the run-time output; ΔW checked directly."""
    net = load_lora(sd1.peft_file)
    merged = merge_loras(sd1.sd, sd1.cfg, [(net, 0.6, 0.9)])
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    m = net.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    expected = sd1.sd[key] + 0.9 * (8 / 4) * (m.up @ m.down)  # A1111: multiplier * alpha / dim * up @ down
    torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
    conv_key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    mc = net.modules["unet.down_blocks.0.resnets.0.conv1"]
    expected = sd1.sd[conv_key] + 0.9 * 2 * (mc.up.flatten(1) @ mc.down.flatten(1)).reshape(
        sd1.sd[conv_key].shape
    )
    torch.testing.assert_close(merged[conv_key], expected, rtol=0, atol=1e-6)
    with apply_loras(sd1.ours, [(net, 0.6, 0.9)]):
        runtime = sd1.our_outputs()
    base = {k: v.clone() for k, v in sd1.ours.state_dict().items()}
    sd1.ours.load_state_dict(merged, strict=False)
    try:
        baked = sd1.our_outputs()
    finally:
        sd1.ours.load_state_dict(base)
    assert _max_rel(baked, runtime) <= 1e-5


def test_two_loras_add_with_their_own_weights(sd1):
    a = load_lora(sd1.peft_file, name="a")
    b = LoraNetwork(
        "b", {k: LoraModule(m.down.flip(0), m.up * 0.5, alpha=m.alpha) for k, m in a.modules.items()}
    )
    loras = [(a, 0.3, 1.0), (b, 1.0, -0.4)]
    with apply_loras(sd1.ours, loras):
        runtime = sd1.our_outputs()
    base = {k: v.clone() for k, v in sd1.ours.state_dict().items()}
    sd1.ours.load_state_dict(merge_loras(sd1.sd, sd1.cfg, loras), strict=False)
    try:
        baked = sd1.our_outputs()
    finally:
        sd1.ours.load_state_dict(base)
    assert _max_rel(baked, runtime) <= 1e-5


def test_lycoris_cp_mid_and_strided_conv_follow_a1111_einsum(sd1):
    """LoCon with lora_mid on a stride-2 conv: run-time output equals conv with W + einsum(mid, up, down)."""
    g = torch.Generator().manual_seed(3)
    conv = sd1.ours.unet.input_blocks[3][0].op  # Downsample: 3x3, stride 2
    out_ch, in_ch, r = conv.weight.shape[0], conv.weight.shape[1], 3
    down = torch.randn(r, in_ch, 1, 1, generator=g)
    mid = torch.randn(r, r, 3, 3, generator=g)
    up = torch.randn(out_ch, r, 1, 1, generator=g)
    name = "lora_unet_down_blocks_0_downsamplers_0_conv"
    net = network_from_state_dict(
        {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up,
         f"{name}.alpha": torch.tensor(1.5)}, "cp")  # fmt: skip
    x = torch.randn(1, in_ch, 8, 8, generator=g)
    delta = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.flatten(1), down.flatten(1)) * (1.5 / r)
    expected = F.conv2d(x, conv.weight + 0.7 * delta, conv.bias, stride=2, padding=1)
    with torch.no_grad(), apply_loras(sd1.ours, [(net, 1.0, 0.7)]):
        got = conv(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unmatched_keys_are_reported_and_wrong_family_is_an_error(sd1, sdxl):
    net = load_lora(sd1.peft_file)
    extra = dict(net.modules)
    extra["lora_unet_no_such_block_to_q"] = next(iter(net.modules.values()))
    odd = LoraNetwork("odd", extra, unsupported=["lora_unet_x.hada_w1_a"])
    with apply_loras(sd1.ours, [(odd, 1.0, 1.0)]) as applied:
        assert applied.unmatched["odd"] == ["lora_unet_no_such_block_to_q", "lora_unet_x.hada_w1_a"]
        assert "2 key(s) not applied" in next(applied.warnings())
    with pytest.raises(LoraError, match="different model"):
        sdxl_net = load_lora(sdxl.peft_file)  # SDXL tensors on SD1 names that exist in both
        apply_loras(sd1.ours, [(sdxl_net, 1.0, 1.0)])


def test_inpaint_conv_in_is_zero_padded(tmp_path):
    cfg, sd, path = make_checkpoint("tiny_sd1_inpaint", tmp_path)
    model = load_model(path).model
    g = torch.Generator().manual_seed(0)
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]  # (32, 9, 3, 3)
    down, up = torch.randn(2, 4, 3, 3, generator=g), torch.randn(w.shape[0], 2, 1, 1, generator=g)
    net = network_from_state_dict(
        {"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up}, "c"
    )
    merged = merge_loras(sd, cfg, [(net, 1.0, 1.0)])["model.diffusion_model.input_blocks.0.0.weight"]
    torch.testing.assert_close(merged[:, 4:], w[:, 4:], rtol=0, atol=0)
    x = torch.randn(1, 9, 8, 8, generator=g)
    conv = model.unet.input_blocks[0][0]
    with torch.no_grad(), apply_loras(model, [(net, 1.0, 1.0)]):
        got = conv(x)
    torch.testing.assert_close(got, F.conv2d(x, merged, conv.bias, padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_mode_equals_hooks_and_restores_the_same_tensors(family, request):
    s = request.getfixturevalue(family)
    net = load_lora(s.peft_file)
    params = dict(s.ours.named_parameters())
    before = {k: (p.data_ptr(), p.detach().clone()) for k, p in params.items()}
    with apply_loras(s.ours, [(net, 0.7, 1.1)]):
        hooked = s.our_outputs()
    with apply_loras(s.ours, [(net, 0.7, 1.1)], merge=True):
        merged = s.our_outputs()
        assert any(p.data_ptr() != before[k][0] for k, p in params.items())  # weights were swapped
    assert _max_rel(merged, hooked) <= 1e-5
    for k, p in params.items():
        assert p.data_ptr() == before[k][0] and torch.equal(p.detach(), before[k][1]), k
