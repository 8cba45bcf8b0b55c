"""CLIPTokenizer against transformers' CLIPTokenizer (tokenizers backend) on ~1,100 generated prompts."""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
import random
import re
import time
import unicodedata
from pathlib import Path

import pytest
import torch

from diffusekit.models.tokenizer import (
    _WHITESPACE,
    AddedToken,
    CLIPTokenizer,
    _letter_number_classes,
    _patterns,
    normalize,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 48894

# ------------------------------------------------------------------------------------------------
# Prompt corpus: fragments by category, mixed by a seeded generator

WORDS = """masterpiece best quality portrait of a woman man cat dog castle forest river sunset cinematic
lighting highly detailed 8k octane render trending on artstation by greg rutkowski ultra sharp focus
bokeh watercolor oil painting concept art photorealistic volumetric fog hdr dslr anime girl landscape
it's don't we'll they're i'm you've he'd o'clock rock'n'roll isn't SHOUTING CamelCase McDonald's
x-ray t-shirt e-mail self-portrait 1girl 2boys solo looking_at_viewer blue_eyes long_hair""".split()

# fmt: off
CATEGORIES: dict[str, list[str]] = {
    "punctuation": [
        "!", "!!", "!!!", "...", "..", "?", "?!", "--", "---", "~~~", "''", '""', "`", "```", "@", "#", "$%",
        "^", "&", "*", "_", "+=", "<>", "/", "\\", "|", ";", ":", ",", ",,", "&amp;", "&lt;b&gt;",
        "<b>bold</b>", "''s", "'S", "'T", "'Re",
    ],
    "numbers": [
        "3.14", "1,000,000", "2024", "1e-5", "0.5x", "-42", "1/2", "½", "²", "Ⅻ", "٣٤٥", "१२३", "1st",
        "１２３",
    ],
    "accents": [
        "café", "naïve", "Ångström", "Zürich", "São Paulo", "Łódź", "résumé", "Crème brûlée", "Ærøskøbing",
        "cafe\u0301", "Zu\u0308rich", "A\u030angstro\u0308m", "İstanbul", "STRASSE", "straße", "ẞ", "ﬁnance",
        "ǅ", "Ǳ", "ᾼ", "\u212a", "\u212b", "\u2126",
    ],
    "scripts": [
        "東京タワー", "美しい風景", "한국어 텍스트", "中文提示词", "ｶﾀｶﾅ", "Москва", "ПРИВЕТ мир", "Ёлка",
        "ΟΔΟΣ", "Σίσυφος", "ΣΑΣ ΣΑΣ", "ὈΔΥΣΣΕΎΣ", "مرحبا بالعالم", "שלום עולם", "नमस्ते", "สวัสดี",
    ],
    "emoji": [
        "😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "❤️", "🇯🇵", "1️⃣", "🧑🏿\u200d🚀", "✨🔥💯",
    ],
    "combining": [
        "e\u0301", "a\u0308\u0304", "n\u0303", "Z\u0324\u0354\u0367\u0311a\u0356\u032d\u0308l\u036eg\u0317o",
        "\u0301", "\u0915\u094d\u0937", "\u1100\u1161\u11a8", "o\u0323\u0302",
    ],
    "whitespace": [
        "  ", "\t", "\n\n", "\r\n", "\u00a0", "\u3000", "\u2003", "\u2028", "\x0b", "\x0c", "\x85",
        "\x1c", "\x1f", "\u200b", "\ufeff", "\u200d", "\x00", "\x07", "\x7f", "\u180e",
    ],
    "a1111": [
        "(masterpiece:1.2)", "((best quality))", "[foo|bar]", "[cat:dog:0.5]", "\\(escaped\\)",
        "<lora:name:0.8>", "BREAK", "{a|b}", "AND", "(red hair:1.3), (blue eyes:0.8)", "[[[low quality]]]",
        "embedding:EasyNegative",
    ],
    "specials": [
        BOS, EOS, "<|StartOfText|>", "<|ENDOFTEXT|>", "<|endoftext|", "|endoftext|>", "< |endoftext|>",
        "</w>", "hello</w>world", BOS + EOS,
    ],
}

EDGE_PROMPTS = [
    "", " ", "\t\n ", "a", "A", "a photo of a cat", "wow!! x", "!", "!!!", "!<|endoftext|>!",
    "a<|endoftext|>b", "A <|ENDOFTEXT|> b <|StartOfText|> c", "x <|endoftext|>  y", "<| endoftext|>",
    "a  <|StartOfText|>\tb", "e<|endoftext|>\u0301", "<|START\u2003OFTEXT|>", "ΣΑΣ ΟΔΟΣ.", "İİ",
    "\x1c\x1d\x1e\x1f", "a\x1cb", "a\u200bb", "\u0301\u0301", "it's it'S IT'S it''s", "1,000,000 and 3.14",
    "👨\u200d👩\u200d👧\u200d👦👨\u200d👩\u200d👧\u200d👦", "(masterpiece:1.2), [foo|bar], \\(escaped\\)",
    "</w></w>",
]
# fmt: on
SEPARATORS = [" ", " ", ", ", "", "  ", "\t", "\n", " | ", ",", "\u3000"]


def make_prompts(n: int = 1100, seed: int = 1234) -> list[str]:
    """EDGE_PROMPTS, then seeded mixes of words and fragments with case and normal-form changes."""
    rng = random.Random(seed)
    fragments = list(CATEGORIES.values())
    prompts = list(EDGE_PROMPTS)
    while len(prompts) < n:
        count = rng.randint(100, 300) if rng.random() < 0.05 else rng.randint(1, 14)
        parts = [
            rng.choice(rng.choice(fragments)) if rng.random() < 0.45 else rng.choice(WORDS)
            for _ in range(count)
        ]
        text = "".join(part + rng.choice(SEPARATORS) for part in parts)
        style = rng.random()
        if style < 0.1:
            text = text.upper()
        elif style < 0.2:
            text = text.title()
        elif style < 0.3:
            text = unicodedata.normalize("NFD", text)
        elif style < 0.35:
            text = unicodedata.normalize("NFKD", text)
        if rng.random() < 0.2:
            text = rng.choice(SEPARATORS) + text
        prompts.append(text)
    return prompts


PROMPTS = make_prompts()

# ------------------------------------------------------------------------------------------------
# Reference folders, written without CLIPTokenizer


@functools.cache
def independent_vocab() -> tuple[dict[str, int], list[str]]:
    """vocab and merge lines rebuilt from the packaged .gz, with a separate derivation of the byte table."""
    raw = (importlib.resources.files("diffusekit") / "assets" / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 1 + N_MERGES]
    shown = [b for b in range(256) if chr(b).isprintable() and b != 0x20]  # no space, NBSP or soft hyphen
    chars = [chr(b) for b in shown] + [chr(256 + k) for k in range(256 - len(shown))]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.cache
def independent_files() -> tuple[str, str]:
    """Texts of vocab.json and merges.txt as the diffusers repos hold them."""
    vocab, merges = independent_vocab()
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges) + "\n"


