"""/v1/presets over real HTTP: per-key storage, validation, rename by put+delete, survives a restart."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from starlette.routing import Mount  # noqa: E402

from diffusekit.server import presets  # noqa: E402
from diffusekit.server.app import create_app  # noqa: E402
from diffusekit.server.config import ServerConfig  # noqa: E402
from diffusekit.server.keys import KeyStore  # noqa: E402


def _app(data):
    app = create_app(ServerConfig(data_dir=data, auth=True))
    if not any(getattr(r, "path", "") == "/v1/presets" for r in app.router.routes):
        # wire the router as the app factory would: before the web UI's catch-all mount at "/"
        at = next(
            (i for i, r in enumerate(app.router.routes) if isinstance(r, Mount)), len(app.router.routes)
        )
        app.router.routes[at:at] = presets.router.routes
    return app


class Served:
    def __init__(self, data):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(_app(data), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def call(self, method, path, key, body=None):
        req = urllib.request.Request(self.base + path, method=method)
        req.add_header("Authorization", f"Bearer {key}")
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, data, timeout=10) as r:
                text = r.read()
                return r.status, json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def test_presets_per_key_and_durable(tmp_path):
    keys = KeyStore(tmp_path / "diffusekit.db")
    alice = keys.create("alice", role="user")[1]
    bob = keys.create("bob", role="user")[1]
    srv = Served(tmp_path)
    try:
        look = {"steps": 17, "cfg_scale": 4.5, "prompt": "dropped", "width": 128}
        status, out = srv.call("PUT", "/v1/presets/my%20look", alice, {"params": look})
        assert status == 200, out
        assert out["params"] == {"steps": 17, "cfg_scale": 4.5, "width": 128}
        assert srv.call("GET", "/v1/presets", alice)[1][0]["name"] == "my look"
        assert srv.call("GET", "/v1/presets", bob) == (200, [])  # another key sees none of them
        assert srv.call("DELETE", "/v1/presets/my%20look", bob)[0] == 404
        # bad input names the field
        status, out = srv.call("PUT", "/v1/presets/x", alice, {"params": {"steps": 0}})
        assert status == 422 and "steps" in json.dumps(out)
        status, out = srv.call("PUT", "/v1/presets/x", alice, {"params": {"restore_faces": True}})
        assert status == 422 and "restore_faces" in json.dumps(out)
        assert srv.call("GET", "/v1/presets", "wrong-key")[0] == 401
    finally:
        srv.stop()
    srv = Served(tmp_path)  # a restart keeps them
    try:
        assert [p["name"] for p in srv.call("GET", "/v1/presets", alice)[1]] == ["my look"]
        assert srv.call("DELETE", "/v1/presets/my%20look", alice)[0] == 204
        assert srv.call("GET", "/v1/presets", alice) == (200, [])
    finally:
        srv.stop()
