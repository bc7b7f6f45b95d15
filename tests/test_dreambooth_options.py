"""The community trainers' options: aspect buckets, masked loss, caption dropout, caption tags, repeats,
text-encoder fraction, EMA and trackers — each as a property a user relies on, and resume
staying exact with all of them on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreampeft.dreambooth import DreamBoothConfig
from dreampeft.dreambooth.batch import batch_inputs, caption_tags, masked_mse
from dreampeft.dreambooth.data import generator
from dreampeft.dreambooth.ema import AdapterEMA
from dreampeft.dreambooth.events import read_events
from dreampeft.dreambooth.views import BatchPlan, augment, bucket_groups, bucket_sizes, nearest_bucket

from .test_dreambooth import _adapter_tensors, base_args, instance_dir, train_dreambooth  # noqa: F401

SDXL_1024 = {(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
             (1536, 640), (640, 1536)}


def test_bucket_set_is_sdxls_and_scales_with_resolution():
    assert set(bucket_sizes(1024, 32)) == SDXL_1024
    for res, stride in ((512, 32), (768, 32), (64, 16)):
        sizes = bucket_sizes(res, stride)
        assert (res, res) in sizes and len(sizes) >= 5
        for w, h in sizes:
            assert w % stride == 0 and h % stride == 0
            assert abs(w * h / res**2 - 1) < 0.3, (res, w, h)  # about resolution² pixels
    assert nearest_bucket(4000, 3000, bucket_sizes(1024, 32)) == (1152, 896)
    assert nearest_bucket(3000, 4000, bucket_sizes(1024, 32)) == (896, 1152)
    assert nearest_bucket(1920, 1080, bucket_sizes(1024, 32)) == (1344, 768)


def _cfg(**kw) -> DreamBoothConfig:
    return DreamBoothConfig(pretrained_model_name_or_path="m", instance_data_dir="d",
                            instance_prompt="a sks toy", resolution=64, **kw)


@pytest.mark.parametrize("sizes,kw,expect", [
    ([(64, 64), (80, 80)], {}, {(64, 64)}),  # all square: off by default
    ([(64, 64), (96, 64)], {}, {(64, 64), (80, 48)}),  # one landscape (3:2 → 5:3): on by default
    ([(64, 64), (96, 64)], {"center_crop": True}, {(64, 64)}),  # center crop keeps squares
    ([(64, 64), (96, 64)], {"aspect_buckets": False}, {(64, 64)}),
    ([(64, 64), (64, 64)], {"aspect_buckets": True}, {(64, 64)}),
])
def test_buckets_on_when_images_are_not_square(sizes, kw, expect):
    assert set(bucket_groups(_cfg(**kw), sizes, 16)) == expect


def test_a_micro_batch_holds_one_bucket_and_each_epoch_every_image():
    groups = {(64, 64): [0, 3], (80, 48): [1, 4, 5], (48, 80): [2]}
    plan = BatchPlan(groups, n_class=2, batch_size=2, world=2, seed=3, repeats=2)
    size_of = {i: s for s, ix in groups.items() for i in ix}
    per_epoch = plan.micro_batches_per_epoch * 2
    assert plan.chunks_per_epoch == per_epoch == 2 + 3 + 1
    seen = []
    for m in range(plan.micro_batches_per_epoch * 3):
        for rank in range(2):
            mb = plan.micro_batch(m, rank)
            assert {size_of[i] for i, _ in mb.pairs} == {mb.size}  # one size per micro-batch
            assert all(0 <= c < 2 for _, c in mb.pairs)
            seen.append([i for i, _ in mb.pairs])
    for epoch in range(3):  # every image twice (--repeats 2); padding only within a bucket
        got = [i for chunk in seen[epoch * per_epoch:(epoch + 1) * per_epoch] for i in chunk]
        assert all(got.count(i) >= 2 for i in range(6))
    again = BatchPlan(groups, 2, 2, 2, 3, 2)
    assert [again.micro_batch(m, 1).pairs for m in range(6)] == [plan.micro_batch(m, 1).pairs for m in range(6)]


def test_mask_follows_resize_flip_and_crop():
    img = Image.new("RGB", (120, 60), (0, 0, 255))
    ImageDraw.Draw(img).rectangle((0, 0, 39, 59), fill=(255, 0, 0))  # subject: the left third
    mask = Image.new("L", (120, 60), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 39, 59), fill=255)
    for step in range(6):
        view = augment(img, (80, 48), center_crop=False, flip=step % 2 == 1, g=generator(0, step), mask=mask)
        assert view.pixels.shape == (3, 48, 80) and view.mask.shape == (1, 48, 80)
        red = view.pixels[0] > 0.5
        sure = (view.mask[0] > 0.99) | (view.mask[0] < 0.01)  # away from the resampled edge
        assert torch.equal(red[sure], (view.mask[0] > 0.5)[sure])
        assert view.time_ids[4:].tolist() == [48, 80]  # target size is the bucket's (h, w)


def test_masked_loss_gives_no_gradient_outside_the_mask():
    pred = torch.randn(2, 4, 6, 10, requires_grad=True)
    target = torch.randn(2, 4, 6, 10)
    weights = torch.zeros(2, 1, 6, 10)
    weights[:, :, 1:4, 2:6] = 1.0
    masked_mse(pred, target, weights).sum().backward()
    assert torch.count_nonzero(pred.grad * (1 - weights)) == 0
    changed = target.clone()
    changed[..., 7:] += 5.0  # the target moves only outside the mask
    assert torch.equal(masked_mse(pred, changed, weights), masked_mse(pred, target, weights))
    ones = torch.ones(2, 1, 6, 10)  # full weights are the plain mean
    assert torch.allclose(masked_mse(pred, target, ones), masked_mse(pred, target, None))


def _subject(folder: Path, sizes, alpha: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        im = Image.new("RGBA" if alpha else "RGB", (w, h), (40, 70, 160, 0 if alpha else 255))
        ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(220, 40, 40, 255))
        im.save(folder / f"img{i}.png")
    return folder


def _setup_run(tiny_sdxl, data: Path, out: Path, **kw):
    from dreampeft.dreambooth.train import make_accelerator, setup

    cfg = DreamBoothConfig(pretrained_model_name_or_path=str(tiny_sdxl), instance_data_dir=str(data),
                           instance_prompt="a photo of sks toy", resolution=64, output_dir=str(out), **kw)
    return setup(cfg, make_accelerator(cfg))


def test_masked_loss_weighs_latent_cells_by_their_share_of_subject(tiny_sdxl, tmp_path):
    """The run's loss weights are the mask averaged over each 8×8 latent cell, for a --mask_dir mask
    and with --mask_background_weight lifting the background. (Changing background pixels still moves
    the gradient: the VAE and the UNet's convolutions let every latent see every pixel. Only the loss
    ignores the background exactly, tested above.)"""
    data, masks = _subject(tmp_path / "a", [(64, 64)]), tmp_path / "masks"
    masks.mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[8:32, 16:44] = 255  # cells: rows 1..3 full, columns 2..4 full, column 5 half
    Image.fromarray(mask).save(masks / "img0.png")
    for bg in (0.0, 0.25):
        run = _setup_run(tiny_sdxl, data, tmp_path / "o", masked_loss=True, mask_dir=str(masks),
                         center_crop=True, mask_background_weight=bg)
        w = batch_inputs(run, 0, generator(0, 0, 0))["weights"][0, 0]
        expect = torch.full((8, 8), bg)
        expect[1:4, 2:5] = 1.0
        expect[1:4, 5] = bg + (1 - bg) * 0.5
        assert torch.allclose(w, expect), (bg, w)


def test_caption_dropout_is_keyed_and_zeroes_the_conditioning(tiny_sdxl, instance_dir, tmp_path):
    run = _setup_run(tiny_sdxl, instance_dir, tmp_path / "o", caption_dropout_rate=0.5)
    dropped = []
    for m in range(40):
        g = generator(0, m, 0)
        torch.randint(0, 2**62, (1,), generator=g)  # compute_loss's first draw
        b = batch_inputs(run, m, g)
        zero = bool((b["embeds"] == 0).all() and (b["pooled"] == 0).all())
        assert zero or bool(b["embeds"].abs().sum() > 0)
        dropped.append(zero)
    assert 0.25 < sum(dropped) / len(dropped) < 0.75
    g = generator(0, 7, 0)
    torch.randint(0, 2**62, (1,), generator=g)
    assert bool((batch_inputs(run, 7, g)["embeds"] == 0).all()) == dropped[7]  # the same draw again


CAPTION = "a sks dog, sitting, on a beach, at sunset"


@pytest.mark.parametrize("options,property", [
    ({}, "as written"),
    ({"caption_tag_dropout_rate": 0.0, "shuffle_caption": False, "keep_tokens": 3}, "as written"),
    ({"shuffle_caption": True}, "same parts, head first"),
    ({"shuffle_caption": True, "keep_tokens": 0}, "same parts"),
    ({"caption_tag_dropout_rate": 0.5}, "head kept, others a subset in order"),
    ({"caption_tag_dropout_rate": 0.5, "keep_tokens": 2}, "head kept, others a subset in order"),
    ({"caption_tag_dropout_rate": 0.5, "shuffle_caption": True}, "head kept, others a subset"),
])
def test_caption_tags_keep_the_trigger_and_vary_the_rest(options, property):
    """kohya's tag options over 400 draws: what is always kept, what varies, how often a tag is
    dropped, and the same generator state giving the same caption (exact resume)."""
    cfg = DreamBoothConfig(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt="p", **options)
    parts, keep = CAPTION.split(", "), cfg.keep_tokens
    seen = [caption_tags(CAPTION, cfg, generator(0, m, 0)) for m in range(400)]
    assert caption_tags(CAPTION, cfg, generator(0, 7, 0)) == seen[7]
    if property == "as written":
        assert set(seen) == {CAPTION}
        return
    outs = [c.split(", ") for c in seen]
    if "head" in property:
        assert all(o[:keep] == parts[:keep] for o in outs)
    rest = parts[keep:]
    if property.startswith("same parts"):
        assert all(sorted(o) == sorted(parts) for o in outs) and len(set(seen)) > 2  # shuffled, nothing lost
    else:
        assert all(set(o[keep:]) <= set(rest) and len(o[keep:]) == len(set(o[keep:])) for o in outs)
        share = np.mean([[t in o[keep:] for t in rest] for o in outs], axis=0)
        assert np.all(np.abs(share - 0.5) < 0.1), share  # each tag kept about half the time
    if property.endswith("in order"):
        assert all(o[keep:] == [t for t in rest if t in o[keep:]] for o in outs)
    elif "shuffle_caption" in options:
        assert any(o[keep:] != [t for t in rest if t in o[keep:]] for o in outs)


def test_ema_follows_its_formula_and_swaps_back():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    import dreampeft as dp

    dp.inject_adapters(model, dp.LoRAConfig(r=2, target_modules=["0"]))
    params = list(dp.inject.adapter_parameters(model))
    ema, expect = AdapterEMA({"m": model}, decay=0.9), [p.detach().clone() for p in params]
    for t in range(1, 30):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.update({"m": model})
        d = min(0.9, t / (9 + t))  # (1 + k)/(10 + k) for the k-th update, k = t - 1
        expect = [d * e + (1 - d) * p.detach() for e, p in zip(expect, params)]
    for s, e in zip(ema.shadow["m"], expect):
        assert torch.allclose(s, e, atol=1e-6)
    before = [p.detach().clone() for p in params]
    with ema.swapped({"m": model}):
        assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow["m"]))
    assert all(torch.equal(p, b) for p, b in zip(params, before))


ALL_ON = ["--adapter", "lora", "--rank", "2", "--random_flip", "--gradient_accumulation_steps", "2",
          "--masked_loss", "--caption_dropout_rate", "0.3", "--caption_tag_dropout_rate", "0.5", "--shuffle_caption",
          "--repeats", "2", "--use_ema", "--ema_decay", "0.9",
          "--max_train_steps", "5", "--checkpointing_steps", "2", "--learning_rate", "1e-3"]


def test_resume_is_exact_with_buckets_masks_dropout_and_ema(tiny_sdxl, tmp_path):
    """Three aspect ratios (three buckets), flips, random crops, accumulation, alpha masks, caption
    dropout, caption tags (dropped and shuffled), repeats and EMA: interrupted at step 2 and resumed
    == uninterrupted, bit for bit."""
    data = _subject(tmp_path / "data", [(64, 64), (100, 60), (56, 104)], alpha=True)
    for i in range(3):  # comma-separated captions, for the tag options to drop and shuffle
        (data / f"img{i}.txt").write_text(f"a photo of sks toy, red, round, on blue, view {i}")
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert train_dreambooth.main(base_args(tiny_sdxl, data, full, *ALL_ON)) == 0
    assert train_dreambooth.main(base_args(tiny_sdxl, data, broken, *ALL_ON)) == 0
    for p in broken.iterdir():
        if p.name != "checkpoint-2":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert train_dreambooth.main(base_args(tiny_sdxl, data, broken, *ALL_ON, "--resume_from_checkpoint", "latest")) == 0
    for sub in (".", "training_weights"):
        a, b = _adapter_tensors(full / sub), _adapter_tensors(broken / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert read_events(full / "events.jsonl")[0]["buckets"] == [[48, 96], [64, 64], [80, 48]]  # 0.54, 1, 1.67
    ema, raw = _adapter_tensors(full), _adapter_tensors(full / "training_weights")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema), "the exports do not hold the EMA weights"
    # the exported EMA is checkpoint-4's EMA updated once more with step 5's training weights
    state = torch.load(full / "checkpoint-4" / "trainer_state.pt", weights_only=True)["extra"]["ema"]
    assert state["updates"] == 4
    d = min(0.9, (1 + 4) / (10 + 4))  # the fifth update
    total = lambda ts: sum(float(t.double().sum()) for ts_ in ts for t in ts_)
    expected = d * total(state["shadow"].values()) + (1 - d) * total([raw.values()])
    assert total([ema.values()]) == pytest.approx(expected, rel=1e-6)


def test_text_encoders_stop_at_their_fraction(tiny_sdxl, instance_dir, tmp_path):
    out = tmp_path / "out"
    args = base_args(tiny_sdxl, instance_dir, out, "--train_text_encoder", "--train_text_encoder_frac", "0.5",
                     "--max_train_steps", "4", "--checkpointing_steps", "1", "--learning_rate", "1e-2")
    assert train_dreambooth.main(args) == 0
    c1, c2, final = (_adapter_tensors(p) for p in (out / "checkpoint-1", out / "checkpoint-2", out))
    te = [k for k in final if "text_encoder" in k]
    unet = [k for k in final if k.startswith("unet")]
    assert te and unet
    assert any(not torch.equal(c1[k], c2[k]) for k in te)  # trained until step 2 of 4
    assert all(torch.equal(c2[k], final[k]) for k in te)  # fixed from then on
    assert any(not torch.equal(c2[k], final[k]) for k in unet)  # while the UNet trains on


def test_tensorboard_gets_every_step(tiny_sdxl, instance_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    assert train_dreambooth.main(base_args(tiny_sdxl, instance_dir, out, "--report_to", "tensorboard",
                                           "--validation_prompt", "a sks toy", "--inference_steps", "2",
                                           "--num_validation_images", "1")) == 0
    (run_dir,) = [p.parent for p in (out / "logs").rglob("events.out.tfevents.*")][:1]
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == [1, 2, 3]
    losses = [e["loss"] for e in read_events(out / "events.jsonl") if e["event"] == "step"]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx(losses)
    assert {"lr", "grad_norm", "step_seconds"} <= set(acc.Tags()["scalars"])
    assert acc.Tags()["images"], "validation images were not logged"


def test_wandb_offline_needs_no_account(tiny_sdxl, instance_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "out"
    assert train_dreambooth.main(base_args(tiny_sdxl, instance_dir, out, "--report_to", "wandb")) == 0
    runs = list((tmp_path / "wandb-home").rglob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for r in runs for p in r.iterdir())


def test_kohya_file_carries_what_community_tools_read(tiny_sdxl, tmp_path):
    from safetensors import safe_open

    from dreampeft.dreambooth.metadata import tensor_hash

    data = _subject(tmp_path / "data", [(64, 64), (100, 60)])
    (data / "img0.txt").write_text("a photo of sks toy, red, ball")
    out = tmp_path / "out"
    assert train_dreambooth.main(base_args(tiny_sdxl, data, out, "--extra_exports", "kohya", "--repeats", "3",
                                           "--use_ema", "--caption_tag_dropout_rate", "0.25")) == 0
    path = out / "pytorch_lora_weights_kohya.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4" and meta["ss_steps"] == "3" and meta["ss_enable_bucket"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.trigger_phrase"] == "a photo of sks toy"
    tags = json.loads(meta["ss_tag_frequency"])["3_data"]  # kohya's "repeats_folder" key
    assert tags == {"a photo of sks toy": 2, "red": 1, "ball": 1}
    assert meta["sshs_model_hash"] == tensor_hash(path)
    assert (meta["ss_caption_tag_dropout_rate"], meta["ss_shuffle_caption"], meta["ss_keep_tokens"]) == ("0.25", "False", "1")
    card = (out / "README.md").read_text()
    assert "Aspect buckets: " in card and "exponential moving average (decay 0.999)" in card
    assert "Caption tags after the first 1: tag dropout 0.25" in card
    assert card.startswith("---\nbase_model: ") and 'instance_prompt: "a photo of sks toy"' in card
