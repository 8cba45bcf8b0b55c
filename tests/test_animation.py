"""Animations: schedules, 2D warp, colour coherence, travel modes, outputs read back, kill + resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusekit.animation import warp as warp2d
from diffusekit.animation.render import AnimationError, AnimationSpec, MotionSettings, Renderer
from diffusekit.animation.schedule import ScheduleError, parse_prompts, parse_schedule
from diffusekit.animation.video import VideoError, check_output, write_video
from diffusekit.cli_generate import default_model_path
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline

# --- schedules -------------------------------------------------------------------------------


def test_schedule_interpolates_linearly_between_keyframes_and_holds_outside():
    s = parse_schedule("10: (1.0), 20: (2.0)")
    assert [s(f) for f in (0, 10, 15, 20, 30)] == [1.0, 1.0, 1.5, 2.0, 2.0]


def test_schedule_plain_number_and_forms_without_parentheses():
    assert parse_schedule("0.5").values(3) == [0.5, 0.5, 0.5]
    assert parse_schedule(2).values(2) == [2.0, 2.0]
    assert parse_schedule("0:1, 4:-3e-1").values(5)[-1] == pytest.approx(-0.3)


def test_schedule_curves_shape_the_path_but_keep_the_keyframes():
    lin, ease = parse_schedule("0: (0), 10: (1)"), parse_schedule("0: (0), 10: (1)", curve="ease-in")
    assert ease(0) == lin(0) == 0 and ease(10) == lin(10) == 1
    assert ease(3) < lin(3)
    assert parse_schedule("0: (0), 10: (1)", curve="step")(9) == 0


@pytest.mark.parametrize(
    "text, where",
    [("0: (1.0), 30 (1.02)", "character 11"), ("0: (1.0),, 3: (1)", "character 10"), ("abc", "character 1"),
     ("0: (1), 0: (2)", "appears twice"), ("0: (nan)", "character 1"), ("", "empty")],
)  # fmt: skip
def test_bad_schedules_name_the_position(text, where):
    with pytest.raises(ScheduleError, match=where):
        parse_schedule(text, name="--zoom")


def test_unknown_curve_and_bad_prompt_keyframes_are_clear_errors():
    with pytest.raises(ScheduleError, match="valid: linear"):
        parse_schedule("1", curve="wobbly")
    with pytest.raises(ScheduleError, match="not a frame number"):
        parse_prompts({"zero": "a"})
    assert list(parse_prompts({"24": "b", "0": "a"})) == [0, 24]


def test_spec_checks_name_the_setting():
    with pytest.raises(AnimationError, match="valid: travel, seed, motion"):
        AnimationSpec(mode="3d").check()
    with pytest.raises(AnimationError, match="at least two seeds"):
        AnimationSpec(mode="seed", seeds=(1,)).check()
    with pytest.raises(ScheduleError, match="--zoom"):
        AnimationSpec(mode="motion", motion=MotionSettings(zoom="0: oops")).check()
    assert AnimationSpec(frames=10, cadence=4).key_frames() == [0, 4, 8, 9]


# --- 2D motion -------------------------------------------------------------------------------


def _square(size=64, box=(24, 24, 40, 40), color=(255, 0, 0)) -> Image.Image:
    img = Image.new("RGB", (size, size), (0, 0, 0))
    img.paste(color, box)
    return img


def _centroid(img: Image.Image) -> tuple[float, float]:
    a = np.asarray(img)[..., 0].astype(float)
    ys, xs = np.nonzero(a > 127)
    return xs.mean(), ys.mean()


def test_warp_translation_moves_content_by_the_given_pixels():
    x0, y0 = _centroid(_square())
    x1, y1 = _centroid(warp2d.warp(_square(), tx=8, ty=-4))
    assert (x1 - x0, y1 - y0) == pytest.approx((8, -4), abs=0.6)


def test_warp_zoom_enlarges_about_the_centre_and_identity_is_exact():
    big = warp2d.warp(_square(), zoom=2.0)
    area = lambda im: (np.asarray(im)[..., 0] > 127).sum()  # noqa: E731
    assert area(big) == pytest.approx(4 * area(_square()), rel=0.15)
    assert _centroid(big) == pytest.approx(_centroid(_square()), abs=0.6)
    same = np.asarray(warp2d.warp(_square()))
    assert np.abs(same.astype(int) - np.asarray(_square())).max() <= 1


def test_color_match_moves_histograms_to_the_reference():
    rng = np.random.default_rng(0)
    src = Image.fromarray((rng.random((32, 32, 3)) * 120).astype(np.uint8))
    ref = Image.fromarray((rng.random((32, 32, 3)) * 100 + 140).astype(np.uint8))
    out = np.asarray(warp2d.match_colors(src, ref)).astype(float)
    assert abs(out.mean() - np.asarray(ref).mean()) < 6 < abs(np.asarray(src).mean() - np.asarray(ref).mean())
    lab = warp2d.rgb_to_lab(np.asarray(ref))
    assert np.abs(warp2d.lab_to_rgb(lab).astype(int) - np.asarray(ref)).max() <= 1


# --- outputs ---------------------------------------------------------------------------------


def _frames(n=5, size=(48, 32)):
    return [Image.new("RGB", size, (40 * i, 255 - 40 * i, 128)) for i in range(n)]


def test_mp4_reads_back_with_frame_count_fps_size_and_metadata(tmp_path):
    av = pytest.importorskip("av")
    out = write_video(_frames(), tmp_path / "a.mp4", 10, '{"k": 1}')
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        decoded = list(c.decode(s))
        assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (len(decoded), float(s.average_rate), s.width, s.height) == (5, 10.0, 48, 32)
        assert c.metadata.get("comment") == '{"k": 1}'
    mean = np.asarray(decoded[2].to_image()).reshape(-1, 3).mean(0)
    assert np.abs(mean - (80, 175, 128)).max() < 6  # the third frame's colour survives encoding
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("ext", ["gif", "webp"])
def test_gif_and_webp_read_back_with_frame_count_timing_and_metadata(tmp_path, ext):
    out = write_video(_frames(), tmp_path / f"a.{ext}", 10, "params")
    with Image.open(out) as im:
        assert (im.n_frames, im.size) == (5, (48, 32))
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()  # WebP reports a frame's duration once it is decoded
            durations.append(im.info["duration"])
        assert durations == [100] * 5
        if ext == "gif":
            assert im.info["comment"] == b"params"
        else:
            assert "params".encode("utf-16-be") in im.getexif()[0x9286]


def test_bad_outputs_are_refused_before_any_work(tmp_path):
    with pytest.raises(VideoError, match="valid: a .mp4, .gif or .webp"):
        check_output(tmp_path / "a.avi")
    with pytest.raises(VideoError, match="does not exist"):
        check_output(tmp_path / "missing" / "a.mp4")
    assert check_output(tmp_path / "frames") == "dir"


# --- rendering with the bundled default model --------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_file(default_model_path(), precision="fp32")


def _params(**kw):
    return GenerationParams(**{"prompt": "a red circle", "steps": 3, "cfg_scale": 2.0, "seed": 7, **kw})


def _pixels(paths):
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_prompt_travel_key_frames_equal_plain_generation_of_their_prompts(pipe, tmp_path):
    prompts = {0: "a red circle on the left", 3: "a blue square on the right"}
    spec = AnimationSpec(mode="travel", frames=4, prompts=prompts)
    files = Renderer(pipe, _params(), spec, tmp_path).render()
    for frame, prompt in prompts.items():
        alone = pipe.generate(_params().replace(prompt=prompt)).images[0]
        assert np.array_equal(_pixels([files[frame]])[0], np.asarray(alone))
    mid = _pixels(files[1:3])
    assert not np.array_equal(mid[0], mid[1])  # in between, the embeddings move


def test_seed_travel_starts_and_ends_on_its_seeds(pipe, tmp_path):
    spec = AnimationSpec(mode="seed", frames=5, seeds=(11, 12, 13))
    files = Renderer(pipe, _params(sampler="Euler"), spec, tmp_path).render()
    for frame, seed in ((0, 11), (2, 12), (4, 13)):
        alone = pipe.generate(_params(sampler="Euler").replace(seed=seed)).images[0]
        assert np.array_equal(_pixels([files[frame]])[0], np.asarray(alone))
    half = pipe.generate(_params(sampler="Euler", seed=11, subseed=12, subseed_strength=0.5)).images[0]
    assert np.array_equal(_pixels([files[1]])[0], np.asarray(half))


def test_motion_and_cadence_render_every_frame_reproducibly(pipe, tmp_path):
    spec = AnimationSpec(
        mode="motion", frames=5, cadence=2, motion=MotionSettings(zoom="1.1", angle="0: (5)")
    )
    a = Renderer(pipe, _params(), spec, tmp_path / "a").render()
    b = Renderer(pipe, _params(), spec, tmp_path / "b").render()
    assert len(a) == 5 and all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b), strict=True))
    with pytest.raises(AnimationError, match="already holds frames"):
        Renderer(pipe, _params(), spec, tmp_path / "a").render()
    other = AnimationSpec(mode="motion", frames=5, cadence=2)
    with pytest.raises(AnimationError, match="other settings"):
        Renderer(pipe, _params(), other, tmp_path / "a").render(resume=True)


# `diffusekit animate` in its own process, started up (Python, torch) before it is told to go with a line
# on stdin (closed without it: exits without rendering)
_WARM_CLI = """import sys
import diffusekit.animation.render
from diffusekit.cli import main
print("ready", flush=True)
sys.exit(main(sys.argv[1:]) if sys.stdin.readline() == "go\\n" else 3)
"""


def test_kill_9_during_a_render_then_resume_gives_the_uninterrupted_frames(tmp_path, capsys):
    from diffusekit.cli import main

    argv = ["animate", "a red circle", "--mode", "motion",
            "--frames", "6", "--cadence", "2", "--steps", "4", "--seed", "3", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cut = tmp_path / "cut"
    # the run to kill in its own process; it starts up (Python, torch) while the reference renders here
    pipe = subprocess.PIPE
    cmd = [sys.executable, "-c", _WARM_CLI, *argv, "-o", str(cut)]
    proc = subprocess.Popen(cmd, env=env, stdin=pipe, stdout=pipe, stderr=subprocess.DEVNULL)
    try:
        whole = tmp_path / "whole"
        assert main([*argv, "-o", str(whole)]) == 0  # the uninterrupted render, in this process
        capsys.readouterr()
        assert proc.stdout.readline() == b"ready\n"
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while not (cut / "frame_000002.png").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    assert not (cut / "frame_000005.png").exists(), "the render finished before it could be killed"
    assert main([*argv, "-o", str(cut), "--resume"]) == 0, capsys.readouterr().err
    done = capsys.readouterr().out
    names = [f"frame_{i:06d}.png" for i in range(6)]
    pairs = zip(_pixels([whole / n for n in names]), _pixels([cut / n for n in names]), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)
    assert json.loads(done)["frames"][-1].endswith(names[-1])


def test_cli_writes_a_gif_with_a_sidecar_and_first_frame_infotext(tmp_path):
    from diffusekit.cli import main
    from diffusekit.metadata import read_infotext

    out = tmp_path / "a.gif"
    prompts = json.dumps({"0": "a red circle", "2": "a green circle"})
    assert main(["animate", "x", "--prompts", prompts, "--frames", "3", "--steps", "2", "--seed", "1",
                 "-o", str(out), "--json"]) == 0  # fmt: skip
    with Image.open(out) as im:
        assert im.n_frames == 3
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["spec"]["prompts"] == {"0": "a red circle", "2": "a green circle"}
    assert "Animation: travel" in read_infotext(tmp_path / "a.frames" / "frame_000000.png")
