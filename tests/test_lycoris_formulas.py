"""LyCORIS and DoRA conventions PEFT cannot serve as a reference for, checked against a direct computation of
A1111's formulas (v1.10.1 extensions-builtin/Lora: network_hada/lokr/full/ia3.py, network.py finalize_updown):
LoHa on a conv without Tucker cores, LoKr with two full factors (alpha ignored), `scale`, full diff with
diff_b, IA3, DoRA on input columns and with a multiplier, SD2's packed q/k/v; several networks at once,
merge-lora, the base left bit-identical, refused algorithms, and the pipeline's Lora hashes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusekit.adapters.extra_networks import LoraLibrary, parse_hashes
from diffusekit.adapters.keys import adapter_names
from diffusekit.adapters.lora import (
    LoraError,
    apply_loras,
    load_lora,
    merge_loras,
    network_from_state_dict,
)
from diffusekit.checkpoints.load import load_model
from diffusekit.checkpoints.single_file import load_state_dict, save_state_dict
from diffusekit.cli import main
from diffusekit.metadata import parse_infotext
from diffusekit.params import GenerationParams
from diffusekit.pipeline import Pipeline
from helpers import make_checkpoint

CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3x3, 32 -> 32, bias
STRIDED = "lora_unet_down_blocks_0_downsamplers_0_conv"  # 3x3 stride 2, bias
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32 -> 32, no bias
EMB = "lora_unet_down_blocks_0_resnets_0_time_emb_proj"  # 128 -> 32, bias
TE_FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # 32 -> 64, bias


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    cfg, sd, path = make_checkpoint("tiny_sd1", tmp_path_factory.mktemp("f1"))
    return cfg, sd, path, load_model(path).model


def _rand(g, *shape, s=0.3):
    return torch.randn(*shape, generator=g) * s


def _layer(model, cfg, name):
    target = adapter_names(cfg)[name]
    comp = model.unet if target.component == "unet" else model.text_encoders[0]
    return target, comp.get_submodule(target.path)


def _op(layer, x, w, b):
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding)
    return F.linear(x, w, b)


def _check(model, cfg, sd, name, tensors, want_w, want_b=None, te=1.0, unet=1.0):
    """Hooks, merge mode and merge_loras all give the layer weight `want_w` (and bias `want_b`)."""
    net = network_from_state_dict({f"{name}.{k}": v for k, v in tensors.items()}, "n")
    target, layer = _layer(model, cfg, name)
    w0, b0 = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach().clone()
    want_b = b0 if want_b is None else want_b
    g = torch.Generator().manual_seed(5)
    x = (
        torch.randn(2, w0.shape[1], 8, 8, generator=g)
        if w0.ndim == 4
        else torch.randn(3, w0.shape[1], generator=g)
    )
    want = _op(layer, x, want_w, want_b)
    assert (want - _op(layer, x, w0, b0)).abs().max() > 1e-3, "the update changes nothing"
    for merge in (False, True):
        with torch.no_grad(), apply_loras(model, [(net, te, unet)], merge=merge) as applied:
            assert applied.unmatched == {"n": []}
            got = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, w0)
    prefix = "model.diffusion_model." if target.component == "unet" else cfg.text_prefixes[0]
    merged = merge_loras(sd, cfg, [(net, te, unet)])
    torch.testing.assert_close(merged[f"{prefix}{target.path}.weight"], want_w, rtol=0, atol=1e-6)
    if want_b is not None:
        torch.testing.assert_close(merged[f"{prefix}{target.path}.bias"], want_b, rtol=0, atol=1e-6)
    return net


def test_loha_conv_without_tucker(sd1):
    cfg, sd, _, model = sd1
    g = torch.Generator().manual_seed(0)
    _, layer = _layer(model, cfg, CONV)
    w = layer.weight.detach()
    r, alpha = 3, 1.5
    t = {"hada_w1_a": _rand(g, 32, r), "hada_w1_b": _rand(g, r, 32 * 9), "hada_w2_a": _rand(g, 32, r),
         "hada_w2_b": _rand(g, r, 32 * 9), "alpha": torch.tensor(alpha)}  # fmt: skip
    delta = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(w.shape)
    _check(model, cfg, sd, CONV, t, w + 0.7 * (alpha / r) * delta, unet=0.7)


def test_loha_tucker_on_strided_conv(sd1):
    cfg, sd, _, model = sd1
    g = torch.Generator().manual_seed(1)
    _, layer = _layer(model, cfg, STRIDED)
    w = layer.weight.detach()
    r = 2
    shapes = {"t1": (r, r, 3, 3), "w1_a": (r, 32), "w1_b": (r, 32), "t2": (r, r, 3, 3), "w2_a": (r, 32),
              "w2_b": (r, 32)}  # fmt: skip
    t = {f"hada_{p}": _rand(g, *s) for p, s in shapes.items()}

    def cp(i: int) -> torch.Tensor:  # Σ_ab t[a, b, k, l] w_a[a, p] w_b[b, q]
        return torch.einsum("abkl,ap,bq->pqkl", t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"])

    delta = cp(1) * cp(2)
    _check(model, cfg, sd, STRIDED, t, w + 1.2 * delta, unet=1.2)  # no alpha: scale 1


def test_lokr_full_factors_ignore_alpha_and_scale_key_wins(sd1):
    cfg, sd, _, model = sd1
    g = torch.Generator().manual_seed(2)
    _, layer = _layer(model, cfg, TO_Q)
    w = layer.weight.detach()
    w1, w2 = _rand(g, 4, 4), _rand(g, 8, 8)
    t = {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)}  # A1111: no rank, so alpha is unused
    _check(model, cfg, sd, TO_Q, t, w + torch.kron(w1, w2))
    t["scale"] = torch.tensor(0.25)
    _check(model, cfg, sd, TO_Q, t, w + 0.5 * 0.25 * torch.kron(w1, w2), unet=0.5)
    # low-rank w2 on a conv, kernel in lokr_w2_b: scale = alpha / rank of w2
    _, conv = _layer(model, cfg, CONV)
    cw = conv.weight.detach()
    w1, w2a, w2b = _rand(g, 4, 4), _rand(g, 8, 2), _rand(g, 2, 8 * 9)
    t = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(3.0)}
    delta = torch.kron(w1, w2a @ w2b).reshape(cw.shape)
    _check(model, cfg, sd, CONV, t, cw + 1.5 * delta)


def test_full_diff_with_bias(sd1):
    cfg, sd, _, model = sd1
    g = torch.Generator().manual_seed(3)
    _, layer = _layer(model, cfg, EMB)
    w, b = layer.weight.detach(), layer.bias.detach()
    diff, diff_b = _rand(g, *w.shape), _rand(g, 32)
    t = {"diff": diff, "diff_b": diff_b, "alpha": torch.tensor(4.0)}  # alpha unused: a full diff has no rank
    _check(model, cfg, sd, EMB, t, w + 0.8 * diff, b + 0.8 * diff_b, unet=0.8)
    # diff_b on a layer without a bias: added at run time in both modes; merge_loras has nowhere to put it
    _, q = _layer(model, cfg, TO_Q)
    diff, diff_b = _rand(g, 32, 32), _rand(g, 32)
    net = network_from_state_dict({f"{TO_Q}.diff": diff, f"{TO_Q}.diff_b": diff_b}, "nb")
    x = torch.randn(3, 32, generator=g)
    want = F.linear(x, q.weight + 0.5 * diff, 0.5 * diff_b)
    for merge in (False, True):
        with torch.no_grad(), apply_loras(model, [(net, 1.0, 0.5)], merge=merge):
            torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    assert q.bias is None
    with pytest.raises(LoraError, match="diff_b"):
        merge_loras(sd, cfg, [(net, 1.0, 0.5)])


def test_ia3_on_input_and_output(sd1):
    cfg, sd, _, model = sd1
    g = torch.Generator().manual_seed(4)
    _, layer = _layer(model, cfg, TO_Q)
    w = layer.weight.detach()
    v = _rand(g, 32)
    _check(
        model, cfg, sd, TO_Q, {"weight": v, "on_input": torch.tensor(1)}, w + 0.9 * w * v[None, :], unet=0.9
    )
    _, conv = _layer(model, cfg, CONV)
    cw = conv.weight.detach()
    v = _rand(g, 1, 32, 1, 1)
    _check(model, cfg, sd, CONV, {"weight": v, "on_input": torch.tensor(0)}, cw + cw * v.reshape(-1, 1, 1, 1))


def _col_norm(m):  # norm of each input column over the output rows and the kernel
    return m.transpose(0, 1).reshape(m.shape[1], -1).norm(dim=1).reshape(1, m.shape[1], *[1] * (m.ndim - 2))


def _row_norm(m):
    return m.reshape(m.shape[0], -1).norm(dim=1).reshape(m.shape[0], *[1] * (m.ndim - 1))


@pytest.mark.parametrize("orientation", ["input", "output"])
def test_dora_scale_orientations_with_multiplier(sd1, orientation):
    """ΔW = mult * (m * (W + s B A) / ||W + s B A|| - W), norm per input column for a (1, in, ...) magnitude
    (A1111 v1.10.1, LyCORIS wd_on_out=False) and per output row for (out, 1, ...) (LyCORIS wd_on_out)."""
    cfg, sd, _, model = sd1
    g = torch.Generator().manual_seed(6)
    for name, te, unet in [(CONV, 1.0, 0.6), (TE_FC1, -0.4, 1.0)]:
        _, layer = _layer(model, cfg, name)
        w = layer.weight.detach()
        down = _rand(g, 2, *w.shape[1:])
        up = _rand(g, w.shape[0], 2, *([1] * (w.ndim - 2)))
        merged = w + (3.0 / 2) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        norm = _col_norm if orientation == "input" else _row_norm
        mag = norm(w) * (0.5 + torch.rand(norm(w).shape, generator=g))
        t = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(3.0), "dora_scale": mag}
        mult = unet if name == CONV else te
        want = w + mult * (mag * merged / norm(merged) - w)
        _check(model, cfg, sd, name, t, want, te=te, unet=unet)


def test_dora_on_loha_and_wrong_magnitude_shape(sd1):
    cfg, sd, _, model = sd1
    g = torch.Generator().manual_seed(7)
    _, layer = _layer(model, cfg, TO_Q)
    w = layer.weight.detach()
    t = {"hada_w1_a": _rand(g, 32, 2), "hada_w1_b": _rand(g, 2, 32), "hada_w2_a": _rand(g, 32, 2),
         "hada_w2_b": _rand(g, 2, 32), "alpha": torch.tensor(1.0)}  # fmt: skip
    merged = w + 0.5 * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    t["dora_scale"] = _row_norm(w) * 1.3
    _check(model, cfg, sd, TO_Q, t, t["dora_scale"] * merged / _row_norm(merged))
    t["dora_scale"] = torch.ones(1, 31)
    net = network_from_state_dict({f"{TO_Q}.{k}": v for k, v in t.items()}, "bad")
    with pytest.raises(LoraError, match="DoRA magnitude of shape"):
        apply_loras(model, [(net, 1.0, 1.0)])


def test_sd2_packed_qkv_take_their_third(tmp_path):
    """SD2's OpenCLIP keeps q/k/v in one in_proj; LoHa on q, DoRA LoRA on v, full diff + diff_b on k."""
    cfg, sd, path = make_checkpoint("tiny_sd2", tmp_path)
    model = load_model(path).model
    g = torch.Generator().manual_seed(8)
    name = "lora_te_text_model_encoder_layers_1_self_attn_{}_proj"
    key = cfg.text_prefixes[0] + "transformer.resblocks.1.attn.in_proj_weight"
    w, b = sd[key], sd[key.replace("weight", "bias")]
    wv = w[64:]
    loha = {"hada_w1_a": _rand(g, 32, 2), "hada_w1_b": _rand(g, 2, 32), "hada_w2_a": _rand(g, 32, 2),
            "hada_w2_b": _rand(g, 2, 32)}  # fmt: skip
    down, up = _rand(g, 2, 32), _rand(g, 32, 2)
    mag = _row_norm(wv) * 0.7
    diff, diff_b = _rand(g, 32, 32), _rand(g, 32)
    tensors = {f"{name.format('q')}.{k}": v for k, v in loha.items()}
    tensors |= {f"{name.format('v')}.lora_down.weight": down, f"{name.format('v')}.lora_up.weight": up,
                f"{name.format('v')}.dora_scale": mag}  # fmt: skip
    tensors |= {f"{name.format('k')}.diff": diff, f"{name.format('k')}.diff_b": diff_b}
    net = network_from_state_dict(tensors, "p")
    te = 0.5
    want = w.clone()
    want[:32] += te * (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])
    want[32:64] += te * diff
    want[64:] += te * (mag * (wv + up @ down) / _row_norm(wv + up @ down) - wv)
    want_b = b.clone()
    want_b[32:64] += te * diff_b
    merged = merge_loras(sd, cfg, [(net, te, 1.0)])
    torch.testing.assert_close(merged[key], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[key.replace("weight", "bias")], want_b, rtol=0, atol=1e-6)
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    encoder = model.text_encoders[0]
    outs = []
    for merge in (False, True):
        with torch.no_grad(), apply_loras(model, [(net, te, 1.0)], merge=merge):
            outs.append(encoder(ids, final_norm=True).hidden)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(merged, strict=False)
    with torch.no_grad():
        baked = encoder(ids, final_norm=True).hidden
    model.load_state_dict(base)
    for got in outs:
        torch.testing.assert_close(got, baked, rtol=1e-5, atol=1e-5)


