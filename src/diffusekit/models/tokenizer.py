"""The CLIP byte-level BPE tokenizer that turns prompts into the ids SD text encoders read.

The scheme is OpenAI CLIP's: text bytes are mapped to printable characters, split into words by a regex,
each word's last symbol carries an end-of-word mark ``</w>``, and merges are applied in rank order.
Text normalization follows ``transformers.CLIPTokenizer`` (version 5, backed by ``tokenizers``), which is
what diffusers pipelines use: NFC, every run of Unicode White_Space becomes one space, lowercase code
point by code point (no final-sigma rule), then the CLIP split regex and the GPT-2 byte-level split.
There is no ftfy fixing, HTML unescaping or stripping, unlike the original CLIP code. Python's ``re``
has no ``\\p{L}``/``\\p{N}``, so those classes are built from ``unicodedata`` on first use (a few tenths
of a second, once per process); code points assigned after the running Python's Unicode version (14.0
on 3.11) can be classed differently from the Rust engine's newer tables.

Special ("added") tokens are matched before that: those marked ``normalized=False`` in the raw text,
the others in the normalized text, the way ``tokenizers`` extracts them. This matters for SD2 and SDXL's
second tokenizer, whose pad token ``!`` is such a token: transformers then encodes ``"wow!!"`` as
``wow</w> ! !`` instead of ``wow</w> !!</w>``, and pipelines feed exactly that to the text encoder.

The bundled vocabulary ``assets/bpe_simple_vocab_16e6.txt.gz`` is the merge list OpenAI released with
CLIP, copied unchanged from the open_clip_torch 3.3.0 wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``,
MIT licence; sha256 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a).
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

_VOCAB_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"
_MERGES_USED = 49152 - 256 - 2  # CLIP keeps this many merges: 256 bytes x2 + merges + 2 specials = 49408
_CACHE_LIMIT = 200_000  # words kept in the per-instance cache before it is reset
_NO_RANK = float("inf")

# Unicode White_Space, which is what `\s` means to the Oniguruma engine used by `tokenizers`.
# (Python's `\s` also matches U+001C..U+001F; those are not whitespace here.)
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d"
# The named special tokens transformers knows, in the order it registers them (later ones win).
_NAMED_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLIP_DEFAULTS = {
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
}


@dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim before BPE; normalized=True matches it in the normalized text."""

    content: str
    id: int
    normalized: bool = False
    special: bool = True


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable characters (vocab order)."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in shown]  # control bytes, space, NBSP, soft hyphen
    return {b: chr(b) for b in shown} | {b: chr(256 + k) for k, b in enumerate(hidden)}


@functools.cache
def _letter_number_classes(limit: int = 0x110000) -> tuple[str, str]:
    """Regex class bodies for `\\p{L}` and `\\p{N}` (general categories L* and N*), built from unicodedata,
    over the code points below `limit`: all of Unicode (about 1 s), or 0x80 for ASCII text (below)."""
    category = unicodedata.category
    chars = [chr(cp) for cp in range(limit)]
    letters = [ord(c) for c in chars if category(c)[0] == "L"]
    numbers = [ord(c) for c in chars if category(c)[0] == "N"]

    def body(codes: list[int]) -> str:
        spans: list[list[int]] = []  # [first, last] runs of consecutive code points
        for cp in codes:
            if spans and spans[-1][1] == cp - 1:
                spans[-1][1] = cp
            else:
                spans.append([cp, cp])
        return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in spans)

    return body(letters), body(numbers)


class _Patterns(NamedTuple):
    whitespace: re.Pattern[str]  # a run of White_Space
    words: re.Pattern[str]  # CLIP's split: special names, contractions, letter runs, digits, other runs
    byte_level: re.Pattern[str]  # GPT-2's split, applied to each word by the ByteLevel pre-tokenizer


