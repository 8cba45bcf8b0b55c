"""Teach the default model a shape it never saw with `train-lora shapes:+heart`, and measure what it learned.

Usage:
  python bench/lora_concept.py [--lora FILE [--train-summary JSON]] [--images-per-prompt 4] [--seed 0]
                               [--json bench/results/lora_concept.json] [--grid docs/img/lora_heart.png]
Without --lora it first trains one (the train-lora flags below, as `diffusekit train-lora shapes:+heart`);
with --lora it measures a file `train-lora` wrote, and --train-summary is that run's `--json` output
(training time and steps; the rank and the rest are read from the file's ss_* metadata).

What it reports, all from one process and the same sampler settings (the model file's defaults):
(a) the base model's accuracy on the held-out concept prompts (`diffusekit.eval.concept`: the new shape in
    colors it was never trained in, alone, sized, placed, counted, with a known shape), judged by the eval
    detector with the heart outline added; (b) the same with the LoRA at weight 1; (c) the default model's
    eval (`diffusekit eval`, held-out prompts) without the LoRA, with it at weight 1 (per-category change,
    in points) and at weight 0 (every image compared with the base's, byte for byte);
(d) a LoRA training step and a full U-Net fine-tune step on the same concept batches, alternated, one
    after the other in this process (median seconds and their ratio); the CPU kind and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusekit.adapters.lora import LoraNetwork, apply_loras, load_lora
from diffusekit.adapters.train_lora import (
    CaptionedImages,
    LoraParameters,
    LoraTrainConfig,
    LoraTraining,
    new_network,
)
from diffusekit.checkpoints.load import load_model
from diffusekit.checkpoints.single_file import read_safetensors_header
from diffusekit.cli_generate import default_model_path
from diffusekit.data.concepts import ConceptDataset, parse_concept
from diffusekit.eval.concept import concept_prompts, evaluate_concept
from diffusekit.eval.geneval import CATEGORIES, evaluate
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_kind() -> dict:
    """lscpu's model name and the flags that decide CPU speed paths, core count and load average."""
    out: dict = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        out["model_name"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        out["flags_of_interest"] = [f for f in FLAGS_OF_INTEREST if f in flags]
    except (OSError, subprocess.SubprocessError):
        out["model_name"], out["flags_of_interest"] = "unknown", []
    out["load_average"] = list(os.getloadavg())
    return out


def batched_generator(pipe: Pipeline, base: GenerationParams, loras: list):
    """`evaluate`'s callable: each run of one prompt with consecutive seeds s, s+1, ... is one batch
    (A1111's rule: image i of a batch uses seed + i), with `loras` applied."""

    def generate(prompts: list[str], seeds: list[int]) -> list:
        out, i = [], 0
        while i < len(prompts):
            j = i + 1
            while j < len(prompts) and prompts[j] == prompts[i] and seeds[j] == seeds[j - 1] + 1:
                j += 1
            params = base.replace(prompt=prompts[i], seed=seeds[i], batch_size=j - i)
            out.extend(pipe.generate(params, loras=loras).images)
            i = j
        return out

    return generate


def train(args: argparse.Namespace) -> tuple[Path, dict]:
    """Train the LoRA with `diffusekit train-lora shapes:+SHAPE` (in this process); (file, summary)."""
    from diffusekit.cli import build_parser

    out = Path(args.out)
    argv = ["train-lora", args.dataset, "-o", str(out), "--rank", str(args.rank), "--alpha", str(args.alpha),
            "--targets", args.targets, "--steps", str(args.steps), "--batch", str(args.batch),
            "--lr", str(args.lr), "--warmup", str(args.warmup), "--shapes-images", str(args.shapes_images),
            "--save-every", "50", "--seed", str(args.train_seed), "--concept-share", str(args.concept_share),
            "--preserve-kv", str(args.preserve_kv), "--json"]  # fmt: skip
    from diffusekit.cli_lora import _run_training

    ns = build_parser().parse_args(argv)
    return out, _run_training(ns)


def step_times(model, tokenizer, concept, net_cfg: LoraTrainConfig, batch: int, pairs: int) -> dict:
    """Median seconds of a LoRA step and of a full U-Net fine-tune step on the same batches, alternated."""
    ds = ConceptDataset(concept, seed=123, size=model.cfg.resolution, length=64)
    data = CaptionedImages.from_pairs([(s.image, s.caption) for s in (ds[i] for i in range(64))],
                                      model.cfg.resolution)  # fmt: skip
    training = LoraTraining(model, tokenizer, data, net_cfg)
    net = new_network(model, "timing", net_cfg, seed=0)
    lora_params = LoraParameters(net)
    unet_params = list(model.unet.parameters())
    opt_lora = torch.optim.AdamW(lora_params.parameters(), lr=1e-4, fused=True)
    opt_full = torch.optim.AdamW(unet_params, lr=1e-6, fused=True)
    lora_t, full_t = [], []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for i in range(pairs + 1):
        with sdpa_kernel(SDPBackend.MATH):  # what the training loop uses on CPU
            t0 = time.perf_counter()
            with apply_loras(model, [(net, 1.0, 1.0)]):
                loss = training.loss(i, batch)
            opt_lora.zero_grad()
            loss.backward()
            opt_lora.step()
            t1 = time.perf_counter()
            for p in unet_params:
                p.requires_grad_(True)
            t2 = time.perf_counter()
            loss = training.loss(i, batch)
            opt_full.zero_grad()
            loss.backward()
            opt_full.step()
            t3 = time.perf_counter()
            for p in unet_params:
                p.requires_grad_(False)
        if i:  # the first pair warms up
            lora_t.append(t1 - t0)
            full_t.append(t3 - t2)
    model.requires_grad_(False)
    return {
        "batch": batch,
        "pairs": pairs,
        "lora_step_s": statistics.median(lora_t),
        "full_step_s": statistics.median(full_t),
        "full_over_lora": statistics.median(full_t) / statistics.median(lora_t),
        "lora_trainable_parameters": sum(p.numel() for p in lora_params.parameters()),
        "unet_parameters": sum(p.numel() for p in unet_params),
    }


def grid(rows: list[list], path: Path, scale: int = 2) -> None:
    """Save rows of images as one PNG (scaled up, 2 px gaps)."""
    from PIL import Image

    side = rows[0][0].width * scale
    gap = 2
    w = len(rows[0]) * (side + gap) - gap
    canvas = Image.new("RGB", (w, len(rows) * (side + gap) - gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas.paste(
                img.resize((side, side), Image.Resampling.NEAREST), (c * (side + gap), r * (side + gap))
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", help="a LoRA file written by train-lora (default: train one first)")
    ap.add_argument("--train-summary", help="the `train-lora --json` output of that file's run")
    ap.add_argument("--dataset", default="shapes:+heart")
    ap.add_argument("--out", default="bench/results/lora_concept_heart.safetensors")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--targets", default="attn")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--shapes-images", type=int, default=2000)
    ap.add_argument("--concept-share", type=float, default=0.5)
    ap.add_argument("--preserve-kv", type=float, default=0.0)
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="first sampling seed of every prompt")
    ap.add_argument(
        "--spread-seeds", default="",
        help="comma-separated first seeds of more seed blocks of the base model's default eval: how far its "
        "categories move from one seed block to another with no change to the model (the eval's own noise)",
    )  # fmt: skip
    ap.add_argument("--timing-pairs", type=int, default=6, help="LoRA/full training step pairs to time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="bench/results/lora_concept.json")
    ap.add_argument("--grid", help="also save base / LoRA images of some held-out prompts here (PNG)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    concept = parse_concept(args.dataset)
    result: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "cpu_start": cpu_kind()}
    result["threads"] = torch.get_num_threads()
    t_start = time.perf_counter()

    if args.lora:
        lora_path = Path(args.lora)
        summary = json.loads(Path(args.train_summary).read_text()) if args.train_summary else {}
    else:
        lora_path, summary = train(args)
    meta = read_safetensors_header(lora_path)[1]
    net: LoraNetwork = load_lora(lora_path)
    result["lora"] = {
        "file": str(lora_path),
        "bytes": lora_path.stat().st_size,
        "layers": len(net.modules),
        "parameters": sum(m.down.numel() + m.up.numel() for m in net.modules.values()),
        "rank": int(meta.get("ss_network_dim", 0)),
        "alpha": float(meta.get("ss_network_alpha", 0)),
        "steps": int(meta.get("ss_max_train_steps", 0)),
        "learning_rate": float(meta.get("ss_learning_rate", 0)),
        "train_images": int(meta.get("ss_num_train_images", 0)),
        "preserve_kv": float(meta.get("ss_preserve_kv", 0)),
        "training_seconds": summary.get("seconds"),
        "training_seconds_per_step": summary.get("seconds_per_step"),
        "final_loss": summary.get("final_loss"),
        "train_command": summary.get("command"),
    }

    model_path = default_model_path()
    pipe = Pipeline.from_file(model_path)
    base = pipe.defaults.fill(GenerationParams())
    result["sampling"] = {"steps": base.steps, "cfg_scale": base.cfg_scale, "sampler": base.sampler,
                          "images_per_prompt": args.images_per_prompt, "seed": args.seed}  # fmt: skip
    n = args.images_per_prompt
    runs = {"base": [], "lora_w1": [(net, 1.0, 1.0)], "lora_w0": [(net, 0.0, 0.0)]}

    # (a), (b): the concept prompts
    concept_images: dict[str, dict] = {}
    result["concept"] = {
        "prompts": len(concept_prompts(concept)),
        "heldout_colors": list(concept.heldout_colors),
    }
    for name in ("base", "lora_w1"):
        concept_images[name] = {}
        rep = evaluate_concept(batched_generator(pipe, base, runs[name]), concept, n, args.seed,
                               keep_images=concept_images[name])  # fmt: skip
        result["concept"][name] = rep.to_dict()
        print(f"concept {name}: {rep.accuracy:.3f} {rep.categories}", flush=True)

    # (c): the default model's eval without, with weight 1 and weight 0
    images: dict[str, list] = {}
    reports = {}
    for name, loras in runs.items():
        images[name] = []
        gen = batched_generator(pipe, base, loras)

        def keep(prompts, seeds, gen=gen, store=images[name]):
            out = gen(prompts, seeds)
            store.extend(np.asarray(im) for im in out)
            return out

        reports[name] = evaluate(keep, images_per_prompt=n, seed=args.seed, prompt_set="heldout")
        print(f"default eval {name}: {reports[name].overall:.3f} {reports[name].categories}", flush=True)
    eval_out = {}
    for name, rep in reports.items():
        eval_out[name] = {"overall": rep.overall, "held_out": rep.held_out, "categories": rep.categories,
                          "intervals95": {c: list(rep.interval(c)) for c in CATEGORIES}}  # fmt: skip
    for name in ("lora_w1", "lora_w0"):
        eval_out[name]["points_vs_base"] = {
            c: round(100 * (reports[name].categories[c] - reports["base"].categories[c]), 2)
            for c in CATEGORIES
        }
        eval_out[name]["max_abs_points"] = max(abs(v) for v in eval_out[name]["points_vs_base"].values())
    same = [np.array_equal(a, b) for a, b in zip(images["base"], images["lora_w0"], strict=True)]
    eval_out["lora_w0"]["identical_images"] = f"{sum(same)}/{len(same)}"
    changed_w1 = sum(not np.array_equal(a, b) for a, b in zip(images["base"], images["lora_w1"], strict=True))
    eval_out["lora_w1"]["changed_images"] = f"{changed_w1}/{len(same)}"
    eval_out["images_per_category"] = {c: reports["base"].passes(c)[1] for c in CATEGORIES}
    result["default_eval"] = eval_out
    flips = {c: [0, 0] for c in CATEGORIES}  # [pass -> fail, fail -> pass] at weight 1
    for b, w in zip(reports["base"].results, reports["lora_w1"].results, strict=True):
        for x, y in zip(b.passed, w.passed, strict=True):
            if x != y:
                flips[b.category][int(y)] += 1
    eval_out["lora_w1"]["flipped_verdicts"] = flips

    # the eval's own noise: the base model on other seed blocks, against the first block
    spread = {}
    for s in [int(x) for x in args.spread_seeds.split(",") if x.strip()]:
        rep = evaluate(batched_generator(pipe, base, []), images_per_prompt=n, seed=s, prompt_set="heldout")
        pts = {c: round(100 * (rep.categories[c] - reports["base"].categories[c]), 2) for c in CATEGORIES}
        spread[s] = {"categories": rep.categories, "points_vs_first_block": pts,
                     "max_abs_points": max(abs(v) for v in pts.values())}  # fmt: skip
        print(f"base eval, seeds {s}-{s + n - 1}: {pts}", flush=True)
    if spread:
        result["base_seed_spread"] = spread
    result["default_eval_details"] = {name: rep.to_dict()["results"] for name, rep in reports.items()}

    # (d): LoRA step against full fine-tune step
    loaded = load_model(model_path)
    model = loaded.model.float()
    text = any(n.startswith("lora_te") for n in net.modules)
    step_cfg = LoraTrainConfig(rank=result["lora"]["rank"] or args.rank, alpha=result["lora"]["alpha"] or 1.0,
                               targets=_targets_of(net), resolution=loaded.cfg.resolution,
                               train_text_encoder=text)  # fmt: skip
    result["step_timing"] = step_times(
        model, loaded.tokenizer, concept, step_cfg, args.batch, args.timing_pairs
    )
    print(f"step timing: {result['step_timing']}", flush=True)

    if args.grid:
        prompts = [p.prompt for p in concept_prompts(concept)][::3][:8]
        rows = [[concept_images[name][(p, args.seed)] for p in prompts] for name in ("base", "lora_w1")]
        grid(rows, Path(args.grid))
        result["grid"] = {"path": args.grid, "prompts": prompts, "rows": ["base", "lora weight 1"]}

    result["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    result["cpu_end"] = cpu_kind()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    c, e = result["concept"], result["default_eval"]
    print(
        f"concept accuracy: base {c['base']['accuracy']:.3f}, LoRA {c['lora_w1']['accuracy']:.3f}; "
        f"default eval max change at weight 1: {e['lora_w1']['max_abs_points']} points, "
        f"weight 0 identical images: {e['lora_w0']['identical_images']}; wrote {args.json}"
    )
    return 0


def _targets_of(net: LoraNetwork) -> str:
    """The train-lora target set a network's U-Net layer names correspond to."""
    names = [n for n in net.modules if not n.startswith("lora_te")]
    if all("attn2_to_k" in n or "attn2_to_v" in n for n in names):
        return "xattn-kv"
    return "attn+conv" if any("resnets" in n or "conv" in n for n in names) else "attn"


if __name__ == "__main__":
    raise SystemExit(main())
