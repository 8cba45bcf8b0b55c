"""Prompt text to U-Net context: A1111 emphasis syntax, 75-token chunking and weighted CLIP encoding.

The behaviour follows AUTOMATIC1111's webui (``prompt_parser.parse_prompt_attention`` and
``FrozenCLIPEmbedderWithCustomWords``) so that a prompt copied from an A1111 infotext conditions the
model the same way:

* ``(a)`` multiplies the weight of ``a`` by 1.1, ``[a]`` divides it by 1.1, ``(a:1.3)`` multiplies by 1.3;
  groups nest and multiply. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters.
* A prompt longer than 75 tokens is split into several 77-id windows (BOS + 75 + EOS) that are encoded
  separately and concatenated along the token axis; ``BREAK`` starts a new window.
* Each token's hidden state is multiplied by its weight, then the window is rescaled so its mean is
  unchanged (A1111's "Original" emphasis).

Mode ``"plain"`` does what diffusers pipelines do instead: no syntax, one window, truncation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

CHUNK_TOKENS = 75  # prompt tokens per CLIP window; BOS and EOS make it 77
WINDOW = CHUNK_TOKENS + 2
COMMA_BACKTRACK = 20  # A1111 "comma_padding_backtrack" default
MAX_PROMPT_CHARS = 20_000  # parsing is quadratic in bracket depth; real prompts are far shorter
# The largest emphasis a token may get, either sign: A1111 has no bound, and a weight past float32's range
# (48 nested "(" reach 97; 1,000 reach 2.5e41) turns the conditioning into inf/NaN and the image black.
MAX_WEIGHT = 100.0
BREAK = "BREAK"
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
ENCODE_MODES = ("a1111", "a1111_no_norm", "plain")


class PromptError(ValueError):
    """A prompt that cannot be interpreted."""


class Tokenizer(Protocol):
    """What the chunker needs from a tokenizer (``diffusekit.models.tokenizer.CLIPTokenizer``)."""

    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


# ---------------------------------------------------------------------------------------------
# Emphasis syntax

# One alternative per kind of token; every character of any string matches one of them.
_ATTENTION_TOKEN = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])          # \( \) \[ \] \\ stand for the character itself
    | (?P<stray>\\)                      # a backslash before anything else is dropped
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # ":1.3)" closes the innermost round group with that factor
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str, *, max_chars: int = MAX_PROMPT_CHARS) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs with A1111's emphasis rules; BREAK becomes ("BREAK", -1).

    Quirks kept on purpose because A1111 has them (its results are reproduced exactly, float for float):
    unclosed ``(`` / ``[`` apply their factor to everything after them; a stray ``)`` or ``]`` is text;
    a non-numeric weight such as ``(cat:abc)`` is text inside a plain round group (``cat:abc`` x1.1);
    a backslash that escapes nothing is removed; the BREAK marker's -1 is scaled by enclosing groups
    (so ``(BREAK)`` no longer acts as a break); runs with equal weights merge, possibly leaving ``""``.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    if len(text) > max_chars:
        raise PromptError(
            f"the prompt has {len(text):,} characters, more than the limit of {max_chars:,}; shorten it"
        )

    runs: list[list[Any]] = []  # [text, weight], mutated in place as groups close
    round_starts: list[int] = []  # index into runs where each open "(" began
    square_starts: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group(0)
        if kind == "escaped":
            runs.append([match.group("escaped"), 1.0])
        elif kind == "stray":
            runs.append(["", 1.0])
        elif kind == "open":
            (round_starts if token == "(" else square_starts).append(len(runs))
        elif kind == "weight" and round_starts:
            scale_from(round_starts.pop(), _parse_weight(match.group("weight"), token))
        elif token == ")" and round_starts:
            scale_from(round_starts.pop(), ROUND_FACTOR)
        elif token == "]" and square_starts:
            scale_from(square_starts.pop(), SQUARE_FACTOR)
        else:  # plain text, ":", or a closer / ":w)" with nothing open to close
            for i, part in enumerate(_BREAK_SPLIT.split(token)):
                if i > 0:
                    runs.append([BREAK, -1.0])
                runs.append([part, 1.0])

    for start in round_starts:  # unclosed groups still count, round ones first
        scale_from(start, ROUND_FACTOR)
    for start in square_starts:
        scale_from(start, SQUARE_FACTOR)

    if not runs:
        return [("", 1.0)]
    for run_text, weight in runs:
        if not (run_text == BREAK and weight == -1.0) and not abs(weight) <= MAX_WEIGHT:
            shown = run_text.strip()[:40] or "(empty text)"
            raise PromptError(
                f"the emphasis weight of {shown!r} is {weight:.4g} (nested groups multiply); valid: "
                f"-{MAX_WEIGHT:g}..{MAX_WEIGHT:g}: remove brackets or lower the (text:weight) number"
            )
    merged: list[list[Any]] = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def _parse_weight(number: str, token: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise PromptError(
            f"emphasis weight {number!r} in {token!r} is not a number; write e.g. (word:1.3), "
            "or escape the parenthesis as \\) to keep it as text"
        ) from None


# ---------------------------------------------------------------------------------------------
# Chunking


@dataclass(frozen=True)
class PromptChunk:
    """One CLIP window: BOS, 75 prompt tokens padded with EOS, EOS; one weight per id (77 each)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]


