"""Offline demo (`make demo`): DreamBooth on the toy SDXL with LoRA-Dash (or any method), judged.

The toy SDXL (``assets/toy_sdxl``, trained in this project on ``dreampeft.toyworld``) draws the
prompts it is given, but has never seen an orange star. Each method learns the star from 5 images
through the real trainer (``dreampeft.dreambooth.train``), is loaded into the pipeline with
``dp.load_into_pipeline``, and draws held-out recontext prompts; the toy judge scores subject
fidelity (is it the star?) and prompt fidelity (is it where / on what the prompt asked?).
This is ``python -m dreampeft.toy bench`` on one subject with fewer images and one training seed,
by default with the bench's recipe that draws the subject in new contexts (``locon_masked``: kohya's
conv LoRA on the resnets as well as the transformer blocks, prior preservation, masked loss, 500
steps of all 5 images; README) with LoRA-Dash; ``--recipe plain`` is the trainer's own defaults (300 steps),
which every method can train.

    python -m dreampeft.demo [--out demo_out] [--methods lora,lora_dash,dora] [--subject striped_ball]
    python -m dreampeft.demo --recipe plain --methods all    # every method, the trainer's defaults
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .toy import TOY_MODEL
from .adapters import METHODS, ConfigError
from .presets import parse_methods
from .adapters.base import conv_methods, conv_targets
from .toy.bench import DRIFT_CAPTIONS, check_recipe, results_table, run_bench
from .toy.recipe import CLASS_IMAGES, RECIPES, recipe_steps
from .toyworld import SUBJECTS
from .utils import quiet_libraries

# LoRA-Dash on the recipe that draws the star, 500 steps: under the 5-minute budget on a 2-core CPU.
# On the shipped toy (2× wide UNet, a step ~3.6× the first toy's) this run took 4 min 18 s and drew
# the star at 0.80 with 0.77× the base's prompt fidelity; without masked loss (``locon``) 0.43 at 0.92×
# (README). One method fits; --methods lora,lora_dash doubles the time.
DEFAULT_RECIPE, DEFAULT_METHODS, DEFAULT_STEPS = "locon_masked", "lora_dash", 500


def demo_methods(recipe: str, text: str) -> list[str]:
    """``--methods``: the names given, or for ``all`` every method that can train ``recipe``'s layers."""
    if text.strip() != "all":
        return parse_methods(text)
    return list(conv_methods() if conv_targets(RECIPES[recipe].get("unet_target_modules", [])) else METHODS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreampeft.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per method (default: "
                        f"{DEFAULT_STEPS} for {DEFAULT_RECIPE}, else the recipe's: " + ", ".join(
                            f"{r} {recipe_steps(r)}" for r in RECIPES if r != DEFAULT_RECIPE) + ")")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated methods, or all: every "
                        f"method the recipe can train (default: {DEFAULT_METHODS})")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES),
                        help=f"trainer options (toy/recipe.py; default: {DEFAULT_RECIPE})")
    parser.add_argument("--drift_captions", type=int, default=DRIFT_CAPTIONS,
                        help="world captions drawn per run for the drift column; 0 leaves it out")
    parser.add_argument("--class_images", type=int, default=None, help=f"class images the base draws for the "
                        f"recipe's prior preservation (default: the recipe's, {CLASS_IMAGES})")
    parser.add_argument("--subject", default="star", choices=sorted(SUBJECTS))
    parser.add_argument("--model", default=str(TOY_MODEL), help="toy model folder")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        methods = demo_methods(args.recipe, args.methods)
        check_recipe(args.recipe, methods)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    if args.drift_captions < 0:
        parser.error(f"--drift_captions must be 0 or more (got {args.drift_captions})")
    if args.class_images is not None and args.class_images < 1:
        parser.error(f"--class_images must be at least 1 (got {args.class_images})")
    overrides = {"num_class_images": args.class_images} if args.class_images else None
    t0, out = time.perf_counter(), Path(args.out)
    steps = args.steps or (DEFAULT_STEPS if args.recipe == DEFAULT_RECIPE else None)
    results = run_bench(args.model, out, methods, steps, seeds=2, subjects=[args.subject],
                        recipe=args.recipe, drift=args.drift_captions, overrides=overrides,
                        log=lambda msg: print(msg, flush=True))
    print("\n" + results_table(results, ["base", *methods], [args.subject]))
    print(f"\ngrid (rows: instance images, base, {', '.join(methods)}; columns: recontext prompts) "
          f"→ {out / 'grid.png'}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
