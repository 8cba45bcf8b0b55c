"""The web UI's Animate tab in a real browser (Debian's Chromium via Playwright) against `diffusekit serve`:
frame progress, the video shown and downloadable, a schedule error beside its field, stop."""

from __future__ import annotations

import re

import pytest

from server_helpers import ServerProcess, playwright_or_skip, shot

sync_api = playwright_or_skip()  # skips this module when Chromium or Playwright is absent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("ui-anim") / "data"
    data.mkdir()
    with ServerProcess(data, "--no-auth") as srv:
        yield srv


def _open_animate(page) -> None:
    page.get_by_role("tab", name="Animate").click()
    sync_api.expect(page.locator("#view-animate")).to_be_visible()
    page.get_by_label("Animation prompt").fill("a red circle")
    page.get_by_label("Frame size").select_option("64x64")
    page.get_by_label("Animation steps").fill("3")
    page.get_by_label("Animation seed").fill("7")


def _record_texts(page) -> None:
    page.evaluate(
        """() => { window.__texts = [];
        const t = document.getElementById('an-progress-text');
        new MutationObserver(() => window.__texts.push(t.textContent)).observe(t, {childList: true}); }"""
    )


@pytest.mark.parametrize("fmt", ["GIF", "MP4"])
def test_animate_tab_shows_frame_progress_and_the_video(ui, fmt):
    page = ui.open()
    _open_animate(page)
    page.get_by_label("Keyframed prompts").fill("0: a red circle\n3: a blue square")
    page.get_by_label("Frames", exact=True).fill("4")
    page.get_by_label("FPS").fill("8")
    page.get_by_label("Format").select_option(label=fmt)
    _record_texts(page)
    page.get_by_role("button", name="Animate", exact=True).click()
    page.get_by_text(re.compile(r"^Done: 4 frames, 64×64, 8 fps")).wait_for(timeout=120_000)
    texts = page.evaluate("window.__texts")
    assert any(re.match(r"Frame [1-4] of 4", t) for t in texts), texts
    link = page.get_by_role("link", name="Download video")
    assert link.get_attribute("href").startswith("blob:")
    assert link.get_attribute("download").endswith("." + fmt.lower())
    if fmt == "GIF":
        img = page.get_by_role("img", name="Animation", exact=True)
        sync_api.expect(img).to_be_visible()
        page.wait_for_function("document.getElementById('an-image').naturalWidth === 64")
    else:
        sync_api.expect(page.locator("#an-video")).to_be_visible()
        # the browser decodes the H.264 file: its size and length (4 frames at 8 fps)
        page.wait_for_function("document.getElementById('an-video').readyState >= 1", timeout=30_000)
        w, duration = page.evaluate("[document.getElementById('an-video').videoWidth, "
                                    "document.getElementById('an-video').duration]")  # fmt: skip
        assert w == 64 and duration == pytest.approx(0.5, abs=0.05)
    shot(page, f"animate-{fmt.lower()}")
    assert ui.errors == []


def test_schedule_error_is_shown_beside_its_field(ui):
    page = ui.open()
    _open_animate(page)
    page.get_by_label("Animation mode", exact=True).select_option("motion")
    page.get_by_label("Zoom").fill("0: (1.0), 30 (1.02)")
    page.get_by_role("button", name="Animate", exact=True).click()
    err = page.locator("#err-an-zoom")
    sync_api.expect(err).to_contain_text("character 11")
    assert page.get_by_label("Zoom").get_attribute("aria-invalid") == "true"
    # fields of other modes are hidden; a bad keyframe line is refused before anything is sent
    assert not page.get_by_label("Seeds").is_visible()
    page.get_by_label("Keyframed prompts").fill("zero: a")
    page.get_by_role("button", name="Animate", exact=True).click()
    sync_api.expect(page.locator("#err-an-prompts")).to_contain_text("line 1")
    assert [e for e in ui.errors if "422" not in e] == []  # the refused POST logs its 422 in the console


def test_stop_animation(ui):
    page = ui.open()
    _open_animate(page)
    page.get_by_label("Frames", exact=True).fill("40")
    page.get_by_label("Animation steps").fill("40")
    page.get_by_role("button", name="Animate", exact=True).click()
    page.get_by_text(re.compile(r"^Frame \d+ of 40 · step \d+/40")).wait_for(timeout=60_000)
    page.get_by_role("button", name="Stop animation").click()
    page.get_by_text("Cancelled", exact=True).wait_for(timeout=60_000)
    assert page.locator("#an-result").is_hidden()
    assert ui.errors == []
