"""The toy's command lines (``python -m dreampeft.toy bench|sweep|scales``, ``make demo``): what
each one runs, writes and refuses, on a few steps of the shipped toy (the figures are the bench's
business; here, that every table, plot and folder says what was run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dreampeft.toy.bench import RECONTEXT
from dreampeft.toyworld import SUBJECTS, asked


def test_bench_cli_tabulates_every_subject_and_method_over_training_seeds(tmp_path, capsys):
    """The bench with the full recipe: every cell is a mean over training seeds with its standard
    deviation, the class images are the base's with their captions, each subject has a Pareto plot,
    and ``--lr_factor`` scales the method's toy rate in every run (a non-positive one is refused)."""
    import json

    from PIL import Image

    from dreampeft.presets import method_preset
    from dreampeft.toy.__main__ import main
    from dreampeft.toy.recipe import RECIPES

    with pytest.raises(SystemExit):
        main(["bench", "--lr_factor", "0", "--out", str(tmp_path / "refused")])
    assert "--lr_factor must be positive" in capsys.readouterr().err
    assert main(["bench", "--methods", "mora", "--steps", "2", "--seeds", "1", "--train_seeds", "2", "--lr_factor",
                 "0.5", "--recipe", "full", "--subjects", "star", "--drift_captions", "3", "--set", "num_class_images=4",
                 "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    results = saved["results"]
    assert set(results) == {"base/star", "mora/star"} and saved["lr_factor"] == 0.5
    for seed in (0, 1):
        config = json.loads((tmp_path / "runs" / f"star-mora-{seed}" / "dreambooth_config.json").read_text())
        assert config["learning_rate"] == method_preset("toy", "mora").lr / 2
    assert saved["train_seeds"] == 2 and saved["recipe_options"] == json.loads(json.dumps({**RECIPES["full"],
                                                                                         "num_class_images": 4}))
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
    assert len(captions) == len(list((tmp_path / "class").glob("class-*.png"))) == 4  # --set num_class_images=4
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


# A short bench of LoRA on the star (plain recipe, two training seeds): what `scales` redraws and
# `merge` joins to a bench of the other subject. Read-only for the tests that share it.
SMALL_BENCH = ["bench", "--methods", "lora", "--steps", "2", "--seeds", "1", "--train_seeds", "2", "--recipe",
               "plain", "--drift_captions", "2"]


@pytest.fixture(scope="module")
def star_bench(tmp_path_factory):
    from dreampeft.toy.__main__ import main

    folder = tmp_path_factory.mktemp("bench")
    assert main([*SMALL_BENCH, "--subjects", "star", "--out", str(folder)]) == 0
    return folder


def test_scales_redraws_bench_runs_and_gives_the_bench_figures_at_scale_one(star_bench, tmp_path, capsys):
    """The strength study loads a bench's saved runs and draws its prompts at each scale: at ×1 it
    must reproduce the bench's own figures (same weights, prompts and seeds), at ×0.5 it averages the
    same training seeds; folders that hold no runs and scales that are not positive are refused."""
    import json

    from dreampeft.toy.__main__ import main

    bench_dir, out = star_bench, tmp_path / "scales"
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


def test_merge_joins_benches_run_side_by_side_and_refuses_unlike_ones(star_bench, tmp_path, capsys):
    """Two benches (one per subject, as two processes run them) become the one table the single
    bench would have written: every cell as measured, the base once, a Pareto plot per subject and
    both grids. Benches run with other settings, a cell measured twice, holes and folders without
    results are refused with the folder named, and nothing is written."""
    import shutil

    from PIL import Image

    from dreampeft.toy.__main__ import main

    assert list(SUBJECTS) == ["star", "striped_ball"]
    benches = {"star": star_bench, "striped_ball": tmp_path / "striped_ball"}
    assert main([*SMALL_BENCH, "--subjects", "striped_ball", "--out", str(benches["striped_ball"])]) == 0
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["merge", *map(str, benches.values()), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    merged = json.loads((out / "results.json").read_text())
    assert all(f"| subject: {s} |" in table for s in SUBJECTS) and "| lora |" in table
    for subject, folder in benches.items():
        own = json.loads((folder / "results.json").read_text())
        assert merged["steps"] == own["steps"] == 2 and merged["recipe"] == "plain"
        for cell, figures in own["results"].items():
            assert merged["results"][cell] == figures
        assert Image.open(out / f"pareto-{subject}.png").size[0] > 300
    assert set(merged["results"]) == {f"{r}/{s}" for r in ("base", "lora") for s in SUBJECTS}
    heights = [Image.open(f / "grid.png").size[1] for f in benches.values()]
    assert Image.open(out / "grid.png").size[1] == sum(heights)

    other = tmp_path / "other_steps"
    shutil.copytree(benches["star"], other)
    saved = json.loads((other / "results.json").read_text())
    (other / "results.json").write_text(json.dumps({**saved, "steps": 3}))
    holes = tmp_path / "holes"
    shutil.copytree(benches["star"], holes)
    saved["results"] = {k.replace("lora/", "dora/"): v for k, v in saved["results"].items()}
    (holes / "results.json").write_text(json.dumps(saved))
    for folders, said in (([benches["star"], other], f"{other}: steps is 3"),
                          ([benches["star"], benches["star"]], "lora/star was measured in an earlier folder"),
                          ([benches["striped_ball"], holes], "no figures for lora/star"),
                          ([benches["star"], tmp_path / "nowhere"], "nowhere/results.json: no such file"),
                          ([benches["star"]], "at least two")):
        with pytest.raises(SystemExit):
            main(["merge", *map(str, folders), "--out", str(tmp_path / "refused")])
        assert said in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    before = (benches["star"] / "results.json").read_text()
    with pytest.raises(SystemExit):  # a bench's own results are never overwritten by the merge
        main(["merge", *map(str, benches.values()), "--out", str(benches["star"])])
    assert "is one of the benches" in capsys.readouterr().err
    assert (benches["star"] / "results.json").read_text() == before


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
    """``make demo``'s default is the recipe that draws the subject (``locon_masked``: LoCon, the
    base's "a object" as the prior, masked loss); ``--methods all`` is every method the recipe's
    layers allow."""
    from dreampeft.adapters import METHODS
    from dreampeft.adapters.base import conv_methods
    from dreampeft.demo import demo_methods, main

    main(["--out", str(tmp_path), "--methods", "lora", "--steps", "2", "--subject", "striped_ball",
          "--drift_captions", "2", "--class_images", "3"])
    out = capsys.readouterr().out
    assert "| lora |" in out and "subject: striped_ball" in out and (tmp_path / "grid.png").exists()
    assert "drift: striped_ball" in out and json.loads((tmp_path / "results.json").read_text())["recipe"] == "locon_masked"
    assert len(list((tmp_path / "class-plain").glob("class-*.png"))) == 3  # locon's prior: the base's "a object"
    config = json.loads((tmp_path / "runs" / "striped_ball-lora-0" / "dreambooth_config.json").read_text())
    assert config["num_class_images"] == 3 and config["masked_loss"] and config["mask_background_weight"] == 0.2
    assert demo_methods("locon", "lora,lora_dash") == ["lora", "lora_dash"]
    assert demo_methods("locon", "all") == list(conv_methods()) and demo_methods("plain", "all") == list(METHODS)
    with pytest.raises(SystemExit):  # the locon recipe's layers only LoRA, LoRA-Dash and DoRA can adapt
        main(["--out", str(tmp_path / "x"), "--recipe", "locon", "--methods", "lora,mora"])
    assert "drop mora from --methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--class_images", "0"])
    assert "--class_images must be at least 1 (got 0)" in capsys.readouterr().err


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
