"""txt2img, img2img, inpainting, outpainting and hires fix for SD3/SD3.5: three text encoders, the MMDiT,
flow-matching sampling.

Conditioning (Stability's ``sd3_infer.get_cond``, diffusers' ``encode_prompt``): the CLIP-L and CLIP-G
penultimate hidden states, concatenated on features (768 + 1280), zero-padded to the T5 width (4096),
followed on the sequence axis by the T5-XXL states (``t5_max_length`` tokens; zeros when T5 is off);
pooled = both CLIP pooled outputs (2048). The CLIP side takes A1111 prompt syntax and 75-token chunks
like the U-Net families ("plain" prompt mode: one truncated window, as diffusers).

Random numbers follow the U-Net pipeline: image i of a run uses seed + i through its own CPU generator,
and the initial latent is that generator's first standard-normal draw, as in diffusers. An SD3 MMDiT has
no mask input, so inpainting is the ordinary-model kind (as diffusers' ``StableDiffusion3InpaintPipeline``
with a 16-channel transformer): before every step the area outside the mask is reset to the init latent
noised to the step's level; the shared steps (mask blur, "only masked", paste-back, outpaint canvas,
hires upscalers) come from ``inpainting``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from . import __version__, images, inpainting
from .adapters.extra_networks import LoraLibrary, lora_hashes, prompt_loras, strip_extra_networks
from .adapters.lora import LoraNetwork, apply_loras
from .checkpoints.sd3 import LoadedSD3, assemble_sd3, read_sd3
from .diffusion.denoiser import CFGDenoiser, HookedDenoiser
from .diffusion.flow import FlowDenoiser, SkipLayerGuidance, flow_noise, flow_sampler, flow_sigmas
from .diffusion.schedules import img2img_sigmas
from .memory import MemoryEstimate, check_fits, resident_bytes
from .metadata import GenerationInfo
from .models.t5_tokenizer import SPIECE_NAMES, T5Tokenizer
from .models.tokenizer import CLIPTokenizer
from .models.vae_chunked import decode_peak_bytes
from .params import GenerationParams, ModelDefaults, seed_at
from .pipeline import BatchNoise, Cancelled, GenerationResult, Progress, ProgressCallback, Skipped, slerp
from .prompts import PromptEmbedding, encode_prompt, pad_to_same_length
from .runtime import ComputePath, PrecisionError, load_path

# Stability's recommended settings (sd3_infer.py CONFIGS) by preset name; detected files get SD3_DEFAULT.
SD3_DEFAULTS = {
    "sd3_medium": ModelDefaults(steps=28, cfg_scale=5.0, sampler="Euler"),
    "sd35_medium": ModelDefaults(steps=40, cfg_scale=5.0, sampler="Euler"),
    "sd35_large": ModelDefaults(steps=40, cfg_scale=4.5, sampler="Euler"),
    "sd35_large_turbo": ModelDefaults(steps=4, cfg_scale=1.0, sampler="Euler"),
}
SD3_DEFAULT = ModelDefaults(steps=28, cfg_scale=5.0, sampler="Euler")

# Token-planes of width hidden_size alive at once inside one joint block: residual streams, modulated
# copies, q/k/v of both streams, attention output, the 4x MLP hidden and its GELU. A count of the tensors,
# not yet calibrated against measured peaks as the U-Net's is (bench/memory_estimate.py).
MMDIT_WORKING_PLANES = 20


def mmdit_activation_bytes(
    cfg, width: int, height: int, batch: int, text_tokens: int, dtype_bytes: int
) -> int:
    """Rough activation bytes of one CFG MMDiT call (2 x batch), fused attention (no N x N scores)."""
    m = cfg.mmdit
    f = cfg.vae.downscale * m.patch_size
    tokens = (width // f) * (height // f) + text_tokens
    return 2 * batch * tokens * m.hidden_size * MMDIT_WORKING_PLANES * dtype_bytes


@dataclass(frozen=True)
class SD3Options:
    """SD3-only settings: flow shift, T5 use, skip-layer guidance (SD3.5 Medium: 2.5, layers 7-9)."""

    shift: float | None = None  # None: the model's (3.0 for SD3.5)
    use_t5: bool = True  # False: zeros in place of T5 (saves its ~9.5 GB in bf16)
    t5_max_length: int | None = None  # None: the model's (256)
    t5_tokenizer: str | Path | None = None  # spiece.model or its folder; default: beside the checkpoint
    t5_int8: bool = False  # dynamic int8 T5 Linears (accel.int8): about half T5's bf16 memory
    slg_scale: float = 0.0  # skip-layer guidance strength; 0 = off
    slg_layers: tuple[int, ...] = (7, 8, 9)
    slg_start: float = 0.01
    slg_end: float = 0.3
    extras: dict = field(default_factory=dict, compare=False)


def mmdit_parameters(cfg) -> int:
    """Parameters of an MMDiT config (built on the meta device: no memory)."""
    from .models.mmdit import MMDiT

    return sum(p.numel() for p in MMDiT(cfg, device="meta").parameters())


def find_t5_tokenizer(checkpoint: Path) -> Path | None:
    """A SentencePiece model next to the checkpoint: <stem>.spiece.model, spiece.model or tokenizer_3/."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent  # a diffusers folder: tokenizer_3/
    candidates = [checkpoint.with_suffix(".spiece.model")] if checkpoint.is_file() else []
    candidates += [folder / n for n in SPIECE_NAMES] + [folder / "tokenizer_3" / n for n in SPIECE_NAMES]
    return next((c for c in candidates if c.is_file()), None)


