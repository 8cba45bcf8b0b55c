"""The web UI in a real browser (Debian's Chromium through Playwright) against a real `diffusekit serve`."""

from __future__ import annotations

import base64
import io
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from server_helpers import Page, ServerProcess, make_key, playwright_or_skip, shot

sync_api = playwright_or_skip()  # skips this module when Chromium or Playwright is absent
STEPS = "4"


def models_folder(root: Path) -> Path:
    """A --models folder with a second model (a copy of the bundled one, under another name)."""
    from diffusekit.cli_generate import default_model_path

    folder = root / "models"
    folder.mkdir()
    shutil.copyfile(default_model_path(), folder / "second.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "data").mkdir()
    with ServerProcess(root / "data", "--no-auth", "--models", str(models_folder(root))) as srv:
        yield srv


def record_progress(page) -> None:
    """Collect every value the progress bar takes into window.__progress."""
    page.evaluate(
        """() => {
        window.__progress = [];
        const bar = document.getElementById('progress');
        new MutationObserver(() => window.__progress.push(Number(bar.getAttribute('aria-valuenow'))))
            .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
        window.__previews = 0;
        new MutationObserver(() => { window.__previews += 1; })
            .observe(document.getElementById('preview'), {attributes: true, attributeFilter: ['src']});
    }"""
    )


def fill_basics(page, prompt: str, seed: int, steps: str = STEPS) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Steps", exact=True).fill(steps)
    page.get_by_label("Seed", exact=True).fill(str(seed))


def gallery_png(page, index: int = 0) -> Image.Image:
    """The PNG behind the index-th gallery image (newest first), read back through the page."""
    b64 = page.evaluate(
        """async (i) => {
        const img = document.querySelectorAll('#gallery img')[i];
        const buf = await (await fetch(img.src)).arrayBuffer();
        let s = ''; for (const b of new Uint8Array(buf)) s += String.fromCharCode(b);
        return btoa(s);
    }""",
        index,
    )
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def generate_one(page, prompt: str, seed: int, steps: str = STEPS) -> None:
    before = page.locator("#gallery img").count()
    fill_basics(page, prompt, seed, steps)
    page.get_by_label("Prompt", exact=True).press("Control+Enter")
    page.wait_for_function(f"document.querySelectorAll('#gallery img').length > {before}", timeout=120_000)


# --- tests --------------------------------------------------------------------------------------


def _first_load(page, base: str) -> tuple[float, float, list]:
    """Load the page from scratch: (first paint ms, form ready ms, [(url, bytes)]) by the browser's clock."""
    page.goto(base + "/")
    page.wait_for_selector("body[data-loaded]")
    # the browser's own clock from navigation start: first paint of the form, and the form wired up
    paint = page.evaluate(
        "performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint').startTime"
    )
    ready = float(page.evaluate("document.body.dataset.ready"))
    sizes = page.evaluate(
        """() => performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))
            .map(e => [e.name, e.transferSize || e.encodedBodySize])"""
    )
    return paint, ready, sizes


def test_first_load_small_and_fast(ui, browser):
    """The page's first load transfers under 300 KB and shows the form in under 1 s on loopback."""
    page = ui.page
    paint, ready, sizes = _first_load(page, ui.base)
    total = sum(s for _, s in sizes)
    print(
        f"first load: {total} B in {len(sizes)} requests; form painted {paint:.0f} ms, ready {ready:.0f} ms"
    )
    assert total < 300_000, sizes
    assert page.get_by_label("Prompt", exact=True).is_visible()
    # the page's speed, not the machine's load: a busy shared machine can stall one load past the limit,
    # so a slow first load is retried (each a fresh browser context: nothing cached) and the best counts
    tries = [ready]
    while min(tries) >= 1000 and len(tries) < 3:
        again = Page(browser, ui.base)
        try:
            tries.append(_first_load(again.page, ui.base)[1])
            assert again.errors == []
        finally:
            again.close()
    assert min(tries) < 1000, f"the form was ready {min(tries):.0f} ms after navigation at best ({tries})"
    # the lists came from the server
    assert page.get_by_label("Model", exact=True).locator("option").count() >= 1
    assert page.get_by_label("Sampler", exact=True).locator("option").count() > 5
    shot(page, "empty")
    assert ui.errors == []


def test_generate_progress_gallery_infotext_and_reuse(ui):
    page = ui.open()
    # enough steps that a quiet machine (about 30 ms a step for this model) still shows steps in between
    fill_basics(page, "a red circle on a blue background", seed=1234, steps="100")
    record_progress(page)
    page.get_by_label("Prompt", exact=True).press("Control+Enter")
    page.get_by_text(re.compile(r"Step \d+/100")).first.wait_for(timeout=60_000)
    shot(page, "running")
    page.wait_for_function("document.querySelectorAll('#gallery img').length > 0", timeout=120_000)
    seen = page.evaluate("window.__progress")
    assert any(0 < v < 100 for v in seen), f"the bar never showed a step in between: {seen}"
    assert seen[-1] == 100
    assert page.evaluate("window.__previews") > 0, "no live preview was shown while sampling"
    assert "Done" in page.locator("#progress-text").inner_text()
    shot(page, "generate")

    img = gallery_png(page)
    assert img.info["parameters"].startswith("a red circle on a blue background")
    page.get_by_role("button", name="Open Result 1, seed 1234").click()
    info = page.get_by_label("Infotext").input_value()
    assert "Steps: 100" in info and "Seed: 1234" in info
    assert info == img.info["parameters"]
    shot(page, "viewer")

    # change the form, then reuse the image's parameters
    page.get_by_role("button", name="Close").click()
    page.get_by_label("Prompt", exact=True).fill("something else")
    page.get_by_label("Steps", exact=True).fill("30")
    page.get_by_role("button", name="Random seed").click()
    page.get_by_role("button", name="Open Result 1, seed 1234").click()
    page.get_by_role("button", name="Reuse parameters").click()
    assert page.get_by_label("Prompt", exact=True).input_value() == "a red circle on a blue background"
    assert page.get_by_label("Steps", exact=True).input_value() == "100"
    assert page.get_by_label("Seed", exact=True).input_value() == "1234"
    page.get_by_role("button", name="Random seed").click()
    page.get_by_role("button", name="Reuse last seed").click()
    assert page.get_by_label("Seed", exact=True).input_value() == "1234"
    assert ui.errors == []


def test_send_to_inpaint_paint_mask_keeps_unmasked_pixels(ui):
    page = ui.open()
    generate_one(page, "a green square", seed=5)
    source = np.asarray(gallery_png(page).convert("RGB")).astype(int)
    page.get_by_role("button", name="Open Result 1, seed 5").click()
    page.get_by_role("button", name="Send to inpaint").click()
    sync_api.expect(page.get_by_label("Inpaint", exact=True)).to_be_checked()
    sync_api.expect(page.get_by_label("Mask (paint the area to repaint)")).to_be_visible()

    # paint a stroke across the middle of the image
    page.get_by_label("Brush size").fill("10")
    canvas = page.get_by_label("Mask (paint the area to repaint)")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    page.get_by_label("Mask blur").fill("0")
    page.get_by_label("Denoising strength", exact=True).fill("1")
    page.get_by_label("Prompt", exact=True).fill("a yellow star")
    page.get_by_label("Seed", exact=True).fill("99")
    # "only masked" pastes the regenerated area back through the mask, so the rest keeps its pixels
    page.get_by_label("Only masked area").check()
    shot(page, "inpaint")
    mask = page.evaluate(
        """() => { const c = document.getElementById('mask-canvas');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return Array.from(px.filter((_, i) => i % 4 == 3)); }"""
    )
    mask = np.array(mask).reshape(source.shape[:2]) > 127
    assert 0 < mask.sum() < mask.size / 2

    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.querySelectorAll('#gallery img').length > 1", timeout=120_000)
    out = np.asarray(gallery_png(page, 0).convert("RGB")).astype(int)
    assert "Denoising strength: 1" in gallery_png(page, 0).info["parameters"]
    diff = np.abs(out - source).max(axis=2)
    # the painted area was regenerated; pixels away from it (beyond the latent's 8-pixel cells) are kept
    grown = mask.copy()
    for dy in range(-8, 9):
        for dx in range(-8, 9):
            grown |= np.roll(np.roll(mask, dy, 0), dx, 1)
    assert diff[mask].mean() > 10, "the masked area did not change"
    assert diff[~grown].max() == 0, f"unmasked pixels changed: max {diff[~grown].max()}"
    assert ui.errors == []


def test_cancel_running_job(ui):
    page = ui.open()
    fill_basics(page, "a slow one", seed=3, steps="150")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text(re.compile(r"Step \d+/150")).first.wait_for(timeout=60_000)  # any step: it runs
    t0 = time.perf_counter()
    page.get_by_role("button", name="Cancel").click()
    bar = page.get_by_role("progressbar", name="Progress")
    sync_api.expect(bar).to_have_attribute("aria-valuetext", "Cancelled", timeout=30_000)
    print(f"cancelled {time.perf_counter() - t0:.1f} s after the click")
    assert page.get_by_role("button", name="Cancel").is_disabled()
    assert page.locator("#gallery img").count() == 0
    assert ui.errors == []


def _drop_file(page, selector: str, data: bytes, name: str, mime: str = "image/png") -> None:
    """Drop a file on `selector` as a person dragging it from the desktop would."""
    handle = page.evaluate_handle(
        """([b64, name, mime]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: mime}));
        return dt;
    }""",
        [base64.b64encode(data).decode(), name, mime],
    )
    page.dispatch_event(selector, "dragenter", {"dataTransfer": handle})
    page.dispatch_event(selector, "dragover", {"dataTransfer": handle})
    page.dispatch_event(selector, "drop", {"dataTransfer": handle})


def test_drop_a1111_png_restores_parameters(ui):
    page = ui.open()
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "masterpiece, (castle:1.2), sunset\nNegative prompt: blurry, lowres\n"
        "Steps: 23, Sampler: Euler a, Schedule type: Karras, CFG scale: 6.5, Seed: 987654, Size: 96x128, "
        "Model hash: e64d0b7cae, Model: default, Version: v1.10.1",
    )
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "PNG", pnginfo=info)
    _drop_file(page, "#prompt", buf.getvalue(), "a1111.png")
    label = page.get_by_label
    page.wait_for_function("document.getElementById('prompt').value.startsWith('masterpiece')")
    assert label("Prompt", exact=True).input_value() == "masterpiece, (castle:1.2), sunset"
    assert label("Negative prompt").input_value() == "blurry, lowres"
    assert label("Steps", exact=True).input_value() == "23"
    assert label("CFG scale").input_value() == "6.5"
    assert label("Seed", exact=True).input_value() == "987654"
    assert label("Width").input_value() == "96" and label("Height").input_value() == "128"
    assert label("Sampler").evaluate("s => s.selectedOptions[0].textContent") == "Euler a"
    assert label("Schedule").evaluate("s => s.selectedOptions[0].textContent") == "Karras"
    assert label("Model", exact=True).input_value() == "default"

    # a PNG without parameters gets a message, not silence
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, "PNG")
    _drop_file(page, "#prompt", plain.getvalue(), "plain.png")
    page.get_by_text("carries no generation parameters").wait_for()
    assert ui.errors == []


