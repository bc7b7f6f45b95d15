"""The toy benchmark's training recipes: which of the trainer's options each bench run uses.

``plain`` is the trainer's defaults (what the bench measured before issue 17). The other two fight
the two ways a toy run fails — the subject not learnt, and the instance images' backgrounds
leaking into every prompt:

* ``prior``: prior preservation, with class images drawn by the *base* from random full world
  captions (``write_class_images``: each with its caption beside it; on the toy the "class" that
  must not drift is the world itself: a prior term on "a object" would keep a word the base never
  learnt), and caption dropout 0.1 (the one option that helped on the old toy: prompt fidelity
  0.43 → 0.57);
* ``full``: ``prior`` plus masked loss with the background at weight 0.2, EMA of the adapter, and
  the best evaluation kept (``--keep_best balanced``) where the evaluation prompts are *not* the
  bench's recontext prompts (``SELECT_PROMPTS``): choosing a checkpoint on the prompts that are then
  reported would flatter every method.

Measured (README, LoRA on the star, 2 training seeds × 4 images): ``plain`` subject 0.22, prompt
0.45; ``prior`` 0.25 and 0.63 (0.92× the base's 0.68); ``prior`` at 600 steps 0.13 / 0.66;
``prior`` keeping the best held-out subject fidelity 0.18 / 0.64. ``full`` (3 training seeds, every
method) keeps prompt fidelity at the base's but kept step 0 in 14 of 30 runs, so no method beat the
base's subject fidelity with it. ``transformer`` (``prior`` on kohya's targets, batches of all 5
instance images, 1,000 steps; 3 training seeds, every method): LoRA's star 0.25 ± 0.07 at 1.00× the
base's prompt fidelity, the others 0.10–0.20, the striped ball ≤ 0.001
(``bench/results/toy_subject_probes.md``). ``locon`` (``transformer`` plus the resnets' convolutions,
kohya's LoCon, with class images of the bare "a object"; LoRA and LoRA-Dash): star 0.53 ± 0.15 and
0.43 ± 0.12, striped ball 0.23 ± 0.08 and 0.33 ± 0.08, at 0.65–0.81× the base's prompt fidelity and
drift 0.28–0.35 against the base's 0.55 (``bench/results/toy_bench_locon_recipe.md``; DoRA, session
17: 0.47 ± 0.14 and 0.35 ± 0.22 at 0.54–0.63×). ``locon_shapes`` (the class images captioned with their
colour and shape only, "a red triangle"; LoRA): drift 0.43 / 0.41 kept, but star 0.36 ± 0.06 and
striped ball 0.17 ± 0.11 at prompt 0.45 / 0.44 — no better trade than ``locon`` at half strength
(``bench/results/toy_bench_locon_shapes_recipe.md``, ``toy_scales_locon.md``). ``locon_unet`` (``locon``
with the text encoders frozen; LoRA, session 18): star 0.49 ± 0.12, striped ball 0.31 ± 0.09 at prompt
0.52 / 0.45 — ``locon``'s point within one sd (``bench/results/toy_bench_locon_unet.md``).
``locon_masked`` (``locon`` plus masked loss, backgrounds at 0.2; LoRA, session 18): star 0.45 ± 0.10,
striped ball 0.62 ± 0.21 at prompt 0.50 / 0.56 — the ball 2.7× ``locon``'s at the same prompt
fidelity (``bench/results/toy_locon_masked.md``); LoRA-Dash and DoRA (session 19): ball 0.61 ± 0.25
and 0.70 ± 0.18, star 0.50 ± 0.21 and 0.43 ± 0.18 (``toy_bench_locon_masked_dash_dora.md``). All of
the above on the first toy. On the shipped toy (session 27, 500 steps, 3 training seeds): star
0.74–0.81, striped ball 0.56–0.60 for LoRA, LoRA-Dash and DoRA, at 0.83–0.88× / 0.67–0.76× the base's
prompt fidelity (``bench/results/toy2_bench_locon_masked.md``); the demo's recipe. ``locon_captioned``
(session 29; each instance image's size, corner and background named): star 0.67–0.81 at 0.94–0.96× the
prompt at 750 steps — but drawn small, where the judge reads blurry shapes as stars (README), with drift
0.61 against 0.75; the striped ball not learnt (0.000, one seed). ``locon_tags`` (the same as kohya's
tags, half dropped every step): ball 0.59 ± 0.20 at 0.74× (500 steps), ``locon_masked``'s point.
``bench --set KEY=VALUE`` changes one trainer option over a recipe's (``parse_overrides``).
"""

