"""Pretraining the toy SDXL (``python -m dreampeft.toy pretrain``): its scenes, its loss, its
architecture options and its flags, on a few steps of tiny runs."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from dreampeft.toy.evaluate import is_toy
from dreampeft.toy.models import HEADS


@pytest.mark.parametrize("unnamed", ["any", "center", "top left"])
def test_pretrain_scenes_put_the_object_where_an_unnamed_position_says(unnamed):
    """Captions that name no position show the object at ``unnamed_position``; the others (and
    every other attribute) are the world's scenes, unchanged."""
    from dreampeft.toy.data import render_set

    world, _ = render_set(4, 200)
    scenes, pixels = render_set(4, 200, unnamed_position=unnamed)
    assert len(pixels) == 200
    named = [s for s, w in zip(scenes, world) if "position" in w.mention]
    assert 0.5 < len(named) / 200 < 0.9 and all(s in world for s in named)
    moved = [(s, w) for s, w in zip(scenes, world) if "position" not in w.mention]
    assert all(s == (w if unnamed == "any" else replace(w, position=unnamed)) for s, w in moved)
    if unnamed != "any":
        assert any(w.position != unnamed for _, w in moved)  # something did move


@pytest.mark.parametrize("unet, vae, want", [("center", "same", "center"), ("center", "any", "any"),
                                              ("any", "center", "center"), ("any", "same", "any")])
def test_the_vae_trains_on_scenes_placed_as_vae_unnamed_position_says(unet, vae, want):
    """`--vae_unnamed_position` places the VAE's unnamed objects apart from the UNet's ("same": as
    the UNet's); the striped extras come on top either way."""
    from dreampeft.toy.data import render_set
    from dreampeft.toy.pretrain import PretrainConfig, vae_data

    c = PretrainConfig(n_images=60, seed=3, unnamed_position=unet, vae_unnamed_position=vae, vae_striped=0.5)
    scenes, pixels = render_set(3, 60, unnamed_position=unet)
    vae_scenes, vae_pixels = vae_data(c, scenes, pixels)
    expected, expected_pixels = render_set(3, 60, unnamed_position=want)
    assert vae_scenes[:60] == expected and torch.equal(vae_pixels[:60], expected_pixels)
    assert len(vae_scenes) == len(vae_pixels) == 90


