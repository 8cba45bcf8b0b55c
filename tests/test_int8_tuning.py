"""The int8 path's glue tuning: the same numbers as the first version with one copy less per layer."""

from __future__ import annotations

import pytest
import torch

from diffusekit.accel.errors import AccelError
from diffusekit.accel.int8_static import Int8Conv2d, Int8Linear, int8_unavailable, quantize_unet, set_tuning
from diffusekit.models.configs import TINY_SD1
from diffusekit.models.init import randomize_
from diffusekit.models.unet import UNetModel
from diffusekit.runtime import prepare

pytestmark = pytest.mark.skipif(int8_unavailable() is not None, reason=str(int8_unavailable()))


pytestmark = [pytestmark, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def _restore_tuning():
    yield
    set_tuning("after")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_uint8_alias_gives_the_same_layers_as_int_repr():
    torch.manual_seed(0)
    conv = Int8Conv2d(torch.nn.Conv2d(16, 24, 3, padding=1), 0.0, 0)
    lin = Int8Linear(torch.nn.Linear(24, 40), 0.0, 0)  # wider out: stays on oneDNN
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
    rows = torch.randn(2, 7, 24)
    with torch.inference_mode():
        set_tuning("before")
        ref = conv(x), lin(rows)
        set_tuning("after")
        new = conv(x), lin(rows)
    assert all(torch.equal(a, b) for a, b in zip(ref, new, strict=True))


def test_fused_dynamic_linear_matches_the_onednn_path_and_is_chosen_by_shape():
    torch.manual_seed(0)
    square, wide = torch.nn.Linear(64, 64), torch.nn.Linear(64, 256)
    q_square, q_wide = Int8Linear(square, 0.0, 0), Int8Linear(wide, 0.0, 0)
    static = Int8Linear(square, 0.05, 128)
    x = torch.randn(3, 50, 64)
    with torch.inference_mode():
        set_tuning("before")
        before = q_square(x)
        set_tuning("fused-linear")
        after, _, _ = q_square(x), q_wide(x), static(x)
    assert q_square._packed_dynamic is not None  # fbgemm's fused dynamic kernel ran
    assert q_wide._packed_dynamic is None and static._packed_dynamic is None  # oneDNN for these
    assert _rel(after, before) < 1e-5  # the same quantization, only the kernel differs
    assert _rel(after, square(x)) < 0.03  # and int8-close to the float layer
    with pytest.raises(AccelError, match="unknown int8 tuning"):
        set_tuning("fastest")


def test_the_default_tuning_gives_the_first_versions_u_net_output_bit_for_bit():
    unet = randomize_(UNetModel(TINY_SD1.unet), seed=0).eval()
    quantize_unet(unet, dynamic=True)
    prepare(unet, torch.float32, "cpu", "int8")
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)  # (B, 4, h, w)
    t, ctx = torch.tensor([500.0, 500.0]), torch.randn(2, 77, TINY_SD1.unet.context_dim)
    with torch.inference_mode():
        after = unet(x, t, ctx)
        set_tuning("before")
        before = unet(x, t, ctx)
    assert torch.equal(after, before)  # only a copy was taken out: the PSNR figures stand as measured