@functools.cache
def _patterns(ascii_only: bool = False) -> _Patterns:
    """The tokenizer regexes with `\\p{L}`, `\\p{N}` and `\\s` emulated (built once, on first use).

    A regex class is only ever tested against the characters of the text, so on ASCII text the classes
    cut down to ASCII match exactly what the full ones do; `ascii_only` builds those, which skips the
    second of building the full Unicode classes for the usual all-ASCII prompt."""
    letters, numbers = _letter_number_classes(0x80 if ascii_only else 0x110000)
    other = f"[^{_WHITESPACE}{letters}{numbers}]"
    clip_split = re.compile(
        rf"<\|startoftext\|>|<\|endoftext\|>|{_CONTRACTIONS}|[{letters}]+|[{numbers}]|{other}+"
    )
    byte_level_split = re.compile(
        rf"{_CONTRACTIONS}| ?[{letters}]+| ?[{numbers}]+| ?{other}+"
        rf"|[{_WHITESPACE}]+(?![^{_WHITESPACE}])|[{_WHITESPACE}]+"
    )
    return _Patterns(re.compile(f"[{_WHITESPACE}]+"), clip_split, byte_level_split)


def normalize(text: str) -> str:
    """transformers' CLIP normalizer: NFC, whitespace runs to one space, per-code-point lowercase."""
    # the whitespace regex does not use the letter classes, so the ASCII patterns' one serves any text
    text = _patterns(ascii_only=True).whitespace.sub(" ", unicodedata.normalize("NFC", text))
    # str.lower() applies the final-sigma rule to U+03A3; the Rust normalizer maps it to U+03C3 always.
    return text.replace("\u03a3", "\u03c3").lower()


