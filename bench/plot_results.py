"""Draw the docs' benchmark and model charts (PNG) from the JSON results in bench/results.

Usage: python bench/plot_results.py [--results bench/results] [--out docs/img]
Every chart names the CPU its numbers came from (the JSON's `machine` record where it has one, else
what the run's notes say); the docs' Benchmarks and model pages show these files. Needs matplotlib
(the `docs` extra).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffusekit.eval.geneval import EvalReport, pooled, report_from_dict  # noqa: E402

COLORS = {
    "diffusers fp32": "#9e9e9e",
    "diffusers bf16": "#607d8b",
    "ours auto": "#3f51b5",
    "sdcpp f16": "#e65100",
}
BF16_CPU_NOTE = "2-core CPU with native bf16 (AVX-512 BF16); the JSON records no CPU model"


def cpu_kind(machine: dict) -> str:
    """'AMD EPYC, 2 cores, AVX-512 BF16' from a perf.py `machine` record."""
    flags = set(machine.get("cpu_flags", ()))
    isa = "AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    return f"{machine.get('cpu_model', 'unknown CPU')}, {machine.get('cpus_usable', '?')} cores, {isa}"


def _load(path: Path) -> dict | list:
    return json.loads(path.read_text())


def _median(summary: dict, metric: str, variant: str, field: str = "value") -> float:
    return summary[metric][variant][field]["median"]


def _bars(ax, labels: Sequence[str], series: dict[str, Sequence[float]], unit: str) -> None:
    """Grouped horizontal bars: one group per label, one bar per series, values written at the ends."""
    n = len(series)
    height = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        ys = [g + (n - 1 - i) * height - 0.4 + height / 2 for g in range(len(labels))]
        bars = ax.barh(ys, values, height=height * 0.92, color=COLORS.get(name), label=name)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=3, fontsize=8)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.margins(x=0.15)
    ax.spines[["top", "right"]].set_visible(False)


def plot_perf(results: Path, out: Path) -> Path:
    """U-Net, VAE and whole-image times of ours against diffusers (bench/perf.py)."""
    data = _load(results / "perf.json")
    s = data["summary"]
    variants = ["diffusers fp32", "diffusers bf16", "ours auto"]
    steps = [
        ("U-Net step, 512 (CFG batch 2)", "unet512"),
        ("U-Net step, 768", "unet768"),
        ("VAE decode, 512", "vae512"),
        ("VAE decode, 1024", "vae1024"),
    ]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    _bars(
        a,
        [label for label, _ in steps],
        {v: [_median(s, m, v) for _, m in steps] for v in variants},
        "seconds (lower is better)",
    )
    a.set_title("Components")
    image = {
        v: [_median(s, "image512", v, "wall_s"), _median(s, "image512", v, "peak_rss_mb") / 1000]
        for v in variants
    }
    _bars(b, ["20-step 512 image,\nprocess wall (s)", "its peak RSS (GB)"], image, "lower is better")
    b.set_title("One image, fresh process")
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"SD1.5-size random weights, Euler, CFG 7.5 — {cpu_kind(data['machine'])}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "perf_cpu.png")


def plot_sdcpp(results: Path, out: Path) -> Path:
    """A 20-step 512 image: ours against stable-diffusion.cpp on the same single file."""
    data = _load(results / "sdcpp" / "perf.json")
    ours = data["runs"]["image512"]["ours auto"][0]
    sdcpp = data["runs"]["sdcpp"]["sdcpp f16"][0]
    fig, ax = plt.subplots(figsize=(7, 2.2))
    _bars(
        ax,
        ["20-step Euler 512 image,\nend to end (s)"],
        {"ours auto": [ours["total_s"]], "sdcpp f16": [sdcpp["total_s"]]},
        "seconds (lower is better)",
    )
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"diffusekit vs stable-diffusion.cpp 0.4.7 — {cpu_kind(data['machine'])}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "perf_sdcpp.png")


def plot_accel(results: Path, out: Path) -> Path:
    """Opt-in accelerators: seconds per step against the pixel difference from the plain image."""
    variants = _load(results / "accel.json")["variants"]
    rerun = _load(results / "accel-compile-rerun" / "accel.json")["variants"]
    names = {"baseline": "none", "deepcache": "DeepCache 3", "tome": "ToMe 0.5", "int8": "int8 Linears"}
    rows = [
        (label, variants[k]["image"]["step_s"], variants[k]["image"]["psnr_db"]) for k, label in names.items()
    ]
    rows.append(
        ("torch.compile\n(re-run)", rerun["compile"]["image"]["step_s"], rerun["compile"]["image"]["psnr_db"])
    )
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    labels = [r[0] for r in rows]
    _bars(a, labels, {"ours auto": [r[1] for r in rows]}, "s per step, 512, CFG (lower is better)")
    a.set_title("Speed")
    changed = [r for r in rows if r[2] != float("inf")]  # "none" is the plain image itself
    _bars(
        b,
        [r[0] for r in changed],
        {"ours auto": [r[2] for r in changed]},
        "PSNR vs plain image, dB (higher = closer)",
    )
    b.set_title("Difference from the plain image")
    fig.suptitle(f"SD1.5-size random weights, bf16 — {BF16_CPU_NOTE}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "accel.png")


def plot_memory(results: Path, out: Path) -> Path:
    """The pre-run memory estimate against the measured peak RSS (bench/memory_estimate.py)."""
    cases = _load(results / "memory_estimate.json")
    labels = [c["case"] for c in cases]
    fig, ax = plt.subplots(figsize=(7, 2.8))
    series = {
        "estimated peak": [c["est_peak_mib"] for c in cases],
        "measured peak RSS": [c["peak_mib"] for c in cases],
    }
    COLORS.update({"estimated peak": "#90caf9", "measured peak RSS": "#3f51b5"})
    _bars(ax, labels, series, "MiB, SD1.5 in bf16")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Memory estimate vs peak — {BF16_CPU_NOTE}", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "memory_estimate.png")


def _pool(paths: Sequence[Path]) -> EvalReport:
    return pooled([report_from_dict(_load(p)) for p in paths])


def plot_default_model(results: Path, out: Path) -> list[Path]:
    """The shipped model's held-out scores per category, and overall along the models that led to it."""
    dm = results / "default-model"
    lf = dm / "longer-finetune"
    shipped = _pool([lf / "second-cycle" / f"eval_heldout_seed{s}.json" for s in (0, 4, 8, 12)])
    cats = list(shipped.categories)
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    values = [shipped.categories[c] for c in cats]
    lows = [shipped.categories[c] - shipped.interval(c)[0] for c in cats]
    highs = [shipped.interval(c)[1] - shipped.categories[c] for c in cats]
    ax.bar(cats, values, color="#3f51b5", yerr=[lows, highs], capsize=4)
    ax.axhline(0.75, color="#e65100", lw=1, ls="--", label="per-category goal 0.75")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% interval)")
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    ax.legend(loc="lower left", fontsize=8)
    lo, hi = shipped.overall_interval
    ax.set_title(
        f"Shipped model, held-out prompts, 16 images/prompt: overall {shipped.overall:.3f} "
        f"({lo:.2f}-{hi:.2f})",
        fontsize=9,
    )
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    first = _save(fig, out / "default_model_categories.png")

    models = [
        ("eps only", [dm / "previous-eps" / "eval_heldout.json"]),
        (
            "v, shift 3",
            [dm / "previous-shift3" / f for f in ("eval_heldout.json", "eval_heldout_seed4.json")],
        ),
        (
            "v, shift 2",
            [dm / "previous-shift2" / f for f in ("eval_heldout.json", "eval_heldout_seed4.json")],
        ),
        (
            "+ binding\ncontrast",
            [
                dm / "eval_heldout.json",
                dm / "eval_heldout_seed4.json",
                lf / "more-seeds" / "before_polish_seed8.json",
                lf / "more-seeds" / "before_polish_seed12.json",
            ],
        ),
        (
            "+ 1 polish\ncycle",
            [
                lf / "plus3000" / "eval_heldout.json",
                lf / "plus3000" / "eval_heldout_seed4.json",
                lf / "more-seeds" / "polished_seed8.json",
                lf / "more-seeds" / "polished_seed12.json",
            ],
        ),
        (
            "+ 2 polish cycles\n(shipped)",
            [lf / "second-cycle" / f"eval_heldout_seed{s}.json" for s in (0, 4, 8, 12)],
        ),
    ]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for i, (_label, paths) in enumerate(models):
        rep = _pool(paths)
        lo, hi = rep.overall_interval
        ax.errorbar(
            [i],
            [rep.overall],
            yerr=[[rep.overall - lo], [hi - rep.overall]],
            fmt="o",
            color="#3f51b5",
            capsize=4,
        )
        ax.annotate(
            f"{rep.overall:.3f}\n({4 * len(paths)} img/prompt)",
            (i, hi),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=7,
        )
    ax.axhline(0.90, color="#e65100", lw=1, ls="--", label="goal 0.90")
    ax.set_xticks(range(len(models)), [m[0] for m in models], fontsize=8)
    ax.set_ylim(0.6, 1.0)
    ax.set_ylabel("held-out overall (95% interval)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(
        "Default model: held-out prompt adherence, model by model (each row's own defaults)", fontsize=9
    )
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return [first, _save(fig, out / "default_model_history.png")]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "img")
    args = parser.parse_args()
    written = [
        plot_perf(args.results, args.out),
        plot_sdcpp(args.results, args.out),
        plot_accel(args.results, args.out),
        plot_memory(args.results, args.out),
        *plot_default_model(args.results, args.out),
    ]
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
