"""The web UI's LoRA/embedding picker and the queue's views of non-generation jobs, in a real browser
(Debian's Chromium via Playwright) against `diffusekit serve` with a LoRA folder."""

from __future__ import annotations

import base64
import io
import re
import time

import pytest
import requests
import torch
from PIL import Image, ImageDraw

from server_helpers import Page, ServerProcess, make_key, playwright_or_skip, shot

sync_api = playwright_or_skip()  # skips this module when Chromium or Playwright is absent

STEPS = "3"


def _make_lora(path) -> None:
    """A kohya LoRA over the default model's attention layers with random (non-zero) up weights."""
    from diffusekit.adapters.train_lora import LoraTrainConfig, new_network
    from diffusekit.checkpoints.load import load_model
    from diffusekit.cli_generate import default_model_path

    loaded = load_model(default_model_path())
    net = new_network(loaded.model, path.stem, LoraTrainConfig(rank=2, alpha=2.0), 0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules.values():
            m.up.copy_(torch.randn(m.up.shape, generator=g) * 0.5)
    net.save(path, loaded.cfg, metadata={"ss_network_dim": "2"})


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("ui-lora")
    data, loras, embs = root / "data", root / "loras", root / "embeddings"
    for d in (data, loras, embs):
        d.mkdir()
    _make_lora(loras / "inkwash.safetensors")
    g = torch.Generator().manual_seed(1)
    torch.save({"string_to_param": {"*": torch.randn(1, 128, generator=g)}}, embs / "glimmer.pt")
    with ServerProcess(data, "--no-auth", "--loras", str(loras), "--embeddings", str(embs)) as srv:
        srv.loras = loras
        yield srv


def _wait_job(server, job_id: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = requests.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_picker_inserts_lora_and_embedding_and_the_job_uses_them(ui):
    page = ui.open()
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a red circle on grass")
    prompt.evaluate("el => el.setSelectionRange(5, 5)")  # the cursor after "a red"
    page.get_by_text("LoRAs and embeddings", exact=True).click()
    page.get_by_role("button", name="Insert LoRA inkwash").click()
    assert prompt.input_value() == "a red <lora:inkwash:1> circle on grass"
    # the search narrows the list; the embedding goes in at the (moved) cursor
    page.get_by_label("Search LoRAs and embeddings").fill("glim")
    sync_api.expect(page.get_by_role("button", name="Insert LoRA inkwash")).to_have_count(0)
    page.get_by_role("button", name="Insert embedding glimmer").click()
    assert prompt.input_value() == "a red <lora:inkwash:1> glimmer circle on grass"
    shot(page, "lora-picker")
    page.get_by_label("Steps", exact=True).fill(STEPS)
    page.get_by_label("Seed", exact=True).fill("3")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("document.querySelectorAll('#gallery img').length > 0", timeout=120_000)
    page.locator("#gallery button").first.click()
    info = page.get_by_label("Infotext").input_value()
    assert 'Lora hashes: "inkwash: ' in info and 'TI hashes: "glimmer: ' in info, info
    page.get_by_role("button", name="Close", exact=True).click()
    # reopening that job from the queue (twice) shows its image once
    row = page.get_by_role("row").filter(has_text="inkwash").first
    for _ in range(2):
        page.get_by_role("tab", name="Queue").click()
        row.get_by_role("button", name="Open").click()
        page.get_by_label("Infotext").wait_for()
        page.get_by_role("button", name="Close", exact=True).click()
    assert page.locator("#gallery img").count() == 1
    assert ui.errors == []


def test_refresh_shows_a_new_lora(ui, server):
    page = ui.open()
    page.get_by_text("LoRAs and embeddings", exact=True).click()
    page.get_by_role("button", name="Insert LoRA inkwash").wait_for()
    (server.loras / "second.safetensors").write_bytes((server.loras / "inkwash.safetensors").read_bytes())
    page.get_by_role("button", name="Refresh LoRA list").click()
    page.get_by_role("button", name="Insert LoRA second").wait_for()
    assert ui.errors == []


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_queue_opens_training_and_animation_jobs_in_their_own_views(ui, server):
    images = []
    for i in range(2):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse((8 + 6 * i, 10, 44 + 6 * i, 46), fill=(200, 30, 160))
        images.append({"image": _png_b64(img), "caption": "a zorblat shape"})
    params = {"name": "zorblat", "images": images, "steps": 4, "rank": 2, "lr": 0.01, "save_every": 2,
              "sample_every": 2, "sample_prompt": "a zorblat shape", "sample_steps": 1}  # fmt: skip
    r = requests.post(f"{server.url}/v1/jobs", json={"kind": "train_lora", "params": params}, timeout=30)
    assert r.status_code == 202, r.text
    train = _wait_job(server, r.json()["id"])
    assert train["state"] == "succeeded", train
    anim = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "frames": 2, "fps": 4,
            "format": "gif", "seed": 5}  # fmt: skip
    r = requests.post(f"{server.url}/v1/jobs", json={"kind": "animate", "params": anim}, timeout=30)
    assert r.status_code == 202, r.text
    assert _wait_job(server, r.json()["id"])["state"] == "succeeded"

    page = ui.open()
    page.get_by_role("tab", name="Queue").click()
    row = page.get_by_role("row").filter(has_text="LoRA zorblat").first
    row.get_by_role("button", name="Open").click()
    dialog = page.get_by_role("dialog", name=f"Training job {train['id'][:8]}: zorblat")
    dialog.wait_for()
    text = dialog.inner_text()
    assert "<lora:zorblat:1>" in text and "Final loss" in text
    assert f"{train['result']['final_loss']:.4g}" in text
    sync_api.expect(dialog.get_by_role("img", name="Loss curve")).to_be_visible()
    sync_api.expect(dialog.get_by_role("img", name="Sample at step 4: a zorblat shape")).to_be_visible()
    assert "2 images, every 2 steps" in text
    lowest = min(loss for _, loss in train["result"]["losses"])
    shown = re.search(r"Lowest loss\s+(\S+)", text).group(1)  # toPrecision(4) of the lowest logged loss
    assert shown != "NaN" and abs(float(shown) - lowest) <= 1e-3 * lowest, (shown, lowest)
    shot(page, "train-job")
    page.get_by_role("button", name="Use this LoRA in the prompt").click()
    sync_api.expect(page.locator("#view-generate")).to_be_visible()
    assert "<lora:zorblat:1>" in page.get_by_label("Prompt", exact=True).input_value()
    assert page.locator("#gallery img").count() == 0  # no generation form result was made up

    page.get_by_role("tab", name="Queue").click()
    anim_row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="animate", exact=True)).first
    anim_row.get_by_role("button", name="Open").click()
    sync_api.expect(page.locator("#view-animate")).to_be_visible()
    sync_api.expect(page.locator("#an-image")).to_be_visible()
    assert page.get_by_label("Animation prompt").input_value() == "a red circle"
    assert ui.errors == []


