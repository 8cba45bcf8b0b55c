"""SD3/SD3.5 LoRA at run time: diffusers/PEFT and kohya files on the MMDiT (fused qkv) and the CLIP encoders,
parity with diffusers' SD3Transformer2DModel + PEFT, bit-identical base, prompt tags through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusekit.adapters.extra_networks import parse_hashes
from diffusekit.adapters.keys import adapter_names
from diffusekit.adapters.lora import LoraError, apply_loras, load_lora, merge_loras
from diffusekit.checkpoints.convert_mmdit import mmdit_diffusers_config, mmdit_to_diffusers
from diffusekit.checkpoints.sd3 import create_sd3
from diffusekit.cli import main
from diffusekit.metadata import read_infotext
from diffusekit.models.init import randomize_
from diffusekit.models.sd3 import StableDiffusion3
from diffusekit.models.sd3_configs import TINY_SD35
from diffusekit.params import GenerationParams
from diffusekit.pipeline_sd3 import SD3Options, SD3Pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("sentencepiece")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

# every kind of layer: the image and text q/k/v (slices of our fused qkv), MMDiT-X attn2, projections,
# MLPs, modulations (the last context block's and norm_out's are (scale, shift) in diffusers), embedders
TARGETS = [
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "ff.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "norm_out.linear",
    "proj_out", "context_embedder", "time_text_embed.text_embedder.linear_1",
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Our tiny SD3.5 model, diffusers' transformer with the same weights, and a PEFT LoRA saved by
    StableDiffusion3Pipeline.save_lora_weights (r 4, alpha 8: scale 2, random A and B)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tmp = tmp_path_factory.mktemp("sd3lora")
    cfg = TINY_SD35
    model = randomize_(StableDiffusion3(cfg, with_t5=False), seed=1).eval()
    theirs = diffusers.SD3Transformer2DModel(**mmdit_diffusers_config(cfg.mmdit)).eval()
    theirs.load_state_dict(mmdit_to_diffusers(model.mmdit.state_dict(), cfg.mmdit.depth), strict=True)
    lcfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS)
    torch.manual_seed(0)
    theirs.add_adapter(lcfg)
    layers = get_peft_model_state_dict(theirs)
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp / "peft", transformer_lora_layers=layers, transformer_lora_adapter_metadata=lcfg.to_dict()
    )
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, 16, 8, 6, generator=g),
        torch.tensor([999.0, 300.0]),
        torch.randn(2, 5, cfg.mmdit.context_dim, generator=g),
        torch.randn(2, cfg.mmdit.adm_in_channels, generator=g),
    )
    return model, theirs, tmp / "peft" / "pytorch_lora_weights.safetensors", inputs, tmp


def _theirs(theirs, inputs, scale: float | None = 1.0) -> torch.Tensor:
    x, t, ctx, y = inputs
    if scale is None:
        theirs.disable_adapters()
    else:
        theirs.enable_adapters()
        theirs.set_adapters("default", weights=scale)
    with torch.no_grad():
        return theirs(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=y).sample


def _ours(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.mmdit(*inputs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "hooks"])
@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_diffusers_file_matches_diffusers_with_the_lora(setup, merge, weight) -> None:
    model, theirs, path, inputs, _ = setup
    net = load_lora(path)
    assert not net.resolve(model.cfg)[1]  # every key names a layer
    base = _ours(model, inputs)
    assert _rel(base, _theirs(theirs, inputs, None)) < 1e-5
    with apply_loras(model, [(net, 1.0, weight)], merge=merge) as applied:
        lora = _ours(model, inputs)
    assert not list(applied.warnings())
    ref = _theirs(theirs, inputs, weight)
    assert _rel(ref, base) > 1e-2  # the LoRA changes the output noticeably
    assert _rel(lora, ref) < 1e-4, _rel(lora, ref)
    assert torch.equal(_ours(model, inputs), base)  # removed: the base is back bit for bit


def test_weight_zero_and_removal_leave_the_base_bit_identical(setup) -> None:
    model, _, path, inputs, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = _ours(model, inputs)
    net = load_lora(path)
    for merge in (True, False):
        with apply_loras(model, [(net, 1.0, 0.0)], merge=merge):
            assert torch.equal(_ours(model, inputs), base)
        with apply_loras(model, [(net, 1.0, 1.0)], merge=merge):
            assert not torch.equal(_ours(model, inputs), base)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _kohya_from_diffusers(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The same LoRA as sd-scripts' lora_sd3 saves it: original single-file names, q/k/v fused into one
    adapter (down stacked, up block-diagonal, as its split_qkv state_dict), our (shift, scale) order."""
    from diffusekit.checkpoints.convert_mmdit import _BLOCK, _QKV, _TOP

    down = {k.removeprefix("transformer.").removesuffix(".lora_A.weight"): v for k, v in sd.items()
            if k.endswith(".lora_A.weight")}  # fmt: skip
    up = {k.removeprefix("transformer.").removesuffix(".lora_B.weight"): v for k, v in sd.items()
          if k.endswith(".lora_B.weight")}  # fmt: skip
    out: dict[str, torch.Tensor] = {}

    def put(ours: str, d: torch.Tensor, u: torch.Tensor, rank: int) -> None:
        name = "lora_unet_" + ours.replace(".", "_")
        out[f"{name}.lora_down.weight"] = d
        out[f"{name}.lora_up.weight"] = u
        out[f"{name}.alpha"] = torch.tensor(8.0 * d.shape[0] / rank)  # scale 2 at any rank

    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    for theirs, d in down.items():
        u = up[theirs]
        if theirs in top:
            ours = top[theirs]
        else:
            _, i, rest = theirs.split(".", 2)
            if any(rest in names for names in _QKV.values()):
                if rest not in [names[0] for names in _QKV.values()]:
                    continue  # k, v: done with q
                fused = next(k for k, names in _QKV.items() if names[0] == rest)
                parts = [f"transformer_blocks.{i}.{n}" for n in _QKV[fused]]
                r = d.shape[0]
                big_up = torch.zeros(3 * u.shape[0], 3 * r)
                for j, p in enumerate(parts):
                    big_up[j * u.shape[0] : (j + 1) * u.shape[0], j * r : (j + 1) * r] = up[p]
                put(f"joint_blocks.{i}.{fused}", torch.cat([down[p] for p in parts]), big_up, r)
                continue
            ours = f"joint_blocks.{i}.{block[rest]}"
        if (
            ours.startswith("final_layer.adaLN")
            or ours == f"joint_blocks.{depth - 1}.context_block.adaLN_modulation.1"
        ):
            u = torch.cat(u.chunk(2)[::-1])  # diffusers' (scale, shift) -> the original (shift, scale)
        put(ours, d, u, d.shape[0])
    return out