from __future__ import annotations

import random
from pathlib import Path

from ..toyworld import ATTRIBUTES, sample_scene

SELECT_PROMPTS = [  # held out from bench.RECONTEXT: other backgrounds, corners and sizes
    "a sks object on a yellow background",
    "a sks object on a dotted background",
    "a small sks object in the top right corner",
    "a large sks object in the bottom left corner",
]
CLASS_IMAGES = 48
# How class images are captioned (``write_class_images``'s arguments): the full world caption that
# names every attribute; DreamBooth's design, the instance prompt less "sks" with some attributes
# named; DreamBooth's bare class prompt "a object". What the prior term keeps is what its captions
# name (README: the world and object designs block the star from new contexts, plain lets it in);
# "shapes" names the colour and shape and nothing else ("a red circle"): the words drift measures,
# none of the backgrounds, corners or sizes the subject must be let into.
CLASS_CAPTIONS = {"world": {}, "object": {"noun": "object"}, "plain": {"noun": "object", "mention_p": 0.0},
                  "shapes": {"mention_p": 0.0}}
STEPS = {"transformer": 1000, "locon": 1000, "locon_shapes": 1000, "locon_unet": 1000, "locon_masked": 1000,
         "locon_captioned": 500, "locon_tags": 500}  # a recipe's steps when the bench is not given --steps
DEFAULT_STEPS = 300  # every other recipe's (bench.BENCH_STEPS, where the 300 is explained)

PRIOR = {"with_prior_preservation": True, "num_class_images": CLASS_IMAGES, "prior_loss_weight": 1.0,
         "caption_dropout_rate": 0.1}
LOCON_MASKED = {**PRIOR, "unet_target_modules": ["transformer", "resnets"], "train_batch_size": 5,
                "class_captions": "plain", "masked_loss": True, "mask_background_weight": 0.2}
