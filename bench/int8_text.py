"""Int8 text encoders against fp32: embedding error and encode time, side by side in one run.

Usage:
    python bench/int8_text.py [--encoders clip-l,openclip-h,openclip-bigg] [--model FP.safetensors]
                              [--rounds 5] [--threads 1] [--out bench/results]

For each encoder: an fp32 copy and an int8 copy (`accel.int8_text.quantize_text_encoder`: attention and
MLP linears, dynamic activations) of the same weights: real-size presets with seeded random weights
(`models.init.randomize_`), and with `--model` the text encoder(s) of that checkpoint (trained weights).
Prompts: the PROMPTS below and the empty negative prompt, tokenized with the bundled CLIP tokenizer, one
77-token row per call as the pipeline encodes them. Error of the U-Net context (`hidden`, the encoder's
configured layer and final norm) and the pooled embedding against fp32: relative L2 over all tokens,
cosine per token (mean and minimum), relative L2 of the pooled vector. Time: `--rounds` rounds, each
encoding every prompt once with fp32 and once with int8 in alternating order (median per call, ratio
fp32/int8). Weight bytes of each. The CPU kind and load average go into the report
(OUT/int8_text.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPTS = (
    "a lighthouse on a cliff above a stormy sea, dramatic clouds",
    "a close-up photo of a tabby cat sleeping on a windowsill",
    "a bustling market street in marrakech, warm afternoon light",
    "an isometric illustration of a tiny wooden cabin in the snow",
    "",  # the negative prompt most runs use
)
PRESETS = {"clip-l": ("sd1", 0), "openclip-h": ("sd2", 0), "openclip-bigg": ("sdxl", 1)}


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compare(fp32, int8, tokenizer, rounds: int) -> dict:
    """Error and time of `int8` against `fp32` (two text encoders with the same float weights)."""
    import torch
    import torch.nn.functional as F

    rows = [tokenizer(p, pad_token_id=fp32.cfg.pad_token_id) for p in PROMPTS]  # each (1, 77)
    with torch.inference_mode():
        outs = [(fp32(ids), int8(ids)) for ids in rows]
        hidden_ref = torch.cat([r.hidden for r, _ in outs])  # (P, 77, W)
        hidden_q = torch.cat([q.hidden for _, q in outs])
        pooled_ref = torch.cat([r.pooled for r, _ in outs])  # (P, D)
        pooled_q = torch.cat([q.pooled for _, q in outs])
        cos = F.cosine_similarity(hidden_q, hidden_ref, dim=-1)  # (P, 77)
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        for r in range(rounds):
            order = (("fp32", fp32), ("int8", int8)) if r % 2 == 0 else (("int8", int8), ("fp32", fp32))
            for name, enc in order:
                for ids in rows:
                    t0 = time.perf_counter()
                    enc(ids)
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "hidden_rel_l2": float((hidden_q - hidden_ref).norm() / hidden_ref.norm()),
        "hidden_cos_mean": float(cos.mean()),
        "hidden_cos_min": float(cos.min()),
        "pooled_rel_l2": float((pooled_q - pooled_ref).norm() / pooled_ref.norm()),
        "encode_s_median": {k: round(v, 4) for k, v in med.items()},
        "speedup_fp32_over_int8": round(med["fp32"] / med["int8"], 3),
        "calls_per_path": len(times["fp32"]),
        "weight_bytes": {"fp32": _bytes(fp32), "int8": _bytes(int8)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="clip-l,openclip-h", help=f"of {', '.join(PRESETS)}; '' for none")
    ap.add_argument("--model", help="also the text encoder(s) of this checkpoint")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    import torch

    from diffusekit.accel.int8_text import quantize_text_encoder
    from diffusekit.checkpoints.load import load_model
    from diffusekit.models.clip import build_text_encoder
    from diffusekit.models.configs import preset
    from diffusekit.models.init import randomize_
    from diffusekit.models.tokenizer import CLIPTokenizer
    from diffusekit.runtime import cpu_features, retain_freed_memory

    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as a pipeline does
    tok = CLIPTokenizer.bundled()
    report: dict = {
        "cpu": _cpu(),
        "features": cpu_features().kind,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average_start": os.getloadavg(),
        "encoders": {},
    }
    jobs = []
    for name in filter(None, args.encoders.split(",")):
        if name not in PRESETS:
            ap.error(f"unknown encoder {name!r}; valid: {', '.join(PRESETS)}")
        family, index = PRESETS[name]
        jobs.append((f"{name} (random weights)", lambda f=family, i=index: preset(f).text_encoders[i]))
    if args.model:
        model = load_model(args.model).model
        for i, enc in enumerate(model.text_encoders):
            jobs.append((f"{Path(args.model).stem} text encoder {i}", lambda e=enc: e))
    for label, get in jobs:
        made = get()
        if isinstance(made, torch.nn.Module):
            fp32 = made.float().eval()
        else:
            fp32 = randomize_(build_text_encoder(made), seed=args.seed).eval()
        int8 = copy.deepcopy(fp32)
        layers = quantize_text_encoder(int8)
        print(f"[int8_text] {label}: {layers} int8 linears; load {os.getloadavg()}", file=sys.stderr)
        result = compare(fp32, int8, tok, args.rounds)
        result["int8_linears"] = layers
        report["encoders"][label] = result
        print(f"{label}: {json.dumps(result)}", flush=True)
        del fp32, int8
    report["load_average_end"] = os.getloadavg()
    out = Path(args.out) / "int8_text.json"
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
