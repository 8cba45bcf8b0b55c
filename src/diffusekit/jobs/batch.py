"""Several txt2img jobs that share model, size, steps and sampler in one sampler run.

Each image keeps its own prompt conditioning and its own seeded CPU generator (the pipeline draws noise
per image), so an image made in a batch is the one its job would make alone. This module drives the
pipeline's own txt2img flow (`Pipeline._txt2img`, `Pipeline.decode`, `Pipeline.info`) with a batch of
conditionings instead of one repeated; it adds no sampling logic.

Bit-identity with solo runs: elementwise ops, 3x3 convolutions, group/layer norms and attention compute
each sample on its own, so a larger batch leaves their results unchanged. Dense GEMMs do not in fp32:
MKL/oneDNN pick other kernels (another summation order) for another row count, which moved the time
embedding, the MLPs and the 1x1 convolutions (proj_in/out, skip connections) in the last bit. Measured per
module on the default model (fp32, 1 thread; 3 jobs also at 2 threads): 24 of 129 `nn.Linear` differed at
every batch tried (3, 4, 6, 7, 8, 16, 32 jobs), the 33 1x1 `nn.Conv2d` of 73 from 8 jobs up; no 3x3
convolution, norm or attention up to 32 jobs, and nothing at all in bf16 (3, 8, 16 jobs). So during a
batched run every U-Net `nn.Linear` and 1x1 `nn.Conv2d` runs once per job on exactly the rows its solo
run has (`per_job_gemms`); the rest of the network stays batched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..memory import check_fits
from ..params import GenerationParams
from ..pipeline import Cancelled, GenerationResult, Pipeline, Progress, Skipped, _Batch
from .adapters import needs_solo

_state = threading.local()  # .jobs: the job count of this thread's batched run (unset: not batching)
_install_lock = threading.Lock()


def _per_job(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` on a batch laid out (k, jobs) along dim 0 ([u1..uN, c1..cN] under CFG): a GEMM per job."""
    run = type(layer).forward  # the class's own forward: F.linear / F.conv2d
    jobs = getattr(_state, "jobs", 0)
    if jobs <= 1 or x.shape[0] % jobs:
        return run(layer, x)
    memory_format = torch.channels_last if x.ndim == 4 and _is_channels_last(x) else torch.contiguous_format
    rows = x.unflatten(0, (x.shape[0] // jobs, jobs))  # (k, N, ...)
    outs = [run(layer, rows[:, j].contiguous(memory_format=memory_format)) for j in range(jobs)]  # (k, ...)
    return torch.stack(outs, dim=1).flatten(0, 1).contiguous(memory_format=memory_format)  # (k * N, ...)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _is_gemm(layer: nn.Module) -> bool:
    """A dense layer whose kernel choice depends on the batch: a linear or a 1x1 convolution."""
    if type(layer) is nn.Linear:
        return True
    return type(layer) is nn.Conv2d and layer.kernel_size == (1, 1) and layer.groups == 1


@contextmanager
def per_job_gemms(module: nn.Module, jobs: int) -> Iterator[None]:
    """Within this thread, run `module`'s GEMM layers once per job (see the module docstring).

    The layers get an instance `forward` that is the class's own forward for every other thread (a
    concurrent solo run on the same pipeline is unaffected); it is installed once and left in place.
    """
    with _install_lock:
        if not getattr(module, "_per_job_gemms", False):
            for layer in module.modules():
                if _is_gemm(layer):
                    layer.forward = partial(_per_job, layer)
            module._per_job_gemms = True
    _state.jobs = jobs
    try:
        yield
    finally:
        _state.jobs = 0


def batchable(pipe: Pipeline, params: Sequence[GenerationParams]) -> list[tuple[dict, dict]] | None:
    """Each job's (cond, uncond) when they can share a run (same text length, no LoRA or embedding);
    None otherwise (the jobs then run one at a time)."""
    if not isinstance(pipe, Pipeline):
        return None  # SD3: one job at a time
    res = pipe.cfg.resolution
    ps = [p.validate(res, pipe.defaults) for p in params]
    if any(needs_solo(pipe, p, pipe.embeddings) for p in ps):
        return None
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
    skips: Sequence[threading.Event] = (),
    exact: bool = True,
) -> list[GenerationResult]:
    """One image per job (batch_size 1, fixed seeds), sampled together; stops when every job is cancelled.

    A set event of `skips` ends that job's image at its current x0 estimate (A1111's skip) while the
    others go on. `exact` (default) makes each image bit-identical to its solo run (per-job GEMMs, see
    the module docstring); False batches the GEMMs too, which can move a few pixels by 1/255.
    """
    res = pipe.cfg.resolution
    ps = [p.validate(res, pipe.defaults) for p in params]
    first = ps[0]
    pipe.resolve_sampler(first)
    width, height = first.size(res)
    check_fits(pipe.memory_estimate(first.replace(batch_size=len(ps))), what=f"{width}x{height} x{len(ps)}")
    cond = {k: torch.cat([c[0][k] for c in conds]) for k in conds[0][0]}  # (B, T, D) and (B, adm)
    uncond = {k: torch.cat([c[1][k] for c in conds]) for k in conds[0][1]}
    seeds = [p.seed for p in ps]

    skipped: dict[int, torch.Tensor] = {}  # job index -> its x0 estimate when it was skipped, (1, C, h, w)

    def report(step: int, total: int, pass_index: int = 1, denoised=None) -> None:
        if cancels and all(ev.is_set() for ev in cancels):
            raise Cancelled("generation cancelled")
        if callback is not None:
            callback(Progress(step, total, pass_index, 1, 0, denoised))
        if denoised is not None:
            for i, ev in enumerate(skips):
                if ev.is_set() and i not in skipped:
                    skipped[i] = denoised[i : i + 1].float().clone()
            ended = [i in skipped or (i < len(cancels) and cancels[i].is_set()) for i in range(len(ps))]
            if skipped and all(ended):
                raise Skipped(denoised)

    run = _Batch(first, (cond, uncond), seeds, seeds, width, height, report)
    try:
        with per_job_gemms(pipe.model.unet, len(ps) if exact else 1):
            latents = pipe._txt2img(run)  # (B, C, h, w)
    except Skipped as stop:  # every job was skipped or cancelled
        latents = stop.denoised.float()
    if skipped:
        latents = torch.cat([skipped.get(i, latents[i : i + 1]) for i in range(len(ps))])
    images = pipe.decode(latents)
    return [
        GenerationResult([img], [pipe.info(p, s, s, img2img=False)], [s], latents[i : i + 1].cpu())
        for i, (img, p, s) in enumerate(zip(images, ps, seeds, strict=True))
    ]
