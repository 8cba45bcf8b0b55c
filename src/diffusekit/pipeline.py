"""txt2img, img2img, inpainting and hires fix over a loaded model: params in, PIL images + infotext out.

Random numbers: image i of a run uses seed + i through its own CPU ``torch.Generator``, so an image is
the same on CPU and GPU, alone or in a batch. Draw order per image follows diffusers (VAE posterior
sample of the init image, then the initial noise, then the masked-image posterior, then per-step noise),
so the same weights, seed and deterministic sampler give diffusers' image.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from . import __version__, images, inpainting
from .accel import Accel, DeepCache, apply_accel
from .adapters.embeddings import EmbeddingLibrary, active_embeddings, used_embeddings
from .adapters.extra_networks import LoraLibrary, lora_hashes, prompt_loras, strip_extra_networks
from .adapters.lora import LoraNetwork, apply_loras
from .checkpoints.load import LoadedModel, load_model
from .diffusion.denoiser import CFGDenoiser, Denoiser, HookedDenoiser
from .diffusion.sampler_base import gaussian_noise
from .diffusion.samplers import SAMPLERS, a1111_names, resolve_sampler, sampler_sigmas
from .diffusion.schedules import img2img_sigmas, sd_schedule
from .memory import MemoryEstimate, check_fits, estimate, resident_bytes
from .metadata import GenerationInfo, format_infotext
from .models.tokenizer import CLIPTokenizer
from .models.unet import size_embedding
from .models.vae_chunked import decode_chunked, encode_chunked, should_chunk
from .params import GenerationParams, seed_at
from .precisions import OPENVINO_PRECISIONS
from .prompts import encode_prompt, pad_to_same_length
from .runtime import ComputePath, load_path, prepare


class Cancelled(Exception):
    """Raised between steps when the caller's cancel flag is set."""


class Skipped(Exception):
    """Raised between steps when the caller's skip flag is set: A1111's skip, which ends the current batch
    of n_iter with its latest x0 estimate (`denoised`, (B, C, h, w)) and goes on with the next."""

    def __init__(self, denoised: torch.Tensor):
        super().__init__("image skipped")
        self.denoised = denoised


class NonFiniteError(ValueError):
    """A component produced NaN/inf values (A1111's NansException): names the component and the fix."""


def check_finite(x: torch.Tensor, component: str, dtype: torch.dtype) -> torch.Tensor:
    """`x` unchanged, or a NonFiniteError naming `component` when any value is NaN or infinite."""
    if bool(torch.isfinite(x).all()):
        return x
    bad = int((~torch.isfinite(x)).sum())
    if dtype != torch.float32:
        fix = f"it ran in {str(dtype).removeprefix('torch.')}: try --precision fp32 (precision='fp32')"
    else:
        fix = "it ran in fp32, so the model file likely holds NaN/inf weights: use another file"
    raise NonFiniteError(
        f"the {component} produced {bad:,} NaN/inf values of {x.numel():,}, which would give a black "
        f"image; {fix}"
    )


@dataclass(frozen=True)
class Progress:
    """One sampler step done: `step` of `total` in pass `pass_index` (hires fix has 2 passes)."""

    step: int
    total: int
    pass_index: int = 1
    passes: int = 1
    batch: int = 0  # which batch of n_iter
    denoised: torch.Tensor | None = field(default=None, repr=False, compare=False)  # (B, C, h, w) x0 estimate


