"""The pre-run memory estimate against measured peak RSS, one fresh process per case.

Each child loads the model, then measures (resetting the high-water mark through
/proc/self/clear_refs before each part) one CFG U-Net call, one VAE decode and a whole 2-step
generation, and prints the estimate's terms next to the measured figures.

Usage: python bench/memory_estimate.py [--model FILE] [--cases 512x512x1,768x768x1,512x512x2]
       [--precision auto] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_MODEL = "/work/bench-cache/sd15-random-fp16.safetensors"

CHILD = r"""
import json, sys
import torch
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from diffusekit.memory import proc_mib

path, precision, w, h, batch = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

pipe = Pipeline.from_file(path, precision=precision)
params = GenerationParams(prompt="a photo of a cat", steps=2, sampler="euler", seed=1, width=w, height=h,
                          batch_size=batch)
est = pipe.memory_estimate(params)
rss_loaded = proc_mib("VmRSS")
f = pipe.cfg.vae.downscale
c = pipe.cfg.unet.in_channels
x = torch.randn(2 * batch, c, h // f, w // f)
t = torch.full((2 * batch,), 500.0)
ctx = torch.randn(2 * batch, 77, pipe.cfg.unet.context_dim)
y = None if pipe.cfg.unet.adm_in_channels is None else torch.randn(2 * batch, pipe.cfg.unet.adm_in_channels)
with torch.inference_mode():
    reset_peak(); base = proc_mib("VmRSS"); pipe.unet_call(x, t, ctx, y); unet = proc_mib("VmHWM") - base
    z = torch.randn(1, pipe.cfg.unet.out_channels, h // f, w // f)
    reset_peak(); base = proc_mib("VmRSS"); pipe.decode(z); vae = proc_mib("VmHWM") - base
reset_peak(); pipe.generate(params); peak = proc_mib("VmHWM")
mib = lambda b: b / 2**20
print(json.dumps({
    "rss_loaded_mib": rss_loaded, "peak_mib": peak, "unet_mib": unet, "vae_mib": vae,
    "est_resident_mib": mib(est.resident), "est_unet_mib": mib(est.unet), "est_vae_mib": mib(est.vae),
    "est_peak_mib": mib(est.peak), "dtype": str(pipe.dtype), "vae_chunked": est.vae_chunked,
}))
"""


def run_case(model: str, precision: str, case: str) -> dict:
    w, h, batch = (int(v) for v in case.split("x"))
    argv = [sys.executable, "-c", CHILD, model, precision, str(w), str(h), str(batch)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(case=case, error=row["est_peak_mib"] / row["peak_mib"] - 1)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| case | dtype | VAE | U-Net est / measured (MiB) | VAE est / measured (MiB) "
        "| peak est / measured (MiB) | error |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        vae = "strips" if r["vae_chunked"] else "plain"
        lines.append(
            f"| {r['case']} | {r['dtype'].removeprefix('torch.')} | {vae} "
            f"| {r['est_unet_mib']:.0f} / {r['unet_mib']:.0f} | {r['est_vae_mib']:.0f} / {r['vae_mib']:.0f} "
            f"| {r['est_peak_mib']:.0f} / {r['peak_mib']:.0f} | {100 * r['error']:+.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--cases", default="512x512x1,768x768x1,512x512x2")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=None, help="folder for memory_estimate.{json,md}")
    args = ap.parse_args()
    rows = []
    for case in args.cases.split(","):
        rows.append(run_case(args.model, args.precision, case))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    md = f"`python bench/memory_estimate.py --model {args.model} --cases {args.cases}`\n\n{table(rows)}\n"
    print(md)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "memory_estimate.json").write_text(json.dumps(rows, indent=1))
        Path(args.out, "memory_estimate.md").write_text(md)


if __name__ == "__main__":
    main()
