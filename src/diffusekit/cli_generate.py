"""`diffusekit generate | img2img | inpaint | info`: generation from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "default.safetensors"  # shipped in diffusekit/assets once trained (issue 4)
PRECISIONS = ("auto", "fp32", "fp32-fast", "bf16", "fp16", "int8", "openvino", "openvino-int8")  # no torch


def default_model_path() -> Path:
    """The packaged default model, or a clear error saying how to pass one."""
    path = Path(str(resources.files("diffusekit") / "assets" / DEFAULT_MODEL))
    if not path.is_file():
        raise FileNotFoundError(
            f"no default model is installed ({path}); pass --model PATH (a .safetensors/.ckpt file or a "
            "diffusers folder)"
        )
    return path


class ProgressBar:
    """One stderr line: batch, pass, step/total, it/s, ETA; silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.key: tuple[int, int] | None = None
        self.t0, self.step0 = 0.0, 0

    def announce(self, text: str) -> None:
        """A line before the first step (which can take minutes at large sizes), overwritten by the bar."""
        if self.enabled:
            sys.stderr.write(f"\r{text}")
            sys.stderr.flush()

    def __call__(self, p) -> None:  # p: pipeline.Progress
        if not self.enabled:
            return
        now = time.perf_counter()
        if (p.batch, p.pass_index) != self.key:  # rates are measured from the first step of each pass
            self.key, self.t0, self.step0 = (p.batch, p.pass_index), now, p.step
        done, elapsed = p.step - self.step0, now - self.t0
        rate = f"{done / elapsed:.2f} it/s" if done and elapsed > 0 else "- it/s"
        eta = f"ETA {(p.total - p.step) * elapsed / done:.0f}s" if done else ""
        bar = "#" * int(20 * p.step / p.total)
        label = f"batch {p.batch + 1} " + (f"pass {p.pass_index}/{p.passes} " if p.passes > 1 else "")
        end = ""
        if p.step == p.total:  # the VAE decode that follows the last pass can take a while at large sizes
            end = " decoding...\n" if p.pass_index == p.passes else "\n"
        sys.stderr.write(f"\r{label}[{bar:<20}] {p.step}/{p.total} {rate} {eta}   {end}")
        sys.stderr.flush()


# The fallbacks named in the help are params.ModelDefaults' own; they are spelled out here because
# importing params pulls in torch, and `diffusekit info` should stay light.
MODEL_DEFAULT = " (default: the model's recommendation, else %s)"


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """--steps/--cfg/--sampler/--schedule, which take the model file's recommended settings when left out,
    and --cfg-rescale (off unless asked for)."""
    p.add_argument("--steps", type=int, help="sampling steps" + MODEL_DEFAULT % 20)
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale" + MODEL_DEFAULT % 7)
    p.add_argument(
        "--sampler", help='e.g. "Euler a", "DPM++ 2M Karras", euler, dpmpp_2m' + MODEL_DEFAULT % "DPM++ 2M"
    )
    p.add_argument(
        "--schedule", help="automatic, karras, exponential, sgm_uniform, ..." + MODEL_DEFAULT % "automatic"
    )
    p.add_argument(
        "--cfg-rescale", type=float, default=0.0, metavar="PHI",
        help="CFG rescale (Lin et al. 2023, diffusers' guidance_rescale; 0 = off, 0.7 is their choice "
        "for zero-terminal-SNR v-prediction models)",
    )  # fmt: skip


def add_device_option(p: argparse.ArgumentParser) -> None:
    """--device; resolved (and checked) by runtime.resolve_device when the command runs."""
    help = "auto (CUDA where PyTorch sees a GPU, else cpu), cpu, cuda, cuda:N"
    p.add_argument("--device", default="auto", help=help)


