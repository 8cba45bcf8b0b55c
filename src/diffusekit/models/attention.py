"""Attention kernels for the U-Net's (cross-)attention, chosen per module by `runtime.prepare`.

"sdpa" is PyTorch's `scaled_dot_product_attention` in the tensors' own dtype: the parity path, and the
right choice on CUDA. "sliced" is for bf16 on CPU: the fused CPU SDPA kernel is bound by its own softmax
loop there (0.33 s for SD1.5's 64x64 self-attention at batch 2, 8 heads, d=40, in bf16 or fp32 alike),
while a bf16 matmul per head and per cache-sized slice of queries, with the softmax in between, runs the
same math in 0.19-0.22 s. The cost is one more rounding: the scores leave the matmul as bf16 (the fused
kernel keeps them in fp32) before an fp32-internal softmax. On SD1.5 at 512 the whole bf16 U-Net step
is 1.66% (relative L2) from fp32 with either kernel: the weights' and activations' bf16 rounding
dominates (`bench/perf.py` reports it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_KERNELS = ("sdpa", "sliced")

# Query rows per slice are chosen so one slice of scores holds about this many elements (2 MiB in bf16,
# which stays in a core's L2 through the softmax and the value product).
SLICE_SCORES = 1 << 20


def attention(q: Tensor, k: Tensor, v: Tensor, kernel: str = "sdpa") -> Tensor:
    """Softmax(q k^T / sqrt(d)) v for (B, h, N, d) queries and (B, h, T, d) keys/values -> (B, h, N, d)."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if kernel == "sliced":
        return sliced_attention(q, k, v)
    raise ValueError(f"unknown attention kernel {kernel!r}; valid: {', '.join(ATTENTION_KERNELS)}")


def sliced_attention(q: Tensor, k: Tensor, v: Tensor, slice_scores: int = SLICE_SCORES) -> Tensor:
    """Exact attention computed one head and one slice of queries at a time (no mask, no dropout)."""
    b, h, n, d = q.shape
    t = k.shape[2]
    rows = max(1, min(n, slice_scores // max(t, 1)))
    q = (q * d**-0.5).reshape(b * h, n, d)  # (BH, N, d), scale folded into q once
    kt = k.reshape(b * h, t, d).transpose(1, 2).contiguous()  # (BH, d, T)
    v = v.reshape(b * h, t, d).contiguous()  # (BH, T, d)
    out = torch.empty_like(q)  # (BH, N, d)
    for i in range(b * h):
        for start in range(0, n, rows):
            scores = torch.mm(q[i, start : start + rows], kt[i])  # (rows, T)
            out[i, start : start + rows] = torch.mm(torch.softmax(scores, dim=-1), v[i])  # (rows, d)
    return out.view(b, h, n, d)
