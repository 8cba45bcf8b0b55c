"""Temporal coherence of animations: mean absolute difference between consecutive frames (0-255 scale),
for prompt travel and 2D motion against frames seeded independently, with the bundled default model.

    python bench/animation_coherence.py [--frames 12] [--steps 20] [--out FILE.json]

Lower is smoother. "independent" renders the same prompt with seed + i for frame i (what a user gets by
generating frames one by one); prompt travel keeps the noise fixed and moves the text embedding; motion
passes each warped frame through img2img.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffusekit.animation.render import AnimationSpec, MotionSettings, Renderer
from diffusekit.cli_generate import default_model_path
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline


def consecutive_mad(paths: list[Path]) -> float:
    frames = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in paths]
    return float(np.mean([np.abs(a - b).mean() for a, b in zip(frames, frames[1:], strict=False)]))


def cpu_kind() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        lines = out.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
        bf16 = "avx512_bf16" in out or "amx_bf16" in out
        return f"{name} ({'native bf16' if bf16 else 'no native bf16'})"
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/animation_coherence.json"))
    args = ap.parse_args()
    pipe = Pipeline.from_file(default_model_path(), precision="fp32")
    base = GenerationParams(prompt="a red circle", steps=args.steps, seed=args.seed)
    n = args.frames
    runs = {
        "independent seeds": None,
        "prompt travel": AnimationSpec(
            mode="travel",
            frames=n,
            prompts={0: "a red circle on the left", n - 1: "a red circle on the right"},
        ),
        "2D motion (zoom 1.02, strength 0.4)": AnimationSpec(
            mode="motion", frames=n, motion=MotionSettings(zoom="1.02", strength="0.4")
        ),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in runs.items():
            t0 = time.perf_counter()
            folder = Path(tmp) / name.split()[0]
            if spec is None:
                folder.mkdir()
                paths = []
                for i in range(n):
                    img = pipe.generate(base.replace(seed=args.seed + i)).images[0]
                    paths.append(folder / f"{i}.png")
                    img.save(paths[-1])
            else:
                paths = Renderer(pipe, base, spec, folder).render()
            results[name] = {"consecutive_mad": round(consecutive_mad(paths), 2),
                             "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            print(f"{name:38s} consecutive-frame MAD {results[name]['consecutive_mad']:6.2f} / 255")
    report = {"command": "python bench/animation_coherence.py", "frames": n, "steps": args.steps,
              "cpu": cpu_kind(), "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
