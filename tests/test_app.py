"""The app's handlers without a browser: upload checks, generated option controls, the job queue
(order, progress, stop, failures) and side-by-side generation with scores."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreampeft.adapters import METHODS, AdapterConfig, ConfigError
from dreampeft.app import App, JobQueue, UploadError, check_uploads, option_specs, studio
from dreampeft.app.forms import options_from_values
from dreampeft.dreambooth import DreamBoothConfig
from dreampeft.presets import learning_rates
from dreampeft.tiny import ASSETS

SUBJECT = sorted(str(p) for p in (ASSETS / "subject").glob("*.png"))
# Hang guards, not speed targets: two 3-step trainings took over 180 s on a 2-core CPU under load.
JOB_WAIT_S = 900


def _write(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    return str(path)


UPLOAD_CASES = {
    "nothing": ([], "upload 1 to 50 images"),
    "text file": ([lambda p: p.write_text("hi")], "not an image type"),
    "corrupt png": ([lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\nbroken")], "cannot be read as an image"),
    "too small": ([lambda p: Image.new("RGB", (16, 40)).save(p)], "16×40 is too small"),
    "too many": ([lambda p: Image.new("RGB", (64, 64)).save(p)] * 51, "use at most 50"),
}


@pytest.mark.parametrize("case", UPLOAD_CASES)
def test_bad_uploads_are_refused_naming_the_file(case, tmp_path):
    makers, message = UPLOAD_CASES[case]
    suffix = ".txt" if case == "text file" else ".png"
    files = [_write(tmp_path, f"f{i}{suffix}", m) for i, m in enumerate(makers)]
    with pytest.raises(UploadError, match=message) as info:
        check_uploads(files)
    if files and case != "too many":
        assert "f0" in str(info.value)


def test_good_uploads_pass_in_every_format(tmp_path):
    rgba = _write(tmp_path, "a.webp", lambda p: Image.new("RGBA", (64, 48)).save(p))
    grey = _write(tmp_path, "b.JPG", lambda p: Image.new("L", (48, 64)).save(p, format="JPEG"))
    assert [p.name for p in check_uploads([rgba, grey, *SUBJECT])][:2] == ["a.webp", "b.JPG"]


def test_every_method_option_has_a_control_and_round_trips():
    """A new field in any method config appears in the app; values become a valid config."""
    skip = {f.name for f in dataclasses.fields(AdapterConfig)}
    specs = option_specs()
    for method, entry in METHODS.items():
        fields = {f.name for f in dataclasses.fields(entry.config_cls)} - skip
        assert {s.name for s in specs if s.method == method} == fields
    values = [{"r": 16, "n_frequency": 64, "mora_type": "1", "rslora": True}.get(s.name, s.default) for s in specs]
    assert options_from_values(specs, values, "mora") == {"r": 16, "mora_type": 1}
    assert options_from_values(specs, values, "lora") == {"r": 16, "rslora": True}
    for method in METHODS:  # every form produces a config the trainer accepts
        DreamBoothConfig(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt="p",
                         adapter=method, adapter_options=options_from_values(specs, values, method))


@pytest.mark.parametrize("text, expected", [("", None), ("  ", None), ("8", 8.0), (" 2.5 ", 2.5), (4, 4.0),
                                             ("many", "'many' is not a number; leave it blank"),
                                             ("4.5", "4.5 is not a whole number")])
def test_optional_numbers_are_text_where_blank_means_the_default(text, expected):
    """Optional numbers (LoRA's alpha and conv rank, --snr_gamma) are text boxes in the form: a number
    box sends 0 for blank once it has been shown, and alpha 0 or --snr_gamma 0 is not "the default"."""
    from dreampeft.app.forms import RUN, run_option_specs

    specs = option_specs(["lora"]) + run_option_specs()
    name = "conv_r" if expected == "4.5 is not a whole number" else "alpha"
    values = [text if s.name == name else s.default for s in specs]
    gamma = [text if s.name == "snr_gamma" else s.default for s in specs]
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            options_from_values(specs, values, "lora")
        return
    assert options_from_values(specs, values, "lora") == ({} if expected is None else {"alpha": expected})
    assert options_from_values(specs, gamma, RUN).get("snr_gamma", "unset") == ("unset" if expected is None else expected)


def test_unet_layers_choice_reaches_the_trainer_and_locon_is_lora_only():
    """The app's UNet-layers control: kohya's LoCon set becomes the trainer's target list; a method
    that cannot adapt convolutions is refused while the config is built, before anything is queued."""
    from dreampeft.app.forms import RUN, UNET_LAYERS, run_option_specs

    specs = run_option_specs()
    assert next(s for s in specs if s.name == "unet_target_modules").choices == UNET_LAYERS
    values = [{"unet_target_modules": "transformer,resnets"}.get(s.name, s.default) for s in specs]
    options = options_from_values(specs, values, RUN)
    assert options["unet_target_modules"] == ["transformer", "resnets"]
    common = dict(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt="p", **options)
    targets = DreamBoothConfig(adapter="lora", **common).unet_target_modules
    assert {"to_q", "ff.net.2", "conv1", "conv_shortcut", "time_emb_proj", "upsamplers.0.conv"} <= set(targets)
    with pytest.raises(ConfigError, match="names convolutions .* which only --adapter lora, lora_dash or dora adapt"):
        DreamBoothConfig(adapter="mora", **common)


PRIOR_CASES = [  # (options, instance prompt, class prompt the run gets, or the error's words)
    ({}, "a photo of sks dog", None, None),
    ({"with_prior_preservation": True}, "a photo of sks dog", "a photo of dog", None),
    ({"with_prior_preservation": True}, "sks dog on a beach", "dog on a beach", None),
    ({"with_prior_preservation": True, "class_prompt": "a photo of a dog"}, "a photo of sks dog", "a photo of a dog", None),
    ({"class_prompt": "a dog"}, "a photo of sks dog", None, "used only with prior preservation: tick"),
    ({"with_prior_preservation": True}, "a photo of sks", None, "names no class after its identifier; write the class"),
]


@pytest.mark.parametrize("options, prompt, klass, error", PRIOR_CASES)
def test_prior_preservation_gets_a_class_prompt_and_a_shared_folder(options, prompt, klass, error, tmp_path):
    """The app fills in what the CLI asks for: the class prompt (typed, or the instance prompt
    without its identifier) and a class folder per base model, class prompt and resolution, so runs
    that would draw the same class images share them; what cannot work is refused before queueing."""
    from dreampeft.app.forms import prior_options

    if error:
        with pytest.raises(ConfigError, match=error):
            prior_options(options, tmp_path, "m", prompt, 64)
        return
    got = prior_options(options, tmp_path, "m", prompt, 64)
    if klass is None:
        assert got == options
        return
    assert got["class_prompt"] == klass and Path(got["class_data_dir"]).parent == tmp_path
    DreamBoothConfig(pretrained_model_name_or_path="m", instance_data_dir="d", instance_prompt=prompt, **got)
    same = prior_options(options, tmp_path, "m", prompt, 64)["class_data_dir"]
    others = {prior_options(options, tmp_path, *other)["class_data_dir"] for other in (("m2", prompt, 64), ("m", prompt, 128))}
    assert same == got["class_data_dir"] and got["class_data_dir"] not in others and len(others) == 2


def test_the_runs_table_shows_class_images_while_a_run_prepares(tmp_path):
    from dreampeft.app.jobs import Job

    app = App(tmp_path / "app", model="m")
    cfg = _cfg("m", tmp_path / "run")
    cfg.events = str(tmp_path / "ev.jsonl")
    Path(cfg.events).write_text('{"event": "class_images", "time": 1, "done": 4, "total": 100}\n')
    app.queue.jobs.append(Job(1, cfg, state="running"))
    assert app.progress()[0][0][:4] == [1, "lora", "running", "class images 4/100"]


def _cfg(model, out, method="lora", steps=3, **kw):
    return DreamBoothConfig(pretrained_model_name_or_path=str(model), instance_data_dir=str(ASSETS / "subject"),
                            instance_prompt="a photo of sks star", output_dir=str(out), events=str(out / "ev.jsonl"),
                            adapter=method, max_train_steps=steps, resolution=64, **kw)


def test_queue_runs_one_job_at_a_time_and_reports_progress(tiny_sdxl, tmp_path):
    queue = JobQueue()
    first, second = (queue.submit(_cfg(tiny_sdxl, tmp_path / n, m)) for n, m in (("a", "lora"), ("b", "mora")))
    assert second.state == "queued"
    assert queue.wait(JOB_WAIT_S)
    assert [first.state, second.state] == ["done", "done"]
    assert second.started >= first.ended  # never two trainings at once
    p = second.progress()
    assert (p["step"], p["total"], p["error"]) == (3, 3, None) and p["loss"] > 0
    assert (tmp_path / "b" / "dreampeft_adapter.safetensors").exists()


def test_stop_ends_the_running_job_and_cancels_the_queue(tiny_sdxl, tmp_path):
    queue = JobQueue()
    running = queue.submit(_cfg(tiny_sdxl, tmp_path / "long", steps=100_000))
    waiting = queue.submit(_cfg(tiny_sdxl, tmp_path / "next"))
    deadline = time.time() + JOB_WAIT_S
    while running.progress()["step"] < 1 and time.time() < deadline:
        time.sleep(0.2)
    assert running.progress()["step"] >= 1
    assert queue.stop_all() == 2
    assert queue.wait(30)
    assert (running.state, waiting.state) == ("stopped", "stopped") and running.returncode != 0
    assert waiting.process is None  # it never started


def test_a_failing_run_shows_its_error(tiny_sdxl, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text((tiny_sdxl / "model_index.json").read_text())
    queue = JobQueue()
    job = queue.submit(_cfg(broken, tmp_path / "out"))
    assert queue.wait(JOB_WAIT_S) and job.state == "failed"
    assert "cannot load" in job.progress()["error"]


@pytest.fixture(scope="module")
def trained_app(tiny_sdxl, eval_models, tmp_path_factory):
    app = App(tmp_path_factory.mktemp("app"), model=str(tiny_sdxl), dino_model=str(eval_models[0]),
              clip_model=str(eval_models[1]))
    values = [s.default for s in app.specs]
    lrs = [{"fourierft": 1e-1}.get(m, 1e-2) for m in METHODS]  # one per registered method, in order
    run_values = [{"use_ema": True, "caption_dropout_rate": 0.1, "aspect_buckets": "off"}.get(s.name, s.default)
                  for s in app.run_specs]  # the trainer options reach the runs
    message = app.train(str(tiny_sdxl), SUBJECT, "a photo of sks star", "star", ["lora", "fourierft"],
                        4, 64, 0, 2, *lrs, *values, *run_values)
    assert message.startswith("Queued lora (run 1), fourierft (run 2)")
    assert app.queue.wait(JOB_WAIT_S)
    return app


def test_app_trains_validates_and_offers_downloads(trained_app):
    import zipfile

    from PIL import Image

    rows, samples, downloads, curves, pareto, kept = trained_app.progress()
    assert [r[:4] for r in rows] == [[1, "lora", "done", "4/4"], [2, "fourierft", "done", "4/4"]]
    # fidelity at step 0 and at each validation (every 2 steps), for the live curves and the Pareto plot
    runs, chosen = trained_app.evaluations()
    assert {label: [e["step"] for e in evals] for label, evals in runs.items()} == {"lora (run 1)": [0, 2, 4],
                                                                                   "fourierft (run 2)": [0, 2, 4]}
    assert list(chosen) == list(runs) and [r[6] for r in rows] == list(chosen.values())
    assert all(Path(p).parent == trained_app.public_dir / "plots" and Image.open(p).format == "PNG"
               for p in (curves, pareto))  # served from public/ only
    drawn = [Path(curves).stat().st_mtime_ns, Path(pareto).stat().st_mtime_ns]
    assert trained_app.progress()[3:5] == (curves, pareto)  # the next tick: nothing new, nothing redrawn
    assert [Path(curves).stat().st_mtime_ns, Path(pareto).stat().st_mtime_ns] == drawn
    first = {label: evals[:2] for label, evals in runs.items()}  # fewer evaluations: another pair, the old one gone
    again = trained_app._plots(first, {})
    assert sorted((trained_app.public_dir / "plots").glob("*.png")) == sorted(map(Path, again)) != sorted([Path(curves), Path(pareto)])
    assert "lora (run 1) @ step 2" in kept["choices"]
    assert len(samples) == 4  # validation every 2 steps, one image each, two runs
    assert "step 4" in samples[-1][1]
    names = zipfile.ZipFile(downloads[0]).namelist()
    assert any(n.endswith("pytorch_lora_weights.safetensors") for n in names)
    assert any(n.endswith("dreampeft_adapter.safetensors") for n in names)
    for job in trained_app.queue.jobs:  # the Training options accordion's values were used
        saved = json.loads((Path(job.cfg.output_dir) / "dreambooth_config.json").read_text())
        assert (saved["use_ema"], saved["caption_dropout_rate"], saved["aspect_buckets"]) == (True, 0.1, False)
        assert (Path(job.cfg.output_dir) / "training_weights").is_dir()


def test_prior_preservation_from_the_app_draws_class_images_once(tiny_sdxl, tmp_path):
    """Ticking prior preservation is all the app needs: the class prompt comes from the instance
    prompt, the base draws the class images once (the runs table counts them), and the next run on
    the same base, class and resolution reuses them."""
    app = App(tmp_path, model=str(tiny_sdxl))
    lrs, values = [1e-2] * len(METHODS), [s.default for s in app.specs]
    chosen = {"with_prior_preservation": True, "num_class_images": 2, "prior_loss_weight": 0.5}
    run_values = [chosen.get(s.name, s.default) for s in app.run_specs]
    message = app.train(str(tiny_sdxl), SUBJECT, "", "star", ["lora", "mora"], 1, 64, 0, 0, *lrs, *values, *run_values)
    assert message.startswith("Queued lora (run 1), mora (run 2)")
    assert app.queue.wait(JOB_WAIT_S) and [j.state for j in app.queue.jobs] == ["done", "done"]
    for job in app.queue.jobs:
        saved = json.loads((job.output_dir / "dreambooth_config.json").read_text())
        assert (saved["with_prior_preservation"], saved["class_prompt"], saved["prior_loss_weight"]) == (
            True, "a photo of star", 0.5)
    folder, = (tmp_path / "class_images").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["class-00000.png", "class-00001.png"]
    drawn = [[(e["done"], e["total"]) for e in job.events() if e["event"] == "class_images"] for job in app.queue.jobs]
    assert drawn == [[(2, 2)], []]


def test_side_by_side_generation_with_scale_and_scores(trained_app, tiny_sdxl):
    gallery, scores, message = trained_app.generate(str(tiny_sdxl), "a photo of sks star", 3, 2, 2, 64, 1.0)
    assert [c for _, c in gallery] == [f"{row} · seed {s}" for row in ("base", "lora (run 1)", "fourierft (run 2)")
                                       for s in (3, 4)]
    assert [r[0] for r in scores] == ["base", "lora (run 1)", "fourierft (run 2)"]
    assert {r[4] for r in scores} == {"–"}, scores  # no judge on the random tiny model
    pixels = [np.asarray(img, dtype=np.int16) for img, _ in gallery]
    assert np.abs(pixels[2] - pixels[0]).max() > 0  # the trained adapter changes the image …
    assert scores[1][1:4] != scores[0][1:4]  # … and so its scores against the subject
    kept, _, _ = trained_app.generate(str(tiny_sdxl), "a photo of sks star", 3, 1, 2, 64, 1.0,
                                      ["lora (run 1) @ step 0", "lora (run 1) @ step 2"])
    assert [c for _, c in kept][-2:] == ["lora (run 1) @ step 0 · seed 3", "lora (run 1) @ step 2 · seed 3"]
    assert np.array_equal(np.asarray(kept[-2][0]), np.asarray(kept[0][0]))  # step 0 is the base (B = 0)
    off, _, _ = trained_app.generate(str(tiny_sdxl), "a photo of sks star", 3, 1, 2, 64, 0.0)
    assert all(np.array_equal(np.asarray(off[0][0]), np.asarray(img)) for img, _ in off)  # scale 0 = base


def test_strength_study_redraws_every_run_at_each_strength(trained_app, tiny_sdxl):
    from dreampeft.app.strength import STRENGTH_COLUMNS

    plot, table, message = trained_app.strength_study(str(tiny_sdxl), "a photo of sks star", 3, 2, 2, 64, "0, 0.5, 1")
    assert Path(plot).parent == trained_app.public_dir / "studies" and Image.open(plot).format == "PNG"
    runs = ["lora (run 1)", "fourierft (run 2)"]
    assert [r[:2] for r in table] == [["base", 0.0]] + [[run, s] for run in runs for s in (0.0, 0.5, 1.0)]
    assert len(STRENGTH_COLUMNS) == len(table[0]) and "2 run(s) × 3 strength(s) × 2 image(s)" in message
    base, lora0, lora_half, lora1 = table[:4]
    assert lora0[2:] == base[2:]  # strength 0 draws the base's images: the same scores to the digit
    assert lora1[2:] != base[2:] and lora_half[2:] not in (base[2:], lora1[2:])
    _, scores, _ = trained_app.generate(str(tiny_sdxl), "a photo of sks star", 3, 2, 2, 64, 1.0)
    assert lora1[2:] == [scores[1][1], scores[1][3]]  # ×1 is what Generate draws: DINO and CLIP-T there


@pytest.mark.parametrize("strengths, message", [
    ("", "give one or more numbers"), ("0.5, strong", "'strong' is not a number"),
    ("0.5, 5", "each strength must be between -4 and 4"), (",".join(str(i / 10) for i in range(9)), "at most 8"),
])
def test_strength_study_refuses_bad_input_with_a_message(trained_app, tiny_sdxl, tmp_path, strengths, message):
    plot, table, note = trained_app.strength_study(str(tiny_sdxl), "a photo of sks star", 0, 1, 2, 64, strengths)
    assert (plot, table) == (None, []) and message in note
    fresh = App(tmp_path, model=str(tiny_sdxl))  # nothing trained on it yet
    assert "train a method first" in fresh.strength_study(str(tiny_sdxl), "p", 0, 1, 2, 64, "1")[2]


def test_unloadable_dino_is_tried_once_and_the_toy_judge_still_scores(tmp_path, monkeypatch):
    """Offline, loading DINO/CLIP waits out the hub client's retries (~45 s): once per app session,
    not on every Generate click; the toy's judge columns fill in regardless."""
    from dreampeft.eval import EvalError
    from dreampeft.toy import TOY_MODEL
    from dreampeft.toyworld import render, subject_scenes

    tries = []

    def unreachable(*args):
        tries.append(args)
        raise EvalError("--dino_model facebook/dino-vits16: cannot load it")

    monkeypatch.setattr(studio, "FidelityScorer", unreachable)
    stars = [render(s) for s in subject_scenes("star", 4)]
    rows = [studio.Row("base", stars[:2], real=stars), studio.Row("lora", stars[2:], real=stars, run="lora")]
    s = studio.Studio(tmp_path, "facebook/dino-vits16", "openai/clip-vit-base-patch32")
    for _ in range(3):
        table, note = s.score(rows, str(TOY_MODEL), "a sks object on a blue background")
        assert "DINO/CLIP unavailable" in note and "cannot load it" in note
        assert all(r["toy_object"] > 0.9 and "toy_judge" in r and "dino" not in r for r in table)
    assert len(tries) == 1


def test_presets_resolve_offline_and_set_their_defaults(tmp_path):
    from dreampeft.app import TOY
    from dreampeft.app.ui import preset_defaults
    from dreampeft.toy import TOY_MODEL

    assert studio.resolve_model(TOY, tmp_path) == str(TOY_MODEL)
    from dreampeft.app import option_specs
    from dreampeft.presets import method_preset

    toy, sdxl, n = preset_defaults(TOY), preset_defaults(""), len(METHODS)
    assert toy[:2] == (64, 64) and sdxl[:2] == (1024, 1024)
    assert toy[2:2 + n] == (2e-3, 2e-3, 5e-4, 4e-3, 2e-3)  # lora, lora_dash, fourierft, mora, dora
    assert sdxl[2:2 + n] == (1e-4, 1e-4, 1e-2, 1e-4, 1e-4) == tuple(method_preset("sdxl", m).lr for m in METHODS)
    names = [(s.method, s.name) for s in option_specs(list(METHODS))]
    init = 2 + n + names.index(("fourierft", "init"))  # the toy starts FourierFT from zeros
    assert len(toy) == len(sdxl) == 2 + n + len(names) and (toy[init], sdxl[init]) == ("zeros", "zeros")
    assert preset_defaults("my/custom-sdxl") is None  # custom models keep the fields as set


@pytest.mark.parametrize("model, message", [
    ("stabilityai/stable-diffusion-xl-base-1.0", "cannot be reached from here"),
    ("/no/such/folder", "no model_index.json"),
])
def test_unusable_models_give_a_message_not_a_crash(trained_app, monkeypatch, model, message):
    monkeypatch.setattr(studio, "_hub_reachable", lambda timeout_s=3.0: False)
    values = [s.default for s in trained_app.specs]
    assert message in trained_app.train(model, SUBJECT, "p", "c", ["lora"], 2, 64, 0, 0, *learning_rates("sdxl").values(), *values)
    assert message in trained_app.generate(model, "p", 0, 1, 1, 64, 1.0)[2]
    assert "choose at least one method" in trained_app.train(str(trained_app.model), SUBJECT, "p", "c", [], 2, 64, 0,
                                                             0, *learning_rates("sdxl").values(), *values)
