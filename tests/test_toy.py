"""The toy world and the shipped toy SDXL: determinism, that the model follows prompts, that the
judge reads the world, and that DreamBooth on it learns a subject the base model never saw."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dreampeft.toy import TOY_MODEL
from dreampeft.toy.bench import BENCH_STEPS, score, train_subject, write_subject
from dreampeft.toy.evaluate import generate, is_toy, judge_images, load_judge, prompt_following
from dreampeft.toy.models import HEADS, scene_labels
from dreampeft.toy.bench import RECONTEXT
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


def test_toy_vae_keeps_shapes_and_colours(toy):
    """Decoding is not where shapes get lost: the judge reads object and colour off the shipped
    VAE's reconstructions (measured 0.97 and 1.0 on 300 fresh scenes; a plain-MSE VAE gave 0.39, 0.43),
    and the striped ball's stripes survive (0.98 on 200 scenes; 0.17 for a VAE that never saw stripes)."""
    from dreampeft.toy.pretrain import render_scenes, render_set, to_unit

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
    the 60 captions of ``pretrain_report.json`` it meets issue 17's floors (measured 0.933, 1.0, 1.0,
    0.90, 1.0 — the report's figures, reproduced), and on 24 other captions it keeps them with the
    margins measured there (1.0, 1.0, 1.0, 0.958, 1.0; one miss in 24 is 0.042). The toy before it
    read 0.55, 0.93, 0.87, 0.20 (corners ignored), 0.92."""
    report = json.loads((TOY_MODEL / "pretrain_report.json").read_text())["prompt_following"]
    acc = prompt_following(*toy)
    assert acc == pytest.approx(report, abs=0.02), (acc, report)
    assert all(acc[h] >= floor for h, floor in FLOORS.items()), acc
    other = prompt_following(*toy, n=24, seed=7)
    assert all(other[h] >= floor for h, floor in FLOORS.items()), other


def _star_run(toy, tmp_path, images: int = 2, steps: int = BENCH_STEPS, **options) -> tuple[dict, dict]:
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
    """The trainer's defaults. Measured: LoRA at 300 steps moved the star's subject fidelity from
    0.04 to 0.36 on the first toy (2 seeds per prompt) — and prompt fidelity from 0.79 to 0.43; not
    re-measured on the 2×-wide toy, where it passes."""
    before, after = _star_run(toy, tmp_path)
    assert after["subject"] > before["subject"] + 0.2, (before, after)


def test_the_demo_recipe_draws_the_star_and_keeps_the_prompt(toy, tmp_path):
    """Issue 17's check on the shipped base: a short run of the recipe that draws the subject
    (``locon``: kohya's conv LoRA, prior preservation on the base's "a object", batches of all 5
    images; LoRA, 200 steps) raises the star's subject fidelity by a wide margin while prompt
    fidelity stays over 0.8× the base's. Measured here (2 images per recontext prompt): subject
    0.106 → 0.507, prompt 0.929 → 0.857 (0.92×)."""
    from dreampeft.toy.bench import write_masks
    from dreampeft.toy.recipe import class_images_if_needed, recipe_config, recipe_options

    class_dir = class_images_if_needed(toy[0], tmp_path / "class", recipe_config("locon"))
    options = recipe_options("locon", class_dir, write_masks("star", tmp_path / "masks"))
    before, after = _star_run(toy, tmp_path, steps=200, **options)
    assert after["subject"] > before["subject"] + 0.25, (before, after)
    assert after["prompt"] >= 0.8 * before["prompt"], (before, after)


def test_bench_cli_tabulates_every_subject_and_method_over_training_seeds(tmp_path, capsys):
    """The bench with the full recipe: every cell is a mean over training seeds with its standard
    deviation, the class images are the base's with their captions, each subject has a Pareto plot,
    and ``--lr_factor`` scales the method's toy rate in every run (a non-positive one is refused)."""
    import json

    from PIL import Image

    from dreampeft.presets import method_preset
    from dreampeft.toy.__main__ import main
    from dreampeft.toy.recipe import CLASS_IMAGES, RECIPES

    with pytest.raises(SystemExit):
        main(["bench", "--lr_factor", "0", "--out", str(tmp_path / "refused")])
    assert "--lr_factor must be positive" in capsys.readouterr().err
    assert main(["bench", "--methods", "mora", "--steps", "2", "--seeds", "1", "--train_seeds", "2", "--lr_factor",
                 "0.5", "--recipe", "full", "--subjects", "star", "--drift_captions", "3", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    results = saved["results"]
    assert set(results) == {"base/star", "mora/star"} and saved["lr_factor"] == 0.5
    for seed in (0, 1):
        config = json.loads((tmp_path / "runs" / f"star-mora-{seed}" / "dreambooth_config.json").read_text())
        assert config["learning_rate"] == method_preset("toy", "mora").lr / 2
    assert saved["train_seeds"] == 2 and saved["recipe_options"] == json.loads(json.dumps(RECIPES["full"]))
    asked_n = sum(len(a) for a in RECONTEXT.values())  # prompt fidelity counts each requested attribute
    for subject in ["star"]:
        cell = results[f"mora/{subject}"]
        assert len(cell["runs"]) == 2 and cell["trainable"] > 0
        # object accuracy on 3 world captions: a share of 3 (rounded to 3 decimals)
        assert all(3 * r["drift"] == pytest.approx(round(3 * r["drift"]), abs=0.01) for r in cell["runs"])
        assert "drift" in results["base/star"] and saved["drift_captions"] == 3
        for key in ("subject", "prompt", "instance", "drift"):  # instance: the training prompt's own subject fidelity
            values = [r[key] for r in cell["runs"]]
            assert cell[key] == pytest.approx(np.mean(values)) and cell[f"{key}_sd"] == pytest.approx(np.std(values, ddof=1))
        assert all(abs(r["prompt"] * asked_n - round(r["prompt"] * asked_n)) < 1e-9 for r in cell["runs"])
        assert Image.open(tmp_path / f"pareto-{subject}.png").size[0] > 300
    import csv

    with open(tmp_path / "runs" / "star-mora-0" / "fidelity.csv") as f:  # the held-out selection prompts
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(0 <= float(r["prompt"]) <= 1 for r in rows)  # scored, not NaN
    captions = sorted((tmp_path / "class").glob("class-*.txt"))
    assert len(captions) == len(list((tmp_path / "class").glob("class-*.png"))) == CLASS_IMAGES
    assert all(asked(c.read_text()).keys() == {"size", "position", "background"} for c in captions)
    table = capsys.readouterr().out
    assert "| mora |" in table and " ± " in table and "| own prompt: star |" in table
    assert 0 <= results["base/star"]["instance"] <= 1
    assert Image.open(tmp_path / "grid.png").size == (96 * 5, 96 * 3)  # first training seed
    assert not (tmp_path / "pareto-striped_ball.png").exists()  # only the subjects asked for


def test_sweep_cli_marks_the_best_rate_per_method(tmp_path, capsys):
    import json

    from dreampeft.toy.__main__ import main
    from dreampeft.presets import method_preset

    assert main(["sweep", "--methods", "lora", "--factors", "0.5,2", "--steps", "2", "--recipe", "plain",
                 "--train_seeds", "2", "--seeds", "1", "--out", str(tmp_path)]) == 0
    sweep, lr = json.loads((tmp_path / "sweep.json").read_text()), method_preset("toy", "lora").lr
    assert [r["lr"] for r in sweep["runs"]] == [lr / 2, lr * 2]
    best = max(sweep["runs"], key=lambda r: r["subject"] + r["prompt"])  # chosen on the mean over seeds
    assert sweep["best"]["lora"]["lr"] == best["lr"] and sweep["train_seeds"] == 2
    for row in sweep["runs"]:  # two training seeds per rate, each its own folder
        assert len(row["runs"]) == 2 and row["subject"] == pytest.approx(np.mean([r["subject"] for r in row["runs"]]))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        f"lora-{lr * f:g}-seed{s}" for f in (0.5, 2) for s in (0, 1)]
    assert " ± " in (tmp_path / "sweep.md").read_text()
    assert sweep["subject"] == "cross" and sweep["subject"] not in SUBJECTS  # tuned off the reported subjects
    assert "(best)" in capsys.readouterr().out
    for bad in (["--factors", "0.5,x"], ["--grid", "scaling"], ["--grid", "scaling=a,b"], ["--train_seeds", "0"]):
        with pytest.raises(SystemExit):
            main(["sweep", *bad])
        assert bad[0] in capsys.readouterr().err
    for command in ("bench", "options"):
        with pytest.raises(SystemExit):
            main([command, "--subjects", "star,unicorn"])
        assert "--subjects: unicorn" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["options", "--variants", "plain,moonlight"])
    assert "--variants: moonlight; choose from plain," in capsys.readouterr().err