@functools.cache
def assigned_chars() -> list[str]:
    """Every code point Python's unicodedata assigns, except NUL and surrogates."""
    return [chr(c) for c in range(1, 0x110000) if unicodedata.category(chr(c)) not in ("Cs", "Cn")]


def token_dict(content: str, normalized: bool, **extra: object) -> dict:
    """An added token as tokenizer files spell it."""
    flags = {"lstrip": False, "rstrip": False, "single_word": False}
    return {"content": content, "normalized": normalized, **flags, **extra}


def write_layout(folder: Path, layout: str) -> Path:
    """A tokenizer folder laid out like the diffusers repos' (sd1, sd2, sdxl2) or bare vocab + merges."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_text, merges_text = independent_files()
    (folder / "vocab.json").write_text(vocab_text, encoding="utf-8")
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    config: dict = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace"}
    config |= {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    if layout in ("sd1", "sd2"):  # SD1.x and SD2.x repos: AddedToken dicts and special_tokens_map.json
        pad = EOS if layout == "sd1" else "!"
        named = {"bos_token": token_dict(BOS, True), "eos_token": token_dict(EOS, True)}
        named["unk_token"] = token_dict(EOS, True)
        legacy = {key: {"__type": "AddedToken", **value} for key, value in named.items()}
        config |= {**legacy, "pad_token": pad}
        (folder / "special_tokens_map.json").write_text(json.dumps({**named, "pad_token": pad}))
    elif layout == "sdxl2":  # SDXL's tokenizer_2: added_tokens_decoder, pad "!"
        decoder = {
            "0": token_dict("!", False, special=True),
            "49406": token_dict(BOS, True, special=True),
            "49407": token_dict(EOS, False, special=True),
        }
        config |= {"added_tokens_decoder": decoder, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
                   "pad_token": "!"}  # fmt: skip
    elif layout != "bare":
        raise ValueError(layout)
    if layout != "bare":
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict:
    """transformers tokenizers of the SD1 layout (pad <|endoftext|>) and SDXL's tokenizer_2 (pad !)."""
    root = tmp_path_factory.mktemp("ref")
    return {
        pad: transformers.CLIPTokenizer.from_pretrained(write_layout(root / layout, layout))
        for pad, layout in ((EOS, "sd1"), ("!", "sdxl2"))
    }


