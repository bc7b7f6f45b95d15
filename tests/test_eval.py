"""Subject-fidelity metrics: the math on hand-computable cases, and the full path on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dreampeft.eval import (EvalError, FidelityScorer, evaluation_prompts, mean_paired_cosine,
                            mean_pairwise_cosine)
from dreampeft.eval.__main__ import main
from dreampeft.tiny import ASSETS


def test_cosine_math():
    e = torch.eye(3)
    assert mean_pairwise_cosine(e[:1], e[:1] * 5) == pytest.approx(1.0)  # scale-free
    assert mean_pairwise_cosine(e[:1], e[1:]) == pytest.approx(0.0)  # orthogonal
    assert mean_pairwise_cosine(e[:1], -e[:1]) == pytest.approx(-1.0)
    assert mean_pairwise_cosine(e[:2], e[:2]) == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert mean_paired_cosine(e[:2], e[:2]) == pytest.approx(1.0)


def test_dreambooth_prompts_are_bundled():
    objects, live = evaluation_prompts("sks dog"), evaluation_prompts("sks dog", live=True)
    assert len(objects) == len(live) == 25 and len(set(objects)) == 25
    assert objects[0] == "a sks dog in the jungle" and "a sks dog wearing a santa hat" in live
    assert all("sks dog" in p for p in objects + live)


def _subject(i):
    return Image.open(ASSETS / "subject" / f"star-{i}.png").convert("RGB")


def test_scorer_identical_images_score_one(eval_models):
    scorer = FidelityScorer(str(eval_models[0]), str(eval_models[1]))
    same = scorer.score([_subject(0)], [_subject(0)], ["a sks toy"])
    assert same["dino"] == pytest.approx(1.0, abs=1e-5) and same["clip_i"] == pytest.approx(1.0, abs=1e-5)
    other = scorer.score([_subject(0)], [Image.new("RGB", (96, 80), (0, 200, 0))], ["a sks toy"])
    assert other["dino"] < same["dino"]
    green = Image.new("RGB", (96, 80), (0, 200, 0))  # CLIP-T is the image-text cosine, by hand:
    by_hand = torch.nn.functional.cosine_similarity(scorer.clip_image_features([green]),
                                                    scorer.clip_text_features(["a sks toy"])).item()
    assert other["clip_t"] == pytest.approx(by_hand, abs=1e-5)
    with pytest.raises(EvalError, match="2 prompts for 1 generated images"):
        scorer.score([_subject(0)], [_subject(1)], ["a", "b"])


def test_cli_writes_json_and_table(eval_models, tmp_path, capsys):
    real, gen = tmp_path / "real", tmp_path / "gen"
    real.mkdir(), gen.mkdir()
    for i in range(2):
        _subject(i).save(real / f"{i}.png")
        _subject(i + 2).save(gen / f"{i}.png")
        (gen / f"{i}.txt").write_text(f"a sks toy, view {i}")
    assert main(["--real", str(real), "--generated", str(gen), "--dino_model", str(eval_models[0]),
                 "--clip_model", str(eval_models[1])]) == 0
    scores = json.loads((gen / "fidelity.json").read_text())
    assert {"dino", "clip_i", "clip_t"} <= scores.keys() and scores["n_generated"] == 2
    assert "| DINO | CLIP-I | CLIP-T |" in (gen / "fidelity.md").read_text()
    assert main(["--real", str(real), "--generated", str(gen), "--dino_model", str(tmp_path / "no-dino"),
                 "--clip_model", str(eval_models[1])]) == 2
    err = capsys.readouterr().err
    assert "error: --dino_model" in err and "pass a local folder" in err and "Traceback" not in err