def test_scales_redraws_bench_runs_and_gives_the_bench_figures_at_scale_one(tmp_path, capsys):
    """The strength study loads a bench's saved runs and draws its prompts at each scale: at ×1 it
    must reproduce the bench's own figures (same weights, prompts and seeds), at ×0.5 it averages the
    same training seeds; folders that hold no runs and scales that are not positive are refused."""
    import json

    from dreampeft.toy.__main__ import main

    bench_dir, out = tmp_path / "bench", tmp_path / "scales"
    assert main(["bench", "--methods", "lora", "--steps", "2", "--seeds", "1", "--train_seeds", "2", "--recipe",
                 "plain", "--subjects", "star", "--drift_captions", "2", "--out", str(bench_dir)]) == 0
    capsys.readouterr()
    assert main(["scales", str(bench_dir), "--scales", "0.5,1", "--seeds", "1", "--drift_captions", "2",
                 "--out", str(out)]) == 0
    assert "| lora ×0.5 |" in capsys.readouterr().out and (out / "scales-star.png").exists()
    bench = json.loads((bench_dir / "results.json").read_text())["results"]
    study = json.loads((out / "scales.json").read_text())["results"]
    assert set(study) == {"base/star", "lora ×0.5/star", "lora ×1/star"}
    for ours, theirs in ((study["lora ×1/star"], bench["lora/star"]), (study["base/star"], bench["base/star"])):
        for key in ("subject", "instance", "prompt", "drift"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    assert [r["run"] for r in study["lora ×0.5/star"]["runs"]] == ["star-lora-0", "star-lora-1"]
    for bad, flag in (([str(tmp_path)], str(tmp_path)), ([str(bench_dir), "--scales", "0,1"], "--scales")):
        with pytest.raises(SystemExit):
            main(["scales", *bad, "--out", str(tmp_path / "x")])
        assert flag in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sweep_grid_varies_an_option_only_for_the_methods_that_have_it(tmp_path):
    import json

    from dreampeft.toy.__main__ import main

    assert main(["sweep", "--methods", "fourierft,lora", "--factors", "1", "--grid", "n_frequency=500,1000",
                 "--recipe", "plain", "--steps", "1", "--seeds", "1", "--out", str(tmp_path)]) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    runs = sweep["runs"]
    assert 0 <= sweep["base"]["subject"] <= 1 and "| base | – | – |" in (tmp_path / "sweep.md").read_text()
    assert [(r["method"], r["options"]) for r in runs] == [("fourierft", {"n_frequency": 500}),
                                                           ("fourierft", {"n_frequency": 1000}), ("lora", {})]
    saved = [json.loads((tmp_path / "runs" / f"fourierft-{r['lr']:g}-n_frequency{n}" / "dreampeft_adapter.json").read_text())
             for r, n in zip(runs, ("500", "1000"))]
    assert [c["components"]["unet"]["configs"][0]["n_frequency"] for c in saved] == [500, 1000]


def test_demo_runs_one_subject(tmp_path, capsys):
    """``make demo``'s default is the recipe that draws the subject (``locon``); ``--methods all``
    is every method the recipe's layers allow."""
    from dreampeft.adapters import METHODS
    from dreampeft.adapters.base import conv_methods
    from dreampeft.demo import demo_methods, main

    main(["--out", str(tmp_path), "--methods", "lora", "--steps", "2", "--subject", "striped_ball",
          "--drift_captions", "2"])
    out = capsys.readouterr().out
    assert "| lora |" in out and "subject: striped_ball" in out and (tmp_path / "grid.png").exists()
    assert "drift: striped_ball" in out and json.loads((tmp_path / "results.json").read_text())["recipe"] == "locon"
    assert (tmp_path / "class-plain").is_dir()  # locon's prior: the base's drawings of "a object"
    assert demo_methods("locon", "lora,lora_dash") == ["lora", "lora_dash"]
    assert demo_methods("locon", "all") == list(conv_methods()) and demo_methods("plain", "all") == list(METHODS)
    with pytest.raises(SystemExit):  # the locon recipe's layers only LoRA, LoRA-Dash and DoRA can adapt
        main(["--out", str(tmp_path / "x"), "--recipe", "locon", "--methods", "lora,mora"])
    assert "drop mora from --methods" in capsys.readouterr().err


@pytest.mark.parametrize("opt_out, expected", [(None, 0.0), ("1", 1e-39)])
def test_import_flushes_denormals_unless_opted_out(opt_out, expected):
    """Denormals stalled toy DreamBooth 30× on this CPU; importing dreampeft flushes them to zero."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DREAMPEFT_KEEP_DENORMALS"}
    if opt_out:
        env["DREAMPEFT_KEEP_DENORMALS"] = opt_out
    code = "import dreampeft, torch; print((torch.tensor([1e-39]) * 1.0).item())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert float(out.stdout) == pytest.approx(expected, abs=1e-45)
