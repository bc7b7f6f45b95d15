"""Offline demo (`make demo`): DreamBooth on the toy SDXL with every adapter method, judged.

The toy SDXL (``assets/toy_sdxl``, trained in this project on ``dreampeft.toyworld``) draws the
prompts it is given, but has never seen an orange star. Each method learns the star from 5 images
through the real trainer (``dreampeft.dreambooth.train``), is loaded into the pipeline with
``dp.load_into_pipeline``, and draws held-out recontext prompts; the toy judge scores subject
fidelity (is it the star?) and prompt fidelity (is it where / on what the prompt asked?).
This is ``python -m dreampeft.toy bench`` on one subject with fewer images.

    python -m dreampeft.demo [--out demo_out] [--steps 300] [--methods lora,mora] [--subject striped_ball]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .toy import TOY_MODEL
from .adapters import METHODS, ConfigError
from .presets import parse_methods
from .toy.bench import BENCH_STEPS, results_table, run_bench
from .toyworld import SUBJECTS
from .utils import quiet_libraries


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreampeft.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--steps", type=int, default=BENCH_STEPS, help="training steps per method")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--subject", default="star", choices=sorted(SUBJECTS))
    parser.add_argument("--model", default=str(TOY_MODEL), help="toy model folder")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        methods = parse_methods(args.methods)
    except ConfigError as exc:
        parser.error(str(exc))
    t0, out = time.perf_counter(), Path(args.out)
    results = run_bench(args.model, out, methods, args.steps, seeds=2, subjects=[args.subject],
                        recipe="plain", log=lambda msg: print(msg, flush=True))  # the trainer's defaults
    print("\n" + results_table(results, ["base", *methods], [args.subject]))
    print(f"\ngrid (rows: instance images, base, {', '.join(methods)}; columns: recontext prompts) "
          f"→ {out / 'grid.png'}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