def test_preset_saved_survives_reload(ui):
    page = ui.open()
    page.get_by_label("Steps", exact=True).fill("17")
    page.get_by_label("CFG scale").fill("4.5")
    page.get_by_label("Width").fill("128")
    page.get_by_label("Height").fill("96")
    page.get_by_text("Manage presets").click()
    page.get_by_label("Preset name").fill("my look")
    page.get_by_role("button", name="Save preset").click()
    page.get_by_text('Saved preset "my look"').wait_for()
    page.reload()
    page.wait_for_selector("body[data-loaded]")
    assert page.get_by_label("Steps", exact=True).input_value() == ""
    page.get_by_label("Preset", exact=True).select_option(label="my look")
    page.get_by_role("button", name="Load preset").click()
    assert page.get_by_label("Steps", exact=True).input_value() == "17"
    assert page.get_by_label("CFG scale").input_value() == "4.5"
    assert page.get_by_label("Width").input_value() == "128"
    assert page.get_by_label("Height").input_value() == "96"
    # a built-in preset
    page.get_by_label("Preset", exact=True).select_option(label="Fast draft")
    page.get_by_role("button", name="Load preset").click()
    assert page.get_by_label("Steps", exact=True).input_value() == "8"
    assert ui.errors == []


def test_api_error_shown_next_to_field(ui):
    page = ui.open()
    page.get_by_label("Prompt", exact=True).fill("x")
    page.get_by_label("Width").fill("100")  # not a multiple of 8
    page.get_by_role("button", name="Generate").click()
    err = page.locator("#err-width")
    err.wait_for()
    assert "width" in err.inner_text()
    assert page.get_by_label("Width").get_attribute("aria-invalid") == "true"