@pytest.fixture(scope="module")
def ours() -> dict[str, CLIPTokenizer]:
    return {EOS: CLIPTokenizer.bundled(), "!": CLIPTokenizer.bundled(pad_token="!")}


def assert_same_ids(got: list[list[int]], want: list[list[int]], prompts: list[str]) -> None:
    """Equal id lists, naming the first prompt that differs."""
    assert len(got) == len(want) == len(prompts)
    for g, w, prompt in zip(got, want, prompts, strict=True):
        assert g == w, f"prompt {prompt!r}:\n ours         {g}\n transformers {w}"


def added_flags(ref) -> set[tuple[str, int, bool]]:
    return {(t.content, i, t.normalized) for i, t in ref.backend_tokenizer.get_added_tokens_decoder().items()}


def our_flags(tok: CLIPTokenizer) -> set[tuple[str, int, bool]]:
    return {(t.content, t.id, t.normalized) for t in tok.added_tokens}


# ------------------------------------------------------------------------------------------------
# Vocabulary and corpus


def test_bundled_vocabulary_matches_independent_build(tmp_path, ours):
    tok = ours[EOS]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49408, 49406, 49407, 49407)
    assert CLIPTokenizer.bundled(pad_token="!").pad_id == 0
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]  # the well-known CLIP ids
    tok.save_folder(tmp_path)
    vocab, merges = independent_vocab()
    assert json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8")) == vocab
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines() == ["#version: 0.2", *merges]


def test_corpus_covers_every_category():
    assert len(PROMPTS) >= 1000 and "" in PROMPTS
    assert sum(len(p.split()) >= 100 for p in PROMPTS) >= 20
    for name, fragments in CATEGORIES.items():
        hits = sum(any(f in p for f in fragments) for p in PROMPTS)
        assert hits >= 100, f"{name}: only {hits} prompts"
    assert sum(unicodedata.normalize("NFC", p) != p for p in PROMPTS) >= 100  # decomposed text


# ------------------------------------------------------------------------------------------------
# Against transformers


@pytest.mark.parametrize("pad", [EOS, "!"])
def test_encode_matches_transformers(refs, ours, pad):
    want = refs[pad](PROMPTS, add_special_tokens=False)["input_ids"]
    assert_same_ids([ours[pad].encode(p) for p in PROMPTS], want, PROMPTS)


