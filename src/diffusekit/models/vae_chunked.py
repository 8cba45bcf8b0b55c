"""Exact, memory-lean AutoencoderKL decode and encode for large images.

The plain ``AutoencoderKL.decode`` keeps several full-resolution temporaries alive at once (GroupNorm
output, SiLU output, the 2x-upsampled tensor, the conv's padded input, the residual sum). Here every
full-resolution layer is computed in horizontal row strips instead, without changing the math:

* GroupNorm is the only non-local op outside the mid-block attention. Its statistics are computed
  exactly over the whole tensor (per sample and group, strip by strip in float32, merged with Chan's
  parallel-variance formula in float64), then normalize + affine + SiLU + conv run per output strip,
  reading the input rows plus the halo the conv needs; zero padding happens only at the true image
  edges. Nearest-2x upsample + conv and the stride-2 downsample (pad right/bottom) work the same way.
* Only layer outputs are materialized (preallocated, written strip by strip). A ResnetBlock's output
  reuses its input's storage (each output row only depends on the same input rows once ``conv1``
  is done), so a block holds its input and ``conv1``'s output, nothing else at full size.
* The mid block (attention, at latent size) runs the module code, except that a large attention
  runs with a head axis so that SDPA can use its fused kernel (see ``_mid``). It and every layer
  whose whole tensor fits in one strip run the ordinary module code, so small images give
  bit-identical results.

The strip height is derived from a byte budget (``strip_bytes``), so the working set beyond the
materialized layer outputs is bounded regardless of image size. Inference only (no autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import VAEConfig
from .vae import AttnBlock, AutoencoderKL, DiagonalGaussian, MidBlock, ResnetBlock

DEFAULT_STRIP_BYTES = 16 * 2**20  # larger strips gain little speed and fragment glibc heaps (RSS)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _rows_per_strip(x: torch.Tensor, c_out: int, stride: int, upsample: bool, strip_bytes: int) -> int:
    """Output rows per strip so that one strip's temporaries take about `strip_bytes`."""
    b, c, _, w = x.shape
    w_in = 2 * w if upsample else w  # the (virtual) conv input width
    w_out = w_in // stride
    esize = x.element_size()
    # per output row, generously: `stride` input rows normalized in float32, cast, upsampled or padded
    # and reordered by the conv backend; then the conv output, the shortcut and its 1x1 conv
    per_row = b * (c * w_in * stride * (8 + 2 * esize) + 3 * c_out * w_out * esize)
    return max(1, strip_bytes // max(per_row, 1))


def _group_stats(x: torch.Tensor, norm: nn.GroupNorm, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-(sample, group) mean and 1/sqrt(var + eps) of (B, C, H, W) `x`, each (B, G) float."""
    b, c, h, _ = x.shape
    g = norm.num_groups
    acc = torch.float32 if x.device.type == "mps" else torch.float64  # mps has no float64
    mean = x.new_zeros((b, g), dtype=acc)
    m2 = x.new_zeros((b, g), dtype=acc)
    n = 0
    for a in range(0, h, rows):
        s = x[:, :, a : a + rows].to(torch.float32).unflatten(1, (g, c // g))  # (B, G, C/G, r, W)
        var_s, mean_s = torch.var_mean(s, dim=(2, 3, 4), correction=0)  # (B, G) each
        n_s = s[0, 0].numel()
        delta = mean_s.to(acc) - mean
        total = n + n_s
        mean += delta * (n_s / total)  # Chan et al.: merge (n, mean, M2) with the strip's
        m2 += var_s.to(acc) * n_s + delta.square() * (n * n_s / total)
        n = total
    return mean.float(), torch.rsqrt(m2 / n + norm.eps).float()


def _norm_affine(x: torch.Tensor, norm: nn.GroupNorm, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm of the whole `x` as a per-channel scale and shift, (B, C, 1, 1) float32 each."""
    mean, rstd = _group_stats(x, norm, rows)
    per = x.shape[1] // norm.num_groups
    mean, rstd = mean.repeat_interleave(per, dim=1), rstd.repeat_interleave(per, dim=1)  # (B, C)
    scale = rstd * norm.weight.float()
    shift = norm.bias.float() - mean * scale  # same form as PyTorch's kernel: x * scale + shift
    return scale[:, :, None, None], shift[:, :, None, None]


def _strip_conv(
    x: torch.Tensor,
    conv: nn.Conv2d,
    rows: int,
    *,
    pad: tuple[int, int, int, int] | None = None,
    norm: nn.GroupNorm | None = None,
    upsample: bool = False,
    out: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
    skip_conv: nn.Conv2d | None = None,
) -> torch.Tensor:
    """``out = conv(pad(up(silu(norm(x))))) [+ skip_conv(skip)]``, `rows` output rows at a time.

    `pad` is (left, right, top, bottom) zero padding of the conv input (default: the conv's own
    symmetric padding); `up` is nearest 2x when `upsample`. (B, C, H, W) -> (B, Cout, Ho, Wo).
    """
    b, _, h, w = x.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    left, right, top, bottom = pad if pad is not None else (conv.padding[1],) * 2 + (conv.padding[0],) * 2
    hv, wv = (2 * h, 2 * w) if upsample else (h, w)  # conv input size before padding
    ho, wo = (hv + top + bottom - kh) // sh + 1, (wv + left + right - kw) // sw + 1
    if out is None:
        shape = (b, conv.out_channels, ho, wo)
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    affine = _norm_affine(x, norm, rows) if norm is not None else None
    for a in range(0, ho, rows):
        e = min(a + rows, ho)
        vlo, vhi = a * sh - top, (e - 1) * sh - top + kh  # conv input rows needed, in padded coordinates
        lo, hi = max(vlo, 0), min(vhi, hv)  # ... the part inside the image
        src = x[:, :, lo // 2 : (hi + 1) // 2] if upsample else x[:, :, lo:hi]
        if affine is not None:  # pointwise, so it commutes with the nearest upsample: apply it first
            src = torch.addcmul(affine[1], src, affine[0])  # float32 (type promotion), a new tensor
            src = F.silu(src.to(x.dtype), inplace=True)  # rounded to x.dtype before SiLU, like GroupNorm
        if upsample:  # (B, C, r, W) -> (B, C, 2r, 2W), then drop the row before `lo` if it is odd
            src = F.interpolate(src, scale_factor=2.0, mode="nearest")
            src = src[:, :, lo % 2 : lo % 2 + hi - lo]
        if left == right:  # zero rows only beyond the image edges; the conv pads the width itself
            if lo - vlo or vhi - hi:
                src = F.pad(src, (0, 0, lo - vlo, vhi - hi))
            y = F.conv2d(src, conv.weight, conv.bias, stride=conv.stride, padding=(0, left))
        else:
            y = F.conv2d(F.pad(src, (left, right, lo - vlo, vhi - hi)), conv.weight, conv.bias, conv.stride)
        del src  # (B, Cout, e - a, Wo) `y` is all this strip still needs
        if skip is not None:  # `skip + h` as ResnetBlock adds it (float addition commutes exactly)
            s = skip[:, :, a:e]
            y += s if skip_conv is None else skip_conv(s)
        out[:, :, a:e] = y
    return out


def _resnet_block(blk: ResnetBlock, x: torch.Tensor, strip_bytes: int) -> torch.Tensor:
    """ResnetBlock in strips, (B, Cin, H, W) -> (B, Cout, H, W); consumes `x` (the output may reuse it)."""
    b, c_in, h, w = x.shape
    c_out = blk.conv1.out_channels
    rows = _rows_per_strip(x, max(c_in, c_out), 1, False, strip_bytes)
    if rows >= h:
        return blk(x)
    h1 = _strip_conv(x, blk.conv1, rows, norm=blk.norm1)
    fmt = _memory_format(x)
    out = None
    # Output row r depends only on input rows r (shortcut) once conv1 is done, so writing strip
    # [a, e) over input rows [a, e) is safe when the row maps onto rows already read. That holds for
    # equal widths, for NCHW (same row of another plane) and for channels-last with one sample.
    if c_out <= c_in and (c_out == c_in or fmt == torch.contiguous_format or b == 1):
        if x.is_contiguous(memory_format=fmt):
            nchw = fmt == torch.contiguous_format
            stride = (c_out * h * w, h * w, w, 1) if nchw else (h * w * c_out, 1, w * c_out, c_out)
            out = x.as_strided((b, c_out, h, w), stride, x.storage_offset())
    return _strip_conv(h1, blk.conv2, rows, norm=blk.norm2, out=out, skip=x, skip_conv=blk.nin_shortcut)


def _conv(
    x: torch.Tensor,
    conv: nn.Conv2d,
    strip_bytes: int,
    *,
    norm: nn.GroupNorm | None = None,
    upsample: bool = False,
    pad: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """One conv layer (optionally preceded by GroupNorm+SiLU or nearest-2x) in strips, or whole if small."""
    rows = _rows_per_strip(x, conv.out_channels, conv.stride[0], upsample, strip_bytes)
    if rows * conv.stride[0] >= (2 * x.shape[2] if upsample else x.shape[2]):  # one strip: module code
        if norm is not None:
            x = F.silu(norm(x))
        if upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return conv(F.pad(x, pad) if pad is not None else x)
    return _strip_conv(x, conv, rows, pad=pad, norm=norm, upsample=upsample)


def _mid(mid: MidBlock, x: torch.Tensor, strip_bytes: int) -> torch.Tensor:
    """The mid block, unchanged unless its (HW, HW) attention matrix would exceed `strip_bytes`.

    Then the attention gets a head axis and C-contiguous rows, (B, 1, HW, C): PyTorch's fused SDPA
    kernels (flash on CPU) need 4-D inputs with a contiguous last dim; the (B, HW, C) transposed
    views of ``AttnBlock.forward`` take the math path, which materializes the whole attention matrix
    (810 MiB for a 768 x 768 image in bf16; this runs in 10 MiB). Same math.
    """
    b, c, h, w = x.shape
    x = mid.block_1(x)
    attn: AttnBlock = mid.attn_1
    if b * (h * w) ** 2 * x.element_size() <= strip_bytes:
        return mid.block_2(attn(x))
    y = attn.norm(x)
    q, k, v = (m(y).flatten(2).transpose(1, 2).contiguous().unsqueeze(1) for m in (attn.q, attn.k, attn.v))
    del y
    out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).unflatten(2, (h, w))
    return mid.block_2(x + attn.proj_out(out))  # (B, C, h, w)


@torch.no_grad()
def decode_chunked(
    vae: AutoencoderKL, z: torch.Tensor, *, strip_bytes: int = DEFAULT_STRIP_BYTES
) -> torch.Tensor:
    """Same as ``vae.decode(z)`` up to float rounding: (B, embed_dim, h, w) -> (B, 3, h*f, w*f) image.

    Peak memory beyond the weights is about ``decode_peak_bytes(vae.cfg, ..., chunked=True)``.
    """
    cfg = vae.cfg
    if z.ndim != 4 or z.shape[1] != cfg.embed_dim:
        raise ValueError(f"decode expects (B, {cfg.embed_dim}, h, w) latents, got {tuple(z.shape)}")
    dec = vae.decoder
    z = z if vae.post_quant_conv is None else vae.post_quant_conv(z)
    h = _mid(dec.mid, _conv(z, dec.conv_in, strip_bytes), strip_bytes)  # (B, C, h, w)
    for level in reversed(dec.up):
        for blk in level.block:
            h = _resnet_block(blk, h, strip_bytes)
        if level.upsample is not None:  # (B, C, H, W) -> (B, C, 2H, 2W)
            h = _conv(h, level.upsample.conv, strip_bytes, upsample=True)
    return _conv(h, dec.conv_out, strip_bytes, norm=dec.norm_out)


@torch.no_grad()
def encode_moments_chunked(
    vae: AutoencoderKL, x: torch.Tensor, *, strip_bytes: int = DEFAULT_STRIP_BYTES
) -> torch.Tensor:
    """Same as ``vae.encode_moments(x)`` up to float rounding: (B, 3, H, W) -> (B, 2*embed_dim, H/f, W/f)."""
    enc = vae.encoder
    h = _conv(x, enc.conv_in, strip_bytes)  # (B, ch, H, W)
    for level in enc.down:
        for blk in level.block:
            h = _resnet_block(blk, h, strip_bytes)
        if level.downsample is not None:  # pad (0, 1, 0, 1) then stride 2: (B, C, H, W) -> (B, C, H/2, W/2)
            h = _conv(h, level.downsample.conv, strip_bytes, pad=(0, 1, 0, 1))
    h = _mid(enc.mid, h, strip_bytes)
    moments = _conv(h, enc.conv_out, strip_bytes, norm=enc.norm_out)
    return moments if vae.quant_conv is None else vae.quant_conv(moments)


def encode_chunked(
    vae: AutoencoderKL, x: torch.Tensor, *, strip_bytes: int = DEFAULT_STRIP_BYTES
) -> DiagonalGaussian:
    """Same as ``vae.encode(x)`` up to float rounding: (B, 3, H, W) in [-1, 1] -> posterior over
    (B, embed_dim, H/f, W/f) latents."""
    cfg = vae.cfg
    f = cfg.downscale
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"encode expects (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
    if x.shape[-2] % f or x.shape[-1] % f:
        raise ValueError(f"encode needs H and W divisible by {f}, got {tuple(x.shape[-2:])}")
    return DiagonalGaussian.from_moments(encode_moments_chunked(vae, x, strip_bytes=strip_bytes))


def decode_peak_bytes(
    cfg: VAEConfig,
    width: int,
    height: int,
    dtype_bytes: int,
    *,
    batch: int = 1,
    chunked: bool = False,
    strip_bytes: int = DEFAULT_STRIP_BYTES,
) -> int:
    """Rough peak activation memory of decoding `batch` images of width x height (weights excluded).

    Counts the full-size tensors alive at once, per layer: plain decode holds a block's input, the
    norm/SiLU temporaries and the conv outputs, or the mid block's attention matrix if larger;
    chunked decode holds the block input (whose storage the output reuses) and conv1's output, plus
    one strip's working set. Convolution backends and the allocator add some on top (measured on
    CPU in bf16: RSS 5-15% above the chunked estimate, 40% above the plain one).
    """
    n, f = len(cfg.ch_mult), cfg.downscale
    pix = [(height // f * 2 ** (n - 1 - i)) * (width // f * 2 ** (n - 1 - i)) for i in range(n)]
    c_in = held = cfg.ch * cfg.ch_mult[-1]  # `held`: channels of the storage a chunked block writes into
    planes = 0  # the peak, in channel-planes times pixels
    for i in reversed(range(n)):
        c_out = cfg.ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            c = c_in if j == 0 else c_out
            if chunked:  # the block input's storage (the output reuses it) and conv1's output
                held = max(held, c_out)
                planes = max(planes, (held + c_out) * pix[i])
            else:  # the level's input (Decoder.forward keeps it), the block input, norm/SiLU/conv outputs
                planes = max(planes, ((c_in if j else 0) + max(2 * c + c_out, c + 3 * c_out)) * pix[i])
        if i:  # upsample: its input (plain: and the level's input), (interpolated,) conv output
            low = held if chunked else c_in + c_out
            planes = max(planes, low * pix[i] + (1 if chunked else 2) * c_out * pix[i - 1])
            held = c_out
        c_in = c_out
    last = held if chunked else 3 * c_out  # norm_out's input (plain: and its norm/SiLU outputs)
    planes = max(planes, (last + cfg.out_ch) * pix[0])
    if chunked:
        return batch * dtype_bytes * planes + strip_bytes
    # plain: the mid block's SDPA math path holds (HW, HW) scores and softmax, ~10 bytes an entry
    # (measured on CPU in bf16 and fp32)
    return batch * max(dtype_bytes * planes, 10 * pix[-1] ** 2)


def should_chunk(
    cfg: VAEConfig, width: int, height: int, dtype_bytes: int, budget: int, batch: int = 1
) -> bool:
    """True when the plain decode's estimated activation peak exceeds `budget` bytes."""
    return decode_peak_bytes(cfg, width, height, dtype_bytes, batch=batch) > budget
