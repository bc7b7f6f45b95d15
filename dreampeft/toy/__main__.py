"""python -m dreampeft.toy {pretrain,bench,samples}: the toy SDXL that draws the toy world.

    python -m dreampeft.toy pretrain OUT        # train VAE + UNet + judge on the CPU (~30 min)
    python -m dreampeft.toy samples [--model DIR] --out grid.png
    python -m dreampeft.toy bench [--methods lora,mora] [--out toy_bench]
"""

from __future__ import annotations

import argparse
import sys

from . import TOY_MODEL
from .bench import TOY_METHODS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreampeft.toy", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("pretrain", help="train the toy model from scratch into OUT")
    pre.add_argument("out")
    pre.add_argument("--vae_steps", type=int, default=400)
    pre.add_argument("--unet_steps", type=int, default=1600)
    pre.add_argument("--judge_steps", type=int, default=800)
    pre.add_argument("--n_images", type=int, default=12_000)
    pre.add_argument("--seed", type=int, default=0)
    sam = sub.add_parser("samples", help="a grid of prompts (rows: shapes; columns: colours)")
    sam.add_argument("--model", default=str(TOY_MODEL))
    sam.add_argument("--out", default="toy_samples.png")
    sam.add_argument("--seed", type=int, default=0)
    ben = sub.add_parser("bench", help="DreamBooth on unseen subjects, every method, judged offline")
    ben.add_argument("--model", default=str(TOY_MODEL))
    ben.add_argument("--methods", default=",".join(TOY_METHODS))
    ben.add_argument("--steps", type=int, default=150)
    ben.add_argument("--seeds", type=int, default=4, help="images per recontext prompt")
    ben.add_argument("--out", default="toy_bench")
    args = p.parse_args(argv)
    from ..utils import quiet_libraries

    quiet_libraries()
    if args.command == "pretrain":
        from .pretrain import pretrain

        pretrain(args.out, args.vae_steps, args.unet_steps, args.judge_steps, args.n_images, seed=args.seed,
                 log=lambda msg: print(msg, flush=True))
    elif args.command == "samples":
        from diffusers import StableDiffusionXLPipeline

        from .evaluate import sample_grid

        pipe = StableDiffusionXLPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
        sample_grid(pipe, args.seed).save(args.out)
        print(f"rows: circle, square, triangle, diamond; columns: red … orange → {args.out}")
    else:
        from .bench import results_table, run_bench

        methods = [m for m in args.methods.split(",") if m]
        unknown = sorted(set(methods) - set(TOY_METHODS))
        if unknown:
            p.error(f"--methods: unknown {unknown}; choose from {sorted(TOY_METHODS)}")
        results = run_bench(args.model, args.out, methods, args.steps, args.seeds, log=lambda m: print(m, flush=True))
        print(results_table(results, ["base", *methods]))
        print(f"grid (per subject: instance images, base, {', '.join(methods)}; columns: recontext prompts) "
              f"→ {args.out}/grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