def test_queue_lists_jobs_and_reopens(ui):
    page = ui.open()
    generate_one(page, "a queue entry", seed=11)
    page.get_by_role("tab", name="Queue").click()
    row = page.get_by_role("row").filter(has_text="a queue entry").first
    row.wait_for()
    assert "succeeded" in row.inner_text()
    shot(page, "queue")
    row.get_by_role("button", name="Open").click()
    page.get_by_label("Infotext").wait_for()
    assert "a queue entry" in page.get_by_label("Infotext").input_value()
    page.get_by_role("button", name="Close").click()
    page.get_by_role("tab", name="Models").click()
    page.get_by_role("cell", name="default (current)").wait_for()
    shot(page, "models")
    # switching the current model (auth is off here: the caller is an admin)
    page.get_by_role("button", name="Use model second").click()
    page.get_by_role("cell", name="second (current)").wait_for(timeout=60_000)
    assert page.get_by_role("button", name="Use model default").count() == 1
    assert page.get_by_label("Model", exact=True).input_value() == "second"
    page.get_by_role("button", name="Use model default").click()
    page.get_by_role("cell", name="default (current)").wait_for(timeout=60_000)
    assert ui.errors == []


def test_phone_width_layout(browser, server):
    pg = Page(browser, server.base, width=390, height=844)
    try:
        page = pg.open()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways at phone width ({width} px)"
        assert page.get_by_role("button", name="Generate").is_visible()
        shot(page, "phone")
    finally:
        pg.close()


