"""The toy world and the shipped toy SDXL: determinism, that the model follows prompts, that the
judge reads the world, and that DreamBooth on it learns a subject the base model never saw."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dreampeft.toy import TOY_MODEL
from dreampeft.toy.bench import RECONTEXT, score, train_subject, write_subject
from dreampeft.toy.evaluate import generate, judge_images, load_judge, prompt_following
from dreampeft.toy.models import HEADS, scene_labels
from dreampeft.toyworld import (ALL_SUBJECTS, SUBJECTS, TUNING_SUBJECTS, asked, instance_caption, render,
                                sample_scene, subject_scenes, world_sample)


def test_world_is_deterministic_and_captions_say_what_is_drawn():
    a = [world_sample(3, i) for i in range(50)]
    assert a == [world_sample(3, i) for i in range(50)]
    assert a != [world_sample(4, i) for i in range(50)]
    assert all(np.array_equal(np.asarray(render(s)), np.asarray(render(s))) for s in a[:5])
    for s in a:
        caption = s.caption()
        assert f"{s.colour} {s.shape}" in caption
        assert ("background" in s.mention) == (f"on a {s.background} background" in caption)
        assert s.background != s.colour  # the object is always visible
    assert sample_scene(random.Random(0)).caption() == sample_scene(random.Random(0)).caption()


def test_base_world_never_shows_the_subjects():
    shapes = {world_sample(0, i).shape for i in range(3000)}
    assert shapes.isdisjoint(ALL_SUBJECTS) and len(shapes) == 4
    with_subjects = {world_sample(0, i, subject_rate=0.3).shape for i in range(300)}
    assert set(ALL_SUBJECTS) <= with_subjects  # the judge's training set: the tuning subject too
    assert set(TUNING_SUBJECTS).isdisjoint(SUBJECTS)


@pytest.mark.parametrize("prompt, wanted", [
    *RECONTEXT.items(),
    ("a sks object", {}),
    ("A Large red circle in the center on a dotted background", {"size": "large", "position": "center",
                                                                 "background": "dotted"}),
    ("a sks object on a teal background in the top middle", {}),  # not the world's words: nothing asked
    *[(s.caption(), {a: getattr(s, a) for a in s.mention}) for s in (world_sample(4, i) for i in range(30))],
    # the subject's kohya-style captions (bench/toy_ceiling.py --captions) name all it shows besides the subject
    *[(instance_caption(s), {a: getattr(s, a) for a in ("size", "position", "background")})
      for s in subject_scenes("star", 5)],
])
def test_asked_reads_what_a_prompt_asks_for(prompt, wanted):
    """Evaluation prompts of one's own are scored on the toy from what they say (fidelity along training)."""
    assert asked(prompt) == wanted


def test_object_mask_is_where_the_object_is_drawn():
    """The pretraining's VAE loss weights come from this mask; it must match the rendered object."""
    from dreampeft.toyworld import COLOURS, object_mask

    for i in range(20):
        s = world_sample(5, i)
        if s.background not in COLOURS:
            continue
        pixels, mask = np.asarray(render(s)).astype(int), torch.from_numpy(np.asarray(object_mask(s)))[None].float()
        assert mask.shape == (1, 64, 64) and mask.max() == 255
        # away from the edge (Lanczos resampling rings for ~2 px): object inside, background outside
        inside = (-torch.nn.functional.max_pool2d(-mask, 5, 1, 2) == 255)[0].numpy()
        outside = (torch.nn.functional.max_pool2d(mask, 5, 1, 2) == 0)[0].numpy()
        assert (inside.sum() > 5 or s.size == "small") and outside.sum() > 2000
        assert np.abs(pixels[inside] - COLOURS[s.colour]).max(initial=0) <= 2, s
        assert np.abs(pixels[outside] - COLOURS[s.background]).max() <= 2, s