ProgressCallback = Callable[[Progress], None]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infos: list[GenerationInfo]
    seeds: list[int]
    latents: torch.Tensor | None = field(default=None, repr=False)  # (N, 4, h, w) before decoding
    warnings: list[str] = field(default_factory=list)  # e.g. LoRA keys that matched no layer

    @property
    def infotexts(self) -> list[str]:
        return [format_infotext(i) for i in self.infos]


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noise tensors (A1111's variation seeds)."""
    a_n, b_n = a / a.norm(), b / b.norm()
    dot = (a_n * b_n).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    omega = torch.acos(dot)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


class BatchNoise:
    """Per-image CPU generators; each draw is one (1, C, h, w) sample per image, concatenated."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        self.device = device

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, *shape): item b drawn from generator b."""
        return torch.cat([torch.randn((1, *shape), generator=g) for g in self.generators]).to(self.device)


@dataclass(frozen=True)
class _Batch:
    """One sampler run of a generation: its images' seeds and what they share."""

    params: GenerationParams
    conds: tuple[dict, dict]  # (cond, uncond) conditioning dicts
    seeds: list[int]
    subseeds: list[int]
    width: int
    height: int
    report: Callable[..., None]  # report(step, total, pass_index)
    hires_conds: tuple[dict, dict] | None = None  # conditioning at the hires size (SDXL's size ids differ)


def _ve_noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A U-Net family latent at noise level sigma (k-diffusion's VE form)."""
    return x0 + noise * sigma


# Above this estimated activation size a VAE decode/encode runs in exact row strips (same result, less
# memory): from 512x512 up for SD-size VAEs, never for the 64x64 default model.
VAE_CHUNK_BYTES = 256 * 2**20


class Pipeline(inpainting.ImageJobs):
    """A loaded model ready to generate; hold one per model and call it many times."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        accel: Accel | None = None,
        path: ComputePath | None = None,
    ):
        self.loaded = loaded
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = loaded.model
        self.path = path or ComputePath(str(dtype).removeprefix("torch."), dtype, "dtype given")
        self.fast = prepare(self.model, dtype, self.device, self.path.name)  # casts and lays out in place
        self.accel = accel or Accel()  # opt-in accelerators; DeepCache acts per sampler run in _sample
        apply_accel(self.model, self.accel)
        self.cfg = loaded.cfg
        self.defaults = loaded.defaults  # what GenerationParams left at None becomes
        self.vae_chunk_bytes = VAE_CHUNK_BYTES
        self.schedule = sd_schedule(zero_terminal_snr=self.cfg.zero_terminal_snr)
        self._hash: str | None = None
        self._bang_tokenizer: CLIPTokenizer | None = None
        self.loras: LoraLibrary | None = None  # where <lora:NAME:...> prompt tags are looked up
        self.embeddings: EmbeddingLibrary | None = None  # textual-inversion names usable in prompts
        self.lora_merge = True  # LoRAs as merged weight copies for a call (False: forward hooks)
        self.ov_unet = None  # the OpenVINO U-Net on the openvino paths (accel/openvino_backend.py)
        if self.path.name in OPENVINO_PRECISIONS:
            from .accel.openvino_backend import openvino_unet

            self.ov_unet = openvino_unet(self)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        precision: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        accel: Accel | None = None,
        **load_kw,
    ) -> Pipeline:
        """Load a checkpoint (`load_kw`: prediction, vae, keep_ema) for generation.

        `precision` "auto" picks bf16 on CPUs with native bf16 for SD-size models, int8 for an
        int8-quantized file, and fp32 otherwise (see runtime.choose_path); "fp32" is the parity path.
        An explicit `dtype` wins. `accel` turns on opt-in accelerators (diffusekit.accel); they change
        the images a little.
        """
        from .accel.int8_file import is_int8_checkpoint, load_int8_model

        quantized = is_int8_checkpoint(path)
        loaded = load_int8_model(path, **load_kw) if quantized else load_model(path, **load_kw)
        unet_params = sum(p.numel() for p in loaded.model.unet.parameters())
        chosen = load_path(precision, device, unet_params, dtype=dtype, quantized=quantized)
        if quantized and chosen.dtype != torch.float32:
            raise ValueError(f"{Path(path).name} is int8-quantized; it runs in fp32 around its int8 layers")
        if precision == "auto" and chosen.name == "openvino" and accel is not None and accel.active:
            chosen = ComputePath("fp32", torch.float32, "auto: accelerators act on the PyTorch U-Net; fp32")
        return cls(loaded, device=device, dtype=chosen.dtype, accel=accel, path=chosen)

    def _path_infotext(self) -> dict[str, str]:
        """The infotext field of a quantized compute path (none for the float paths)."""
        marks = {"int8": "int8-static", "openvino-int8": "openvino-int8"}
        return {"Quantization": marks[self.path.name]} if self.path.name in marks else {}

    # --- conditioning ------------------------------------------------------------------------

    def encode(self, params: GenerationParams, width: int, height: int) -> tuple[dict, dict]:
        """The prompt and negative prompt as U-Net conditioning dicts (context, and y for SDXL)."""
        enc = self.model.text_encoders
        tok = self.loaded.tokenizer
        if params.prompt_mode == "plain":
            # diffusers' OpenCLIP tokenizers (SD2, SDXL's second) register the pad token "!" as special,
            # which splits every "!" of a prompt into its own token; A1111 uses one tokenizer for all.
            if self._bang_tokenizer is None:
                self._bang_tokenizer = CLIPTokenizer.bundled(pad_token="!")
            tok = [tok if e.cfg.pad_token_id == tok.eos_id else self._bang_tokenizer for e in enc]
        kw = dict(clip_skip=params.clip_skip, mode=params.prompt_mode)
        toks = tok if isinstance(tok, list) else [tok] * len(enc)
        with torch.inference_mode(), active_embeddings(enc, toks, self.embeddings) as tok:
            cond = encode_prompt(strip_extra_networks(params.prompt), tok, enc, **kw)
            uncond = encode_prompt(strip_extra_networks(params.negative_prompt), tok, enc, **kw)
            if cond.context.shape[1] != uncond.context.shape[1]:
                cond, uncond = pad_to_same_length(cond, uncond, encode_prompt("", tok, enc, **kw))
        out = []
        for emb in (cond, uncond):
            check_finite(emb.context, "text encoder", self.dtype)
            c = {"context": emb.context.to(self.device, self.dtype)}
            if self.cfg.unet.adm_in_channels is not None:  # SDXL: pooled text + size/crop ids
                ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
                y = torch.cat([emb.pooled.float(), size_embedding(ids, self.cfg.unet.size_embed_dim)], dim=1)
                c["y"] = y.to(self.device, self.dtype)
            out.append(c)
        return out[0], out[1]

    def unet_call(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        y=None,
        *,
        cache: DeepCache | None = None,
    ) -> torch.Tensor:
        """One U-Net evaluation: (B, C, h, w) latents at timesteps (B,) -> (B, C, h, w) float32 output.

        With a DeepCache (one per sampler run) the call goes through it and may reuse deep features.
        """
        x = self.fast.input(x.to(self.device))
        if context.dtype != self.dtype:
            context = context.to(self.device, self.dtype)
        if self.ov_unet is not None:  # accelerators (DeepCache among them) were refused at load
            return self.ov_unet(x, t, context, y)
        if cache is not None:
            return cache(self.model.unet, x, t.to(self.device), context, y).float()
        return self.model.unet(x, t.to(self.device), context, y).float()

    # --- the sampling loop -------------------------------------------------------------------

    def _sample(
        self,
        params: GenerationParams,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        conds: tuple[dict, dict],
        noise: BatchNoise,
        *,
        blend: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        report: Callable[..., None],
    ) -> torch.Tensor:
        """Run the sampler from x (at sigmas[0]) with CFG; `blend` keeps an inpainting known region."""
        spec = SAMPLERS[self.resolve_sampler(params)[0]]
        cache = self.accel.deepcache()  # fresh per sampler run: its first U-Net call is always full
        unet = self.unet_call if cache is None else partial(self.unet_call, cache=cache)
        denoiser = CFGDenoiser(
            Denoiser(unet, self.schedule, prediction=self.cfg.prediction),
            scale=params.cfg_scale,
            rescale=params.cfg_rescale,
        )
        model = denoiser if blend is None else HookedDenoiser(denoiser, pre=blend)
        batch = x.shape[0]
        cond, uncond = ({k: v.expand(batch, *v.shape[1:]) for k, v in c.items()} for c in conds)
        kwargs = {"eta": params.eta} if spec.ancestral or spec.sde else {}
        with torch.inference_mode():
            out = spec.fn(
                model,
                x,
                sigmas,
                extra_args={"cond": cond, "uncond": uncond},
                callback=lambda info: report(info.index + 1, info.total, info.denoised),
                noise=gaussian_noise(x, noise.generators),
                **kwargs,
            )
            if blend is not None:  # the final latent keeps the known region exactly
                out = blend(out, sigmas.new_zeros((batch,)))
        return out

    def resolve_sampler(self, params: GenerationParams) -> tuple[str, str]:
        """(sampler_id, schedule_id) of `params` for this model ("automatic" depends on the model)."""
        params = self.defaults.fill(params)
        return resolve_sampler(params.sampler, params.schedule, zero_terminal_snr=self.cfg.zero_terminal_snr)

    def _sigmas(self, params: GenerationParams, steps: int) -> torch.Tensor:
        sampler_id, schedule_id = self.resolve_sampler(params)
        return sampler_sigmas(sampler_id, schedule_id, steps, self.schedule).to(self.device)

    def _img2img_sigmas(self, params: GenerationParams, steps: int, strength: float) -> torch.Tensor:
        full = lambda n: self._sigmas(params, n)  # noqa: E731
        return img2img_sigmas(full, steps, strength, semantics=params.img2img_steps)

    # --- VAE ---------------------------------------------------------------------------------

    def encode_image(self, img: torch.Tensor, noise: BatchNoise | None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents; posterior sample drawn per image from its generator."""
        vae = self.model.vae
        with torch.inference_mode():
            x = self.fast.input(img.to(self.device))
            chunk = self._chunk_vae(img.shape[-1], img.shape[-2], batch=img.shape[0])
            post = encode_chunked(vae, x) if chunk else vae.encode(x)
            if noise is None:
                z = post.mode()
            else:
                z = post.mean + post.std * noise.randn(tuple(post.mean.shape[1:])).to(post.mean)
        return check_finite(z.float(), "VAE encoder", self.dtype) * self.cfg.vae.scaling_factor

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Scaled latents (B, 4, h, w) -> PIL images, one image at a time to bound memory."""
        out = []
        with torch.inference_mode():
            for z in latents.split(1):
                z = self.fast.input((z / self.cfg.vae.scaling_factor).to(self.device))  # (1, C, h, w)
                d = self.cfg.vae.downscale
                chunk = self._chunk_vae(z.shape[-1] * d, z.shape[-2] * d)
                x = decode_chunked(self.model.vae, z) if chunk else self.model.vae.decode(z)
                out += images.to_pil(check_finite(x.float(), "VAE decoder", self.dtype))
        return out

    def memory_estimate(self, params: GenerationParams) -> MemoryEstimate:
        """Predicted peak memory of `generate(params)`: resident now plus the larger activation peak."""
        width, height = self.output_size(params.validate(self.cfg.resolution, self.defaults))
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return estimate(
            self.cfg, width, height, params.batch_size,
            resident=resident_bytes(weight_bytes),
            dtype_bytes=torch.finfo(self.dtype).bits // 8,
            vae_chunked=self._chunk_vae(width, height),
        )  # fmt: skip

    def output_size(self, params: GenerationParams) -> tuple[int, int]:
        """The size of the images `generate(params)` returns: the hires size when hires fix is on."""
        if params.enable_hr:
            return params.hires_size(self.cfg.resolution)
        return params.size(self.cfg.resolution)

    def _chunk_vae(self, width: int, height: int, batch: int = 1) -> bool:
        """Run the VAE in exact row strips when its plain activations would exceed `vae_chunk_bytes`."""
        dtype_bytes = torch.finfo(self.dtype).bits // 8
        return should_chunk(self.cfg.vae, width, height, dtype_bytes, self.vae_chunk_bytes, batch)

    # --- public jobs -------------------------------------------------------------------------

    def generate(
        self,
        params: GenerationParams,
        *,
        loras: Sequence[tuple[LoraNetwork, float, float]] = (),
        **kw,
    ) -> GenerationResult:
        """Generate with `loras` ((network, te weight, unet weight), ...) and the prompt's <lora:...> tags
        applied for this call only (see `_generate` for the other arguments)."""
        active = list(loras) + prompt_loras(params.prompt, self.loras)
        fallback = nullcontext()
        if active and self.ov_unet is not None:  # LoRA patches the PyTorch U-Net, not the OpenVINO graph
            from .accel.openvino_backend import torch_unet

            fallback = torch_unet(
                self, "LoRA at run time", "merge it into the checkpoint (`diffusekit merge-lora`)"
            )
        texts = [strip_extra_networks(params.prompt), strip_extra_networks(params.negative_prompt)]
        widths = [e.cfg.width for e in self.model.text_encoders]
        used = used_embeddings(texts, self.loaded.tokenizer, self.embeddings, widths)
        extras = {"Lora hashes": lora_hashes(active)} if lora_hashes(active) else {}
        if used:
            extras["TI hashes"] = ", ".join(f"{e.name}: {e.shorthash}" for e in used)
        if extras:
            params = params.replace(extras={**params.extras, **extras})
        with fallback, apply_loras(self.model, active, merge=self.lora_merge) as applied:
            result = self._generate(params, **kw)
        result.warnings += applied.warnings()
        return result

    def _generate(
        self,
        params: GenerationParams,
        *,
        init_image: Image.Image | None = None,
        mask: Image.Image | None = None,
        callback: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        skip: threading.Event | None = None,
        conds: tuple[dict, dict] | None = None,
    ) -> GenerationResult:
        """Run n_iter batches of batch_size images; txt2img, img2img (init_image) or inpainting (+ mask).

        `conds` replaces the encoded prompts with ready (cond, uncond) conditioning from `encode` (prompt
        travel interpolates them); the infotext still records `params.prompt`. `skip` set during a batch
        ends that batch at its current x0 estimate (A1111's skip; cleared as each batch starts, as there).
        """
        params = params.validate(self.cfg.resolution, self.defaults)
        self.resolve_sampler(params)  # unknown names fail before any work
        if init_image is not None:
            params.check_img2img()
        inpainting.check_mask(init_image, mask)
        width, height = params.size(self.cfg.resolution)
        final_w, final_h = self.output_size(params)
        check_fits(self.memory_estimate(params), what=f"{final_w}x{final_h} x{params.batch_size}")
        seed = params.seed if params.seed >= 0 else random.randrange(2**32)
        subseed = params.subseed if params.subseed >= 0 else random.randrange(2**32)
        passes = 2 if params.enable_hr and init_image is None else 1
        all_images, all_infos, all_seeds, all_latents = [], [], [], []
        if conds is None:  # the prompts are encoded once for all batches
            conds = self.encode(params, width, height)
        hires_conds = None
        if params.enable_hr and init_image is None:  # only SDXL's conditioning depends on the size
            sdxl = self.cfg.unet.adm_in_channels is not None
            hires_conds = self.encode(params, final_w, final_h) if sdxl else conds
        plan = None if mask is None else inpainting.plan_mask(params, init_image, mask, width, height)
        for it in range(params.n_iter):
            first = it * params.batch_size
            # image i: seed + i and subseed + i, wrapped into the valid range so every seed replays
            seeds = [seed_at(seed, first + j) for j in range(params.batch_size)]
            subseeds = [seed_at(subseed, first + j) for j in range(params.batch_size)]

            def report(step: int, total: int, pass_index: int = 1, denoised=None, _it: int = it) -> None:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("generation cancelled")
                if callback is not None:
                    callback(Progress(step, total, pass_index, passes, _it, denoised))
                if skip is not None and skip.is_set() and denoised is not None:
                    raise Skipped(denoised)

            run = _Batch(params, conds, seeds, subseeds, width, height, report, hires_conds)
            if skip is not None:
                skip.clear()
            try:
                if init_image is None:
                    latents = self._txt2img(run)
                else:
                    latents = self._img2img(run, init_image, plan)
            except Skipped as skipped:
                latents = skipped.denoised.float()
            check_finite(latents, "U-Net", self.dtype)
            imgs = self.decode(latents)
            if plan is not None:  # unmasked pixels stay the original's
                imgs = plan.finish(imgs, init_image)
            all_images += imgs
            all_latents.append(latents.cpu())
            all_seeds += seeds
            all_infos += [
                self.info(params, s, sub, img2img=init_image is not None, inpaint=mask is not None)
                for s, sub in zip(seeds, subseeds, strict=True)
            ]
        return GenerationResult(all_images, all_infos, all_seeds, torch.cat(all_latents))

    # --- the three flows ---------------------------------------------------------------------

    def _initial_noise(self, noise: BatchNoise, subseeds: list[int], params, shape) -> torch.Tensor:
        """Each image's seed noise, slerped towards its variation-seed noise by subseed_strength."""
        x = noise.randn(shape)  # (B, C, h, w)
        if params.subseed_strength > 0:
            subs = BatchNoise(subseeds, self.device).randn(shape)
            x = torch.stack([slerp(params.subseed_strength, a, b) for a, b in zip(x, subs, strict=True)])
        return x

    def _latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        d = self.cfg.vae.downscale
        return (self.cfg.unet.out_channels, height // d, width // d)

    def _txt2img(self, run: _Batch) -> torch.Tensor:
        params, conds, seeds = run.params, run.conds, run.seeds
        width, height, report = run.width, run.height, run.report
        noise = BatchNoise(seeds, self.device)
        x = self._initial_noise(noise, run.subseeds, params, self._latent_shape(width, height))
        sigmas = self._sigmas(params, params.steps)
        c_concat = self._empty_inpaint_concat(x.shape[0], width, height)
        if c_concat is not None:
            conds = tuple({**c, "c_concat": c_concat} for c in conds)
        latents = self._sample(params, x * sigmas[0], sigmas, conds, noise, blend=None,
                               report=lambda s, t, d=None: report(s, t, 1, d))  # fmt: skip
        if not params.enable_hr:
            return latents
        # hires fix: upscale, then an img2img pass at the larger size with fresh noise from the same seeds
        hr_w, hr_h = params.hires_size(self.cfg.resolution)
        noise2 = BatchNoise(seeds, self.device)
        if params.hr_upscaler.startswith("latent"):
            up = inpainting.upscale_latents(latents, self._latent_shape(hr_w, hr_h)[1:], params.hr_upscaler)
        else:
            up = self.encode_image(inpainting.upscale_images(self.decode(latents), hr_w, hr_h), noise2)
        steps2 = params.hr_second_pass_steps or params.steps
        sigmas2 = self._img2img_sigmas(params, steps2, params.hr_denoising_strength)
        x2 = up + noise2.randn(up.shape[1:]) * sigmas2[0]
        return self._sample(params, x2, sigmas2, run.hires_conds, noise2, blend=None,
                            report=lambda s, t, d=None: report(s, t, 2, d))  # fmt: skip

    def _empty_inpaint_concat(self, batch: int, width: int, height: int) -> torch.Tensor | None:
        """txt2img with an inpainting model: the whole image is masked and the masked image is empty."""
        if not self.cfg.is_inpaint:
            return None
        blank = torch.zeros(1, 3, height, width)
        z = self.encode_image(blank, None)
        mask = torch.ones(1, 1, *z.shape[2:])
        return torch.cat([mask, z], dim=1).expand(batch, -1, -1, -1).to(self.device)

    def _img2img(
        self, run: _Batch, init_image: Image.Image, plan: inpainting.MaskPlan | None
    ) -> torch.Tensor:
        params, conds, seeds = run.params, run.conds, run.seeds
        width, height, report = run.width, run.height, run.report
        img, mask_img = inpainting.prepare_init(params, init_image.convert("RGB"), plan, width, height)
        pixels = images.to_tensor(img).expand(len(seeds), -1, -1, -1)  # (B, 3, H, W)
        noise = BatchNoise(seeds, self.device)
        # An inpainting model at full strength starts from pure noise and never needs the init latent.
        from_noise = self.cfg.is_inpaint and mask_img is not None and params.denoising_strength >= 1.0
        init = None if from_noise else self.encode_image(pixels, noise)  # (B, 4, h, w)
        start_noise = self._initial_noise(noise, run.subseeds, params, self._latent_shape(width, height))
        sigmas = self._img2img_sigmas(params, params.steps, params.denoising_strength)
        blend = None
        if mask_img is not None:
            m = images.mask_to_tensor(mask_img)  # (1, 1, H, W), 1 = repaint
            m_lat = inpainting.latent_mask(mask_img, start_noise.shape[2:], self.device)  # (1, 1, h, w)
            if self.cfg.is_inpaint:  # the model sees the mask and the masked image as extra channels
                masked_lat = self.encode_image(pixels * (m < 0.5), noise)
                concat = torch.cat([m_lat.expand(len(seeds), -1, -1, -1), masked_lat], dim=1)
                conds = tuple({**c, "c_concat": concat} for c in conds)
            else:  # an ordinary model: keep re-imposing the (noised) known region before each step
                blend = inpainting.known_region_blend(m_lat, init.clone(), start_noise, _ve_noised)
            if init is not None:
                init = inpainting.fill_latent(init, m_lat, params.inpainting_fill, noise.randn)
        x = start_noise * sigmas[0] if init is None else init + start_noise * sigmas[0]
        return self._sample(
            params, x, sigmas, conds, noise, blend=blend, report=lambda s, t, d=None: report(s, t, 1, d)
        )

    # --- metadata ----------------------------------------------------------------------------

    @property
    def model_hash(self) -> str | None:
        """A1111 AutoV2 hash of the model file (computed once; None for folders)."""
        if self._hash is None and self.loaded.model_hash is not None:
            self._hash = self.loaded.model_hash
        if self._hash is None and self.loaded.path.is_file():
            from .checkpoints.hashes import autov2

            self._hash = autov2(self.loaded.path)
        return self._hash

    def info(
        self, params: GenerationParams, seed: int, subseed: int, *, img2img: bool, inpaint: bool = False
    ) -> GenerationInfo:
        """The A1111 infotext fields of one image."""
        width, height = params.size(self.cfg.resolution)
        sampler_id, schedule_id = self.resolve_sampler(params)
        sampler_name, schedule_name = a1111_names(
            sampler_id, schedule_id, zero_terminal_snr=self.cfg.zero_terminal_snr
        )
        extras = inpainting.infotext_extras(params, hires=params.enable_hr and not img2img, inpaint=inpaint)
        if params.cfg_rescale:
            extras["CFG Rescale phi"] = params.cfg_rescale
        return GenerationInfo(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            steps=params.steps,
            sampler=sampler_name,
            schedule_type=schedule_name,
            cfg_scale=params.cfg_scale,
            seed=seed,
            width=width,
            height=height,
            model_hash=self.model_hash,
            model=self.loaded.name,
            vae=self.loaded.vae_path.stem if self.loaded.vae_path else None,
            variation_seed=subseed if params.subseed_strength > 0 else None,
            variation_seed_strength=params.subseed_strength or None,
            denoising_strength=params.denoising_strength
            if img2img
            else (params.hr_denoising_strength if params.enable_hr else None),
            clip_skip=params.clip_skip,
            version=f"diffusekit {__version__}",
            extras=extras | self.accel.infotext() | self._path_infotext() | dict(params.extras),
        )
