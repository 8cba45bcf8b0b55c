from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from diffusekit.models.configs import TextEncoderConfig
from diffusekit.prompts import (
    BREAK,
    PromptEmbedding,
    PromptError,
    chunk_prompt,
    encode_prompt,
    pad_after_eos,
    pad_to_same_length,
    parse_prompt_attention,
    plain_chunk,
)

BOS, EOS, COMMA = 49406, 49407, 267
D = 1 / 1.1  # the [ ] factor


# ---------------------------------------------------------------------------------------------
# Fakes: a whitespace tokenizer and a small encoder whose output depends on every input id.


class FakeTokenizer:
    """Words "tN" map to id 1000 + N, "," to 267, any other word to a stable id from 5000 up."""

    bos_id, eos_id = BOS, EOS

    def __init__(self) -> None:
        self.other: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in re.findall(r",|[^\s,]+", text):
            if word == ",":
                ids.append(COMMA)
            elif re.fullmatch(r"t\d+", word):
                ids.append(1000 + int(word[1:]))
            else:
                ids.append(self.other.setdefault(word, 5000 + len(self.other)))
        return ids


class FakeEncoder(torch.nn.Module):
    """Embedding, then `use_layers` mixing layers (attention-like, so ids interact); records its calls."""

    def __init__(self, cfg: TextEncoderConfig, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.cfg = cfg
        self.embed = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.width, generator=gen))
        self.mix = torch.nn.Parameter(
            torch.randn(cfg.layers, cfg.width, cfg.width, generator=gen) / cfg.width**0.5
        )
        self.proj = torch.nn.Parameter(torch.randn(cfg.width, 6, generator=gen))
        self.calls: list[tuple[torch.Tensor, int | None, bool | None]] = []

    def forward(self, input_ids: torch.Tensor, use_layers: int | None = None, final_norm: bool | None = None):
        self.calls.append((input_ids.clone(), use_layers, final_norm))
        x = self.embed[input_ids]  # (B, 77, W)
        for i in range(use_layers or self.cfg.use_layers):
            x = x + torch.tanh(x.mean(dim=1, keepdim=True) @ self.mix[i]) + 0.1 * x @ self.mix[i]
        pooled = x[torch.arange(len(x)), input_ids.argmax(dim=1)] @ self.proj  # (B, 6)
        return SimpleNamespace(hidden=x, pooled=pooled)


SD1_CFG = TextEncoderConfig(width=16, layers=4, heads=2, mlp_width=32, use_layers=4)
OPENCLIP_CFG = TextEncoderConfig(
    layout="openclip",
    width=24,
    layers=4,
    heads=2,
    mlp_width=32,
    activation="gelu",
    projection_dim=6,
    pad_token_id=0,
    use_layers=3,
    final_norm=False,
)
SDXL_L_CFG = replace(SD1_CFG, use_layers=3, final_norm=False)


def words(n: int, start: int = 0) -> str:
    return " ".join(f"t{i}" for i in range(start, start + n))


def ids_of(n: int, start: int = 0) -> list[int]:
    return [1000 + i for i in range(start, start + n)]


def window(tokens: list[int]) -> list[int]:
    return [BOS, *tokens, *[EOS] * (75 - len(tokens)), EOS]


# ---------------------------------------------------------------------------------------------
# parse_prompt_attention

