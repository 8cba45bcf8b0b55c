"""Load on a real `diffusekit serve` over loopback: N concurrent clients x M jobs against one sequential
client, with and without batching of compatible queued jobs.

Each client submits a job to /v1/jobs, polls it to the end, and submits the next. Checked: every job
succeeded exactly once with one intact PNG, and the server holds exactly the jobs submitted (none lost,
none duplicated). Reported: client latency p50/p95, throughput (jobs/s) against one sequential client,
peak server RSS (VmHWM). Default model, 64x64, fixed seeds (so jobs can be batched).

    PYTHONPATH=src python bench/serve_load.py --clients 50 --jobs 4 --steps 8 --batches 1,8 --polls 0.25,1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_helpers import ServerProcess  # noqa: E402

# Client polling intervals: one sequential client polls often (its latency is the job's); 50 concurrent
# clients polling every 20 ms kept the server busy answering them, so they poll every 0.25 s.
SEQ_POLL_S, CONC_POLL_S = 0.02, 0.25
PROMPTS = [
    "a red circle",
    "a blue square",
    "two green dots",
    "a yellow triangle on the left",
    "a purple star",
]


def cpu_kind() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
        flags = next(line for line in out.splitlines() if line.startswith("Flags"))
        bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
        return f"{model} ({os.cpu_count()} cores, {'native bf16' if bf16 else 'no native bf16'})"
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def run_job(session: requests.Session, url: str, n: int, steps: int, poll: float) -> tuple[str, float, dict]:
    params = {
        "prompt": PROMPTS[n % len(PROMPTS)],
        "seed": 1000 + n,
        "steps": steps,
        "width": 64,
        "height": 64,
        "sampler": "Euler a",
        "cfg_scale": 2.0,
    }
    t0 = time.perf_counter()
    r = session.post(url + "/v1/jobs", json={"kind": "txt2img", "params": params}, timeout=60)
    r.raise_for_status()
    job_id = r.json()["id"]
    while True:
        if poll > 0:
            job = session.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()
        else:  # long polling: the server answers when the job is done (or after 30 s)
            job = session.get(f"{url}/v1/jobs/{job_id}?wait=30", timeout=90).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job_id, time.perf_counter() - t0, job
        time.sleep(poll)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(
    batch: int, clients: int, jobs: int, seq_jobs: int, steps: int, poll: float = CONC_POLL_S
) -> dict:
    data = Path(tempfile.mkdtemp(prefix="serve_load-")) / "data"
    data.mkdir()
    srv = ServerProcess(data, "--no-auth", "--batch", str(batch)).start()
    load_before = os.getloadavg()
    try:
        s = requests.Session()
        run_job(s, srv.url, 0, steps, SEQ_POLL_S)  # warm-up (first-call overheads)
        t0 = time.perf_counter()
        seq = [run_job(s, srv.url, 1 + i, steps, SEQ_POLL_S) for i in range(seq_jobs)]
        seq_s = time.perf_counter() - t0
        results: list[tuple[str, float, dict]] = []
        lock = threading.Lock()

        def client(c: int) -> None:
            sess = requests.Session()
            for j in range(jobs):
                out = run_job(sess, srv.url, 100 + c * jobs + j, steps, poll)
                with lock:
                    results.append(out)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conc_s = time.perf_counter() - t0
        ids = [r[0] for r in results]
        listed = requests.get(srv.url + "/v1/jobs?limit=500", timeout=30).json()["jobs"]
        ok = [r for r in results if r[2]["state"] == "succeeded" and len(r[2]["images"]) == 1]
        pngs_ok = all(
            requests.get(srv.url + r[2]["images"][0]["url"], timeout=30).content.startswith(b"\x89PNG")
            for r in ok
        )
        lat = sorted(r[1] for r in results)
        return {
            "batch": batch,
            "jobs": len(results),
            "unique_ids": len(set(ids)),
            "succeeded_once": len(ok),
            "server_jobs": len(listed),
            "expected_server_jobs": 1 + seq_jobs + clients * jobs,
            "pngs_intact": pngs_ok,
            "attempts_max": max(r[2]["attempts"] for r in results),
            "p50_s": round(statistics.median(lat), 3),
            "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3),
            "throughput_jobs_s": round(len(results) / conc_s, 3),
            "sequential_jobs_s": round(seq_jobs / seq_s, 3),
            "sequential_latency_s": round(statistics.median(r[1] for r in seq), 3),
            "peak_rss_mib": round(peak_rss_mib(srv.proc.pid), 1),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        }
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=4, help="jobs per client")
    ap.add_argument("--seq-jobs", type=int, default=20, help="jobs of the sequential client")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batches", default="1,8", help="batch limits to compare (1 = no batching)")
    ap.add_argument(
        "--polls",
        default=str(CONC_POLL_S),
        help="concurrent clients' polling intervals to compare, in seconds (each with every batch limit; "
        "0: long polling with GET /v1/jobs/{id}?wait=30)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = [
        {**measure(int(b), args.clients, args.jobs, args.seq_jobs, args.steps, float(p)), "poll_s": float(p)}
        for p in args.polls.split(",")
        for b in args.batches.split(",")
    ]
    report = {
        "cpu": cpu_kind(),
        "omp_threads": os.environ["OMP_NUM_THREADS"],
        "clients": args.clients,
        "jobs_per_client": args.jobs,
        "polls_s": [float(p) for p in args.polls.split(",")],
        "steps": args.steps,
        "size": "64x64",
        "model": "default",
        "runs": rows,
    }
    print(json.dumps(report, indent=2))
    print(f"\nCPU: {report['cpu']}; {args.clients} clients x {args.jobs} jobs, {args.steps} steps, 64x64")
    print(
        "poll s | batch | jobs | lost/dup | p50 s | p95 s | jobs/s | seq jobs/s | ratio | peak RSS MiB | load"
    )
    for r in rows:
        bad = (r["expected_server_jobs"] - r["server_jobs"], r["jobs"] - r["unique_ids"])
        ratio = r["throughput_jobs_s"] / r["sequential_jobs_s"]
        print(
            f"{r['poll_s']:>6} | {r['batch']:>5} | {r['jobs']:>4} | {bad[0]}/{bad[1]} | "
            f"{r['p50_s']:>5} | {r['p95_s']:>5} | "
            f"{r['throughput_jobs_s']:>6} | {r['sequential_jobs_s']:>10} | {ratio:.2f}x | "
            f"{r['peak_rss_mib']} | {r['load_average_before_after']}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
