"""How much of the prompt does a model read through the padding positions? A diagnostic for two objects.

Usage: python bench/padding_reliance.py MODEL [--mode empty|eos] [--prompts heldout|train] [--seed 0]
       [--sampler NAME] [--json out.json]

A causal CLIP text encoder's states after the EOS token (77 - n of them for an n-token prompt) each see
the whole caption: they are a summary of it, repeated, and a jointly trained U-Net can read the prompt
there instead of at the word positions. This runs the eval (`diffusekit eval`, the model's
recommended settings, or `--sampler`) with the prompt's padding states replaced in the conditional context:

- `--mode empty`: by the empty prompt's states at those positions (what a caption-dropped row sees);
- `--mode eos`: by the prompt's own EOS state, repeated (the summary kept once, the positions lost).

The unconditional context is left alone. A model that reads the prompt at the word positions scores
about what it scores in the eval; the further it falls, the more it reads the padding. Reading the
padding is a candidate for the eval's two-object failures (both objects drawn alike): a summary mixes
the two objects at every position of the image. `Objective.pad_dropout` trains against it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusekit.eval.geneval import evaluate, format_table, pipeline_generator
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline

MODES = ("empty", "eos")


class PaddingSwap(Pipeline):
    """A Pipeline whose conditional context has its padding states replaced (`mode`, see above)."""

    mode = "empty"

    def encode(self, params: GenerationParams, width: int, height: int) -> tuple[dict, dict]:
        cond, uncond = super().encode(params, width, height)
        context = cond["context"]  # (1, 77 * chunks, C)
        if context.shape[1] != 77:
            raise ValueError(f"prompt {params.prompt!r} spans several 77-token chunks; use a shorter one")
        n = min(len(self.loaded.tokenizer.encode(params.prompt)) + 2, 77)  # BOS ... EOS
        if self.mode == "empty":
            empty, _ = super().encode(params.replace(prompt=""), width, height)
            fill = empty["context"][:, n:]
        else:
            fill = context[:, n - 1 : n].expand(-1, 77 - n, -1)  # the EOS state
        cond = dict(cond, context=torch.cat([context[:, :n], fill], dim=1))
        return cond, uncond


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--mode", choices=MODES, default="empty")
    ap.add_argument("--prompts", choices=("heldout", "train"), default="heldout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", help="default: the model's recommendation")
    ap.add_argument("--json")
    args = ap.parse_args()
    pipe = PaddingSwap.from_file(args.model, precision="fp32")
    pipe.mode = args.mode
    settings = pipe.defaults.fill(GenerationParams(sampler=args.sampler))
    report = evaluate(pipeline_generator(pipe, settings), seed=args.seed, prompt_set=args.prompts)
    print(format_table(report))
    used = f"{settings.steps} steps, CFG {settings.cfg_scale:g}, {settings.sampler}"
    print(f"\n{Path(args.model).name}: padding replaced by {args.mode!r}; {used}")
    if args.json:
        used = {"model": Path(args.model).name, "mode": args.mode, "sampler": settings.sampler,
                "cfg_scale": settings.cfg_scale, "steps": settings.steps}  # fmt: skip
        Path(args.json).write_text(json.dumps({"settings": used} | report.to_dict(), indent=2))


if __name__ == "__main__":
    main()
