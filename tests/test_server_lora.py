"""LoRAs and embeddings in the server: A1111's list routes, <lora:NAME:W> and embedding names through both
APIs equal to the CLI, the base model untouched afterwards, 422 for unknown names, no path traversal, and a
train_lora job whose LoRA is then usable in prompts. One real server (auth on, the bundled 64x64 model)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageDraw

from diffusekit.cli import main
from server_helpers import ServerProcess, env, make_key
from store_helpers import create_tiny

GEN = dict(seed=11, steps=3, width=64, height=64, cfg_scale=3.0)
SAMPLER = "Euler a"
SD3 = "sd35"
PROMPT = "a red circle <lora:styl:0.8:0.6> near zorb"


def _make_lora(path: Path, seed: int = 0) -> None:
    """A kohya LoRA over the default model's attention layers with random (non-zero) up weights."""
    from diffusekit.adapters.train_lora import LoraTrainConfig, new_network
    from diffusekit.checkpoints.load import load_model
    from diffusekit.cli_generate import default_model_path

    loaded = load_model(default_model_path())
    net = new_network(loaded.model, path.stem, LoraTrainConfig(rank=2, alpha=2.0, train_text_encoder=True), 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules.values():
            m.up.copy_(torch.randn(m.up.shape, generator=g) * 0.5)
    meta = {"ss_output_name": "styl_alias", "ss_network_dim": "2", "ss_tag_frequency": '{"a": {"b": 1}}'}
    net.save(path, loaded.cfg, metadata=meta)


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("srvlora")
    data, loras, embs = root / "data", root / "loras", root / "embeddings"
    for d in (data, loras, embs):
        d.mkdir()
    _make_lora(loras / "styl.safetensors")
    g = torch.Generator().manual_seed(1)
    torch.save({"string_to_param": {"*": torch.randn(2, 128, generator=g)}, "step": 40, "name": "zorb"},
               embs / "zorb.pt")  # fmt: skip
    torch.save({"string_to_param": {"*": torch.randn(1, 768, generator=g)}}, embs / "wide.pt")  # SD1 width
    outside = root / "outside.safetensors"
    _make_lora(outside, seed=3)
    (loras / "escape.safetensors").symlink_to(outside)  # leads out of the folder: never offered
    keys = {"admin": make_key(data, "boss", "admin"), "alice": make_key(data, "alice")}
    # a model store with a tiny SD1 model (a training base) and a models folder with a tiny SD3.5 file
    models, store = root / "models", root / "store"
    models.mkdir()
    assert main(["create", "tiny_sd35", str(models / "sd35.safetensors"), "--seed", "1"]) == 0
    tiny = create_tiny(root / "tiny.safetensors")
    assert main(["models", "add", str(tiny), "--name", "m", "--store", str(store)]) == 0
    extra = ("--loras", str(loras), "--embeddings", str(embs), "--models", str(models), "--store", str(store))
    srv = ServerProcess(data, *extra).start()
    srv.keys, srv.loras, srv.embs, srv.root = keys, loras, embs, root
    yield srv
    srv.stop()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _wait(srv, key: str, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{srv.url}/v1/jobs/{job_id}", headers=_h(key), timeout=10).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise TimeoutError(job_id)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _a1111(srv, path: str, body: dict) -> tuple[np.ndarray, dict]:
    body = {"sampler_name": SAMPLER, **body}
    r = requests.post(srv.url + path, json=body, headers=_h(srv.keys["alice"]), timeout=180)
    assert r.status_code == 200, r.text
    out = r.json()
    return _pixels(base64.b64decode(out["images"][0])), json.loads(out["info"])


def _job(srv, kind: str, params: dict, key: str = "alice") -> tuple[np.ndarray, dict]:
    params = {"sampler": SAMPLER, **params}
    r = requests.post(srv.url + "/v1/jobs", json={"kind": kind, "params": params}, headers=_h(srv.keys[key]),
                      timeout=30)  # fmt: skip
    assert r.status_code == 202, r.text
    job = _wait(srv, srv.keys[key], r.json()["id"])
    assert job["state"] == "succeeded", job
    png = requests.get(srv.url + job["images"][0]["url"], headers=_h(srv.keys[key]), timeout=10).content
    return _pixels(png), job


def test_list_routes_have_a1111_shapes(server):
    h = _h(server.keys["alice"])
    broken = server.embs / "broken.pt"
    broken.write_bytes(b"not an embedding")  # listed as unreadable, never fatal (removed below: the CLI
    # refuses a folder with a broken file, and the parity test runs the CLI on this folder)
    loras = requests.get(server.url + "/sdapi/v1/loras", headers=h, timeout=10).json()
    assert [x["name"] for x in loras] == ["styl"]  # the symlink out of the folder is not offered
    item = loras[0]
    assert set(item) == {"name", "alias", "path", "metadata"}
    assert item["alias"] == "styl_alias" and item["path"] == "styl.safetensors"
    assert item["metadata"]["ss_tag_frequency"] == {"a": {"b": 1}}  # JSON metadata decoded, as A1111
    embs = requests.get(server.url + "/sdapi/v1/embeddings", headers=h, timeout=30).json()
    assert set(embs) == {"loaded", "skipped"}
    fields = {"step", "sd_checkpoint", "sd_checkpoint_name", "shape", "vectors"}
    assert embs["loaded"] == {"zorb": {"step": 40, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                       "shape": 128, "vectors": 2}}  # fmt: skip
    assert set(embs["skipped"]) == {"wide"} and set(embs["skipped"]["wide"]) == fields
    for route in ("/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-embeddings"):
        assert requests.post(server.url + route, headers=h, timeout=10).status_code == 200
    native = requests.get(server.url + "/v1/loras", headers=h, timeout=10).json()
    assert native[0]["name"] == "styl" and native[0]["prompt"] == "<lora:styl:1>" and native[0]["rank"] == "2"
    emb = requests.get(server.url + "/v1/embeddings", headers=h, timeout=30).json()
    assert [e["name"] for e in emb["loaded"]] == ["zorb"] and [e["name"] for e in emb["skipped"]] == ["wide"]
    assert [e["name"] for e in emb["unreadable"]] == ["broken"]
    broken.unlink()
    assert requests.get(server.url + "/sdapi/v1/loras", timeout=10).status_code == 401


def _cli(tmp: Path, server, init: Path) -> dict[str, np.ndarray]:
    """The CLI's images for the same params, in one subprocess (threads as the server's)."""
    common = ["--seed", "11", "--steps", "3", "--width", "64", "--height", "64", "--cfg", "3",
              "--sampler", SAMPLER, "--loras", str(server.loras),
              "--embeddings", str(server.embs)]  # fmt: skip
    runs = {
        "lora": ["generate", PROMPT, *common, "-o", str(tmp / "lora.png")],
        "base": ["generate", "a red circle near zorb", *common, "-o", str(tmp / "base.png")],
        "i2i": ["img2img", PROMPT, *common, "--image", str(init), "--strength", "0.6",
                "-o", str(tmp / "i2i.png")],
    }  # fmt: skip
    script = "import sys, json\nfrom diffusekit.cli import main\nfor argv in json.loads(sys.argv[1]):\n"
    script += "    assert main(argv) == 0\n"
    done = subprocess.run([sys.executable, "-c", script, json.dumps(list(runs.values()))], env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = {k: np.asarray(Image.open(tmp / f"{k}.png").convert("RGB")) for k in runs}
    out["lora_info"] = Image.open(tmp / "lora.png").info["parameters"]
    return out


def test_lora_and_embedding_prompts_equal_the_cli_and_leave_the_base_untouched(server, tmp_path):
    init_img = Image.new("RGB", (64, 64), (30, 90, 200))
    ImageDraw.Draw(init_img).rectangle((16, 16, 48, 48), fill=(240, 200, 20))
    init = tmp_path / "init.png"
    init_img.save(init)
    base_before, _ = _a1111(server, "/sdapi/v1/txt2img", {**GEN, "prompt": "a red circle near zorb"})
    cli = _cli(tmp_path, server, init)
    via_a1111, info = _a1111(server, "/sdapi/v1/txt2img", {**GEN, "prompt": PROMPT})
    via_jobs, job = _job(server, "txt2img", {**GEN, "prompt": PROMPT})
    assert np.array_equal(cli["lora"], via_a1111) and np.array_equal(cli["lora"], via_jobs)
    assert not np.array_equal(cli["lora"], cli["base"])  # the LoRA does change the image
    text = info["infotexts"][0]
    assert text == cli["lora_info"] == job["images"][0]["infotext"]
    assert 'Lora hashes: "styl: ' in text and 'TI hashes: "zorb: ' in text
    # img2img through both APIs equals the CLI's img2img
    i2i = {**GEN, "prompt": PROMPT, "denoising_strength": 0.6}
    a_i2i, _ = _a1111(server, "/sdapi/v1/img2img", {**i2i, "init_images": [_png_b64(init_img)]})
    j_i2i, _ = _job(server, "img2img", {**i2i, "init_image": _png_b64(init_img)})
    assert np.array_equal(cli["i2i"], a_i2i) and np.array_equal(cli["i2i"], j_i2i)
    # the loaded model is bit-identical after the LoRA jobs: the next plain job equals a fresh CLI run
    base_after, info = _a1111(server, "/sdapi/v1/txt2img", {**GEN, "prompt": "a red circle near zorb"})
    assert np.array_equal(base_after, cli["base"]) and np.array_equal(base_before, cli["base"])
    assert "Lora hashes" not in info["infotexts"][0] and "TI hashes" in info["infotexts"][0]


def test_unknown_or_escaping_names_are_422_naming_them(server):
    h = _h(server.keys["alice"])
    before = len(requests.get(server.url + "/v1/jobs", headers=h, timeout=10).json()["jobs"])
    for prompt, expect in (
        ("x <lora:nope:1>", "'nope'"),
        ("x <lora:../../outside:1>", "'../../outside'"),
        ("x <lora:escape:1>", "'escape'"),
        ("x <lora:styl:abc>", "not a number"),
        ("x <hypernet:styl:1>", "unsupported extra network"),
    ):
        for path, body in (
            ("/sdapi/v1/txt2img", {**GEN, "prompt": prompt}),
            ("/v1/jobs", {"kind": "txt2img", "params": {**GEN, "prompt": prompt}}),
        ):
            r = requests.post(server.url + path, json=body, headers=h, timeout=30)
            assert r.status_code == 422, (path, prompt, r.text)
            assert expect in r.json()["error"] and "prompt" in r.json()["error"], r.text
            if "valid" in r.json()["error"]:
                assert "styl" in r.json()["error"]  # the valid names are listed
    assert len(requests.get(server.url + "/v1/jobs", headers=h, timeout=10).json()["jobs"]) == before
    # a LoRA made for another family (SDXL names) matches no layer: refused, never a silent no-op
    from diffusekit.checkpoints.single_file import save_state_dict

    sd = {}  # SDXL's deep transformer blocks: no layer of an SD1 model has these names
    for xl in (
        "lora_unet_input_blocks_7_1_transformer_blocks_5_attn1_to_q",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k",
    ):
        sd |= {f"{xl}.lora_down.weight": torch.ones(2, 1280), f"{xl}.lora_up.weight": torch.ones(1280, 2),
               f"{xl}.alpha": torch.tensor(1.0)}  # fmt: skip
    save_state_dict(
        sd, server.loras / "xl_only.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"}
    )
    try:
        for path, body in (
            ("/sdapi/v1/txt2img", {**GEN, "prompt": "x <lora:xl_only:1>"}),
            ("/v1/jobs", {"kind": "txt2img", "params": {**GEN, "prompt": "x <lora:xl_only:1>"}}),
        ):
            r = requests.post(server.url + path, json=body, headers=h, timeout=60)
            if path == "/v1/jobs":
                job = _wait(server, server.keys["alice"], r.json()["id"])
                assert job["state"] == "failed" and "matches no layer" in job["error"], job
            else:
                assert r.status_code == 422 and "matches no layer" in r.text and "sdxl" in r.text, r.text
    finally:
        (server.loras / "xl_only.safetensors").unlink()
    # an SD1 LoRA on an SD3 model matches no layer either: refused the same way
    sd3_body = {**GEN, "prompt": PROMPT, "sampler_name": "Euler"}
    r = requests.post(server.url + "/sdapi/v1/txt2img", headers=h, timeout=120,
                      json={**sd3_body, "override_settings": {"sd_model_checkpoint": "sd35"}})  # fmt: skip
    assert r.status_code == 422 and "matches no layer of this sd3 model" in r.text, r.text
    job_body = {"kind": "txt2img", "params": {**GEN, "prompt": PROMPT, "model": "sd35"}}
    r = requests.post(server.url + "/v1/jobs", headers=h, timeout=60, json=job_body)
    job = _wait(server, server.keys["alice"], r.json()["id"])
    assert job["state"] == "failed" and "matches no layer" in job["error"], job
    # an alias (ss_output_name) resolves like the file name
    aliased = PROMPT.replace("styl:", "styl_alias:")
    via_alias, _ = _a1111(server, "/sdapi/v1/txt2img", {**GEN, "prompt": aliased})
    via_name, _ = _a1111(server, "/sdapi/v1/txt2img", {**GEN, "prompt": PROMPT})
    assert np.array_equal(via_alias, via_name)


def _sd3_lora(path: Path) -> None:
    """A kohya sd-scripts style SD3 LoRA on the tiny SD3.5 model: fused qkv and proj of both streams."""
    from diffusekit.checkpoints.single_file import save_state_dict
    from diffusekit.models.sd3_configs import TINY_SD35

    m, g, sd = TINY_SD35.mmdit, torch.Generator().manual_seed(5), {}
    for i in range(m.depth):
        for layer, out in (("x_block_attn_qkv", 3 * m.hidden_size), ("x_block_attn_proj", m.hidden_size),
                           ("context_block_attn_qkv", 3 * m.hidden_size)):  # fmt: skip
            name = f"lora_unet_joint_blocks_{i}_{layer}"
            sd[f"{name}.lora_down.weight"] = torch.randn(4, m.hidden_size, generator=g) * 0.3
            sd[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.3
            sd[f"{name}.alpha"] = torch.tensor(4.0)
    save_state_dict(sd, path)


def test_sd3_lora_prompt_equals_the_cli(server, tmp_path):
    """<lora:NAME:W> on an SD3.5 model through both APIs: the CLI's LoRA'd image and infotext."""
    _sd3_lora(server.loras / "sd3style.safetensors")
    try:
        prompt, gen = "a red circle <lora:sd3style:0.9>", {**GEN, "sampler_name": "Euler"}
        common = ["--model", str(server.root / "models" / "sd35.safetensors"), "--seed", "11", "--steps", "3",
                  "--width", "64", "--height", "64", "--cfg", "3", "--sampler", "Euler",
                  "--loras", str(server.loras)]  # fmt: skip
        runs = [["generate", prompt, *common, "-o", str(tmp_path / "lora.png")],
                ["generate", "a red circle", *common, "-o", str(tmp_path / "base.png")]]  # fmt: skip
        script = "import sys, json\nfrom diffusekit.cli import main\nfor argv in json.loads(sys.argv[1]):\n"
        script += "    assert main(argv) == 0\n"
        done = subprocess.run([sys.executable, "-c", script, json.dumps(runs)], env=env(),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        cli, base = (np.asarray(Image.open(tmp_path / f"{k}.png").convert("RGB")) for k in ("lora", "base"))
        over = {"override_settings": {"sd_model_checkpoint": SD3}}
        via_a1111, info = _a1111(server, "/sdapi/v1/txt2img", {**gen, "prompt": prompt, **over})
        params = {**GEN, "sampler": "Euler", "prompt": prompt, "model": SD3}
        via_jobs, job = _job(server, "txt2img", params)
        assert np.array_equal(cli, via_a1111) and np.array_equal(cli, via_jobs)
        assert not np.array_equal(cli, base)  # the LoRA does change the image
        text = info["infotexts"][0]
        assert text == Image.open(tmp_path / "lora.png").info["parameters"] == job["images"][0]["infotext"]
        assert 'Lora hashes: "sd3style: ' in text
        after, _ = _a1111(server, "/sdapi/v1/txt2img", {**gen, "prompt": "a red circle", **over})
        assert np.array_equal(after, base)  # the SD3 model is bit-identical after the LoRA jobs
    finally:
        (server.loras / "sd3style.safetensors").unlink()


def _train_images() -> list[dict]:
    out = []
    for i in range(3):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse((8 + 6 * i, 10, 44 + 6 * i, 46), fill=(200, 30, 160))
        out.append({"image": _png_b64(img), "caption": "a zorblat shape"})
    return out


TRAIN = dict(name="zorblat", steps=12, rank=4, alpha=4.0, lr=0.02, save_every=4, seed=5)


def test_train_lora_job_reports_loss_and_its_lora_works_in_prompts(server):
    admin, alice = _h(server.keys["admin"]), _h(server.keys["alice"])
    body = {"kind": "train_lora", "params": {**TRAIN, "images": _train_images()}}
    r = requests.post(server.url + "/v1/jobs", json=body, headers=alice, timeout=30)
    assert r.status_code == 403  # training is for admin keys
    bad = [
        ({**TRAIN, "images": _train_images(), "name": "../evil"}, "params.name"),
        ({**TRAIN, "images": _train_images(), "steps": 10**6}, "params.steps"),
        ({**TRAIN, "images": _train_images(), "resolution": 100}, "params.resolution"),
        ({**TRAIN}, "dataset"),
        ({**TRAIN, "dataset": "../data"}, "params.dataset"),
        ({**TRAIN, "dataset": "/etc"}, "params.dataset"),
        ({**TRAIN, "images": [{"image": "bm90IGFuIGltYWdl", "caption": "x"}]}, "params.images.0.image"),
        ({**TRAIN, "images": _train_images(), "name": "styl"}, "exists already"),
        ({**TRAIN, "images": _train_images(), "model": "nope"}, "params.model"),
        ({**TRAIN, "images": _train_images(), "model": "sd35"}, "is SD3"),
    ]
    for params, field in bad:
        body_bad = {"kind": "train_lora", "params": params}
        r = requests.post(server.url + "/v1/jobs", json=body_bad, headers=admin, timeout=30)
        assert 400 <= r.status_code < 500 and field in r.text, (params.get("name"), r.status_code, r.text)
    r = requests.post(server.url + "/v1/jobs", json=body, headers=admin, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    again = requests.post(server.url + "/v1/jobs", json=body, headers=admin, timeout=30)
    assert again.status_code == 409 and "already training" in again.text
    seen = []
    with requests.get(f"{server.url}/v1/jobs/{job_id}/events", headers=admin, stream=True, timeout=180) as ev:
        for line in ev.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                data = json.loads(line[6:])
                if "step" in data and data.get("state") == "running":
                    seen.append((data["step"], data["total"], data.get("loss")))
                if data.get("state") in ("succeeded", "failed", "cancelled"):
                    break
    job = _wait(server, server.keys["admin"], job_id)
    assert job["state"] == "succeeded", job
    assert any(step > 0 and total == 12 and loss is not None and loss > 0 for step, total, loss in seen), seen
    res = job["result"]
    assert res["lora"] == "zorblat" and res["steps"] == 12 and res["resumed_from"] is None
    assert res["final_loss"] > 0 and job["progress"]["loss"] == res["final_loss"] and len(res["losses"]) >= 2
    assert len(job["images"]) == 1  # the loss curve
    # listed at once and usable in prompts: it changes the image
    listed = requests.get(server.url + "/sdapi/v1/loras", headers=alice, timeout=10).json()
    assert "zorblat" in [x["name"] for x in listed]
    plain, _ = _a1111(server, "/sdapi/v1/txt2img", {**GEN, "prompt": "a zorblat shape"})
    tagged = {**GEN, "prompt": "a zorblat shape <lora:zorblat:1>"}
    with_lora, info = _a1111(server, "/sdapi/v1/txt2img", tagged)
    assert not np.array_equal(plain, with_lora)
    assert 'Lora hashes: "zorblat: ' in info["infotexts"][0]
    assert not (server.root / "data" / "training" / job_id).exists()  # the work folder is removed


def test_cancel_a_running_training_job(server):
    admin = _h(server.keys["admin"])
    params = {**TRAIN, "name": "stopped", "steps": 5000, "images": _train_images()}
    body = {"kind": "train_lora", "params": params}
    job_id = requests.post(server.url + "/v1/jobs", json=body, headers=admin, timeout=30).json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = requests.get(f"{server.url}/v1/jobs/{job_id}", headers=admin, timeout=10).json()
        if job["state"] == "running" and job["progress"]["step"] > 0:
            break
        time.sleep(0.1)
    # an A1111 client's interrupt button stops generations, not a training run
    assert requests.post(server.url + "/sdapi/v1/interrupt", headers=admin, timeout=10).status_code == 200
    time.sleep(1.0)
    job = requests.get(f"{server.url}/v1/jobs/{job_id}", headers=admin, timeout=10).json()
    assert job["state"] == "running", job
    assert requests.delete(f"{server.url}/v1/jobs/{job_id}", headers=admin, timeout=10).status_code == 200
    job = _wait(server, server.keys["admin"], job_id, timeout=60)
    assert job["state"] == "cancelled" and job["progress"]["step"] < 5000
    assert not (server.loras / "stopped.safetensors").exists()


def test_train_lora_on_a_store_model(server):
    admin = _h(server.keys["admin"])
    params = {**TRAIN, "name": "on_store", "model": "m", "steps": 3, "images": _train_images()[:2]}
    r = requests.post(server.url + "/v1/jobs", json={"kind": "train_lora", "params": params}, headers=admin,
                      timeout=30)  # fmt: skip
    assert r.status_code == 202, r.text
    job = _wait(server, server.keys["admin"], r.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["model_version"] == "m@1" and job["result"]["steps"] == 3  # the exact version trained on
    assert (server.loras / "on_store.safetensors").is_file()
