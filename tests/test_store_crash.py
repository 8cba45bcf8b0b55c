"""Crash safety: `kill -9` of `models add`, `promote` and `gc` at random points never leaves the store
inconsistent (verify passes; every version is whole or absent; the alias names a version that exists)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
from contextlib import closing

import pytest

from diffusekit.cli import main
from diffusekit.store import ModelStore
from diffusekit.store.audit import verify
from diffusekit.store.manifest import assemble
from store_helpers import create_tiny, fine_tune, one_thread  # noqa: F401 (autouse fixture)


def _child(args: list[str]) -> None:
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process ends here)
    os._exit(main(args))


def _run_and_kill(args: list[str], delay: float) -> int | None:
    """Run `diffusekit ARGS` in a forked child (already imported, so the time goes to the store operation
    itself) and SIGKILL it after `delay` s; returns its exit code (-9 when the kill landed)."""
    p = multiprocessing.get_context("fork").Process(target=_child, args=(args,))
    p.start()
    p.join(delay)
    if p.exitcode is None:
        os.kill(p.pid, signal.SIGKILL)
    p.join()
    return p.exitcode


def _consistent(store: ModelStore) -> None:
    report = verify(store)
    assert report["ok"], report["problems"]  # no missing or changed blob, aliases valid, database intact
    with closing(store._conn()) as c:
        for row in c.execute("SELECT name, current FROM models"):
            nums = (
                [v.version for v in store.versions(row["name"])] if store.names().count(row["name"]) else []
            )
            assert (row["current"] is None) == (not nums) and (
                row["current"] is None or row["current"] in nums
            )
    for name in store.names():
        for v in store.versions(name):  # whole: every tensor the manifest counts is readable
            assert len(assemble(v.manifest, store.blobs)) == v.manifest["stored"]["tensors"]


@pytest.mark.parametrize("seed", [0])
def test_kill_9_at_random_points_keeps_the_store_consistent(tmp_path, seed):
    rng = random.Random(seed)
    base = create_tiny(tmp_path / "base.safetensors")
    tunes = [fine_tune(base, tmp_path / f"ft{i}.safetensors", seed=i + 1) for i in range(3)]
    root = tmp_path / "store"
    store = ModelStore(root)
    store.add(base, "m", golden=False)
    s = ["--store", str(root)]
    outcomes = []
    # each operation's own duration on this machine, so that the kills land inside it whatever its speed
    took = {}
    for kind, args in (
        ("add", ["models", "add", str(tunes[0]), "--name", "m", "--no-golden", *s]),
        ("promote", ["models", "promote", "m@1", "--force", *s]),
        ("gc", ["models", "gc", *s]),
    ):
        t0 = time.perf_counter()
        assert _run_and_kill(args, 120) == 0
        took[kind] = time.perf_counter() - t0
    for i in range(18):
        kind = ("add", "promote", "gc")[i % 3]
        delay = rng.uniform(0, took[kind])
        if kind == "add":
            add = ["models", "add", str(rng.choice(tunes)), "--name", "m", "--no-golden", *s]
            code = _run_and_kill(add, delay)
        elif kind == "promote":
            target = rng.choice(store.versions("m")).ref
            code = _run_and_kill(["models", "promote", target, "--force", *s], delay)
        else:
            versions = store.versions("m")
            spare = [v for v in versions if not v.current]
            if spare:  # give gc something to delete
                store.remove(rng.choice(spare).ref)
            code = _run_and_kill(["models", "gc", *s], delay)
        outcomes.append((kind, code))
        _consistent(store)
    store.gc()  # whatever the kills left behind (blobs of an uncommitted add, temp files) goes
    _consistent(store)
    assert not verify(store)["unreferenced_blobs"] and not verify(store)["temp_files"]
    assert any(kind == "add" and code == -signal.SIGKILL for kind, code in outcomes), outcomes