def _add_common(p: argparse.ArgumentParser) -> None:
    from .cli_sd3 import add_sd3_options

    p.add_argument("prompt", help="the prompt (A1111 syntax: (word:1.2), [word], BREAK)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--model", help="checkpoint file, diffusers folder or store model NAME[@VERSION] "
                   "(default: the bundled model)")  # fmt: skip
    p.add_argument("--store", type=Path, help="model store folder for --model NAME (default: per-user)")
    p.add_argument("--vae", help="replace the model's VAE")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the model's prediction type")
    p.add_argument("--loras", metavar="DIR", help="folder of LoRA files for <lora:NAME:WEIGHT> in the prompt")
    p.add_argument("--embeddings", metavar="DIR", help="folder of textual-inversion embeddings, used by name")
    add_sampling_options(p)
    p.add_argument("--seed", type=int, default=-1, help="-1: random; image i of a batch uses seed+i")
    p.add_argument("--subseed", type=int, default=-1, help="variation seed")
    p.add_argument("--subseed-strength", type=float, default=0.0)
    p.add_argument("--width", type=int, help="default: the model's native size")
    p.add_argument("--height", type=int)
    p.add_argument("--batch", type=int, default=1, help="images per sampler run")
    p.add_argument("--n-iter", type=int, default=1, help="sampler runs (batch count)")
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--prompt-mode", default="a1111", choices=("a1111", "a1111_no_norm", "plain"))
    add_device_option(p)
    p.add_argument(
        "--precision", default="auto", choices=PRECISIONS,
        help="compute path; auto: bf16 for SD-size models on CPUs with native bf16, int8 for a file "
        "quantized by `diffusekit convert` (int8), on other CPUs the OpenVINO U-Net (openvino) for SD-size "
        "models where openvino is installed, else fp32 (fp16 on CUDA); fp32 is the reference path, "
        "fp32-fast lays it out channels-last; openvino-int8 calibrates an nncf int8 U-Net once "
        "(see docs/guides/cpu-paths.md)",
    )  # fmt: skip
    p.add_argument("--deepcache", type=int, default=1, metavar="N",
                   help="DeepCache: run the whole U-Net every N-th call, reuse its deep features in "
                   "between (1 = off; 3 is a common choice)")  # fmt: skip
    p.add_argument("--deepcache-branch", type=int, default=0, metavar="B",
                   help="DeepCache: cached path via the first/last B+1 U-Net blocks (0 fastest)")  # fmt: skip
    p.add_argument("--tome", type=float, default=0.0, metavar="RATIO",
                   help="token merging: merge this share of top-level tokens before self-attention "
                   "(0 = off, at most 0.75; 0.5 is a common choice)")  # fmt: skip
    p.add_argument("--int8", action="store_true", help="dynamic int8 U-Net transformer weights (CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (slow first image)")
    p.add_argument(
        "-o", "--out", default="out.png",
        help="output file: .png (infotext in a 'parameters' chunk), .jpg/.jpeg or .webp (infotext in EXIF "
        "UserComment, as A1111 writes it); batches add -1, -2 ... before the extension",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of progress")
    add_sd3_options(p)


def _params(args: argparse.Namespace, **extra):
    from .params import GenerationParams

    return GenerationParams(
        prompt=args.prompt,
        negative_prompt=args.negative,
        width=args.width,
        height=args.height,
        steps=args.steps,
        cfg_scale=args.cfg,
        sampler=args.sampler,
        schedule=args.schedule,
        seed=args.seed,
        subseed=args.subseed,
        subseed_strength=args.subseed_strength,
        batch_size=args.batch,
        n_iter=args.n_iter,
        clip_skip=args.clip_skip,
        cfg_rescale=args.cfg_rescale,
        prompt_mode=args.prompt_mode,
        **extra,
    )


def _accel(args: argparse.Namespace):
    """The accelerators asked for on the command line (validated, with the valid ranges on error)."""
    from .accel import Accel

    return Accel(
        deepcache_interval=args.deepcache,
        deepcache_branch=args.deepcache_branch,
        tome_ratio=args.tome,
        int8=args.int8,
        compile=args.compile,
    )


def output_paths(out: str, count: int) -> list[Path]:
    """The files a run of `count` images writes: `out` itself, or NAME-1.EXT, NAME-2.EXT, ..."""
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(count)]


