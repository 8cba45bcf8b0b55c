"""Inpainting, outpainting and hires-fix steps shared by the U-Net and SD3 pipelines.

The pipelines differ in their latents (4 or 16 channels, scale or scale-and-shift) and in how a latent is
noised (``x0 + sigma * noise`` for the U-Net families, ``(1 - sigma) * x0 + sigma * noise`` for flow
models); everything around that lives here once: mask checks, the mask plan (blur, A1111's "only masked"
crop, the original pasted back outside the mask), the init image and mask at the working size, the latent
mask, the known-region blend of non-inpainting models, the latent fills, the outpaint canvas, latent
upscaling for the hires fix, and the infotext fields these add.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from . import images
from .params import GenerationParams, ParamError

Noiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x0, noise, sigma) -> x_sigma
HIRES_UPSCALER_NAMES = {"latent": "Latent", "latent-nearest": "Latent (nearest)"}  # others: "Lanczos"


def check_mask(init_image: Image.Image | None, mask: Image.Image | None) -> None:
    """Raise a clear error unless `mask` (if any) fits `init_image` and paints something."""
    if mask is None:
        return
    if init_image is None:
        raise ValueError("a mask needs an init image to inpaint")
    if mask.size != init_image.size:
        raise images.ImageError(
            f"mask size {mask.size[0]}x{mask.size[1]} differs from image size "
            f"{init_image.size[0]}x{init_image.size[1]}; they must match"
        )
    if mask.convert("L").getbbox() is None:
        raise images.ImageError("the mask is empty (all black): paint the area to repaint in white")


@dataclass(frozen=True)
class MaskPlan:
    """An inpainting run's blurred mask (init image size), its "only masked" crop, and the original at the
    working size that is overlaid outside the mask when the whole picture is inpainted."""

    mask: Image.Image
    region: images.CropRegion | None
    original: Image.Image | None
    width: int
    height: int

    def finish(self, generated: list[Image.Image], init_image: Image.Image) -> list[Image.Image]:
        """The decoded images with every unmasked pixel the original's (A1111's paste-back)."""
        if self.region is not None:  # "only masked": paste the inpainted crop back through the mask
            base = init_image.convert("RGB")
            return [images.paste_region(base, im, self.region, self.mask) for im in generated]
        overlay = images.resize_image(self.mask, self.width, self.height, "resize")
        return [images.overlay_original(im, self.original, overlay) for im in generated]


def plan_mask(
    params: GenerationParams, init_image: Image.Image, mask: Image.Image, width: int, height: int
) -> MaskPlan:
    """Blur the mask (params.mask_blur) and choose the area to work on (params.inpaint_full_res)."""
    blurred = images.blur_mask(mask, params.mask_blur)
    if params.inpaint_full_res:
        region = images.masked_region(blurred, params.inpaint_full_res_padding, width, height)
        return MaskPlan(blurred, region, None, width, height)
    original = images.resize_image(init_image.convert("RGB"), width, height, "resize")
    return MaskPlan(blurred, None, original, width, height)


def prepare_init(
    params: GenerationParams,
    init_image: Image.Image,
    plan: MaskPlan | None,
    width: int,
    height: int,
) -> tuple[Image.Image, Image.Image | None]:
    """The init image and mask at the working size (the crop around the mask with a region); the
    "fill" inpainting fill blurs the image under the mask first."""
    mask = None if plan is None else plan.mask
    if plan is not None and plan.region is not None:
        r = plan.region
        init_image, mask = (
            init_image.crop((r.left, r.top, r.right, r.bottom)),
            mask.crop((r.left, r.top, r.right, r.bottom)),
        )
    img = images.resize_image(init_image, width, height, "resize" if mask is not None else params.resize_mode)
    if mask is not None:
        mask = images.resize_image(mask.convert("L"), width, height, "resize")
        if params.inpainting_fill == "fill":
            blurred = img.filter(ImageFilter.GaussianBlur(max(width, height) / 8))
            img = Image.composite(blurred, img, mask.point(lambda v: 255 if v > 127 else 0))
    return img, mask


def latent_mask(mask: Image.Image, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(1, 1, h, w) mask at the latent size (nearest, as diffusers), 1 = repaint."""
    return F.interpolate(images.mask_to_tensor(mask), size=size).to(device)


