"""The int8 path's glue tuning: same numbers as the first version, cheaper calls, sliced fp32 attention."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diffusekit.accel import int8_static
from diffusekit.accel.errors import AccelError
from diffusekit.accel.int8_static import Int8Conv2d, Int8Linear, int8_unavailable, quantize_unet, set_tuning
from diffusekit.models.configs import TINY_SD1
from diffusekit.models.init import randomize_
from diffusekit.models.unet import UNetModel
from diffusekit.runtime import prepare

pytestmark = pytest.mark.skipif(int8_unavailable() is not None, reason=str(int8_unavailable()))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared, loaded machine two threads wait on each other (cpu-paths guide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
        set_tuning("after")
        after, _, _ = q_square(x), q_wide(x), static(x)
    assert q_square._packed_dynamic is not None  # fbgemm's fused dynamic kernel ran
    assert q_wide._packed_dynamic is None and static._packed_dynamic is None  # oneDNN for these
    assert _rel(after, before) < 1e-5  # the same quantization, only the kernel differs
    assert _rel(after, square(x)) < 0.03  # and int8-close to the float layer
    with pytest.raises(AccelError, match="unknown int8 tuning"):
        set_tuning("fastest")


def test_int8_path_uses_sliced_attention_where_heads_are_40_wide():
    cfg = replace(TINY_SD1.unet, model_channels=40, num_heads=1, norm_groups=8)  # heads of 40, 80, 80
    unet = randomize_(UNetModel(cfg), seed=0).eval()
    fp32 = randomize_(UNetModel(cfg), seed=0).eval()
    quantize_unet(unet, dynamic=True)
    prepare(unet, torch.float32, "cpu", "int8")
    attn = [m for m in unet.modules() if hasattr(m, "kernel")]
    assert {m.dim_head: m.kernel for m in attn} == {40: "sliced", 80: "sdpa"}
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)  # (B, 4, h, w)
    t, ctx = torch.tensor([500.0, 500.0]), torch.randn(2, 77, cfg.context_dim)
    with torch.inference_mode():
        ref = fp32(x, t, ctx)
        for m in fp32.modules():  # the kernel alone: fp32 with the int8 path's kernels
            if hasattr(m, "kernel"):
                m.kernel = "sliced" if m.dim_head == 40 else "sdpa"
        assert _rel(fp32(x, t, ctx), ref) < 1e-5
        after = unet(x, t, ctx)
        set_tuning("before")
        for m in attn:
            m.kernel = "sdpa"
        before = unet(x, t, ctx)
    # the two are two draws of the same int8 rounding (a changed last bit moves a value across a
    # rounding step in a later layer), so each is compared with fp32, not with the other
    assert _rel(after, ref) < 0.1 and _rel(before, ref) < 0.1
    assert int8_static.TUNING.name == "before"
