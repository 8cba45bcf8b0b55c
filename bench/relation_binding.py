"""Does a model's layout follow the relation word? A diagnostic for the eval's position category.

Usage: python bench/relation_binding.py MODEL [MODEL ...] [--pairs 32] [--json out.json]

For `--pairs` random relation captions built from training compositions ("a red circle to the left of
a cyan star") and the same caption with the relation reversed ("... to the right of ..."; both must be
training compositions), it measures two things:

- **first-step layout**: the image the model predicts from pure noise in one Euler step (CFG as the
  model recommends, seed 0), read as the color-weighted centroids of the two named colors. The layout
  follows the prompt when object A sits on the stated side of object B. `both` is the share of pairs
  where the caption and its reversal are both followed, which a model that ignores the relation word
  scores near 0 (it draws one layout for both), and a model that follows it near 1; `flip` is the share
  of pairs whose layout changes side when the word changes.
- **error ratio**: on `--pairs` training images (relation captions), the denoising error at the noisiest
  timestep (pure noise on a zero-terminal-SNR schedule) under the reversed caption divided by the error
  under the true one. 1.00: the prediction does not depend on the relation word. The same ratio for
  absolute positions ("... on the left" against "... on the right") is the control: a model that reads
  a word for placement scores well above 1 there.
- **text**: how far apart the text encoder puts the caption and its reversal, as the mean L2 distance of
  the padding-token states (which see the whole caption through the causal mask), divided by the
  distance for the same caption with object A's color changed. Near 0: the encoder hardly tells "left
  of" from "right of" in a relation.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch

from diffusekit.data.shapes import (
    COLORS,
    HELDOUT_PAIRS,
    INVERSE_RELATION,
    SHAPES,
    CaptionSpec,
    Group,
    format_caption,
    render_scene,
    sample_spec,
    scene_for_spec,
    spec_is_heldout,
)
from diffusekit.diffusion.schedules import sd_alphas_cumprod
from diffusekit.images import to_tensor
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from diffusekit.train.contrast import contrast_caption
from diffusekit.train.objectives import denoising_target

ALLOWED = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]


def caption_pairs(n: int, seed: int = 0) -> list[tuple[CaptionSpec, CaptionSpec]]:
    """n (caption, reversed caption) spec pairs of two differently colored training objects."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        (ca, sa), (cb, sb) = rng.sample(ALLOWED, 2)
        rel = rng.choice(sorted(INVERSE_RELATION))
        groups = (Group(sa, ca), Group(sb, cb))
        spec, rev = CaptionSpec(groups, rel), CaptionSpec(groups, INVERSE_RELATION[rel])
        if ca != cb and not spec_is_heldout(spec) and not spec_is_heldout(rev):
            out.append((spec, rev))
    return out


def centroid(image, rgb: tuple[int, int, int]) -> tuple[float, float]:
    """The centroid (x, y) of pixels close to `rgb`, weighted by closeness."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    w = np.clip(1 - np.linalg.norm(a - np.array(rgb, np.float32), axis=2) / 120, 0, None)  # (H, W)
    ys, xs = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    total = w.sum() + 1e-6
    return float((xs * w).sum() / total), float((ys * w).sum() / total)


def followed(pipe: Pipeline, spec: CaptionSpec) -> bool:
    """Whether the one-step prediction from pure noise puts A on the stated side of B."""
    params = GenerationParams(prompt=format_caption(spec), seed=0, steps=1, sampler="Euler")
    image = pipe.generate(params).images[0]
    (ax, ay), (bx, by) = (centroid(image, COLORS[g.color]) for g in spec.groups)
    along = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[spec.relation]
    return along > 0


@torch.no_grad()
def error_ratio(pipe: Pipeline, kind: str, n: int, seed: int = 7) -> float:
    """Mean denoising error at the noisiest timestep under the opposite caption / under the true one, over
    n training images of `kind` ("relation" or "position")."""
    rng, pairs, images = np.random.default_rng(seed), [], []
    while len(pairs) < n:
        spec = sample_spec(rng, "train", kind=kind)
        caption = format_caption(spec)
        alt = contrast_caption(caption)  # relation reversed or position mirrored; None if held out
        if alt is not None:
            images.append(render_scene(scene_for_spec(spec, rng)))
            pairs.append((caption, alt))
    x = torch.cat([to_tensor(im) for im in images]).to(pipe.device, pipe.dtype)  # (n, 3, 64, 64)
    z = pipe.model.vae.encode(x).mean.float() * pipe.cfg.vae.scaling_factor  # (n, C, h, w)
    t = len(sd_alphas_cumprod()) - 1
    a = sd_alphas_cumprod(zero_terminal_snr=pipe.cfg.zero_terminal_snr)[t].float()
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z.device)
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    target = denoising_target(z, noise, a, pipe.cfg.prediction)
    errors = []
    for which in (0, 1):
        context = torch.cat([context_of(pipe, pair[which]) for pair in pairs])  # (n, 77, W)
        pred = pipe.unet_call(x_t, torch.full((n,), float(t)), context)
        errors.append((pred - target).pow(2).mean().item())
    return errors[1] / errors[0]


def context_of(pipe: Pipeline, prompt: str) -> torch.Tensor:
    """The U-Net's text conditioning (1, 77, W) for a prompt."""
    return pipe.encode(GenerationParams(prompt=prompt), 64, 64)[0]["context"]


def summary(pipe: Pipeline, spec: CaptionSpec) -> torch.Tensor:
    """The padding-token states (P, W) of a caption (tokens 24 onwards; captions are shorter)."""
    return context_of(pipe, format_caption(spec))[0, 24:].float()


def measure(path: str, n: int, device: str = "cpu") -> dict:
    pipe = Pipeline.from_file(path, device=device)
    both = flips = 0
    ratios = []
    for spec, rev in caption_pairs(n):
        f_spec, f_rev = followed(pipe, spec), followed(pipe, rev)
        both += f_spec and f_rev
        flips += f_spec == f_rev  # the layout changed side exactly when both or neither were followed
        a, b = spec.groups
        third = next(c for c in COLORS if c not in (a.color, b.color))
        recolored = CaptionSpec((Group(a.shape, third), b), spec.relation)  # A in a third color
        base = summary(pipe, spec)
        d_rev = (summary(pipe, rev) - base).norm(dim=-1).mean()
        d_color = (summary(pipe, recolored) - base).norm(dim=-1).mean()
        ratios.append(float(d_rev / d_color))
    return {
        "model": path,
        "pairs": n,
        "both": both / n,
        "flip": flips / n,
        "error_ratio_relation": error_ratio(pipe, "relation", n),
        "error_ratio_position": error_ratio(pipe, "position", n),
        "text_ratio": float(np.mean(ratios)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (the figures in results/ are on cpu)")
    args = parser.parse_args()
    rows = [measure(m, args.pairs, args.device) for m in args.models]
    print(
        "| model | first-step layout: both followed | layout flips | error ratio: relations "
        "| error ratio: positions (control) | text: reversed / recolored |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['both']:.2f} | {r['flip']:.2f} | {r['error_ratio_relation']:.3f} "
            f"| {r['error_ratio_position']:.3f} | {r['text_ratio']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
