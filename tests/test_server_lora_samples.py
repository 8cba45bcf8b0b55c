"""Sample images of a train_lora job (the CLI's --sample-every/--sample-prompt/--sample-steps): stored with
the job as training goes, listed in its status and its events while it runs, the same pixels as the CLI's
samples, and training unchanged by them. One real server (no auth, the bundled 64x64 model)."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from diffusekit.cli import main
from server_helpers import ServerProcess

PROMPTS = ["a zorblat shape", "a blue square"]
TRAIN = dict(steps=6, rank=2, alpha=2.0, lr=0.02, seed=5, save_every=3)
SAMPLES = dict(sample_every=3, sample_prompt=PROMPTS, sample_steps=2)


def _pngs() -> list[Image.Image]:
    out = []
    for i in range(2):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse((8 + 6 * i, 10, 44 + 6 * i, 46), fill=(200, 30, 160))
        out.append(img)
    return out


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMAGES = [{"image": _b64(img), "caption": "a zorblat shape"} for img in _pngs()]


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    data = tmp_path_factory.mktemp("lora-samples") / "data"
    data.mkdir()
    srv = ServerProcess(data, "--no-auth").start()
    yield srv
    srv.stop()


def _submit(srv, params: dict) -> requests.Response:
    return requests.post(f"{srv.url}/v1/jobs", json={"kind": "train_lora", "params": params}, timeout=30)


def _wait(srv, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{srv.url}/v1/jobs/{job_id}", timeout=10).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def _pixels(srv, url: str) -> tuple[np.ndarray, str]:
    r = requests.get(srv.url + url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    return np.asarray(img.convert("RGB")), img.info.get("parameters", "")


def test_samples_are_listed_while_training_and_equal_the_cli(server, tmp_path):
    r = _submit(server, {**TRAIN, **SAMPLES, "name": "sampled", "images": IMAGES})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    running_samples = []  # the samples an event listed while the job still trained
    with requests.get(f"{server.url}/v1/jobs/{job_id}/events", stream=True, timeout=180) as ev:
        for line in ev.iter_lines(decode_unicode=True):
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if data.get("state") == "running" and data.get("samples"):
                running_samples.append((data["step"], [(s["step"], s["prompt"]) for s in data["samples"]]))
            if data.get("state") in ("succeeded", "failed", "cancelled"):
                final = data
                break
    assert final["state"] == "succeeded", final
    # step 3's samples were announced before training reached its end
    assert any(
        samples == [(3, PROMPTS[0]), (3, PROMPTS[1])] and step < 6 for step, samples in running_samples
    ), running_samples
    job = _wait(server, job_id)
    assert [(s["step"], s["prompt"]) for s in job["samples"]] == [(3, p) for p in PROMPTS] + [
        (6, p) for p in PROMPTS
    ]
    assert final["samples"] == job["samples"]
    assert len(job["images"]) == 1  # the loss curve stays the job's one result image
    served = {}
    for s in job["samples"]:
        px, info = _pixels(server, s["url"])
        assert px.shape == (64, 64, 3) and info.startswith(s["prompt"]) and "Steps: 2," in info, info
        assert s["seed"] == TRAIN["seed"] and s["infotext"] == info
        served[(s["step"], s["prompt"])] = px
    assert not np.array_equal(served[(3, PROMPTS[0])], served[(6, PROMPTS[0])])  # the LoRA moved on

    # the CLI, on the same images and options, makes the same samples (one path to an image)
    folder = tmp_path / "data"
    folder.mkdir()
    for i, img in enumerate(_pngs()):
        img.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text("a zorblat shape")
    work = tmp_path / "work"
    args = ["train-lora", str(folder), "-o", str(tmp_path / "cli.safetensors"), "--work-dir", str(work),
            "--rank", "2", "--alpha", "2", "--lr", "0.02", "--steps", "6", "--seed", "5", "--save-every", "3",
            "--sample-every", "3", "--sample-prompt", PROMPTS[0], "--sample-steps", "2"]  # fmt: skip
    assert main(args) == 0
    for step in (3, 6):
        cli = np.asarray(Image.open(work / f"sample-{step:06d}.png").convert("RGB"))
        assert np.array_equal(cli, served[(step, PROMPTS[0])]), f"step {step}: server and CLI samples differ"


def test_sampling_leaves_training_unchanged(server):
    """The same job without samples writes the same LoRA tensors (sampling never touches the training)."""
    from safetensors.torch import load_file

    r = _submit(server, {**TRAIN, "name": "unsampled", "images": IMAGES})
    assert r.status_code == 202, r.text
    job = _wait(server, r.json()["id"])
    assert job["state"] == "succeeded" and job["samples"] == []
    loras = server.data / "loras"
    with_samples, without = (
        load_file(loras / "sampled.safetensors"),
        load_file(loras / "unsampled.safetensors"),
    )
    assert with_samples.keys() == without.keys()
    for k in with_samples:
        assert (with_samples[k] == without[k]).all(), k


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"sample_every": 3}, "params.sample_prompt"),  # every N steps of nothing
        ({"sample_every": 3, "sample_prompt": ["a", "b", "c", "d", "e"]}, "params.sample_prompt"),
        ({"sample_every": 3, "sample_prompt": "a <lora:nope:1> shape"}, "params.sample_prompt"),
        ({"sample_every": 3, "sample_prompt": ["ok", "x <lora:nope:1>"]}, "params.sample_prompt.1"),
        ({"sample_every": -1, "sample_prompt": "a"}, "sample_every"),
        ({"sample_every": 3, "sample_prompt": "a", "sample_steps": 0}, "sample_steps"),
    ],
)
def test_bad_sample_options_are_422_naming_the_field(server, extra, field):
    r = _submit(server, {**TRAIN, "name": "bad", "images": IMAGES[:1], **extra})
    assert r.status_code == 422 and field in r.text, r.text