def test_wrong_key_shows_auth_message_then_a_good_key_works(browser, tmp_path):
    data = tmp_path / "auth"
    data.mkdir()
    key = make_key(data, "artist")  # as `diffusekit keys create artist` makes it
    srv = ServerProcess(data, "--models", str(models_folder(tmp_path))).start()  # auth on (the default)
    pg = Page(browser, srv.base)
    try:
        page = pg.page
        page.goto(srv.base + "/")
        dialog = page.get_by_role("dialog", name="API key needed")
        dialog.wait_for()
        assert "requires an API key" in dialog.inner_text()
        page.get_by_label("API key", exact=True).fill("dk-not-a-real-key")
        page.get_by_role("button", name="Use key").click()
        sync_api.expect(dialog).to_contain_text("The API key was refused")
        shot(page, "auth")
        page.get_by_label("API key", exact=True).fill(key)
        page.get_by_role("button", name="Use key").click()
        sync_api.expect(dialog).to_be_hidden()
        sync_api.expect(page.locator("#server-status")).to_have_text("Connected")
        assert page.get_by_label("Model", exact=True).input_value() == "default"
        # a user key may not switch the server's model: said next to the table, nothing switches
        page.get_by_role("tab", name="Models").click()
        page.get_by_role("button", name="Use model second").click()
        page.get_by_text("Only an admin key can switch the model").wait_for()
        sync_api.expect(page.get_by_role("cell", name="default (current)")).to_have_count(1)
    finally:
        pg.close()
        srv.stop()


