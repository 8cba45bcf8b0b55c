"""Noise schedules: the model's discrete DDPM table and the sigma schedules samplers walk down.

Stable Diffusion is trained as a discrete DDPM: 1,000 timesteps with "scaled linear" betas
(sqrt-spaced from 0.00085 to 0.012). Following Karras et al. (2022) we view it as a variance
exploding model with noise levels ``sigma_t = sqrt((1 - abar_t) / abar_t)``; a latent at level
sigma is ``x0 + sigma * eps`` (the VP latent times ``sqrt(1 + sigma^2)``).

A *sigma schedule* is a plain float32 tensor of shape (steps + 1,), strictly decreasing, whose
last entry is 0. Every schedule function has the signature ``fn(steps, schedule, **options)``
and is listed in ``SCHEDULES``; ``get_sigmas(name, steps, schedule)`` looks one up.

How the ids line up with diffusers' ``timestep_spacing`` (SD config, 1,000 train steps):

==============  ============================================================================
``normal``      Euler/Heun/LMS/KDPM2/DPMSolverSDE ``"linspace"`` (t = linspace(999, 0, n)).
                Exact when 999/(n-1) is an integer; otherwise diffusers interpolates sigma
                linearly in t where we (like k-diffusion/A1111) interpolate log-sigma.
                This is A1111's "Uniform" (and its "Automatic" for Euler, Euler a, LMS, Heun).
``sgm_uniform`` DPMSolverMultistep/UniPC ``"linspace"`` (t = linspace(999, 0, n + 1)[:-1]),
                which diffusers rounds to integers: exact when 999/n is an integer.
``ddim_uniform`` ``"leading"`` with ``steps_offset=1`` (t = 1, 1 + 1000//n, ...): DDIM/PNDM
                as configured for SD, and LDM's DDIM sampler.
``simple``      ``"trailing"`` (t = 999, 999 - 1000/n, ...); exact when n divides 1000.
``karras``      ``use_karras_sigmas=True`` (rho = 7 between the model's sigma_min/max).
``exponential`` ``use_exponential_sigmas=True``; ``beta`` is ``use_beta_sigmas=True``.
``lcm``         LCMScheduler (every 20th timestep of its 50-step distillation grid).
==============  ============================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "DiscreteSchedule",
    "SCHEDULES",
    "a1111_img2img_steps",
    "beta_sigmas",
    "ddim_uniform_sigmas",
    "diffusers_img2img_start",
    "exponential_sigmas",
    "get_sigmas",
    "img2img_sigmas",
    "karras_sigmas",
    "lcm_sigmas",
    "normal_sigmas",
    "polyexponential_sigmas",
    "rescale_zero_terminal_snr",
    "scaled_linear_betas",
    "sd_alphas_cumprod",
    "sd_schedule",
    "sgm_uniform_sigmas",
    "simple_sigmas",
]

# diffusers pins the last alphas_cumprod of a zero-terminal-SNR schedule here so sigma_max stays finite.
ZERO_SNR_LAST_ALPHA_CUMPROD = 2.0**-24


def scaled_linear_betas(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000
) -> Tensor:
    """LDM's "scaled linear" betas: (linspace(sqrt(start), sqrt(end), T))^2, float64 (T,)."""
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(
            f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()  # (T,)
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """A discrete DDPM schedule seen as noise levels sigma_t (k-diffusion's DiscreteSchedule).

    ``alphas_cumprod`` is the (T,) table indexed by timestep t = 0..T-1 (decreasing in t).
    ``sigmas``/``log_sigmas`` are derived (increasing in t), in float32 as LDM stores them.
    """

    alphas_cumprod: Tensor  # (T,) float32
    sigmas: Tensor = field(init=False, repr=False)  # (T,) float32, sigmas[t]
    log_sigmas: Tensor = field(init=False, repr=False)  # (T,) float64, for interpolation

    def __post_init__(self) -> None:
        ac = torch.as_tensor(self.alphas_cumprod).detach().to("cpu", torch.float32)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(
                f"alphas_cumprod must be a 1-D table of at least 2 entries, got shape {tuple(ac.shape)}"
            )
        if not bool(((ac > 0) & (ac <= 1)).all()):
            raise ValueError(
                "alphas_cumprod must lie in (0, 1]; a zero-terminal-SNR table must pin its last entry "
                f"to a small positive value (e.g. {ZERO_SNR_LAST_ALPHA_CUMPROD})"
            )
        sigmas = ((1 - ac) / ac).sqrt()  # sqrt is correctly rounded on every CPU; a vectorised pow is not
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing in t (sigmas strictly increasing)")
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "log_sigmas", sigmas.to(torch.float64).log())

    @classmethod
    def from_betas(cls, betas: Tensor, *, zero_terminal_snr: bool = False) -> DiscreteSchedule:
        """Schedule from a (T,) beta table; cumprod in float64, stored in float32 (as LDM does)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            alphas_cumprod[-1] = ZERO_SNR_LAST_ALPHA_CUMPROD
        return cls(alphas_cumprod.to(torch.float32))

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Continuous timestep of each sigma by linear interpolation in log-sigma (clamped to [0, T-1]).

        With ``quantize`` the nearest integer timestep in log-sigma distance (equal to rounding the
        interpolated t, which is what diffusers does for its Karras timesteps).
        """
        sigma = torch.as_tensor(sigma)
        # on the CPU in float64 (not every accelerator has float64); (N,) against the (T,) table
        log_sigma = sigma.detach().to("cpu", torch.float64).clamp_min(1e-30).log().reshape(-1)
        log_sigmas = self.log_sigmas
        if quantize:
            t = (log_sigma[:, None] - log_sigmas[None, :]).abs().argmin(dim=1).to(torch.float64)
        else:
            low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, log_sigmas.numel() - 2)
            lo, hi = log_sigmas[low], log_sigmas[low + 1]
            w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0)
            t = low.to(torch.float64) + w
        return t.to(torch.float32).reshape(sigma.shape).to(sigma.device)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at continuous timesteps t in [0, T-1] by log-linear interpolation of the table."""
        device = torch.as_tensor(t).device
        t = torch.as_tensor(t).detach().to("cpu", torch.float64)
        if bool(((t < 0) | (t > self.num_timesteps - 1)).any()):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}], got {t.min():.4g}..{t.max():.4g}"
            )
        log_sigmas = self.log_sigmas
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().to(device, torch.float32)


def sd_schedule(*, zero_terminal_snr: bool = False) -> DiscreteSchedule:
    """Stable Diffusion's training schedule: scaled-linear betas 0.00085..0.012 over 1,000 steps."""
    return DiscreteSchedule.from_betas(
        scaled_linear_betas(0.00085, 0.012, 1000), zero_terminal_snr=zero_terminal_snr
    )