RECIPES: dict[str, dict] = {
    "plain": {},
    "prior": PRIOR,
    # A new shape needs more than attention and more than 300 steps of 2 images: fine-tuning the
    # whole toy UNet on the star's 5 images (batch 5, bench/toy_ceiling.py) drew it in 53–74% of "a
    # sks object" images after 1,000 steps and 86–98% after 2,000 (two runs); attention alone 29%,
    # the resnets alone 25% at 1,000 (README).
    "transformer": {**PRIOR, "unet_target_modules": ["transformer"], "train_batch_size": 5},
    # kohya's LoCon: the resnets' convolutions too (LoRA, LoRA-Dash and DoRA only), with the bare class prompt's
    # images — the design under which the whole UNet composed the star (README, session 16).
    "locon": {**PRIOR, "unet_target_modules": ["transformer", "resnets"], "train_batch_size": 5,
              "class_captions": "plain"},
    # locon with a prior that keeps the base's shape words and names nothing the subject must enter
    "locon_shapes": {**PRIOR, "unet_target_modules": ["transformer", "resnets"], "train_batch_size": 5,
                     "class_captions": "shapes"},
    # locon with the text encoders left as the base's: "sks" keeps the frozen encoders' embedding, and
    # only the UNet learns what it means, so nothing the encoders share with other words can move
    "locon_unet": {**PRIOR, "unet_target_modules": ["transformer", "resnets"], "train_batch_size": 5,
                   "class_captions": "plain", "train_text_encoder": False},
    # locon with the instance images' backgrounds weighted 0.2 in the loss (their object masks): the
    # white, gray, blue and striped backgrounds the subject was shown on are learnt less, so they
    # should leak less into the recontext prompts' backgrounds
    "locon_masked": LOCON_MASKED,
    # locon_masked with every instance image captioned with what it shows besides the subject
    # (``toyworld.instance_caption``, kohya-style: "a small sks object in the top left corner on a white
    # background"): under locon_masked the ball's runs drew small orange blobs on white for the corner
    # prompts — the instance images' white backgrounds and small sizes had been learnt as part of
    # "sks". ``--set instance_captions='["background"]'`` names the background alone.
    "locon_captioned": {**LOCON_MASKED, "instance_captions": list(ATTRIBUTES)},
    # locon_masked with all three attributes named, as kohya's tags ("a sks object, small, in the top
    # left corner, on a white background"), half of them left out at every step: captioned sentences
    # bound the ball to the words they always named (drawn for corner prompts, never for "a sks object
    # on a green background"); with random subsets every prompt's subset was seen with the subject
    "locon_tags": {**LOCON_MASKED, "instance_captions": list(ATTRIBUTES), "instance_tags": True,
                   "caption_tag_dropout_rate": 0.5},
    "full": {**PRIOR, "masked_loss": True, "mask_background_weight": 0.2,
             "use_ema": True, "ema_decay": 0.99, "eval_steps": 50, "eval_prompts": SELECT_PROMPTS,
             "eval_images": 2, "keep_best": "balanced"},
}


def recipe_steps(recipe: str, steps: int | None = None) -> int:
    """``steps`` when given, else the recipe's own."""
    return steps or STEPS.get(recipe, DEFAULT_STEPS)


def write_class_images(pipe, folder: Path, n: int = CLASS_IMAGES, seed: int = 0, noun: str | None = None,
                       mention_p: float | None = None) -> Path:
    """``n`` base generations of random world captions that name every attribute, as
    ``class-NNNNN.png`` + ``.txt`` (the trainer reads a caption beside each image). ``noun``: DreamBooth's
    own design instead — the instance prompt without its identifier ("a large object on a green
    background"; each of size, corner and background named with probability ``mention_p``, default
    0.5; 0 gives DreamBooth's bare class prompt, "a object")."""
    from .evaluate import generate

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("class-*.png"))) >= n:
        return folder
    rng = random.Random(f"class-{seed}")
    if mention_p is None:
        mention_p = 0.5 if noun else 1.0
    captions = [sample_scene(rng, mention_p=mention_p).caption(noun) for _ in range(n)]
    for i, (caption, image) in enumerate(zip(captions, generate(pipe, captions, seed=10_000 + seed))):
        (folder / f"class-{i:05d}.txt").write_text(caption + "\n")
        image.save(folder / f"class-{i:05d}.png")
    return folder


def class_folder(class_dir: Path, design: str) -> Path:
    """Where the class images of a caption ``design`` (``CLASS_CAPTIONS``) live: ``class_dir`` for
    world captions, else beside it (``class-plain``), so recipes of different designs never share images."""
    return class_dir if design == "world" else class_dir.with_name(f"{class_dir.name}-{design}")


def class_images_if_needed(pipe, folder: Path, *options: dict) -> Path | None:
    """The class images (``write_class_images``, each recipe's caption design, as many as its
    ``num_class_images`` — ``--set num_class_images=8`` draws 8) when any of ``options`` uses prior
    preservation; returns ``folder``, the world design's (``class_folder``)."""
    used = [o for o in options if o.get("with_prior_preservation")]
    for design in {o.get("class_captions", "world") for o in used}:
        n = max(o.get("num_class_images", CLASS_IMAGES) for o in used if o.get("class_captions", "world") == design)
        write_class_images(pipe, class_folder(folder, design), n=n, **CLASS_CAPTIONS[design])
    return folder if used else None


