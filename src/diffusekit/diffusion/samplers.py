"""Samplers as pure functions (k-diffusion style), their registry, and A1111's names for them.

A sampler is ``sample_x(denoiser, x, sigmas, *, extra_args=None, callback=None, noise=None, ...)``:

* ``denoiser(x, sigma, **extra_args) -> x0`` (see ``denoiser.py``), called with sigma (B,);
* ``x`` (B, C, H, W) is the VE latent at ``sigmas[0]``: for txt2img ``noise * sigmas[0]``
  (k-diffusion/A1111; the exactly equivalent VP start is ``noise * sqrt(1 + sigmas[0]^2)``),
  for img2img ``init_latent + noise * sigmas[0]`` with a cut schedule (``schedules.img2img_sigmas``);
* ``sigmas`` (steps + 1,) strictly decreasing, normally ending in 0 (``schedules.get_sigmas``);
* ``noise``: a noise source ``noise(sigma, sigma_next) -> Tensor``, a ``torch.Generator``, or
  None for torch's global RNG (see ``sampler_base``); deterministic samplers ignore it;
* ``callback(StepInfo)`` after every model evaluation of a step.

The latent is returned in float32 whatever the model's dtype. No sampler keeps state between
calls. ``SAMPLERS`` maps our ids to a ``SamplerSpec``; ``resolve_sampler`` also accepts A1111's
display names ("DPM++ 2M", "Euler a", ...), its aliases ("k_euler_a") and the legacy combined
names ("DPM++ 2M Karras"); ``a1111_names`` goes back for infotext.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .sampler_base import Callback, NoiseSource, StepInfo, brownian_tree_noise, gaussian_noise
from .samplers_multistep import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_lms,
    sample_plms,
    sample_unipc,
)
from .samplers_singlestep import (
    sample_ddim,
    sample_dpm2,
    sample_dpm2_ancestral,
    sample_dpmpp_2m_sde_heun,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
)
from .schedules import SCHEDULES, DiscreteSchedule, get_sigmas

__all__ = [
    "SAMPLERS",
    "SCHEDULE_A1111_LABELS",
    "SCHEDULE_A1111_NAMES",
    "Callback",
    "NoiseSource",
    "SamplerSpec",
    "StepInfo",
    "a1111_names",
    "automatic_schedule",
    "brownian_tree_noise",
    "gaussian_noise",
    "resolve_sampler",
    "resolve_schedule",
    "sample_ddim",
    "sample_dpm2",
    "sample_dpm2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_heun",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_lms",
    "sample_plms",
    "sample_unipc",
    "sampler_sigmas",
]

SamplerFn = Callable[..., Tensor]


# ---------------------------------------------------------------------------------------------
# registry and A1111 names


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, default schedule, A1111 name and behaviour flags."""

    id: str
    fn: SamplerFn
    label: str  # A1111 display name
    default_schedule: str  # what A1111's "Automatic" schedule type means for this sampler
    a1111_names_schedule: bool = False  # A1111 writes the default schedule's label, not "Automatic"
    stochastic: bool = False  # draws from `noise` with its default settings
    ancestral: bool = False  # adds fresh noise each step (A1111's "uses ENSD")
    sde: bool = False  # SDE solver; A1111 feeds it Brownian-tree noise
    second_order: bool = False  # two model calls per step
    discard_penultimate: bool = False  # A1111 builds steps + 1 sigmas and drops the next-to-last
    aliases: tuple[str, ...] = ()

    def accepts(self, option: str) -> bool:
        """Whether the sampler function takes keyword ``option`` (e.g. "eta", "s_churn", "order")."""
        return option in inspect.signature(self.fn).parameters


def _spec(id: str, fn: SamplerFn, label: str, schedule: str, *aliases: str, **flags: bool) -> SamplerSpec:
    return SamplerSpec(id=id, fn=fn, label=label, default_schedule=schedule, aliases=aliases, **flags)


