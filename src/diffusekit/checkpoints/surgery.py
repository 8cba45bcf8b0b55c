"""State-dict surgery: split or strip by key prefix, and prune EMA/training-only entries (LDM layout)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .single_file import CheckpointError

EMA_PREFIX = "model_ema."
TRAINING_PREFIXES = (EMA_PREFIX, "optimizer.", "optimizer_states.", "lr_schedulers.", "callbacks.", "loops.")
TRAINING_KEYS = frozenset({"global_step", "epoch", "pytorch-lightning_version"})


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with ``prefix``, with the prefix removed; other keys are left out."""
    return {key[len(prefix) :]: value for key, value in sd.items() if key.startswith(prefix)}


def split_by_prefixes(
    sd: Mapping[str, torch.Tensor], prefixes: Mapping[str, str]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split into named parts by key prefix (longest prefix wins, stripped) and the unmatched leftover."""
    owners: dict[str, str] = {}
    for name, prefix in prefixes.items():
        if prefix in owners:
            raise ValueError(f"prefix {prefix!r} is given for both {owners[prefix]!r} and {name!r}")
        owners[prefix] = name
    ordered = sorted(owners, key=len, reverse=True)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in prefixes}
    leftover: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        prefix = next((p for p in ordered if key.startswith(p)), None)
        if prefix is None:
            leftover[key] = value
        else:
            parts[owners[prefix]][key[len(prefix) :]] = value
    return parts, leftover


def is_ema_key(key: str) -> bool:
    """True for LDM EMA entries (``model_ema.*``, including ``model_ema.decay``/``num_updates``)."""
    return key.startswith(EMA_PREFIX)


def is_training_key(key: str) -> bool:
    """True for entries only training needs: EMA copies, optimizer/scheduler/callback state, step counters."""
    return key.startswith(TRAINING_PREFIXES) or key in TRAINING_KEYS


def ema_key_for(key: str) -> str:
    """LDM's EMA name for a ``model.*`` weight: drop ``model.``, remove dots, prefix ``model_ema.``."""
    if not key.startswith("model."):
        raise ValueError(f"only 'model.*' weights have EMA copies in LDM checkpoints, got {key!r}")
    return EMA_PREFIX + key[len("model.") :].replace(".", "")


def prune(sd: Mapping[str, torch.Tensor], keep_ema: bool = False) -> dict[str, torch.Tensor]:
    """Drop EMA and training-only entries; keep_ema first swaps the UNet weights for their EMA copies."""
    out = {key: value for key, value in sd.items() if not is_training_key(key)}
    if not keep_ema:
        return out
    unet_keys = [key for key in out if key.startswith("model.diffusion_model.")]
    if not any(is_ema_key(key) and key not in ("model_ema.decay", "model_ema.num_updates") for key in sd):
        raise CheckpointError("has no EMA weights (no 'model_ema.*' tensors) to keep; leave out --keep-ema")
    if not unet_keys:
        raise CheckpointError("state dict has EMA weights but no 'model.diffusion_model.*' weights")
    claimed: dict[str, str] = {}
    missing: list[str] = []
    for key in unet_keys:
        ema_key = ema_key_for(key)
        if ema_key in claimed:
            raise CheckpointError(f"EMA name {ema_key!r} is ambiguous: fits {claimed[ema_key]!r} and {key!r}")
        claimed[ema_key] = key
        if ema_key not in sd:
            missing.append(key)
            continue
        if sd[ema_key].shape != out[key].shape:
            raise CheckpointError(
                f"EMA copy {ema_key!r} has shape {tuple(sd[ema_key].shape)}, "
                f"but {key!r} has {tuple(out[key].shape)}"
            )
        out[key] = sd[ema_key]
    if missing:
        raise CheckpointError(
            f"EMA is incomplete: {len(missing)} of {len(unet_keys)} UNet weights have no EMA copy "
            f"(first: {missing[0]!r} -> expected {ema_key_for(missing[0])!r})"
        )
    return out