def _mixed(cfg, seed):
    """A file mixing LoHa, LoKr, DoRA LoRA and a full diff over a few U-Net and text-encoder layers."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1_a": (32, 2), "w1_b": (2, 288), "w2_a": (32, 2), "w2_b": (2, 288)}
    t = {f"{CONV}.hada_{p}": _rand(g, *s) for p, s in shapes.items()}
    t[f"{CONV}.alpha"] = torch.tensor(1.0)
    t |= {
        f"{TO_Q}.lokr_w1": _rand(g, 4, 4),
        f"{TO_Q}.lokr_w2_a": _rand(g, 8, 2),
        f"{TO_Q}.lokr_w2_b": _rand(g, 2, 8),
    }
    t |= {f"{TE_FC1}.lora_down.weight": _rand(g, 2, 32), f"{TE_FC1}.lora_up.weight": _rand(g, 64, 2),
          f"{TE_FC1}.dora_scale": torch.rand(64, 1, generator=g) + 0.5}  # fmt: skip
    t |= {f"{EMB}.diff": _rand(g, 32, 128, s=0.05), f"{EMB}.diff_b": _rand(g, 32)}
    return t


def test_two_networks_with_own_weights_merge_equals_runtime_and_base_restored(sd1, tmp_path):
    cfg, sd, _, model = sd1
    a, b = network_from_state_dict(_mixed(cfg, 10), "a"), network_from_state_dict(_mixed(cfg, 11), "b")
    loras = [(a, 0.3, 1.0), (b, 1.0, -0.4)]
    g = torch.Generator().manual_seed(12)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300.0])
    ids = torch.randint(0, 49406, (1, 77), generator=g)

    def outputs():
        with torch.no_grad():
            ctx = model.text_encoders[0](ids).hidden
            return [ctx, model.unet(x, t, ctx)]

    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = outputs()
    results = []
    for merge in (False, True):
        with apply_loras(model, loras, merge=merge):
            results.append(outputs())
    assert all(torch.equal(u, v) for u, v in zip(before, outputs(), strict=True))
    assert all(torch.equal(v, before_sd[k]) for k, v in model.state_dict().items())
    model.load_state_dict(merge_loras(sd, cfg, loras), strict=False)
    try:
        baked = outputs()
    finally:
        model.load_state_dict(before_sd)
    for got in results:
        assert (got[1] - before[1]).abs().max() > 1e-3
        for u, v in zip(got, baked, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_writer_round_trip_and_merge_lora_cli(sd1, tmp_path):
    cfg, sd, path, _ = sd1
    net = network_from_state_dict(_mixed(cfg, 13), "m")
    saved = net.save(tmp_path / "mixed.safetensors", cfg)
    again = load_lora(saved)
    assert set(again.modules) == set(net.modules) and not again.unsupported
    written, orig = load_state_dict(saved)[0], _mixed(cfg, 13)
    assert set(written) - set(orig) == {f"{TE_FC1}.alpha"}  # the writer states LoRA's alpha (= rank)
    assert float(written[f"{TE_FC1}.alpha"]) == 2.0
    assert all(torch.equal(written[k], v) for k, v in orig.items())
    with pytest.raises(LoraError, match="diffusers format"):
        net.save(tmp_path / "d.safetensors", cfg, style="diffusers")
    out = tmp_path / "baked.safetensors"
    assert main(["merge-lora", str(path), f"{saved}:0.5:0.7", "-o", str(out)]) == 0
    baked, _ = load_state_dict(out)
    want = merge_loras(sd, cfg, [(again, 0.5, 0.7)])
    assert all(torch.allclose(baked[k].float(), want[k].float(), rtol=0, atol=1e-6) for k in want)


@pytest.mark.parametrize(
    ("leaves", "algorithm"),
    [({"oft_blocks": (4, 8, 8)}, "OFT"), ({"oft_diag": (4, 8, 8)}, "OFT"),
     ({"a1.weight": (2, 32), "a2.weight": (32, 2), "b1.weight": (2, 32), "b2.weight": (32, 2)}, "GLoRA"),
     ({"w_norm": (32,), "b_norm": (32,)}, "norm")],
)  # fmt: skip
def test_refused_algorithms_are_errors_naming_algorithm_and_file(sd1, tmp_path, leaves, algorithm, capsys):
    cfg, _, model_path, _ = sd1
    file = tmp_path / "odd.safetensors"
    sd = {f"{TO_Q}.{k}": torch.zeros(s) for k, s in leaves.items()} | {f"{TO_Q}.alpha": torch.tensor(1.0)}
    sd |= {
        f"{CONV}.lora_down.weight": torch.zeros(2, 32, 3, 3),
        f"{CONV}.lora_up.weight": torch.zeros(32, 2, 1, 1),
    }
    save_state_dict(sd, file)
    with pytest.raises(LoraError, match=f"{file}.*{TO_Q} uses {algorithm}.*supported: LoRA"):
        load_lora(file)
    assert main(["merge-lora", str(model_path), str(file), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert algorithm in capsys.readouterr().err


def test_incomplete_or_unknown_leaves_are_reported(sd1):
    cfg, _, _, model = sd1
    g = torch.Generator().manual_seed(9)
    sd = {f"{TO_Q}.hada_w1_a": _rand(g, 32, 2), f"{TO_Q}.hada_w1_b": _rand(g, 2, 32),
          f"{TO_Q}.hada_w2_a": _rand(g, 32, 2), f"{TO_Q}.hada_w2_b": _rand(g, 2, 32),
          f"{TO_Q}.mystery": torch.zeros(1), f"{CONV}.hada_w1_a": _rand(g, 32, 2)}  # fmt: skip
    net = network_from_state_dict(sd, "inc")
    with apply_loras(model, [(net, 1.0, 1.0)]) as applied:
        assert sorted(applied.unmatched["inc"]) == sorted([f"{CONV}.hada_w1_a", f"{TO_Q}.mystery"])
        assert "2 key(s) not applied" in next(applied.warnings())


def test_prompt_tag_with_loha_file_has_lora_hashes_and_restores_base(sd1, tmp_path):
    cfg, _, path, _ = sd1
    (tmp_path / "loras").mkdir()
    file = tmp_path / "loras" / "hada.safetensors"
    save_state_dict(_mixed(cfg, 14), file)
    pipe = Pipeline.from_file(path, precision="fp32")
    pipe.loras = LoraLibrary(tmp_path / "loras")
    p = dict(steps=2, seed=3, width=64, height=64, sampler="euler")
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    base = pipe.generate(GenerationParams(prompt="a red circle", **p))
    tagged = pipe.generate(GenerationParams(prompt="a red circle <lora:hada:0.8:1.5>", **p))
    again = pipe.generate(GenerationParams(prompt="a red circle", **p))
    px = lambda r: np.asarray(r.images[0], dtype=np.int16)  # noqa: E731
    assert np.abs(px(tagged) - px(base)).max() > 0
    assert np.array_equal(px(base), px(again))
    assert all(torch.equal(v, before[k]) for k, v in pipe.model.state_dict().items())
    info = parse_infotext(tagged.infotexts[0])
    assert parse_hashes(info["Lora hashes"]) == {"hada": load_lora(file).shorthash}
