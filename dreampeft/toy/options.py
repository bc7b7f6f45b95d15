"""``python -m dreampeft.toy options``: what masked loss, caption dropout and EMA do to subject and
prompt fidelity on the toy, per method, over training seeds (issue 15's measurement).

Each variant is the bench's recipe (``bench.train_subject``: 300 steps, text encoders trained, the
toy preset's rate) plus the option(s) named; every run draws the bench's recontext prompts and the
judge scores them. Results: ``options.json`` and ``options.md`` (mean ± standard deviation over the
training seeds) in ``--out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..toyworld import SUBJECTS
from .bench import BENCH_STEPS, _learn, _load, mean_sd, summarise, write_masks, write_subject
from .recipe import RECIPES, class_images_if_needed, with_paths

VARIANTS = {  # name → DreamBoothConfig fields on top of the bench recipe (mask_dir is filled in)
    "plain": {},
    "masked loss": {"masked_loss": True},
    "caption dropout 0.1": {"caption_dropout_rate": 0.1},
    "EMA 0.999": {"use_ema": True, "ema_decay": 0.999},
    "all three": {"masked_loss": True, "caption_dropout_rate": 0.1, "use_ema": True, "ema_decay": 0.999},
    "prior recipe": RECIPES["prior"],  # prior preservation on the base's captioned images + caption dropout
}


def option_study(model_dir: str | Path, out: str | Path, methods: list[str], train_seeds: int = 2,
                 steps: int = BENCH_STEPS, seeds: int = 4, subjects: list[str] | None = None,
                 variants: list[str] | None = None, log=print) -> dict:
    out = Path(out)
    pipe, judge = _load(model_dir)
    chosen = {name: VARIANTS[name] for name in variants or VARIANTS}
    class_dir = class_images_if_needed(pipe, out / "class", *chosen.values())
    rows: dict[tuple, list] = {}
    for subject in subjects or list(SUBJECTS):
        folder = write_subject(subject, out / "subjects" / subject)
        masks = write_masks(subject, out / "masks" / subject)
        for method in methods:
            for name, options in chosen.items():
                options = with_paths(options, class_dir, masks)
                for seed in range(train_seeds):
                    t0 = time.perf_counter()
                    run = out / "runs" / f"{subject}-{method}-{name.replace(' ', '_')}-{seed}"
                    r, _ = _learn(pipe, judge, model_dir, folder, subject, method, run, steps, seeds,
                                  seed=seed, drift=0, **options)
                    rows.setdefault((subject, method, name), []).append(r)
                    log(f"{subject} {method} {name} seed {seed}: subject {r['subject']:.3f}, prompt "
                        f"{r['prompt']:.3f}, step {r['step_ms']:.0f} ms ({time.perf_counter() - t0:.0f} s)")
    (out / "options.json").write_text(json.dumps(
        {"steps": steps, "seeds": seeds, "train_seeds": train_seeds, "variants": chosen,
         "runs": [{"subject": s, "method": m, "variant": v, "seed": i, **r}
                  for (s, m, v), rs in rows.items() for i, r in enumerate(rs)]}, indent=1) + "\n")
    (out / "options.md").write_text(options_table(rows) + "\n")
    return rows


def options_table(rows: dict) -> str:
    lines = ["| subject | method | variant | subject fidelity | prompt fidelity | step ms |",
             "|---|---|---|---:|---:|---:|"]
    for (subject, method, name), rs in rows.items():
        cell = summarise(rs)
        lines.append(f"| {subject} | {method} | {name} | {mean_sd(cell, 'subject')} | "
                     f"{mean_sd(cell, 'prompt')} | {cell['step_ms']:.0f} |")
    return "\n".join(lines)
