"""T5 v1.1 encoder: parity with transformers' T5EncoderModel; the SentencePiece tokenizer wrapper."""

from __future__ import annotations

import pytest
import torch

from diffusekit.models.init import randomize_
from diffusekit.models.sd3_configs import T5_XXL, TINY_T5, T5Config
from diffusekit.models.t5 import T5EncoderModel, relative_position_bucket
from diffusekit.models.t5_tokenizer import EOS_ID, PAD_ID, T5Tokenizer, T5TokenizerError

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def _hf_config(c: T5Config):
    return transformers.T5Config(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        d_kv=c.d_kv,
        num_heads=c.num_heads,
        d_ff=c.d_ff,
        num_layers=c.num_layers,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=c.layer_norm_epsilon,
        dropout_rate=0.0,
        is_encoder_decoder=False,
    )


def test_t5_matches_transformers() -> None:
    ours = randomize_(T5EncoderModel(TINY_T5), seed=2).eval()
    theirs = transformers.T5EncoderModel(_hf_config(TINY_T5)).eval()
    sd = dict(ours.state_dict())
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]  # the tied copy transformers lists
    theirs.load_state_dict(sd, strict=True)
    # the reverse direction: a file with both the tied and the shared key loads into ours
    T5EncoderModel(TINY_T5).load_state_dict(theirs.state_dict(), strict=True)
    # 40 tokens > max_distance 16: the log-spaced and clamped buckets are exercised
    ids = torch.randint(0, TINY_T5.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            a = ours(ids, **kwargs)
            b = theirs(ids, **kwargs).last_hidden_state
            rel = ((a - b).abs().max() / b.abs().max()).item()
            assert rel < 1e-5, (kwargs.keys(), rel)


def test_relative_buckets_symmetric_and_bounded() -> None:
    rel = torch.arange(-300, 301)
    b = relative_position_bucket(rel, 32, 128)
    assert b.min() == 0 and b.max() == 31
    assert torch.equal(b[300 - 5 : 300], torch.tensor([5, 4, 3, 2, 1]))  # exact for small distances
    assert (b[301:] >= 16).all() and (b[:300] < 16).all()  # the two directions use separate halves


def test_t5_xxl_parameter_count() -> None:
    with torch.device("meta"):
        ours = sum(p.numel() for p in T5EncoderModel(T5_XXL).parameters())
        theirs = transformers.T5EncoderModel(_hf_config(T5_XXL))
    # transformers lists the tied embedding once
    assert ours == sum(p.numel() for p in theirs.parameters()) == 4_762_310_656


def _train_spiece(folder) -> None:
    spm = pytest.importorskip("sentencepiece")

    text = ["a photo of a cat sitting on a mat", "an astronaut riding a horse on the moon"] * 40
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(text),
        model_prefix=str(folder / "spiece"),
        vocab_size=24,
        model_type="unigram",
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )


def test_t5_tokenizer_pads_and_truncates(tmp_path) -> None:
    _train_spiece(tmp_path)
    tok = T5Tokenizer(tmp_path)
    ids = tok(["a cat", "an astronaut riding a horse on the moon " * 5], max_length=16)
    assert ids.shape == (2, 16)
    pieces = tok.sp.EncodeAsIds("a cat")
    assert 0 < len(pieces) < 15
    assert ids[0].tolist() == pieces + [EOS_ID] + [PAD_ID] * (15 - len(pieces))
    assert ids[1, -1].item() == EOS_ID and (ids[1] != PAD_ID).all()  # truncated, </s> kept last


def test_t5_tokenizer_errors(tmp_path) -> None:
    with pytest.raises(T5TokenizerError, match="no T5 SentencePiece model"):
        T5Tokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(T5TokenizerError, match="not a SentencePiece model"):
        T5Tokenizer(tmp_path)


def test_sd3_clip_encoders_match_transformers() -> None:
    """SD3's CLIP-L and CLIP-G (HF layout, projections, CLIP-G with GELU): penultimate states and pooled."""
    from diffusekit.checkpoints.convert_clip import text_config_to_transformers, text_to_transformers
    from diffusekit.models.clip import CLIPTextModel
    from diffusekit.models.sd3_configs import TINY_SD35

    ids = torch.randint(1, 49000, (2, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 49406
    ids[0, 9], ids[1, 30] = 49407, 49407  # EOS, then padding
    for cfg in (TINY_SD35.clip_l, TINY_SD35.clip_g):
        ours = randomize_(CLIPTextModel(cfg), seed=5).eval()
        theirs = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**text_config_to_transformers(cfg))
        ).eval()
        theirs.load_state_dict(text_to_transformers(ours.state_dict(), cfg), strict=True)
        with torch.no_grad():
            a = ours(ids)
            b = theirs(ids, output_hidden_states=True)
        for x, y in ((a.hidden, b.hidden_states[-2]), (a.pooled, b.text_embeds)):
            rel = ((x - y).abs().max() / y.abs().max()).item()
            assert rel < 1e-5, (cfg.activation, rel)