def known_region_blend(
    m_lat: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor, noised: Noiser
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``pre(x, sigma)`` hook for ordinary (non-inpainting) models: outside the mask, x becomes the init
    latent noised to sigma with the run's initial noise, so only the masked area is generated."""

    def blend(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # x: (B, C, h, w), sigma: (B,)
        known = noised(keep, noise, sigma.view(-1, 1, 1, 1).to(keep))
        return (1 - m_lat) * known + m_lat * x

    return blend


def fill_latent(
    init: torch.Tensor, m_lat: torch.Tensor, fill: str, randn: Callable[[tuple[int, ...]], torch.Tensor]
) -> torch.Tensor:
    """The init latent under the mask for the latent fills: zeros ("latent_nothing") or fresh noise
    ("latent_noise", drawn per image by `randn`); "original" and "fill" keep it."""
    if fill == "latent_nothing":
        return init * (1 - m_lat)
    if fill == "latent_noise":
        return init * (1 - m_lat) + randn(tuple(init.shape[1:])) * m_lat
    return init


def outpaint_request(
    params: GenerationParams, image: Image.Image, left: int, right: int, top: int, bottom: int
) -> tuple[GenerationParams, Image.Image, Image.Image]:
    """(params at the canvas size, canvas with stretched edges, mask over the new area) for an outpaint;
    a width/height in `params` other than the canvas's is an error."""
    w, h = images.outpaint_size(image.size, left, right, top, bottom)  # validated before any pixels
    for name, given, size in (("width", params.width, w), ("height", params.height, h)):
        if given is not None and given != size:
            raise ParamError(
                f"{name}={given!r} conflicts with outpainting, whose size is the image plus the pads "
                f"({w}x{h}); leave it out",
                name, given, f"{size} or unset",
            )  # fmt: skip
    canvas, mask = images.outpaint_canvas(image.convert("RGB"), left, right, top, bottom)
    return params.replace(width=w, height=h), canvas, mask


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], upscaler: str) -> torch.Tensor:
    """Hires fix's latent upscalers: (B, C, h, w) -> (B, C, *size), bilinear ("latent") or nearest."""
    if upscaler == "latent-nearest":
        return F.interpolate(latents, size=size, mode="nearest")
    return F.interpolate(latents, size=size, mode="bilinear", align_corners=False)


def upscale_images(decoded: list[Image.Image], width: int, height: int) -> torch.Tensor:
    """Hires fix's image upscaler: Lanczos to width x height, as one (B, 3, H, W) tensor in [-1, 1]."""
    return torch.cat(
        [images.to_tensor(im.resize((width, height), Image.Resampling.LANCZOS)) for im in decoded]
    )


def infotext_extras(params: GenerationParams, *, hires: bool, inpaint: bool) -> dict[str, object]:
    """The infotext fields of a hires fix and of inpainting (A1111's names)."""
    extras: dict[str, object] = {}
    if hires:
        extras["Hires upscale"] = params.hr_scale
        if params.hr_second_pass_steps:
            extras["Hires steps"] = params.hr_second_pass_steps
        extras["Hires upscaler"] = HIRES_UPSCALER_NAMES.get(params.hr_upscaler, "Lanczos")
    if inpaint:
        extras["Mask blur"] = params.mask_blur
        if params.inpaint_full_res:
            extras["Inpaint area"] = "Only masked"
            extras["Masked area padding"] = params.inpaint_full_res_padding
    return extras


class ImageJobs:
    """txt2img, img2img, inpaint and outpaint as calls of the pipeline's ``generate``: one definition for the
    U-Net and the SD3 pipelines (a pipeline checks an outpainted canvas in ``check_canvas``)."""

    def txt2img(self, params: GenerationParams, **kw):
        return self.generate(params, **kw)

    def img2img(self, params: GenerationParams, image: Image.Image, **kw):
        return self.generate(params, init_image=image, **kw)

    def inpaint(self, params: GenerationParams, image: Image.Image, mask: Image.Image, **kw):
        return self.generate(params, init_image=image, mask=mask, **kw)

    def outpaint(
        self,
        params: GenerationParams,
        image: Image.Image,
        *,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        **kw,
    ):
        """Extend the canvas by the given pixels and inpaint the new area (edges stretched as a start).

        The output size is the image plus the pads; a width/height in `params` other than that is an error.
        """
        params, canvas, mask = outpaint_request(params, image, left, right, top, bottom)
        self.check_canvas(canvas)
        return self.generate(params, init_image=canvas, mask=mask, **kw)

    def check_canvas(self, canvas: Image.Image) -> None:
        """Refuse an outpainted canvas this pipeline cannot run (none refused by default)."""
