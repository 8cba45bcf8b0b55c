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
    _, _, old_src = make_checkpoint("tiny_sd1", _mkdir(tmp_path / "old"), seed=1)
    _, _, new_src = make_checkpoint("tiny_sd1", _mkdir(tmp_path / "new"), seed=2)
    dst = tmp_path / "out" / "model"
    dst.parent.mkdir()
    subprocess.run(_convert_cmd(new_src, dst), check=True, env=env, capture_output=True)
    new = _component_digests(dst)
    files = sum(1 for p in dst.rglob("*") if p.is_file())
    subprocess.run(_convert_cmd(old_src, dst), check=True, env=env, capture_output=True)
    old = _component_digests(dst)
    assert old != new and old.keys() == new.keys()

    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0}
    kills = 6
    t0 = time.monotonic()
    for _ in range(kills):
        since = time.time()
        time.sleep(0.01)  # file times after this are the killed run's
        proc = subprocess.Popen(_convert_cmd(new_src, dst), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        _kill_after(proc, dst.parent, since, rng.randint(1, files), rng.uniform(0.0, 0.05))
        now = _component_digests(dst)
        assert now in (old, new), "a mixed model was left behind"
        outcomes["old" if now == old else "new"] += 1
        read_checkpoint(dst)  # and it loads
        if now == new:  # put the old model back, so the next kill has something to mix with
            subprocess.run(_convert_cmd(old_src, dst), check=True, env=env, capture_output=True)
    took = time.monotonic() - t0
    print(f"kill -9 x{kills} in {took:.0f} s ({files} files per model): {outcomes}")
    # A complete run afterwards leaves no partial folder of the killed runs behind.
    subprocess.run(_convert_cmd(new_src, dst), check=True, env=env, capture_output=True)
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
