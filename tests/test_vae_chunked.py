"""Chunked (row-strip) VAE decode/encode: equal to the plain AutoencoderKL up to rounding, and leaner."""

from __future__ import annotations

import weakref
from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from diffusekit.models import vae_chunked
from diffusekit.models.configs import DEFAULT, SD1, TINY_SD1, VAEConfig
from diffusekit.models.init import randomize_
from diffusekit.models.vae import AutoencoderKL
from diffusekit.models.vae_chunked import (
    decode_chunked,
    decode_peak_bytes,
    encode_chunked,
    should_chunk,
)

TOL = 1e-4  # max |chunked - plain| / max |plain|, fp32
CONFIGS = {
    "tiny": TINY_SD1.vae,
    "default": DEFAULT.vae,  # 4x downsampling
    "f8_z16": replace(DEFAULT.vae, ch_mult=(1, 2, 2, 2), z_channels=16, embed_dim=16),
}
STRIPS = [1, 150_000]  # one row per strip everywhere; a few rows, not dividing the heights


@pytest.fixture(autouse=True)
def _one_thread():
    """Hundreds of tiny strip ops: threads only add synchronization (and contend with other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def make_vae(cfg: VAEConfig, *, gain: float = 1.0) -> AutoencoderKL:
    """Seeded random VAE; `gain` scales every conv weight and gives norms large shifts (big activations)."""
    vae = randomize_(AutoencoderKL(cfg).eval(), 0)
    if gain != 1.0:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in vae.named_parameters():
                if p.ndim == 4:
                    p.mul_(gain)
                elif ".norm" in name and name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return vae


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def vae(request: pytest.FixtureRequest) -> AutoencoderKL:
    return make_vae(CONFIGS[request.param])


@pytest.mark.parametrize("strip_bytes", STRIPS)
@pytest.mark.parametrize("hw", [(5, 7), (9, 4)], ids=["5x7", "9x4"])
def test_decode_matches_plain(vae: AutoencoderKL, hw: tuple[int, int], strip_bytes: int) -> None:
    z = torch.randn(2, vae.cfg.embed_dim, *hw)
    with torch.no_grad():
        ref = vae.decode(z)
    out = decode_chunked(vae, z, strip_bytes=strip_bytes)
    f = vae.cfg.downscale
    assert out.shape == ref.shape == (2, 3, hw[0] * f, hw[1] * f)
    assert ref.abs().max() > 0.1, "reference output is degenerate"
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("strip_bytes", STRIPS)
@pytest.mark.parametrize("hw", [(40, 56), (72, 32)], ids=["40x56", "72x32"])
def test_encode_matches_plain(vae: AutoencoderKL, hw: tuple[int, int], strip_bytes: int) -> None:
    x = torch.rand(2, 3, *hw) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(x)
    post = encode_chunked(vae, x, strip_bytes=strip_bytes)
    f = vae.cfg.downscale
    assert post.mean.shape == ref.mean.shape == (2, vae.cfg.embed_dim, hw[0] // f, hw[1] // f)
    for name, a, b in [("mean", post.mean, ref.mean), ("logvar", post.logvar, ref.logvar)]:
        assert b.abs().max() > 0.1, f"{name}: reference is degenerate"
        assert rel_err(a, b) <= TOL, f"{name}: relative error {rel_err(a, b):.2e}"


def test_large_activations_match() -> None:
    vae = make_vae(CONFIGS["f8_z16"], gain=3.0)
    z, x = torch.randn(2, 16, 6, 5), torch.rand(2, 3, 48, 40) * 2 - 1
    with torch.no_grad():
        ref, post_ref = vae.decode(z), vae.encode(x)
    assert ref.abs().max() > 3 and post_ref.mean.abs().max() > 3  # activations well above O(1)
    for sb in STRIPS:
        post = encode_chunked(vae, x, strip_bytes=sb)
        assert rel_err(decode_chunked(vae, z, strip_bytes=sb), ref) <= TOL
        assert rel_err(post.mean, post_ref.mean) <= TOL and rel_err(post.logvar, post_ref.logvar) <= TOL


def test_bf16_within_bf16_noise() -> None:
    vae32 = make_vae(CONFIGS["f8_z16"])
    vae16 = make_vae(CONFIGS["f8_z16"]).to(torch.bfloat16)
    z, x = torch.randn(2, 16, 5, 7), torch.rand(2, 3, 56, 40) * 2 - 1
    with torch.no_grad():
        ref32, ref16 = vae32.decode(z), vae16.decode(z.bfloat16())
        post32, post16 = vae32.encode(x), vae16.encode(x.bfloat16())
    out = decode_chunked(vae16, z.bfloat16(), strip_bytes=1)
    post = encode_chunked(vae16, x.bfloat16(), strip_bytes=1)
    assert out.dtype == post.mean.dtype == torch.bfloat16
    for a, b16, b32 in [(out, ref16, ref32), (post.mean, post16.mean, post32.mean)]:
        assert rel_err(a, b16) <= 3e-2  # a few bf16 ulps of the output range
        assert rel_err(a, b32) <= 2 * rel_err(b16, b32) + 1e-2  # as close to fp32 as plain bf16 is


@pytest.mark.parametrize("batch", [1, 2])
def test_channels_last(batch: int) -> None:
    vae = make_vae(TINY_SD1.vae)
    vae_cl = make_vae(TINY_SD1.vae).to(memory_format=torch.channels_last)
    z = torch.randn(batch, 4, 6, 5)
    x = torch.rand(batch, 3, 40, 48) * 2 - 1
    with torch.no_grad():
        ref, post_ref = vae.decode(z), vae.encode(x)
    out = decode_chunked(vae_cl, z.to(memory_format=torch.channels_last), strip_bytes=1)
    post = encode_chunked(vae_cl, x.to(memory_format=torch.channels_last), strip_bytes=1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) <= TOL and rel_err(post.mean, post_ref.mean) <= TOL


def test_strips_do_not_divide_heights(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []  # (output height, rows per strip) of every strip-wise layer
    inner = vae_chunked._strip_conv

    def spy(x: torch.Tensor, conv: torch.nn.Conv2d, rows: int, **kw) -> torch.Tensor:
        out = inner(x, conv, rows, **kw)
        seen.append((out.shape[2], rows))
        return out

    monkeypatch.setattr(vae_chunked, "_strip_conv", spy)
    vae = make_vae(TINY_SD1.vae)
    decode_chunked(vae, torch.randn(2, 4, 9, 4), strip_bytes=STRIPS[1])
    assert any(1 < rows < h and h % rows for h, rows in seen)


def test_small_images_run_the_module_code() -> None:
    vae = make_vae(TINY_SD1.vae)
    z, x = torch.randn(2, 4, 5, 7), torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        assert torch.equal(decode_chunked(vae, z), vae.decode(z))
        assert torch.equal(encode_chunked(vae, x).mean, vae.encode(x).mean)


def test_rejects_bad_shapes() -> None:
    vae = make_vae(TINY_SD1.vae)
    with pytest.raises(ValueError, match="latents"):
        decode_chunked(vae, torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        encode_chunked(vae, torch.randn(1, 3, 36, 40))


class LiveBytes(TorchFunctionMode):
    """Peak bytes of the storages that torch functions inside the mode returned and Python still references.

    (A TorchFunctionMode rather than a dispatch mode: entering one of those imports torch._dynamo, ~2 s.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors]
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live:
                    self.live[key] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.live[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out


def test_chunked_decode_bounds_memory() -> None:
    cfg, strip_bytes = TINY_SD1.vae, 100_000
    vae = make_vae(cfg)
    z = torch.randn(2, 4, 12, 8)  # a 96 x 64 image, fp32
    peaks = {}
    for name, fn in [
        ("plain", vae.decode),
        ("chunked", lambda z: decode_chunked(vae, z, strip_bytes=strip_bytes)),
    ]:
        with torch.no_grad(), LiveBytes() as probe:
            fn(z)
        peaks[name] = probe.peak
    est = {c: decode_peak_bytes(cfg, 64, 96, 4, batch=2, chunked=c, strip_bytes=strip_bytes) for c in (0, 1)}
    assert peaks["plain"] == pytest.approx(est[0], rel=0.05)  # the estimate models the plain decode
    assert peaks["chunked"] <= 1.05 * est[1]
    assert peaks["chunked"] <= 0.55 * peaks["plain"]


def test_should_chunk() -> None:
    cfg, gib = SD1.vae, 2**30
    assert not should_chunk(cfg, 512, 512, 2, gib)
    assert should_chunk(cfg, 1024, 1024, 2, gib)
    assert should_chunk(cfg, 1024, 1024, 2, gib, batch=1) == (decode_peak_bytes(cfg, 1024, 1024, 2) > gib)
    for w, h in [(512, 512), (1024, 768), (2048, 2048)]:
        assert decode_peak_bytes(cfg, w, h, 2, chunked=True) < decode_peak_bytes(cfg, w, h, 2)