SAMPLERS: dict[str, SamplerSpec] = {
    s.id: s
    for s in (
        _spec("euler", sample_euler, "Euler", "normal", "k_euler"),
        _spec(
            "euler_a",
            sample_euler_ancestral,
            "Euler a",
            "normal",
            "k_euler_a",
            "k_euler_ancestral",
            stochastic=True,
            ancestral=True,
        ),
        _spec("heun", sample_heun, "Heun", "normal", "k_heun", second_order=True),
        _spec(
            "dpm2",
            sample_dpm2,
            "DPM2",
            "karras",
            "k_dpm_2",
            a1111_names_schedule=True,
            second_order=True,
            discard_penultimate=True,
        ),
        _spec(
            "dpm2_a",
            sample_dpm2_ancestral,
            "DPM2 a",
            "karras",
            "k_dpm_2_a",
            a1111_names_schedule=True,
            stochastic=True,
            ancestral=True,
            second_order=True,
            discard_penultimate=True,
        ),
        _spec("lms", sample_lms, "LMS", "normal", "k_lms"),
        _spec(
            "dpmpp_2s_a",
            sample_dpmpp_2s_ancestral,
            "DPM++ 2S a",
            "karras",
            "k_dpmpp_2s_a",
            a1111_names_schedule=True,
            stochastic=True,
            ancestral=True,
            second_order=True,
        ),
        _spec("dpmpp_2m", sample_dpmpp_2m, "DPM++ 2M", "karras", "k_dpmpp_2m", a1111_names_schedule=True),
        _spec(
            "dpmpp_sde",
            sample_dpmpp_sde,
            "DPM++ SDE",
            "karras",
            "k_dpmpp_sde",
            a1111_names_schedule=True,
            stochastic=True,
            sde=True,
            second_order=True,
        ),
        _spec(
            "dpmpp_2m_sde",
            sample_dpmpp_2m_sde,
            "DPM++ 2M SDE",
            "exponential",
            "k_dpmpp_2m_sde",
            a1111_names_schedule=True,
            stochastic=True,
            sde=True,
        ),
        _spec(
            "dpmpp_2m_sde_heun",
            sample_dpmpp_2m_sde_heun,
            "DPM++ 2M SDE Heun",
            "exponential",
            "k_dpmpp_2m_sde_heun",
            a1111_names_schedule=True,
            stochastic=True,
            sde=True,
        ),
        _spec(
            "dpmpp_3m_sde",
            sample_dpmpp_3m_sde,
            "DPM++ 3M SDE",
            "exponential",
            "k_dpmpp_3m_sde",
            a1111_names_schedule=True,
            stochastic=True,
            sde=True,
            discard_penultimate=True,
        ),
        _spec("ddim", sample_ddim, "DDIM", "ddim_uniform"),
        _spec("plms", sample_plms, "PLMS", "ddim_uniform"),
        _spec("unipc", sample_unipc, "UniPC", "sgm_uniform"),
        _spec("lcm", sample_lcm, "LCM", "normal", "k_lcm", stochastic=True),
    )
}

# A1111 schedule types: display label -> our schedule id (None: the sampler's default).
SCHEDULE_A1111_NAMES: dict[str, str | None] = {
    "Automatic": None,
    "Uniform": "normal",
    "Karras": "karras",
    "Exponential": "exponential",
    "Polyexponential": "polyexponential",
    "SGM Uniform": "sgm_uniform",
    "Simple": "simple",
    "Normal": "normal",
    "DDIM": "ddim_uniform",
    "Beta": "beta",
}
# our schedule id -> A1111 display label (A1111's "Uniform" is exactly k-diffusion's get_sigmas).
SCHEDULE_A1111_LABELS: dict[str, str] = {
    "normal": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
}
# A1111's internal scheduler names and aliases, also accepted (and as suffixes of combined names).
_SCHEDULE_EXTRA_NAMES: dict[str, str | None] = {
    "uniform": "normal",
    "ddim": "ddim_uniform",
    "sgmuniform": "sgm_uniform",
}
_LEGACY_SUFFIXES = {"_ka": "karras", "_exp": "exponential"}  # k_dpmpp_2m_ka, k_dpmpp_3m_sde_exp, ...


def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


_SAMPLER_LOOKUP: dict[str, str] = {
    _norm(key): spec.id for spec in SAMPLERS.values() for key in (spec.id, spec.label, *spec.aliases)
}
_SCHEDULE_LOOKUP: dict[str, str | None] = {
    **{_norm(k): v for k, v in SCHEDULE_A1111_NAMES.items()},
    **_SCHEDULE_EXTRA_NAMES,
    **{k: k for k in SCHEDULES},
}
_SUFFIXES = sorted(_SCHEDULE_LOOKUP, key=len, reverse=True)  # "sgm uniform" before "uniform"


def _valid_samplers() -> str:
    return ", ".join(f"{s.id} ({s.label!r})" for s in SAMPLERS.values())


def automatic_schedule(sampler_id: str, zero_terminal_snr: bool = False) -> str:
    """The schedule "Automatic" means: the sampler's default, or "simple" (trailing timesteps, which
    start at the zero-SNR step) for a zero-terminal-SNR model, as Lin et al. (2023) prescribe. Karras-like
    schedules would spend most steps between that model's sigma_max (4096) and SD's usual 14.6."""
    return "simple" if zero_terminal_snr else SAMPLERS[sampler_id].default_schedule


