"""python -m dreampeft.toy {pretrain,judge,samples,bench,merge,options,sweep,scales}: the toy SDXL that draws the toy world.

    python -m dreampeft.toy pretrain OUT        # train VAE + UNet + judge on the CPU (~40 min)
    python -m dreampeft.toy judge MODEL [--judge_blur 3] [--judge_tiny 0] [--judge_orange 0]   # retrain its judge alone (~2 min)
    python -m dreampeft.toy samples [--model DIR] --out grid.png
    python -m dreampeft.toy bench [--methods lora,mora] [--train_seeds 3] [--recipe prior|locon_masked|...] [--set KEY=VALUE] [--out toy_bench]
    python -m dreampeft.toy merge BENCH_A BENCH_B [...] --out toy_bench   # benches run side by side, one table
    python -m dreampeft.toy options [--methods lora,lora_dash] [--train_seeds 2] [--out toy_options]
    python -m dreampeft.toy sweep [--methods lora] [--factors 0.5,1,2] [--train_seeds 2] [--grid scaling=75,150,300] [--out toy_sweep]
    python -m dreampeft.toy scales BENCH_OUT [RUN ...] [--scales 0.5,0.75,1] [--out toy_scales]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from . import TOY_MODEL
from ..adapters import METHODS, ConfigError
from ..presets import parse_methods
from .bench import BENCH_STEPS, DRIFT_CAPTIONS, check_recipe
from ..toyworld import ALL_SUBJECTS, SUBJECTS
from .options import VARIANTS
from .recipe import RECIPES, parse_overrides, recipe_steps
from .judge import SETTINGS as JUDGE_SETTINGS
from .pretrain import PretrainConfig, pretrain

SET_HELP = ("a trainer option over the recipe's, repeatable, e.g. --set mask_background_weight=0.1 "
            "--set class_captions=shapes (values as JSON, else text)")
STEPS_HELP = "training steps per run (default: the recipe's: " + ", ".join(
    f"{r} {recipe_steps(r)}" for r in RECIPES) + ")"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreampeft.toy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="train the toy model from scratch into OUT")
    pre.add_argument("out")
    for f in fields(PretrainConfig):
        pre.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    jud = sub.add_parser("judge", help="retrain a toy model folder's judge alone; re-read its prompt following")
    jud.add_argument("model", help="a toy model folder (pretrain's OUT); its judge and report are replaced")
    for name in JUDGE_SETTINGS:
        default = PretrainConfig.__dataclass_fields__[name].default
        jud.add_argument(f"--{name}", type=type(default), default=default)
    sam = sub.add_parser("samples", help="a grid of prompts (rows: shapes; columns: colours)")
    sam.add_argument("--model", default=str(TOY_MODEL))
    sam.add_argument("--out", default="toy_samples.png")
    sam.add_argument("--seed", type=int, default=0)
    ben = sub.add_parser("bench", help="DreamBooth on unseen subjects, every method, judged offline")
    ben.add_argument("--model", default=str(TOY_MODEL))
    ben.add_argument("--methods", default=",".join(METHODS))
    ben.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    ben.add_argument("--seeds", type=int, default=4, help="images per recontext prompt")
    ben.add_argument("--train_seeds", type=int, default=3, help="training runs per method and subject")
    ben.add_argument("--recipe", default="prior", choices=list(RECIPES), help="trainer options (toy/recipe.py)")
    ben.add_argument("--subjects", default=",".join(SUBJECTS))
    ben.add_argument("--drift_captions", type=int, default=DRIFT_CAPTIONS, help="world captions drawn per run "
                     "for the drift column (shape words kept); 0 leaves it out")
    ben.add_argument("--lr_factor", type=float, default=1.0, help="every method's toy preset rate times this "
                     "(e.g. 0.5, as a sweep on the tuning subject suggests)")
    ben.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help=SET_HELP)
    ben.add_argument("--out", default="toy_bench")
    mer = sub.add_parser("merge", help="benches run side by side (e.g. one per subject) as one table and plots")
    mer.add_argument("benches", nargs="+", help="bench --out folders, run with the same settings")
    mer.add_argument("--out", required=True)
    opt = sub.add_parser("options", help="masked loss, caption dropout and EMA: fidelity per method over seeds")
    opt.add_argument("--model", default=str(TOY_MODEL))
    opt.add_argument("--methods", default="lora,lora_dash")
    opt.add_argument("--train_seeds", type=int, default=2)
    opt.add_argument("--steps", type=int, default=BENCH_STEPS)
    opt.add_argument("--seeds", type=int, default=4, help="images per recontext prompt")
    opt.add_argument("--subjects", default=",".join(SUBJECTS))
    opt.add_argument("--variants", default="", help="a comma-separated subset of: " + ", ".join(VARIANTS))
    opt.add_argument("--out", default="toy_options")
    swp = sub.add_parser("sweep", help="learning rates per method (the toy preset's rate × factors) on one subject")
    swp.add_argument("--model", default=str(TOY_MODEL))
    swp.add_argument("--methods", default=",".join(METHODS))
    swp.add_argument("--factors", default="0.25,0.5,1,2,4")
    swp.add_argument("--steps", type=int, default=None, help=STEPS_HELP)
    swp.add_argument("--subject", default="cross", choices=sorted(ALL_SUBJECTS),
                     help="default: the tuning subject, which the bench does not report")
    swp.add_argument("--recipe", default="prior", choices=list(RECIPES))
    swp.add_argument("--seeds", type=int, default=2, help="images per recontext prompt")
    swp.add_argument("--train_seeds", type=int, default=1, help="training runs per setting (mean ± sd; "
                     "one run per rate picked a rate the 3-seed bench did not confirm)")
    swp.add_argument("--grid", default="", help="one adapter option's values, e.g. scaling=75,150,300 "
                     "(for the methods that have it)")
    swp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help=SET_HELP)
    swp.add_argument("--out", default="toy_sweep")
    sca = sub.add_parser("scales", help="saved bench runs redrawn at lower adapter strengths (the LoRA weight slider)")
    sca.add_argument("runs", nargs="+", help="bench --out folders (every run under runs/) or single run folders")
    sca.add_argument("--model", default=str(TOY_MODEL))
    sca.add_argument("--scales", default="0.5,0.75,1", help="adapter scales, e.g. 0.5,0.75,1 (1: as trained)")
    sca.add_argument("--seeds", type=int, default=4, help="images per recontext prompt")
    sca.add_argument("--drift_captions", type=int, default=DRIFT_CAPTIONS, help="world captions per drift "
                     "measurement; 0 leaves it out")
    sca.add_argument("--out", default="toy_scales")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    from ..utils import quiet_libraries

    quiet_libraries()
    if args.command == "pretrain":
        try:
            config = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
        except ValueError as e:
            p.error(f"pretrain: --{e}")
        pretrain(args.out, config, log=lambda msg: print(msg, flush=True))
    elif args.command == "judge":
        from .judge import rejudge

        try:
            settings = {name: getattr(args, name) for name in JUDGE_SETTINGS}
            PretrainConfig(**settings)  # validates them
            rejudge(args.model, log=lambda msg: print(msg, flush=True), **settings)
        except ValueError as e:
            p.error(f"judge: {e}")
    elif args.command == "samples":
        import torch
        from diffusers import StableDiffusionXLPipeline

        from .evaluate import sample_grid

        pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        sample_grid(pipe, args.seed).save(args.out)
        print(f"rows: circle, square, triangle, diamond; columns: red … orange → {args.out}")
    elif args.command == "scales":
        _scales(p, args)
    elif args.command == "merge":
        from .merge import merge_benches

        try:
            print(merge_benches(args.benches, args.out))
        except ValueError as exc:
            p.error(str(exc))
        print(f"plots and the stacked grid → {args.out}/")
    else:
        try:
            methods = parse_methods(args.methods)
            recipe = getattr(args, "recipe", "plain")  # `options` has no --recipe or --set
            args.overrides = parse_overrides(getattr(args, "overrides", []), recipe)
            check_recipe(recipe, methods, args.overrides)
        except (ConfigError, ValueError) as exc:
            p.error(str(exc))
        if args.command == "sweep":
            _sweep(p, args, methods)
        elif args.command == "options":
            from .options import option_study

            variants = [v.strip() for v in args.variants.split(",") if v.strip()]
            if unknown := [v for v in variants if v not in VARIANTS]:
                p.error(f"--variants: {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
            option_study(args.model, args.out, methods, args.train_seeds, args.steps, args.seeds,
                         _subjects(p, args.subjects), variants or None, log=lambda m: print(m, flush=True))
        else:
            _bench(p, args, methods)
    return 0


def _bench(p, args, methods: list[str]) -> None:
    from .bench import results_table, run_bench

    if args.train_seeds < 1 or args.seeds < 1:
        p.error(f"bench: --train_seeds and --seeds must be at least 1 (got {args.train_seeds}, {args.seeds})")
    subjects = _subjects(p, args.subjects)
    if args.drift_captions < 0:
        p.error(f"bench: --drift_captions must be 0 or more (got {args.drift_captions})")
    if not args.lr_factor > 0:
        p.error(f"bench: --lr_factor must be positive (got {args.lr_factor}); 1 keeps the toy presets' rates")
    results = run_bench(args.model, args.out, methods, args.steps, args.seeds, subjects, args.train_seeds,
                        recipe=args.recipe, drift=args.drift_captions, lr_factor=args.lr_factor,
                        overrides=args.overrides, log=lambda m: print(m, flush=True))
    print(results_table(results, ["base", *methods], subjects))
    print(f"grid (per subject: instance images, base, {', '.join(methods)}; columns: recontext prompts) "
          f"→ {args.out}/grid.png")


def _subjects(p, text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in ALL_SUBJECTS]
    if unknown or not names:
        p.error(f"--subjects: {', '.join(unknown) or 'none given'}; choose from {', '.join(sorted(ALL_SUBJECTS))}")
    return names


def _numbers(p, flag: str, text: str, what: str) -> list[float]:
    try:
        values = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        p.error(f"{flag}: give {what}, comma-separated, e.g. 0.5,1,2 (got {text!r})")
    return values


def _scales(p, args) -> None:
    from .scales import bench_runs, scale_study

    scales = _numbers(p, "--scales", args.scales, "positive adapter scales")
    if args.seeds < 1 or args.drift_captions < 0:
        p.error(f"scales: --seeds must be at least 1 and --drift_captions 0 or more (got {args.seeds}, "
                f"{args.drift_captions})")
    try:
        runs = bench_runs(args.runs)
    except ValueError as exc:
        p.error(str(exc))
    scale_study(args.model, runs, scales, args.out, args.seeds, args.drift_captions, log=lambda m: print(m, flush=True))
    print((Path(args.out) / "scales.md").read_text())
    print(f"plots (subject against prompt fidelity along the scales) → {args.out}/scales-*.png")


def _sweep(p, args, methods: list[str]) -> None:
    from .bench import sweep_lr

    factors = _numbers(p, "--factors", args.factors, "positive multipliers of the default rate")
    if args.train_seeds < 1 or args.seeds < 1:
        p.error(f"sweep: --train_seeds and --seeds must be at least 1 (got {args.train_seeds}, {args.seeds})")
    grid = None
    if args.grid:
        key, _, values = args.grid.partition("=")
        try:
            # "2000" stays an int (n_frequency is one); a float option takes ints too
            grid = {key.strip(): [int(v) if v.strip().lstrip("-").isdigit() else float(v)
                                  for v in values.split(",") if v.strip()]}
        except ValueError:
            grid = None
        if not key.strip() or not grid or not grid[key.strip()]:
            p.error(f"--grid: want OPTION=V1,V2,... with numbers, e.g. scaling=75,150,300 (got {args.grid!r})")
    best = sweep_lr(args.model, args.out, methods, factors, args.steps, args.seeds, args.subject, args.recipe,
                    option_grid=grid, train_seeds=args.train_seeds, overrides=args.overrides,
                    log=lambda m: print(m, flush=True))
    print((Path(args.out) / "sweep.md").read_text())
    print("best: " + ", ".join(f"{m} lr {b['lr']:g}" + "".join(f" {k}={v:g}" for k, v in b["options"].items())
                               for m, b in best.items()))


if __name__ == "__main__":
    sys.exit(main())