@pytest.mark.parametrize("pad", [EOS, "!"])
def test_padded_batch_matches_transformers(refs, ours, pad):
    ref, tok = refs[pad], ours[pad]
    assert ref.pad_token == pad and ref.pad_token_id == tok.pad_id
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    got = tok(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    assert_same_ids(got.tolist(), want, PROMPTS)
    assert sum(len(tok.encode(p)) > 75 for p in PROMPTS) > 20  # the truncating path ran


@pytest.mark.parametrize("pad", [EOS, "!"])
def test_saved_folder_loads_in_transformers(tmp_path, ours, pad):
    folder = CLIPTokenizer.bundled().save_folder(tmp_path / "tokenizer", pad_token=pad)
    assert sorted(p.name for p in folder.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]  # fmt: skip
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    assert (ref.pad_token, ref.pad_token_id, ref.bos_token_id, ref.eos_token_id) == (
        pad,
        ours[pad].pad_id,
        49406,
        49407,
    )
    assert added_flags(ref) == our_flags(ours[pad])
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert_same_ids(ours[pad](PROMPTS).tolist(), want, PROMPTS)


LAYOUTS = [
    "sd1",
    "sd2",
    "sdxl2",
    "bare",
    "ours-sd1",
    "ours-sdxl2",
    "saved-by-transformers",
    "tokenizer-json-only",
]


def make_layout(tmp_path: Path, layout: str, refs: dict, ours: dict) -> Path:
    """A folder of the named layout; the last two are what transformers 5's save_pretrained writes."""
    folder = tmp_path / layout
    if layout.startswith("ours-"):
        return ours[EOS].save_folder(folder, pad_token=EOS if layout == "ours-sd1" else "!")
    if layout in ("saved-by-transformers", "tokenizer-json-only"):
        refs["!"].save_pretrained(folder)
        assert (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").exists()
        if layout == "tokenizer-json-only":
            for extra in folder.iterdir():
                if extra.name != "tokenizer.json":
                    extra.unlink()
        return folder
    return write_layout(folder, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_from_folder_matches_transformers(tmp_path, refs, ours, layout):
    folder = make_layout(tmp_path, layout, refs, ours)
    tok = CLIPTokenizer.from_folder(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (
        ref.pad_token_id, ref.bos_token_id, ref.eos_token_id, len(ref))  # fmt: skip
    assert our_flags(tok) == added_flags(ref)
    prompts = EDGE_PROMPTS + PROMPTS[::6]
    want = ref(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert_same_ids(tok(prompts).tolist(), want, prompts)


def test_from_folder_round_trip(tmp_path, ours):
    for name, pad in (("sd1", EOS), ("sdxl2", "!")):
        again = CLIPTokenizer.from_folder(ours[pad].save_folder(tmp_path / name))
        assert again.added_tokens == ours[pad].added_tokens and again.pad_token == pad
        assert [again.encode(p) for p in PROMPTS[::3]] == [ours[pad].encode(p) for p in PROMPTS[::3]]


def test_missing_tokenizer_files_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json, or vocab\.json together with merges\.txt"):
        CLIPTokenizer.from_folder(empty)
    (empty / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"found \['vocab\.json'\]"):
        CLIPTokenizer.from_folder(empty)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="pass its tokenizer/ or tokenizer_2/ subfolder"):
        CLIPTokenizer.from_folder(tmp_path)


def test_non_clip_tokenizer_json_is_rejected(tmp_path):
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}})
    )
    with pytest.raises(ValueError, match="end_of_word_suffix"):
        CLIPTokenizer.from_folder(tmp_path)


def test_inconsistent_vocabulary_is_rejected(tmp_path):
    vocab = {"a": 0, "b": 1, "b</w>": 2, BOS: 3, EOS: 4}
    with pytest.raises(ValueError, match=r"1 merges use or make tokens missing .*'a b</w>'"):
        CLIPTokenizer(vocab, [("a", "b</w>")])
    tiny = CLIPTokenizer({**vocab, "ab</w>": 5}, [("a", "b</w>")])
    assert tiny.encode("ab") == [5] and tiny.vocab_size == 6
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges\.txt:2: expected two space-separated symbols"):
        CLIPTokenizer.from_folder(tmp_path)


def test_decode_matches_transformers(refs, ours):
    ref, tok = refs[EOS], ours[EOS]
    for prompt in PROMPTS[:300]:
        ids = tok.encode(prompt)
        assert tok.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=False), repr(prompt)
    rng = random.Random(7)
    for _ in range(300):  # arbitrary ids: split UTF-8 sequences, specials in odd places
        ids = [
            rng.randrange(49408) if rng.random() < 0.7 else rng.randrange(512)
            for _ in range(rng.randint(1, 12))
        ]
        assert tok.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=False), ids
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([49408])


def test_constructor_with_extra_added_tokens(tmp_path, ours):
    """Added tokens beyond the vocabulary (textual inversion), matched normalized or raw."""
    vocab, merge_lines = independent_vocab()
    merges = [(a, b) for a, b in (m.split(" ") for m in merge_lines)]
    extra = [AddedToken("<cat-toy>", 49408, normalized=True, special=False), AddedToken("<Dog>", 49409)]
    tok = CLIPTokenizer(vocab, merges, added_tokens=[*ours[EOS].added_tokens, *extra])
    assert tok.vocab_size == 49410 and tok.pad_id == 49407
    assert [tok.encode(p) for p in PROMPTS[::3]] == [ours[EOS].encode(p) for p in PROMPTS[::3]]
    folder = tok.save_folder(tmp_path / "ti")
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    assert added_flags(ref) == our_flags(tok)
    assert CLIPTokenizer.from_folder(folder).added_tokens == tok.added_tokens
    prompts = ["a <CAT-TOY> sits <Dog> <dog>", "<cat-toy><cat-toy>!", "x<Dog>\u0301y", *PROMPTS[:50]]
    assert_same_ids(
        [tok.encode(p) for p in prompts], ref(prompts, add_special_tokens=False)["input_ids"], prompts
    )
    for ids in tok(prompts).tolist():
        assert tok.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------
# The emulated Unicode classes and normalizer, code point by code point


