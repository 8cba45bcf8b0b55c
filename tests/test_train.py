"""Training: a few steps of each stage, exact resume after a simulated kill, and the exported file."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffusekit.checkpoints.inspect import inspect_checkpoint
from diffusekit.data.shapes import color_distance, has_near_color_pair, sample_spec
from diffusekit.diffusion.denoiser import output_to_denoised
from diffusekit.diffusion.schedules import sd_alphas_cumprod
from diffusekit.models.clip import build_text_encoder
from diffusekit.models.configs import TINY_SD1
from diffusekit.models.tokenizer import CLIPTokenizer
from diffusekit.models.unet import UNetModel
from diffusekit.params import GenerationParams, ModelDefaults
from diffusekit.pipeline import Pipeline
from diffusekit.train import loop
from diffusekit.train.contrast import BREAKS, Contrast
from diffusekit.train.loop import TrainConfig, Trainer, trains_in_bf16
from diffusekit.train.objectives import (
    LatentDiffusionObjective,
    LatentPool,
    Objective,
    TextToLatent,
    caption_draw_weights,
    denoising_target,
    min_snr_weights,
    shifted_timesteps,
)
from diffusekit.train.recipe import Recipe, dataset_sampler, run_recipe, train_ldm, train_vae

STAGE = TrainConfig(steps=4, batch_size=4, warmup=2, save_every=2, log_every=1, ema_decay=0.9)


def small_recipe() -> Recipe:
    """The default recipe's stages (eps, then a v / zero-terminal-SNR refine and two polish cycles) on
    tiny networks."""
    model = replace(TINY_SD1, prediction="v", zero_terminal_snr=True)
    refine, polish = replace(STAGE, seed=7), (replace(STAGE, seed=8), replace(STAGE, seed=9))
    return Recipe(model=model, vae=STAGE, ldm=STAGE, ldm_refine=refine, ldm_polish=polish, pool_size=12)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_vae_stage_resumes_exactly(tmp_path):
    recipe = small_recipe()
    straight, t_straight = train_vae(recipe, tmp_path / "a", resume=False)
    train_vae(recipe, tmp_path / "b", resume=False, stop_at=2)  # killed right after the step-2 checkpoint
    resumed, t_resumed = train_vae(recipe, tmp_path / "b", resume=True)  # a fresh process state
    assert t_resumed.state.step == 4
    assert t_resumed.state.losses == t_straight.state.losses
    assert_same_state(straight, resumed)
    first = t_straight.state.losses[0][1]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in t_straight.state.losses) and first > 0


def _resume_recipe():
    refine = replace(  # drawn batches, and the binding contrast at every noise level
        small_recipe().refine_objective,
        kind_weights=(("relation", 3.0),),
        contrast=Contrast(1, max_snr=1e9, breaks=BREAKS),  # several contradicting captions: drawn
        pad_dropout=0.5,  # drawn as well
    )
    return replace(small_recipe(), ldm_objective=Objective(timestep_shift=3.0), refine_objective=refine)


@pytest.fixture(scope="module")
def straight_ldm(tmp_path_factory):
    """The uninterrupted run every kill point is compared with (made once: it is the same for all)."""
    recipe = _resume_recipe()
    root = tmp_path_factory.mktemp("ldm-straight")
    vae, _ = train_vae(recipe, root / "vae", resume=False, stop_at=1)
    pool = LatentPool.encode(vae, dataset_sampler(recipe), recipe.pool_size)
    assert pool.moments.shape == (12, 8, 8, 8) and len(pool.captions) == 12
    straight, t_straight = train_ldm(recipe, pool, 0.5, root / "a", resume=False)
    assert [t.name for t in t_straight] == ["ldm", "refine", "polish", "polish2"]
    return recipe, pool, straight, [t.state.losses for t in t_straight]


@pytest.mark.parametrize("kill_at", [2, STAGE.steps + 1, 2 * STAGE.steps + 3, 3 * STAGE.steps + 1])
def test_ldm_stage_resumes_exactly(tmp_path, kill_at, straight_ldm):
    """Killed in stage 2, 2b, the first polish cycle and the second."""
    recipe, pool, straight, straight_losses = straight_ldm
    _, t_killed = train_ldm(recipe, pool, 0.5, tmp_path / "b", resume=False, stop_at=kill_at)
    assert sum(t.state.step for t in t_killed) == kill_at
    resumed, t_resumed = train_ldm(recipe, pool, 0.5, tmp_path / "b", resume=True)
    assert [t.state.losses for t in t_resumed] == straight_losses
    assert_same_state(straight, resumed)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_autocasts_to_bf16_only_where_the_cpu_computes_it(monkeypatch, native):
    """Emulated bf16 (an AVX2-only CPU) costs 20x fp32 per step, so "auto" trains in fp32 there."""
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert trains_in_bf16(STAGE, cpu) is native
    assert trains_in_bf16(replace(STAGE, bf16=False), cpu) is False  # a config without bf16 stays fp32
    assert trains_in_bf16(STAGE, cpu, "bf16") and not trains_in_bf16(STAGE, cpu, "fp32")  # forced
    with pytest.raises(ValueError, match="unknown training precision 'half'; valid: auto, bf16, fp32"):
        trains_in_bf16(STAGE, cpu, "half")


def test_trainer_computes_the_loss_in_the_chosen_precision(tmp_path):
    dtypes = {}
    for precision in ("bf16", "fp32"):

        def loss(module: torch.nn.Module, step: int, precision: str = precision) -> torch.Tensor:
            out = module(torch.ones(2, 3))  # (2, 1)
            dtypes[precision] = out.dtype
            return out.float().pow(2).mean()

        trainer = Trainer("t", torch.nn.Linear(3, 1), STAGE, tmp_path / precision, precision=precision)
        trainer.run(loss, progress=False, stop_at=1)
    assert dtypes == {"bf16": torch.bfloat16, "fp32": torch.float32}


def test_a_run_resumes_in_another_precision(tmp_path):
    recipe = small_recipe()
    train_vae(recipe, tmp_path, resume=False, stop_at=2, precision="bf16")
    _, trainer = train_vae(recipe, tmp_path, resume=True, precision="fp32")
    assert trainer.state.step == STAGE.steps and not trainer.bf16


def test_recipe_exports_a_checkpoint_the_pipeline_loads(tmp_path):
    recipe = replace(small_recipe(), recommended=ModelDefaults(cfg_scale=2.0))
    path = run_recipe(recipe, tmp_path / "run", resume=False)
    assert (tmp_path / "run" / "loss.png").is_file()
    report = inspect_checkpoint(path)
    assert report.family == "sd1" and {c.name for c in report.components} == {"unet", "vae", "text_encoder"}
    assert all(set(c.dtypes) == {"fp16"} for c in report.components)
    pipe = Pipeline.from_file(path)
    assert pipe.cfg.prediction == "v" and pipe.cfg.zero_terminal_snr  # what the last stage trained
    assert pipe.cfg.vae.scaling_factor != 1.0  # measured from the latents, not the preset's placeholder
    assert pipe.defaults == ModelDefaults(cfg_scale=2.0) and report.recommended == {"cfg_scale": 2.0}
    image = pipe.generate(GenerationParams(prompt="a red circle", steps=2, seed=1)).images[0]
    assert image.size == (64, 64)


def test_recipe_model_must_describe_the_last_stage():
    with pytest.raises(ValueError, match="last U-Net stage trains prediction='v'.*model config says"):
        replace(small_recipe(), model=TINY_SD1)
    eps_only = replace(small_recipe(), model=TINY_SD1, ldm_refine=None)
    stages = [(name, objective) for name, _, objective in eps_only.stages()]
    assert stages == [("ldm", Objective()), ("polish", Objective()), ("polish2", Objective())]
    assert replace(eps_only, ldm_polish=()).stages()[-1][0] == "ldm"
    none = r"ldm_polish is a tuple of TrainConfig.*\(\(\) for none\), not NoneType"
    with pytest.raises(TypeError, match=none):
        replace(eps_only, ldm_polish=None)


def test_polish_cycles_repeat_the_refine_objective_with_fresh_schedules():
    stages = Recipe().stages()
    assert [name for name, _, _ in stages] == ["ldm", "refine", "polish", "polish2"]
    (_, refine, refine_objective), *polish = stages[1:]
    assert all(objective == refine_objective and cfg.lr < refine.lr for _, cfg, objective in polish)
    assert len({cfg.seed for _, cfg, _ in stages}) == len(stages)  # every cycle draws its own batches
    scaled = Recipe().scaled(0.1)
    assert [c.steps for c in scaled.ldm_polish] == [cfg.steps // 10 for _, cfg, _ in polish]
    assert {c.warmup for c in scaled.ldm_polish} == {10} and scaled.ldm.warmup == 30  # warmups scale too
    tiny = Recipe().scaled(1e-4)
    assert all(c.steps == c.warmup == 1 for c in (tiny.vae, tiny.ldm, tiny.ldm_refine, *tiny.ldm_polish))


def test_min_snr_weights():
    a = torch.tensor([0.99, 5 / 6, 0.5, 0.01])  # SNR 99, 5, 1, 1/99
    w = min_snr_weights(a, 5.0)
    assert torch.allclose(w, torch.tensor([5 / 99, 1.0, 1.0, 1.0]), rtol=1e-5)
    # v: the cap applies to SNR + 1, and the (nearly) zero-SNR end keeps full weight
    w = min_snr_weights(torch.tensor([0.99, 0.8, 0.5, 2.0**-24]), 5.0, "v")
    assert torch.allclose(w, torch.tensor([5 / 100, 1.0, 1.0, 1.0]), rtol=1e-5)
    # floor: x0 weight min(SNR, 5) + 0.05, i.e. (min(SNR, 5) + 0.05) / (SNR + 1) on the v loss
    w = min_snr_weights(torch.tensor([0.99, 0.5, 0.0]), 5.0, "v", floor=0.05)
    assert torch.allclose(w, torch.tensor([5.05 / 100, 1.05 / 2, 0.05]), rtol=1e-5)
    w = min_snr_weights(torch.tensor([0.99, 0.5]), 5.0, "eps", floor=0.05)
    assert torch.allclose(w, torch.tensor([5.05 / 99, 1.05]), rtol=1e-5)


def test_objective_is_checked_on_construction():
    """A bad recipe objective fails when the recipe is written, not after the VAE stage has trained."""
    for gamma, floor in ((None, 0.1), (5.0, -0.1)):
        with pytest.raises(ValueError, match="weight_floor"):
            Objective(min_snr_gamma=gamma, weight_floor=floor)
    with pytest.raises(ValueError, match="unknown prediction 'x0'; valid: eps, v"):
        Objective(prediction="x0")
    with pytest.raises(ValueError, match="zero_terminal_snr needs prediction='v'"):
        Objective(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="timestep_shift must be positive"):
        Objective(timestep_shift=0.0)
    with pytest.raises(ValueError, match="unknown caption kind 'relations' in kind_weights; valid: single, "):
        Objective(kind_weights=(("relations", 2.0),))
    with pytest.raises(ValueError, match="factor for 'list' must be positive, got 0"):
        Objective(kind_weights=(("list", 0),))
    with pytest.raises(ValueError, match="near_color_weight must be positive, got 0"):
        Objective(near_color_weight=0)
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match=rf"pad_dropout must be in \[0, 1\) .* got {p}"):
            Objective(pad_dropout=p)


def test_pad_dropout_gives_rows_the_empty_captions_padding():
    """A dropped row keeps its own states up to its EOS and takes the empty caption's after it; a
    contrast row follows the row it repeats; an empty caption is never dropped."""
    torch.manual_seed(0)
    model = TextToLatent(UNetModel(TINY_SD1.unet), build_text_encoder(TINY_SD1.text_encoders[0])).eval()
    captions = ["a red circle", "", "a blue star to the left of a green square", "two cyan crosses"]
    pool = LatentPool(torch.zeros(4, 8, 8, 8), captions)
    obj = LatentDiffusionObjective(
        pool, CLIPTokenizer.bundled(), batch_size=4, scaling_factor=1.0, objective=Objective(pad_dropout=0.5)
    )
    off = LatentDiffusionObjective(pool, CLIPTokenizer.bundled(), batch_size=4, scaling_factor=1.0)
    assert off.padding_drops(captions, [2]) == []
    random.seed(3)
    drops = obj.padding_drops(captions, [2, 0])
    random.seed(3)
    assert obj.padding_drops(captions, [2, 0]) == drops  # from the python RNG (a checkpoint holds it)
    assert len(drops) == 6 and drops[1] is False and drops[4:] == [drops[2], drops[0]]
    drops = [True, True, True, False]
    with torch.no_grad():
        plain, empty = obj.encode(model, captions), obj.encode(model, [""])
        dropped = obj.encode(model, captions, drops)
    assert dropped.shape == plain.shape == (4, 77, TINY_SD1.text_encoders[0].width)
    for i, caption in enumerate(captions):
        n = len(obj.tokenizer.encode(caption)) + 2  # BOS ... EOS
        assert torch.allclose(dropped[i, :n], plain[i, :n], atol=1e-6)
        after = empty[0, n:] if drops[i] else plain[i, n:]
        assert torch.allclose(dropped[i, n:], after, atol=1e-6)
        if drops[i] and caption:
            assert not torch.allclose(plain[i, n:], empty[0, n:], atol=1e-3)  # the padding did change
    with pytest.raises(ValueError, match="got 2 padding drops for 4 captions"):
        obj.encode(model, captions, [True, False])


def test_kind_weights_draw_the_named_kinds_more_often():
    captions = ["a red circle", "a blue star above a green square", "two cyan crosses", "a star at the top"]
    assert caption_draw_weights(captions, {}) is None
    weights = caption_draw_weights(captions, {"relation": 3.0, "count": 0.5})
    assert weights.tolist() == [1.0, 3.0, 0.5, 1.0]
    mean = torch.arange(4.0)[:, None, None, None].expand(4, 4, 2, 2)  # latent i is all i
    pool = LatentPool(torch.cat([mean, torch.full_like(mean, -30.0)], dim=1), captions)  # ~zero variance
    torch.manual_seed(0)
    drawn = []
    for step in range(200):
        z, caps = pool.batch(step, 50, weights)
        expected = pool.moments[[captions.index(c) for c in caps]].chunk(2, dim=1)[0]
        assert z.shape == (50, 4, 2, 2) and torch.allclose(z, expected, atol=1e-5)  # its caption's latent
        drawn += caps
    share = {c: drawn.count(c) / len(drawn) for c in captions}  # expected 1/5.5, 3/5.5, 0.5/5.5, 1/5.5
    for c, w in zip(captions, weights.tolist(), strict=True):
        assert abs(share[c] - w / 5.5) < 0.01, (c, share[c])


def test_near_color_weight_draws_two_shapes_in_neighbouring_colors_more_often():
    captions = [
        "a red circle and an orange star",  # one ring step apart, two shapes: near
        "a pink diamond to the left of a red square",  # pink and red are neighbours on the ring
        "a cyan cross and a cyan triangle",  # one color twice
        "a red circle and an orange circle",  # one shape: not the failure this targets
        "a red circle and a green star",  # three steps apart
        "a blue star, two purple stars and a yellow circle",  # the blue/purple pair shares its shape
        "two red circles",
        "a star and a circle",  # no colors named
    ]
    weights = caption_draw_weights(captions, {}, 3.0)
    assert weights.tolist() == [3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert caption_draw_weights(captions, {"relation": 2.0}, 3.0)[:2].tolist() == [3.0, 6.0]  # they multiply
    assert color_distance("red", "pink") == 1 and color_distance("red", "cyan") == 4
    with pytest.raises(ValueError, match="unknown color 'teal'; valid: red, orange"):
        color_distance("red", "teal")
    share = sum(has_near_color_pair(sample_spec(np.random.default_rng(i))) for i in range(2000)) / 2000
    assert 0.12 < share < 0.24  # about 18% of the training captions


def test_shifted_timesteps_favour_the_noisy_end():
    torch.manual_seed(0)
    uniform = shifted_timesteps(100_000, 1000, 1.0)
    shifted = shifted_timesteps(100_000, 1000, 3.0)
    for t in (uniform, shifted):
        assert t.dtype == torch.int64 and int(t.min()) == 0 and int(t.max()) == 999
    assert abs(float((uniform >= 800).float().mean()) - 0.2) < 0.01
    # P(t >= 800) = P(u >= 4/7) for shift 3; P(t < 200) = P(u < 1/13)
    assert abs(float((shifted >= 800).float().mean()) - 3 / 7) < 0.01
    assert abs(float((shifted < 200).float().mean()) - 1 / 13) < 0.01


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_target_is_what_the_sampler_decodes(prediction):
    """A U-Net that outputs the training target exactly gives back the clean latent through the
    sampler's conversion (VE latent x = x_t * sqrt(1 + sigma^2)), down to the zero-SNR step for v."""
    zero_snr = prediction == "v"
    abar = sd_alphas_cumprod(zero_terminal_snr=zero_snr).double()
    t = torch.tensor([0, 400, 999])
    a = abar[t][:, None, None, None]  # (3, 1, 1, 1)
    z, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    sigma = ((1 - abar[t]) / abar[t]).sqrt()  # (3,)
    x = x_t * (1 + sigma[:, None, None, None] ** 2).sqrt()
    out = output_to_denoised(x, sigma, denoising_target(z, noise, a, prediction), prediction)
    assert torch.allclose(out, z, atol=1e-6)
    if zero_snr:  # at zero SNR the v target is -z: nothing of the clean latent is left in x_t
        assert torch.allclose(denoising_target(z, noise, a, "v")[2], -z[2], atol=1e-3)