def test_pretrain_writes_a_toy_folder_and_reusing_its_vae_trains_the_same_unet(tmp_path, capsys):
    """`pretrain --vae DIR` (retrain the UNet on a saved toy's VAE) gives exactly the UNet a full
    run gives: the UNet always learns the fp16 VAE that ships. A few steps of each stage here."""
    from safetensors.torch import load_file

    from dreampeft.toy.__main__ import main

    tiny = ["--vae_steps", "2", "--unet_steps", "2", "--judge_steps", "2", "--n_images", "32", "--batch", "8",
            "--eval_captions", "6"]
    assert main(["pretrain", str(tmp_path / "full"), *tiny, "--attention_16", "up"]) == 0
    assert main(["pretrain", str(tmp_path / "reuse"), *tiny, "--attention_16", "up", "--vae", str(tmp_path / "full")]) == 0
    for part in ("unet", "vae", "text_encoder"):
        name = "diffusion_pytorch_model" if part != "text_encoder" else "model"
        a, b = (load_file(tmp_path / run / part / f"{name}.safetensors") for run in ("full", "reuse"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert is_toy(tmp_path / "reuse") and (tmp_path / "reuse" / "samples.png").exists()
    # a second stage (`--init`): continues the folder's UNet and encoders, on its VAE, and moves them
    assert main(["pretrain", str(tmp_path / "more"), *tiny, "--init", str(tmp_path / "full"), "--snr_floor", "1",
                 "--object_weight", "10", "--min_timestep", "700", "--eval_every", "1"]) == 0
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        a, b = (load_file(tmp_path / run / part / f"{name}.safetensors") for run in ("full", "more"))
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), part
        assert all(torch.equal(a[k], b[k]) for k in a) == (part == "vae"), part
    more = json.loads((tmp_path / "more" / "pretrain_report.json").read_text())
    assert (more["unet_width"], more["attention_16"]) == (1, "up")  # the folder's UNet, not the flags' defaults
    for config in (tmp_path / "more").glob("*/config.json"):  # nothing of the earlier stage's folder
        assert str(tmp_path) not in config.read_text(), config
    # the folder's judge is reused (trained on the same seed, images, steps and batch); other judge
    # settings train their own
    judges = {run: load_file(tmp_path / run / "judge.safetensors") for run in ("full", "more")}
    assert all(torch.equal(judges["full"][k], judges["more"][k]) for k in judges["full"])
    assert "judge: " in capsys.readouterr().out
    assert main(["pretrain", str(tmp_path / "own"), *tiny, "--init", str(tmp_path / "full"), "--judge_steps", "3"]) == 0
    own = load_file(tmp_path / "own" / "judge.safetensors")
    assert not all(torch.equal(judges["full"][k], own[k]) for k in own)
    assert main(["pretrain", str(tmp_path / "sharp"), *tiny, "--init", str(tmp_path / "full"), "--judge_blur", "0"]) == 0
    sharp = load_file(tmp_path / "sharp" / "judge.safetensors")
    assert not all(torch.equal(judges["full"][k], sharp[k]) for k in sharp)
    with pytest.raises(SystemExit):
        main(["pretrain", str(tmp_path / "wider"), *tiny, "--init", str(tmp_path / "full"), "--unet_width", "2"])
    assert "architecture is the folder's" in capsys.readouterr().err
    curve = json.loads((tmp_path / "reuse" / "pretrain_report.json").read_text())["curve"]
    assert [p["step"] for p in curve] == [2] and set(curve[0]) == {"step", *HEADS}  # read along training
    assert [p["step"] for p in json.loads((tmp_path / "more" / "pretrain_report.json").read_text())["curve"]] == [1, 2]


@pytest.mark.parametrize("weight, inside, expected", [(0, 1.0, 0.25), (10, 0.0, 0.75 / 3.5), (10, 1.0, 2.75 / 3.5),
                                                     (10, 0.5, 0.5)])
def test_pretrain_object_weight_puts_the_loss_on_the_object(weight, inside, expected):
    """A quarter of the latent is object: an even error reads as plain MSE whatever the weight, and
    with weight 10 the object's share of the loss is 2.75 / 3.5 instead of 1/4."""
    from dreampeft.toy.loss import object_weighted_mse

    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :2, :2] = 1
    err = masks.expand(2, 3, 4, 4) * inside + (1 - masks.expand(2, 3, 4, 4)) * (1 - inside)
    assert torch.allclose(object_weighted_mse(err, masks, weight), torch.full((2,), expected))
    even = torch.full((2, 3, 4, 4), 0.3)
    assert torch.allclose(object_weighted_mse(even, masks, weight), even.mean((1, 2, 3)))


@pytest.mark.parametrize("pool", [1, 2, 4])
def test_pretrain_snr_floor_on_pooled_error_teaches_layout_not_detail(pool):
    """The floor's extra weight at the noisiest steps falls on the error of pool × pool means: an
    error that is even within each block costs what it costs on every pixel; a checkerboard (detail
    with no layout) costs only min-SNR's weight. Floor 0 is min-SNR whatever the pool."""
    from dreampeft.toy.loss import floored_v_loss

    snr = torch.tensor([1175.0, 0.64, 0.02, 0.0])  # t = 0, 400, 800, 999 of the toy's schedule
    target = torch.zeros(4, 4, 16, 16)
    blocks = torch.randn(4, 4, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)  # even in 4 × 4 blocks
    checker = (torch.arange(16)[:, None] + torch.arange(16)).remainder(2).mul(2).sub(1).float().expand(4, 4, 16, 16)
    weight = snr.clamp(min=0.25, max=5) / (snr + 1)
    mse = lambda e: e.pow(2).mean((1, 2, 3))  # noqa: E731
    assert torch.allclose(floored_v_loss(blocks, target, snr, 0.25, pool), (mse(blocks) * weight).mean())
    detail = floored_v_loss(checker, target, snr, 0.25, pool)
    min_snr = (mse(checker) * snr.clamp(max=5) / (snr + 1)).mean()
    assert torch.allclose(detail, min_snr if pool > 1 else (mse(checker) * weight).mean())
    if pool > 1:  # the floor's steps no longer pay for detail
        assert detail < 0.7 * (mse(checker) * weight).mean()
    assert torch.allclose(floored_v_loss(checker, target, snr, 0.0, pool), min_snr)