def sd_alphas_cumprod(*, zero_terminal_snr: bool = False) -> Tensor:
    """SD's (1000,) float32 alphas_cumprod table (DDPM training noise levels), as LDM stores it."""
    return sd_schedule(zero_terminal_snr=zero_terminal_snr).alphas_cumprod.clone()


# ---------------------------------------------------------------------------------------------
# sigma schedules: fn(steps, schedule, **options) -> (steps + 1,) float32, last entry 0


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _append_zero(sigmas: Tensor) -> Tensor:
    sigmas = sigmas.to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _range(
    schedule: DiscreteSchedule, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    lo = schedule.sigma_min if sigma_min is None else float(sigma_min)
    hi = schedule.sigma_max if sigma_max is None else float(sigma_max)
    if not 0.0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}")
    return lo, hi


def normal_sigmas(steps: int, schedule: DiscreteSchedule) -> Tensor:
    """Timesteps evenly spaced from T-1 down to 0 (k-diffusion get_sigmas; A1111 "Uniform"/"Normal")."""
    _check_steps(steps)
    t = torch.linspace(schedule.num_timesteps - 1, 0, steps, dtype=torch.float64)  # (steps,)
    return _append_zero(schedule.t_to_sigma(t))


def sgm_uniform_sigmas(steps: int, schedule: DiscreteSchedule) -> Tensor:
    """steps + 1 evenly spaced timesteps from T-1 to 0, dropping the last (SGM's discretization)."""
    _check_steps(steps)
    t = torch.linspace(schedule.num_timesteps - 1, 0, steps + 1, dtype=torch.float64)[:-1]  # (steps,)
    return _append_zero(schedule.t_to_sigma(t))