def test_ldm_loss_weighting_is_the_recipe_setting(tmp_path):
    """min_snr_gamma=None trains on the plain MSE; the recipe's gamma changes the loss (same draws)."""
    stage = replace(STAGE, batch_size=32)  # so that some timesteps are nearly clean (SNR > 5)
    plain, weighted = (
        replace(small_recipe(), ldm=stage, ldm_objective=Objective(min_snr_gamma=g)) for g in (None, 5.0)
    )
    vae, _ = train_vae(plain, tmp_path / "vae", resume=False, stop_at=1)
    pool = LatentPool.encode(vae, dataset_sampler(plain), plain.pool_size)
    _, t_plain = train_ldm(plain, pool, 0.5, tmp_path / "a", resume=False, stop_at=1)
    _, t_weighted = train_ldm(weighted, pool, 0.5, tmp_path / "b", resume=False, stop_at=1)
    assert t_weighted[0].state.losses[0][1] < t_plain[0].state.losses[0][1]  # weights are <= 1


@pytest.mark.parametrize(
    ("flags", "stages"), [([], ["ldm", "refine", "polish", "polish2"]), (["--no-polish"], ["ldm", "refine"])]
)
def test_train_command_runs_the_recipe_with_or_without_polish_cycles(monkeypatch, tmp_path, flags, stages):
    from diffusekit import cli
    from diffusekit.train import recipe as recipe_module

    ran = []
    monkeypatch.setattr(recipe_module, "run_recipe", lambda recipe, out, **kw: ran.append(recipe) or tmp_path)
    assert cli.main(["train", "--out", str(tmp_path), "--scale", "0.5", *flags]) == 0
    assert [name for name, _, _ in ran[0].stages()] == stages and ran[0].ldm.steps == Recipe().ldm.steps // 2
