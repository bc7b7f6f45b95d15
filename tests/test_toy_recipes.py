"""The toy bench's recipes (toy/recipe.py): what each one trains, and ``--set``, which changes one
trainer option over a recipe's — checked before anything loads or trains."""

from __future__ import annotations

import json

import pytest

from dreampeft.toy.__main__ import main
from dreampeft.toy.recipe import RECIPES, STEPS


def test_transformer_recipe_adapts_the_blocks_that_draw_shapes(tmp_path):
    """The ``transformer`` recipe trains kohya's targets (attention, feed-forward, proj_in/out) on
    batches of all 5 instance images with the prior term, and what the bench records says so."""
    assert STEPS["transformer"] > 300  # a new shape takes longer than the other recipes' 300 steps
    assert main(["bench", "--methods", "lora", "--steps", "2", "--seeds", "1", "--train_seeds", "1", "--recipe",
                 "transformer", "--subjects", "star", "--drift_captions", "0", "--set", "num_class_images=2",
                 "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 2 and saved["recipe_options"] == json.loads(json.dumps({**RECIPES["transformer"],
                                                                                     "num_class_images": 2}))
    run = tmp_path / "runs" / "star-lora-0"
    config = json.loads((run / "dreambooth_config.json").read_text())
    assert config["train_batch_size"] == 5 and config["with_prior_preservation"]
    targets = json.loads((run / "dreampeft_adapter.json").read_text())["components"]["unet"]["targets"]
    assert {n.rsplit(".", 1)[-1] for n in targets} >= {"to_q", "proj_in", "proj_out", "2"}  # ff.net.2
    assert any(n.endswith("ff.net.0.proj") for n in targets)


