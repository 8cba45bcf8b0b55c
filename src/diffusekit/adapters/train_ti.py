"""Train a textual-inversion embedding (Gal et al. 2022) for a new word on captioned images.

Only the new word's vectors are trained (one (n, width) matrix per text encoder), initialised from the
token embeddings of an existing word; the model is frozen. The vectors enter the prompt through the same
placeholder ids and token-embedding hooks as a loaded embedding (``embeddings.active_embeddings``), and
the loss is the LoRA trainer's (``train_lora.LoraTraining``), so data, buckets, min-SNR and exact resume
are shared. Saved as A1111's ``.pt`` (``string_to_param``) or a ``.safetensors`` with ``emb_params``
(SDXL: ``clip_l`` + ``clip_g``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints.single_file import save_state_dict
from ..models.sd import StableDiffusion
from .embeddings import EmbeddingError, _token_embedding, active_embeddings
from .train_lora import LoraTraining

__all__ = ["EmbeddingParameters", "make_ti_loss_fn", "save_embedding"]


class EmbeddingParameters(nn.Module):
    """The vectors being trained: one (n_vectors, width) Parameter per text encoder."""

    def __init__(self, model: StableDiffusion, tokenizer, init_word: str, n_vectors: int) -> None:
        super().__init__()
        ids = tokenizer.encode(init_word)
        if not ids:
            raise EmbeddingError(f"--init-word {init_word!r} has no tokens; give a word such as 'object'")
        rows = [ids[i % len(ids)] for i in range(n_vectors)]
        self.vectors = nn.ParameterList(
            nn.Parameter(_token_embedding(enc).weight.detach()[rows].clone().float())
            for enc in model.text_encoders
        )


def make_ti_loss_fn(
    training: LoraTraining, params: EmbeddingParameters, name: str, batch: int
) -> Callable[[nn.Module, int], Tensor]:
    """A Trainer loss function: the embedding `name` placed in the captions for the step's forward pass."""
    encoders = training.model.text_encoders
    base = training.tokenizer

    def loss_fn(_module: nn.Module, step: int) -> Tensor:
        with active_embeddings(encoders, [base] * len(encoders), {name: list(params.vectors)}) as toks:
            training.tokenizer = toks
            try:
                return training.loss(step, batch)
            finally:
                training.tokenizer = base

    return loss_fn


def save_embedding(params: EmbeddingParameters, path: str | Path, name: str, step: int) -> Path:
    """Write A1111's .pt (string_to_param) or a .safetensors (emb_params; SDXL clip_l + clip_g)."""
    path = Path(path)
    vecs = [v.detach().cpu().float().contiguous() for v in params.vectors]
    suffix = path.suffix.lower()
    if len(vecs) == 2:
        if suffix != ".safetensors":
            raise EmbeddingError("an SDXL embedding is written as .safetensors (clip_l + clip_g)")
        save_state_dict({"clip_l": vecs[0], "clip_g": vecs[1]}, path)
    elif suffix == ".safetensors":
        save_state_dict({"emb_params": vecs[0]}, path)
    elif suffix == ".pt":
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vecs[0]}, "name": name, "step": step}
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(data, tmp)
        tmp.replace(path)
    else:
        raise EmbeddingError(f"{path.name}: write an embedding as .pt or .safetensors")
    return path
