"""Seeded random weights at a sensible scale, for tests, benchmarks and training from scratch."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter from a seeded generator: N(0, 1/fan_in) matrices, small biases, norms near 1.

    Unlike the zero-initialised output layers of LDM, nothing is zero, so random-weight models give
    non-trivial outputs everywhere (what parity tests and benchmarks need).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            values = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        elif name.endswith("bias"):
            values = torch.randn(p.shape, generator=g) * 0.02
        else:  # norm scales and scalar parameters
            values = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        if p.is_meta:
            raise ValueError(f"randomize_ needs materialized parameters; {name} is on the meta device")
        p.copy_(values.to(p.dtype))
    return model