ASCII = "".join(chr(cp) for cp in range(0x80))


def onig_marks(pattern: str, text: str) -> str:
    """text with NUL wherever the tokenizers (Oniguruma) pattern matches a code point."""
    return tokenizers.normalizers.Replace(tokenizers.Regex(pattern), "\0").normalize_str(text)


def test_unicode_classes_match_tokenizers_engine():
    """\\p{L}, \\p{N} and \\s as the Rust engine sees them, at every code point unicodedata knows."""
    chars = assigned_chars()
    text = "".join(chars)
    letters, numbers = _letter_number_classes()
    for onig, emulated in (
        (r"\p{L}", f"[{letters}]"),
        (r"\p{N}", f"[{numbers}]"),
        (r"\s", f"[{_WHITESPACE}]"),
    ):
        want = onig_marks(onig, text)
        got = re.sub(emulated, "\0", text)
        assert len(want) == len(got) == len(text)
        wrong = [hex(ord(c)) for c, g, w in zip(chars, got, want, strict=True) if g != w]
        assert not wrong, f"{onig} differs at {wrong[:20]}"
    assert onig_marks(r"\s", "\x1c\x1d\x1e\x1f") == "\x1c\x1d\x1e\x1f"  # Python's \s would match these


def test_ascii_patterns_split_ascii_text_as_the_full_ones():
    """The cut-down classes used on ASCII text agree with the full ones at every ASCII code point, so
    both patterns split any ASCII text alike (a regex class only meets the text's own characters)."""
    letters, numbers = _letter_number_classes(0x80)
    assert re.findall(f"[{letters}]", ASCII) == re.findall(f"[{_letter_number_classes()[0]}]", ASCII)
    assert re.findall(f"[{numbers}]", ASCII) == list("0123456789")
    text = ASCII + " a red circle, 3 blue stars: don't (stop)! x2  \t\n"
    full, cut = _patterns(ascii_only=False), _patterns(ascii_only=True)
    assert cut.words.findall(text) == full.words.findall(text)
    assert cut.byte_level.findall(text) == full.byte_level.findall(text)


def test_normalizer_matches_tokenizers_per_code_point():
    norm = tokenizers.normalizers
    reference = norm.Sequence([norm.NFC(), norm.Replace(tokenizers.Regex(r"\s+"), " "), norm.Lowercase()])
    chars = assigned_chars()
    text = "\0".join(chars)  # NUL keeps neighbours from composing
    assert normalize(text) == reference.normalize_str(text)
    for sample in [*PROMPTS, "ΣΑΣ", "ΟΔΟΣ ΟΔΟΣ.", "A\u030a\u0327", "\u1100\u1161\u11a8", "e\u0301\u0323"]:
        assert normalize(sample) == reference.normalize_str(sample), repr(sample)


# ------------------------------------------------------------------------------------------------
# The batch call


def test_call_layout_and_options(ours):
    tok = ours[EOS]
    long = " ".join(["cat"] * 100)
    ids = tok([long, "a cat"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == 49406 and ids[0, 76] == 49407 and (ids[0, 1:76] == 2368).all()
    assert ids[1, :4].tolist() == [49406, 320, 2368, 49407] and (ids[1, 4:] == 49407).all()
    zero_pad = tok([long, "a cat"], pad_token_id=0)
    assert torch.equal(zero_pad[0], ids[0]) and torch.equal(zero_pad[1, :4], ids[1, :4])
    assert (zero_pad[1, 4:] == 0).all()
    assert torch.equal(ours["!"]([long, "a cat"]), zero_pad)
    assert torch.equal(tok("a cat"), ids[1:])
    assert tok([long], max_length=10).tolist() == [[49406, *[2368] * 8, 49407]]
    untruncated = tok([long, "a cat"], truncation=False)
    assert (
        untruncated.shape == (2, 102) and untruncated[0, 101] == 49407 and untruncated[1, 4:].eq(49407).all()
    )
    assert tok([]).shape == (0, 77)
    with pytest.raises(ValueError, match="max_length"):
        tok(["a"], max_length=1)
    with pytest.raises(ValueError, match="pad_token_id"):
        tok(["a"], pad_token_id=49408)
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a \ud800 b")


def test_encoding_1000_prompts_is_fast():
    tok = CLIPTokenizer.bundled()  # cold word cache
    start = time.perf_counter()
    for prompt in PROMPTS[:1000]:
        tok.encode(prompt)
    assert time.perf_counter() - start < 2.0