def test_kohya_file_equals_the_diffusers_file(setup) -> None:
    model, theirs, path, inputs, tmp = setup
    kohya = _kohya_from_diffusers(load_file(path), model.cfg.mmdit.depth)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in kohya
    kohya["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(2, 4)
    kohya["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(4, 2)
    save_file(kohya, tmp / "kohya.safetensors")
    net = load_lora(tmp / "kohya.safetensors")
    with apply_loras(model, [(net, 1.0, 1.0)]) as applied:
        lora = _ours(model, inputs)
    warnings = list(applied.warnings())  # T5 layers are not applied, and said so
    assert len(warnings) == 1 and "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in warnings[0]
    assert _rel(lora, _theirs(theirs, inputs, 1.0)) < 1e-4


def test_text_encoder_names_and_unmatched_keys(setup, tmp_path) -> None:
    model, _, _, _, _ = setup
    names = adapter_names(model.cfg)
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    assert names[f"text_encoder.{q}"] == names["lora_te1_" + q.replace(".", "_")]
    assert names[f"text_encoder.{q}"].component == "clip_l"
    assert (
        names[f"text_encoder_2.{q}"].component
        == "clip_g"
        == names["lora_te2_" + q.replace(".", "_")].component
    )
    width = model.cfg.clip_l.width
    sd = {
        f"text_encoder.{q}.lora_A.weight": torch.randn(2, width),
        f"text_encoder.{q}.lora_B.weight": torch.randn(width, 2),
        "transformer.transformer_blocks.99.attn.to_q.lora_A.weight": torch.randn(2, 32),
        "transformer.transformer_blocks.99.attn.to_q.lora_B.weight": torch.randn(32, 2),
    }
    save_file(sd, tmp_path / "te.safetensors")
    net = load_lora(tmp_path / "te.safetensors")
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 73])

    def hidden() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return model.clip_l(ids).hidden, model.clip_g(ids).hidden

    base_l, base_g = hidden()
    with apply_loras(model, [(net, 1.0, 1.0)]) as applied:
        assert list(applied.warnings()) == [
            "LoRA te: 1 key(s) not applied: transformer.transformer_blocks.99.attn.to_q"
        ]
        lora_l, lora_g = hidden()
    with apply_loras(model, [(net, 0.0, 1.0)]):  # te weight 0: CLIP-L as it was
        assert torch.equal(hidden()[0], base_l)
    assert not torch.equal(lora_l, base_l) and torch.equal(lora_g, base_g)  # CLIP-L only
    assert torch.equal(hidden()[0], base_l)  # removed: bit-identical
    with pytest.raises(LoraError, match="SD3"):
        merge_loras(model.state_dict(), model.cfg, [(net, 1.0, 1.0)])