def _check_outputs(args: argparse.Namespace, params) -> list[Path]:
    """Every output file checked (folder exists and is writable, name, format) before any work."""
    from .image_files import check_output_path
    from .params import MAX_BATCH, MAX_N_ITER

    chars = len(params.prompt) + len(params.negative_prompt)
    in_range = 1 <= params.batch_size <= MAX_BATCH and 1 <= params.n_iter <= MAX_N_ITER  # else: refused later
    paths = output_paths(args.out, params.batch_size * params.n_iter if in_range else 1)
    return [check_output_path(p, prompt_chars=chars, probe=i == 0) for i, p in enumerate(paths)]


# GenerationParams fields -> the options that set them, so that errors name what the user typed
CLI_OPTIONS = {
    "width": "--width", "height": "--height", "steps": "--steps", "cfg_scale": "--cfg", "seed": "--seed",
    "subseed": "--subseed", "subseed_strength": "--subseed-strength", "batch_size": "--batch",
    "n_iter": "--n-iter", "clip_skip": "--clip-skip", "cfg_rescale": "--cfg-rescale",
    "denoising_strength": "--strength", "mask_blur": "--mask-blur", "inpaint_full_res_padding": "--padding",
    "hr_scale": "--hires", "hr_second_pass_steps": "--hires-steps", "hr_upscaler": "--hires-upscaler",
    "hr_denoising_strength": "--hires-strength", "prompt_mode": "--prompt-mode", "inpainting_fill": "--fill",
    "resize_mode": "--resize-mode",
}  # fmt: skip


def _as_cli_error(err) -> ValueError:
    """A ParamError ("field=value ...") reworded with the command-line option ("--option value ...")."""
    option = CLI_OPTIONS.get(err.field)
    if option is None:
        return err
    return ValueError(str(err).replace(f"{err.field}={err.value!r}", f"{option} {err.value}", 1))


def load_pipeline(args: argparse.Namespace):
    """The Pipeline the common options ask for: model, VAE, precision, accelerators, LoRA and TI folders."""
    from .cli_models import store_pipeline
    from .pipeline import Pipeline
    from .runtime import resolve_device

    accel, device = _accel(args), resolve_device(args.device)
    pipe = store_pipeline(args, accel=accel, device=device)  # None unless --model names a store model
    if pipe is None:
        from .cli_sd3 import sd3_pipeline

        model = Path(args.model) if args.model else default_model_path()
        pipe = sd3_pipeline(args, model, device) or Pipeline.from_file(
            model, vae=args.vae, prediction=args.prediction, precision=args.precision, accel=accel,
            device=device,
        )  # fmt: skip
    if args.loras:
        from .adapters.extra_networks import LoraLibrary

        pipe.loras = LoraLibrary(args.loras)
    if args.embeddings:
        from .adapters.embeddings import EmbeddingLibrary

        pipe.embeddings = EmbeddingLibrary(args.embeddings)
    return pipe