def _training_pngs(folder, n: int = 2) -> list:
    paths = []
    for i in range(n):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).rectangle((6 + 8 * i, 12, 40 + 8 * i, 50), fill=(20, 90, 200))
        paths.append(folder / f"shape{i}.png")
        img.save(paths[-1])
    return paths


def test_train_tab_trains_a_lora_that_the_picker_then_offers(ui, tmp_path):
    page = ui.open()
    page.get_by_role("tab", name="Train").click()
    sync_api.expect(page.locator("#view-train")).to_be_visible()
    page.get_by_role("button", name="Start training").click()  # nothing filled in: told what is missing
    sync_api.expect(page.locator("#tr-error")).to_contain_text("name")
    page.get_by_label("LoRA name").fill("bluebox")
    page.get_by_label("Caption for new images").fill("a bluebox shape")
    page.get_by_label("Choose training images").set_input_files([str(p) for p in _training_pngs(tmp_path)])
    sync_api.expect(page.get_by_label("Caption for shape1.png")).to_have_value("a bluebox shape")
    page.get_by_label("Caption for shape1.png").fill("a bluebox shape, shifted")
    page.get_by_label("Training steps").fill("6")
    page.get_by_label("LoRA rank").fill("2")
    page.get_by_label("Learning rate").fill("0.01")
    page.evaluate(
        """() => { window.__texts = [];
        const t = document.getElementById('tr-progress-text');
        new MutationObserver(() => window.__texts.push(t.textContent)).observe(t, {childList: true}); }"""
    )
    page.get_by_role("button", name="Start training").click()
    sync_api.expect(page.locator("#tr-progress-text")).to_contain_text("Done", timeout=180_000)
    texts = page.evaluate("window.__texts")
    assert any(re.match(r"Step \d+/6, loss \d", t) for t in texts), texts  # progress showed the loss
    sync_api.expect(page.locator("#tr-result-text")).to_contain_text("<lora:bluebox:1>")
    sync_api.expect(page.get_by_role("img", name="Training loss curve")).to_be_visible()
    shot(page, "train")
    page.get_by_role("tab", name="Generate").click()
    page.get_by_text("LoRAs and embeddings", exact=True).click()
    page.get_by_role("button", name="Insert LoRA bluebox").wait_for()
    assert ui.errors == []