@pytest.fixture(scope="module")
def toy():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(TOY_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_judge(TOY_MODEL)


def test_shipped_toy_loads_as_a_normal_sdxl_folder(toy):
    pipe, _ = toy
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.addition_embed_type == "text_time"
    assert generate(pipe, ["a red circle"], steps=4)[0].size == (64, 64)


def test_judge_reads_the_world(toy):
    """The metric is trustworthy: on freshly rendered scenes (subjects included) every head is right
    nearly always."""
    scenes = [world_sample(99, i, subject_rate=0.3) for i in range(200)]
    probs = judge_images(toy[1], [render(s) for s in scenes])
    for head in HEADS:
        labels = torch.tensor([scene_labels(s)[head] for s in scenes])
        known = labels >= 0
        accuracy = (probs[head].argmax(-1)[known] == labels[known]).float().mean().item()
        assert accuracy > 0.9, (head, accuracy)


def test_judge_prompt_scores_what_a_prompt_asks_for(toy):
    """The app's toy prompt fidelity: rendered scenes score ~1 for their own full captions, ~0 for
    captions asking another background, corner and size, and nothing for a prompt that asks none."""
    from dreampeft.toy.evaluate import judge_prompt

    scenes = [sample_scene(random.Random(i), mention_p=1.0) for i in range(40)]
    images = [render(s).resize((128, 128)) for s in scenes]  # any size: the app's resolution may differ
    own = np.mean([judge_prompt(toy[1], [im], s.caption()) for im, s in zip(images, scenes)])
    other = [s.caption().replace(f"on a {s.background}", "on a checkered" if s.background != "checkered" else "on a white")
             for s in scenes]
    wrong = np.mean([judge_prompt(toy[1], [im], c) for im, c in zip(images, other)])
    assert own > 0.95 and wrong < own - 0.25, (own, wrong)  # one of three attributes changed
    assert judge_prompt(toy[1], images[:2], "a sks object") is None


def test_judge_object_agreement_reads_the_subject_not_the_background(toy):
    """The app's toy subject score: the star in other scenes agrees with the instance images, the
    same scenes with a circle in its place do not — where the whole-image similarity moves far less."""
    from dataclasses import replace

    from dreampeft.toy.evaluate import judge_object_agreement, judge_similarity

    real = [render(s) for s in subject_scenes("star", 5)]
    scenes = subject_scenes("star", 8, seed=1)
    stars, circles = [render(s) for s in scenes], [render(replace(s, shape="circle")) for s in scenes]
    agree = [judge_object_agreement(toy[1], real, g) for g in (stars, circles)]
    similar = [judge_similarity(toy[1], real, g) for g in (stars, circles)]
    assert agree[0] > 0.9 and agree[1] < 0.05, agree
    assert agree[0] - agree[1] > 2 * (similar[0] - similar[1]), (agree, similar)


def test_trainer_scores_an_unknown_subject_by_its_object_not_its_background(toy):
    """An upload the judge has no class for (a blue diamond here): the trainer's subject fidelity
    is the judge's object agreement, so the diamond drawn on new backgrounds scores far above a
    square on the instance images' own backgrounds (measured 0.98 vs 0.01), where the whole-image
    similarity it used to be barely tells them apart (0.76 vs 0.73)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from dreampeft.dreambooth.fidelity import Metrics
    from dreampeft.toy.evaluate import judge_object_agreement

    rng = random.Random(5)
    real_scenes = [replace(sample_scene(rng), shape="diamond", colour="blue") for _ in range(5)]
    metrics = Metrics(SimpleNamespace(pretrained_model_name_or_path=TOY_MODEL), [render(s) for s in real_scenes])
    assert metrics.kind == "toy" and metrics.subject_class is None
    moved = [render(replace(s, background=b)) for s, b in zip(real_scenes, ("dotted", "checkered", "yellow",
                                                                         "green", "dotted"))]
    copied = [render(replace(s, shape="square")) for s in real_scenes]
    drawn, leaked = (metrics.score(g, [], []) for g in (moved, copied))
    assert drawn["subject"] == pytest.approx(judge_object_agreement(toy[1], metrics.real, moved))
    assert drawn["subject"] > 0.8 and leaked["subject"] < 0.2, (drawn, leaked)
    gap = drawn["judge_similarity"] - leaked["judge_similarity"]
    assert drawn["subject"] - leaked["subject"] > 5 * abs(gap), (drawn, leaked)


@pytest.mark.parametrize("shape, size, blur, low, high", [
    ("star", "small", 2, 0.85, 1.0), ("star", "large", 3, 0.85, 1.0), ("triangle", "small", 2, 0.0, 0.3),
    ("square", "small", 2, 0.0, 0.1), ("diamond", "small", 2, 0.0, 0.1), ("circle", "small", 2, 0.0, 0.05),
    ("triangle", "small", 0, 0.0, 0.05)])
def test_judge_reads_blurry_shapes_as_what_they_are(toy, shape, size, blur, low, high):
    """The toy draws blurry objects, and the bench's subject fidelity is the judge's star probability:
    a blurry star must read as the star and a blurry triangle must not. The first judge (sharp renders
    only) read small triangles under a 2-px blur as the star (0.84) and large stars under 3 px as
    other shapes (0.48); the shipped one (trained with blur up to 3 px; measured on 48 renders: star
    0.98 / 0.98, triangle 0.19, square, diamond and circle 0.00–0.02) reads them as they are."""
    from dataclasses import replace

    from PIL import ImageFilter

    rng = random.Random(3)
    scenes = [replace(sample_scene(rng), shape=shape, size=size, colour="orange") for _ in range(24)]
    images = [render(s).filter(ImageFilter.GaussianBlur(blur)) if blur else render(s) for s in scenes]
    star = float(judge_images(toy[1], images)["object"][:, HEADS["object"].index("star")].mean())
    assert low <= star <= high, star


def test_bench_counts_the_subject_on_large_drawings_apart(toy):
    """``subject_large`` counts only the drawings the judge reads as large: half of a set of sharp
    stars, half small and half large."""
    from dataclasses import replace

    rng = random.Random(3)
    scenes = [replace(sample_scene(rng), shape="star", colour="orange", background="green") for _ in range(16)]
    stars = [render(replace(s, size=("small", "large")[i % 2])) for i, s in enumerate(scenes)]
    real = score(toy[1], stars, [""] * 16, "star")
    assert real["subject"] > 0.9 and real["subject_large"] == pytest.approx(0.5, abs=0.05), real


def test_toy_vae_keeps_shapes_and_colours(toy):
    """Decoding is not where shapes get lost: the judge reads object and colour off the shipped
    VAE's reconstructions (measured 0.97 and 1.0 on 300 fresh scenes; a plain-MSE VAE gave 0.39, 0.43),
    and the striped ball's stripes survive (0.98 on 200 scenes; 0.17 for a VAE that never saw stripes)."""
    from dreampeft.toy.data import render_scenes, render_set, to_unit

    pipe, judge = toy
    scenes, pixels = render_set(99, 100)
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(to_unit(pixels)).latent_dist.mean).sample.clamp(-1, 1)
        logits = judge(rec)
    for head in ("object", "colour"):
        labels = torch.tensor([scene_labels(s)[head] for s in scenes])
        accuracy = (logits[head].argmax(-1) == labels).float().mean().item()
        assert accuracy > 0.85, (head, accuracy)
    rng = random.Random(5)
    _, balls = render_scenes([sample_scene(rng, "striped_ball") for _ in range(40)])
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(to_unit(balls)).latent_dist.mean).sample.clamp(-1, 1)
        read = judge(rec)["object"].argmax(-1)
    assert (read == HEADS["object"].index("striped_ball")).float().mean().item() > 0.85


