"""Peak RSS of diffusekit's lazy checkpoint loading on a synthetic ~1 GiB file (each run in a fresh process).

Usage: python bench/load_rss.py [--gib 1.0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

CHILD = r"""
import json, sys, time
import torch
from diffusekit.checkpoints.single_file import load_state_dict
from diffusekit.memory import proc_mib

def peak_mib():  # VmHWM: this process image's peak RSS (ru_maxrss would include the parent's, from fork)
    return proc_mib("VmHWM")

base = peak_mib()
t0 = time.perf_counter()
sd, _ = load_state_dict(sys.argv[1])
t_load = time.perf_counter() - t0
after_load = peak_mib()
total = 0.0
for t in sd.values():  # touch every byte: what copying into a model costs at most
    total += float(t.sum())
after_touch = peak_mib()
print(json.dumps({
    "base_mib": base, "after_load_mib": after_load, "after_touch_mib": after_touch,
    "anon_mib": proc_mib("RssAnon"), "file_mib": proc_mib("RssFile"), "load_s": t_load,
}))
"""


def _measure(path: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, path], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Write synthetic .safetensors and .ckpt files, then report each one's load cost in a fresh process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the synthetic checkpoint")
    parser.add_argument("--dir", default=None, help="where to write the temporary files")
    args = parser.parse_args()

    from diffusekit.checkpoints.single_file import save_state_dict

    n_tensors = 64
    per = int(args.gib * (1 << 30) / 4 / n_tensors)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        sd = {f"model.w{i:02d}": torch.full((per,), float(i)) for i in range(n_tensors)}
        size_mib = sum(t.nbytes for t in sd.values()) / (1 << 20)
        st_path, ckpt_path = os.path.join(tmp, "big.safetensors"), os.path.join(tmp, "big.ckpt")
        save_state_dict(sd, st_path)
        torch.save({"state_dict": sd, "global_step": 1}, ckpt_path)
        del sd
        time.sleep(0.1)
        print(f"synthetic checkpoint: {size_mib:.0f} MiB of float32 in {n_tensors} tensors")
        for label, path in (("safetensors", st_path), ("ckpt (torch zip, mmap)", ckpt_path)):
            r = _measure(path)
            print(
                f"{label:24s} peak RSS: after imports {r['base_mib']:.0f} MiB, "
                f"after load +{r['after_load_mib'] - r['base_mib']:.0f} MiB ({r['load_s']:.2f} s), "
                f"after touching every tensor +{r['after_touch_mib'] - r['base_mib']:.0f} MiB "
                f"(now: anonymous {r['anon_mib']:.0f} MiB, file-backed {r['file_mib']:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