def test_train_tab_shows_the_latest_samples_as_training_goes(ui, server, tmp_path):
    page = ui.open()
    page.get_by_role("tab", name="Train").click()
    page.get_by_label("LoRA name").fill("sampled_ui")
    page.get_by_label("Caption for new images").fill("a bluebox shape")
    page.get_by_label("Choose training images").set_input_files([str(p) for p in _training_pngs(tmp_path)])
    page.get_by_label("Training steps").fill("30")
    page.get_by_label("LoRA rank").fill("2")
    page.get_by_label("Sample every N steps").fill("10")
    page.get_by_label("Steps per sample image").fill("2")
    page.get_by_label("Sample prompts (one per line, up to 4)").fill("a bluebox shape\na red circle")
    page.evaluate(
        """() => { window.__shown = [];
        const box = document.getElementById('tr-samples');
        new MutationObserver(() => window.__shown.push([...box.querySelectorAll('figcaption')]
            .map((c) => c.textContent).join(' | '))).observe(box, {childList: true}); }"""
    )
    page.get_by_role("button", name="Start training").click()
    sync_api.expect(page.locator("#tr-progress-text")).to_contain_text("Done", timeout=180_000)
    shown = page.evaluate("window.__shown")
    # the newest step's images replaced the older ones while the job ran; both prompts at each step
    assert "Step 30: a bluebox shape | Step 30: a red circle" == shown[-1], shown
    assert any(s.startswith("Step 10: ") or s.startswith("Step 20: ") for s in shown), shown
    sync_api.expect(page.get_by_role("img", name="Sample at step 30: a red circle")).to_be_visible()
    first = page.get_by_role("img", name="Sample at step 30: a bluebox shape")
    assert first.evaluate("i => i.naturalWidth") == 64  # the PNG itself, fetched with the key
    shot(page, "train-samples")
    assert ui.errors == []


def test_train_tab_cancel(ui, server, tmp_path):
    page = ui.open()
    page.get_by_role("tab", name="Train").click()
    page.get_by_label("LoRA name").fill("never_written")
    page.get_by_label("Choose training images").set_input_files([str(p) for p in _training_pngs(tmp_path, 1)])
    page.get_by_label("Training steps").fill("5000")
    page.set_viewport_size({"width": 390, "height": 844})  # the tab fits a phone's width too
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the Train tab scrolls sideways at phone width ({width} px)"
    page.get_by_role("button", name="Start training").click()
    sync_api.expect(page.locator("#tr-progress-text")).to_contain_text("Step", timeout=120_000)
    page.get_by_role("button", name="Cancel training").click()
    sync_api.expect(page.locator("#tr-progress-text")).to_have_text("Training cancelled", timeout=60_000)
    sync_api.expect(page.get_by_role("button", name="Start training")).to_be_enabled()
    assert not (server.loras / "never_written.safetensors").exists()
    assert ui.errors == []


def test_train_tab_refuses_a_user_key_with_a_message(browser, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    key = make_key(data, "alice")
    srv = ServerProcess(data).start()
    pg = Page(browser, srv.url)
    try:
        page = pg.page
        page.goto(srv.url + "/")
        page.get_by_role("dialog", name="API key needed").wait_for()
        page.get_by_label("API key", exact=True).fill(key)
        page.get_by_role("button", name="Use key").click()
        sync_api.expect(page.locator("#server-status")).to_have_text("Connected")
        # a late 401 to a request sent before the key must not reopen the dialog over the tabs (CI stop 40)
        sync_api.expect(page.get_by_role("dialog", name="API key needed")).to_be_hidden()
        page.get_by_role("tab", name="Train").click()
        page.get_by_label("LoRA name").fill("nope")
        files = [str(p) for p in _training_pngs(tmp_path, 1)]
        page.get_by_label("Choose training images").set_input_files(files)
        page.get_by_role("button", name="Start training").click()
        sync_api.expect(page.locator("#tr-error")).to_contain_text("Only an admin key can train a LoRA")
        sync_api.expect(page.get_by_role("button", name="Start training")).to_be_disabled()
        # the 401s before the key and the 403 are the expected answers, logged by the browser as failed loads
        expected = re.compile(r"Failed to load resource: .* status of (401|403) ")
        assert [e for e in pg.errors if not expected.match(e)] == []
    finally:
        pg.close()
        srv.stop()
