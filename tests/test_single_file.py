"""Single-file checkpoint I/O: round trips, lazy loading, pruning, hashes, and every kind of bad file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import signal
import struct
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from diffusekit.checkpoints.hashes import addnet_hash, autov1, autov2, sha256_file
from diffusekit.checkpoints.single_file import (
    DROPPED_KEY,
    CheckpointError,
    cast_floats,
    detect_format,
    load_state_dict,
    read_safetensors_header,
    save_state_dict,
)
from diffusekit.checkpoints.surgery import (
    ema_key_for,
    is_ema_key,
    is_training_key,
    prune,
    split_by_prefixes,
    strip_prefix,
)

# ---------------------------------------------------------------------------------------------- helpers


def _mixed_tensors() -> dict[str, torch.Tensor]:
    return {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(4, dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 7),
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


def _raw_safetensors(path, header: dict, data: bytes, *, header_len: int | None = None) -> None:
    blob = json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)


def _mapped_ranges(path) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == real:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def _error_for(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{os.path.basename(path)}: "), message
    return message


class _Evil:
    """Unpickling this would run a shell command that creates the sentinel file."""

    def __init__(self, sentinel) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


# ------------------------------------------------------------------------------------------ round trips


def test_safetensors_round_trip_keeps_dtypes_values_and_metadata(tmp_path):
    want = _mixed_tensors()
    path = tmp_path / "model.safetensors"
    save_state_dict(want, path, metadata={"format": "pt", "note": "héllo"})
    got, metadata = load_state_dict(path)
    _assert_same(got, want)
    assert metadata == {"format": "pt", "note": "héllo"}
    entries, header_meta = read_safetensors_header(path)
    assert entries["bf16"].dtype == torch.bfloat16 and entries["f32"].shape == (3, 4)
    assert header_meta == metadata
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temp file left behind


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_loading_is_lazy_memory_mapped(tmp_path, suffix):
    want = {"a": torch.randn(64, 64), "b": torch.randn(128)}
    path = tmp_path / f"lazy{suffix}"
    if suffix == ".safetensors":
        save_state_dict(want, path)
    else:
        torch.save({"state_dict": want}, path)
    got, _ = load_state_dict(path)
    ranges = _mapped_ranges(path)
    assert ranges, "file is not memory-mapped"
    for key, tensor in got.items():
        assert any(lo <= tensor.data_ptr() < hi for lo, hi in ranges), key
    _assert_same(got, want)


def test_save_handles_shared_views_and_noncontiguous_tensors(tmp_path):
    base = torch.arange(12.0)
    want = {
        "whole": base,
        "alias": base,  # same memory twice
        "slice": base[2:6],  # overlaps "whole"
        "tail": base[6:],
        "transposed": base.view(3, 4).t(),  # non-contiguous
    }
    path = tmp_path / "shared.safetensors"
    save_state_dict(want, path)
    got, _ = load_state_dict(path)
    _assert_same(got, {k: v.contiguous() for k, v in want.items()})
    assert got["whole"].data_ptr() != got["alias"].data_ptr()


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "keep.safetensors"
    save_state_dict({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    # A real failed write: the file size limit (as on a full disk, write() fails part way).
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
    try:
        with pytest.raises(OSError, match=r"keep\.safetensors: cannot write it \(File too large\)"):
            save_state_dict({"w": torch.zeros(10_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"x\.ckpt: checkpoints are written as safetensors; give a name ending in \.safetensors",
    ):
        save_state_dict({"w": torch.ones(1)}, tmp_path / "x.ckpt")
    with pytest.raises(TypeError, match="metadata must map strings to strings"):
        save_state_dict({"w": torch.ones(1)}, tmp_path / "x.safetensors", metadata={"step": 5})
    with pytest.raises(TypeError, match="value for 'w' is a list, expected a torch.Tensor"):
        save_state_dict({"w": [1.0]}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="dtype torch.complex128, which safetensors cannot store"):
        save_state_dict({"w": torch.ones(1, dtype=torch.complex128)}, tmp_path / "x.safetensors")
    assert not any(tmp_path.iterdir())


def test_ckpt_unwraps_state_dict_and_reports_dropped_entries(tmp_path):
    want = {
        "model.diffusion_model.w": torch.randn(3, 3),
        "half": torch.randn(4).half(),
        "bf": torch.ones(2).bfloat16(),
    }
    path = tmp_path / "sd.ckpt"
    torch.save(
        {
            "state_dict": {**want, "note": "not a tensor"},
            "global_step": 470000,
            "epoch": 3,
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
            "lr_schedulers": [],
        },
        path,
    )
    got, metadata = load_state_dict(path)
    _assert_same(got, want)
    dropped = json.loads(metadata[DROPPED_KEY])
    assert dropped == ["epoch", "global_step", "lr_schedulers", "optimizer_states", "state_dict.note"]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": {"state_dict": sd}},
        lambda sd: {"model": sd, "args": {"lr": 1e-4}},
        lambda sd: {"module": sd},
    ],
    ids=["flat", "double-state_dict", "model", "module"],
)
def test_pickle_wrappers_are_unwrapped(tmp_path, wrap):
    want = {"a.weight": torch.randn(2, 2), "a.bias": torch.randn(2)}
    path = tmp_path / "w.pth"
    torch.save(wrap(want), path)
    got, _ = load_state_dict(path)
    _assert_same(got, want)


def test_parameters_and_legacy_format_load_as_plain_tensors(tmp_path):
    param = torch.nn.Parameter(torch.randn(3))
    path = tmp_path / "legacy.pt"
    torch.save({"p": param, "t": torch.arange(3)}, path, _use_new_zipfile_serialization=False)
    assert detect_format(path) == "pickle"
    got, metadata = load_state_dict(path)
    assert type(got["p"]) is torch.Tensor and not got["p"].requires_grad
    assert torch.equal(got["p"], param.detach()) and torch.equal(got["t"], torch.arange(3))
    assert metadata == {}


def test_lightning_checkpoint_with_callback_class_and_numpy_state_loads(tmp_path, monkeypatch):
    # Real LDM .ckpt files key their callback state by the Lightning class and hold numpy scalars.
    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    callback = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = callback
    want = {"model.diffusion_model.w": torch.randn(2)}
    path = tmp_path / "ldm.ckpt"
    state = {"best_model_score": np.float64(0.5), "kth": np.arange(3)}
    torch.save({"state_dict": want, "global_step": 1, "callbacks": {callback: state}}, path)
    got, metadata = load_state_dict(path)
    _assert_same(got, want)
    assert json.loads(metadata[DROPPED_KEY]) == ["callbacks", "global_step"]


def test_ckpt_that_is_really_safetensors_loads(tmp_path):
    want = {"w": torch.randn(3)}
    real = tmp_path / "real.safetensors"
    save_state_dict(want, real, metadata={"k": "v"})
    disguised = tmp_path / "model.ckpt"
    os.replace(real, disguised)
    assert detect_format(disguised) == "safetensors"
    got, metadata = load_state_dict(disguised)
    _assert_same(got, want)
    assert metadata == {"k": "v"}


# ------------------------------------------------------------------------------- prune, split, cast


def _ldm_state_dict(with_ema: bool = True) -> dict[str, torch.Tensor]:
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3),
        "model.diffusion_model.out.2.bias": torch.randn(4),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 3, 1, 1),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(8),
        "alphas_cumprod": torch.linspace(1, 0, 10),
    }
    if with_ema:
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
        sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.randn(4, 4, 3, 3)
        sd["model_ema.diffusion_modelout2bias"] = torch.randn(4)
    return sd


def test_ema_and_training_keys_are_recognized():
    assert (
        ema_key_for("model.diffusion_model.input_blocks.0.0.weight")
        == "model_ema.diffusion_modelinput_blocks00weight"
    )
    assert is_ema_key("model_ema.decay") and not is_ema_key("model.diffusion_model.out.2.bias")
    assert is_training_key("model_ema.num_updates") and is_training_key("optimizer_states.0")
    assert is_training_key("global_step") and not is_training_key("alphas_cumprod")
    with pytest.raises(ValueError, match="only 'model.\\*' weights have EMA copies"):
        ema_key_for("first_stage_model.x")


def test_prune_drops_ema_and_keep_ema_swaps_in_the_ema_weights():
    sd = _ldm_state_dict()
    pruned = prune(sd)
    assert set(pruned) == {k for k in sd if not k.startswith("model_ema.")}
    assert pruned["model.diffusion_model.out.2.bias"] is sd["model.diffusion_model.out.2.bias"]

    swapped = prune(sd, keep_ema=True)
    assert set(swapped) == set(pruned)
    assert swapped["model.diffusion_model.out.2.bias"] is sd["model_ema.diffusion_modelout2bias"]
    w = "model.diffusion_model.input_blocks.0.0.weight"
    assert swapped[w] is sd["model_ema.diffusion_modelinput_blocks00weight"]
    assert (
        swapped["first_stage_model.decoder.conv_out.weight"]
        is sd["first_stage_model.decoder.conv_out.weight"]
    )


def test_keep_ema_errors_without_or_with_incomplete_ema():
    with pytest.raises(CheckpointError, match=r"no EMA weights \(no 'model_ema\.\*' tensors\)"):
        prune(_ldm_state_dict(with_ema=False), keep_ema=True)
    sd = _ldm_state_dict()
    del sd["model_ema.diffusion_modelout2bias"]
    with pytest.raises(
        CheckpointError, match=r"EMA is incomplete: 1 of 2 .*'model_ema\.diffusion_modelout2bias'"
    ):
        prune(sd, keep_ema=True)
    sd = _ldm_state_dict()
    sd["model_ema.diffusion_modelout2bias"] = torch.randn(5)
    with pytest.raises(
        CheckpointError, match=r"has shape \(5,\), but 'model.diffusion_model.out.2.bias' has \(4,\)"
    ):
        prune(sd, keep_ema=True)


def test_strip_and_split_by_prefixes():
    sd = _ldm_state_dict(with_ema=False)
    vae = strip_prefix(sd, "first_stage_model.")
    assert list(vae) == ["decoder.conv_out.weight"]
    parts, leftover = split_by_prefixes(
        sd, {"model": "model.", "unet": "model.diffusion_model.", "vae": "first_stage_model."}
    )
    assert set(parts["unet"]) == {"input_blocks.0.0.weight", "out.2.bias"}  # longest prefix wins
    assert parts["model"] == {}
    assert parts["vae"]["decoder.conv_out.weight"] is sd["first_stage_model.decoder.conv_out.weight"]
    assert set(leftover) == {
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "alphas_cumprod",
    }
    with pytest.raises(ValueError, match="prefix 'model.' is given for both 'a' and 'b'"):
        split_by_prefixes(sd, {"a": "model.", "b": "model."})


def test_cast_floats_only_touches_floating_point():
    sd = {"w": torch.randn(3), "h": torch.randn(2).half(), "i": torch.arange(3), "b": torch.tensor([True])}
    out = cast_floats(sd, torch.float16)
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], sd["w"].half())
    assert out["h"] is sd["h"] and out["i"] is sd["i"] and out["b"] is sd["b"]
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        cast_floats(sd, torch.int8)


def test_cast_floats_lays_4d_tensors_out_in_the_requested_format(tmp_path):
    sd = {"conv": torch.randn(8, 6, 3, 3).half(), "lin": torch.randn(8, 6).half()}
    save_state_dict(sd, tmp_path / "m.safetensors")
    mapped, _ = load_state_dict(tmp_path / "m.safetensors")
    out = cast_floats(mapped, torch.bfloat16, release_mapped=True, memory_format=torch.channels_last)
    assert out["conv"].is_contiguous(memory_format=torch.channels_last) and not out["conv"].is_contiguous()
    assert out["lin"].is_contiguous()
    for key, t in sd.items():
        assert out[key].dtype == torch.bfloat16 and torch.equal(out[key], t.to(torch.bfloat16))


# ------------------------------------------------------------------------------------------ bad files


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_state_dict({"a": torch.ones(10)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-25])
    assert _error_for(path).endswith("truncated: header says 40 bytes of tensor data, file has 15")


def test_safetensors_header_lying_about_offsets(tmp_path):
    path = tmp_path / "liar.safetensors"
    _raw_safetensors(path, {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, bytes(16))
    assert "tensor 'w': data_offsets [0, 16] span 16 bytes, but F32 [4, 4] needs 64" in _error_for(path)
    two = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    _raw_safetensors(path, two, bytes(24))
    assert "tensor 'b' overlaps another (starts at byte 8, not 16)" in _error_for(path)
    two["b"]["data_offsets"] = [20, 36]
    _raw_safetensors(path, two, bytes(36))
    assert "unused gap in the data section before tensor 'b' (bytes 16..20)" in _error_for(path)
    _raw_safetensors(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(9))
    assert "5 unexpected bytes after the last tensor" in _error_for(path)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}},
            "tensor 'w' has unknown dtype 'F4'; known: BOOL",
        ),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "has shape [-1]; expected a list"),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4]}},
            "data_offsets [4]; expected [begin, end]",
        ),
        ({"__metadata__": {"step": 5}}, "__metadata__ must be an object mapping strings to strings"),
    ],
)
def test_safetensors_bad_header_entries(tmp_path, header, expected):
    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, header, bytes(4))
    assert expected in _error_for(path)


def test_safetensors_garbage_or_duplicate_header_json(tmp_path):
    path = tmp_path / "garbage.safetensors"
    blob = b'{"w": {"dtype": "F32", oops'
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(4))
    assert "header is not valid JSON: Expecting property name enclosed in double quotes" in _error_for(path)
    blob = b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": {}}'
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(1))
    assert "header repeats the key 'w'" in _error_for(path)


def test_safetensors_header_length_larger_than_file(tmp_path):
    path = tmp_path / "short.safetensors"
    _raw_safetensors(path, {}, b"", header_len=1000)
    assert _error_for(path).endswith(
        "truncated or not safetensors: header length field says 1000 bytes, but only 2 bytes follow it"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty file (0 bytes); expected safetensors, or a PyTorch checkpoint"),
        (
            b"hello world\nthis is not a model\n",
            "not a checkpoint: found a text file (starts with 'hello world this",
        ),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a checkpoint: found a PNG image"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "found an HTML page (a failed download?)"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "found a Git LFS pointer"),
    ],
    ids=["empty", "text", "png", "html", "lfs"],
)
def test_non_checkpoint_files_are_named(tmp_path, content, expected):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    assert expected in _error_for(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(bytes.fromhex("3f9a1c77e2d40b5e") + os.urandom(500))
    assert (
        "not a checkpoint: found unrecognized binary data (first bytes: 3f 9a 1c 77 e2 d4 0b 5e)"
        in _error_for(path)
    )


def test_directory_and_missing_file(tmp_path):
    folder = tmp_path / "pipeline"
    folder.mkdir()
    assert "pipeline: is a directory; expected a single checkpoint file" in _error_for(folder)
    (folder / "model_index.json").write_text("{}")
    assert "is a directory (it looks like a diffusers folder)" in _error_for(folder)
    missing = tmp_path / "absent.ckpt"
    assert f"absent.ckpt: no such file (looked for {missing})" in _error_for(missing)


def test_malicious_pickle_in_torch_zip_is_refused_without_running(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _Evil(sentinel)}, path)
    message = _error_for(path)
    assert (
        f"refused to unpickle: it references '{os.system.__module__}.system', which is not a tensor type"
        in message
    )
    assert message.endswith("only weights can be loaded")
    assert not sentinel.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_raw_pickle_is_refused_without_running(tmp_path, protocol):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil(sentinel)}, f, protocol=protocol)
    assert f"refused to unpickle: it references '{os.system.__module__}.system'" in _error_for(path)
    assert not sentinel.exists()


def test_ckpt_renamed_safetensors_is_not_unpickled(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert detect_format(path) == "torch-zip"
    message = _error_for(path)
    assert "is a PyTorch zip checkpoint, not safetensors, despite its name" in message
    assert "a .safetensors file is never unpickled (rename it to .ckpt" in message


def test_broken_zips_and_tensorless_pickles(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.ones(1000)}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:1500])
    assert "cut.ckpt: corrupt or truncated zip archive" in _error_for(cut)
    plain = tmp_path / "photos.ckpt"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("cat.txt", "meow")
    assert "is a zip archive but not a PyTorch checkpoint (no data.pkl; found 'cat.txt')" in _error_for(plain)
    empty = tmp_path / "config.pt"
    torch.save({"lr": 0.1, "steps": 10}, empty)
    assert "contains no tensors (found 'lr', 'steps'); expected a state dict of weights" in _error_for(empty)
    listing = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listing)
    assert "holds a list, expected a dict of tensors" in _error_for(listing)


def test_corrupt_and_foreign_pickles(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"w": torch.ones(4)}, good)
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    raw = bytearray(good.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 2] = 0xFF  # first opcode after PROTO
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(raw))
    assert _error_for(bad).endswith("corrupt pickle data (invalid opcode 0xff)")

    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"lr": 0.1}, protocol=2))
    assert "is a plain pickle, not a file written by torch.save" in _error_for(plain)
    tensors = tmp_path / "tensors.pt"
    tensors.write_bytes(pickle.dumps({"w": torch.ones(2)}, protocol=2))
    assert "which the weights-only loader does not allow (a truncated file, or a pickle not written by" in (
        _error_for(tensors)
    )
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(4)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:40])
    assert _error_for(legacy).endswith("truncated: the pickle ends before its STOP opcode")


# ------------------------------------------------------------------------------------------------ hashes


def test_full_and_short_hashes_match_hashlib(tmp_path):
    data = os.urandom(0x100000 + 0x10000 + 0x12345)  # > 2 blocks; the autov1 window lies fully inside
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    full = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == full
    assert autov2(path) == full[:10]
    assert autov1(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_autov1_of_short_files_hashes_what_is_there(tmp_path):
    partial = os.urandom(0x100000 + 100)
    path = tmp_path / "partial.bin"
    path.write_bytes(partial)
    assert autov1(path) == hashlib.sha256(partial[0x100000:]).hexdigest()[:8]
    path.write_bytes(os.urandom(5000))  # shorter than the offset: sha256 of no bytes, as A1111
    assert autov1(path) == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"


def test_addnet_hash_covers_tensor_data_only(tmp_path):
    tensors = {"lora_up.weight": torch.randn(4, 2), "lora_down.weight": torch.randn(2, 4)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_state_dict(tensors, a, metadata={"ss_output_name": "a"})
    save_state_dict(tensors, b, metadata={"ss_output_name": "a much longer name"})
    raw = a.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert addnet_hash(a) == hashlib.sha256(raw[8 + header_len :]).hexdigest()
    assert addnet_hash(a) == addnet_hash(b) and sha256_file(a) != sha256_file(b)
    ckpt = tmp_path / "lora.ckpt"
    torch.save(tensors, ckpt)
    with pytest.raises(
        CheckpointError, match="lora.ckpt: cannot compute the addnet hash: not a .safetensors file"
    ):
        addnet_hash(ckpt)
