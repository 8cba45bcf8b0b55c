"""A real diffusekit server in a subprocess on a free loopback port, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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

    def start(self, timeout: float = 120) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "diffusekit.cli",
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
            cmd.append("--no-store")
        self.log = open(self.data.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env(), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not start")

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


def make_key(data: Path, name: str, role: str = "user", **kw) -> str:
    sys.path.insert(0, str(SRC))
    from diffusekit.server.keys import KeyStore

    _, raw = KeyStore(Path(data) / "diffusekit.db").create(name, role, **kw)
    return raw