@pytest.mark.parametrize("pool", [2, 4])
def test_pretrain_floor_keeps_background_detail_drops_the_objects(pool):
    """With ``background_detail`` the floor pays for detail (a checkerboard, like a patterned
    background) in blocks the object does not touch, and not in those it does: no object is the
    unpooled loss, an object everywhere is the pooled one, a corner object in between."""
    from dreampeft.toy.loss import floored_v_loss

    snr = torch.tensor([1175.0, 0.64, 0.02, 0.0])
    target = torch.zeros(4, 4, 16, 16)
    checker = (torch.arange(16)[:, None] + torch.arange(16)).remainder(2).mul(2).sub(1).float().expand(4, 4, 16, 16)
    none, everywhere = torch.zeros(4, 1, 16, 16), torch.ones(4, 1, 16, 16)
    corner = none.clone()
    corner[:, :, :2, :2] = 0.5  # inside the first block whatever the pool
    loss = lambda m: floored_v_loss(checker, target, snr, 0.25, pool, m, background_detail=True)  # noqa: E731
    assert torch.allclose(loss(none), floored_v_loss(checker, target, snr, 0.25, 1))
    assert torch.allclose(loss(everywhere), floored_v_loss(checker, target, snr, 0.25, pool))
    weight, min_snr = snr.clamp(min=0.25, max=5) / (snr + 1), snr.clamp(max=5) / (snr + 1)
    free = 1 - (pool / 16) ** 2  # the share of pixels outside the object's block
    assert torch.allclose(loss(corner), (min_snr + (weight - min_snr) * free).mean())
    with pytest.raises(ValueError, match="masks"):
        floored_v_loss(checker, target, snr, 0.25, pool, None, background_detail=True)


@pytest.mark.parametrize("where, attends_16, width", [("none", (False, False), 1), ("up", (False, True), 1),
                                                      ("both", (True, True), 1), ("none", (False, False), 2)])
def test_toy_unet_attention_at_16x16_and_width(where, attends_16, width):
    from dreampeft.toy.models import build_toy_unet, toy_unet_shape

    unet = build_toy_unet(0, where, width)
    assert tuple(unet.config.block_out_channels) == (32 * width, 64 * width, 128 * width)
    assert toy_unet_shape(unet) == (width, where)  # what the report records
    first_down, last_up = unet.down_blocks[0], unet.up_blocks[-1]
    assert (hasattr(first_down, "attentions"), hasattr(last_up, "attentions")) == attends_16
    out = unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 77, unet.config.cross_attention_dim),
               added_cond_kwargs={"text_embeds": torch.randn(1, unet.config.projection_class_embeddings_input_dim - 6 * 8),
                                  "time_ids": torch.zeros(1, 6)}).sample
    assert out.shape == (1, 4, 16, 16)


