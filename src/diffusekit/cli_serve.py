"""`diffusekit serve` and `diffusekit keys create | list | revoke`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _data(args: argparse.Namespace) -> Path:
    from .paths import data_dir

    return Path(args.data).expanduser() if args.data else data_dir()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .cli_generate import default_model_path
    from .server import ServerConfig, create_app

    try:
        default = default_model_path()
    except FileNotFoundError:
        default = None
    for flag in ("models", "loras", "embeddings", "datasets"):  # the defaults under --data are created
        folder = getattr(args, flag)
        if folder and not Path(folder).is_dir():
            raise ValueError(f"--{flag} {folder}: no such folder")
    store_dir, seed = _store_dir(args)
    config = ServerConfig(
        data_dir=_data(args), models_dir=Path(args.models) if args.models else None, default_model=default,
        store_dir=store_dir, seed_store=seed,
        host=args.host, port=args.port, workers=args.workers, auth=not args.no_auth, device=args.device,
        precision=args.precision, max_queued=args.max_queued, batch_max=args.batch,
        loras_dir=Path(args.loras) if args.loras else None,
        embeddings_dir=Path(args.embeddings) if args.embeddings else None,
        datasets_dir=Path(args.datasets) if args.datasets else None,
        motion_modules_dir=Path(args.motion_modules) if args.motion_modules else None,
        max_frames=args.max_frames, model_memory_mb=args.model_memory, model_wait_s=args.model_wait,
    )  # fmt: skip
    app = create_app(config)
    if args.preload:
        entry = app.state.runner.catalog.get(args.preload)
        app.state.runner.cache.get(entry)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _store_dir(args: argparse.Namespace) -> tuple[Path | None, bool]:
    """(model store folder or None, whether to seed it with default@1): --store DIR, --no-store, or the
    per-user store of `diffusekit models` (which starts with the bundled model as default@1)."""
    from .store import default_root

    if args.no_store:
        if args.store:
            raise ValueError("--store and --no-store contradict each other; give one")
        return None, False
    if args.store is None:
        return default_root(), True
    store = Path(args.store).expanduser()
    if not (store / "store.db").is_file():
        raise ValueError(f"--store {store}: no model store there; 'diffusekit models add PATH --name NAME "
                         f"--store {store}' creates one")  # fmt: skip
    return store, False


def _store(args: argparse.Namespace):
    from .server.keys import KeyStore

    return KeyStore(_data(args) / "diffusekit.db")


def cmd_keys_create(args: argparse.Namespace) -> int:
    key, raw = _store(args).create(args.name, args.role, args.rate, args.quota)
    if args.json:
        print(json.dumps({"id": key.id, "name": key.name, "role": key.role, "key": raw}))
    else:
        print(f"created key {key.id} ({key.name}, {key.role}); it is shown only this once:\n{raw}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = _store(args).list()
    if args.json:
        print(json.dumps([k.__dict__ for k in keys]))
        return 0
    for k in keys:
        state = "revoked" if k.revoked_at else "live"
        limits = f"rate {k.rate_per_min or '-'}/min, quota {k.quota_per_day or '-'}/day"
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created_at))
        print(f"{k.id}  {k.name:<20} {k.role:<5} {state:<7} {limits}  created {made}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    key = _store(args).revoke(args.key)
    print(f"revoked key {key.id} ({key.name})")
    return 0


def add_serve_commands(sub) -> None:
    p = sub.add_parser("serve", help="run the HTTP server (A1111-compatible /sdapi/v1 and the /v1 job API)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--data", help="database and images (default: the per-user data folder)")
    p.add_argument("--models", help="folder of .safetensors/.ckpt files and diffusers folders")
    p.add_argument("--store", metavar="DIR",
                   help="model store whose models are offered as NAME and NAME@V (default: the per-user "
                   "store of `diffusekit models`)")  # fmt: skip
    p.add_argument("--no-store", action="store_true",
                   help="offer no store models (only --models files and the bundled default)")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="generation workers (default 1 per device)")
    p.add_argument("--no-auth", action="store_true", help="no API keys (loopback addresses only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--max-queued", type=int, default=1000, help="queued jobs before new ones get 429")
    p.add_argument(
        "--batch",
        type=int,
        default=8,
        metavar="N",
        help="run up to N queued txt2img jobs with the same model, size, steps and sampler (and fixed "
        "seeds) as one batch, each image bit-identical to its solo run (default 8; 1 = off)",
    )
    p.add_argument("--loras", metavar="DIR", help="LoRA files for <lora:NAME:W> (default: DATA/loras)")
    p.add_argument("--embeddings", metavar="DIR", help="textual-inversion files (default: DATA/embeddings)")
    p.add_argument("--datasets", metavar="DIR", help="image folders train_lora jobs may use (DATA/datasets)")
    p.add_argument("--motion-modules", metavar="DIR", help="AnimateDiff motion modules that animate jobs "
                   "name (default: motion_modules in the data folder)")  # fmt: skip
    p.add_argument("--max-frames", type=int, default=240, metavar="N",
                   help="most frames of one animate job (frames x width x height <= N x 512^2)")  # fmt: skip
    p.add_argument(
        "--model-memory",
        type=int,
        metavar="MIB",
        help="memory the loaded models may take together, in MiB (default: what the system has "
        "available); models in use are never evicted, a load that does not fit waits for them",
    )
    p.add_argument("--model-wait", type=float, default=3600.0, metavar="S",
                   help="seconds a job waits for models other jobs use to free memory before it fails "
                   "(default 3600)")  # fmt: skip
    p.add_argument("--preload", metavar="MODEL", help="load this model before serving (e.g. default)")
    p.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="API keys of the server: create, list, revoke")
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = ks.add_parser("create", help="make a key (shown once, stored only as a hash)")
    p.add_argument("name")
    p.add_argument("--role", default="user", choices=("admin", "user"))
    p.add_argument("--rate", type=int, metavar="N", help="requests per minute")
    p.add_argument("--quota", type=int, metavar="N", help="jobs per day")
    p.set_defaults(func=cmd_keys_create)
    p = ks.add_parser("list", help="the keys (never their values)")
    p.set_defaults(func=cmd_keys_list)
    p = ks.add_parser("revoke", help="revoke a key by id or name")
    p.add_argument("key")
    p.set_defaults(func=cmd_keys_revoke)
    for p in (ks.choices["create"], ks.choices["list"], ks.choices["revoke"]):
        p.add_argument("--data", help="the server's data folder (default: the per-user data folder)")
        p.add_argument("--json", action="store_true")