PARSE_TABLE = [
    # A1111's own doctest examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # nesting and explicit weights
    ("((a))", [("a", 1.2100000000000002)]),
    ("[[a]]", [("a", D * D)]),
    ("(a:1.3)", [("a", 1.3)]),
    ("(a: 1.3 )", [("a", 1.3)]),
    ("(a:-0.5)", [("a", -0.5)]),
    ("((a:1.5) b)", [("a", 1.5 * 1.1), (" b", 1.1)]),
    ("[(a:2)]", [("a", 2 * D)]),
    ("([a])", [("a", D * 1.1)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.1 * D), (" c", 1.1)]),
    # unbalanced: stray closers are text, unclosed openers apply round-then-square at the end
    ("a)", [("a)", 1.0)]),
    ("a] (b", [("a] ", 1.0), ("b", 1.1)]),
    ("[a (b", [("a ", D), ("b", 1.1 * D)]),
    ("((a)", [("a", 1.2100000000000002)]),
    ("[a:1.5)", [("a:1.5)", D)]),
    ("x:1.5) y", [("x:1.5) y", 1.0)]),
    # a weight that is not a number is text inside a plain round group
    ("(cat:abc)", [("cat:abc", 1.1)]),
    ("(a:b:1.2)", [("a:b", 1.2)]),
    ("time: 10:30", [("time: 10:30", 1.0)]),
    # escapes; a backslash that escapes nothing disappears
    ("\\\\", [("\\", 1.0)]),
    ("\\(a:1.5\\)", [("(a:1.5)", 1.0)]),
    ("(\\(a\\))", [("(a)", 1.1)]),
    ("a\\b", [("ab", 1.0)]),
    # BREAK
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), (BREAK, -1.0), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), (BREAK, -1.1), ("b", 1.1)]),
    # nothing
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("multi\nline", [("multi\nline", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_TABLE)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=0, abs=1e-12)


def test_parse_reproduces_a1111_float_products_exactly():
    # A1111 multiplies run by run as groups close; 1.1**3 would differ in the last bit.
    assert parse_prompt_attention("((((sky))))") == [("sky", 1.4641000000000006)]
    assert 1.1**4 != 1.4641000000000006


def test_parse_rejects_malformed_weight_and_long_input():
    with pytest.raises(PromptError, match=r"'1\.2\.3'.*not a number"):
        parse_prompt_attention("(a:1.2.3)")
    with pytest.raises(PromptError, match="21 characters, more than the limit of 20"):
        parse_prompt_attention("x" * 21, max_chars=20)
    assert parse_prompt_attention("x" * 20, max_chars=20) == [("x" * 20, 1.0)]
    with pytest.raises(TypeError, match="must be a str"):
        parse_prompt_attention(None)


# ---------------------------------------------------------------------------------------------
# chunk_prompt


def test_empty_prompt_is_one_padding_chunk():
    (chunk,) = chunk_prompt("", FakeTokenizer())
    assert list(chunk.ids) == [BOS] + [EOS] * 76
    assert chunk.weights == (1.0,) * 77


@pytest.mark.parametrize("n", [1, 74, 75])
def test_up_to_75_tokens_fit_one_chunk(n):
    (chunk,) = chunk_prompt(words(n), FakeTokenizer())
    assert list(chunk.ids) == window(ids_of(n))


def test_76_tokens_make_two_chunks():
    first, second = chunk_prompt(words(76), FakeTokenizer())
    assert list(first.ids) == window(ids_of(75))
    assert list(second.ids) == window(ids_of(1, start=75))


def test_150_and_151_tokens():
    assert len(chunk_prompt(words(150), FakeTokenizer())) == 2
    assert len(chunk_prompt(words(151), FakeTokenizer())) == 3


def test_comma_backtrack_moves_words_after_the_last_comma():
    # 70 words, a comma at position 70, then 10 words: the chunk fills at 75 with the comma 5 tokens back.
    first, second = chunk_prompt(words(70) + ", " + words(10, start=70), FakeTokenizer())
    assert list(first.ids) == window(ids_of(70) + [COMMA])
    assert list(second.ids) == window(ids_of(10, start=70))


def test_comma_further_back_than_the_limit_is_ignored():
    # comma at position 40: 35 tokens back when the chunk fills, beyond the default 20
    text = words(40) + ", " + words(40, start=40)
    first, second = chunk_prompt(text, FakeTokenizer())
    assert list(first.ids) == window(ids_of(40) + [COMMA] + ids_of(34, start=40))
    assert list(second.ids) == window(ids_of(6, start=74))
    # a larger limit reaches it
    first, _ = chunk_prompt(text, FakeTokenizer(), comma_backtrack=40)
    assert list(first.ids) == window(ids_of(40) + [COMMA])


def test_comma_backtrack_zero_disables_it():
    first, _ = chunk_prompt(words(70) + ", " + words(10, start=70), FakeTokenizer(), comma_backtrack=0)
    assert list(first.ids) == window(ids_of(70) + [COMMA] + ids_of(4, start=70))
    with pytest.raises(ValueError, match="within 0..74"):
        chunk_prompt("a", FakeTokenizer(), comma_backtrack=75)


def test_comma_arriving_on_a_full_chunk_opens_the_next_one():
    # A1111 records the comma, then starts a new chunk and forgets it: no backtrack to it later.
    first, second = chunk_prompt(words(75) + ", " + words(3, start=75), FakeTokenizer())
    assert list(first.ids) == window(ids_of(75))
    assert list(second.ids) == window([COMMA] + ids_of(3, start=75))


def test_backtracked_words_keep_their_weights():
    first, second = chunk_prompt(words(70) + ", (" + words(10, start=70) + ":1.5)", FakeTokenizer())
    assert first.weights == (1.0,) * 77
    assert second.weights == (1.0,) + (1.5,) * 10 + (1.0,) * 66


def test_break_starts_a_new_chunk():
    first, second = chunk_prompt("t1 t2 BREAK t3", FakeTokenizer())
    assert list(first.ids) == window(ids_of(2, start=1))
    assert list(second.ids) == window(ids_of(1, start=3))
    # consecutive and leading BREAKs give empty chunks, a trailing one adds nothing (as in A1111)
    counts = [len(chunk_prompt(p, FakeTokenizer())) for p in ("BREAK t1", "t1 BREAK BREAK t2", "t1 BREAK")]
    assert counts == [2, 3, 1]
    empty, _ = chunk_prompt("BREAK t1", FakeTokenizer())
    assert list(empty.ids) == window([])


def test_break_is_literal_without_emphasis():
    (chunk,) = chunk_prompt("t1 BREAK t2", FakeTokenizer(), emphasis=False)
    assert len([i for i in chunk.ids if i not in (BOS, EOS)]) == 3


def test_chunk_weights_follow_the_syntax():
    (chunk,) = chunk_prompt("t1 (t2) [t3] (t4 t5:0.5)", FakeTokenizer())
    assert list(chunk.ids[:7]) == [BOS, 1001, 1002, 1003, 1004, 1005, EOS]
    assert chunk.weights[:7] == (1.0, 1.0, 1.1, D, 0.5, 0.5, 1.0)
    assert chunk.weights[7:] == (1.0,) * 70


def test_plain_chunk_truncates_and_ignores_syntax():
    chunk = plain_chunk(words(100), FakeTokenizer())
    assert list(chunk.ids) == window(ids_of(75))
    assert chunk.weights == (1.0,) * 77


def test_pad_after_eos():
    ids = torch.tensor([window(ids_of(3)), window(ids_of(75))])
    padded = pad_after_eos(ids, EOS, 0)
    assert padded[0].tolist() == [BOS, 1000, 1001, 1002, EOS] + [0] * 72
    assert padded[1].tolist() == ids[1].tolist()  # a full chunk has nothing after its EOS
    assert pad_after_eos(ids, EOS, EOS) is ids


# ---------------------------------------------------------------------------------------------
# encode_prompt


def reference_a1111(encoder, chunks, normalize=True):
    """A1111's method written out: per chunk, z * w, then z * (mean before / mean after)."""
    out = []
    for chunk in chunks:
        ids = pad_after_eos(torch.tensor([chunk.ids]), EOS, encoder.cfg.pad_token_id)
        z = encoder(ids).hidden  # (1, 77, W)
        w = torch.tensor(chunk.weights).reshape(1, 77, 1)
        zw = z * w
        if normalize:
            zw = zw * (z.mean() / zw.mean())
        out.append(zw)
    return torch.cat(out, dim=1)


def test_weighted_encoding_matches_a1111_method():
    tok, enc = FakeTokenizer(), FakeEncoder(SD1_CFG, seed=1)
    prompt = "t1, (t2:1.4) [t3] ((t4)), t5"
    got = encode_prompt(prompt, tok, enc)
    expected = reference_a1111(enc, chunk_prompt(prompt, tok))
    assert got.context.shape == (1, 77, 16)
    torch.testing.assert_close(got.context, expected, rtol=1e-6, atol=1e-6)
    # the emphasis really changed something, and the mean was restored
    plain = enc(torch.tensor([chunk_prompt(prompt, tok)[0].ids])).hidden
    assert not torch.allclose(got.context, plain)
    torch.testing.assert_close(got.context.mean(), plain.mean(), rtol=1e-5, atol=1e-6)


def test_mean_is_restored_per_chunk():
    tok, enc = FakeTokenizer(), FakeEncoder(SD1_CFG, seed=2)
    prompt = "(" + words(60) + ":1.3) BREAK [" + words(30, start=60) + "]"
    got = encode_prompt(prompt, tok, enc)
    chunks = chunk_prompt(prompt, tok)
    assert len(chunks) == 2 and got.n_chunks == 2
    torch.testing.assert_close(got.context, reference_a1111(enc, chunks), rtol=1e-6, atol=1e-6)


def test_no_norm_mode_only_multiplies():
    tok, enc = FakeTokenizer(), FakeEncoder(SD1_CFG, seed=3)
    prompt = "t1 (t2:2) t3"
    got = encode_prompt(prompt, tok, enc, mode="a1111_no_norm")
    expected = reference_a1111(enc, chunk_prompt(prompt, tok), normalize=False)
    torch.testing.assert_close(got.context, expected, rtol=1e-6, atol=1e-6)


def test_unweighted_prompt_is_the_raw_encoder_output():
    tok, enc = FakeTokenizer(), FakeEncoder(SD1_CFG, seed=4)
    got = encode_prompt("t1, t2 t3", tok, enc)
    raw = enc(torch.tensor([window([1001, COMMA, 1002, 1003])])).hidden
    assert torch.equal(got.context, raw)


def test_plain_mode_is_one_truncated_unweighted_chunk():
    tok, enc = FakeTokenizer(), FakeEncoder(OPENCLIP_CFG, seed=5)
    got = encode_prompt("(" + words(100) + ":1.5)", tok, enc, mode="plain")
    ids, _, _ = enc.calls[0]
    assert ids.shape == (1, 77)
    assert ids[0, 1:3].tolist() == tok.encode("(t0 t1")
    assert ids[0, -1].item() == EOS
    assert torch.equal(got.context, enc(ids).hidden)


def test_sdxl_concatenates_encoders_and_pools_from_the_last_on_the_first_chunk():
    tok = FakeTokenizer()
    clip_l, clip_g = FakeEncoder(SDXL_L_CFG, seed=6), FakeEncoder(OPENCLIP_CFG, seed=7)
    prompt = words(80) + " (t200:1.2)"
    got = encode_prompt(prompt, tok, [clip_l, clip_g])
    chunks = chunk_prompt(prompt, tok)
    assert len(chunks) == 2
    assert got.context.shape == (1, 154, 16 + 24)
    expected = torch.cat([reference_a1111(clip_l, chunks), reference_a1111(clip_g, chunks)], dim=-1)
    torch.testing.assert_close(got.context, expected, rtol=1e-6, atol=1e-6)
    # the OpenCLIP encoder saw pad id 0 after EOS, CLIP-L saw EOS padding
    l_ids, g_ids = clip_l.calls[0][0], clip_g.calls[0][0]
    assert g_ids[1].tolist() == [BOS] + ids_of(5, start=75) + [1200, EOS] + [0] * 69
    assert l_ids[1].tolist() == window(ids_of(5, start=75) + [1200])
    first = pad_after_eos(torch.tensor([chunks[0].ids]), EOS, 0)
    torch.testing.assert_close(got.pooled, clip_g(first).pooled)
    assert got.pooled.shape == (1, 6)


def test_clip_skip_in_a1111_mode_applies_to_sd1_style_encoders_only():
    tok = FakeTokenizer()
    sd1, sd2 = FakeEncoder(SD1_CFG, seed=8), FakeEncoder(replace(OPENCLIP_CFG, final_norm=True), seed=9)
    xl_l, xl_g = FakeEncoder(SDXL_L_CFG, seed=10), FakeEncoder(OPENCLIP_CFG, seed=11)
    encode_prompt("t1", tok, sd1, clip_skip=2)
    encode_prompt("t1", tok, sd2, clip_skip=2)
    encode_prompt("t1", tok, [xl_l, xl_g], clip_skip=2)
    assert sd1.calls[-1][1] == 3  # 4 layers, skip the last one
    assert [e.calls[-1][1] for e in (sd2, xl_l, xl_g)] == [None, None, None]  # A1111 ignores it there
    encode_prompt("t1", tok, sd1, clip_skip=1)
    assert sd1.calls[-1][1] is None


def test_clip_skip_in_plain_mode_moves_every_encoder_like_diffusers():
    tok = FakeTokenizer()
    xl_l, xl_g = FakeEncoder(SDXL_L_CFG, seed=12), FakeEncoder(OPENCLIP_CFG, seed=13)
    encode_prompt("t1", tok, [xl_l, xl_g], clip_skip=2, mode="plain")
    assert (xl_l.calls[-1][1], xl_g.calls[-1][1]) == (2, 2)


def test_encode_prompt_argument_errors():
    tok, enc = FakeTokenizer(), FakeEncoder(SD1_CFG, seed=14)
    with pytest.raises(ValueError, match="valid: 1..4"):
        encode_prompt("t1", tok, enc, clip_skip=5)
    with pytest.raises(ValueError, match="clip_skip must be an int >= 1"):
        encode_prompt("t1", tok, enc, clip_skip=0)
    with pytest.raises(ValueError, match="valid: a1111, a1111_no_norm, plain"):
        encode_prompt("t1", tok, enc, mode="comfy")
    with pytest.raises(ValueError, match="encoders is empty"):
        encode_prompt("t1", tok, [])


# ---------------------------------------------------------------------------------------------
# pad_to_same_length


def test_pad_to_same_length_appends_empty_prompt_chunks():
    tok, enc = FakeTokenizer(), FakeEncoder(SD1_CFG, seed=15)
    cond = encode_prompt(words(160), tok, enc)  # 3 chunks
    uncond = encode_prompt("t1", tok, enc)
    empty = encode_prompt("", tok, enc)
    padded_cond, padded_uncond = pad_to_same_length(cond, uncond, empty)
    assert padded_cond is cond
    assert padded_uncond.context.shape == (1, 231, 16)
    assert torch.equal(padded_uncond.context[:, :77], uncond.context)
    assert torch.equal(padded_uncond.context[:, 77:154], empty.context)
    assert torch.equal(padded_uncond.context[:, 154:], empty.context)
    # symmetric when the negative prompt is the longer one
    c2, u2 = pad_to_same_length(uncond, cond, empty)
    assert torch.equal(c2.context, padded_uncond.context) and u2 is cond


def test_pad_to_same_length_errors():
    empty = PromptEmbedding(torch.zeros(1, 77, 8))
    with pytest.raises(ValueError, match="context width 4"):
        pad_to_same_length(PromptEmbedding(torch.zeros(1, 77, 4)), empty, empty)
    with pytest.raises(ValueError, match="not a multiple"):
        pad_to_same_length(PromptEmbedding(torch.zeros(1, 80, 8)), empty, empty)


# ---------------------------------------------------------------------------------------------
# With the real tokenizer and (tiny, random) text encoders


@pytest.fixture(scope="module")
def clip_tokenizer():
    from diffusekit.models.tokenizer import CLIPTokenizer

    return CLIPTokenizer.bundled()


def tiny_encoders(preset_name: str) -> list[torch.nn.Module]:
    from diffusekit.models.clip import build_text_encoder
    from diffusekit.models.configs import preset
    from diffusekit.models.init import randomize_

    return [
        randomize_(build_text_encoder(c), seed=i) for i, c in enumerate(preset(preset_name).text_encoders)
    ]


def test_real_tokenizer_chunks(clip_tokenizer):
    tok = clip_tokenizer
    assert tok.encode(",") == [COMMA]
    first, second = chunk_prompt("a cat, (dog:1.2) [grass] BREAK sky", tok)
    body = tok.encode("a cat, ") + tok.encode("dog") + tok.encode("grass")
    assert list(first.ids) == window(body)
    n = len(tok.encode("a cat, "))
    assert first.weights[: n + 3] == (1.0,) * (n + 1) + (1.2, D)
    assert list(second.ids) == window(tok.encode("sky"))


def test_real_tiny_sdxl_encoders(clip_tokenizer):
    tok, (clip_l, clip_g) = clip_tokenizer, tiny_encoders("tiny_sdxl")
    prompt = "a cat, (dog:1.2) [grass] BREAK sky"
    got = encode_prompt(prompt, tok, [clip_l, clip_g])
    chunks = chunk_prompt(prompt, tok)
    expected = torch.cat([reference_a1111(clip_l, chunks), reference_a1111(clip_g, chunks)], dim=-1)
    assert got.context.shape == (1, 154, 64)
    torch.testing.assert_close(got.context, expected, rtol=1e-5, atol=1e-6)
    first = pad_after_eos(torch.tensor([chunks[0].ids]), EOS, clip_g.cfg.pad_token_id)
    torch.testing.assert_close(got.pooled, clip_g(first).pooled)


def test_real_tiny_sd1_clip_skip(clip_tokenizer):
    tok, (enc,) = clip_tokenizer, tiny_encoders("tiny_sd1")
    ids = torch.tensor([window(tok.encode("a red house"))])
    skipped = encode_prompt("a red house", tok, enc, clip_skip=2).context
    # A1111: the hidden state one layer earlier, through the final layer norm
    torch.testing.assert_close(skipped, enc(ids, use_layers=2, final_norm=True).hidden)
    assert not torch.allclose(skipped, encode_prompt("a red house", tok, enc).context)


class BangTokenizer(FakeTokenizer):
    """Like FakeTokenizer, but "!" is its own token 0 (as in diffusers' SDXL tokenizer_2)."""

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(text.split("!")):
            if i:
                ids.append(0)
            ids += super().encode(part)
        return ids


def test_one_tokenizer_per_encoder():
    tok_l, tok_g = FakeTokenizer(), BangTokenizer()
    clip_l, clip_g = FakeEncoder(SDXL_L_CFG, seed=16), FakeEncoder(OPENCLIP_CFG, seed=17)
    encode_prompt("t1!! t2", [tok_l, tok_g], [clip_l, clip_g], mode="plain")
    assert clip_l.calls[-1][0][0, :4].tolist() == [BOS, *tok_l.encode("t1!!"), 1002, EOS]
    assert clip_g.calls[-1][0][0, :6].tolist() == [BOS, 1001, 0, 0, 1002, EOS]
    with pytest.raises(ValueError, match="2 tokenizers for 1 encoders"):
        encode_prompt("t1", [tok_l, tok_g], [clip_l])
    with pytest.raises(ValueError, match="into 1 and 2 chunks"):
        encode_prompt(words(70) + "!" * 10, [tok_l, tok_g], [clip_l, clip_g])
