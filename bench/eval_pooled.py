"""Pool `diffusekit eval --json` runs at different seeds into one table with 95% intervals.

Usage: python bench/eval_pooled.py RUN.json [RUN.json ...] [--json out.json]
Why it exists: one eval run is 4 images per prompt, 24-32 images per category, and a category moves by
0.03-0.04 per image, so two seed blocks of the same model can differ by 0.12 in a category by chance.
Pooling the blocks (`diffusekit.eval.geneval.pooled`) judges the model on all their images at once;
the intervals (Wilson per category) say how far the scores can be trusted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusekit.eval.geneval import format_table, pooled, report_from_dict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="eval --json files of one model and prompt set")
    parser.add_argument("--json", help="write the pooled report here")
    args = parser.parse_args()
    report = pooled([report_from_dict(json.loads(Path(p).read_text())) for p in args.runs])
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))


if __name__ == "__main__":
    main()
