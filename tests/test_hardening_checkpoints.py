"""Issue 31 (checkpoint/config/convert side): every bad file or destination is a one-line error, convert
never destroys or mixes models, and the same input gives the same bytes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusekit import cli
from diffusekit.checkpoints import single_file
from diffusekit.checkpoints.convert import convert_checkpoint
from diffusekit.checkpoints.detect import CONFIG_METADATA_KEY
from diffusekit.checkpoints.load import read_checkpoint
from diffusekit.checkpoints.single_file import CheckpointError, load_state_dict, save_state_dict
from diffusekit.memory import MemoryBudgetError, env_limit_bytes
from diffusekit.models.tokenizer import CLIPTokenizer
from diffusekit.train.recipe import Recipe
from helpers import make_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    _, _, path = make_checkpoint("tiny_sd1", tmp_path_factory.mktemp("tiny"))
    return path


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folder") / "model"
    convert_checkpoint(tiny, out, fmt="diffusers")
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """cli.main in-process: an uncaught exception (a traceback for the user) fails the test."""
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def with_config(tiny: Path, out: Path, edit) -> Path:
    """A copy of `tiny` whose diffusekit.config metadata was changed by `edit(dict)`."""
    sd, meta = load_state_dict(tiny)
    config = json.loads(meta[CONFIG_METADATA_KEY])
    edit(config)
    save_state_dict(sd, out, metadata=meta | {CONFIG_METADATA_KEY: json.dumps(config)})
    return out


# ---------------------------------------------------------------------------------------------
# Bugs 2 (config part) and 9: numeric fields of the recorded config


@pytest.mark.parametrize(
    "part, field, value, valid",
    [
        ("vae", "scaling_factor", math.nan, "finite number in (0, 100]"),
        ("vae", "scaling_factor", 0, "finite number in (0, 100]"),
        ("vae", "scaling_factor", -0.18, "finite number in (0, 100]"),
        ("vae", "scaling_factor", math.inf, "finite number in (0, 100]"),
        ("unet", "num_heads", 0, "integer in 1..1024"),
        ("unet", "norm_groups", 0, "integer in 1..1024"),
        ("vae", "norm_groups", 0, "integer in 1..1024"),
        ("unet", "model_channels", "32", "integer in 1.."),
        ("unet", "channel_mult", None, "list of 1..8 entries"),
        ("unet", "num_res_blocks", 10**9, "integer in 1..128"),
        (None, "resolution", -64, "integer in 8..16384"),
    ],
)
def test_bad_recorded_config_is_one_line_error_naming_file_and_field(
    tiny, tmp_path, capsys, part, field, value, valid
):
    def edit(config):
        (config[part] if part else config)[field] = value

    bad = with_config(tiny, tmp_path / "bad.safetensors", edit)
    dotted = f"{part}.{field}" if part else field
    rc, err = run_cli(capsys, "inspect", bad, "--no-hash")
    assert rc == 2
    assert err.startswith("diffusekit: error: bad.safetensors: diffusekit.config metadata: ")
    assert f"{dotted}=" in err and valid in err and "\n" not in err
    assert "width=" not in err  # resolution is named as itself, not as the width it would become


@pytest.mark.parametrize("part, field", [("unet", "num_heads"), ("unet", "norm_groups")])
def test_zero_heads_or_groups_fail_generate_cleanly(tiny, tmp_path, capsys, part, field):
    bad = with_config(tiny, tmp_path / "zero.safetensors", lambda c: c[part].__setitem__(field, 0))
    rc, err = run_cli(capsys, "generate", "x", "--model", bad, "--steps", "1", "-o", tmp_path / "o.png")
    assert rc == 2 and f"zero.safetensors: diffusekit.config metadata: {part}.{field}=0" in err
    assert not (tmp_path / "o.png").exists()


def test_nonsense_that_divides_wrongly_is_named(tiny, tmp_path, capsys):
    bad = with_config(tiny, tmp_path / "g.safetensors", lambda c: c["unet"].__setitem__("norm_groups", 5))
    rc, err = run_cli(capsys, "inspect", bad, "--no-hash")
    assert rc == 2 and "unet.norm_groups=5" in err and "divisible" in err


# ---------------------------------------------------------------------------------------------
# Bug 10: garbled diffusers configs


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _drop(key):
    def edit(d):
        d.pop(key)
        return d

    return edit


def _set(key, value):
    return lambda d: d | {key: value}


@pytest.mark.parametrize(
    "file, edit, expected",
    [
        ("text_encoder/config.json", _drop("num_hidden_layers"), "num_hidden_layers is missing"),
        ("text_encoder/config.json", _set("hidden_size", 32.5), "hidden_size=32.5 is invalid"),
        ("model_index.json", lambda d: [d], "is a JSON list, expected an object"),
        ("scheduler/scheduler_config.json", lambda d: [d], "is a JSON list, expected an object"),
        ("scheduler/scheduler_config.json", _set("prediction_type", 3), "prediction_type=3 is invalid"),
        ("unet/config.json", _set("layers_per_block", "2"), "layers_per_block='2' is invalid"),
        ("unet/config.json", _set("in_channels", [4]), "in_channels=[4] is invalid"),
        ("unet/config.json", _set("block_out_channels", None), "block_out_channels=None is invalid"),
        ("unet/config.json", _set("attention_head_dim", 0), "attention_head_dim=0 is invalid"),
        ("unet/config.json", _set("norm_num_groups", 5), "norm_num_groups=5 is invalid"),
        ("unet/config.json", _set("sample_size", -8), "sample_size=-8 is invalid"),
        ("vae/config.json", _set("scaling_factor", None), "scaling_factor=None is invalid"),
        ("vae/config.json", _set("norm_num_groups", 0), "norm_num_groups=0 is invalid"),
    ],
)
def test_garbled_diffusers_config_names_file_and_field(folder, tmp_path, capsys, file, edit, expected):
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    _edit_json(copy / file, edit)
    rc, err = run_cli(capsys, "inspect", copy)
    assert rc == 2, err
    assert str(copy / file) in err and expected in err and "\n" not in err


def test_empty_merges_txt_is_refused(folder, tmp_path, capsys):
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    (copy / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="merges.txt: no merges"):
        CLIPTokenizer.from_folder(copy / "tokenizer")
    rc, err = run_cli(capsys, "generate", "x", "--model", copy, "--steps", "1", "-o", tmp_path / "o.png")
    assert rc == 2 and "merges.txt: no merges" in err


# ---------------------------------------------------------------------------------------------
# Header first: refuse from key names before any tensor is opened


def test_family_is_checked_from_the_header_before_tensors_are_opened(tmp_path, monkeypatch):
    sd = {f"lora.{i}.weight": torch.zeros(2) for i in range(2000)}
    save_state_dict(sd, tmp_path / "lora.safetensors")

    def no_tensors(*args, **kwargs):
        raise AssertionError("tensors were opened before the family check")

    monkeypatch.setattr(single_file, "safe_open", no_tensors)
    with pytest.raises(CheckpointError, match="no U-Net weights"):
        read_checkpoint(tmp_path / "lora.safetensors")


def test_header_listing_a_million_tensors_is_refused_before_parsing(tmp_path):
    n = 150_000
    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n))
    raw = ("{" + entries + "}").encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "many.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(n))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="150,000 tensors, over the limit"):
        read_checkpoint(path)
    assert time.perf_counter() - t0 < 5  # parsing it would take seconds; the count takes milliseconds


# ---------------------------------------------------------------------------------------------
# Replacement VAE, prune options: the error names the right file and the CLI option


def test_incompatible_vae_is_blamed_on_the_vae_file(tiny, tmp_path, capsys):
    _, sd, _ = make_checkpoint("tiny_sd1", tmp_path)
    prefix = "first_stage_model."
    vae = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    vae["decoder.conv_in.weight"] = torch.zeros(128, 3, 3, 3)  # takes 3 latent channels, the U-Net makes 4
    save_state_dict(vae, tmp_path / "other_vae.safetensors")
    vae_file = tmp_path / "other_vae.safetensors"
    rc, err = run_cli(capsys, "convert", tiny, tmp_path / "o.safetensors", "--vae", vae_file)
    assert rc == 2
    assert err.startswith("diffusekit: error: other_vae.safetensors: this VAE does not fit tiny_sd1")


def test_keep_ema_without_ema_names_the_cli_option(tiny, tmp_path, capsys):
    rc, err = run_cli(capsys, "convert", tiny, tmp_path / "o.safetensors", "--prune", "--keep-ema")
    assert rc == 2 and "tiny_sd1.safetensors: has no EMA weights" in err and "--keep-ema" in err
    assert "keep_ema" not in err


# ---------------------------------------------------------------------------------------------
# Bug 11 and the destination checks


def test_convert_into_the_source_folder_is_refused(folder, tmp_path, capsys):
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    unet = copy / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.read_bytes()
    rc, err = run_cli(capsys, "convert", copy, unet)
    assert rc == 2 and "destination is inside the source" in err
    assert unet.read_bytes() == before
    rc, err = run_cli(capsys, "convert", copy / "unet" / "..", copy / "unet", "--format", "diffusers")
    assert rc == 2 and "inside the source" in err
    rc, err = run_cli(capsys, "convert", copy, tmp_path, "--format", "diffusers")
    assert rc == 2 and "contains the source" in err
    read_checkpoint(copy)  # the source still loads


def test_diffusers_output_refuses_unrelated_folder_and_files(tiny, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"cat")
    rc, err = run_cli(capsys, "convert", tiny, tmp_path / "photos", "--format", "diffusers")
    assert rc == 2 and "not a diffusers model" in err
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"cat"
    (tmp_path / "afile").write_text("x")
    rc, err = run_cli(capsys, "convert", tiny, tmp_path / "afile", "--format", "diffusers")
    assert rc == 2 and "not a folder" in err
    rc, err = run_cli(capsys, "convert", tiny, tmp_path / "noext")
    assert rc == 2 and "--format diffusers" in err and "save_state_dict" not in err


def test_write_error_names_the_destination_not_a_temp_file(tiny, tmp_path):
    sd, _ = load_state_dict(tiny)
    with pytest.raises(OSError) as info:
        save_state_dict(sd, tmp_path / "missing" / "m.safetensors")
    assert "missing/m.safetensors" in str(info.value)
    assert ".tmp" not in str(info.value) and "partial" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Bug 13 and file modes


def test_create_and_convert_are_byte_identical_across_runs(tiny, tmp_path):
    def start(hash_seed: str, *argv) -> subprocess.Popen:
        env = os.environ | {"PYTHONPATH": str(SRC), "PYTHONHASHSEED": hash_seed}
        cmd = [sys.executable, "-m", "diffusekit.cli", *map(str, argv)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    # separate processes with different hash seeds (set and unlike, so set iteration order differs), side
    # by side: the machine's two cores
    runs = [start(seed, "create", "tiny_sd1", tmp_path / f"{name}.safetensors", "--seed", "3")
            for seed, name in (("1", "a"), ("2", "b"))]  # fmt: skip
    for proc in runs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    # in-process: the safetensors library's metadata order changed between calls as well
    convert_checkpoint(tiny, tmp_path / "c.safetensors", dtype=torch.float16)
    convert_checkpoint(tiny, tmp_path / "d.safetensors", dtype=torch.float16)
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "d.safetensors").read_bytes()
    convert_checkpoint(tiny, tmp_path / "e", fmt="diffusers")
    convert_checkpoint(tiny, tmp_path / "f", fmt="diffusers")
    files = sorted(p.relative_to(tmp_path / "e") for p in (tmp_path / "e").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "f") for p in (tmp_path / "f").rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / "e" / rel).read_bytes() == (tmp_path / "f" / rel).read_bytes(), rel


def test_written_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_state_dict({"a": torch.zeros(3)}, tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


def test_stale_partial_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"m.safetensors.diffusekit-partial-{dead.pid}.tmp"
    stale.write_bytes(b"x" * 1000)
    stale_dir = tmp_path / f"model.diffusekit-partial-{dead.pid}"
    stale_dir.mkdir()
    legacy = tmp_path / f".m.safetensors.{dead.pid}.0123abcd.tmp"  # hidden, by older versions
    legacy.write_bytes(b"z")
    mine = tmp_path / f"other.safetensors.diffusekit-partial-{os.getpid()}.tmp"  # a live writer's
    mine.write_bytes(b"y")
    save_state_dict({"a": torch.zeros(3)}, tmp_path / "m.safetensors")
    assert not stale.exists() and not stale_dir.exists() and not legacy.exists() and mine.exists()


# ---------------------------------------------------------------------------------------------
# Environment and train options


@pytest.mark.parametrize("value", ["abc", "-5", "0", "1.5"])
def test_memory_limit_env_is_named_and_must_be_positive(monkeypatch, value):
    monkeypatch.setenv("DIFFUSEKIT_MEMORY_LIMIT_MB", value)
    with pytest.raises(MemoryBudgetError, match=f"DIFFUSEKIT_MEMORY_LIMIT_MB='{value}' is invalid"):
        env_limit_bytes()
    monkeypatch.setenv("DIFFUSEKIT_MEMORY_LIMIT_MB", "4096")
    assert env_limit_bytes() == 4096 * 2**20


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "x"])
def test_train_scale_must_be_positive(capsys, value):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--scale", value])
    assert info.value.code == 2 and "--scale" in capsys.readouterr().err
    with pytest.raises(ValueError, match="scale must be"):
        Recipe().scaled(float(value) if value != "x" else 0)
