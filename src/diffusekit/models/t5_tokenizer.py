"""The T5 tokenizer: a SentencePiece unigram model (``spiece.model``) + ``</s>`` + padding to a fixed length.

No PyPI wheel we can depend on ships T5's 32k-piece model file, so it is read from the model's folder
(diffusers layout: ``tokenizer_3/spiece.model``) or a path the user gives; SD3 single files carry none.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

PAD_ID = 0  # <pad>
EOS_ID = 1  # </s>
SPIECE_NAMES = ("spiece.model", "tokenizer.model")


class T5TokenizerError(ValueError):
    """The T5 tokenizer model is missing or unreadable."""


def find_spiece(folder: str | Path) -> Path:
    """The SentencePiece model inside a tokenizer folder (or the file itself); a clear error if none."""
    p = Path(folder)
    if p.is_file():
        return p
    for name in SPIECE_NAMES:
        for candidate in (p / name, p / "tokenizer_3" / name):
            if candidate.is_file():
                return candidate
    raise T5TokenizerError(
        f"no T5 SentencePiece model ({' or '.join(SPIECE_NAMES)}) in {p}; give the folder that holds "
        "it (a diffusers SD3 folder's tokenizer_3/) or run without T5"
    )


class T5Tokenizer:
    """Text -> (B, max_length) ids: SentencePiece pieces, truncated, then ``</s>``, then ``<pad>``."""

    def __init__(self, model_file: str | Path) -> None:
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise T5TokenizerError("the T5 tokenizer needs the 'sentencepiece' package") from e
        path = find_spiece(model_file)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise T5TokenizerError(f"{path} is not a SentencePiece model: {e}") from None
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, max_length: int) -> list[int]:
        """One prompt -> exactly max_length ids (content truncated to leave room for ``</s>``)."""
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        ids = list(self.sp.EncodeAsIds(text))[: max_length - 1] + [EOS_ID]
        return ids + [PAD_ID] * (max_length - len(ids))

    def __call__(self, texts: str | Sequence[str], max_length: int = 256) -> torch.Tensor:
        """(B,) prompts (or one) -> (B, max_length) long ids."""
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t, max_length) for t in texts], dtype=torch.long)
