"""Pixels in and out: PIL <-> tensors, resizing modes, masks, "only masked" crops, outpainting pads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from .image_files import MAX_PIXELS, ImageError, load_image

RESIZE_MODES = ("resize", "crop", "fill")  # A1111: just resize, crop and resize, resize and fill
MAX_CANVAS = 4096  # the largest generated side (params.MAX_SIDE; params imports this module)
__all__ = ["MAX_PIXELS", "ImageError", "load_image"]  # re-exported: the one image reader


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (rounded to nearest, as diffusers does)."""
    x = ((x.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """L-mode mask -> (1, 1, H, W) float32 in [0, 1]; 1 = repaint."""
    arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None, None].contiguous()


def resize_image(img: Image.Image, width: int, height: int, mode: str = "resize") -> Image.Image:
    """Fit `img` to width x height: stretch, crop the overflow, or letterbox with stretched edges (A1111)."""
    if mode not in RESIZE_MODES:
        raise ImageError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    if img.size == (width, height):
        return img
    if mode == "resize":
        return img.resize((width, height), Image.Resampling.LANCZOS)
    scale = (max if mode == "crop" else min)(width / img.width, height / img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    resized = img.resize((w, h), Image.Resampling.LANCZOS)
    left, top = (width - w) // 2, (height - h) // 2
    if mode == "crop":  # cover the frame, cut the overflow centred
        return resized.crop((-left, -top, -left + width, -top + height))
    out = Image.new(img.mode, (width, height))
    out.paste(resized, (left, top))
    arr = np.asarray(out).copy()  # (H, W, C): stretch the edge rows/columns into the margins
    if left:
        arr[:, :left] = arr[:, left : left + 1]
        arr[:, left + w :] = arr[:, left + w - 1 : left + w]
    if top:
        arr[:top] = arr[top : top + 1]
        arr[top + h :] = arr[top + h - 1 : top + h]
    return Image.fromarray(arr)


def blur_mask(mask: Image.Image, radius: float) -> Image.Image:
    """Gaussian-blur the mask edge (A1111 "Mask blur"); radius 0 leaves it as is."""
    if radius < 0:
        raise ImageError(f"mask blur must be >= 0, got {radius}")
    mask = mask.convert("L")
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


@dataclass(frozen=True)
class CropRegion:
    """A box (left, top, right, bottom) in image pixels."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def size(self) -> tuple[int, int]:
        return self.right - self.left, self.bottom - self.top


def masked_region(mask: Image.Image, padding: int, target_w: int, target_h: int) -> CropRegion:
    """The mask's bounding box plus `padding`, widened to the target aspect (A1111 "only masked")."""
    box = mask.convert("L").point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        raise ImageError("the mask is empty: paint the area to repaint in white")
    w_img, h_img = mask.size
    left, top = max(box[0] - padding, 0), max(box[1] - padding, 0)
    right, bottom = min(box[2] + padding, w_img), min(box[3] + padding, h_img)
    ratio = target_w / target_h
    w, h = right - left, bottom - top
    if w / h < ratio:  # too narrow: widen
        grow = round(h * ratio) - w
        left, right = left - grow // 2, right + grow - grow // 2
        shift = max(0, -left) - max(0, right - w_img)
        left, right = max(0, left + shift), min(w_img, right + shift)
    else:  # too flat: heighten
        grow = round(w / ratio) - h
        top, bottom = top - grow // 2, bottom + grow - grow // 2
        shift = max(0, -top) - max(0, bottom - h_img)
        top, bottom = max(0, top + shift), min(h_img, bottom + shift)
    return CropRegion(left, top, right, bottom)


def paste_region(base: Image.Image, patch: Image.Image, region: CropRegion, mask: Image.Image) -> Image.Image:
    """Paste an inpainted crop back, blended through the (blurred) mask, so only masked pixels change."""
    patch = patch.resize(region.size, Image.Resampling.LANCZOS)
    out = base.copy()
    out.paste(
        patch,
        (region.left, region.top),
        mask.convert("L").crop((region.left, region.top, region.right, region.bottom)),
    )
    return out


def overlay_original(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting overlay: the original where the (blurred) mask is black, the generated image
    where it is white; the blurred edge, doubled as A1111 does, blends only inside the mask's side."""
    doubled = np.clip(np.asarray(mask.convert("L"), np.float32) * 2, 0, 255).astype(np.uint8)
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), Image.fromarray(doubled, "L"))


def outpaint_size(size: tuple[int, int], left: int, right: int, top: int, bottom: int) -> tuple[int, int]:
    """The canvas size an outpaint makes, checked before any pixels are allocated."""
    pads = {"left": left, "right": right, "top": top, "bottom": bottom}
    for side, pad in pads.items():
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ImageError(f"outpainting pad {side}={pad!r} is invalid; valid: whole pixels >= 0")
    if not any(pads.values()):
        raise ImageError("outpainting needs a pad: give at least one of left, right, top, bottom > 0 pixels")
    w, h = size[0] + left + right, size[1] + top + bottom
    if w > MAX_CANVAS or h > MAX_CANVAS or w % 8 or h % 8:
        raise ImageError(
            f"the outpainted canvas would be {w}x{h} (image {size[0]}x{size[1]} plus the pads); "
            f"valid: both sides multiples of 8 and at most {MAX_CANVAS}"
        )
    return w, h


def outpaint_canvas(
    img: Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0
) -> tuple[Image.Image, Image.Image]:
    """Pad `img` for outpainting: (canvas with edge-stretched fill, mask that is white over the new area)."""
    if min(left, right, top, bottom) < 0:
        raise ImageError("outpainting pads must be >= 0 pixels")
    w, h = img.size
    canvas = ImageOps.expand(img, border=(left, top, right, bottom), fill=(0, 0, 0))
    arr = np.asarray(canvas).copy()  # (H, W, 3): fill margins by repeating the nearest edge pixel
    if left:
        arr[:, :left] = arr[:, left : left + 1]
    if right:
        arr[:, left + w :] = arr[:, left + w - 1 : left + w]
    if top:
        arr[:top] = arr[top : top + 1]
    if bottom:
        arr[top + h :] = arr[top + h - 1 : top + h]
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + w, top + h))
    return Image.fromarray(arr), mask
