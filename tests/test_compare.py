"""python -m dreampeft.compare end to end on the tiny SDXL with tiny DINO/CLIP models."""

from __future__ import annotations

import json

from PIL import Image

from dreampeft.compare import main
from dreampeft.tiny import ASSETS


def test_compare_trains_generates_scores_and_tabulates(tiny_sdxl, eval_models, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["--pretrained_model_name_or_path", str(tiny_sdxl), "--instance_data_dir", str(ASSETS / "subject"),
                 "--instance_prompt", "a photo of sks toy", "--methods", "lora,mora", "--max_train_steps", "2",
                 "--resolution", "64", "--subject", "sks toy", "--inference_steps", "1",
                 "--learning_rates", "lora=1e-3", "--dino_model", str(eval_models[0]),
                 "--clip_model", str(eval_models[1]), "--eval_steps", "1", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert list(data["results"]) == ["base", "lora", "mora"] and len(data["prompts"]) == 25
    for row in ("lora", "mora"):
        r = data["results"][row]
        assert r["trainable"] > 0 and r["file_kib"] > 0 and {"dino", "clip_i", "clip_t"} <= r.keys()
    assert json.loads((out / "lora" / "dreambooth_config.json").read_text())["learning_rate"] == 1e-3
    assert Image.open(out / "grid.png").size == (96 * 25, 96 * 3)  # rows: base + 2 methods
    assert (out / "images" / "mora" / "24.txt").read_text().strip() == "a cube shaped sks toy"
    assert "| mora |" in capsys.readouterr().out
    for row in ("lora", "mora"):  # fidelity along training: each method at its own best step and at the last
        r = data["results"][row]
        assert [f["step"] for f in r["fidelity"]] == [0, 1, 2] and r["best_step"] in (0, 1, 2)
        best = max((f for f in r["fidelity"] if f["drift"] <= 0.5), key=lambda f: f["score"])
        assert r["best_step"] == best["step"] and r["last_subject"] == r["fidelity"][-1]["subject"]
    assert Image.open(out / "pareto.png").size[0] > 300 and (out / "fidelity.png").exists()


def test_compare_needs_prompts(tiny_sdxl, capsys):
    assert main(["--pretrained_model_name_or_path", str(tiny_sdxl), "--instance_data_dir", "x",
                 "--instance_prompt", "p", "--no_metrics"]) == 2
    assert "give --prompts or --subject" in capsys.readouterr().err
    assert main(["--pretrained_model_name_or_path", str(tiny_sdxl), "--instance_data_dir", "x",
                 "--instance_prompt", "p", "--prompts", "a", "--no_metrics", "--scale", "9"]) == 2
    assert "--scale must be between -4 and 4" in capsys.readouterr().err


def test_compare_at_scale_zero_generates_the_base_images(tiny_sdxl, tmp_path, capsys):
    """--scale is the strength every method's adapter generates at: at 0 each method's images are the
    base model's, pixel for pixel (the runs themselves are trained as usual)."""
    import numpy as np

    out = tmp_path / "cmp"
    assert main(["--pretrained_model_name_or_path", str(tiny_sdxl), "--instance_data_dir", str(ASSETS / "subject"),
                 "--instance_prompt", "a photo of sks toy", "--methods", "lora", "--max_train_steps", "2",
                 "--resolution", "64", "--prompts", "a sks toy,a sks toy on a beach", "--inference_steps", "1",
                 "--learning_rates", "lora=1e-2", "--no_metrics", "--scale", "0", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["scale"] == 0
    for i in range(2):
        base, lora = (np.asarray(Image.open(out / "images" / row / f"{i:02d}.png")) for row in ("base", "lora"))
        assert np.array_equal(base, lora)
    assert "adapters at ×0" in capsys.readouterr().out