def test_pretrain_bf16_steps_run_in_bf16_and_keep_float32_weights():
    """``--mixed_precision bf16``: the step's convolutions really run in bfloat16, its loss is close to
    float32's (the same batch, within bf16's precision), and the weights, their EMA and the returned
    models stay float32."""
    from dreampeft.tiny import build_tiny_sdxl
    from dreampeft.toy.data import render_set
    from dreampeft.toy.models import build_toy_unet
    from dreampeft.toy.pretrain import PretrainConfig, tokenize_captions, train_unet

    scenes, _ = render_set(0, 16)
    pipe = build_tiny_sdxl(0)
    text = tokenize_captions([pipe.tokenizer, pipe.tokenizer_2], [s.caption() for s in scenes])
    latents = (torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((16, 4, 16, 16), 0.1))
    losses, computed = {}, {}
    for precision in ("no", "bf16"):
        logged = []
        c = PretrainConfig(unet_steps=1, batch=8, snr_floor=0.1, floor_pool=4, mixed_precision=precision)
        start = [build_toy_unet(0), *(copy.deepcopy(e) for e in (pipe.text_encoder, pipe.text_encoder_2))]
        start[0].conv_in.register_forward_hook(lambda m, i, out, p=precision: computed.update({p: out.dtype}))
        models = train_unet(latents, text, start, c, logged.append)
        losses[precision] = float(logged[-1].split()[-1])
        assert all(p.dtype == torch.float32 for m in (*models, *start) for p in m.parameters()), precision
        assert not torch.equal(start[0].conv_in.weight, build_toy_unet(0).conv_in.weight)  # it trained
    assert computed == {"no": torch.float32, "bf16": torch.bfloat16}
    assert losses["bf16"] == pytest.approx(losses["no"], rel=0.03)


@pytest.mark.parametrize("flag, value", [("--snr_floor", "9"), ("--vae_striped", "1.5"), ("--batch", "1"),
                                         ("--unet_steps", "0"), ("--vae", "no/such/folder"), ("--layout_floor", "-1"),
                                         ("--layout_share", "2"), ("--unet_lr", "0"), ("--attention_16", "sideways"),
                                         ("--eval_captions", "0"), ("--unet_width", "0"), ("--init", "no/such/folder"),
                                         ("--object_weight", "-1"), ("--min_timestep", "999"), ("--eval_every", "0"),
                                         ("--unnamed_position", "middle"), ("--floor_pool", "3"), ("--vae_unnamed_position", "left"),
                                         ("--floor_detail", "edges"), ("--judge_blur", "9"), ("--judge_tiny", "2"),
                                         ("--mixed_precision", "fp16")])
def test_pretrain_rejects_bad_flags_by_name(flag, value, tmp_path, capsys):
    from dreampeft.toy.__main__ import main

    with pytest.raises(SystemExit):
        main(["pretrain", str(tmp_path), flag, value])
    assert flag in capsys.readouterr().err