def simple_sigmas(steps: int, schedule: DiscreteSchedule) -> Tensor:
    """Every (T/steps)-th model sigma counting down from the top (ComfyUI/A1111 "Simple")."""
    _check_steps(steps)
    total = schedule.num_timesteps
    if steps > total:
        raise ValueError(f"simple schedule supports at most {total} steps, got {steps}")
    stride = total / steps
    idx = torch.tensor([total - 1 - int(i * stride) for i in range(steps)])
    return _append_zero(schedule.sigmas[idx])


def ddim_uniform_sigmas(steps: int, schedule: DiscreteSchedule) -> Tensor:
    """DDIM's uniform timesteps t_i = 1 + i * (T // steps), high to low (diffusers "leading", offset 1).

    A1111's and LDM's loops yield ceil((T - 1) / (T // steps)) timesteps, one more than asked when
    T % steps is large (e.g. 8 for 7 steps); we always return exactly ``steps``, like diffusers.
    """
    _check_steps(steps)
    total = schedule.num_timesteps
    if steps > total:
        raise ValueError(f"ddim_uniform schedule supports at most {total} steps, got {steps}")
    stride = total // steps
    idx = (torch.arange(steps - 1, -1, -1) * stride + 1).clamp(max=total - 1)
    return _append_zero(schedule.sigmas[idx])


def karras_sigmas(
    steps: int,
    schedule: DiscreteSchedule,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """Karras et al. (2022) eq. 5: sigmas evenly spaced in sigma^(1/rho) between the model's extremes."""
    _check_steps(steps)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return _append_zero(sigmas)


def exponential_sigmas(
    steps: int, schedule: DiscreteSchedule, *, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """Sigmas evenly spaced in log-sigma between the model's extremes (k-diffusion)."""
    _check_steps(steps)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(hi), math.log(lo), steps, dtype=torch.float64).exp())


def polyexponential_sigmas(
    steps: int,
    schedule: DiscreteSchedule,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 1.0,
) -> Tensor:
    """log-sigma following a polynomial ramp of degree rho (k-diffusion; rho=1 is exponential)."""
    _check_steps(steps)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    return _append_zero((ramp * (math.log(hi) - math.log(lo)) + math.log(lo)).exp())


