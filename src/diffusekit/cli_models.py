"""`diffusekit models ...`: the model store from the command line (add, promote, rollback, check, ...)."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _store(args: argparse.Namespace):
    """The store named by --store, else the per-user one (which starts with the bundled default@1)."""
    from .store import ModelStore, StoreError

    if args.store is not None:
        creates = getattr(args, "func", None) is cmd_add
        if not creates and not (args.store / "store.db").is_file():
            raise StoreError(f"{args.store}: no model store there; 'diffusekit models add PATH --name NAME "
                             f"--store {args.store}' creates one")  # fmt: skip
        return ModelStore(args.store)
    return ModelStore(None, seed_default=True)


def store_pipeline(args: argparse.Namespace, **kw):
    """For `generate --model NAME[@VERSION]`: a Pipeline from the store, or None when --model is a path."""
    from .store import StoreError, looks_like_ref

    model = Path(args.model) if args.model else None
    if (
        model is None
        or model.exists()
        or model.suffix.lower() in CHECKPOINT_SUFFIXES
        or not looks_like_ref(args.model)
    ):
        return None  # a path (a missing file gets the loader's "no such file" error)
    if args.vae or args.prediction:
        raise StoreError(
            f"--vae/--prediction cannot change the store model {args.model}; add a new version instead"
        )
    store = _store(args)
    v = store.get(args.model)  # resolved once: a promote meanwhile cannot mix two versions' settings
    if v.manifest["family"] == "sd3":
        from .cli_sd3 import sd3_options

        if getattr(args, "text_encoder", None):
            raise StoreError(f"--text-encoder cannot change the store model {args.model}; add a version "
                             "with the encoders instead ('models add FILE --text-encoder ...')")  # fmt: skip
        options = sd3_options(args)
        return store.pipeline(v.ref, precision=args.precision, device=kw["device"], options=options)
    return store.pipeline(v.ref, precision=args.precision, **kw)


def _print_json(obj) -> None:
    print(
        json.dumps(
            obj, indent=2, default=lambda o: None if isinstance(o, float) and math.isinf(o) else str(o)
        )
    )


def _command() -> str:
    return "diffusekit " + shlex.join(sys.argv[1:])


def cmd_add(args: argparse.Namespace) -> int:
    store = _store(args)
    t0 = time.perf_counter()
    v = store.add(
        args.path, args.name, note=args.note, source=args.source, license=args.license, fp16=args.fp16,
        prune=args.prune, prediction=args.prediction, parent=args.parent, golden=not args.no_golden,
        command=_command(), text_encoders=tuple(args.text_encoder),
    )  # fmt: skip
    if args.json:
        _print_json(v.card())
        return 0
    comps = ", ".join(f"{c['name']} {c['blob'][:12]}" for c in v.manifest["components"])
    state = " (current)" if v.current else f" (current stays {v.name}@{store.get(v.name).version})"
    print(f"added {v.ref}{state} in {time.perf_counter() - t0:.1f}s: {v.manifest['family']}, {comps}")
    if v.golden:
        print(f"  golden images: {len(v.golden.images)} recorded")
    for note in v.manifest["stored"]["notes"]:
        print(f"  note: {note}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = _store(args).list()
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no models in this store; add one with 'diffusekit models add PATH --name NAME'")
    for r in rows:
        versions = ", ".join(str(v) for v in r["versions"])
        note = f"  {r['note']}" if r["note"] else ""
        print(f"{r['name']}@{r['current']}  {r['family']}  AutoV2 {r['autov2']}  versions: {versions}{note}")
    return 0


def _stored(stored: dict) -> str:
    if stored["exact_export"]:
        return "as added (export gives back the same bytes)"
    changed = [k for k in ("fp16", "pruned") if stored[k]]
    return ", ".join(changed) if changed else "tensors as added (export writes a fresh .safetensors)"


def cmd_show(args: argparse.Namespace) -> int:
    card = _store(args).get(args.ref).card()
    if args.json:
        _print_json(card)
        return 0
    o = card["original"]
    lines = [
        f"{card['ref']}" + ("  (current)" if card["current"] else ""),
        f"  family       {card['family']}, prediction {card['prediction']}"
        + (", zero terminal SNR" if card["zero_terminal_snr"] else "") + f", {card['resolution']} px",
        f"  parameters   {card['parameters']:,}",
        f"  original     {o['name']} ({o['format']}, {_size(o['bytes'])})"
        + (f" AutoV2 {o['autov2']} sha256 {o['sha256']}" if o.get("sha256") else ""),
        f"  stored       {_stored(card['stored'])}",
        f"  added        {_when(card['created_at'])} by {card['created_by']}",
        f"  command      {card['command']}",
        f"  source       {card['source'] or '-'}",
        f"  license      {card['license'] or '-'}",
        f"  note         {card['note'] or '-'}",
        f"  parent       {card['parent'] or '-'}",
    ]  # fmt: skip
    if card.get("sd3"):
        s = card["sd3"]
        t5 = "T5 tokenizer kept" if s["t5_tokenizer"] else "no T5 tokenizer"
        mmdit = f"MMDiT depth {s['mmdit_depth']}" + (", QK-norm" if s["qk_norm"] else "")
        mmdit += f", {s['mmdit_x_layers']} MMDiT-X blocks" if s["mmdit_x_layers"] else ""
        lines.append(f"  sd3          shift {s['shift']}, T5 length {s['t5_max_length']}, {mmdit}")
        lines.append(f"  encoders     {', '.join(s['text_encoders']) or 'none'} ({t5})")
    if card["recommended"]:
        lines.append(f"  recommended  {card['recommended']}")
    lines.append("  components")
    for c in card["components"]:
        dtypes = "/".join(c["dtypes"])
        lines.append(
            f"    {c['name']:<15} {c['parameters']:>14,} params  {_size(c['bytes']):>10}  {dtypes:<9} "
            f"{c['blob'][:12]}"
        )
    if card["recipe"]:
        r = card["recipe"]
        keys = ", ".join(list(r)[:8])
        lines.append(f"  recipe       training recipe recorded in the file ({keys}); --json shows it")
    g = card["golden"]
    lines.append(
        f"  golden       {len(g['images'])} images, PSNR >= {g['min_psnr']} dB, max diff <= {g['max_diff']}"
        if g else "  golden       none (record with 'models check REF --record')"
    )  # fmt: skip
    print("\n".join(lines))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    out = _store(args).promote(
        args.ref, reason=args.reason, force=args.force, min_psnr=args.min_psnr, max_diff=args.max_diff
    )
    if args.json:
        _print_json(out)
        return 0
    checked = "golden check passed" if out["check"] else "golden check skipped (--force)"
    print(f"{out['name']}: current {out['from']} -> {out['to']} ({checked})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    out = _store(args).rollback(args.name, reason=args.reason)
    if args.json:
        _print_json(out)
    else:
        print(f"{out['name']}: rolled back, current {out['from']} -> {out['to']}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    rows = _store(args).history(args.name)
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        change = {
            "add": f"added @{r['to_version']}" + (" (current)" if r["reason"] == "current" else ""),
            "promote": f"promote @{r['from_version']} -> @{r['to_version']}",
            "rollback": f"rollback @{r['from_version']} -> @{r['to_version']}",
            "remove": f"removed @{r['from_version']}",
            "golden": f"golden images re-recorded for @{r['to_version']}",
        }[r["action"]]
        why = f"  ({r['reason']})" if r["reason"] and r["action"] != "add" else ""
        print(f"{_when(r['at'])}  {r['actor']}  {change}{why}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    out = _store(args).remove(args.ref, reason=args.reason)
    print(json.dumps(out) if args.json else f"removed {out['removed']} (run 'models gc' to free its blobs)")
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    out = _store(args).repair(args.path, fp16=args.fp16, prune=args.prune, prediction=args.prediction)
    if args.json:
        _print_json(out)
    elif out["restored_blobs"]:
        blobs = ", ".join(d[:12] for d in out["restored_blobs"])
        print(f"restored {len(out['restored_blobs'])} blob(s) ({blobs}) of {', '.join(out['versions'])}")
    else:
        print(f"nothing to restore from {args.path}: every blob of it that a version names is intact")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    out = _store(args).gc(dry_run=args.dry_run)
    if args.json:
        _print_json(out)
    else:
        verb = "would free" if args.dry_run else "freed"
        print(f"{verb} {_size(out['freed_bytes'])}: {len(out['removed_blobs'])} unreferenced blob(s), "
              f"{out['removed_temp_files']} partial write(s)")  # fmt: skip
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .store.audit import verify

    out = verify(_store(args), rehash=not args.quick)
    if args.json:
        _print_json(out)
    else:
        how = "re-hashed" if out["rehashed"] else "present"
        print(f"{len(out['versions'])} version(s), {out['blobs_checked']} blob(s) {how}: "
              + ("ok" if out["ok"] else f"{len(out['problems'])} problem(s)"))  # fmt: skip
        for p in out["problems"]:
            print(f"  {p['kind']}: {p['detail']}; breaks {', '.join(p['versions']) or '-'}")
        if out["unreferenced_blobs"] or out["temp_files"]:
            n, t = len(out["unreferenced_blobs"]), out["temp_files"]
            print(f"  {n} unreferenced blob(s), {t} partial write(s): 'models gc' removes them")
    return 0 if out["ok"] else 1


def cmd_du(args: argparse.Namespace) -> int:
    from .store.audit import du

    out = du(_store(args))
    if args.json:
        _print_json(out)
        return 0
    print(f"{out['store']}")
    print(f"  logical   {_size(out['logical_bytes']):>11}  (every version counted whole)")
    print(
        f"  physical  {_size(out['physical_bytes']):>11}  (each blob once; saved {_size(out['saved_bytes'])})"
    )
    print(
        f"  tensors   {_size(out['logical_tensor_bytes']):>11} logical, "
        f"{_size(out['physical_tensor_bytes'])} physical"
    )
    if out["unreferenced_bytes"]:
        print(f"  garbage   {_size(out['unreferenced_bytes']):>11}  (unreferenced; 'models gc' frees it)")
    print(f"  {'version':<24} {'logical':>11} {'adds':>11} {'unique':>11}  shared components")
    for v in out["versions"]:
        shared = ", ".join(
            f"{n}={'+'.join(c['shared_with'])}" for n, c in v["components"].items() if c["shared_with"]
        )
        print(
            f"  {v['ref']:<24} {_size(v['logical']):>11} {_size(v['adds']):>11} {_size(v['unique']):>11}  "
            f"{shared or '-'}"
        )
    return 0


def _check_table(out: dict) -> None:
    print(f"{out['ref']}: golden check " + ("passed" if out["passed"] else "FAILED")
          + f" (pass: PSNR >= {out['min_psnr']} dB and max diff <= {out['max_diff']})")  # fmt: skip
    for i in out["images"]:
        s = i["spec"]
        psnr = "inf" if i["psnr"] is None else f"{i['psnr']:.2f}"
        verdict = "ok" if i["passed"] else "FAIL"
        size = f"{s['width']}x{s['height']} {s['steps']} steps seed {s['seed']}"
        print(f"  [{i['index']}] {verdict:<4} PSNR {psnr:>6} dB  max diff {i['max_diff']:>3}  "
              f"mean {i['mean_diff']:.3f}  {size}  ({i['seconds']:.1f}s)")  # fmt: skip
        if i.get("error"):
            print(f"      no image: {i['error']}")
    if not out["passed"] and out["recorded_with"] != out["now"]:
        print(f"  recorded with {out['recorded_with']}, now {out['now']}")


def cmd_check(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.record:
        rec = store.record_golden(args.ref, reason=args.reason)
        print(f"{store.get(args.ref).ref}: recorded {len(rec.images)} golden image(s)")
        return 0
    out = store.check(args.ref, min_psnr=args.min_psnr, max_diff=args.max_diff)
    if args.json:
        _print_json(out)
    else:
        _check_table(out)
    return 0 if out["passed"] else 1


def cmd_export(args: argparse.Namespace) -> int:
    from .store.audit import export

    out = export(_store(args), args.ref, args.out, fmt=args.format)
    if args.json:
        _print_json(out)
        return 0
    print(f"wrote {out['out']} ({out['format']}, {_size(out['bytes'])}) from {out['ref']}")
    if out["autov2"]:
        same = "identical file" if out["identical_file"] else "same tensors, different file bytes"
        print(f"  AutoV2 {out['autov2']}  (original {out['original_autov2'] or '-'}: {same})")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .store.audit import diff

    out = diff(_store(args), args.a, args.b)
    if args.json:
        _print_json(out)
        return 0
    print(f"{out['a']} vs {out['b']}" + ("" if out["same_config"] else "  (different model configs)"))
    for c in out["components"]:
        if c["status"] == "differs":
            extra = (
                f", {len(c['only_in_a']) + len(c['only_in_b'])} key(s) on one side only"
                if c["only_in_a"] or c["only_in_b"]
                else ""
            )
            print(f"  {c['component']:<15} differs: relative change {c['relative_change']:.3e} "
                  f"({c['tensors_changed']}/{c['tensors_compared']} tensors){extra}")  # fmt: skip
        else:
            print(f"  {c['component']:<15} {c['status']}" + (f" ({c['blob']})" if "blob" in c else ""))
    return 0


def add_models_commands(sub) -> None:
    """Register `diffusekit models ...`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store", type=Path, help="store folder (default: the per-user data folder's models/)"
    )
    common.add_argument("--json", action="store_true", help="print JSON")
    models = sub.add_parser("models", help="the model store: versions, rollback, dedup, golden checks")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        p = msub.add_parser(name, help=help, parents=[common])
        p.set_defaults(func=func)
        return p

    def thresholds(p: argparse.ArgumentParser) -> None:
        p.add_argument("--min-psnr", type=float, help="pass threshold in dB (default: the recorded one, 50)")
        p.add_argument(
            "--max-diff",
            type=int,
            help="largest allowed 0..255 pixel difference (default: the recorded one, 16)",
        )

    p = cmd("add", cmd_add, "add a checkpoint file or diffusers folder as the next version of NAME")
    p.add_argument("path", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--note")
    p.add_argument("--source", help="where the file came from (URL, path); default: the file's path")
    p.add_argument("--license")
    p.add_argument("--fp16", action="store_true", help="store floating-point weights as fp16")
    p.add_argument("--prune", action="store_true", help="drop EMA and training-only entries")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the prediction type")
    p.add_argument("--parent", help="NAME@VERSION this derives from (default: NAME's current version)")
    p.add_argument("--no-golden", action="store_true", help="skip rendering the golden images")
    p.add_argument("--text-encoder", action="append", default=[], metavar="FILE",
                   help="SD3: a separate clip_l / clip_g / t5xxl file to store with it (repeat)")  # fmt: skip
    cmd("list", cmd_list, "models and their versions")
    p = cmd("show", cmd_show, "the model card of NAME[@VERSION]")
    p.add_argument("ref")
    p = cmd("promote", cmd_promote, "make NAME@VERSION current (after its golden check passes)")
    p.add_argument("ref")
    p.add_argument("--reason")
    p.add_argument("--force", action="store_true", help="promote without the golden check")
    thresholds(p)
    p = cmd("rollback", cmd_rollback, "return NAME to the version current before its last promote")
    p.add_argument("name")
    p.add_argument("--reason")
    p = cmd("history", cmd_history, "adds, promotes, rollbacks and removals of NAME")
    p.add_argument("name")
    p = cmd("rm", cmd_rm, "remove NAME@VERSION (not the current one while others exist)")
    p.add_argument("ref")
    p.add_argument("--reason")
    p = cmd("repair", cmd_repair, "rewrite missing or corrupt blobs from a copy of a file that was added")
    p.add_argument("path", type=Path)
    p.add_argument("--fp16", action="store_true", help="as the version was added with --fp16")
    p.add_argument("--prune", action="store_true", help="as the version was added with --prune")
    p.add_argument("--prediction", choices=("eps", "v"), help="as the version was added with --prediction")
    p = cmd("gc", cmd_gc, "delete blobs no version uses")
    p.add_argument("--dry-run", action="store_true")
    p = cmd("verify", cmd_verify, "re-hash every blob; name broken versions (exit 1 on problems)")
    p.add_argument("--quick", action="store_true", help="check presence only, do not re-hash")
    cmd("du", cmd_du, "logical vs physical bytes, what each version adds")
    p = cmd("check", cmd_check, "re-render NAME[@VERSION]'s golden images and compare (exit 1 on failure)")
    p.add_argument("ref")
    p.add_argument(
        "--record", action="store_true", help="(re-)record the golden images with the current code"
    )
    p.add_argument("--reason", help="with --record: why")
    thresholds(p)
    p = cmd("export", cmd_export, "write NAME@VERSION as a .safetensors file or a diffusers folder")
    p.add_argument("ref")
    p.add_argument("out", type=Path)
    p.add_argument("--format", choices=("single-file", "diffusers"), default="single-file")
    p = cmd("diff", cmd_diff, "which components of A and B differ, and by how much")
    p.add_argument("a")
    p.add_argument("b")
