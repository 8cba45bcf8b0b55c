"""The sampler table in docs/guides/generation.md is written by hand: it must list the registry exactly."""

from __future__ import annotations

from pathlib import Path

from diffusekit.diffusion.samplers import SAMPLERS

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "generation.md"


def _table_rows() -> dict[str, list[str]]:
    """id -> the other cells of each row of the guide's sampler table."""
    lines = GUIDE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| id | A1111 name"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_sampler_table_matches_the_registry() -> None:
    rows = _table_rows()
    assert list(rows) == list(SAMPLERS), "the guide's sampler table lists other samplers than the registry"
    for sid, spec in SAMPLERS.items():
        name, schedule, calls, noise = rows[sid]
        assert name == spec.label, sid
        assert schedule == spec.default_schedule, sid
        assert calls == ("2" if spec.second_order else "1"), sid
        assert noise == ("yes" if spec.stochastic else "no"), sid
