"""Time the model store's golden check: the default model and a real-size SD1.5 random-weight model.

    PYTHONPATH=src python bench/store_golden_time.py [--preset sd1] [--skip-large] [--out FILE.json]

Measures, in one run: adding each model to a fresh store (hashing, blob writes, golden recording) and
`check` (load from blobs, re-render the golden images, compare). Prints JSON with the CPU kind and the
torch thread count. Not a comparison with a peer: no other tool has golden checks to compare with.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from diffusekit.checkpoints.load import checkpoint_metadata
from diffusekit.checkpoints.single_file import save_state_dict
from diffusekit.models.configs import preset
from diffusekit.models.init import randomize_
from diffusekit.models.sd import StableDiffusion
from diffusekit.store import ModelStore
from diffusekit.store.audit import du


def cpu_kind() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "?").strip()
    flags = fields.get("Flags", "")
    extra = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()]
    return f"{name} ({', '.join(extra) or 'no AVX-512'})"


def timed_store(store: ModelStore, ref: str) -> dict:
    v = store.get(ref)
    t0 = time.perf_counter()
    report = store.check(ref)
    check_s = time.perf_counter() - t0
    return {
        "ref": ref,
        "golden_images": [dict(g.spec.__dict__, record_s=round(g.seconds, 2)) for g in v.golden.images],
        "check_s": round(check_s, 2),
        "check_render_s": [round(i["seconds"], 2) for i in report["images"]],
        "passed": report["passed"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd1")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--half-file", action="store_true", help="write the large model's file in fp16")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="store-bench-"))
    result = {"cpu": cpu_kind(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    try:
        t0 = time.perf_counter()
        store = ModelStore(work / "default-store", seed_default=True)
        result["default_add_s"] = round(time.perf_counter() - t0, 2)
        result["default"] = timed_store(store, "default@1")
        if not args.skip_large:
            cfg = preset(args.preset)
            t0 = time.perf_counter()
            sd = randomize_(StableDiffusion(cfg), 0).state_dict()
            if args.half_file:  # half the bytes to hash and write; the golden renders are fp32 either way
                sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
            path = work / f"{args.preset}.safetensors"
            save_state_dict(sd, path, metadata=checkpoint_metadata(cfg))
            del sd
            result["large_create_s"] = round(time.perf_counter() - t0, 2)
            result["large_file_bytes"] = path.stat().st_size
            big = ModelStore(work / "large-store")
            t0 = time.perf_counter()
            big.add(path, args.preset, golden=False)
            result["large_add_without_golden_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            big.record_golden(f"{args.preset}@1")
            result["large_record_golden_s"] = round(time.perf_counter() - t0, 2)
            result["large"] = timed_store(big, f"{args.preset}@1")
            result["large_du"] = {k: v for k, v in du(big).items() if k.endswith("bytes")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