def test_judge_command_retrains_a_folders_judge_alone(tmp_path, capsys):
    """`python -m dreampeft.toy judge MODEL`: a new judge (the one pretraining with the folder's seed,
    images and batch and the given blur and steps trains) and the model's prompt following re-read
    with it; the UNet is untouched and the earlier judge's settings and figures stay in the report.
    A folder that is not a toy model, or a bad flag, changes nothing and says what to pass."""
    from safetensors.torch import load_file

    from dreampeft.toy.__main__ import main
    from dreampeft.toy.judge import train_judge

    model = tmp_path / "toy"
    assert main(["pretrain", str(model), "--vae_steps", "2", "--unet_steps", "2", "--judge_steps", "2",
                 "--n_images", "32", "--batch", "8", "--eval_captions", "6", "--judge_blur", "0"]) == 0
    before = json.loads((model / "pretrain_report.json").read_text())
    unet = (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    for bad, says in ((["judge", str(tmp_path / "nothing")], "not a toy model folder"),
                      (["judge", str(model), "--judge_blur", "9"], "judge_blur")):
        with pytest.raises(SystemExit):
            main(bad)
        assert says in capsys.readouterr().err
        assert json.loads((model / "pretrain_report.json").read_text()) == before
    assert main(["judge", str(model), "--judge_blur", "1.5", "--judge_steps", "3", "--judge_tiny", "0.25",
                 "--judge_orange", "0.75"]) == 0
    report = json.loads((model / "pretrain_report.json").read_text())
    assert [report[k] for k in ("judge_blur", "judge_steps", "judge_tiny", "judge_orange")] == [1.5, 3, 0.25, 0.75]
    assert report["judges"] == [{"judge_steps": 2, "judge_blur": 0.0, "judge_tiny": before["judge_tiny"],
                                 "judge_orange": before["judge_orange"], "prompt_following": before["prompt_following"]}]
    assert set(report["prompt_following"]) == set(HEADS) and report["curve"] == before["curve"]
    expected = train_judge(before["seed"], before["n_images"] // 2, 3, before["batch"], lambda m: None, 1.5, 0.25, 0.75)
    saved = load_file(model / "judge.safetensors")
    assert all(torch.equal(saved[k], v.half()) for k, v in expected.state_dict().items())
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet
    assert not list(model.glob(".*"))  # no temporary file left behind


def test_judge_blur_blurs_each_image_by_its_own_sigma():
    """The judge's augmentation: sigma 0 leaves an image as it is, a sigma blurs as PIL's Gaussian
    blur of that radius does (the drawings the bench's earlier judge misread were blurred so), the
    mean colour is kept, and each image of a batch gets its own sigma."""
    import numpy as np
    from PIL import ImageFilter

    from dreampeft.toy.data import to_unit
    from dreampeft.toy.judge import blur_batch
    from dreampeft.toyworld import render, world_sample

    scenes = [world_sample(3, i) for i in range(4)]
    x = to_unit(torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes])).permute(0, 3, 1, 2))
    sigma = torch.tensor([0.0, 1.0, 2.0, 3.0])
    y = blur_batch(x, sigma)
    assert torch.allclose(y[0], x[0], atol=1e-6)
    for i in (1, 2, 3):
        pil = render(scenes[i]).filter(ImageFilter.GaussianBlur(float(sigma[i])))
        ref = to_unit(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
        diff, moved = (y[i] - ref).abs().mean().item(), (x[i] - ref).abs().mean().item()
        assert diff < 0.25 * moved, (i, diff, moved)  # far closer to PIL's blur than to the sharp image
        assert torch.allclose(y[i].mean((1, 2)), x[i].mean((1, 2)), atol=0.02)
    other = x.clone()
    other[[0, 1, 3]] = torch.rand(3, *x.shape[1:])
    assert torch.equal(blur_batch(other, sigma)[2], y[2])  # the other images do not leak in


def test_judge_scenes_draw_dots_and_orange_shapes():
    """``judge_tiny``: that share of the small objects is drawn at 0.45–0.75× the small diameter (the toy's
    models draw dots, which a judge that never saw one read as the star), still labelled small and
    with its own shape; ``judge_orange``: plain shapes in the star's colour. Nothing else changes,
    and 0 is the world as rendered."""
    import numpy as np

    from dreampeft.toy.data import render_set
    from dreampeft.toy.judge import judge_scenes
    from dreampeft.toyworld import SHAPES, object_mask

    world, pixels = render_set(7, 300, subject_rate=0.3)
    plain, same = judge_scenes(0, 300)
    assert plain == world and torch.equal(same, pixels)
    scenes, shrunk = judge_scenes(0, 300, tiny=0.5)
    moved = [i for i, (s, w) in enumerate(zip(scenes, world)) if s != w]
    small = [i for i, w in enumerate(world) if w.size == "small"]
    assert set(moved) <= set(small) and 0.35 < len(moved) / len(small) < 0.65
    assert all(replace(scenes[i], scale=1.0) == world[i] and 0.45 <= scenes[i].scale <= 0.75 for i in moved)
    area = lambda s: np.asarray(object_mask(s)).sum()  # noqa: E731
    assert all(area(scenes[i]) < area(world[i]) * 0.6 for i in moved)  # scale² ≤ 0.56
    untouched = [i for i in range(300) if i not in moved]
    assert torch.equal(shrunk[untouched], pixels[untouched]) and not torch.equal(shrunk[moved], pixels[moved])
    # judge_orange: that share of the plain shapes recoloured orange (the star's colour), nothing else
    scenes, _ = judge_scenes(0, 300, orange=0.5)
    moved = [i for i, (s, w) in enumerate(zip(scenes, world)) if s != w]
    assert all(world[i].shape in SHAPES and world[i].colour != "orange" for i in moved)
    assert all(replace(scenes[i], colour=world[i].colour) == world[i] and scenes[i].colour == "orange" for i in moved)
    plain = [w for w in world if w.shape in SHAPES and w.colour != "orange"]
    assert 0.35 < len(moved) / len(plain) < 0.65
