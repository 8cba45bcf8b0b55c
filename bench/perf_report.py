"""The markdown of `bench/perf.py`: the comparison table, FLOPs, matmul peak and stable-diffusion.cpp.

`render_markdown(report)` turns the report dict that `perf.py` builds (machine, settings, runs, summary,
derived, errors) into OUT/perf.md; it computes nothing new beyond ratios and formatting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perf_worker import CFG_SCALE, MATMUL_INNER, SEED, STEPS, UNET_SIZES

COLUMN_ORDER = ("diffusers fp32", "diffusers bf16", "ours auto", "ours fp32", "ours bf16")
RATIOS = ("diffusers fp32", "diffusers bf16")  # "X / ours": speedup of ours auto, higher is better


def _median(report: dict[str, Any], metric: str, label: str, key: str = "value") -> float | None:
    stats = report["summary"].get(metric, {}).get(label, {}).get(key)
    return stats["median"] if stats else None


def _cell(stats: dict[str, float] | None, digits: int = 3) -> str:
    if not stats:
        return "-"
    med, lo = stats["median"], stats["min"]
    return f"{med:.{digits}f}" if stats["n"] == 1 else f"{med:.{digits}f} ({lo:.{digits}f})"


def _columns(report: dict[str, Any]) -> list[str]:
    labels = {label for m, by in report["summary"].items() if m not in ("matmul", "sdcpp") for label in by}
    return [c for c in COLUMN_ORDER if c in labels] + sorted(labels - set(COLUMN_ORDER))


# (row title, metric, summary key, digits); time and memory rows: lower is better
TABLE_ROWS: tuple[tuple[str, str, str, int], ...] = (
    ("load (s)", "load", "value", 2),
    ("RSS after load (MB)", "load", "rss_after_load_mb", 0),
    ("text: prompt + negative (s)", "text", "value", 3),
    ("U-Net 512, CFG batch 2 (s/call)", "unet512", "value", 3),
    ("U-Net 768, CFG batch 2 (s/call)", "unet768", "value", 3),
    ("VAE decode 512 (s)", "vae512", "value", 3),
    ("VAE decode 1024 (s)", "vae1024", "value", 3),
    ("image512: end to end, in process (s)", "image512", "total_s", 2),
    ("image512: process wall time (s)", "image512", "wall_s", 2),
    ("image512: load (s)", "image512", "load_s", 2),
    ("image512: generate 20 steps (s)", "image512", "generate_s", 2),
    ("image512: peak RSS (MB)", "image512", "peak_rss_mb", 0),
)


def _ratio(theirs: float | None, ours: float | None) -> str:
    return f"{theirs / ours:.2f}x" if theirs and ours else "-"


def table_markdown(report: dict[str, Any]) -> list[str]:
    cols = _columns(report)
    ours = "ours auto" if "ours auto" in cols else next((c for c in cols if c.startswith("ours")), None)
    ratio_cols = [c for c in RATIOS if c in cols and ours]
    head = ["metric", *cols, *(f"{c} / {ours}" for c in ratio_cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for title, metric, key, digits in TABLE_ROWS:
        by = report["summary"].get(metric)
        if not by:
            continue
        cells = [_cell(by.get(c, {}).get(key), digits) for c in cols]
        ours_v = _median(report, metric, ours, key) if ours else None
        ratios = [_ratio(_median(report, metric, c, key), ours_v) for c in ratio_cols]
        lines.append("| " + " | ".join([title, *cells, *ratios]) + " |")
    derived = report.get("derived", {})
    for metric in UNET_SIZES:
        rows = derived.get(metric)
        if not rows:
            continue
        gf = [f"{rows[c]['gflops']:.0f}" if c in rows else "-" for c in cols]
        frac = [_percent(rows[c].get("fraction_of_bf16_peak")) if c in rows else "-" for c in cols]
        pad = [""] * len(ratio_cols)
        lines.append("| " + " | ".join([f"{metric}: achieved GFLOP/s", *gf, *pad]) + " |")
        lines.append("| " + " | ".join([f"{metric}: fraction of bf16 matmul peak", *frac, *pad]) + " |")
    return lines


def _percent(x: float | None) -> str:
    return f"{100 * x:.0f}%" if x is not None else "-"


def _dtypes_line(report: dict[str, Any]) -> str | None:
    seen = sorted(
        {
            (label, r["dtype"])
            for by in report["runs"].values()
            for label, rs in by.items()
            for r in rs
            if label.startswith("ours") and "dtype" in r
        }
    )
    return "; ".join(f"{label} ran in {dtype}" for label, dtype in seen) or None


def matmul_markdown(report: dict[str, Any]) -> list[str]:
    by = report["summary"].get("matmul")
    if not by:
        return []
    n = report["settings"]["matmul_n"]
    lines = [
        "",
        f"## Matmul peak (torch.mm, {n}x{n}, best of {MATMUL_INNER} per process)",
        "",
        "| dtype | best GFLOP/s | median of processes |",
        "|---|---|---|",
    ]
    for label, stats in by.items():
        v = stats.get("value")
        if v:
            lines.append(f"| {label.split()[-1]} | {v['max']:.0f} | {v['median']:.0f} |")
    return lines


def flops_markdown(report: dict[str, Any]) -> list[str]:
    flops = report.get("flops")
    if not flops:
        return []
    parts = ", ".join(f"{m}: {f / 1e9:.0f} GFLOP" for m, f in flops.items())
    return ["", f"U-Net FLOPs per CFG call (batch 2, counted with FlopCounterMode on meta): {parts}."]


def sdcpp_markdown(report: dict[str, Any]) -> list[str]:
    status = report.get("stable_diffusion_cpp")
    if status is None:  # not asked for (--only without sdcpp)
        return []
    lines = ["", "## stable-diffusion.cpp (20-step Euler 512 txt2img, same single file)", ""]
    if status != "installed":
        return [*lines, f"stable_diffusion_cpp: {status}; section skipped."]
    by = report["summary"].get("sdcpp", {})
    ours_total = _median(report, "image512", "ours auto", "total_s")
    ours_gen = _median(report, "image512", "ours auto", "generate_s")
    lines += [
        "| variant | end to end (s) | generate (s) | peak RSS (MB) | sdcpp / ours auto, end to end "
        "| sdcpp / ours auto, generate |",
        "|---|---|---|---|---|---|",
    ]
    for label, stats in by.items():
        total, gen = _median(report, "sdcpp", label, "total_s"), _median(report, "sdcpp", label, "generate_s")
        lines.append(
            f"| {label} | {_cell(stats.get('total_s'), 2)} | {_cell(stats.get('generate_s'), 2)} | "
            f"{_cell(stats.get('peak_rss_mb'), 0)} | {_ratio(total, ours_total)} | "
            f"{_ratio(gen, ours_gen)} |"
        )
    return lines


def _threads_line(report: dict[str, Any]) -> str:
    """The torch thread counts the workers actually ran with."""
    seen = {
        r["threads"] for by in report["runs"].values() for rs in by.values() for r in rs if "threads" in r
    }
    return "/".join(str(t) for t in sorted(seen)) or "unknown"


def render_markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        f"# diffusekit vs diffusers on CPU ({s['config']}, {Path(s['model']).name})",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable cores, torch threads {_threads_line(report)}, "
        f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}; "
        f"load average at start {m['load_average_at_start'][0]:.2f}.",
        f"Each cell: median (min) of {s['repeats']} fresh processes; sides alternate. Euler, {STEPS} steps, "
        f"CFG {CFG_SCALE}, seed {SEED}. Ratio columns are speedups of ours auto (higher is better; for "
        "memory rows, how many times less memory ours needs).",
    ]
    if dtypes := _dtypes_line(report):
        lines.append(f"Precision: {dtypes}.")
    lines += ["", *table_markdown(report), *flops_markdown(report), *matmul_markdown(report)]
    lines += sdcpp_markdown(report)
    if report["errors"]:
        lines += ["", "## Failed runs", "", *(f"- {e.splitlines()[0]}" for e in report["errors"])]
    return "\n".join(lines) + "\n"