def test_paste_mask_tools_and_outpaint_extend(ui):
    """Paste an image, paint/erase/invert/clear the mask, extend the canvas for outpainting."""
    page = ui.open()
    png = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(png, "PNG")
    page.evaluate(
        """(b64) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));
        document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));
    }""",
        base64.b64encode(png.getvalue()).decode(),
    )
    sync_api.expect(page.get_by_label("Image to image", exact=True)).to_be_checked()
    sync_api.expect(page.locator("#image-size")).to_have_text("96 × 64")
    assert page.get_by_label("Width").input_value() == "96"
    assert page.get_by_label("Height").input_value() == "64"
    page.get_by_label("Inpaint", exact=True).check()
    painted = """() => { const c = document.getElementById('mask-canvas');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < px.length; i += 4) n += px[i] > 127; return n; }"""

    def stroke(x0, x1):
        canvas = page.get_by_label("Mask (paint the area to repaint)")
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + box["width"] * x0, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * x1, box["y"] + box["height"] / 2, steps=5)
        page.mouse.up()

    page.get_by_label("Brush size").fill("8")
    stroke(0.2, 0.8)
    first = page.evaluate(painted)
    assert 0 < first < 96 * 64 / 2
    page.get_by_role("button", name="Eraser").click()
    assert page.get_by_role("button", name="Eraser").get_attribute("aria-pressed") == "true"
    stroke(0.2, 0.5)
    assert 0 < page.evaluate(painted) < first
    page.get_by_role("button", name="Eraser").click()
    page.get_by_role("button", name="Invert mask").click()
    inverted = page.evaluate(painted)
    assert inverted > 96 * 64 / 2
    page.get_by_role("button", name="Clear mask").click()
    assert page.evaluate(painted) == 0

    # outpaint: 16 pixels on the right and at the top, stretched from the edge, masked
    page.get_by_label("Right").check()
    page.get_by_label("Top").check()
    page.get_by_label("Pixels to add").fill("16")
    page.get_by_role("button", name="Extend canvas").click()
    sync_api.expect(page.locator("#image-size")).to_have_text("112 × 80")
    assert page.get_by_label("Width").input_value() == "112"
    assert page.get_by_label("Height").input_value() == "80"
    assert page.evaluate(painted) == 112 * 80 - 96 * 64
    corner = page.evaluate(
        "() => [...document.getElementById('image-canvas').getContext('2d').getImageData(111, 0, 1, 1).data]"
    )
    assert corner[:3] == [200, 30, 30]
    # inpainting with nothing painted is refused before any request, next to the image
    page.get_by_role("button", name="Clear mask").click()
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("Paint the area to repaint").wait_for()

    # dropping a file on the image area replaces the input image (and restores no parameters)
    other = io.BytesIO()
    Image.new("RGB", (128, 64), (0, 90, 200)).save(other, "PNG")
    _drop_file(page, "#dropzone", other.getvalue(), "dropped.png")
    sync_api.expect(page.locator("#image-size")).to_have_text("128 × 64")
    assert page.get_by_label("Width").input_value() == "128"
    assert page.evaluate(painted) == 0
    assert ui.errors == []


