"""Property-based tests (Hypothesis) for what reads untrusted files: the safetensors header reader and
config validation. Every input gives a result or a clear one-line error of the documented type, never
another exception, and never an allocation sized by a number in the file. Example counts are bounded
(see EXAMPLES) so the file runs in seconds."""

from __future__ import annotations

import json
import struct
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffusekit.checkpoints.convert_clip import text_config_from_transformers, text_config_to_transformers
from diffusekit.checkpoints.convert_unet import unet_config_from_diffusers, unet_config_to_diffusers
from diffusekit.checkpoints.convert_vae import vae_config_from_diffusers, vae_config_to_diffusers
from diffusekit.checkpoints.single_file import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    load_state_dict,
    read_safetensors_header,
    save_state_dict,
)
from diffusekit.models.configs import PRESETS, ModelConfig, config_from_dict
from diffusekit.models.validate import ConfigError

EXAMPLES = 150  # per property; the file takes a few seconds
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples in every CI run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "v.safetensors"
    tensors = {
        "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.int64),
    }
    save_state_dict(tensors, path, metadata={"k": "v"})
    return path.read_bytes()


def _read(path: Path) -> None:
    """The header reader and the full loader: a result or CheckpointError, and a bounded allocation."""
    tracemalloc.start()
    try:
        try:
            entries, _ = read_safetensors_header(path)
        except CheckpointError as e:
            assert str(e).startswith(path.name + ": ") and "\n" not in str(e)
            return
        event("header valid")
        tensors, _ = load_state_dict(path)
        assert {k: tuple(t.shape) for k, t in tensors.items()} == {k: e.shape for k, e in entries.items()}
    except CheckpointError as e:
        assert str(e).startswith(path.name + ": ")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 8 * 2**20 + 4 * path.stat().st_size, f"allocated {peak} bytes for a tiny file"


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes(tmp_path, data):
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    _read(path)


@FUZZ
@given(data=st.data())
def test_mutated_valid_file(tmp_path, valid_file, data):
    raw = bytearray(valid_file)
    kind = data.draw(st.sampled_from(["flip", "truncate", "length", "extend"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    else:
        raw += data.draw(st.binary(min_size=1, max_size=64))
    path = tmp_path / "f.safetensors"
    path.write_bytes(bytes(raw))
    _read(path)


entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*SAFETENSORS_DTYPES, "F4", "", "f32"]) | json_scalars,
        "shape": st.lists(st.integers(-3, 2**40), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-5, 2**62), min_size=2, max_size=2) | json_values,
    }
)
headers = (
    st.dictionaries(st.text(max_size=10), entries | json_values, max_size=6) | json_values
)  # an object of entries (sometimes not)


@FUZZ
@given(header=headers, data_len=st.integers(0, 256), metadata=json_values)
def test_generated_headers(tmp_path, header, data_len, metadata):
    if isinstance(header, dict) and metadata is not None:
        header = {**header, "__metadata__": metadata}
    text = json.dumps(header).encode()
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data_len))
    _read(path)


# ---------------------------------------------------------------------------------------------
# Config validation: random JSON -> a valid config or a ConfigError naming the field


def _check_config(data: object) -> None:
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        assert "\n" not in str(e) and ("valid" in str(e) or "missing" in str(e)), str(e)
        return
    event("config valid")
    assert isinstance(cfg, ModelConfig)
    assert ModelConfig.from_json(cfg.to_json()) == cfg  # what validates round-trips


@FUZZ
@given(data=json_values)
def test_random_json_config(data):
    _check_config(data)


_BASE = {name: json.loads(json.dumps(asdict(cfg))) for name, cfg in PRESETS.items()}


@FUZZ
@given(
    name=st.sampled_from(sorted(_BASE)),
    part=st.sampled_from(["unet", "vae", "text_encoders", None]),
    data=st.data(),
)
def test_mutated_preset_config(name, part, data):
    config = json.loads(json.dumps(_BASE[name]))
    target = config if part is None else config[part]
    if isinstance(target, list):
        target = target[0]
    fields = sorted(target)
    field = data.draw(st.sampled_from(fields))
    value = data.draw(json_values | st.integers(-4, 4096) | st.floats(-1.0, 2.0))
    target[field] = value
    try:
        config_from_dict(config)
        event("config valid")
    except ConfigError as e:
        assert field in str(e) or e.field.startswith(("unet.", "resolution", "text_encoders")), str(e)
        return


_TINY = PRESETS["tiny_sdxl"]
_DIFFUSERS = {
    "unet": (unet_config_to_diffusers(_TINY.unet), unet_config_from_diffusers),
    "vae": (vae_config_to_diffusers(_TINY.vae), vae_config_from_diffusers),
    "text": (
        text_config_to_transformers(_TINY.text_encoders[1]),
        lambda d, source: text_config_from_transformers(
            d, layout="openclip", use_layers=lambda n: max(1, n - 1), final_norm=False, source=source
        ),
    ),
}


@FUZZ
@given(which=st.sampled_from(sorted(_DIFFUSERS)), data=st.data())
def test_mutated_diffusers_config(which, data):
    base, read = _DIFFUSERS[which]
    config = json.loads(json.dumps(base))
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["set", "drop", "whole"]))
        if action == "whole":
            config = data.draw(json_values)
            break
        field = data.draw(st.sampled_from(sorted(config))) if config else "x"
        if action == "drop":
            config.pop(field, None)
        else:
            config[field] = data.draw(json_values | st.integers(-4, 4096))
    try:
        read(config, "model/x/config.json")
        event("config valid")
    except ValueError as e:  # ConfigError, or the converters' "unsupported ..." errors
        assert "\n" not in str(e)
        if isinstance(e, ConfigError):
            assert str(e).startswith("model/x/config.json: "), str(e)
