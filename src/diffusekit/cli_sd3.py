"""SD3/SD3.5 options of `diffusekit generate | img2img` and SD3 presets of `diffusekit create`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_sd3_options(p: argparse.ArgumentParser) -> None:
    """Options that apply when --model is an SD3/SD3.5 file (ignored by the U-Net families)."""
    g = p.add_argument_group("SD3 / SD3.5 models")
    g.add_argument("--text-encoder", action="append", default=[], metavar="FILE",
                   help="SD3: a separate clip_l / clip_g / t5xxl file (repeat for each)")  # fmt: skip
    g.add_argument("--t5-tokenizer", metavar="PATH",
                   help="SD3: T5 spiece.model or its folder (default: beside the checkpoint)")  # fmt: skip
    g.add_argument(
        "--no-t5", action="store_true", help="SD3: run without T5 (zeros, as the reference allows)"
    )
    g.add_argument(
        "--t5-int8", action="store_true", help="SD3: dynamic int8 T5 weights (about half its memory)"
    )
    g.add_argument("--t5-length", type=int, metavar="N", help="SD3: T5 tokens (default 256)")
    g.add_argument("--shift", type=float, help="SD3: flow time shift (default: the model's, 3.0 for SD3.5)")
    g.add_argument("--slg", type=float, default=0.0, metavar="SCALE",
                   help="SD3.5 Medium: skip-layer guidance scale (2.5 is Stability's; 0 = off)")  # fmt: skip


def sd3_pipeline(args: argparse.Namespace, model: Path, device):
    """An SD3Pipeline for `model` if it is an SD3 file, else None (the caller uses the U-Net pipeline)."""
    from .checkpoints.sd3 import is_sd3_file

    if not is_sd3_file(model):
        return None
    from .pipeline_sd3 import SD3Pipeline

    return SD3Pipeline.from_file(
        model,
        text_encoders=tuple(args.text_encoder),
        precision=args.precision,
        device=device,
        options=sd3_options(args),
    )


def sd3_options(args: argparse.Namespace):
    """The SD3Options the command-line SD3 options ask for (also used for store SD3 models)."""
    from .pipeline_sd3 import SD3Options

    if args.shift is not None and args.shift <= 0:
        raise ValueError(f"--shift must be positive, got {args.shift}")
    if args.t5_length is not None and not 1 <= args.t5_length <= 512:
        raise ValueError(f"--t5-length must be within 1..512, got {args.t5_length}")
    return SD3Options(
        shift=args.shift, use_t5=not args.no_t5, t5_tokenizer=args.t5_tokenizer, slg_scale=args.slg,
        t5_int8=args.t5_int8, t5_max_length=args.t5_length,
    )  # fmt: skip


def create_sd3_preset(args: argparse.Namespace, dtype) -> bool:
    """`diffusekit create` for an SD3 preset; False if the preset is not one."""
    from .models.sd3_configs import SD3_PRESETS

    if args.preset not in SD3_PRESETS:
        return False
    from .checkpoints.sd3 import create_sd3

    files = create_sd3(SD3_PRESETS[args.preset], args.out, seed=args.seed, dtype=dtype)
    print(f"wrote {', '.join(map(str, files))}: preset {args.preset}, random weights (seed {args.seed})")
    return True