class _ChunkBuilder:
    """Accumulates weighted tokens into 75-token chunks the way A1111's ``tokenize_line`` does."""

    def __init__(self, bos: int, eos: int, comma: int | None, backtrack: int) -> None:
        self.bos, self.eos, self.comma, self.backtrack = bos, eos, comma, backtrack
        self.chunks: list[PromptChunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1  # position of the last comma in the open chunk

    def close(self) -> None:
        pad = CHUNK_TOKENS - len(self.ids)
        ids = (self.bos, *self.ids, *([self.eos] * pad), self.eos)
        weights = (1.0, *self.weights, *([1.0] * pad), 1.0)
        self.chunks.append(PromptChunk(ids, weights))
        self.ids, self.weights, self.last_comma = [], [], -1

    def add(self, token: int, weight: float) -> None:
        if token == self.comma:
            self.last_comma = len(self.ids)
        elif (
            self.backtrack
            and len(self.ids) == CHUNK_TOKENS
            and self.last_comma != -1
            and len(self.ids) - self.last_comma <= self.backtrack
        ):
            # The chunk is full and a comma is near its end: carry the words after it to the next chunk.
            cut = self.last_comma + 1
            tail_ids, tail_weights = self.ids[cut:], self.weights[cut:]
            del self.ids[cut:], self.weights[cut:]
            self.close()
            self.ids, self.weights = tail_ids, tail_weights
        if len(self.ids) == CHUNK_TOKENS:
            self.close()
        self.ids.append(token)
        self.weights.append(weight)

    def finish(self) -> list[PromptChunk]:
        if self.ids or not self.chunks:
            self.close()
        return self.chunks


def chunk_prompt(
    prompt: str,
    tokenizer: Tokenizer,
    *,
    emphasis: bool = True,
    comma_backtrack: int = COMMA_BACKTRACK,
    max_chars: int = MAX_PROMPT_CHARS,
) -> list[PromptChunk]:
    """Tokenize a prompt into A1111 chunks (at least one); emphasis=False treats the text literally."""
    if not 0 <= comma_backtrack < CHUNK_TOKENS:
        raise ValueError(f"comma_backtrack={comma_backtrack} must be within 0..{CHUNK_TOKENS - 1}")
    runs = parse_prompt_attention(prompt, max_chars=max_chars) if emphasis else [(_checked(prompt), 1.0)]
    builder = _ChunkBuilder(tokenizer.bos_id, tokenizer.eos_id, _comma_id(tokenizer), comma_backtrack)
    for text, weight in runs:
        if text == BREAK and weight == -1:
            builder.close()
            continue
        for token in tokenizer.encode(text):
            builder.add(token, weight)
    return builder.finish()


def plain_chunk(prompt: str, tokenizer: Tokenizer) -> PromptChunk:
    """diffusers-style window: the literal text, truncated to 75 tokens, all weights 1."""
    ids = tokenizer.encode(_checked(prompt))[:CHUNK_TOKENS]
    pad = CHUNK_TOKENS - len(ids)
    eos = tokenizer.eos_id
    return PromptChunk((tokenizer.bos_id, *ids, *([eos] * pad), eos), (1.0,) * WINDOW)


def _checked(prompt: str) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return prompt


def _comma_id(tokenizer: Tokenizer) -> int | None:
    ids = tokenizer.encode(",")
    return ids[0] if len(ids) == 1 else None


# ---------------------------------------------------------------------------------------------
# Encoding


@dataclass
class PromptEmbedding:
    """Cross-attention context for one prompt and, for SDXL, the pooled text embedding."""

    context: torch.Tensor  # (B, 77 * n_chunks, sum of encoder widths)
    pooled: torch.Tensor | None = None  # (B, P) from the last encoder's first chunk

    @property
    def n_chunks(self) -> int:
        return self.context.shape[1] // WINDOW


def encode_prompt(
    prompt: str,
    tokenizer: Tokenizer | Sequence[Tokenizer],
    encoders: Sequence[torch.nn.Module] | torch.nn.Module,
    *,
    clip_skip: int = 1,
    mode: str = "a1111",
    comma_backtrack: int = COMMA_BACKTRACK,
    max_chars: int = MAX_PROMPT_CHARS,
) -> PromptEmbedding:
    """Encode a prompt with one or more CLIP text encoders (SDXL: two, concatenated on features).

    mode "a1111" (default): emphasis syntax, chunks, weights with the mean restored per chunk and encoder;
    "a1111_no_norm": the same without restoring the mean; "plain": diffusers-style, one truncated chunk.
    clip_skip follows A1111's numbering (1 = no skip). In the a1111 modes it only affects an SD1-style
    encoder (OpenAI CLIP whose output is the normed last layer), as A1111 ignores it for SD2 and SDXL; in
    "plain" mode it moves every encoder clip_skip - 1 layers below its default, as diffusers does.
    ``tokenizer`` may be one per encoder (diffusers' SDXL tokenizer_2 splits "!" differently).
    """
    if mode not in ENCODE_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(ENCODE_MODES)}")
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise ValueError(
            f"clip_skip must be an int >= 1 (1 = use the model's default layer), got {clip_skip!r}"
        )
    encoders = [encoders] if hasattr(encoders, "cfg") else list(encoders)
    if not encoders:
        raise ValueError("encoders is empty; give at least one text encoder")
    tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer] * len(encoders)
    if len(tokenizers) != len(encoders):
        raise ValueError(
            f"got {len(tokenizers)} tokenizers for {len(encoders)} encoders; give one, or one each"
        )

    windows: dict[int, tuple[list[PromptChunk], torch.Tensor]] = {}  # by id(tokenizer): chunks, ids
    hiddens: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for tok, encoder in zip(tokenizers, encoders, strict=True):
        if id(tok) not in windows:
            if mode == "plain":
                chunks = [plain_chunk(prompt, tok)]
            else:
                chunks = chunk_prompt(prompt, tok, comma_backtrack=comma_backtrack, max_chars=max_chars)
            windows[id(tok)] = chunks, torch.tensor([c.ids for c in chunks], dtype=torch.long)  # (n, 77)
        chunks, ids = windows[id(tok)]
        if hiddens and len(chunks) != hiddens[0].shape[0]:
            raise ValueError(
                f"the tokenizers split the prompt into {hiddens[0].shape[0]} and {len(chunks)} chunks; "
                "encoders whose outputs are concatenated need the same chunking"
            )
        cfg = encoder.cfg
        enc_ids = pad_after_eos(ids, tok.eos_id, cfg.pad_token_id).to(_device_of(encoder))
        out = encoder(enc_ids, use_layers=_use_layers(cfg, clip_skip, mode), final_norm=None)
        hidden = out.hidden  # (n, 77, W)
        if hidden.shape[:2] != ids.shape:
            raise ValueError(
                f"text encoder returned hidden states of shape {tuple(hidden.shape)} for ids of shape "
                f"{tuple(ids.shape)}; expected (n_chunks, 77, width)"
            )
        weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32)  # (n, 77)
        if mode != "plain" and bool((weights != 1.0).any()):
            hidden = apply_emphasis(hidden, weights, normalize=mode == "a1111")
        hiddens.append(hidden)
        pooled = getattr(out, "pooled", None)

    context = torch.cat(hiddens, dim=-1)  # (n, 77, C)
    context = context.reshape(1, -1, context.shape[-1])  # (1, 77 * n, C): chunks follow each other
    return PromptEmbedding(context=context, pooled=None if pooled is None else pooled[:1])


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Scale each token's hidden state by its weight; normalize=True restores each chunk's mean (A1111)."""
    z = hidden.float()  # (n, 77, W)
    scaled = z * weights.to(z.device, torch.float32)[:, :, None]
    if normalize:
        before = z.mean(dim=(1, 2), keepdim=True)  # (n, 1, 1)
        after = scaled.mean(dim=(1, 2), keepdim=True)
        scaled = scaled * (before / after)
        if not bool(torch.isfinite(scaled).all()):  # weights whose effects cancel: a zero mean after them
            raise PromptError(
                "the emphasis weights cancel out (the weighted mean of a 75-token chunk is 0); "
                "use weights closer to 1 or --prompt-mode a1111_no_norm"
            )
    return scaled.to(hidden.dtype)


def after_first_eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(n, L) bool: True at the positions strictly after each row's first EOS (the padding)."""
    is_eos = (ids == eos_id).long()  # (n, L)
    return (is_eos.cumsum(dim=1) - is_eos) > 0