def test_cli_and_pipeline_apply_a_prompt_lora(setup, tmp_path, capsys) -> None:
    _, _, path, _, _ = setup
    ckpt = tmp_path / "tiny35.safetensors"
    create_sd3(TINY_SD35, ckpt, seed=1)
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(path.read_bytes())
    pipe = SD3Pipeline.from_file(ckpt, precision="fp32")
    p = dict(steps=2, seed=3, width=64, height=64, cfg_scale=4.0)
    base = pipe.generate(GenerationParams(prompt="a cat", **p))
    explicit = pipe.generate(
        GenerationParams(prompt="a cat", **p), loras=[(load_lora(path, "style"), 1.0, 1.0)]
    )
    with pytest.raises(LoraError, match="no LoRA folder"):
        pipe.generate(GenerationParams(prompt="a cat <lora:style:1>", **p))
    assert not torch.equal(base.latents, explicit.latents)
    again = pipe.generate(GenerationParams(prompt="a cat", **p))
    assert torch.equal(base.latents, again.latents)  # the base is untouched afterwards
    out = tmp_path / "cli.png"
    argv = ["generate", "a cat <lora:style:1>", "--model", str(ckpt), "--loras", str(loras), "--steps", "2",
            "--seed", "3", "--width", "64", "--height", "64", "--cfg", "4", "--precision", "fp32",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    cli_px = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert np.abs(cli_px - np.asarray(explicit.images[0]).astype(int)).max() <= 1
    assert np.abs(cli_px - np.asarray(base.images[0]).astype(int)).max() > 2
    text = read_infotext(out)
    assert "<lora:style:1>" in text
    assert main(["info", str(out), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parse_hashes(parsed["Lora hashes"]) == {"style": load_lora(loras / "style.safetensors").shorthash}


def test_pipeline_equals_diffusers_load_lora_weights_with_text_encoder_loras(tmp_path) -> None:
    """A PEFT LoRA on the transformer, CLIP-L and CLIP-G, saved by diffusers and loaded by its
    ``load_lora_weights``: diffusers' SD3 pipeline and ours give the same latents, at weight 1 and 0.6."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusekit.checkpoints.sd3_diffusers import write_sd3_diffusers_folder
    from diffusekit.checkpoints.single_file import load_state_dict

    ckpt = tmp_path / "tiny35.safetensors"
    create_sd3(TINY_SD35, ckpt, seed=2)
    folder = write_sd3_diffusers_folder(load_state_dict(ckpt)[0], TINY_SD35, tmp_path / "folder")

    def reference():
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(
            folder, local_files_only=True, text_encoder_3=None, tokenizer_3=None
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    maker = reference()
    tcfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS[:8])
    ecfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])  # fmt: skip
    torch.manual_seed(1)
    maker.transformer.add_adapter(tcfg)
    maker.text_encoder.add_adapter(ecfg)
    maker.text_encoder_2.add_adapter(ecfg)
    with torch.no_grad():  # larger updates, so the text-encoder LoRAs move the result measurably
        for enc in (maker.text_encoder, maker.text_encoder_2):
            for name, p in enc.named_parameters():
                if "lora_B" in name:
                    p.mul_(20)
    diffusers.StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora",
        transformer_lora_layers=get_peft_model_state_dict(maker.transformer),
        text_encoder_lora_layers=get_peft_model_state_dict(maker.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(maker.text_encoder_2),
        transformer_lora_adapter_metadata=tcfg.to_dict(),
        text_encoder_lora_adapter_metadata=ecfg.to_dict(),
        text_encoder_2_lora_adapter_metadata=ecfg.to_dict(),
    )
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    net = load_lora(file)
    assert any(k.startswith("text_encoder_2.") for k in net.modules) and not net.resolve(TINY_SD35)[1]
    ref = reference()
    ref.load_lora_weights(file, adapter_name="x")
    ours = SD3Pipeline.from_file(ckpt, precision="fp32", options=SD3Options(use_t5=False))
    params = GenerationParams(prompt="an astronaut riding a horse", negative_prompt="blurry", steps=3,
                              cfg_scale=3.0, seed=11, width=64, height=64, prompt_mode="plain")  # fmt: skip
    base = ours.generate(params).latents
    seen = {}

    def keep(pipe, i, t, tensors):  # the final latents
        seen["latents"] = tensors["latents"]
        return tensors

    for weight in (1.0, 0.6):
        ref.set_adapters("x", adapter_weights=weight)
        with torch.no_grad():
            ref(prompt=params.prompt, negative_prompt=params.negative_prompt, num_inference_steps=3,
                guidance_scale=3.0, width=64, height=64, generator=torch.Generator().manual_seed(11),
                max_sequence_length=TINY_SD35.t5_max_length, output_type="latent",
                callback_on_step_end=keep)  # fmt: skip
        lora = ours.generate(params, loras=[(net, weight, weight)]).latents
        te_only = ours.generate(params, loras=[(net, weight, 0.0)]).latents
        assert _rel(te_only, base) > 1e-3  # the CLIP LoRAs alone change the result
        assert _rel(lora, seen["latents"]) < 1e-4, _rel(lora, seen["latents"])
    assert torch.equal(ours.generate(params).latents, base)
