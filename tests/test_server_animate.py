"""Animate jobs on a real server: the video read back by PyAV / Pillow, per-frame progress over SSE,
cancel, bad params named, key ownership, frames equal to `diffusekit animate`, AnimateDiff by name."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import make_checkpoint
from server_helpers import ServerProcess, env, make_key

pytest.importorskip("fastapi")
av = pytest.importorskip("av")

GEN = dict(prompt="a red circle", width=64, height=64, steps=3, cfg_scale=2.0, sampler="Euler", seed=5)
DONE = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from diffusekit.animation.motion_module import MotionAdapter, MotionConfig

    tmp = tmp_path_factory.mktemp("anim")
    data, models, mm = tmp / "data", tmp / "models", tmp / "mm"
    for d in (data, models, mm):
        d.mkdir()
    cfg, _, _ = make_checkpoint("tiny_sd1", models)
    widths = tuple(m * cfg.unet.model_channels for m in cfg.unet.channel_mult)
    adapter = MotionAdapter(MotionConfig(channels=widths, layers_per_block=cfg.unet.num_res_blocks))
    save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, mm / "mm_tiny.safetensors")
    (tmp / "outside.safetensors").write_bytes(b"not reachable by name")
    (tmp / "motion_loras").mkdir()  # MotionLoRAs: the folder beside the motion modules
    lora = {}
    for name, p in adapter.named_parameters():
        if ".attention_blocks." in name and name.endswith(("to_q.weight", "to_v.weight")):
            stem = name.removesuffix(".weight").replace(".to_", ".processor.to_") + "_lora"
            lora[f"{stem}.down.weight"], lora[f"{stem}.up.weight"] = (
                torch.randn(2, p.shape[1]),
                torch.randn(p.shape[0], 2),
            )
    save_file(lora, tmp / "motion_loras" / "v2_lora_ZoomIn.safetensors")
    keys = {"alice": make_key(data, "alice"), "bob": make_key(data, "bob")}
    srv = ServerProcess(data, "--models", str(models), "--motion-modules", str(mm), "--max-frames", "48")
    srv.start()
    srv.keys, srv.data = keys, data
    yield srv
    srv.stop()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _submit(srv, params: dict, key: str = "alice") -> str:
    body = {"kind": "animate", "params": params}
    r = requests.post(f"{srv.url}/v1/jobs", json=body, headers=_h(srv.keys[key]), timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait(srv, job_id: str, key: str = "alice", timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{srv.url}/v1/jobs/{job_id}", headers=_h(srv.keys[key]), timeout=10).json()
        if job["state"] in DONE:
            return job
        time.sleep(0.1)
    raise TimeoutError(job_id)


def _get(srv, path: str, key: str = "alice") -> requests.Response:
    return requests.get(srv.url + path, headers=_h(srv.keys[key]), timeout=30)


def _frame(srv, image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(_get(srv, image["url"]).content)).convert("RGB"))


def test_mp4_job_with_frame_progress_events_and_owned_results(server):
    prompts = {"0": "a red circle", "5": "a blue square"}
    params = {**GEN, "frames": 6, "fps": 12, "cadence": 2, "prompts": prompts}
    job_id = _submit(server, params)
    h = _h(server.keys["alice"])
    progress, previews = [], 0
    with requests.get(f"{server.url}/v1/jobs/{job_id}/events", headers=h, stream=True, timeout=120) as r:
        event = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "progress":
                data = json.loads(line[5:])
                if "frames" in data:
                    progress.append((data["frame"], data["frames_done"], data["step"], data["total"]))
                previews += data.get("preview", "").startswith("data:image/png;base64,")
            elif line.startswith("data:") and event == "done":
                job = json.loads(line[5:])
                break
    assert job["state"] == "succeeded", job["error"]
    # frame i of N and the step within it, advancing; a preview of the latest frame came along
    assert progress and all(1 <= f <= 6 and 0 <= d <= 6 for f, d, _, _ in progress)
    assert max(d for _, d, _, _ in progress) >= 1 and any(t == 3 and s >= 1 for _, _, s, t in progress)
    assert [d for _, d, _, _ in progress] == sorted(d for _, d, _, _ in progress)
    assert previews >= 1
    assert job["progress"] == {**job["progress"], "frame": 6, "frames": 6, "frames_done": 6, "fraction": 1.0}
    video = job["video"]
    assert video["media_type"] == "video/mp4" and video["url"] == f"/v1/jobs/{job_id}/video"
    r = _get(server, video["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert len(r.content) == video["bytes"]
    with av.open(io.BytesIO(r.content)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert len(decoded) == 6 and stream.average_rate == 12
        assert (stream.codec_context.width, stream.codec_context.height) == (64, 64)
        assert json.loads(container.metadata["comment"])["spec"]["frames"] == 6
    part = requests.get(server.url + video["url"], headers={**h, "Range": "bytes=0-99"}, timeout=10)
    assert part.status_code == 206 and len(part.content) == 100  # a <video> element can seek
    # every frame is an image record; key frames carry their infotext and seed
    assert len(job["images"]) == 6
    assert job["images"][0]["seed"] == 5 and "Seed: 5" in job["images"][0]["infotext"]
    assert "Frame: 0" in job["images"][0]["infotext"] and "Animation: travel" in job["images"][0]["infotext"]
    assert job["images"][1]["infotext"].startswith("Interpolated frame 1")
    assert _frame(server, job["images"][0]).std() > 1
    # another key sees none of it
    for path in (f"/v1/jobs/{job_id}", video["url"], job["images"][0]["url"]):
        assert _get(server, path, "bob").status_code == 404, path
    # the render's work folder is gone; the video and its sidecar stay
    assert not (server.data / "animations" / job_id).exists()
    assert (server.data / "videos" / f"{job_id}.mp4").is_file()


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_gif_and_webp_read_back_by_pillow(server, fmt):
    # distinct frames (GIF merges repeated ones): prompt travel for the GIF, seed travel for the WebP
    travel = {"prompts": {"0": "a red circle", "2": "a blue square"}} if fmt == "gif" else {"mode": "seed"}
    if fmt == "webp":
        travel["seeds"] = [1, 2]
    job = _wait(server, _submit(server, {**GEN, "frames": 3, "fps": 10, "format": fmt, **travel}))
    assert job["state"] == "succeeded", job["error"]
    if fmt == "webp":  # seed travel starts on its first seed and ends on its last
        assert [im["seed"] for im in job["images"]][::2] == [1, 2]
    r = _get(server, job["video"]["url"])
    assert r.headers["content-type"] == f"image/{fmt}"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.n_frames == 3 and im.size == (64, 64)
        durations = []
        for i in range(3):
            im.seek(i)
            im.load()  # WebP reports a frame's duration once it is decoded
            durations.append(im.info["duration"])
        assert sum(durations) == pytest.approx(300, abs=10)  # 3 frames at 10 fps


def test_same_frames_and_video_as_the_cli(server, tmp_path):
    prompts = {"0": "a red circle", "4": "a blue square"}
    motion = {"zoom": "0: (1.0), 4: (1.1)", "angle": "2", "translation_x": "0: (0), 4: (3)"}
    motion["strength"] = "0.6"
    init = Image.new("RGB", (64, 64), (20, 40, 160))
    init.paste((230, 30, 20), (16, 20, 40, 44))
    init.save(tmp_path / "init.png")
    init_b64 = base64.b64encode((tmp_path / "init.png").read_bytes()).decode()
    params = {**GEN, "mode": "motion", "frames": 5, "cadence": 2, "interpolation": "blend",
              "prompts": prompts, "format": "gif", "init_image": init_b64, **motion}  # fmt: skip
    job = _wait(server, _submit(server, params))
    assert job["state"] == "succeeded", job["error"]
    out = tmp_path / "cli.gif"
    cmd = [sys.executable, "-m", "diffusekit.cli", "animate", GEN["prompt"], "--mode", "motion",
           "--prompts", json.dumps(prompts), "--frames", "5", "--cadence", "2", "--interpolation", "blend",
           "--zoom", motion["zoom"], "--angle", "2", "--translation-x", motion["translation_x"],
           "--strength", "0.6", "--steps", "3", "--cfg", "2", "--sampler", "Euler", "--seed", "5",
           "--width", "64", "--height", "64", "--init-image", str(tmp_path / "init.png"),
           "-o", str(out)]  # fmt: skip
    subprocess.run(cmd, env=env(), check=True, capture_output=True, timeout=180)
    frames = sorted((tmp_path / "cli.frames").glob("frame_*.png"))
    assert len(frames) == 5 == len(job["images"])
    for path, image in zip(frames, job["images"], strict=True):
        with Image.open(path) as cli:
            assert np.array_equal(np.asarray(cli.convert("RGB")), _frame(server, image)), path.name
            assert cli.info["parameters"] == image["infotext"]
    assert _get(server, job["video"]["url"]).content == out.read_bytes()  # the same GIF, byte for byte


def test_cancel_between_steps_leaves_no_video(server):
    job_id = _submit(server, {**GEN, "frames": 40, "steps": 40})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = _get(server, f"/v1/jobs/{job_id}").json()
        if job["state"] == "running" and job["progress"]["step"] >= 1:
            break
        time.sleep(0.05)
    r = requests.delete(f"{server.url}/v1/jobs/{job_id}", headers=_h(server.keys["alice"]), timeout=10)
    assert r.status_code == 200
    job = _wait(server, job_id)
    assert job["state"] == "cancelled" and job["video"] is None and job["images"] == []
    assert _get(server, f"/v1/jobs/{job_id}/video").status_code == 404
    assert not (server.data / "animations" / job_id).exists()


BAD = [
    ({"frames": 0}, "params.frames"),
    ({"frames": 49}, "params.frames"),  # over --max-frames 48
    ({"frames": 48, "width": 1024, "height": 1024}, "params.frames"),  # over the frame-pixel budget
    ({"fps": 0}, "params.fps"),
    ({"fps": 1000}, "params.fps"),
    ({"format": "avi"}, "params.format"),
    ({"mode": "3d"}, "params.mode"),
    ({"cadence": 0}, "params.cadence"),
    ({"curve": "wobbly"}, "params.curve"),
    ({"interpolation": "morph"}, "params.interpolation"),
    ({"width": 100}, "params.width"),
    ({"steps": 1000}, "params.steps"),
    ({"sampler": "warp drive"}, "params.sampler"),
    ({"batch_size": 2}, "params.batch_size"),
    ({"prompts": {"zero": "a"}}, "params.prompts"),
    ({"prompts": {"-1": "a"}}, "params.prompts"),
    ({"prompts": []}, "params.prompts"),
    ({"mode": "seed"}, "params.seeds"),
    ({"mode": "seed", "seeds": [1]}, "params.seeds"),
    ({"mode": "seed", "seeds": [1, -2]}, "params.seeds"),
    ({"seeds": [1, 2]}, "params.seeds"),  # not seed mode
    ({"mode": "motion", "zoom": "0: (1.0), 30 (1.02)"}, "character 11"),
    ({"mode": "motion", "angle": "0: (1), 0: (2)"}, "params.angle"),
    ({"mode": "motion", "strength": "0: (0.5), 10: (1.5)"}, "params.strength"),
    ({"mode": "motion", "zoom": "0"}, "params.zoom"),
    ({"mode": "motion", "color_coherence": "rgb"}, "params.color_coherence"),
    ({"zoom": "1.1"}, "params.zoom"),  # not motion mode
    ({"mode": "motion", "init_image": "0" * 32}, "params.init_image"),
    ({"mode": "animatediff"}, "params.motion_module"),
    ({"mode": "animatediff", "motion_module": "../outside"}, "params.motion_module"),
    ({"mode": "animatediff", "motion_module": "/etc/passwd"}, "params.motion_module"),
    ({"mode": "animatediff", "motion_module": "nope"}, "params.motion_module"),
    ({"mode": "animatediff", "motion_module": "mm_tiny", "cadence": 2}, "params.cadence"),
    ({"mode": "animatediff", "motion_module": "mm_tiny", "context": 4, "overlap": 4}, "params.overlap"),
    (
        {"mode": "animatediff", "motion_module": "mm_tiny", "motion_loras": [{"name": "../mm/mm_tiny"}]},
        "params.motion_loras[0].name",
    ),
    (
        {"mode": "animatediff", "motion_module": "mm_tiny", "motion_loras": [{"name": "nope"}]},
        "v2_lora_ZoomIn",
    ),  # the valid names are listed
    (
        {
            "mode": "animatediff",
            "motion_module": "mm_tiny",
            "motion_loras": [{"name": "v2_lora_ZoomIn", "weight": 9}],
        },
        "weight",
    ),
    ({"motion_loras": [{"name": "v2_lora_ZoomIn"}]}, "params.motion_loras"),  # not animatediff mode
    ({"model": "../default"}, "params.model"),
    ({"frames": 4, "bogus": 1}, "params.bogus"),
]


def test_bad_params_are_4xx_naming_the_field(server):
    failures = []
    for params, field in BAD:
        r = requests.post(
            f"{server.url}/v1/jobs",
            json={"kind": "animate", "params": params},
            headers=_h(server.keys["alice"]),
            timeout=10,
        )
        if not (400 <= r.status_code < 500) or field not in r.text:
            failures.append((params, r.status_code, r.text[:300]))
    r = requests.post(f"{server.url}/v1/jobs", json={"kind": "movie"}, headers=_h(server.keys["alice"]))
    if r.status_code != 422 or "animate" not in r.text or "kind" not in r.text:
        failures.append(("kind movie", r.status_code, r.text[:300]))
    assert not failures, failures
    jobs = _get(server, "/v1/jobs?limit=500").json()["jobs"]
    assert all(j["params"].get("frames") != 49 for j in jobs)  # nothing was queued


def test_animatediff_motion_module_by_name(server):
    listed = _get(server, "/v1/motion-modules").json()
    assert listed["motion_modules"] == [{"name": "mm_tiny", "kind": "file"}]
    assert listed["motion_loras"] == [{"name": "v2_lora_ZoomIn", "kind": "file"}]
    params = {**GEN, "model": "tiny_sd1", "mode": "animatediff", "motion_module": "mm_tiny", "frames": 4,
              "context": 4, "overlap": 1, "steps": 2, "format": "webp"}  # fmt: skip
    job = _wait(server, _submit(server, params))
    assert job["state"] == "succeeded", job["error"]
    assert len(job["images"]) == 4 and "Motion module: mm_tiny.safetensors" in job["images"][0]["infotext"]
    with Image.open(io.BytesIO(_get(server, job["video"]["url"]).content)) as im:
        assert im.n_frames == 4
    lora = {**params, "motion_loras": [{"name": "v2_lora_ZoomIn.safetensors", "weight": 0.5}]}
    with_lora = _wait(server, _submit(server, lora))
    assert with_lora["state"] == "succeeded", with_lora["error"]
    assert 'Motion LoRA: "v2_lora_ZoomIn.safetensors:0.5"' in with_lora["images"][0]["infotext"]
    assert not np.array_equal(_frame(server, with_lora["images"][1]), _frame(server, job["images"][1]))


def test_video_route_of_other_kinds_and_running_jobs(server):
    r = requests.post(f"{server.url}/v1/jobs", json={"kind": "txt2img", "params": GEN},
                      headers=_h(server.keys["alice"]), timeout=10)  # fmt: skip
    job = _wait(server, r.json()["id"])
    assert job["video"] is None and "frames" not in job["progress"]
    r = _get(server, f"/v1/jobs/{job['id']}/video")
    assert r.status_code == 404 and "only animate jobs" in r.text
