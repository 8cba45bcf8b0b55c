"""`diffusekit animate`: prompt travel, seed travel and 2D motion animations to MP4, GIF, WebP or frames."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .cli_generate import _add_common, _params, load_pipeline


def _frame_bar(enabled: bool):
    def report(p) -> None:  # p: animation.render.FrameProgress
        if not enabled:
            return
        step = f" step {p.step}/{p.total}" if p.total else ""
        sys.stderr.write(f"\rframe {p.frame + 1}/{p.frames}{step}    ")
        if not p.total and p.frame + 1 == p.frames:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def _prompts(args: argparse.Namespace) -> dict[int, str]:
    from .animation.schedule import ScheduleError, parse_prompts

    if not args.prompts:
        return {}
    text = args.prompts
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ScheduleError(f"--prompts: {text!r} is neither a JSON object nor a JSON file")
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScheduleError(f"--prompts: invalid JSON at character {e.pos + 1}: {e.msg}") from None
    return parse_prompts(data)


def _seeds(text: str | None) -> tuple[int, ...]:
    from .animation.render import AnimationError

    if not text:
        return ()
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise AnimationError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1,2,3") from None


def cmd_animate(args: argparse.Namespace) -> int:
    from .animation.motion_lora import parse_motion_lora
    from .animation.render import AnimationError, AnimationSpec, MotionSettings, Renderer
    from .animation.video import check_output, frame_path, write_video
    from .images import load_image

    if args.batch != 1 or args.n_iter != 1:
        raise AnimationError("--batch and --n-iter do not apply to animate (each frame is one image)")
    kind = check_output(args.out)
    out = Path(args.out)
    folder = out if kind == "dir" else out.with_name(out.stem + ".frames")
    motion = MotionSettings(
        zoom=args.zoom, angle=args.angle, translation_x=args.translation_x, translation_y=args.translation_y,
        strength=args.strength, noise=args.noise, color_coherence=args.color_coherence,
    )  # fmt: skip
    spec = AnimationSpec(
        mode=args.mode, frames=args.frames, fps=args.fps, prompts=_prompts(args), seeds=_seeds(args.seeds),
        curve=args.curve, cadence=args.cadence, interpolation=args.interpolation, motion=motion,
        motion_module=args.motion_module or "", context=args.context, overlap=args.overlap,
        motion_loras=tuple(parse_motion_lora(t) for t in args.motion_lora or ()),
    ).check()  # fmt: skip
    init = load_image(args.init_image) if args.init_image else None
    params = _params(args)
    state = folder / "animation.json"
    if args.resume and params.seed < 0 and state.is_file():  # a random seed is kept by the first run
        params = params.replace(seed=json.loads(state.read_text())["params"]["seed"])
    t0 = time.perf_counter()
    pipe = load_pipeline(args)
    renderer = Renderer(pipe, params, spec, folder)
    files = renderer.render(resume=args.resume, init_image=init, callback=_frame_bar(not args.json))
    summary = {"frames": [str(f) for f in files], "seed": renderer.params.seed, **renderer.state()}
    if kind != "dir":
        from PIL import Image

        frames = [Image.open(frame_path(folder, i)) for i in range(spec.frames)]
        write_video(frames, out, spec.fps, json.dumps(renderer.state()))
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    summary["output"] = str(out)
    summary["total_seconds"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {out} ({spec.frames} frames at {spec.fps:g} fps, seed {renderer.params.seed})")
    return 0


def add_animate_commands(sub) -> None:
    p = sub.add_parser(
        "animate", help="prompt travel, seed travel or 2D motion animation (MP4, GIF, WebP or frames)"
    )
    _add_common(p)
    p.set_defaults(out="animation.mp4", func=cmd_animate)
    p.add_argument("--mode", default="travel", choices=("travel", "seed", "motion", "animatediff"),
                   help="travel: keyframed prompts; seed: noise slerped between --seeds; motion: each frame "
                   "the previous one warped and passed through img2img; animatediff: all frames at once "
                   "through an AnimateDiff motion module (--motion-module)")  # fmt: skip
    p.add_argument("--frames", type=int, default=16, help="number of frames")
    p.add_argument("--fps", type=float, default=8.0, help="frames per second of the video")
    p.add_argument("--prompts", help='keyframed prompts: JSON {"0": "...", "24": "..."} or a JSON file')
    p.add_argument("--seeds", help="seed travel: comma-separated seeds, spread evenly over the frames")
    p.add_argument("--curve", default="linear", help="easing between keyframes: linear, ease-in, ease-out, "
                   "ease-in-out, step")  # fmt: skip
    p.add_argument(
        "--cadence",
        type=int,
        default=1,
        help="diffuse every N-th frame and interpolate the frames between (1 = every frame)",
    )
    p.add_argument(
        "--interpolation",
        default="slerp",
        choices=("slerp", "blend"),
        help="in-between frames: slerp of latents (decoded) or blend of pixels",
    )
    g = p.add_argument_group('motion mode (values are keyframe schedules: "0: (1.0), 30: (1.02)")')
    g.add_argument("--zoom", default="1.0", help="scale per frame (>1 zooms in)")
    g.add_argument("--angle", default="0", help="rotation per frame, degrees counter-clockwise")
    g.add_argument("--translation-x", default="0", help="shift per frame, pixels (right is positive)")
    g.add_argument("--translation-y", default="0", help="shift per frame, pixels (down is positive)")
    g.add_argument("--strength", default="0.45", help="img2img denoising strength of each frame")
    g.add_argument("--noise", default="0.02", help="pixel noise added before each img2img (std dev)")
    g.add_argument(
        "--color-coherence",
        default="lab",
        choices=("lab", "none"),
        help="match each frame's LAB histograms to the first frame's",
    )
    g.add_argument("--init-image", help="start the motion from this image instead of a txt2img frame")
    g = p.add_argument_group("animatediff mode")
    g.add_argument("--motion-module", help="AnimateDiff motion module: mm_sd_v15*.ckpt/.safetensors or a "
                   "diffusers MotionAdapter folder (SD1.x models; mm_sdxl* for SDXL)")  # fmt: skip
    g.add_argument("--motion-lora", action="append", metavar="PATH[:WEIGHT]",
                   help="MotionLoRA (v2_lora_*.ckpt or a diffusers folder) merged into the motion module "
                   "with WEIGHT (default 1.0); repeatable")  # fmt: skip
    g.add_argument("--context", type=int, default=16, help="frames per motion-module window")
    g.add_argument("--overlap", type=int, default=4, help="frames shared by consecutive windows")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed render from the frames already in its frames folder",
    )
