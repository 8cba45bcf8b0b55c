"""Multistep samplers: reuse earlier model outputs instead of extra evaluations per step.

Same contract as ``samplers``: ``sample_x(denoiser, x, sigmas, *, extra_args, callback, noise, ...)``
walks the VE latent ``x`` (B, C, H, W) down the schedule ``sigmas`` (steps + 1,) and returns it.
Step math runs in float32 tensors with float64 scalar coefficients. Written in log-SNR time
lambda = -log(sigma), where the data-prediction solvers are exact for a constant x0 estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .sampler_base import Callback, NoiseSource, denoise, prepare, report, resolve_noise

__all__ = [
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_lms",
    "sample_plms",
    "sample_unipc",
]

DenoiserFn = Callable[..., Tensor]


def _lms_coefficient(order: int, sig: list[float], i: int, j: int) -> float:
    """Integral over [sig[i], sig[i+1]] of the Lagrange basis polynomial of node sig[i-j]."""
    nodes = [sig[i - k] - sig[i] for k in range(order)]  # shifted so the interval starts at 0
    poly = [1.0]  # coefficients in u = tau - sig[i], lowest degree first
    for k in range(order):
        if k == j:
            continue
        denom = nodes[j] - nodes[k]
        shifted = [0.0] + poly  # u * poly
        poly = [
            (shifted[p] - nodes[k] * (poly[p] if p < len(poly) else 0.0)) / denom for p in range(len(shifted))
        ]
    h = sig[i + 1] - sig[i]
    return sum(c * h ** (p + 1) / (p + 1) for p, c in enumerate(poly))


@torch.no_grad()
def sample_lms(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep in sigma with exact Lagrange-polynomial coefficients (k-diffusion's LMS)."""
    if order < 1:
        raise ValueError(f"LMS order must be at least 1, got {order}")
    x, sig = prepare(x, sigmas)
    n = len(sig) - 1
    ds: list[Tensor] = []  # most recent derivative last
    for i in range(n):
        denoised = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, n, x, sig, denoised)
        ds = [*ds, (x - denoised) / sig[i]][-order:]
        cur = min(i + 1, order)
        coeffs = [_lms_coefficient(cur, sig, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022: second-order multistep, data prediction; first order at the ends."""
    x, sig = prepare(x, sigmas)
    n = len(sig) - 1
    old_denoised: Tensor | None = None
    for i in range(n):
        denoised = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, n, x, sig, denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])  # lambda_next - lambda
            d = denoised
            if old_denoised is not None:
                r = math.log(sig[i - 1] / sig[i]) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE, Lu et al. 2022 (k-diffusion); eta=0 gives DPM++ 2M, solver "midpoint"|"heun"."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"unknown solver_type {solver_type!r}; valid: 'midpoint', 'heun'")
    x, sig = prepare(x, sigmas)
    noise_fn = resolve_noise(noise, x)
    n = len(sig) - 1
    old_denoised: Tensor | None = None
    h_last = 0.0
    for i in range(n):
        denoised = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, n, x, sig, denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = (sig[i + 1] / sig[i]) * math.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (1 - phi / (h + eta_h)) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                std = sig[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                x = x + noise_fn(sig[i], sig[i + 1]) * std
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion); eta=0 is the third-order multistep ODE solver of Lu et al. 2022."""
    x, sig = prepare(x, sigmas)
    noise_fn = resolve_noise(noise, x)
    n = len(sig) - 1
    denoised_1: Tensor | None = None
    denoised_2: Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(n):
        denoised = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, n, x, sig, denoised)
        if sig[i + 1] == 0:
            x = denoised
            h = None
        else:
            h = math.log(sig[i] / sig[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and denoised_2 is not None and denoised_1 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and denoised_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                std = sig[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
                x = x + noise_fn(sig[i], sig[i + 1]) * std
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_plms(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
) -> Tensor:
    """PLMS, Liu et al. 2022 (PNDM): Adams-Bashforth on eps over DDIM steps, pseudo improved Euler start.

    The first step costs two model calls (as in LDM and diffusers' PNDM with skip_prk_steps).
    """
    x, sig = prepare(x, sigmas)
    n = len(sig) - 1
    eps_hist: list[Tensor] = []  # most recent last, at most 3 kept
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised = denoise(denoiser, x, s, extra_args)
        report(callback, i, n, x, sig, denoised)
        eps = (x - denoised) / s
        if not eps_hist:
            eps_prime = eps
            if s_next > 0:
                x_pred = x + (s_next - s) * eps
                eps_next = (x_pred - denoise(denoiser, x_pred, s_next, extra_args)) / s_next
                eps_prime = (eps + eps_next) / 2
        elif len(eps_hist) == 1:
            eps_prime = (3 * eps - eps_hist[-1]) / 2
        elif len(eps_hist) == 2:
            eps_prime = (23 * eps - 16 * eps_hist[-1] + 5 * eps_hist[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * eps_hist[-1] + 37 * eps_hist[-2] - 9 * eps_hist[-3]) / 24
        eps_hist = [*eps_hist, eps][-3:]
        x = x + (s_next - s) * eps_prime  # the DDIM update in VE form
    return x


def _unipc_coefficients(
    rks: list[float], hh: float, variant: str
) -> tuple[list[list[float]], list[float], float]:
    """UniPC's Vandermonde system R, right side b and B(h) for ratios rks (last is 1)."""
    h_phi_k = math.expm1(hh) / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, b, factorial = [], [], 1
    for k in range(1, len(rks) + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return rows, b, b_h


def _solve(rows: list[list[float]], b: list[float]) -> list[float]:
    return torch.linalg.solve(
        torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ).tolist()


def _unipc_update(
    x: Tensor,
    s0: float,
    s_t: float,
    hist: list[tuple[float, Tensor]],
    variant: str,
    order: int,
    model_t: Tensor | None,
) -> Tensor:
    """UniP (model_t None) or UniC step from sigma s0 to s_t; hist: (sigma, x0) pairs, newest (s0) last."""
    m0 = hist[-1][1]
    if s_t == 0:
        return m0
    h = math.log(s0 / s_t)
    rks, d1s = [], []
    for k in range(1, order):
        s_k, m_k = hist[-(k + 1)]
        rk = math.log(s0 / s_k) / h  # (lambda_k - lambda_0) / h, negative
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    hh = -h
    rows, b, b_h = _unipc_coefficients(rks, hh, variant)
    x_t = (s_t / s0) * x - math.expm1(hh) * m0
    if model_t is None:  # predictor
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])
        return x_t - b_h * sum(r * d for r, d in zip(rhos, d1s, strict=True))
    rhos = [0.5] if order == 1 else _solve(rows, b)  # corrector
    res = sum((r * d for r, d in zip(rhos[:-1], d1s, strict=True)), torch.zeros_like(x))
    return x_t - b_h * (res + rhos[-1] * (model_t - m0))


@torch.no_grad()
def sample_unipc(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    noise: NoiseSource | torch.Generator | None = None,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
) -> Tensor:
    """UniPC, Zhao et al. 2023: multistep UniP predictor + UniC corrector in data prediction.

    Defaults are diffusers' UniPCMultistepScheduler (order 2, B(h) variant "bh2"); A1111 defaults
    to order 3 with "bh1". The corrector reuses each new model output, so one call per step.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; valid: 'bh1', 'bh2'")
    if not 1 <= order <= 3:
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    x, sig = prepare(x, sigmas)
    n = len(sig) - 1
    hist: list[tuple[float, Tensor]] = []  # (sigma, x0), newest last
    x_last: Tensor | None = None
    last_order = 1
    for i in range(n):
        denoised = denoise(denoiser, x, sig[i], extra_args)
        report(callback, i, n, x, sig, denoised)
        if x_last is not None:
            x = _unipc_update(x_last, sig[i - 1], sig[i], hist, variant, last_order, model_t=denoised)
        hist = [*hist, (sig[i], denoised)][-order:]
        this_order = min(order, n - i) if lower_order_final else order
        last_order = min(this_order, len(hist))
        x_last = x
        x = _unipc_update(x, sig[i], sig[i + 1], hist, variant, last_order, model_t=None)
    return x