def pad_after_eos(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Replace every id after the first EOS of each row by pad_id (OpenCLIP pads with 0, CLIP with EOS)."""
    if pad_id == eos_id:
        return ids
    return ids.masked_fill(after_first_eos(ids, eos_id), pad_id)


def _use_layers(cfg: Any, clip_skip: int, mode: str) -> int | None:
    if clip_skip == 1:
        return None
    sd1_style = cfg.layout == "hf" and cfg.final_norm and cfg.use_layers == cfg.layers
    if mode != "plain" and not sd1_style:
        return None
    layers = cfg.use_layers - (clip_skip - 1)
    if layers < 1:
        raise ValueError(
            f"clip_skip={clip_skip} is too large for a text encoder using {cfg.use_layers} layers; "
            f"valid: 1..{cfg.use_layers}"
        )
    return layers


def _device_of(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def pad_to_same_length(
    cond: PromptEmbedding, uncond: PromptEmbedding, empty: PromptEmbedding
) -> tuple[PromptEmbedding, PromptEmbedding]:
    """Append encodings of the empty prompt (``empty``) to the shorter context until both are as long."""
    for name, emb in (("cond", cond), ("uncond", uncond)):
        if emb.context.shape[-1] != empty.context.shape[-1]:
            raise ValueError(
                f"{name} has context width {emb.context.shape[-1]} but the empty-prompt encoding has "
                f"{empty.context.shape[-1]}; encode all three with the same encoders"
            )
    step = empty.context.shape[1]  # 77
    diff = cond.context.shape[1] - uncond.context.shape[1]
    if diff % step:
        raise ValueError(
            f"context lengths {cond.context.shape[1]} and {uncond.context.shape[1]} differ by {diff}, "
            f"not a multiple of the empty-prompt length {step}"
        )
    if diff > 0:
        uncond = _extend(uncond, empty, diff // step)
    elif diff < 0:
        cond = _extend(cond, empty, -diff // step)
    return cond, uncond


def _extend(emb: PromptEmbedding, empty: PromptEmbedding, repeats: int) -> PromptEmbedding:
    batch = emb.context.shape[0]
    filler = empty.context.to(emb.context).expand(batch, -1, -1).repeat(1, repeats, 1)  # (B, 77 * r, C)
    return PromptEmbedding(torch.cat([emb.context, filler], dim=1), emb.pooled)