def test_every_control_has_a_name_and_the_keyboard_reaches_generate(ui):
    page = ui.open()
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !(el.textContent || '').trim())
            .map(el => el.outerHTML.slice(0, 80))"""
    )
    assert unnamed == []
    # Tab from the prompt walks to the Generate button without a mouse
    page.get_by_label("Prompt", exact=True).focus()
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "generate":
            break
    assert page.evaluate("document.activeElement.id") == "generate"
    # arrow keys move between the view tabs
    page.get_by_role("tab", name="Generate").focus()
    page.keyboard.press("ArrowRight")
    sync_api.expect(page.get_by_role("tab", name="Queue")).to_have_attribute("aria-selected", "true")
    sync_api.expect(page.locator("#view-queue")).to_be_visible()
    assert ui.errors == []


def test_batch_hires_fix_and_img2img(ui):
    page = ui.open()
    # a batch of two: seeds s and s+1, both in the gallery
    fill_basics(page, "two blue squares", seed=40, steps="3")
    page.get_by_label("Batch size").fill("2")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.querySelectorAll('#gallery img').length == 2", timeout=120_000)
    assert page.get_by_role("button", name="Open Result 1, seed 40").count() == 1
    assert page.get_by_role("button", name="Open Result 2, seed 41").count() == 1

    # hires fix: twice the size, recorded in the infotext
    page.get_by_label("Batch size").fill("1")
    page.get_by_text("Hires fix", exact=True).click()
    page.get_by_label("Enable hires fix").check()
    page.get_by_label("Upscale by").fill("2")
    page.get_by_label("Hires steps").fill("2")
    fill_basics(page, "a hires circle", seed=41, steps="3")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.querySelectorAll('#gallery img').length == 3", timeout=120_000)
    hires = gallery_png(page)
    assert hires.size == (128, 128)
    assert "Hires upscale: 2" in hires.info["parameters"]

    # send it to img2img and run at half strength
    page.get_by_role("button", name="Open Result 3, seed 41").click()
    page.get_by_role("button", name="Send to img2img").click()
    sync_api.expect(page.get_by_label("Image to image", exact=True)).to_be_checked()
    sync_api.expect(page.locator("#image-size")).to_have_text("128 × 128")
    page.get_by_label("Denoising strength", exact=True).fill("0.5")
    page.get_by_label("Resize mode").select_option(label="Crop and resize")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.querySelectorAll('#gallery img').length == 4", timeout=120_000)
    out = gallery_png(page)
    assert out.size == (128, 128)
    assert "Denoising strength: 0.5" in out.info["parameters"]
    assert "Hires upscale" not in out.info["parameters"]
    assert ui.errors == []


def test_models_page_lists_store_versions(browser, tmp_path):
    """A store model shows as NAME (current) and as each NAME@V with its family; "Use" on NAME@2 switches
    the server to that exact version."""
    from diffusekit.cli import main
    from store_helpers import create_tiny, fine_tune

    store = tmp_path / "store"
    base = create_tiny(tmp_path / "base.safetensors")
    for path in (base, fine_tune(base, tmp_path / "tuned.safetensors")):
        assert main(["models", "add", str(path), "--name", "m", "--store", str(store), "--no-golden"]) == 0
    (tmp_path / "data").mkdir()
    srv = ServerProcess(tmp_path / "data", "--no-auth", "--store", str(store)).start()
    pg = Page(browser, srv.base)
    try:
        page = pg.open()
        page.get_by_role("tab", name="Models").click()
        page.get_by_role("cell", name="m", exact=True).wait_for()  # the store's current version of m
        row = page.get_by_role("row").filter(has_text="m@2")
        row.wait_for()
        assert "sd1" in row.inner_text() and "store version" in row.inner_text()
        page.get_by_role("button", name="Use model m@2", exact=True).click()
        page.get_by_role("cell", name=re.compile(r"^m@2 \(current\)")).wait_for(timeout=60_000)
        assert pg.errors == []
    finally:
        pg.close()
        srv.stop()
