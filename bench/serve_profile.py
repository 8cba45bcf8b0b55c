"""Where a loaded server's time goes: `py-spy record` on a real `diffusekit serve` while 50 clients x 4 jobs
poll it (as bench/serve_load.py does), then the active samples split by thread and by the frames that
matter (U-Net sampling, previews, VAE decode, heartbeats; the event loop; job-status reads).

py-spy is a profiling tool, not a dependency: `pip install py-spy` first (no root needed for a child).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/serve_profile.py --batch 8 --poll 0.25 --seconds 40
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import cpu_kind, run_job  # noqa: E402
from server_helpers import ServerProcess  # noqa: E402

WORKER_FRAMES = {
    "sampling (U-Net and sampler)": "Pipeline._sample",
    "previews": "_preview (",
    "VAE decode of results": "Pipeline.decode (",
    "heartbeats": "heartbeat",
    "image writes": "ImageStore.write",
}
REQUEST_FRAMES = {
    "job status (GET /v1/jobs/{id})": "server/jobs_api.py",
    "of which SQLite": "SQLiteQueue.get (",
}


def split(raw: Path) -> dict:
    """Active samples per thread kind, and per frame of interest, from py-spy's raw (collapsed) output."""
    worker, requests_, counts = collections.Counter(), collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        n = int(n)
        if "JobRunner._loop" in stack:
            counts["worker thread"] += n
            for label, frame in WORKER_FRAMES.items():
                worker[label] += n if frame in stack else 0
        elif "MainThread" in stack.split(";", 1)[0]:
            counts["event loop thread"] += n
        elif "Queue.get (queue.py" not in stack:  # a request thread at work, not an idle one
            counts["request threads"] += n
            for label, frame in REQUEST_FRAMES.items():
                requests_[label] += n if frame in stack else 0
    return {"threads": dict(counts), "worker": dict(worker), "requests": dict(requests_)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--poll", type=float, default=0.25, help="clients' polling interval (s)")
    ap.add_argument("--seconds", type=int, default=40, help="how long py-spy records")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(tempfile.mkdtemp(prefix="serve_profile-"))
    (root / "data").mkdir()
    srv = ServerProcess(root / "data", "--no-auth", "--batch", str(args.batch)).start()
    try:
        run_job(requests.Session(), srv.url, 0, 8, 0.02)  # warm-up
        done: list = []

        def client(c: int) -> None:
            s = requests.Session()
            for j in range(4):
                done.append(run_job(s, srv.url, 100 + c * 4 + j, 8, args.poll))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(50)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(3)  # let the queue fill
        raw = root / "pyspy.txt"
        cmd = ["py-spy", "record", "-p", str(srv.proc.pid), "-d", str(args.seconds), "-r", "50"]
        spy = subprocess.Popen([*cmd, "-f", "raw", "-o", str(raw), "--threads"], stdout=subprocess.DEVNULL)
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        spy.wait()
    finally:
        srv.stop()
    report = {
        "cpu": cpu_kind(),
        "batch": args.batch,
        "poll_s": args.poll,
        "jobs": len(done),
        "jobs_s": round(len(done) / elapsed, 3),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "samples": split(raw),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