FLOORS = {"object": 0.90, "colour": 0.95, "background": 0.95, "position": 0.80, "size": 0.95}  # issue 17


def test_toy_model_follows_prompts(toy):
    """The shipped base follows every word of a full caption (chance: 1/4, 1/6, 1/9, 1/5, 1/2): on
    the 60 captions of ``pretrain_report.json`` it meets issue 17's floors (measured 0.95, 1.0, 1.0,
    0.90, 0.983 by the blur-trained judge — the report's figures, reproduced; the first judge read
    0.933, 1.0, 1.0, 0.90, 1.0), and on 24 other captions it keeps them with the margins measured
    there (1.0, 1.0, 1.0, 0.958, 1.0; one miss in 24 is 0.042; on 240 more, 0.913, 0.988, 0.992, 0.95,
    1.0: ``bench/results/toy2_prompt_following_240.json``). The toy before it read 0.55, 0.93, 0.87,
    0.20 (corners ignored), 0.92."""
    report = json.loads((TOY_MODEL / "pretrain_report.json").read_text())["prompt_following"]
    acc = prompt_following(*toy)
    assert acc == pytest.approx(report, abs=0.02), (acc, report)
    assert all(acc[h] >= floor for h, floor in FLOORS.items()), acc
    other = prompt_following(*toy, n=24, seed=7)
    assert all(other[h] >= floor for h, floor in FLOORS.items()), other