def resolve_schedule(name: str | None, sampler_id: str, *, zero_terminal_snr: bool = False) -> str:
    """Our schedule id for ``name`` (our id, A1111 label or name; None/"Automatic": automatic_schedule)."""
    if sampler_id not in SAMPLERS:
        raise ValueError(f"unknown sampler id {sampler_id!r}; valid: {', '.join(SAMPLERS)}")
    if name is None:
        return automatic_schedule(sampler_id, zero_terminal_snr)
    key = _norm(name)
    if key not in _SCHEDULE_LOOKUP:
        valid = ", ".join([*SCHEDULES, *SCHEDULE_A1111_NAMES])
        raise ValueError(f"unknown schedule type {name!r}; valid: {valid}")
    schedule_id = _SCHEDULE_LOOKUP[key]
    return automatic_schedule(sampler_id, zero_terminal_snr) if schedule_id is None else schedule_id


def resolve_sampler(
    name: str, schedule: str | None = None, *, zero_terminal_snr: bool = False
) -> tuple[str, str]:
    """(sampler_id, schedule_id) from our id, an A1111 name/alias or a combined name like "DPM++ 2M Karras".

    A schedule in the name wins over ``schedule`` unless they disagree, which raises. An automatic
    schedule depends on the model (`zero_terminal_snr`, see automatic_schedule).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"sampler name must be a non-empty string, got {name!r}; valid: {_valid_samplers()}")
    key = _norm(name)
    sampler_id, from_name = _SAMPLER_LOOKUP.get(key), None
    if sampler_id is None:
        for suffix, schedule_id in _LEGACY_SUFFIXES.items():
            if key.endswith(suffix) and key[: -len(suffix)] in _SAMPLER_LOOKUP:
                sampler_id, from_name = _SAMPLER_LOOKUP[key[: -len(suffix)]], schedule_id
                break
    if sampler_id is None:
        for suffix in _SUFFIXES:
            base = key[: -len(suffix) - 1]
            if key.endswith(" " + suffix) and base in _SAMPLER_LOOKUP:
                sampler_id = _SAMPLER_LOOKUP[base]
                from_name = resolve_schedule(suffix, sampler_id, zero_terminal_snr=zero_terminal_snr)
                break
    if sampler_id is None:
        raise ValueError(
            f"unknown sampler {name!r}; valid: {_valid_samplers()} "
            "(A1111 names may end with a schedule type, e.g. 'DPM++ 2M Karras')"
        )
    explicit = resolve_schedule(schedule, sampler_id, zero_terminal_snr=zero_terminal_snr)
    if from_name is None:
        return sampler_id, explicit
    if schedule is not None and _SCHEDULE_LOOKUP.get(_norm(schedule)) is not None and explicit != from_name:
        raise ValueError(
            f"sampler name {name!r} implies schedule {from_name!r} but schedule={schedule!r} "
            f"was also given ({explicit!r}); drop one of them"
        )
    return sampler_id, from_name


def a1111_names(sampler_id: str, schedule_id: str, *, zero_terminal_snr: bool = False) -> tuple[str, str]:
    """A1111's (Sampler, Schedule type) infotext values for our ids.

    "Automatic" when A1111 itself would write it (the sampler's default schedule where A1111 derives
    it from the model); schedules A1111 lacks (e.g. "lcm") are written as our id. For a
    zero-terminal-SNR model the schedule is always named, since A1111's "Automatic" is not ours there.
    """
    if sampler_id not in SAMPLERS:
        raise ValueError(f"unknown sampler id {sampler_id!r}; valid: {', '.join(SAMPLERS)}")
    if schedule_id not in SCHEDULES:
        raise ValueError(f"unknown schedule id {schedule_id!r}; valid: {', '.join(SCHEDULES)}")
    spec = SAMPLERS[sampler_id]
    if schedule_id == spec.default_schedule and not spec.a1111_names_schedule and not zero_terminal_snr:
        return spec.label, "Automatic"
    return spec.label, SCHEDULE_A1111_LABELS.get(schedule_id, schedule_id)


def sampler_sigmas(
    sampler_id: str, schedule_id: str, steps: int, schedule: DiscreteSchedule, **options: float
) -> Tensor:
    """The (steps + 1,) schedule A1111 gives ``sampler_id``: for DPM2, DPM2 a and DPM++ 3M SDE it builds
    steps + 1 sigmas and drops the next-to-last (A1111's ``discard_next_to_last_sigma``)."""
    if sampler_id not in SAMPLERS:
        raise ValueError(f"unknown sampler id {sampler_id!r}; valid: {', '.join(SAMPLERS)}")
    if not SAMPLERS[sampler_id].discard_penultimate:
        return get_sigmas(schedule_id, steps, schedule, **options)
    sigmas = get_sigmas(schedule_id, steps + 1, schedule, **options)
    return torch.cat([sigmas[:-2], sigmas[-1:]])