def test_locon_recipe_adapts_the_resnets_with_the_bare_class_prompt(tmp_path, capsys):
    """``locon``: LoRA on the transformer blocks and the resnets' convolutions, prior preservation on
    class images captioned "a object" (in their own folder, beside the world design's); methods that
    cannot adapt convolutions are refused before anything loads."""
    with pytest.raises(SystemExit):
        main(["bench", "--methods", "lora,mora", "--recipe", "locon", "--out", str(tmp_path / "refused")])
    assert "only lora, lora_dash and dora can: drop mora from --methods" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert main(["bench", "--methods", "lora", "--steps", "2", "--seeds", "1", "--train_seeds", "1", "--recipe", "locon",
                 "--subjects", "star", "--drift_captions", "0", "--set", "num_class_images=3", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["recipe_options"] == json.loads(json.dumps({**RECIPES["locon"], "num_class_images": 3}))
    config = json.loads((tmp_path / "runs" / "star-lora-0" / "dreambooth_config.json").read_text())
    assert config["class_data_dir"] == str(tmp_path / "class-plain") and config["train_batch_size"] == 5
    captions = {f.read_text() for f in (tmp_path / "class-plain").glob("class-*.txt")}
    assert captions == {"a object\n"} and len(list((tmp_path / "class-plain").glob("*.png"))) == 3  # as --set asked
    targets = json.loads((tmp_path / "runs" / "star-lora-0" / "dreampeft_adapter.json").read_text())
    shapes = targets["components"]["unet"]["targets"]
    assert shapes["down_blocks.0.resnets.0.conv1"]["shape"][2:] == [3, 3] and "mid_block.resnets.1.time_emb_proj" in shapes
    assert "drift" not in saved["results"]["lora/star"] and "| – |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("recipe,methods,pairs,says", [
    ("locon_masked", "lora", ["mask_weight=0.1"], "want KEY=VALUE with KEY a trainer option"),
    ("locon_masked", "lora", ["mask_background_weight"], "want KEY=VALUE"),
    ("locon_masked", "lora", ["learning_rate=1e-3"], "the bench sets learning_rate itself"),
    ("locon_masked", "lora", ["mask_background_weight=2"], "--mask_background_weight must be in [0, 1] (got 2"),
    ("locon_masked", "lora", ["masked_loss=false"], "--mask_background_weight only applies with --masked_loss"),
    ("locon_masked", "lora", ["class_captions=photos"], "class_captions: one of world, object, plain, shapes"),
    ("locon_masked", "lora", ["instance_captions=yes"], "instance_captions: a JSON list of the attributes"),
    ("locon_masked", "lora", ['instance_captions=["colour"]'], "each of size, position, background at most once"),
    ("locon_tags", "lora", ["instance_tags=1"], "--set instance_tags: true or false (got 1)"),
    ("prior", "lora,mora", ['unet_target_modules=["resnets"]'], "drop mora from --methods"),
])
def test_a_bad_set_is_refused_before_anything_loads(tmp_path, capsys, recipe, methods, pairs, says):
    with pytest.raises(SystemExit):
        main(["bench", "--methods", methods, "--recipe", recipe, *[a for p in pairs for a in ("--set", p)],
              "--out", str(tmp_path / "out")])
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_set_changes_one_option_of_the_recipe_and_the_results_say_so(tmp_path):
    """``--set`` over ``transformer``: masked loss at background weight 0.1 and 2 images of the bare
    class prompt — what each run trained with, what was drawn, and what results.json records."""
    assert main(["bench", "--methods", "lora", "--steps", "2", "--seeds", "1", "--train_seeds", "1",
                 "--recipe", "transformer", "--subjects", "star", "--drift_captions", "0",
                 "--set", "masked_loss=true", "--set", "mask_background_weight=0.1", "--set", "class_captions=plain",
                 "--set", "num_class_images=2", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    overrides = {"masked_loss": True, "mask_background_weight": 0.1, "class_captions": "plain", "num_class_images": 2}
    assert saved["overrides"] == overrides and saved["recipe_options"] == {**RECIPES["transformer"], **overrides}
    config = json.loads((tmp_path / "runs" / "star-lora-0" / "dreambooth_config.json").read_text())
    assert config["masked_loss"] and config["mask_background_weight"] == 0.1
    assert config["mask_dir"] == str(tmp_path / "masks" / "star")
    assert config["class_data_dir"] == str(tmp_path / "class-plain") and config["train_batch_size"] == 5
    assert config["num_class_images"] == 2 and len(list((tmp_path / "class-plain").glob("class-*.png"))) == 2


def test_captioned_recipe_trains_on_each_instance_images_own_caption(tmp_path):
    """``locon_captioned`` with ``--set instance_captions='["background"]'``: each instance image is
    captioned with the background it shows ("a sks object on a white background"), in a folder of its
    own; the trainer reads those captions instead of "a sks object" (the kohya export's tag
    frequencies list them), and the bench's prompts stay as they were. The recipe itself names size,
    corner and background, as sentences or (``instance_tags``) kohya's tags."""
    from safetensors import safe_open

    from dreampeft.toy.bench import write_subject
    from dreampeft.toyworld import instance_caption, subject_scenes

    assert main(["bench", "--methods", "lora", "--steps", "2", "--seeds", "1", "--train_seeds", "1", "--recipe",
                 "locon_captioned", "--subjects", "star", "--drift_captions", "0", "--set", "num_class_images=2",
                 "--set", 'extra_exports=["kohya"]', "--set", 'instance_captions=["background"]', "--out", str(tmp_path)]) == 0
    expected = [instance_caption(s, mention=("background",)) for s in subject_scenes("star", 5)]
    assert expected[0] == "a sks object on a white background" and len(set(expected)) == 4  # white twice
    folder = tmp_path / "subjects-background" / "star"
    assert [(folder / f"star-{i}.txt").read_text() for i in range(5)] == [c + "\n" for c in expected]
    assert not (tmp_path / "subjects").exists()  # the plain recipes' folder stays caption-free
    run = tmp_path / "runs" / "star-lora-0"
    config = json.loads((run / "dreambooth_config.json").read_text())
    assert config["instance_data_dir"] == str(folder) and "instance_captions" not in config
    with safe_open(run / "pytorch_lora_weights_kohya.safetensors", "pt") as f:
        tags = json.loads(f.metadata()["ss_tag_frequency"])
    assert next(iter(tags.values())) == {c: expected.count(c) for c in expected}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["recipe_options"]["instance_captions"] == ["background"]
    assert "a sks object on a green background" in saved["prompts"]
    assert RECIPES["locon_captioned"]["instance_captions"] == ["size", "position", "background"]
    full = write_subject("star", tmp_path / "full", captions=("size", "position", "background"))
    assert (full / "star-1.txt").read_text() == instance_caption(subject_scenes("star", 5)[1]) + "\n"
    tags = write_subject("star", tmp_path / "tags", captions=("size", "position", "background"), tags=True)
    assert (tags / "star-0.txt").read_text() == "a sks object, large, in the center, on a white background\n"
    write_subject("star", full)  # rewritten uncaptioned, no stale caption is left to be read
    assert sorted(p.suffix for p in full.iterdir()) == [".png"] * 5
