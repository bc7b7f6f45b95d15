"""Offline demo (`make demo`): DreamBooth on the toy SDXL with every adapter method, judged.

The toy SDXL (``assets/toy_sdxl``, trained in this project on ``dreampeft.toyworld``) draws the
prompts it is given, but has never seen an orange star. Each method learns the star from 5 images
through the real trainer (``dreampeft.dreambooth.train``), is loaded into the pipeline with
``dp.load_into_pipeline``, and draws held-out recontext prompts; the toy judge scores subject
fidelity (is it the star?) and prompt fidelity (is it where / on what the prompt asked?).
This is ``python -m dreampeft.toy bench`` on one subject with fewer images, by default with the
trainer's defaults (recipe ``plain``, 300 steps); ``--recipe locon`` is the recipe that draws the
subject in new contexts (LoRA, LoRA-Dash and DoRA on the resnets too, 1,000 steps; README).

    python -m dreampeft.demo [--out demo_out] [--steps 300] [--methods lora,mora] [--subject striped_ball]
    python -m dreampeft.demo --recipe locon            # LoRA, LoRA-Dash and DoRA with kohya's conv layers (~8.5 min)
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
from .toy.recipe import RECIPES, recipe_steps
from .toyworld import SUBJECTS
from .utils import quiet_libraries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreampeft.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per method (default: the "
                        "recipe's: " + ", ".join(f"{r} {recipe_steps(r)}" for r in RECIPES) + ")")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every method "
                        "the recipe can train)")
    parser.add_argument("--recipe", default="plain", choices=list(RECIPES), help="trainer options (toy/recipe.py)")
    parser.add_argument("--drift_captions", type=int, default=DRIFT_CAPTIONS,
                        help="world captions drawn per run for the drift column; 0 leaves it out")
    parser.add_argument("--subject", default="star", choices=sorted(SUBJECTS))
    parser.add_argument("--model", default=str(TOY_MODEL), help="toy model folder")
    args = parser.parse_args(argv)
    quiet_libraries()
    convs = conv_targets(RECIPES[args.recipe].get("unet_target_modules", []))
    try:
        methods = parse_methods(args.methods or ",".join(conv_methods() if convs else METHODS))
        check_recipe(args.recipe, methods)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    if args.drift_captions < 0:
        parser.error(f"--drift_captions must be 0 or more (got {args.drift_captions})")
    t0, out = time.perf_counter(), Path(args.out)
    results = run_bench(args.model, out, methods, args.steps, seeds=2, subjects=[args.subject],
                        recipe=args.recipe, drift=args.drift_captions, log=lambda msg: print(msg, flush=True))
    print("\n" + results_table(results, ["base", *methods], [args.subject]))
    print(f"\ngrid (rows: instance images, base, {', '.join(methods)}; columns: recontext prompts) "
          f"→ {out / 'grid.png'}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