def recipe_config(recipe: str, overrides: dict | None = None) -> dict:
    """``recipe``'s options with ``overrides`` (``parse_overrides``) on top."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)} (got {recipe!r})")
    return {**RECIPES[recipe], **(overrides or {})}


def recipe_options(recipe: str, class_dir: Path | None, mask_dir: Path | None, overrides: dict | None = None) -> dict:
    """DreamBoothConfig fields of ``recipe`` (and ``overrides``) for one subject (its masks, the
    shared class images)."""
    return with_paths(recipe_config(recipe, overrides), class_dir, mask_dir)


# keys of a recipe that the bench reads itself, not trainer options: how the class images and the
# instance images are captioned
BENCH_KEYS = ("class_captions", "instance_captions", "instance_tags")
# what the bench sets for every run itself: a --set of these would be silently replaced
BENCH_OWNED = ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "output_dir", "adapter",
               "learning_rate", "max_train_steps", "seed", "class_data_dir", "class_prompt", "mask_dir")


def parse_overrides(pairs: list[str], recipe: str) -> dict:
    """``--set KEY=VALUE`` pairs as trainer options over ``recipe``'s (e.g. mask_background_weight=0.1):
    KEY a DreamBoothConfig field or ``class_captions``; VALUE read as JSON (0.1, true, null,
    ["transformer"]), else as text. Raises ValueError naming the pair when the result would not
    train, before anything is drawn or trained."""
    import json
    from dataclasses import fields

    from ..dreambooth.config import ConfigError, DreamBoothConfig

    names = {f.name for f in fields(DreamBoothConfig)} - set(BENCH_OWNED) | set(BENCH_KEYS)
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or key not in names:
            owned = f" (the bench sets {key} itself)" if key in BENCH_OWNED else ""
            raise ValueError(f"--set {pair!r}: want KEY=VALUE with KEY a trainer option{owned}, e.g. "
                             "mask_background_weight=0.1, class_captions=shapes or instance_captions='[\"background\"]'")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    options = recipe_config(recipe, overrides)
    if options.get("class_captions", "world") not in CLASS_CAPTIONS:
        raise ValueError(f"--set class_captions: one of {', '.join(CLASS_CAPTIONS)} "
                         f"(got {options['class_captions']!r})")
    named = options.get("instance_captions", [])
    if not isinstance(named, list) or not set(named) <= set(ATTRIBUTES) or len(set(named)) < len(named):
        raise ValueError(f"--set instance_captions: a JSON list of the attributes each instance caption names, "
                         f"each of {', '.join(ATTRIBUTES)} at most once, e.g. '[\"background\"]' (got {named!r})")
    if not isinstance(options.get("instance_tags", False), bool):
        raise ValueError(f"--set instance_tags: true or false (got {options['instance_tags']!r})")
    try:
        DreamBoothConfig(pretrained_model_name_or_path="toy", instance_data_dir="subject",
                         instance_prompt="a sks object", **with_paths(options, Path("class"), Path("masks")))
    except (ConfigError, TypeError) as exc:
        raise ValueError(f"--set {' '.join(pairs)} with recipe {recipe}: {exc}") from None
    return overrides


def with_paths(options: dict, class_dir: Path | None, mask_dir: Path | None) -> dict:
    """``options`` as DreamBoothConfig fields, with the folders its prior preservation and masked
    loss read."""
    options = dict(options)
    design = options.pop("class_captions", "world")
    for key in BENCH_KEYS[1:]:  # read by the bench when it writes the instance folder
        options.pop(key, None)
    if options.get("with_prior_preservation"):
        options.update(class_data_dir=str(class_folder(class_dir, design)), class_prompt="a object")
    if options.get("masked_loss"):
        options["mask_dir"] = str(mask_dir)
    return options
