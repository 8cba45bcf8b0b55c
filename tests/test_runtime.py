"""Compute precision choice, the bf16 fast path, and casting a mapped checkpoint without holding it twice."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffusekit.checkpoints.single_file import cast_floats, load_state_dict, save_state_dict
from diffusekit.models.configs import SD1, TINY_SD1
from diffusekit.models.unet import UNetModel
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from diffusekit.runtime import (
    PrecisionError,
    cpu_has_native_bf16,
    resolve_device,
    resolve_precision,
    retain_freed_memory,
)
from helpers import make_checkpoint


def test_precision_names_and_devices():
    assert resolve_precision("fp32", "cpu") == torch.float32
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    assert resolve_precision("auto", "cuda") == torch.float16
    valid = "auto, fp32, fp32-fast, bf16, fp16, int8"
    with pytest.raises(PrecisionError, match=rf"unknown precision 'half'; valid: {valid}"):
        resolve_precision("half", "cpu")
    with pytest.raises(PrecisionError, match="fp16 compute is not supported on CPU"):
        resolve_precision("fp16", "cpu")


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "mps"):
        with pytest.raises(ValueError, match=f"unknown device '{bad}'; valid: auto, cpu, cuda, cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:1': this PyTorch sees no CUDA GPU; use cpu or auto"):
            resolve_device("cuda:1")


def test_auto_precision_is_bf16_only_for_sd_size_models_on_bf16_cpus():
    def unet_params(cfg):
        with torch.device("meta"):
            return sum(p.numel() for p in UNetModel(cfg.unet).parameters())

    assert resolve_precision("auto", "cpu", unet_params(TINY_SD1)) == torch.float32  # too small for bf16
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_precision("auto", "cpu", unet_params(SD1)) == expected


def test_prepare_leaves_fp32_alone_and_lays_out_bf16(tmp_path):
    _, _, path = make_checkpoint("tiny_sd1", tmp_path)
    ref = Pipeline.from_file(path, precision="fp32")
    assert not ref.fast.channels_last
    assert ref.model.unet.input_blocks[0][0].weight.is_contiguous()
    fast = Pipeline.from_file(path, precision="bf16")
    assert fast.fast.channels_last and fast.fast.attention == "sliced"
    conv = fast.model.unet.input_blocks[0][0].weight
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    attn = [m for m in fast.model.unet.modules() if hasattr(m, "kernel")]
    assert attn and all(m.kernel == "sliced" for m in attn)
    assert all(m.kernel == "sdpa" for m in ref.model.unet.modules() if hasattr(m, "kernel"))
    assert all(p.dtype == torch.bfloat16 for p in fast.model.parameters())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_activations_are_reused_instead_of_faulted_in_again(tmp_path):
    _, _, path = make_checkpoint("tiny_sd1", tmp_path)
    assert Pipeline.from_file(path, precision="fp32").fast.retains_freed_memory  # set by prepare on CPU
    assert retain_freed_memory()  # idempotent

    def churn():  # what a U-Net step does: large activations allocated, written, freed
        for _ in range(4):
            torch.empty(48 * 2**20, dtype=torch.uint8).fill_(1)

    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 1000, faults  # glibc's defaults: ~49,000 (each 48 MiB block mapped and zeroed anew)


def test_bf16_image_differs_from_fp32_far_less_than_another_seed(tmp_path):
    _, _, path = make_checkpoint("tiny_sd1", tmp_path)
    params = GenerationParams(prompt="a red circle", steps=6, sampler="euler", seed=3, width=64, height=64)
    fp32, bf16 = Pipeline.from_file(path, precision="fp32"), Pipeline.from_file(path, precision="bf16")
    pixels = lambda pipe, **kw: np.asarray(pipe.generate(replace(params, **kw)).images[0], np.float32)  # noqa: E731
    ref = pixels(fp32)
    precision_change = np.abs(pixels(bf16) - ref).mean()
    seed_change = np.abs(pixels(fp32, seed=4) - ref).mean()
    assert 0 < precision_change < 0.25 * seed_change, (precision_change, seed_change)


def test_cast_release_keeps_the_file_readable(tmp_path):
    torch.manual_seed(0)
    sd = {f"w{i}": torch.randn(300, 257).half() for i in range(4)}  # sizes that straddle pages
    save_state_dict(sd, tmp_path / "m.safetensors")
    mapped, _ = load_state_dict(tmp_path / "m.safetensors")
    cast = cast_floats(mapped, torch.bfloat16, release_mapped=True)
    for key, t in sd.items():
        assert torch.equal(cast[key], t.to(torch.bfloat16))
        assert torch.equal(mapped[key], t)  # released pages read back from the file intact


_PEAK_SCRIPT = """
import json, sys, torch
from diffusekit.checkpoints.single_file import cast_floats, load_state_dict
status = lambda field: int(open("/proc/self/status").read().split(field + ":")[1].split()[0])  # kB
mapped, _ = load_state_dict(sys.argv[1])
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
base = status("VmRSS")
cast = cast_floats(mapped, torch.bfloat16, release_mapped=sys.argv[2] == "1")
print(json.dumps({"added_kb": status("VmHWM") - base}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux-only")
def test_casting_a_mapped_file_does_not_hold_both_copies(tmp_path):
    n = 32 * 2**20  # 64 MiB of fp16 in 16 tensors
    sd = {f"w{i}": torch.ones(n // 16, dtype=torch.float16) for i in range(16)}
    path = tmp_path / "big.safetensors"
    save_state_dict(sd, path)

    def added_mib(release: bool) -> float:
        run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), str(int(release))],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return json.loads(run.stdout)["added_kb"] / 1024

    kept, released = added_mib(False), added_mib(True)
    assert kept > 120, kept  # the 64 MiB mapping + the 64 MiB bf16 copy
    assert released < 72, (kept, released)  # the copy + about one tensor's pages (4 MiB)
