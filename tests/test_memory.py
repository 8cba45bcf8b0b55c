"""The pre-run memory estimate: its terms, the strip-wise VAE, and the pipeline's use of it."""

import torch

from diffusekit.memory import estimate, resident_bytes, unet_activation_bytes
from diffusekit.models.configs import SD1
from diffusekit.models.vae_chunked import decode_peak_bytes
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from helpers import make_checkpoint


def test_estimate_adds_the_larger_activation_peak_to_what_is_resident():
    plain = estimate(SD1, 1024, 1024, 1, resident=3 * 2**30, dtype_bytes=2)
    strips = estimate(SD1, 1024, 1024, 1, resident=3 * 2**30, dtype_bytes=2, vae_chunked=True)
    assert plain.vae == decode_peak_bytes(SD1.vae, 1024, 1024, 2)
    assert strips.vae == decode_peak_bytes(SD1.vae, 1024, 1024, 2, chunked=True) < plain.vae / 3
    for est in (plain, strips):
        assert est.peak == 3 * 2**30 + max(est.unet, est.vae)


def test_unet_activations_scale_with_pixels_batch_and_dtype():
    base = unet_activation_bytes(SD1, 512, 512, 1, 2)
    assert unet_activation_bytes(SD1, 512, 512, 2, 2) == 2 * base
    assert unet_activation_bytes(SD1, 512, 512, 1, 4) == 2 * base
    assert 2.2 * base < unet_activation_bytes(SD1, 768, 768, 1, 2) < 2.3 * base  # 2.25x the latent pixels
    assert 200 * 2**20 < base < 260 * 2**20  # measured 225 MiB (bench/memory_estimate.py)


def test_pipeline_estimate_counts_the_live_process_and_the_hires_size(tmp_path):
    _, _, path = make_checkpoint("tiny_sd1", tmp_path)
    pipe = Pipeline.from_file(path, precision="fp32")
    weights = sum(p.numel() * p.element_size() for p in pipe.model.parameters())
    est = pipe.memory_estimate(GenerationParams(prompt="x", width=64, height=64))
    assert weights < est.resident  # the live RSS: weights plus the runtime
    assert abs(est.resident - resident_bytes(weights)) < 16 * 2**20
    hires = pipe.memory_estimate(
        GenerationParams(prompt="x", width=64, height=64, enable_hr=True, hr_scale=2)
    )
    assert hires.unet == unet_activation_bytes(pipe.cfg, 128, 128, 1, torch.finfo(pipe.dtype).bits // 8)
