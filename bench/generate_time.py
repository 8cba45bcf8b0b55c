"""Wall time of `diffusekit generate "a red circle"` in a fresh process, model load included.

Usage: python bench/generate_time.py [--runs 5] [--model PATH] [--json out.json]
Each run is a new interpreter (imports, model load, 20 sampler steps, decode, PNG write), as a user
would experience it on a fresh shell.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", help="default: the bundled model")
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            cmd = [sys.executable, "-m", "diffusekit.cli", "generate", args.prompt, "--seed", str(i),
                   "-o", str(Path(tmp) / f"{i}.png"), "--json"]  # fmt: skip
            if args.model:
                cmd += ["--model", args.model]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return done.returncode
    result = {
        "command": f'diffusekit generate "{args.prompt}"',
        "runs": args.runs,
        "seconds_min": round(min(times), 3),
        "seconds_median": round(statistics.median(times), 3),
        "seconds_max": round(max(times), 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