def _star_run(toy, tmp_path, steps: int, images: int = 2, **options) -> tuple[dict, dict]:
    """The benchmark's setting on the star with LoRA: (score before, score after), ``images`` seeds per prompt."""
    from dreampeft.pipeline import load_into_pipeline, unload
    from dreampeft.toy.bench import generations

    pipe, judge = toy
    folder = write_subject("star", tmp_path / "star")
    prompts, drawn = generations(pipe, seeds=images)
    before = score(judge, drawn, prompts, "star")
    train_subject(TOY_MODEL, folder, "lora", tmp_path / "run", steps=steps, **options)
    load_into_pipeline(pipe, tmp_path / "run")
    try:
        return before, score(judge, generations(pipe, seeds=images)[1], prompts, "star")
    finally:
        unload(pipe)


def test_dreambooth_on_the_toy_learns_an_unseen_subject(toy, tmp_path):
    """The trainer's defaults (LoRA, batches of 2). Measured on the shipped toy, 2 images per
    recontext prompt, by the blur-trained judge: the star's subject fidelity 0.099 → 0.28 / 0.53
    after 200 / 300 steps, while prompt fidelity falls 0.93 → 0.71 / 0.64 (what the recipes are for).
    The first judge read 0.106 → 0.41 / 0.37: it took the blobs of 200 steps for stars. 300 steps here.
    CPU training does not repeat across machines: on a Sapphire Rapids Xeon (session 34) the same
    test read 0.099 → 0.29 (suite) and 0.31 (alone), hence a margin of 0.15 (three times the base)."""
    before, after = _star_run(toy, tmp_path, steps=300)
    assert after["subject"] > before["subject"] + 0.15, (before, after)


def test_the_locon_recipe_draws_the_star_and_keeps_the_prompt(toy, tmp_path):
    """Issue 17's check on the shipped base: a short run of a recipe that draws the subject
    (``locon``: kohya's conv LoRA, prior preservation on the base's "a object", batches of all 5
    images; LoRA, 100 steps) raises the star's subject fidelity well over the base's while prompt
    fidelity stays over 0.8× the base's. Measured here by the blur-trained judge (2 images per
    recontext prompt): subject 0.099 → 0.373 / 0.352 / 0.310 after 100 / 150 / 200 steps, prompt
    0.929 → 0.786 / 0.929 / 0.786 (≥ 0.85×); the first judge read 0.106 → 0.454 / 0.421 / 0.507."""
    from dreampeft.toy.bench import write_masks
    from dreampeft.toy.recipe import class_images_if_needed, recipe_config, recipe_options

    class_dir = class_images_if_needed(toy[0], tmp_path / "class", recipe_config("locon"))
    options = recipe_options("locon", class_dir, write_masks("star", tmp_path / "masks"))
    before, after = _star_run(toy, tmp_path, steps=100, **options)
    assert after["subject"] > before["subject"] + 0.15, (before, after)
    assert after["prompt"] >= 0.8 * before["prompt"], (before, after)
