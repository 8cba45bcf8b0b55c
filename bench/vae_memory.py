"""Peak RSS of the SD VAE decode, plain vs chunked (each run in a fresh process, random weights).

Usage: python bench/vae_memory.py [--latent 128] [--dtype bf16] [--strip-mib 16] [--threads 1]
(--latent 128 is a 1024 x 1024 image; the decode takes about a minute per run on one core.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import torch
from diffusekit.models.configs import SD1
from diffusekit.models.init import randomize_
from diffusekit.models.vae import AutoencoderKL
from diffusekit.models.vae_chunked import decode_chunked
from diffusekit.memory import proc_mib

mode, latent, dtype, strip_mib, threads, out_path = sys.argv[1:]
torch.set_num_threads(int(threads))
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]

vae = AutoencoderKL(SD1.vae, device="meta", dtype=dtype).to_empty(device="cpu").eval()
randomize_(vae, 0)
z = torch.randn(1, 4, int(latent), int(latent), generator=torch.Generator().manual_seed(0)).to(dtype)
weights_mib = sum(p.nbytes for p in vae.parameters()) / 2**20
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
    f.write("5")
base = proc_mib("VmRSS")
t0 = time.perf_counter()
with torch.inference_mode():
    if mode == "plain":
        img = vae.decode(z)
    else:
        img = decode_chunked(vae, z, strip_bytes=int(float(strip_mib) * 2**20))
seconds = time.perf_counter() - t0
peak = proc_mib("VmHWM")
torch.save(img.float(), out_path)
print(json.dumps({"weights_mib": weights_mib, "base_mib": base, "peak_above_base_mib": peak - base,
                  "seconds": seconds}))
"""


def _run(mode: str, args: argparse.Namespace, out_path: str) -> dict[str, float]:
    argv = [mode, str(args.latent), args.dtype, str(args.strip_mib), str(args.threads), out_path]
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Decode the same random latent with each path in its own process; print peak RSS and the difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=128, help="latent side (image side = 8x)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--strip-mib", type=float, default=16.0, help="decode_chunked strip_bytes, in MiB")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="plain,chunked", help="which decodes to run, comma-separated")
    args = parser.parse_args()

    import torch

    from diffusekit.models.configs import SD1
    from diffusekit.models.vae_chunked import decode_peak_bytes

    side = 8 * args.latent
    dtype_bytes = 2 if args.dtype == "bf16" else 4
    print(f"SD VAE decode of a {side} x {side} image, {args.dtype}, {args.threads} thread(s)")
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            outputs[mode] = os.path.join(tmp, f"{mode}.pt")
            r = _run(mode, args, outputs[mode])
            est = decode_peak_bytes(
                SD1.vae,
                side,
                side,
                dtype_bytes,
                chunked=mode == "chunked",
                strip_bytes=int(args.strip_mib * 2**20),
            )
            print(
                f"{mode:8s} peak RSS above weights+input: {r['peak_above_base_mib']:7.0f} MiB "
                f"(estimate {est / 2**20:.0f} MiB; weights {r['weights_mib']:.0f} MiB), {r['seconds']:.1f} s"
            )
        if set(outputs) != {"plain", "chunked"}:
            return
        plain, chunked = torch.load(outputs["plain"]), torch.load(outputs["chunked"])
    err = ((chunked - plain).abs().max() / plain.abs().max()).item()
    print(f"max |chunked - plain| / max |plain| = {err:.2e} (max |plain| = {plain.abs().max().item():.3f})")


if __name__ == "__main__":
    main()
