"""The `diffusekit` command line: one subcommand per job, one-line errors unless --debug."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class UsageError(ValueError):
    """A bad command-line value (exit code 2)."""


def _torch_dtype(name: str | None):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoints.inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(args.path, prediction=args.prediction, hashes=not args.no_hash)
    path = _auto_path(args.path, report)
    if args.json:
        print(json.dumps(report.to_dict() | {"compute_path": path}, indent=2))
    else:
        print(format_report(report))
        print(f"  compute     {path['name']} on this CPU with --precision auto ({path['reason']})")
    return 0


def _stops_on_sigterm(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run `cmd` with SIGTERM unwinding like Ctrl-C (SystemExit 143), so partial files are removed on the
    way out; the caller's handler is restored afterwards (the command may run inside a longer process)."""
    import functools
    import signal

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        previous = signal.signal(signal.SIGTERM, stop)
        try:
            return cmd(args)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return run


def _auto_path(path: str, report) -> dict[str, str]:  # noqa: ANN001 - an InspectReport
    """The path `--precision auto` takes for this checkpoint on this machine's CPU, and why."""
    from .accel.int8_file import is_int8_checkpoint
    from .runtime import choose_path

    unet = sum(c.parameters for c in report.components if c.name.lower() in ("unet", "u-net"))
    chosen = choose_path("auto", "cpu", unet or None, quantized=is_int8_checkpoint(path))
    return {"name": chosen.name, "reason": chosen.reason}


@_stops_on_sigterm
def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints.convert import convert_checkpoint

    if args.quantize:
        return _cmd_quantize(args)
    result = convert_checkpoint(
        args.src,
        args.dst,
        fmt=args.format,
        dtype=_torch_dtype(args.dtype),
        prune=args.prune,
        keep_ema=args.keep_ema,
        prediction=args.prediction,
        vae=args.vae,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        change = result["bytes_after"] / max(1, result["bytes_before"])
        print(
            f"{result['src']} -> {result['dst']} ({result['format']}, {result['dtype']}): "
            f"{result['bytes_before']:,} -> {result['bytes_after']:,} bytes ({change:.0%})"
        )
        for note in result["notes"]:
            print(f"  note: {note}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import QuantizeSettings, quantize_checkpoint

    if args.format != "single-file" or args.dtype or args.prune or args.keep_ema:
        raise ValueError(
            "--quantize int8 writes a single file and takes no --format/--dtype/--prune/--keep-ema"
        )
    settings = QuantizeSettings(activations=args.int8_activations, prompts=args.calibration_prompts,
                                steps=args.calibration_steps, size=args.calibration_size,
                                text_encoders=args.int8_text_encoders)  # fmt: skip
    result = quantize_checkpoint(args.src, args.dst, settings, prediction=args.prediction, vae=args.vae)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['src']} -> {result['dst']} (int8-static: {result['layers']} U-Net layers, "
            f"{result['text_encoder_layers']} text encoder layers, "
            f"{result['calibration']}, {result['calibration_seconds']} s; "
            f"{result['bytes_after']:,} bytes)"
        )
    return 0


@_stops_on_sigterm
def cmd_create(args: argparse.Namespace) -> int:
    import torch

    from .checkpoints.load import checkpoint_metadata
    from .checkpoints.single_file import cast_floats, save_state_dict
    from .cli_sd3 import create_sd3_preset
    from .models.configs import preset
    from .models.init import randomize_
    from .models.sd import StableDiffusion

    if create_sd3_preset(args, _torch_dtype(args.dtype)):
        return 0
    cfg = preset(args.preset)
    model = randomize_(StableDiffusion(cfg), seed=args.seed)
    sd = model.state_dict()
    dtype = _torch_dtype(args.dtype)
    if dtype is not None and dtype != torch.float32:
        sd = cast_floats(sd, dtype)
    save_state_dict(
        sd, args.out, metadata=checkpoint_metadata(cfg, {"diffusekit.init": f"random seed {args.seed}"})
    )
    print(f"wrote {args.out}: preset {cfg.name}, random weights (seed {args.seed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusekit", description="Stable Diffusion in plain PyTorch.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="family, parameters, bytes and hashes of a checkpoint")
    p.add_argument("path", help="a .safetensors/.ckpt file or a diffusers folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the prediction type")
    p.add_argument("--no-hash", action="store_true", help="skip hashing (fast on large files)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert/prune/cast a checkpoint")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=("single-file", "diffusers"), default="single-file")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="cast floating-point weights")
    p.add_argument("--prune", action="store_true", help="drop EMA and training-only entries")
    p.add_argument("--keep-ema", action="store_true", help="with --prune: keep the EMA U-Net weights instead")
    p.add_argument("--prediction", choices=("eps", "v"), help="record the prediction type")
    p.add_argument("--vae", help="replace the VAE with this file or folder")
    p.add_argument("--quantize", choices=("int8",), help="calibrate once and write an int8 U-Net (CPU)")
    p.add_argument(
        "--int8-activations",
        choices=("dynamic", "static"),
        default="dynamic",
        help="with --quantize: each call's own input range (default), or ranges calibrated once",
    )
    p.add_argument(
        "--int8-text-encoders",
        action="store_true",
        help="with --quantize: the text encoders' linears in int8 too (smaller file, see cpu-paths guide)",
    )
    p.add_argument(
        "--calibration-prompts", type=int, default=4, help="with --int8-activations static: images to observe"
    )
    p.add_argument(
        "--calibration-steps", type=int, default=8, help="with --int8-activations static: sampler steps each"
    )
    p.add_argument(
        "--calibration-size", type=int, help="with --int8-activations static: image side (default: native)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("create", help="write a model with seeded random weights at a named preset")
    p.add_argument("preset", help="sd1, sd1_inpaint, sd2, sd2_v, sdxl, tiny_sd1, sd35_medium, tiny_sd3, ...")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=tuple(DTYPES))
    p.set_defaults(func=cmd_create)

    from .cli_animate import add_animate_commands
    from .cli_generate import add_generation_commands
    from .cli_lora import add_lora_commands
    from .cli_models import add_models_commands
    from .cli_serve import add_serve_commands
    from .cli_train import add_training_commands

    add_generation_commands(sub)
    add_training_commands(sub)
    add_lora_commands(sub)
    add_animate_commands(sub)
    add_models_commands(sub)
    add_serve_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    if args.debug:
        return func(args)
    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        # CheckpointError, UsageError and validation errors are ValueErrors with a one-line message.
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"diffusekit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
