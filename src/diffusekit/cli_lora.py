"""`diffusekit train-lora` and `diffusekit merge-lora`: train a LoRA on captioned images; bake LoRAs in."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _run_training(args: argparse.Namespace) -> dict:
    """Train, write the LoRA file, loss curve and samples; returns a summary."""
    import torch

    from .adapters.lora import LoraError
    from .adapters.train_lora import (
        LoraParameters,
        LoraTrainConfig,
        LoraTraining,
        make_loss_fn,
        new_network,
        training_metadata,
    )
    from .checkpoints.load import load_model
    from .cli_generate import default_model_path
    from .data.concepts import is_concept_name, parse_concept
    from .train.loop import TrainConfig, Trainer
    from .train.report import loss_curve_png

    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise LoraError(f"--out must end in .safetensors, got {out.name!r}")
    if is_concept_name(args.data):
        parse_concept(args.data)  # a wrong name fails before the model loads
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + ".work")
    model_path = Path(args.model) if args.model else default_model_path()
    loaded = load_model(model_path)
    model = loaded.model.float()
    res = args.resolution or loaded.cfg.resolution
    cfg = LoraTrainConfig(
        rank=args.rank, alpha=args.alpha, targets=args.targets, conv_rank=args.conv_rank,
        train_text_encoder=args.train_text_encoder, resolution=res, min_snr_gamma=args.min_snr,
        preserve_kv=args.preserve_kv, seed=args.seed,
    )  # fmt: skip
    if args.preserve_kv and not is_concept_name(args.data):
        raise LoraError("--preserve-kv needs a shapes:+SHAPE dataset (its captions without the new shape)")
    data, prior = _training_data(args, res)
    net = new_network(model, out.stem, cfg, args.seed)
    params = LoraParameters(net)
    training = LoraTraining(model, loaded.tokenizer, data, cfg, prior)
    tcfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=min(args.warmup, args.steps),
        ema_decay=args.ema_decay, grad_clip=1.0, bf16=False, save_every=args.save_every,
        log_every=max(1, min(10, args.steps // 10)), seed=args.seed,
    )  # fmt: skip
    trainer = Trainer(out.stem, params, tcfg, work, precision="fp32")
    resumed = trainer.resume() if args.resume else False
    loss_fn = make_loss_fn(training, net, args.batch)
    t0 = time.perf_counter()
    start = trainer.state.step
    samples = []
    end = min(tcfg.steps, args.stop_after) if args.stop_after else tcfg.steps
    while trainer.state.step < end:
        stop = end
        if args.sample_every:
            stop = min(stop, (trainer.state.step // args.sample_every + 1) * args.sample_every)
        trainer.run(loss_fn, progress=not args.json, stop_at=stop)
        if args.sample_every and args.sample_prompt and trainer.state.step % args.sample_every == 0:
            samples.append(_sample(loaded, net, args, work / f"sample-{trainer.state.step:06d}.png"))
    seconds = time.perf_counter() - t0
    if args.ema:
        trainer.ema.copy_to(params)
    meta = training_metadata(cfg, loaded.cfg, out.stem, tcfg.steps, args.lr, len(data), model_path.name)
    meta["ss_dataset_dir"] = str(args.data)
    if args.preserve:
        meta["ss_preserve_base"] = "True"
    if args.preserve_kv:
        meta["ss_preserve_kv"] = str(args.preserve_kv)
    with torch.no_grad():
        net.save(out, loaded.cfg, style=args.format, metadata=meta)
    curve = (
        loss_curve_png({"LoRA": trainer.state.losses}, work / "loss.png") if trainer.state.losses else None
    )
    steps_run = trainer.state.step - start
    return {
        "out": str(out),
        "bytes": out.stat().st_size,
        "steps": tcfg.steps,
        "resumed_from": start if resumed else None,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / steps_run, 4) if steps_run else None,
        "final_loss": trainer.state.losses[-1][1] if trainer.state.losses else None,
        "layers": len(net.modules),
        "loss_curve": str(curve) if curve else None,
        "samples": samples,
    }


def _training_data(args: argparse.Namespace, resolution: int):
    """A folder of captioned images, or the built-in shapes dataset with a new concept ("shapes:+heart");
    with the captions that do not name the new concept (for --preserve-kv; none for a folder)."""
    from .adapters.train_lora import CaptionedImages
    from .data.concepts import ConceptDataset, is_concept_name, parse_concept, prior_captions

    if not is_concept_name(args.data):
        return CaptionedImages(args.data, resolution), []
    concept = parse_concept(args.data)
    ds = ConceptDataset(concept, args.seed, resolution, args.shapes_images, args.concept_share)
    samples = [ds[i] for i in range(len(ds))]
    anchors = frozenset(i for i, s in enumerate(samples) if args.preserve and not ds.shows_concept(s))
    prior = prior_captions(args.seed, args.shapes_images) if args.preserve_kv else []
    return CaptionedImages.from_pairs([(s.image, s.caption) for s in samples], resolution, anchors), prior


def _sample(loaded, net, args: argparse.Namespace, path: Path) -> str:
    """One image of the sample prompt with the LoRA as trained so far."""
    import torch

    from .adapters.train_lora import sample_with_lora
    from .metadata import save_png
    from .pipeline import Pipeline

    pipe = Pipeline(loaded, dtype=torch.float32)
    result = sample_with_lora(pipe, net, args.sample_prompt, seed=args.seed, steps=args.sample_steps)
    save_png(result.images[0], path, result.infotexts[0])
    return str(path)


def cmd_train_lora(args: argparse.Namespace) -> int:
    summary = _run_training(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"wrote {summary['out']} ({summary['bytes']} bytes, {summary['layers']} layers) after "
            f"{summary['steps']} steps in {summary['seconds']:.1f} s; loss curve {summary['loss_curve']}"
        )
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from .adapters.extra_networks import ExtraNetworkCall, lora_weights
    from .adapters.lora import load_lora, merge_loras
    from .checkpoints.hashes import sha256_file
    from .checkpoints.load import checkpoint_metadata, load_model
    from .checkpoints.single_file import save_state_dict

    out = Path(args.out)
    loaded = load_model(args.model)
    loras = []
    for spec in args.loras:  # PATH or PATH:TE[:UNET]
        path, *weights = spec.split(":")
        net = load_lora(path)
        te, unet = lora_weights(ExtraNetworkCall("lora", net.name, tuple(weights)))
        loras.append((net, te, unet))
    sd = merge_loras(loaded.model.state_dict(), loaded.cfg, loras)
    recipe = [{"lora": n.name, "sha256": sha256_file(n.path), "te": te, "unet": u} for n, te, u in loras]
    meta = checkpoint_metadata(loaded.cfg) | {
        "sd_merge_recipe": json.dumps(
            {"type": "diffusekit merge-lora", "model": str(args.model), "loras": recipe}
        )
    }
    save_state_dict(sd, out, metadata=meta)
    print(f"wrote {out} with {len(loras)} LoRA(s) merged")
    return 0


def cmd_train_ti(args: argparse.Namespace) -> int:
    from .adapters.embeddings import EmbeddingError
    from .adapters.train_lora import CaptionedImages, LoraTrainConfig, LoraTraining
    from .adapters.train_ti import EmbeddingParameters, make_ti_loss_fn, save_embedding
    from .checkpoints.load import load_model
    from .cli_generate import default_model_path
    from .train.loop import TrainConfig, Trainer
    from .train.report import loss_curve_png

    out = Path(args.out)
    name = args.name or out.stem
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + ".work")
    loaded = load_model(Path(args.model) if args.model else default_model_path())
    model = loaded.model.float()
    res = args.resolution or loaded.cfg.resolution
    data = CaptionedImages(args.data, res)
    if not any(name in caption for _, caption, _ in data.items):
        raise EmbeddingError(f"no caption in {args.data} contains the embedding's name {name!r}")
    cfg = LoraTrainConfig(train_text_encoder=True, resolution=res, min_snr_gamma=args.min_snr, seed=args.seed)
    params = EmbeddingParameters(model, loaded.tokenizer, args.init_word, args.vectors)
    training = LoraTraining(model, loaded.tokenizer, data, cfg)
    tcfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=0, grad_clip=1.0, bf16=False,
        save_every=args.save_every, log_every=max(1, min(10, args.steps // 10)), seed=args.seed,
    )  # fmt: skip
    trainer = Trainer(name, params, tcfg, work, precision="fp32")
    if args.resume:
        trainer.resume()
    trainer.run(make_ti_loss_fn(training, params, name, args.batch), progress=not args.json)
    save_embedding(params, out, name, tcfg.steps)
    if trainer.state.losses:
        loss_curve_png({"embedding": trainer.state.losses}, work / "loss.png")
    summary = {"out": str(out), "name": name, "vectors": args.vectors, "steps": tcfg.steps,
               "final_loss": trainer.state.losses[-1][1] if trainer.state.losses else None}  # fmt: skip
    print(json.dumps(summary) if args.json else f"wrote {out} (use '{name}' in prompts with --embeddings)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from .checkpoints.merge import merge_checkpoints

    models = args.models
    if len(models) not in (2, 3):
        raise ValueError(f"merge takes models A B [C], got {len(models)}")
    summary = merge_checkpoints(
        models[0], models[1], args.out, c=models[2] if len(models) == 3 else None, multiplier=args.alpha,
        method=args.method, dtype=torch.float16 if args.half else None,
    )  # fmt: skip
    print(json.dumps(summary) if args.json else f"wrote {summary['out']} ({args.method}, M={args.alpha})")
    return 0


def add_lora_commands(sub) -> None:
    p = sub.add_parser("train-lora", help="train a LoRA on a folder of images with .txt captions")
    p.add_argument(
        "data",
        help="folder of images, each with a same-named .txt caption (kohya layout), or shapes:+heart: the "
        "built-in shapes dataset with a shape the default model never saw",
    )
    p.add_argument("--shapes-images", type=int, default=2000, help="with shapes:+SHAPE: images rendered")
    p.add_argument(
        "--preserve", action="store_true",
        help="with shapes:+SHAPE: on the images without the new shape, train the LoRA to keep the base "
        "model's own prediction (distillation) instead of to denoise them",
    )  # fmt: skip
    p.add_argument(
        "--preserve-kv", type=float, default=0.0, metavar="WEIGHT",
        help="with shapes:+SHAPE: add WEIGHT x the relative change the LoRA makes to the U-Net's "
        "cross-attention keys and values of the default model's own training captions (without the new "
        "shape) to the loss (0: off), so that prompts without it keep their conditioning",
    )  # fmt: skip
    p.add_argument(
        "--concept-share", type=float, default=0.5,
        help="with shapes:+SHAPE: share of the images that show the new shape (the rest rehearse the old)",
    )  # fmt: skip
    p.add_argument("--model", help="base checkpoint or diffusers folder (default: the bundled model)")
    p.add_argument("-o", "--out", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--format", choices=("kohya", "diffusers"), default="kohya")
    p.add_argument("--rank", type=int, default=4, help="network dim (kohya --network_dim)")
    p.add_argument("--alpha", type=float, default=1.0, help="network alpha: scale = alpha / rank")
    p.add_argument(
        "--targets", choices=("attn", "attn+conv", "xattn-kv"), default="attn",
        help="attn: transformer blocks; attn+conv: + ResBlock convs (LoCon); "
        "xattn-kv: cross-attention keys and values only",
    )  # fmt: skip
    p.add_argument("--conv-rank", type=int, help="rank of conv layers with attn+conv (default: --rank)")
    p.add_argument("--train-text-encoder", action="store_true", help="also adapt the text encoder(s)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--resolution", type=int, help="training side length (multiple of 64; default: model's)")
    p.add_argument("--min-snr", type=float, help="min-SNR loss weighting gamma (e.g. 5)")
    p.add_argument("--ema", action="store_true", help="save the EMA of the weights (off by default)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (for --resume)")
    p.add_argument("--resume", action="store_true", help="continue from the work folder's checkpoint")
    p.add_argument("--work-dir", help="checkpoints, loss curve, samples (default: OUT.work next to OUT)")
    p.add_argument("--sample-every", type=int, default=0, help="sample image every N steps (0 = never)")
    p.add_argument("--sample-prompt", default="")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: stop as if killed here
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_lora)

    p = sub.add_parser("train-ti", help="train a textual-inversion embedding on captioned images")
    p.add_argument("data", help="folder of images with .txt captions that contain the embedding's name")
    p.add_argument("--model", help="base checkpoint or diffusers folder (default: the bundled model)")
    p.add_argument(
        "-o", "--out", required=True, help=".pt (A1111) or .safetensors (emb_params; SDXL clip_l/g)"
    )
    p.add_argument("--name", help="the word used in prompts (default: the output file's stem)")
    p.add_argument("--init-word", default="object", help="initialise the vectors from this word")
    p.add_argument("--vectors", type=int, default=1, help="vectors per token")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--resolution", type=int)
    p.add_argument("--min-snr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--work-dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train_ti)

    p = sub.add_parser("merge-lora", help="bake LoRAs into a checkpoint (W += weight * scale * up @ down)")
    p.add_argument("model")
    p.add_argument("loras", nargs="+", help="LoRA files, each PATH or PATH:WEIGHT or PATH:TE:UNET")
    p.add_argument("-o", "--out", required=True, help="the merged checkpoint (.safetensors)")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("merge", help="merge checkpoints as A1111's merger: weighted sum or add difference")
    p.add_argument("models", nargs="+", help="A B (weighted-sum) or A B C (add-difference)")
    p.add_argument("--method", choices=("weighted-sum", "add-difference"), default="weighted-sum")
    p.add_argument("--alpha", type=float, default=0.5, help="M: (1-M)*A + M*B, or A + M*(B-C)")
    p.add_argument("--half", action="store_true", help="store floats as fp16")
    p.add_argument("-o", "--out", required=True, help="the merged checkpoint (.safetensors)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_merge)
