"""Textual inversion: each file format loads, the vectors land exactly where the name stands, and the
prompt embedding equals diffusers' load_textual_inversion (SD1 and SDXL)."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffusekit.adapters.embeddings import (
    EmbeddingLibrary,
    active_embeddings,
    load_embedding,
)
from diffusekit.checkpoints.diffusers import write_diffusers_folder
from diffusekit.checkpoints.load import load_model
from diffusekit.checkpoints.single_file import save_state_dict
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from diffusekit.prompts import encode_prompt
from helpers import make_checkpoint

warnings.filterwarnings("ignore")
NAME = "zqxwidget"  # several BPE tokens: matching works on token sequences


def _write_formats(folder, g):
    """One file per format A1111 reads, for 32-wide encoders (tiny presets), and the SDXL pair."""
    folder.mkdir(exist_ok=True)
    vecs = {k: torch.randn(n, 32, generator=g) for k, n in (("a1111", 2), ("kohya", 3), ("diff", 1))}
    torch.save({"string_to_param": {"*": torch.nn.Parameter(vecs["a1111"])}, "string_to_token": {"*": 265},
                "name": "a1111", "step": 100, "sd_checkpoint": "abc", "sd_checkpoint_name": "m"},
               folder / "a1111.pt")  # fmt: skip
    save_state_dict({"emb_params": vecs["kohya"]}, folder / "kohya.safetensors")
    torch.save({"<diff>": vecs["diff"][0]}, folder / "diff.bin")  # diffusers learned_embeds: (dim,)
    xl = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)}
    save_state_dict(xl, folder / "xl.safetensors")
    return vecs, xl


def test_formats_load(tmp_path):
    vecs, xl = _write_formats(tmp_path / "emb", torch.Generator().manual_seed(0))
    for name, v in vecs.items():
        ext = {"a1111": ".pt", "kohya": ".safetensors", "diff": ".bin"}[name]
        emb = load_embedding(tmp_path / "emb" / f"{name}{ext}")
        torch.testing.assert_close(emb.vectors["*"], v, rtol=0, atol=0)
    emb = load_embedding(tmp_path / "emb" / "xl.safetensors")
    assert emb.for_encoders([32, 32]) is not None and emb.for_encoders([32]) is None
    fit, skipped = EmbeddingLibrary(tmp_path / "emb").usable([32])
    assert sorted(fit) == ["a1111", "diff", "kohya"] and skipped == ["xl"]


def test_vectors_replace_exactly_the_named_tokens(tmp_path):
    vecs, _ = _write_formats(tmp_path / "emb", torch.Generator().manual_seed(1))
    model = load_model(make_checkpoint("tiny_sd1", tmp_path)[2])
    enc, tok = model.model.text_encoders[0], model.tokenizer
    lib = EmbeddingLibrary(tmp_path / "emb")
    table = enc.text_model.embeddings.token_embedding
    seen = []
    with torch.no_grad(), active_embeddings([enc], [tok], lib) as (wrapped,):
        h = table.register_forward_hook(lambda m, a, out: seen.append(out))  # runs after ours
        ids = wrapped.encode("a photo of kohya, red")  # 'kohya' -> 3 placeholder ids
        plain = tok.encode("a photo of , red")
        assert len(ids) == len(plain) + 3
        pos = next(i for i, t in enumerate(ids) if t < 0)
        assert ids[:pos] + ids[pos + 3 :] == plain
        enc(torch.tensor([[tok.bos_id, *ids, tok.eos_id]]))
    h.remove()
    out = seen[-1][0]  # (T, W)
    torch.testing.assert_close(out[1 + pos : 4 + pos], vecs["kohya"], rtol=0, atol=0)
    base = table(torch.tensor([tok.bos_id, *plain, tok.eos_id]))
    torch.testing.assert_close(out[: 1 + pos], base[: 1 + pos], rtol=0, atol=0)
    torch.testing.assert_close(out[4 + pos :], base[1 + pos :], rtol=0, atol=0)
    assert len(table._forward_hooks) == 0 and len(table._forward_pre_hooks) == 0


@pytest.mark.parametrize("family", ["tiny_sd1", "tiny_sdxl"])
def test_prompt_embedding_matches_diffusers(family, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    g = torch.Generator().manual_seed(2)
    cfg, sd, path = make_checkpoint(family, tmp_path)
    folder = write_diffusers_folder(sd, cfg, tmp_path / "folder")
    xl = cfg.family == "sdxl"
    pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(
        folder, local_files_only=True
    )
    (tmp_path / "emb").mkdir()
    if xl:
        data = {"clip_l": torch.randn(3, 32, generator=g), "clip_g": torch.randn(3, 32, generator=g)}
        save_state_dict(data, tmp_path / "emb" / f"{NAME}.safetensors")
        pipe.load_textual_inversion(
            data["clip_l"], token=NAME, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            data["clip_g"], token=NAME, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    else:
        data = {"string_to_param": {"*": torch.randn(3, 32, generator=g)}, "name": NAME}
        torch.save(data, tmp_path / "emb" / f"{NAME}.pt")
        pipe.load_textual_inversion(tmp_path / "emb" / f"{NAME}.pt", token=NAME)
    prompt = f"a {NAME} on a red square"
    with torch.no_grad():
        ref = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    ref_ctx = ref[0]
    ours = Pipeline.from_file(path, precision="fp32")
    ours.embeddings = EmbeddingLibrary(tmp_path / "emb")
    params = GenerationParams(prompt=prompt, prompt_mode="plain", width=64, height=64)
    cond, _ = ours.encode(params, 64, 64)
    diff = float((cond["context"] - ref_ctx).abs().max() / ref_ctx.abs().max())
    print(f"TI {family}: max relative difference vs diffusers {diff:.2e}")
    assert diff <= 1e-5
    if xl:  # the pooled bigG output (part of y) also goes through the embedding
        torch.testing.assert_close(cond["y"][:, :32], ref[2], rtol=1e-5, atol=1e-5)
    ours.embeddings = None
    plain, _ = ours.encode(params, 64, 64)
    assert (plain["context"] - cond["context"]).abs().max() > 1e-3  # the embedding did something
    ours.embeddings = EmbeddingLibrary(tmp_path / "emb")
    result = ours.generate(params.replace(steps=1, seed=0))
    assert f'TI hashes: "{NAME}: ' in result.infotexts[0] or f"TI hashes: {NAME}: " in result.infotexts[0]


def test_encode_prompt_with_a1111_weighting_keeps_working(tmp_path):
    vecs, _ = _write_formats(tmp_path / "emb", torch.Generator().manual_seed(3))
    model = load_model(make_checkpoint("tiny_sd1", tmp_path)[2])
    enc, tok = model.model.text_encoders, model.tokenizer
    with torch.no_grad(), active_embeddings(enc, [tok], EmbeddingLibrary(tmp_path / "emb")) as toks:
        a = encode_prompt("(a1111:1.3), (diff) BREAK cat", toks, enc).context
    b = encode_prompt("(a1111:1.3), (diff) BREAK cat", tok, enc).context
    assert a.shape == b.shape and (a - b).abs().max() > 1e-3
