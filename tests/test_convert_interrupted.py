"""Issue 31, bug 12: `convert --format diffusers` onto an existing model, interrupted by kill -9 or SIGTERM,
never leaves a mixed model; partial folders are named, removed on SIGTERM and cleaned when stale."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from diffusekit.checkpoints.load import read_checkpoint
from helpers import make_checkpoint

# HARDB_SRC runs the converter from another checkout (e.g. main, to see this test fail before the fix).
SRC = Path(os.environ.get("HARDB_SRC", Path(__file__).resolve().parents[1] / "src"))


# ---------------------------------------------------------------------------------------------
# Bug 12: interrupted convert onto an existing diffusers model


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _component_digests(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def _convert_cmd(src: Path, dst: Path) -> list[str]:
    return [sys.executable, "-m", "diffusekit.cli", "convert", str(src), str(dst), "--format", "diffusers"]


def _convert(src: Path, dst: Path, env: dict[str, str]) -> None:
    """An uninterrupted convert: in this process (no interpreter and torch start-up to pay: only the
    killed runs need their own process), or from HARDB_SRC's checkout when that is set."""
    if "HARDB_SRC" in os.environ:
        subprocess.run(_convert_cmd(src, dst), check=True, env=env, capture_output=True)
        return
    from diffusekit.cli import main

    sigterm = signal.getsignal(signal.SIGTERM)  # convert makes SIGTERM unwind; not this process's
    try:
        assert main(["convert", str(src), str(dst), "--format", "diffusers"]) == 0
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def _wait_for_partial(parent: Path, proc: subprocess.Popen, timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if any(".diffusekit-partial-" in p.name for p in parent.iterdir()):
            return True
        time.sleep(0.005)
    return False


def _written_since(parent: Path, since: float) -> int:
    """How many files under `parent` were written after `since` (0 while a folder is renamed away)."""
    try:
        return sum(1 for p in parent.rglob("*") if p.is_file() and p.stat().st_mtime > since)
    except FileNotFoundError:
        return 0


# `diffusekit convert` in its own process that starts Python and imports the CLI first, then waits for a
# line on stdin before running: the next run to be killed starts up while this one is converted and killed
# (stdin closed without the line: it exits without converting)
_WARM = """import sys
import diffusekit.checkpoints.convert  # what convert runs, torch and all: the start-up to overlap
from diffusekit.cli import main
print("ready", flush=True)
sys.exit(main(sys.argv[1:]) if sys.stdin.readline() == "go\\n" else 3)
"""


_WARMED: list[subprocess.Popen] = []


def _warm_convert(src: Path, dst: Path, env: dict[str, str]) -> subprocess.Popen:
    argv = ["convert", str(src), str(dst), "--format", "diffusers"]
    proc = subprocess.Popen([sys.executable, "-c", _WARM, *argv], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    _WARMED.append(proc)
    return proc


def _kill_after(proc: subprocess.Popen, parent: Path, since: float, files: int, extra: float) -> None:
    """kill -9 `proc` once it has written `files` files under `parent` (any implementation: in a partial
    folder or in place), plus `extra` seconds."""
    while proc.poll() is None and _written_since(parent, since) < files:
        time.sleep(0.002)
    time.sleep(extra)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_loop_never_leaves_a_mixed_model(tmp_path):
    """kill -9 at random points of `convert --format diffusers` onto an existing model (after a random
    number of its files is written, plus a random delay): the folder is always the old model or the
    new one, complete, and it loads."""
    env = os.environ | {"PYTHONPATH": str(SRC)}
    dst = tmp_path / "out" / "model"
    dst.parent.mkdir()
    new_src = _mkdir(tmp_path / "new") / "tiny_sd1.safetensors"
    upcoming = _warm_convert(new_src, dst, env)  # the first run to kill starts up during the set-up
    try:
        _kill_loop(tmp_path, env, new_src, dst, upcoming)
    finally:
        for proc in _WARMED:
            if proc.poll() is None:  # left waiting by a failure
                proc.kill()
                proc.wait()
        _WARMED.clear()


def _kill_loop(tmp_path: Path, env: dict[str, str], new_src: Path, dst: Path, upcoming) -> None:
    _, _, old_src = make_checkpoint("tiny_sd1", _mkdir(tmp_path / "old"), seed=1)
    assert make_checkpoint("tiny_sd1", new_src.parent, seed=2)[2] == new_src
    _convert(new_src, dst, env)
    new = _component_digests(dst)
    files = sum(1 for p in dst.rglob("*") if p.is_file())
    _convert(old_src, dst, env)
    old = _component_digests(dst)
    assert old != new and old.keys() == new.keys()

    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0}
    kills = 6
    t0 = time.monotonic()
    for k in range(kills):
        proc = upcoming
        assert proc.stdout.readline() == b"ready\n"  # started up; it writes nothing before the go
        upcoming = _warm_convert(new_src, dst, env) if k + 1 < kills else None
        since = time.time()
        time.sleep(0.01)  # file times after this are the killed run's
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        _kill_after(proc, dst.parent, since, rng.randint(1, files), rng.uniform(0.0, 0.05))
        proc.stdin.close()
        proc.stdout.close()
        now = _component_digests(dst)
        assert now in (old, new), "a mixed model was left behind"
        outcomes["old" if now == old else "new"] += 1
        read_checkpoint(dst)  # and it loads
        if now == new:  # put the old model back, so the next kill has something to mix with
            _convert(old_src, dst, env)
    took = time.monotonic() - t0
    print(f"kill -9 x{kills} in {took:.0f} s ({files} files per model): {outcomes}")
    # A complete run afterwards leaves no partial folder of the killed runs behind.
    _convert(new_src, dst, env)
    assert _component_digests(dst) == new
    assert [p.name for p in dst.parent.iterdir()] == ["model"]


def test_sigterm_during_convert_removes_the_partial_folder(tmp_path):
    env = os.environ | {"PYTHONPATH": str(SRC)}
    _, _, src = make_checkpoint("tiny_sd1", _mkdir(tmp_path / "src"), seed=1)
    dst = tmp_path / "out" / "model"
    dst.parent.mkdir()
    proc = subprocess.Popen(
        _convert_cmd(src, dst), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert _wait_for_partial(dst.parent, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # it finished between the poll and the signal: a complete model
        read_checkpoint(dst)
    else:
        assert proc.returncode == 143 and b"Traceback" not in err
        assert not dst.exists()
    assert [p.name for p in dst.parent.iterdir()] in ([], ["model"])
