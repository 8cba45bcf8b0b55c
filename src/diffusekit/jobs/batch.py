"""Several txt2img jobs that share model, size, steps and sampler in one sampler run.

Each image keeps its own prompt conditioning and its own seeded CPU generator (the pipeline draws noise
per image), so an image made in a batch is the one its job would make alone. This module drives the
pipeline's own txt2img flow (`Pipeline._txt2img`, `Pipeline.decode`, `Pipeline.info`) with a batch of
conditionings instead of one repeated; it adds no sampling logic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from ..memory import check_fits
from ..params import GenerationParams
from ..pipeline import Cancelled, GenerationResult, Pipeline, Progress, _Batch


def batchable(pipe: Pipeline, params: Sequence[GenerationParams]) -> list[tuple[dict, dict]] | None:
    """Each job's (cond, uncond) when they can share a run (same text length); None otherwise."""
    if not isinstance(pipe, Pipeline):
        return None  # SD3: one job at a time
    res = pipe.cfg.resolution
    ps = [p.validate(res, pipe.defaults) for p in params]
    width, height = ps[0].size(res)
    conds = [pipe.encode(p, width, height) for p in ps]
    shapes = {tuple(tuple(v.shape) for c in pair for v in c.values()) for pair in conds}
    return conds if len(shapes) == 1 else None


def generate_batch(
    pipe: Pipeline,
    params: Sequence[GenerationParams],
    conds: Sequence[tuple[dict, dict]],
    *,
    callback: Callable[[Progress], None] | None = None,
    cancels: Sequence[threading.Event] = (),
) -> list[GenerationResult]:
    """One image per job (batch_size 1, fixed seeds), sampled together; stops when every job is cancelled."""
    res = pipe.cfg.resolution
    ps = [p.validate(res, pipe.defaults) for p in params]
    first = ps[0]
    pipe.resolve_sampler(first)
    width, height = first.size(res)
    check_fits(pipe.memory_estimate(first.replace(batch_size=len(ps))), what=f"{width}x{height} x{len(ps)}")
    cond = {k: torch.cat([c[0][k] for c in conds]) for k in conds[0][0]}  # (B, T, D) and (B, adm)
    uncond = {k: torch.cat([c[1][k] for c in conds]) for k in conds[0][1]}
    seeds = [p.seed for p in ps]

    def report(step: int, total: int, pass_index: int = 1, denoised=None) -> None:
        if cancels and all(ev.is_set() for ev in cancels):
            raise Cancelled("generation cancelled")
        if callback is not None:
            callback(Progress(step, total, pass_index, 1, 0, denoised))

    run = _Batch(first, (cond, uncond), seeds, seeds, width, height, report)
    latents = pipe._txt2img(run)  # (B, C, h, w)
    images = pipe.decode(latents)
    return [
        GenerationResult([img], [pipe.info(p, s, s, img2img=False)], [s], latents[i : i + 1].cpu())
        for i, (img, p, s) in enumerate(zip(images, ps, seeds, strict=True))
    ]
