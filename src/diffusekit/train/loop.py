"""A small, exact-resume training loop: EMA, bf16 autocast, gradient clipping, atomic checkpoints.

Resuming after a kill -9 continues exactly: a checkpoint holds the weights, EMA, optimizer, the step
and every RNG state, and batches are a pure function of (seed, step), so steps N+1... after a resume
see the same data and draw the same noise as an uninterrupted run.

Speed on CPU (`python bench/train_step.py`): AdamW runs fused (one kernel over all parameters instead
of a dozen foreach passes), and the training forward uses SDPA's "math" backend: PyTorch's CPU flash
attention backward is slow for the short sequences of small models (16-77 tokens). With PyTorch's
defaults one stage-2 step of the default model costs 1.44x as much.

bf16 autocast pays only where the hardware computes bf16 natively. On a CPU without AVX512-BF16 or AMX
(an AVX2-only AMD EPYC, say) PyTorch emulates it, and a stage-2 step of the default model costs 20x the
fp32 step (`python bench/train_step.py --precision`: 22.9 s against 1.15 s, batch 64, two threads).
So `precision="auto"` (the default) autocasts where `TrainConfig.bf16` asks for it and the device has
native bf16, and trains in fp32 elsewhere; "bf16" and "fp32" force the choice ("bf16" reproduces a bf16
run's arithmetic on any CPU, slowly).

On CUDA the module's device decides: autocast runs there and SDPA picks its own kernel. Every random
draw of the objectives stays on the CPU generator, so a CUDA run sees the batches and noise of a CPU
run with the same seeds (its arithmetic differs), and a checkpoint holds the CUDA RNG state as well.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..precisions import TRAIN_PRECISIONS
from ..runtime import cpu_has_native_bf16


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    bf16: bool = True  # autocast matmuls/convs to bf16 where native (weights, optimizer stay fp32)
    save_every: int = 200
    log_every: int = 10
    seed: int = 0


@dataclass
class TrainState:
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) every log_every steps


def trains_in_bf16(cfg: TrainConfig, device: torch.device, precision: str = "auto") -> bool:
    """Whether a Trainer on `device` autocasts to bf16 (see the module docstring)."""
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"unknown training precision {precision!r}; valid: {', '.join(TRAIN_PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cpu":
        return cfg.bf16 and cpu_has_native_bf16()
    return cfg.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()


class EMA:
    """Exponential moving average of parameters (Polyak averaging), warmed up as 1 - (1+n)/(10+n)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n])


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Trainer:
    """Runs `loss_fn(module, step) -> loss` for cfg.steps steps with checkpoints in `out_dir`."""

    def __init__(
        self, name: str, module: nn.Module, cfg: TrainConfig, out_dir: str | Path, *, precision: str = "auto"
    ):
        self.name = name
        self.module = module
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        params = [p for p in module.parameters() if p.requires_grad]
        self.device = params[0].device
        self.bf16 = trains_in_bf16(cfg, self.device, precision)
        fused = all(p.device.type in ("cpu", "cuda") for p in params)  # the devices fused AdamW has
        self.opt = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=fused
        )
        self.ema = EMA(module, cfg.ema_decay)
        self.state = TrainState()

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / f"{self.name}.train.pt"

    def save(self) -> None:
        save_atomic(
            {
                "module": self.module.state_dict(),
                "ema": self.ema.shadow,
                "opt": self.opt.state_dict(),
                "step": self.state.step,
                "losses": self.state.losses,
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "config": asdict(self.cfg),
            },
            self.checkpoint_path,
        )

    def resume(self) -> bool:
        """Load the checkpoint if one exists; True if training continues from it."""
        if not self.checkpoint_path.is_file():
            return False
        ck = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(ck["module"])
        self.ema.shadow = ck["ema"]
        self.opt.load_state_dict(ck["opt"])
        self.state = TrainState(step=ck["step"], losses=[tuple(x) for x in ck["losses"]])
        torch.set_rng_state(ck["torch_rng"].cpu())
        random.setstate(_as_python_state(ck["python_rng"]))
        if ck.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), self.device)
        return True

    def _attention(self):
        """SDPA's math backend on CPU (see the module docstring); the default choice elsewhere."""
        return sdpa_kernel(SDPBackend.MATH) if self.device.type == "cpu" else contextlib.nullcontext()

    def train_step(self, loss_fn: Callable[[nn.Module, int], torch.Tensor], step: int) -> torch.Tensor:
        """One optimizer step at `step`'s learning rate: forward in the loop's precision, backward,
        gradient clipping, AdamW, EMA. Returns the loss; the step counter and checkpoints are run()'s."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16), self._attention():
            loss = loss_fn(self.module, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: loss became {loss.item()} at step {step}; lower the lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip)
        self.opt.step()
        self.ema.update(self.module, step)
        return loss.detach()

    def run(
        self,
        loss_fn: Callable[[nn.Module, int], torch.Tensor],
        *,
        progress: bool = True,
        stop_at: int | None = None,
    ) -> TrainState:
        """Train to cfg.steps (or `stop_at`, for tests), saving every cfg.save_every steps and at the end."""
        cfg = self.cfg
        end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        self.module.train()
        start_step, t0, running = self.state.step, time.perf_counter(), []
        while self.state.step < end:
            loss = self.train_step(loss_fn, self.state.step)
            self.state.step += 1
            running.append(loss.item())
            if self.state.step % cfg.log_every == 0 or self.state.step == end:
                self.state.losses.append((self.state.step, sum(running) / len(running)))
                running = []
                if progress:
                    _print_progress(self.name, self.bf16, self.state, end, start_step, t0)
            if self.state.step % cfg.save_every == 0 or self.state.step == end:
                self.save()
        self.module.eval()
        return self.state


def _as_python_state(state) -> tuple:
    """torch.load returns lists where random.getstate() had tuples."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _print_progress(name: str, bf16: bool, state: TrainState, end: int, start_step: int, t0: float) -> None:
    done = state.step - start_step
    elapsed = time.perf_counter() - t0
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (end - state.step) / rate if rate > 0 else 0.0
    loss = state.losses[-1][1] if state.losses else float("nan")
    precision = "bf16" if bf16 else "fp32"
    sys.stderr.write(
        f"\r{name} ({precision}): step {state.step}/{end} loss {loss:.4f} "
        f"{rate:.2f} it/s ETA {eta / 60:.1f} min   "
    )
    if state.step == end:
        sys.stderr.write("\n")
    sys.stderr.flush()