def _run(args: argparse.Namespace, params, **inputs) -> int:
    from .image_files import save_image
    from .params import ParamError

    paths = _check_outputs(args, params)
    if params.prompt_mode != "plain":  # emphasis errors (bounds, bad numbers) before the model loads
        from .prompts import parse_prompt_attention

        parse_prompt_attention(params.prompt)
        parse_prompt_attention(params.negative_prompt)
    t0 = time.perf_counter()
    pipe = load_pipeline(args)
    load_s = time.perf_counter() - t0
    progress = ProgressBar(not args.json)
    try:
        if "outpaint" in inputs:
            image, pads = inputs.pop("outpaint")
            progress.announce("outpainting: encoding the prompt and running the first step ...")
            result = pipe.outpaint(params, image, callback=progress, **pads)
        else:
            checked = params.validate(pipe.cfg.resolution, pipe.defaults)
            w, h = pipe.output_size(checked)
            count = checked.batch_size * checked.n_iter
            progress.announce(f"{w}x{h}, {count} image(s), {checked.steps} steps: encoding the prompt ...")
            result = pipe.generate(params, callback=progress, **inputs)
    except ParamError as e:
        raise _as_cli_error(e) from None
    for line in result.warnings:
        print(f"diffusekit: warning: {line}", file=sys.stderr)
    files = []
    for path, img, text in zip(paths, result.images, result.infotexts, strict=True):
        save_image(img, path, text)
        files.append(str(path))
    total_s = time.perf_counter() - t0
    if args.json:
        print(
            json.dumps(
                {
                    "files": files,
                    "seeds": result.seeds,
                    "infotexts": result.infotexts,
                    "path": {"name": pipe.path.name, "reason": pipe.path.reason},
                    "load_seconds": round(load_s, 3),
                    "total_seconds": round(total_s, 3),
                },
                indent=2,
            )
        )
    else:
        for f, s in zip(files, result.seeds, strict=True):
            print(f"wrote {f} (seed {s})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    extra = {}
    if args.hires:
        extra = dict(
            enable_hr=True,
            hr_scale=args.hires,
            hr_upscaler=args.hires_upscaler,
            hr_second_pass_steps=args.hires_steps,
            hr_denoising_strength=args.hires_strength,
        )
    return _run(args, _params(args, **extra))


def cmd_img2img(args: argparse.Namespace) -> int:
    from .images import load_image

    image = load_image(args.image)
    return _run(
        args, _params(args, denoising_strength=args.strength, resize_mode=args.resize_mode), init_image=image
    )


def cmd_inpaint(args: argparse.Namespace) -> int:
    from .images import load_image

    image, mask = load_image(args.image), load_image(args.mask, mode="mask")
    params = _params(
        args,
        denoising_strength=args.strength,
        mask_blur=args.mask_blur,
        inpaint_full_res=args.only_masked,
        inpaint_full_res_padding=args.padding,
        inpainting_fill=args.fill,
    )
    return _run(args, params, init_image=image, mask=mask)


def cmd_outpaint(args: argparse.Namespace) -> int:
    from .images import load_image

    image = load_image(args.image)
    params = _params(args, denoising_strength=args.strength, mask_blur=args.mask_blur)
    pads = dict(left=args.left, right=args.right, top=args.top, bottom=args.bottom)
    return _run(args, params, outpaint=(image, pads))


def cmd_info(args: argparse.Namespace) -> int:
    from .metadata import parse_infotext, printable, read_infotext

    text = read_infotext(args.image)
    if text is None:
        raise ValueError(
            f"{printable(args.image)}: has no generation parameters (no 'parameters' text chunk or "
            "EXIF UserComment)"
        )
    # JSON escapes every control character itself; plain text is escaped so that untrusted metadata
    # cannot send terminal escape sequences.
    print(json.dumps(parse_infotext(text), indent=2) if args.json else printable(text))
    return 0


def add_generation_commands(sub) -> None:
    p = sub.add_parser("generate", help="text to image")
    _add_common(p)
    p.add_argument("--hires", type=float, default=0.0, help="hires fix upscale factor (e.g. 2); 0 = off")
    p.add_argument("--hires-upscaler", default="latent", choices=("latent", "latent-nearest", "lanczos"))
    p.add_argument("--hires-steps", type=int, default=0)
    p.add_argument("--hires-strength", type=float, default=0.7)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("img2img", help="image to image")
    _add_common(p)
    p.add_argument("--image", required=True)
    p.add_argument("--strength", type=float, default=0.75, help="denoising strength 0..1")
    p.add_argument("--resize-mode", default="resize", choices=("resize", "crop", "fill"))
    p.set_defaults(func=cmd_img2img)

    p = sub.add_parser("inpaint", help="repaint the white area of a mask")
    _add_common(p)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True, help="white = repaint, black = keep")
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--mask-blur", type=float, default=4.0)
    p.add_argument("--only-masked", action="store_true", help="work on the masked area at full resolution")
    p.add_argument("--padding", type=int, default=32, help="pixels around the mask with --only-masked")
    p.add_argument(
        "--fill", default="original", choices=("original", "latent_noise", "latent_nothing", "fill")
    )
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("outpaint", help="extend an image beyond its borders")
    _add_common(p)
    p.add_argument("--image", required=True)
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--mask-blur", type=float, default=4.0)
    p.set_defaults(func=cmd_outpaint)

    p = sub.add_parser("info", help="print the generation parameters stored in an image")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
