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
    if args.models and not Path(args.models).is_dir():
        raise ValueError(f"--models {args.models}: no such folder")
    config = ServerConfig(
        data_dir=_data(args), models_dir=Path(args.models) if args.models else None, default_model=default,
        host=args.host, port=args.port, workers=args.workers, auth=not args.no_auth, device=args.device,
        precision=args.precision, max_queued=args.max_queued, batch_max=args.batch,
    )  # fmt: skip
    app = create_app(config)
    if args.preload:
        entry = app.state.runner.catalog.get(args.preload)
        app.state.runner.cache.get(entry)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


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