def _betainc(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean
        return 1.0 - _betainc(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * frac / a


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of the Beta(a, b) distribution by bisection on I_x(a, b) (to float64 precision)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _betainc(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-16:
            break
    return 0.5 * (lo + hi)


def beta_sigmas(
    steps: int,
    schedule: DiscreteSchedule,
    *,
    alpha: float = 0.6,
    beta: float = 0.6,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """Beta-distribution quantiles mapped linearly onto [sigma_min, sigma_max] (Lee et al. 2024).

    This is A1111's and diffusers' variant; ComfyUI's "beta" maps the quantiles onto timesteps instead.
    """
    _check_steps(steps)
    lo, hi = _range(schedule, sigma_min, sigma_max)
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"alpha and beta must be positive, got alpha={alpha}, beta={beta}")
    qs = [1.0 - i / (steps - 1) for i in range(steps)] if steps > 1 else [1.0]
    sigmas = torch.tensor([lo + _beta_ppf(q, alpha, beta) * (hi - lo) for q in qs], dtype=torch.float64)
    return _append_zero(sigmas)


def lcm_sigmas(steps: int, schedule: DiscreteSchedule, *, original_steps: int = 50) -> Tensor:
    """LCM's timesteps (Luo et al. 2023): evenly picked from the distillation grid t = k*(T/50) - 1."""
    _check_steps(steps)
    total = schedule.num_timesteps
    if not 1 <= original_steps <= total:
        raise ValueError(f"original_steps must be within 1..{total}, got {original_steps}")
    if steps > original_steps:
        raise ValueError(f"lcm schedule supports at most original_steps={original_steps} steps, got {steps}")
    stride = total // original_steps
    grid = [(k + 1) * stride - 1 for k in range(original_steps)][::-1]  # high to low
    picks = [grid[math.floor(i * original_steps / steps)] for i in range(steps)]
    return _append_zero(schedule.sigmas[torch.tensor(picks)])


SigmaScheduleFn = Callable[..., Tensor]

SCHEDULES: dict[str, SigmaScheduleFn] = {
    "normal": normal_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "polyexponential": polyexponential_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "simple": simple_sigmas,
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "lcm": lcm_sigmas,
}


def get_sigmas(name: str, steps: int, schedule: DiscreteSchedule, **options: float) -> Tensor:
    """The (steps + 1,) sigma schedule ``name`` (an id of ``SCHEDULES``) for ``schedule``."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in SCHEDULES:
        raise ValueError(f"unknown sigma schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[key](steps, schedule, **options)


# ---------------------------------------------------------------------------------------------
# img2img: start part-way down a schedule


def a1111_img2img_steps(steps: int, strength: float, *, fix_steps: bool = False) -> tuple[int, int]:
    """A1111's ``setup_img2img_steps``: (length of the full schedule, t_enc).

    The sampler then runs ``t_enc + 1`` steps over ``sigmas[total - t_enc - 1:]``. By default the
    schedule has ``steps`` steps and t_enc = int(min(strength, 0.999) * steps); with A1111's
    "do exactly the amount of steps the slider specifies" option (``fix_steps``) the schedule is
    stretched to int(steps / min(strength, 0.999)) steps and t_enc = steps - 1.
    """
    _check_steps(steps)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"denoising strength must be in (0, 1], got {strength}")
    capped = min(strength, 0.999)
    if fix_steps:
        return int(steps / capped), steps - 1
    return steps, int(capped * steps)


def diffusers_img2img_start(steps: int, strength: float) -> int:
    """diffusers img2img ``get_timesteps``: index of the first sigma; int(steps * strength) steps remain."""
    _check_steps(steps)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"denoising strength must be in (0, 1], got {strength}")
    run = min(int(steps * strength), steps)
    if run == 0:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; raise either")
    return steps - run


def img2img_sigmas(
    sigmas_for: Callable[[int], Tensor],
    steps: int,
    strength: float,
    *,
    semantics: str = "a1111",
    fix_steps: bool = False,
) -> Tensor:
    """The tail of a schedule an img2img run walks; the init latent is noised to its first sigma.

    ``sigmas_for(n)`` builds the full n-step schedule (e.g. ``lambda n: get_sigmas("karras", n, s)``).
    ``semantics="a1111"`` follows A1111 (runs int(min(strength, .999) * steps) + 1 steps);
    ``"diffusers"`` follows StableDiffusionImg2ImgPipeline (runs int(steps * strength) steps), e.g.
    steps=20, strength=0.75: A1111 starts at sigma index 4 (16 steps), diffusers at 5 (15 steps).
    """
    if semantics == "a1111":
        total, t_enc = a1111_img2img_steps(steps, strength, fix_steps=fix_steps)
        sigmas = sigmas_for(total)
        return sigmas[total - t_enc - 1 :]
    if semantics == "diffusers":
        if fix_steps:
            raise ValueError("fix_steps is an A1111 option; diffusers semantics have no equivalent")
        return sigmas_for(steps)[diffusers_img2img_start(steps, strength) :]
    raise ValueError(f"unknown img2img semantics {semantics!r}; valid: 'a1111', 'diffusers'")