class CLIPTokenizer:
    """CLIP byte-level BPE: text -> token ids, as diffusers' SD pipelines compute them."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        added_tokens: Sequence[AddedToken] | None = None,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        unk_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
    ) -> None:
        """Build from a vocabulary, ranked merges and the added tokens (default: as SD folders load)."""
        self._encoder = dict(vocab)
        self._merges = [(str(a), str(b)) for a, b in merges]
        self._ranks = {pair: rank for rank, pair in enumerate(self._merges)}
        unknown = [
            f"{a} {b}" for a, b in self._merges if a + b not in vocab or a not in vocab or b not in vocab
        ]
        if unknown:
            raise ValueError(
                f"{len(unknown)} merges use or make tokens missing from the vocabulary: {unknown[:5]}"
            )
        if added_tokens is None:
            added_tokens = _default_added_tokens(self._encoder, bos_token, eos_token, pad_token)
        self._added = {t.content: t for t in added_tokens}
        self._decoder = {i: s for s, i in self._encoder.items()} | {t.id: t.content for t in added_tokens}
        self._vocab_size = max(self._decoder, default=-1) + 1
        self._names = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token}
        self._names["pad_token"] = pad_token
        self._ids = {key: self._token_id(tok, key) for key, tok in self._names.items()}
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        # Added tokens are cut out of the raw text, or (normalized=True) out of the normalized text.
        self._raw_ids = {t.content: t.id for t in added_tokens if not t.normalized and t.content}
        self._norm_ids = {normalize(t.content): t.id for t in added_tokens if t.normalized}
        self._norm_ids.pop("", None)
        self._raw_added = _alternation(self._raw_ids)
        self._norm_added = _alternation(self._norm_ids)
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def bundled(cls, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
        """The packaged CLIP vocabulary (49408 ids); pad_token="!" acts as SD2/SDXL's tokenizer_2 folder."""
        resource = importlib.resources.files("diffusekit") / "assets" / _VOCAB_RESOURCE
        lines = gzip.decompress(resource.read_bytes()).decode("utf-8").split("\n", _MERGES_USED + 1)
        pairs = [line.split() for line in lines[1 : 1 + _MERGES_USED]]  # line 0 is a header
        if len(pairs) != _MERGES_USED or any(len(p) != 2 for p in pairs):
            raise ValueError(f"packaged {_VOCAB_RESOURCE} is corrupt: expected {_MERGES_USED} merge pairs")
        merges = [(a, b) for a, b in pairs]
        symbols = list(bytes_to_unicode().values())
        tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *(a + b for a, b in merges)]
        tokens += [BOS_TOKEN, EOS_TOKEN]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"packaged {_VOCAB_RESOURCE} is corrupt: merges produce duplicate tokens")
        return cls(vocab, merges, pad_token=pad_token)

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> CLIPTokenizer:
        """Load a diffusers/transformers tokenizer folder: vocab.json + merges.txt, or tokenizer.json."""
        folder = Path(path)
        json_file, vocab_file, merges_file = (
            folder / n for n in ("tokenizer.json", "vocab.json", "merges.txt")
        )
        if json_file.is_file():  # transformers 5 prefers tokenizer.json when both forms are present
            vocab, merges, json_added = _read_tokenizer_json(json_file)
        elif vocab_file.is_file() and merges_file.is_file():
            vocab, merges, json_added = _read_json_object(vocab_file), _read_merges(merges_file), []
        else:
            raise FileNotFoundError(_missing_files_message(folder))
        config = _read_json_object(folder / "tokenizer_config.json", missing_ok=True)
        special_map = _read_json_object(folder / "special_tokens_map.json", missing_ok=True)
        added, names = _resolve_added_tokens(vocab, json_added, config, special_map)
        return cls(vocab, merges, added_tokens=added, **names)

    def save_folder(self, path: str | os.PathLike[str], *, pad_token: str | None = None) -> Path:
        """Write vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json as transformers reads.

        pad_token replaces this tokenizer's pad token in the written folder: SD1 folders use
        "<|endoftext|>", SD2 and SDXL's tokenizer_2 use "!" (which transformers then splits out as a token).
        """
        names = dict(self._names)
        added = dict(self._added)
        if pad_token is not None and pad_token != names["pad_token"]:
            if names["pad_token"] not in {names["bos_token"], names["eos_token"], names["unk_token"]}:
                added.pop(names["pad_token"], None)
            names["pad_token"] = pad_token
            if pad_token not in added:
                added[pad_token] = AddedToken(pad_token, self._token_id(pad_token, "pad_token"))
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = dict(sorted(self._encoder.items(), key=lambda item: item[1]))
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merge_lines = "".join(f"{a} {b}\n" for a, b in self._merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
        flags = {"lstrip": False, "rstrip": False, "single_word": False}
        special_map = {
            key: {"content": tok, **flags, "normalized": added[tok].normalized} if tok in added else tok
            for key, tok in names.items()
        }
        decoder = {
            str(t.id): {"content": t.content, **flags, "normalized": t.normalized, "special": t.special}
            for t in sorted(added.values(), key=lambda t: t.id)
        }
        config = {
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            **names,
            "clean_up_tokenization_spaces": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": 77,
            "tokenizer_class": "CLIPTokenizer",
        }
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return folder

    # ------------------------------------------------------------------ properties

    @property
    def bos_id(self) -> int:
        """Id of the start-of-text token (49406 for CLIP)."""
        return self._ids["bos_token"]

    @property
    def eos_id(self) -> int:
        """Id of the end-of-text token (49407 for CLIP)."""
        return self._ids["eos_token"]

    @property
    def pad_id(self) -> int:
        """Id of this tokenizer's pad token (49407, or 0 for "!")."""
        return self._ids["pad_token"]

    @property
    def pad_token(self) -> str:
        """This tokenizer's pad token."""
        return self._names["pad_token"]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (49408 for CLIP)."""
        return self._vocab_size

    @property
    def added_tokens(self) -> tuple[AddedToken, ...]:
        """The tokens matched verbatim before BPE, by id."""
        return tuple(sorted(self._added.values(), key=lambda t: t.id))

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, pad_token={self.pad_token!r})"

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS/EOS and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        words = _patterns(text.isascii()).words
        for raw in _split_on(text, self._raw_added, self._raw_ids):
            if isinstance(raw, int):
                ids.append(raw)
                continue
            for part in _split_on(normalize(raw), self._norm_added, self._norm_ids):
                if isinstance(part, int):
                    ids.append(part)
                    continue
                for word in words.findall(part):
                    cached = self._cache.get(word)
                    if cached is None:
                        cached = self._word_ids(word)
                    ids.extend(cached)
        return ids

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int = 77,
        pad_token_id: int | None = None,
        truncation: bool = True,
    ) -> torch.Tensor:
        """LongTensor (B, max_length): BOS, ids (cut to max_length - 2), EOS, then pad_token_id.

        pad_token_id defaults to this tokenizer's pad id. With truncation=False no text is cut and the
        width grows to the longest row if that exceeds max_length.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for BOS and EOS), got {max_length!r}")
        pad = self.pad_id if pad_token_id is None else pad_token_id
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size:
            raise ValueError(f"pad_token_id must be an int in [0, {self.vocab_size}), got {pad!r}")
        rows = []
        for text in batch:
            ids = self.encode(text)
            rows.append([self.bos_id, *(ids[: max_length - 2] if truncation else ids), self.eos_id])
        width = max([max_length, *(len(row) for row in rows)])
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids: bytes decoded as UTF-8 (bad sequences as U+FFFD), `</w>` as spaces, stripped."""
        data = bytearray()
        for i in ids:
            token = self._decoder.get(int(i))
            if token is None:
                raise ValueError(
                    f"token id {i} is not in the vocabulary (valid: ids of 0..{self.vocab_size - 1})"
                )
            if all(c in self._byte_decoder for c in token):
                data.extend(self._byte_decoder[c] for c in token)
            else:  # an added token outside the byte alphabet stands for its own UTF-8 text
                data.extend(token.encode("utf-8"))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    # ------------------------------------------------------------------ internals

    def _token_id(self, token: str, role: str) -> int:
        if token in self._added:
            return self._added[token].id
        if token in self._encoder:
            return self._encoder[token]
        raise ValueError(f"{role} {token!r} is neither in the vocabulary nor an added token")

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one CLIP-split word (cached): byte-level split, byte -> char map, BPE."""
        ids: list[int] = []
        unk = self._ids["unk_token"]
        for piece in _patterns(word.isascii()).byte_level.findall(word):
            try:
                data = piece.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"text holds {piece!r}, which is not valid Unicode (a lone surrogate)"
                ) from exc
            symbols = "".join(self._byte_encoder[b] for b in data)
            ids.extend(self._encoder.get(s, unk) for s in self._bpe(symbols))
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = result = tuple(ids)
        return result

    def _bpe(self, word: str) -> list[str]:
        """Merge the symbols of one word, the last marked `</w>`, lowest-ranked pair first."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(symbols) > 1:
            best = min(
                zip(symbols[:-1], symbols[1:], strict=True), key=lambda pair: ranks.get(pair, _NO_RANK)
            )
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols


def _missing_files_message(folder: Path) -> str:
    """Why a folder cannot be loaded: what was looked for and what is there."""
    wanted = "looked for tokenizer.json, or vocab.json together with merges.txt"
    if not folder.is_dir():
        return f"no CLIP tokenizer in {folder}: no such folder ({wanted})"
    found = sorted(p.name for p in folder.iterdir())
    root = "model_index.json" in found
    hint = "; this is a pipeline root, pass its tokenizer/ or tokenizer_2/ subfolder" if root else ""
    return f"no CLIP tokenizer files in {folder}: {wanted}; found {found or 'an empty folder'}{hint}"


def _alternation(contents: Iterable[str]) -> re.Pattern[str] | None:
    """Regex matching any of the strings, longest first (leftmost-longest, like tokenizers' matcher)."""
    unique = sorted({c for c in contents if c}, key=lambda c: (-len(c), c))
    return re.compile("|".join(map(re.escape, unique))) if unique else None


def _split_on(text: str, pattern: re.Pattern[str] | None, ids: Mapping[str, int]) -> list[str | int]:
    """text cut around the matches of pattern; each match becomes its token id."""
    if pattern is None:
        return [text] if text else []
    parts: list[str | int] = []
    start = 0
    for m in pattern.finditer(text):
        if m.start() > start:
            parts.append(text[start : m.start()])
        parts.append(ids[m.group()])
        start = m.end()
    if start < len(text):
        parts.append(text[start:])
    return parts


def _default_added_tokens(vocab: Mapping[str, int], bos: str, eos: str, pad: str) -> list[AddedToken]:
    """The added tokens of the SD1/SDXL folders as transformers 5 loads them: BOS normalized, others raw."""
    tokens = {bos: AddedToken(bos, -1, normalized=True), eos: AddedToken(eos, -1), pad: AddedToken(pad, -1)}
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(
            f"special tokens {missing} are not in the vocabulary; give added_tokens with their ids"
        )
    return [AddedToken(t.content, vocab[t.content], t.normalized) for t in tokens.values()]


def _resolve_added_tokens(
    vocab: Mapping[str, int],
    json_added: Sequence[Mapping[str, object]],
    config: Mapping[str, object],
    special_map: Mapping[str, object],
) -> tuple[list[AddedToken], dict[str, str]]:
    """Added tokens and named specials of a folder, resolved the way transformers 5 loads it.

    Base tokens come from tokenizer_config.json's added_tokens_decoder, else tokenizer.json's added_tokens
    (then special_tokens_map.json overrides the config's named tokens). A named token (CLIP defaults for
    those not named) keeps the flags of the base token with its text; otherwise it is registered after
    them with its own dict's flags, or normalized=False when given as a string, the last one winning.
    """
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
        entries = sorted(((int(k), v) for k, v in decoder.items()), key=lambda item: item[0])
        base = [_added_from_dict(v, idx, special_default=False) for idx, v in entries]
        sources: list[Mapping[str, object]] = [config]
    else:
        base = [_added_from_dict(v, int(str(v["id"])), special_default=False) for v in json_added]
        sources = [special_map, config]
    resolved = {t.content: t for t in base}
    names: dict[str, str] = {}
    for key in _NAMED_KEYS:
        value = next((s[key] for s in sources if s.get(key)), _CLIP_DEFAULTS.get(key))
        if value is None:
            continue
        if isinstance(value, Mapping):
            content = str(value["content"])
            own = _added_from_dict(value, -1, special_default=value.get("__type") != "AddedToken")
        elif isinstance(value, str):
            content, own = value, AddedToken(value, -1)
        else:
            raise ValueError(f"{key} in the tokenizer folder must be a string or a token dict, got {value!r}")
        base_token = next((t for t in base if t.content == content), None)
        flags = base_token or own
        token_id = resolved[content].id if content in resolved else vocab.get(content)
        if token_id is None:
            raise ValueError(f"{key} {content!r} is neither in vocab nor among the folder's added tokens")
        resolved[content] = AddedToken(content, token_id, flags.normalized, special=True)
        if key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            names[key] = content
    return list(resolved.values()), names


def _added_from_dict(entry: Mapping[str, object], token_id: int, *, special_default: bool) -> AddedToken:
    """AddedToken from its JSON form; normalized defaults to not special, as in transformers."""
    for flag in ("lstrip", "rstrip", "single_word"):
        if entry.get(flag):
            raise ValueError(f"added token {entry.get('content')!r} sets {flag}=true, which is not supported")
    special = bool(entry.get("special", special_default))
    return AddedToken(str(entry["content"]), token_id, bool(entry.get("normalized", not special)), special)


def _read_json_object(path: Path, *, missing_ok: bool = False) -> dict:
    """A JSON object from a file ({} for a missing optional file)."""
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Merges from a merges.txt: one "left right" pair a line, after an optional #version header."""
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{path}:{number}: expected two space-separated symbols, got {line!r}")
        merges.append((pair[0], pair[1]))
    if not merges:
        raise ValueError(f"{path}: no merges (empty, or only a header); expected the CLIP BPE merges")
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    """(vocab, merges, added_tokens) of a `tokenizers` tokenizer.json holding a CLIP BPE model."""
    data = _read_json_object(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        raise ValueError(
            f"{path}: expected a BPE model, found {model.get('type') if isinstance(model, dict) else model!r}"
        )
    if model.get("end_of_word_suffix") != END_OF_WORD:
        raise ValueError(
            f"{path}: not a CLIP tokenizer: end_of_word_suffix is {model.get('end_of_word_suffix')!r}, "
            f"expected {END_OF_WORD!r}"
        )
    merges = []
    for item in model.get("merges", []):
        pair = item.split(" ") if isinstance(item, str) else list(item)
        if len(pair) != 2:
            raise ValueError(f"{path}: malformed merge {item!r}; expected 'left right' or [left, right]")
        merges.append((str(pair[0]), str(pair[1])))
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError(f"{path}: model.vocab must map tokens to ids, found {type(vocab).__name__}")
    return vocab, merges, list(data.get("added_tokens") or [])
