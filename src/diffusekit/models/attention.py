"""Attention kernels for the U-Net's (cross-)attention, chosen per module by `runtime.prepare`.

"sdpa" is PyTorch's `scaled_dot_product_attention` in the tensors' own dtype: the parity path, and the
right choice on CUDA. "sliced" is for bf16 on CPU, where the fused CPU SDPA kernel is bound by its own
softmax loop (0.30-0.33 s for SD1.5's 64x64 self-attention at batch 2, 8 heads, d=40, in bf16 or fp32
alike). It computes exact attention one head and one cache-sized slice of queries at a time, a bf16
matmul for the scores, a softmax, a bf16 matmul with the values. At head sizes that are not a multiple
of 16 (SD1.x's 40, where that call is the U-Net's costliest) and without autograd it goes further:

- the slices are shared out between the cores as whole pipelines (scores, exp, value product), each core
  running single-threaded ops on a slice that stays in its own L2, instead of every op being split
  between the cores;
- the softmax is not normalised: exp(scores) multiplies the values with a column of ones appended, which
  yields each row's sum of weights in the same matmul (oneDNN pads d=40 to 48 columns anyway), and the
  (rows, d) result is divided by it. The max is only there to keep exp in range; a slice skips it where
  Cauchy-Schwarz bounds every score by `EXP_SAFE_LOGIT` (|q_i . k_j| <= |q_i| |k_j|). Slices without
  that bound subtract it (a plain softmax).

0.12-0.14 s instead of 0.14-0.16 s for that call (`bench/perf.py` has the whole-step figures). The cost
is one more bf16 rounding than the fused kernel (the scores leave the matmul as bf16; the row sums are
rounded too); on SD1.5 at 512 the bf16 step's error from fp32 is the same with either kernel, 1.65-1.66%,
dominated by the weights' and activations' rounding (`bench/precision.py`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ATTENTION_KERNELS = ("sdpa", "sliced")

# Query rows per slice are chosen so one slice of scores holds about this many elements (2 MiB in bf16).
SLICE_SCORES = 1 << 20

# Scores bounded by this in magnitude can be exponentiated without subtracting their max: e^60 * 2^40
# keys stays below the fp32/bf16 maximum (3.4e38) and e^-60 above the smallest normal number (1.2e-38).
EXP_SAFE_LOGIT = 60.0

# Below this many scores per call the work is too small to share out between threads.
THREADED_MIN_SCORES = 1 << 22


def attention(q: Tensor, k: Tensor, v: Tensor, kernel: str = "sdpa") -> Tensor:
    """Softmax(q k^T / sqrt(d)) v for (B, h, N, d) queries and (B, h, T, d) keys/values -> (B, h, N, d)."""
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if kernel == "sliced":
        return sliced_attention(q, k, v)
    raise ValueError(f"unknown attention kernel {kernel!r}; valid: {', '.join(ATTENTION_KERNELS)}")


def sliced_attention(
    q: Tensor, k: Tensor, v: Tensor, slice_scores: int = SLICE_SCORES, threads: int | None = None
) -> Tensor:
    """Exact attention one head and one slice of queries at a time (no mask, no dropout).

    Head sizes that are not a multiple of 16 (SD1.x's 40), without autograd and outside torch.compile,
    take the exp-and-sums path on `threads` cores (default: torch's intra-op thread count); the rest a
    softmax per slice.
    """
    b, h, n, d = q.shape
    t = k.shape[2]
    rows = max(1, min(n, slice_scores // max(t, 1)))
    q = (q * d**-0.5).reshape(b * h, n, d)  # (BH, N, d), scale folded into q once
    kt = k.reshape(b * h, t, d).transpose(1, 2).contiguous()  # (BH, d, T)
    v = v.reshape(b * h, t, d)  # (BH, T, d)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, kt, v))
    if d % 16 == 0 or grad or torch.compiler.is_compiling():  # threads and out= writes: eager only
        return _softmax_slices(q, kt, v.contiguous(), rows).view(b, h, n, d)
    return _exp_slices(q, kt, v, rows, threads or torch.get_num_threads()).view(b, h, n, d)


def _softmax_slices(q: Tensor, kt: Tensor, v: Tensor, rows: int) -> Tensor:
    """(BH, N, d) scaled queries, (BH, d, T) keys, (BH, T, d) values -> (BH, N, d), a normalised softmax
    per head and slice of rows; differentiable (no out= writes)."""
    n = q.shape[1]
    out = torch.empty_like(q)  # (BH, N, d)
    for i in range(q.shape[0]):
        for s in range(0, n, rows):
            scores = torch.mm(q[i, s : s + rows], kt[i])  # (rows, T)
            out[i, s : s + rows] = torch.mm(torch.softmax(scores, dim=-1), v[i])  # (rows, d)
    return out


def _exp_slices(q: Tensor, kt: Tensor, v: Tensor, rows: int, threads: int) -> Tensor:
    """The same as `_softmax_slices` for d % 16 != 0: exp without the max where the bound allows, the
    weights' sums from a column of ones (oneDNN pads the value product's width to 16 anyway, so d=40's
    48 columns cost no more than 40), slices shared out between `threads` single-threaded workers."""
    bh, n, d = q.shape
    t = kt.shape[2]
    ones_and_pad = [v.new_ones(bh, t, 1), v.new_zeros(bh, t, 15 - d % 16)]
    v1 = torch.cat([v, *ones_and_pad], dim=-1)  # (BH, T, w): values, ones, zeros; w = d rounded up to 16
    starts = range(0, n, rows)
    wide = torch.promote_types(q.dtype, torch.float32)
    q_norm = torch.linalg.vector_norm(q, dim=-1, dtype=wide)  # (BH, N)
    k_norm = torch.linalg.vector_norm(kt, dim=1, dtype=wide).amax(-1)  # (BH,)
    bound = torch.stack([q_norm[:, s : s + rows].amax(-1) for s in starts], dim=1) * k_norm[:, None]
    plain = (bound <= EXP_SAFE_LOGIT).tolist()  # (BH, slices): exp without subtracting the max
    out = torch.empty_like(q)  # (BH, N, d)
    tasks = [(i, j, s) for i in range(bh) for j, s in enumerate(starts)]

    def run(share: Sequence[tuple[int, int, int]]) -> None:
        scores = q.new_empty(rows, t)  # (rows, T), reused across this share's slices
        for i, j, s in share:
            r = min(rows, n - s)
            sc = torch.mm(q[i, s : s + r], kt[i], out=scores[:r])  # (r, T)
            p = sc.exp_() if plain[i][j] else torch.softmax(sc, dim=-1)
            weighted = torch.mm(p, v1[i])  # (r, w): weighted values, the weights' sum, zeros
            torch.div(weighted[:, :d], weighted[:, d : d + 1], out=out[i, s : s + r])

    workers = min(threads, len(tasks))
    if workers > 1 and bh * n * t >= THREADED_MIN_SCORES:
        per = -(-len(tasks) // workers)
        _on_single_threaded_workers(run, [tasks[w * per : (w + 1) * per] for w in range(workers)])
    else:
        run(tasks)
    return out


def _on_single_threaded_workers(fn: Callable[[Sequence], None], shares: list[Sequence]) -> None:
    """fn(share) for every share at once, one thread each (the caller's thread takes the first), each
    running torch ops single-threaded and in the caller's inference mode (both are per thread); the
    caller's thread count is restored and a worker's error re-raised."""
    errors: list[BaseException] = []
    inference = torch.is_inference_mode_enabled()

    def worker(share: Sequence) -> None:
        try:
            torch.set_num_threads(1)
            with torch.inference_mode(inference), torch.no_grad():
                fn(share)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
            errors.append(e)

    helpers = [threading.Thread(target=worker, args=(share,), daemon=True) for share in shares[1:]]
    for helper in helpers:
        helper.start()
    own = torch.get_num_threads()
    try:
        worker(shares[0])
    finally:
        for helper in helpers:
            helper.join()
        torch.set_num_threads(own)  # last: torch also keeps the count for threads it starts later
    if errors:
        raise errors[0]
