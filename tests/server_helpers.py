"""A real diffusekit server in a subprocess on a free loopback port, for the server tests; and the pieces
the web UI tests share for driving it in a real browser (Debian's Chromium through Playwright)."""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

SRC = Path(__file__).resolve().parent.parent / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(SRC) + os.pathsep + e.get("PYTHONPATH", "")
    # one compute thread per process: the tiny test model gains nothing from more, and on a busy shared
    # machine OpenMP's spinning threads make every step tens of times slower
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


class ServerProcess:
    """`diffusekit serve` on 127.0.0.1; `start()` waits until /health answers."""

    def __init__(self, data: Path, *extra: str, port: int | None = None):
        self.data, self.extra = Path(data), extra
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = self.url  # the web UI tests' name for it

    def start(self, timeout: float = 300) -> ServerProcess:
        argv = [
            "serve",
            "--port",
            str(self.port),
            "--data",
            str(self.data),
            "--preload",
            "default",
            *self.extra,
        ]
        if "--store" not in self.extra:  # not the per-user store of whoever runs the tests
            argv.append("--no-store")
        self.log = open(self.data.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = _WARM.run(argv, Path(self.log.name))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:  # not listening yet, or too busy to answer in time
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server did not answer /health in {timeout} s; see {self.log.name}")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "log", None):
            self.log.close()


# `diffusekit serve` in a process of its own that imports Python, torch, FastAPI and the app first, then
# waits for its arguments on stdin: the next server's start-up (most of a start on a busy machine) is paid
# while the tests of the current one run. Stdin closed instead: it exits.
_SERVE = """import json, os, sys
import uvicorn
import diffusekit.server.app
from diffusekit.cli import main
print("ready", flush=True)
line = sys.stdin.readline()
if not line:
    sys.exit(3)
job = json.loads(line)
fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.dup2(fd, 1)
os.dup2(fd, 2)
sys.exit(main(job["argv"]))
"""


class _WarmServers:
    """At most one started-up `diffusekit serve` process waiting for its arguments."""

    def __init__(self):
        self.waiting: subprocess.Popen | None = None
        self.env: dict[str, str] | None = None

    def _spawn(self) -> None:
        self.env = env()
        pipe = subprocess.PIPE
        self.waiting = subprocess.Popen([sys.executable, "-c", _SERVE], env=self.env, stdin=pipe, stdout=pipe)

    def run(self, argv: list[str], log: Path) -> subprocess.Popen:
        """A server process running `diffusekit <argv>` with its output appended to `log`."""
        if self.waiting is None or self.waiting.poll() is not None or self.env != env():
            self.discard()  # none yet, or started with another environment: a fresh one
            self._spawn()
        proc, self.waiting = self.waiting, None
        ready = proc.stdout.readline()
        if ready != b"ready\n":
            proc.wait(30)
            raise RuntimeError(f"the server process failed to start up ({proc.returncode}): {ready!r}")
        proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}).encode() + b"\n")
        proc.stdin.flush()
        proc.stdout.close()
        self._spawn()  # the next one starts up now
        return proc

    def discard(self) -> None:
        if self.waiting is not None:
            self.waiting.stdin.close()  # it exits
            self.waiting.wait(60)
            self.waiting.stdout.close()
            self.waiting = None


_WARM = _WarmServers()
atexit.register(_WARM.discard)


def make_key(data: Path, name: str, role: str = "user", **kw) -> str:
    sys.path.insert(0, str(SRC))
    from diffusekit.server.keys import KeyStore

    _, raw = KeyStore(Path(data) / "diffusekit.db").create(name, role, **kw)
    return raw


# --- the web UI in a real browser ----------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SHOTS = Path(os.environ["DIFFUSEKIT_SHOTS"]) if os.environ.get("DIFFUSEKIT_SHOTS") else None


def playwright_or_skip(module_level: bool = True):
    """playwright.sync_api, or skip (the calling module, or test) when Chromium or Playwright is absent."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)", allow_module_level=module_level)
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


class Page:
    """A page on the UI in a fresh browser context (no storage) that records console errors and uncaught
    exceptions."""

    def __init__(self, browser, base: str, width: int = 1280, height: int = 800):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.base = base

    def open(self):
        self.page.goto(self.base + "/")
        self.page.wait_for_selector("body[data-loaded]")
        return self.page

    def close(self):
        self.context.close()


def shot(page, name: str) -> None:
    """A screenshot into $DIFFUSEKIT_SHOTS (for the docs) when it is set."""
    if SHOTS is not None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"webui-{name}.png"))
