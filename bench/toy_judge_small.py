"""How far to trust the toy judge's subject fidelity when the subject is drawn small.

    python bench/toy_judge_small.py                                    # the judge on blurred renders (~1 min)
    python bench/toy_judge_small.py --runs A/runs/star-lora_dash-0,... B/runs/star-lora_dash-0,...

First part: orange shapes rendered small, large and as dots (0.55× small, as captioned runs drew
the star), sharp and under a Gaussian blur (the toy's drawings are blurry), each read by the judge:
its mean probability that the shape is the star (what subject fidelity averages). Measured
(``bench/results/toy2_judge_small.md``): the first judge, trained on sharp renders, read small
triangles under a 2-px blur as the star (0.84) and blurry large stars as other shapes (0.48 at 3 px);
the shipped judge, trained with blur up to 3 px (session 30), reads them 0.19 and 0.98. Dots still
fool it: a circle's dot reads as the star 0.95.

Second part (``--runs``, comma-separated bench runs per group): the bench's recontext images of each
run (4 per prompt, the bench's seeds), the share the judge reads as large, and subject fidelity counted
on large drawings only. Measured with the first judge: LoRA-Dash under ``locon_masked`` (500 steps)
0.811, 45 % large, 0.39 on large drawings; under ``locon_captioned`` (750 steps) 0.811, 25 % large,
0.20 — the same subject fidelity from smaller, less trustworthy drawings.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreampeft.toy.evaluate import judge_images, load_judge  # noqa: E402
from dreampeft.toy.models import HEADS  # noqa: E402
from dreampeft.toyworld import SHAPES, render, sample_scene  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "assets" / "toy_sdxl"


def blurred_shapes(judge, subject: str = "star", n: int = 48, blurs=(0.0, 1.0, 2.0, 3.0)) -> list[str]:
    """Markdown rows: per shape, size and blur, the judge's mean probability that an orange render is
    ``subject`` (what subject fidelity averages)."""
    rng, idx = random.Random(3), HEADS["object"].index(subject)
    rows = ["| shape | size | " + " | ".join(f"blur {b:g}" for b in blurs) + " |", "|---|---|" + "---:|" * len(blurs)]
    for shape in (subject, *SHAPES):
        for size, scale in (("small", 1.0), ("large", 1.0), ("dot", 0.55)):  # a dot: 0.55× small, as captioned runs drew
            scenes = [replace(sample_scene(rng), shape=shape, colour="orange", size="small" if size == "dot" else size,
                              scale=scale) for _ in range(n)]
            scenes = [s if s.background != "orange" else replace(s, background="green") for s in scenes]
            read = []
            for b in blurs:
                images = [render(s).filter(ImageFilter.GaussianBlur(b)) if b else render(s) for s in scenes]
                read.append(float(judge_images(judge, images)["object"][:, idx].mean()))
            rows.append(f"| {shape} | {size} | " + " | ".join(f"{r:.2f}" for r in read) + " |")
    return rows


def by_size(groups: list[str], subject: str, model: Path = MODEL) -> list[str]:
    """Per group of bench runs: subject fidelity, share judged large, and ``subject_large`` (the
    bench's own ``score``: subject fidelity on drawings the judge reads as large)."""
    from dreampeft.pipeline import load_into_pipeline, unload
    from dreampeft.toy.bench import _load, generations, score

    pipe, judge = _load(model)
    large = HEADS["size"].index("large")
    lines = []
    for group in groups:
        per_run = []
        for run in group.split(","):
            load_into_pipeline(pipe, run)
            try:
                prompts, images = generations(pipe, 4)
            finally:
                unload(pipe)
            s = score(judge, images, prompts, subject)
            share = float((judge_images(judge, images)["size"].argmax(-1) == large).float().mean())
            per_run.append((s["subject"], share, s["subject_large"]))
        r = np.array(per_run)
        lines.append(f"{group.split(',')[0]} (+{len(r) - 1}): subject {r[:, 0].mean():.3f}, judged large "
                     f"{r[:, 1].mean():.2f}, subject on large drawings {r[:, 2].mean():.3f} (runs {np.round(r[:, 2], 3).tolist()})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subject", default="star")
    ap.add_argument("--model", type=Path, default=MODEL, help="a toy model folder (its judge reads)")
    ap.add_argument("--runs", nargs="*", default=[], help="groups of bench run folders, comma-separated")
    args = ap.parse_args()
    if args.runs:
        print("\n".join(by_size(args.runs, args.subject, args.model)))
    else:
        print("\n".join(blurred_shapes(load_judge(args.model), args.subject)))


if __name__ == "__main__":
    main()
