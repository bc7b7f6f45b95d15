"""The adapter core on a transformers ViT: image folders, adapters on query/value, a trained head."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import dreampeft as dp
from dreampeft.tasks.vit import main, train_vit
from dreampeft.tiny import build_tiny_vit, save_pair

OPTIONS = {"lora": {"r": 4}, "lora_dash": {"r": 4, "warmup_steps": 10, "n_directions": 4},
           "fourierft": {"n_frequency": 200, "scaling": 50.0}, "mora": {"r": 4}, "dora": {"r": 4}}
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


@pytest.fixture(scope="module")
def vit_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    g = torch.Generator().manual_seed(0)
    for name, rgb in COLOURS.items():  # noisy colour patches: learnable, not trivial for a random ViT
        (root / "data" / name).mkdir(parents=True)
        for i in range(8):
            noise = (torch.randn(32, 32, 3, generator=g) * 40 + torch.tensor(rgb)).clamp(0, 255)
            Image.fromarray(noise.byte().numpy()).save(root / "data" / name / f"{i}.png")
    return save_pair(build_tiny_vit(0, num_labels=2), root / "model"), root / "data"


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_every_method_learns_and_reloads(method, vit_setup, tmp_path):
    from transformers import AutoModelForImageClassification

    model_dir, data = vit_setup
    r = train_vit(str(model_dir), str(data), None, method, OPTIONS[method], tmp_path, lr=1e-2, max_steps=40)
    assert r["accuracy"] >= 0.9 and r["accuracy"] > r["accuracy_before"], r
    assert sum(r["losses"][-5:]) < sum(r["losses"][:5])
    fresh = AutoModelForImageClassification.from_pretrained(
        model_dir, id2label={0: "blue", 1: "green", 2: "red"}, ignore_mismatched_sizes=True)
    assert {n.rsplit(".", 1)[-1] for n in dp.find_targets(fresh, dp.LoRAConfig(
        target_modules=["query", "value", "attention.q_proj", "attention.v_proj"]))} == {"q_proj", "v_proj"}
    dp.load_adapter(fresh, tmp_path)
    from safetensors.torch import load_file

    fresh.classifier.load_state_dict(load_file(tmp_path / "head.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = r["model"].eval()(pixel_values=x).logits
        torch.testing.assert_close(fresh.eval()(pixel_values=x).logits, expected)
        dp.merge_adapters(fresh)
        torch.testing.assert_close(fresh(pixel_values=x).logits, expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "labels.json").read_text().strip() == '["blue", "green", "red"]'


def test_cli_and_bad_folders(vit_setup, tmp_path, capsys):
    model_dir, data = vit_setup
    assert main(["--model", str(model_dir), "--train", str(data), "--adapter", "mora", "--rank", "2",
                 "--max_steps", "3", "--out", str(tmp_path / "run")]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["--model", str(model_dir), "--train", str(data / "red")]) == 2
    assert "need one subfolder per class" in capsys.readouterr().err
