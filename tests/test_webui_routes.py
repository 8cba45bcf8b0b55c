"""The routes the web UI adds (server/presets.py, server/model_info.py) over real HTTP, and the page using
them in a real browser: presets kept per key on the server follow the user to another browser."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


from diffusekit.cli_generate import default_model_path  # noqa: E402
from diffusekit.server.app import create_app  # noqa: E402
from diffusekit.server.config import ServerConfig  # noqa: E402
from diffusekit.server.keys import KeyStore  # noqa: E402
from server_helpers import playwright_or_skip  # noqa: E402


def _app(data):
    return create_app(ServerConfig(data_dir=data, auth=True, default_model=default_model_path()))


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


def test_inspect_route_reports_the_default_model(tmp_path):
    key = KeyStore(tmp_path / "diffusekit.db").create("viewer", role="user")[1]
    srv = Served(tmp_path)
    try:
        status, out = srv.call("GET", "/v1/models/default/inspect", key)
        assert status == 200, out
        assert out["name"] == "default" and out["family"] == "sd1" and out["format"] == "safetensors"
        assert out["parameters"] == sum(out["components"].values()) > 0
        assert set(out["components"]) == {"unet", "vae", "text_encoder"}
        assert out["file_bytes"] > out["weight_bytes"] > 0
        assert out["autov2"] == out["sha256"][:10] == "e64d0b7cae"  # as the infotext's Model hash
        status, out = srv.call("GET", "/v1/models/nope/inspect", key)
        assert status == 404 and "default" in json.dumps(out)  # the message lists the valid names
        assert srv.call("GET", "/v1/models/default/inspect", "bad")[0] == 401
    finally:
        srv.stop()


def test_page_keeps_presets_on_the_server_and_shows_model_details(browser, tmp_path):
    sync_api = playwright_or_skip(module_level=False)
    key = KeyStore(tmp_path / "diffusekit.db").create("artist", role="user")[1]
    srv = Served(tmp_path)
    try:

        def open_page():
            ctx = browser.new_context()  # a fresh profile: no localStorage, no sessionStorage
            page = ctx.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.base + "/")
            page.get_by_label("API key", exact=True).fill(key)
            page.get_by_role("button", name="Use key").click()
            sync_api.expect(page.locator("#server-status")).to_have_text("Connected")
            sync_api.expect(page.get_by_role("dialog", name="API key needed")).to_be_hidden()
            return ctx, page, errors

        ctx, page, errors = open_page()
        page.get_by_label("Steps", exact=True).fill("21")
        page.get_by_label("CFG scale").fill("3.5")
        page.get_by_text("Manage presets").click()
        page.get_by_label("Preset name").fill("studio")
        page.get_by_role("button", name="Save preset").click()
        page.get_by_text('Saved preset "studio"').wait_for()
        group = page.locator("#preset optgroup").first.get_attribute("label")
        assert group == "Yours (saved on the server)"
        ctx.close()
        kept = srv.call("GET", "/v1/presets", key)[1][0]["params"]
        assert kept["steps"] == 21 and kept["cfg_scale"] == 3.5 and kept["model"] == "default"
        assert "prompt" not in kept

        ctx, page, errors = open_page()  # "another browser"
        page.get_by_label("Preset", exact=True).select_option(label="studio")
        page.get_by_role("button", name="Load preset").click()
        assert page.get_by_label("Steps", exact=True).input_value() == "21"
        assert page.get_by_label("CFG scale").input_value() == "3.5"
        # rename, then delete
        page.get_by_text("Manage presets").click()
        page.get_by_label("Preset name").fill("studio 2")
        page.get_by_role("button", name="Rename preset").click()
        page.get_by_text('Renamed "studio" to "studio 2"').wait_for()
        assert [p["name"] for p in srv.call("GET", "/v1/presets", key)[1]] == ["studio 2"]
        page.get_by_role("button", name="Delete preset").click()
        page.get_by_text('Deleted preset "studio 2"').wait_for()
        assert srv.call("GET", "/v1/presets", key)[1] == []

        page.get_by_role("tab", name="Models").click()
        row = page.get_by_role("row").filter(has_text="default")
        sync_api.expect(row).to_contain_text("sd1")
        sync_api.expect(row).to_contain_text("14.3 M (unet 6.2 M, vae 1.0 M, text_encoder 7.1 M)")
        sync_api.expect(row).to_contain_text("27.4 MB")
        sync_api.expect(row).to_contain_text("e64d0b7cae")
        if os.environ.get("DIFFUSEKIT_SHOTS"):
            page.screenshot(path=os.path.join(os.environ["DIFFUSEKIT_SHOTS"], "webui-models-inspect.png"))
        assert errors == []
        ctx.close()
    finally:
        srv.stop()


def test_webui_is_package_data():
    root = Path(__file__).resolve().parents[1]
    web = root / "src" / "diffusekit" / "webui"
    files = [p for p in web.rglob("*") if p.is_file()]
    assert (web / "index.html") in files
    assert sum(p.stat().st_size for p in files) < 300_000
    text = (root / "pyproject.toml").read_text()
    assert "webui/js/*.js" in text and "webui/*.html" in text
    # no download at run time: nothing points off the machine
    for p in files:
        body = p.read_text()
        assert "http://" not in body and "https://" not in body, p