class SD3Pipeline(inpainting.ImageJobs):
    """A loaded SD3/SD3.5 model ready to generate."""

    def __init__(
        self,
        loaded: LoadedSD3,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        options: SD3Options | None = None,
        path: ComputePath | None = None,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model.to(device=device, dtype=dtype)
        self.cfg = loaded.cfg
        self.device = torch.device(device)
        self.dtype = dtype
        # what `generate --json` reports; the int8 and fp32-fast paths are U-Net pipeline paths only
        self.path = path or ComputePath(str(dtype).removeprefix("torch."), dtype, "dtype given")
        self.options = options or SD3Options()
        self.loras: LoraLibrary | None = None  # where <lora:NAME:...> prompt tags are looked up
        self.embeddings = None  # textual inversion: not supported for SD3 (set by the server, unused)
        self.lora_merge = True  # LoRAs as merged weight copies for a call (False: forward hooks)
        self.defaults = ModelDefaults.from_metadata(loaded.metadata, loaded.name)
        if ModelDefaults.METADATA_KEY not in loaded.metadata:
            self.defaults = SD3_DEFAULTS.get(self.cfg.name, SD3_DEFAULT)
        if self.model.clip_l is None or self.model.clip_g is None:
            raise ValueError(
                f"{loaded.name}: has no CLIP-L/CLIP-G text encoders; pass their files with --text-encoder"
            )
        self.tokenizer = CLIPTokenizer.bundled()
        self._bang: CLIPTokenizer | None = None  # built on first use ("plain" prompts, CLIP-G)
        self.t5_tokenizer = self._t5_tokenizer()
        if self.options.t5_int8 and self.t5_tokenizer is not None:
            from .accel.int8 import quantize_linears

            quantize_linears(self.model.t5, within=None)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        text_encoders: tuple = (),
        precision: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        options: SD3Options | None = None,
    ) -> SD3Pipeline:
        """Load an SD3 single file or folder (plus separate text encoder files) for generation, in the
        compute dtype `precision` picks for its MMDiT (see runtime.load_path); scaled-fp8 weights are
        dequantized straight to it."""
        if precision in ("int8", "fp32-fast", "openvino", "openvino-int8"):
            raise PrecisionError(
                f"--precision {precision} is a U-Net path; SD3 models run in auto, fp32, bf16 or fp16"
            )
        path = Path(path)
        sd, cfg, metadata = read_sd3(path, text_encoders=list(text_encoders), dequantize=False)
        chosen = load_path(precision, device, mmdit_parameters(cfg.mmdit), dtype=dtype, openvino=False)
        if chosen.name == "fp32-fast":  # auto on a CPU without bf16: plain fp32 for the MMDiT
            chosen = ComputePath("fp32", torch.float32, chosen.reason)
        loaded = assemble_sd3(path, sd, cfg, metadata, dtype=chosen.dtype)
        return cls(loaded, device=device, dtype=chosen.dtype, options=options, path=chosen)

    def _t5_tokenizer(self) -> T5Tokenizer | None:
        if not self.options.use_t5 or self.model.t5 is None:
            return None
        given = self.options.t5_tokenizer
        path = Path(given) if given is not None else find_t5_tokenizer(self.loaded.path)
        if path is None:
            raise ValueError(
                f"{self.loaded.name} has T5 weights but no T5 tokenizer was found (spiece.model beside it or "
                "in tokenizer_3/); pass --t5-tokenizer PATH, or --no-t5 to run without T5"
            )
        return T5Tokenizer(path)

    # --- conditioning ------------------------------------------------------------------------

    @property
    def uses_t5(self) -> bool:
        return self.t5_tokenizer is not None

    def _clip(self, prompt: str, params: GenerationParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 77n, 2048) CLIP-L|CLIP-G penultimate states and (1, 2048) pooled outputs."""
        kw = dict(clip_skip=params.clip_skip, mode=params.prompt_mode)
        parts = []
        for enc in (self.model.clip_l, self.model.clip_g):
            # "plain" (diffusers): an encoder padding with "!" gets a tokenizer that pads with it; the
            # A1111 modes pad after the EOS per encoder config themselves (prompts.pad_after_eos)
            bang = params.prompt_mode == "plain" and enc.cfg.pad_token_id != self.tokenizer.eos_id
            if bang and self._bang is None:
                self._bang = CLIPTokenizer.bundled(pad_token="!")
            tok = self._bang if bang else self.tokenizer
            parts.append(encode_prompt(prompt, tok, enc, **kw))
        context = torch.cat([p.context.float() for p in parts], dim=-1)
        pooled = torch.cat([p.pooled.float() for p in parts], dim=-1)
        return context, pooled

    def _t5(self, prompt: str) -> torch.Tensor:
        """(1, L, 4096) T5 states, or zeros when T5 is off."""
        length = self.options.t5_max_length or self.cfg.t5_max_length
        if self.t5_tokenizer is None:
            return torch.zeros(1, length, self.cfg.mmdit.context_dim, device=self.device)
        ids = self.t5_tokenizer([prompt], max_length=length).to(self.device)
        return self.model.t5(ids).float()

    def encode(self, params: GenerationParams) -> tuple[dict, dict]:
        """(cond, uncond) MMDiT conditioning dicts: context (1, 77n + L, 4096) and y (1, 2048)."""
        with torch.inference_mode():
            prompt, negative = (
                strip_extra_networks(params.prompt),
                strip_extra_networks(params.negative_prompt),
            )
            (c_ctx, c_pool), (u_ctx, u_pool) = self._clip(prompt, params), self._clip(negative, params)
            if c_ctx.shape[1] != u_ctx.shape[1]:
                empty = PromptEmbedding(self._clip("", params)[0])
                c, u = pad_to_same_length(PromptEmbedding(c_ctx), PromptEmbedding(u_ctx), empty)
                c_ctx, u_ctx = c.context, u.context
            out = []
            for ctx, pooled, text in ((c_ctx, c_pool, prompt), (u_ctx, u_pool, negative)):
                ctx = F.pad(ctx, (0, self.cfg.mmdit.context_dim - ctx.shape[-1]))  # (1, 77n, 4096)
                ctx = torch.cat([ctx, self._t5(text)], dim=1)
                out.append(
                    {"context": ctx.to(self.device, self.dtype), "y": pooled.to(self.device, self.dtype)}
                )
        return out[0], out[1]

    # --- sampling ----------------------------------------------------------------------------

    def mmdit_call(self, x: torch.Tensor, t: torch.Tensor, context, y, skip_layers=()) -> torch.Tensor:
        """One MMDiT evaluation in the pipeline dtype, float32 out."""
        return self.model.mmdit(x.to(self.dtype), t, context, y, skip_layers=skip_layers).float()

    def sigmas(self, steps: int, strength: float = 1.0) -> torch.Tensor:
        shift = self.options.shift if self.options.shift is not None else self.cfg.shift
        return flow_sigmas(steps, shift, denoise_strength=strength)

    def _denoiser(self, params: GenerationParams, sigmas: torch.Tensor):
        flow = FlowDenoiser(self.mmdit_call)
        o = self.options
        if o.slg_scale > 0 and params.cfg_scale != 1.0:
            return SkipLayerGuidance(flow, params.cfg_scale, sigmas, slg_scale=o.slg_scale,
                                     layers=o.slg_layers, start=o.slg_start, end=o.slg_end)  # fmt: skip
        return CFGDenoiser(flow, params.cfg_scale)

    def _sample(self, params, x, sigmas, conds, report, blend=None) -> torch.Tensor:
        """Run the flow sampler from x (at sigmas[0]); `blend` keeps an inpainting known region."""
        fn = flow_sampler(params.sampler)
        batch = x.shape[0]
        cond, uncond = ({k: v.expand(batch, *v.shape[1:]) for k, v in c.items()} for c in conds)
        model = self._denoiser(params, sigmas)
        if blend is not None:
            model = HookedDenoiser(model, pre=blend)
        with torch.inference_mode():
            out = fn(model, x, sigmas, extra_args={"cond": cond, "uncond": uncond},
                     callback=lambda info: report(info.index + 1, info.total, info.denoised))  # fmt: skip
            if blend is not None:  # the final latent keeps the known region exactly
                out = blend(out, sigmas.new_zeros((batch,)))
        return out

    # --- VAE ---------------------------------------------------------------------------------

    def encode_image(self, img: torch.Tensor, noise: BatchNoise | None = None) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> (B, 16, h, w) (z - shift) * scale latents: a posterior sample per image
        drawn from its generator (diffusers' order: before the initial noise), or the mean without `noise`."""
        v = self.cfg.vae
        with torch.inference_mode():
            post = self.model.vae.encode(img.to(self.device, self.dtype))
            mean, std = post.mean.float(), post.std.float()
            z = mean if noise is None else mean + std * noise.randn(tuple(mean.shape[1:]))
        return (z - v.shift_factor) * v.scaling_factor

    def img2img_sigmas(self, steps: int, strength: float, semantics: str) -> torch.Tensor:
        """The schedule tail an img2img run walks: A1111's step count, or diffusers' SD3 img2img
        (``get_timesteps``: the last steps * strength of a steps-step schedule, rounded as it rounds)."""
        if semantics == "diffusers":
            start = int(max(steps - min(steps * strength, steps), 0))
            if start >= steps:
                raise ValueError(
                    f"strength {strength} with {steps} steps leaves no step to run; raise either"
                )
            return self.sigmas(steps)[start:]
        return img2img_sigmas(self.sigmas, steps, strength, semantics=semantics)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """(B, 16, h, w) latents -> images: z / scale + shift, then the VAE decoder, one at a time."""
        v, out = self.cfg.vae, []
        with torch.inference_mode():
            for z in latents.split(1):
                z = (z / v.scaling_factor + v.shift_factor).to(self.device, self.dtype)
                out += images.to_pil(self.model.vae.decode(z).float())
        return out

    # --- generation --------------------------------------------------------------------------

    def memory_estimate(self, params: GenerationParams) -> MemoryEstimate:
        """Predicted peak of `generate(params)`: resident now plus the larger of MMDiT and VAE activations."""
        params = params.validate(self.cfg.resolution, self.defaults)
        width, height = self.output_size(params)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        nbytes = torch.finfo(self.dtype).bits // 8
        text = 77 + (self.options.t5_max_length or self.cfg.t5_max_length)
        return MemoryEstimate(
            resident=resident_bytes(weights),
            unet=mmdit_activation_bytes(self.cfg, width, height, params.batch_size, text, nbytes),
            vae=decode_peak_bytes(self.cfg.vae, width, height, nbytes, chunked=False),
        )

    def output_size(self, params: GenerationParams) -> tuple[int, int]:
        """The size of the images `generate(params)` returns: the hires size when hires fix is on."""
        if params.enable_hr:
            return params.hires_size(self.cfg.resolution)
        return params.size(self.cfg.resolution)

    def _check_size(self, width: int, height: int, what: str = "image") -> None:
        m = self.cfg.image_multiple
        if width % m or height % m:
            raise ValueError(f"SD3 {what} sides must be multiples of {m}, got {width}x{height}")
        p = self.cfg.mmdit.pos_embed_max_size * m
        if width > p or height > p:
            raise ValueError(f"{width}x{height} exceeds this model's position table ({p}x{p} at most)")

    def generate(
        self,
        params: GenerationParams,
        *,
        loras: Sequence[tuple[LoraNetwork, float, float]] = (),
        **kw,
    ) -> GenerationResult:
        """Generate with `loras` ((network, te weight, MMDiT weight), ...) and the prompt's <lora:...> tags
        applied to the MMDiT and the CLIP encoders for this call only (see `_generate` for the rest)."""
        active = list(loras) + prompt_loras(params.prompt, self.loras)
        if not active:
            return self._generate(params, **kw)
        hashes = lora_hashes(active)
        if hashes:
            params = params.replace(extras={**params.extras, "Lora hashes": hashes})
        with apply_loras(self.model, active, merge=self.lora_merge) as applied:
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
    ) -> GenerationResult:
        """txt2img (with hires fix), img2img with init_image, inpainting with init_image and mask;
        n_iter runs of batch_size images. `skip` ends the current batch at its x0 estimate (A1111's skip)."""
        params = params.validate(self.cfg.resolution, self.defaults)
        flow_sampler(params.sampler)  # an unknown or unsupported sampler fails before any work
        if str(getattr(params.schedule, "value", params.schedule)).lower() != "automatic":
            raise ValueError(
                f"SD3 uses its flow-matching schedule; schedule must be 'automatic', not {params.schedule!r}"
            )
        if init_image is not None:
            params.check_img2img()
        inpainting.check_mask(init_image, mask)
        hires = params.enable_hr and init_image is None
        width, height = params.size(self.cfg.resolution)
        self._check_size(width, height)
        final_w, final_h = self.output_size(params)
        if hires:
            self._check_size(final_w, final_h, what=f"hires size (x{params.hr_scale:g})")
        check_fits(self.memory_estimate(params), what=f"{final_w}x{final_h} x{params.batch_size}")
        seed = params.seed if params.seed >= 0 else random.randrange(2**32)
        subseed = params.subseed if params.subseed >= 0 else random.randrange(2**32)
        conds = self.encode(params)
        plan = None if mask is None else inpainting.plan_mask(params, init_image, mask, width, height)
        passes = 2 if hires else 1
        all_images, infos, all_seeds, all_latents = [], [], [], []
        for it in range(params.n_iter):
            first = it * params.batch_size  # image i: seed + i, wrapped into the valid range
            seeds = [seed_at(seed, first + j) for j in range(params.batch_size)]
            subseeds = [seed_at(subseed, first + j) for j in range(params.batch_size)]

            def report(step: int, total: int, pass_index: int = 1, denoised=None, _it: int = it) -> None:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("generation cancelled")
                if callback is not None:
                    callback(Progress(step, total, pass_index, passes, _it, denoised))
                if skip is not None and skip.is_set() and denoised is not None:
                    raise Skipped(denoised)

            if skip is not None:
                skip.clear()
            try:
                if init_image is None:
                    latents = self._txt2img(params, conds, seeds, subseeds, width, height, report)
                else:
                    latents = self._img2img(
                        params, conds, seeds, subseeds, init_image, plan, width, height, report
                    )
            except Skipped as skipped:  # A1111's skip: this batch ends at its latest x0 estimate
                latents = skipped.denoised.float()
            imgs = self.decode(latents)
            if plan is not None:  # unmasked pixels stay the original's
                imgs = plan.finish(imgs, init_image)
            all_images += imgs
            all_latents.append(latents.cpu())
            all_seeds += seeds
            infos += [
                self.info(params, s, sub, img2img=init_image is not None, inpaint=mask is not None)
                for s, sub in zip(seeds, subseeds, strict=True)
            ]
        return GenerationResult(all_images, infos, all_seeds, torch.cat(all_latents))

    def _latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        d = self.cfg.vae.downscale
        return (self.cfg.mmdit.in_channels, height // d, width // d)

    def _initial_noise(self, gens: BatchNoise, subseeds: list[int], params, shape) -> torch.Tensor:
        """(B, 16, h, w): each image's seed noise, slerped towards its variation-seed noise."""
        noise = gens.randn(shape)
        if params.subseed_strength > 0:
            subs = BatchNoise(subseeds, self.device).randn(shape)
            noise = torch.stack(
                [slerp(params.subseed_strength, a, b) for a, b in zip(noise, subs, strict=True)]
            )
        return noise

    def _txt2img(self, params, conds, seeds, subseeds, width, height, report) -> torch.Tensor:
        """Pure noise through the whole schedule; with hires fix, then an upscale and an img2img pass at the
        hires size with fresh draws from the same seeds (as the U-Net pipeline)."""
        gens = BatchNoise(seeds, self.device)
        sigmas = self.sigmas(params.steps)
        x = self._initial_noise(gens, subseeds, params, self._latent_shape(width, height)) * sigmas[0]
        latents = self._sample(params, x, sigmas.to(self.device), conds, lambda s, t, d: report(s, t, 1, d))
        if not params.enable_hr:
            return latents
        hr_w, hr_h = params.hires_size(self.cfg.resolution)
        gens2 = BatchNoise(seeds, self.device)
        if params.hr_upscaler.startswith("latent"):
            up = inpainting.upscale_latents(latents, self._latent_shape(hr_w, hr_h)[1:], params.hr_upscaler)
        else:  # decode, Lanczos, encode (a posterior sample per image: the first draw of the second pass)
            up = self.encode_image(inpainting.upscale_images(self.decode(latents), hr_w, hr_h), gens2)
        steps2 = params.hr_second_pass_steps or params.steps
        sigmas2 = self.img2img_sigmas(steps2, params.hr_denoising_strength, params.img2img_steps)
        x2 = flow_noise(up, gens2.randn(tuple(up.shape[1:])), float(sigmas2[0]))
        return self._sample(params, x2, sigmas2.to(self.device), conds, lambda s, t, d: report(s, t, 2, d))

    def _img2img(
        self, params, conds, seeds, subseeds, init_image, plan, width, height, report
    ) -> torch.Tensor:
        """The init image's latent noised to the strength's level; with a mask, only the masked area is
        generated (the rest is re-imposed before every step and at the end)."""
        img, mask_img = inpainting.prepare_init(params, init_image.convert("RGB"), plan, width, height)
        gens = BatchNoise(seeds, self.device)
        init = self.encode_image(images.to_tensor(img), gens)  # (B, 16, h, w); first draw: posterior
        noise = self._initial_noise(gens, subseeds, params, self._latent_shape(width, height))
        sigmas = self.img2img_sigmas(params.steps, params.denoising_strength, params.img2img_steps)
        blend = None
        if mask_img is not None:
            m_lat = inpainting.latent_mask(mask_img, noise.shape[2:], self.device)  # (1, 1, h, w)
            blend = inpainting.known_region_blend(m_lat, init.clone(), noise, flow_noise)
            init = inpainting.fill_latent(init, m_lat, params.inpainting_fill, gens.randn)
        x = flow_noise(init, noise, float(sigmas[0]))
        on_step = lambda s, t, d: report(s, t, 1, d)  # noqa: E731
        return self._sample(params, x, sigmas.to(self.device), conds, on_step, blend)

    def check_canvas(self, canvas: Image.Image) -> None:
        """An outpainted canvas must fit SD3's patch grid and position table (sides multiples of 16)."""
        self._check_size(*canvas.size, what="outpainted canvas (image plus pads)")

    def info(
        self, params: GenerationParams, seed: int, subseed: int, *, img2img: bool, inpaint: bool = False
    ) -> GenerationInfo:
        """The A1111 infotext fields of one image (plus the SD3 settings as extras)."""
        width, height = params.size(self.cfg.resolution)
        shift = self.options.shift if self.options.shift is not None else self.cfg.shift
        hires = params.enable_hr and not img2img
        extras: dict[str, object] = inpainting.infotext_extras(params, hires=hires, inpaint=inpaint)
        extras["Shift"] = shift
        if not self.uses_t5:
            extras["T5"] = "off"
        elif self.options.t5_int8:
            extras["T5"] = "int8"
        if self.options.slg_scale > 0:
            extras["SLG scale"] = self.options.slg_scale
            extras["SLG layers"] = str(list(self.options.slg_layers))
        label = flow_sampler(params.sampler).__name__
        names = {
            "sample_euler": "Euler",
            "sample_heun": "Heun",
            "sample_lms": "LMS",
            "sample_flow_dpmpp_2m": "DPM++ 2M",
        }
        return GenerationInfo(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            steps=params.steps,
            sampler=names[label],
            schedule_type="Automatic",
            cfg_scale=params.cfg_scale,
            seed=seed,
            width=width,
            height=height,
            model_hash=None,
            model=self.loaded.name,
            vae=None,
            variation_seed=subseed if params.subseed_strength > 0 else None,
            variation_seed_strength=params.subseed_strength or None,
            denoising_strength=params.denoising_strength
            if img2img
            else (params.hr_denoising_strength if hires else None),
            clip_skip=params.clip_skip,
            version=f"diffusekit {__version__}",
            extras=extras | dict(params.extras),
        )
