"""``python -m dreampeft.toy bench``: DreamBooth on subjects the toy model has never seen, every
method with the same seed, steps and images, measured by the judge.

Subjects (``toyworld.SUBJECTS``): an orange star (a new shape) and a red-and-white striped ball (a
new surface pattern), 5 instance images each on white/gray/blue/striped backgrounds. After
training on "a sks object", each method draws held-out recontext prompts — backgrounds, corners
and sizes its instance images never showed — and the judge reads every image:

* subject fidelity: the judge's probability that the object is the subject (base model: ~0);
* prompt fidelity: the share of the attributes a prompt asks for (background, position, size) that
  the judge reads off the image;
* subject fidelity on the training prompt itself (``instance``): whether the subject was learnt at
  all, as opposed to learnt but not carried into new prompts;
* drift: the object accuracy on 60 full world captions ("a red circle on a blue background ...",
  ``evaluate.prompt_following``; the base 0.55): how many of its shape words the model kept. A
  model that draws the subject for every prompt loses them, which prompt fidelity (backgrounds,
  corners, sizes) does not see.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..dreambooth import DreamBoothConfig, train
from ..dreambooth.plots import method_pareto
from ..presets import RESOLUTION, TOY, method_preset
from ..toyworld import SUBJECTS, instance_caption, instance_tags, object_mask, render, subject_scenes
from ..utils import image_grid
from .evaluate import attribute_hits, generate, judge_images, prompt_following
from .models import HEADS
from .recipe import DEFAULT_STEPS, class_images_if_needed, recipe_config, recipe_steps, with_paths

INSTANCE_PROMPT = "a sks object"
# 300 steps with the text encoders adapted too: "sks" and "object" mean nothing to the toy's encoders.
# Measured with LoRA on the star (4 seeds, base 0.25): UNet only 0.23 at 300 steps, 0.35 at 600 (r 8);
# with the encoders 0.49 at 300, 0.37 at 600 (instance backgrounds start to leak into other prompts).
BENCH_STEPS = DEFAULT_STEPS  # the plain, prior and full recipes' (recipe.py)
DRIFT_CAPTIONS = 60  # world captions per drift measurement: ~14 s a run here; sd of a share ≈ 0.06
RECONTEXT = {  # prompt → the attributes it asks for
    "a sks object on a green background": {"background": "green"},
    "a sks object on a black background": {"background": "black"},
    "a sks object on a checkered background": {"background": "checkered"},
    "a small sks object in the top left corner": {"size": "small", "position": "top left"},
    "a large sks object in the bottom right corner": {"size": "large", "position": "bottom right"},
}


def write_subject(subject: str, folder: Path, n: int = 5, captions: tuple[str, ...] = (), tags: bool = False) -> Path:
    """The subject's ``n`` instance images; ``captions``: the attributes (``toyworld.ATTRIBUTES``) that
    each image's ``instance_caption`` (``tags``: ``instance_tags``), written beside it as ``NAME.txt``
    (which the trainer reads instead of the instance prompt), names; none: no caption files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(subject_scenes(subject, n)):
        render(scene).save(folder / f"{subject}-{i}.png")
        caption = folder / f"{subject}-{i}.txt"
        if captions:
            words = (instance_tags if tags else instance_caption)(scene, INSTANCE_PROMPT.removeprefix("a "), captions)
            caption.write_text(words + "\n")
        else:
            caption.unlink(missing_ok=True)
    return folder


def write_masks(subject: str, folder: Path, n: int = 5) -> Path:
    """The instance images' object silhouettes (``--mask_dir``: same names, white = subject)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(subject_scenes(subject, n)):
        object_mask(scene).save(folder / f"{subject}-{i}.png")
    return folder


def train_subject(model: str, subject_dir: Path, method: str, out: Path, steps: int, seed: int = 0,
                  lr: float | None = None, **options) -> dict:
    """``options``: further DreamBoothConfig fields (masked loss, caption dropout, EMA, ...);
    ``adapter_options`` among them override the toy preset's method options."""
    spec = method_preset(TOY, method)
    adapter_options = {**spec.options, **options.pop("adapter_options", {})}
    cfg = DreamBoothConfig(
        pretrained_model_name_or_path=str(model), instance_data_dir=str(subject_dir),
        instance_prompt=INSTANCE_PROMPT, output_dir=str(out), adapter=method, adapter_options=adapter_options,
        learning_rate=lr or spec.lr, resolution=RESOLUTION[TOY], max_train_steps=steps,
        seed=seed, export_rank=8, overwrite_output_dir=True, **{"train_batch_size": 2, "train_text_encoder": True, **options})
    t0 = time.perf_counter()
    result = train(cfg)
    later = result.step_seconds[1:] or result.step_seconds  # the first step pays for warm-up
    return {"trainable": result.trainable, "train_s": time.perf_counter() - t0,
            "step_ms": 1000 * sum(later) / len(later)}


def score(judge, images: list, prompts: list[str], subject: str) -> dict:
    """Subject fidelity and prompt fidelity (see the module docstring) of images for prompts, and
    ``subject_large``: subject fidelity counting only the drawings the judge reads as large (a small
    drawing scores 0). A small blurry drawing says little about its shape (the first judge read small
    triangles under a 2-px blur as the star, 0.84; the shipped one, trained with blur, 0.19, but an
    orange dot of any shape still ~0.5–0.95: ``bench/toy_judge_small.py``); ``subject_large``
    cannot be earned with dots."""
    probs = judge_images(judge, images)
    subject_p = probs["object"][:, HEADS["object"].index(subject)]
    large = (probs["size"].argmax(-1) == HEADS["size"].index("large")).float()
    hits = attribute_hits(probs, [RECONTEXT.get(p, {}) for p in prompts])
    return {"subject": float(subject_p.mean()), "subject_top1": float((subject_p > 0.5).float().mean()),
            "subject_large": float((subject_p * large).mean()),
            "prompt": float(np.mean(hits)) if hits else float("nan")}


def generations(pipe, seeds: int) -> tuple[list[str], list]:
    prompts = [p for p in RECONTEXT for _ in range(seeds)]
    return prompts, generate(pipe, prompts, seed=0)


def draw(pipe, judge, seeds: int, drift: int = DRIFT_CAPTIONS) -> tuple[list[str], list, list, float | None]:
    """The recontext prompts, their images, ``seeds`` images of the training prompt itself, and the
    drift over ``drift`` world captions (module docstring; None when 0)."""
    kept = prompt_following(pipe, judge, n=drift)["object"] if drift else None
    return *generations(pipe, seeds), generate(pipe, [INSTANCE_PROMPT] * seeds, seed=0), kept


def judged(judge, drawn: tuple[list[str], list, list, float | None], subject: str) -> dict:
    """Scores of ``draw``'s recontext images plus ``instance``, the subject fidelity of its images of
    the training prompt, and its drift when drawn."""
    prompts, images, own, drift = drawn
    return {**score(judge, images, prompts, subject),
            "instance": score(judge, own, [INSTANCE_PROMPT] * len(own), subject)["subject"],
            **({"drift": drift} if drift is not None else {})}


def _load(model_dir):
    from diffusers import StableDiffusionXLPipeline

    from .evaluate import load_judge

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_judge(model_dir)


def _learn(pipe, judge, model_dir, folder: Path, subject: str, method: str, run: Path, steps: int, seeds: int,
           lr: float | None = None, seed: int = 0, drift: int = DRIFT_CAPTIONS, **options) -> tuple[dict, list]:
    """Train one method on one subject, draw the recontext prompts with it, score: (stats, images)."""
    from ..pipeline import load_into_pipeline, unload

    stats = train_subject(model_dir, folder, method, run, steps, seed=seed, lr=lr, **options)
    load_into_pipeline(pipe, run)
    try:
        drawn = draw(pipe, judge, seeds, drift)
    finally:
        unload(pipe)
    return {**stats, **judged(judge, drawn, subject)}, drawn[1]


def _prepare(pipe, subject: str, recipe: str, out: Path, overrides: dict | None = None) -> tuple[Path, dict]:
    """A subject's instance folder under ``out`` and the trainer options of ``recipe`` (and
    ``overrides``) for it (its masks; the class images, drawn once per ``out`` and shared by every subject)."""
    config = recipe_config(recipe, overrides)
    class_dir = class_images_if_needed(pipe, out / "class", config)
    options = with_paths(config, class_dir, write_masks(subject, out / "masks" / subject))
    captions, tags = tuple(config.get("instance_captions", ())), bool(config.get("instance_tags"))
    # one instance folder per caption design, so benches of several recipes in one --out never share one
    folder = out / "-".join(["subjects", *captions, *(["tags"] if tags and captions else [])]) / subject
    return write_subject(subject, folder, captions=captions, tags=tags), options


def check_recipe(recipe: str, methods: list[str], overrides: dict | None = None) -> None:
    """Refuse, before anything trains, a recipe whose targets a method cannot adapt (``locon``'s
    convolutions: ``conv_methods`` only)."""
    from ..adapters.base import conv_methods, conv_methods_text, conv_targets

    convs = conv_targets(recipe_config(recipe, overrides).get("unet_target_modules", []))
    refused = [m for m in methods if m not in conv_methods()] if convs else []
    if refused:
        raise ValueError(f"recipe {recipe} adapts the resnets' convolutions ({', '.join(convs[:2])}, …), which "
                         f"only {conv_methods_text('and')} can: drop {', '.join(refused)} from --methods")


def run_bench(model_dir: str | Path, out: str | Path, methods: list[str], steps: int | None = None,
              seeds: int = 4, subjects: list[str] | None = None, train_seeds: int = 1, recipe: str = "prior",
              drift: int = DRIFT_CAPTIONS, lr_factor: float = 1.0, overrides: dict | None = None,
              log=print) -> dict:
    """Train every method on every subject ``train_seeds`` times with ``recipe`` and ``overrides``
    on it (``recipe.parse_overrides``; each at its toy preset's rate times ``lr_factor``), generate the
    recontext prompts (``seeds`` images each), score; write ``results.json``, ``results.md``,
    ``grid.png`` (first training seed) and ``pareto-SUBJECT.png`` into ``out``. ``steps``: by default
    the recipe's (``recipe.STEPS``, else BENCH_STEPS); ``drift``: world captions per drift measurement
    (0: none)."""
    out, steps = Path(out), recipe_steps(recipe, steps)
    check_recipe(recipe, methods, overrides)
    pipe, judge = _load(model_dir)
    base = draw(pipe, judge, seeds, drift)  # the base's images, scored against each subject
    results, grid = {}, []
    subjects = subjects or list(SUBJECTS)
    for subject in subjects:
        folder, options = _prepare(pipe, subject, recipe, out, overrides)
        results[f"base/{subject}"] = judged(judge, base, subject)
        grid.append([render(s) for s in subject_scenes(subject, 5)])
        grid.append(base[1][::seeds])
        for method in methods:
            runs = []
            for seed in range(train_seeds):
                r, images = _learn(pipe, judge, model_dir, folder, subject, method,
                                   out / "runs" / f"{subject}-{method}-{seed}", steps, seeds,
                                   method_preset(TOY, method).lr * lr_factor, seed=seed, drift=drift, **options)
                runs.append(r)
                grid += [images[::seeds]] if seed == 0 else []
                log(f"{subject} {method} seed {seed}: subject {r['subject']:.3f} (own prompt {r['instance']:.3f}), "
                    f"prompt {r['prompt']:.3f}, {r['train_s']:.0f} s")
            results[f"{method}/{subject}"] = summarise(runs)
        method_pareto({row: results[f"{row}/{subject}"] for row in ["base", *methods]}, subject,
                      out / f"pareto-{subject}.png")
    image_grid(grid).save(out / "grid.png")
    (out / "results.json").write_text(json.dumps(
        {"steps": steps, "seeds": seeds, "train_seeds": train_seeds, "recipe": recipe, "drift_captions": drift,
         "lr_factor": lr_factor, "overrides": overrides or {},
         "recipe_options": recipe_config(recipe, overrides), "prompts": list(RECONTEXT), "results": results},
        indent=1) + "\n")
    (out / "results.md").write_text(results_table(results, ["base", *methods], subjects) + "\n")
    return results


def summarise(runs: list[dict]) -> dict:
    """One cell from its training seeds: means, their sample standard deviation (``*_sd``; 0 for
    one seed) and the runs themselves."""
    cell = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    for k in [k for k in ("subject", "subject_large", "prompt", "instance", "drift") if k in runs[0]]:
        cell[f"{k}_sd"] = float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0
    if "trainable" in runs[0]:  # a count, not a measurement: every seed's is the same
        cell["trainable"] = runs[0]["trainable"]
    return {**cell, "runs": runs}


def sweep_lr(model_dir: str | Path, out: str | Path, methods: list[str], factors=(0.25, 0.5, 1.0, 2.0, 4.0),
             steps: int | None = None, seeds: int = 2, subject: str = "cross", recipe: str = "prior",
             option_grid: dict[str, list] | None = None, train_seeds: int = 1, overrides: dict | None = None,
             log=print) -> dict:
    """Each method at its toy preset's rate times each factor — and, for the methods that have it,
    each value of one adapter option in ``option_grid`` (e.g. FourierFT's scaling) — on one subject
    (by default the tuning subject, never a reported one), ``train_seeds`` runs each: subject and
    prompt fidelity per setting (mean ± sd over the runs; ``recipe`` with ``overrides``), written
    to ``sweep.json``/``sweep.md``.
    Returns the setting with the best mean subject + prompt fidelity per method ({"lr", "options"}):
    what the toy preset in ``dreampeft.presets`` should hold."""
    out, steps = Path(out), recipe_steps(recipe, steps)
    check_recipe(recipe, methods, overrides)
    pipe, judge = _load(model_dir)
    folder, options = _prepare(pipe, subject, recipe, out, overrides)
    base = judged(judge, draw(pipe, judge, seeds, drift=0), subject)  # what any setting must beat
    rows = []
    for method in methods:
        key, values = next(iter((option_grid or {None: [None]}).items()))
        variants = [{key: v} for v in values] if key in method_preset(TOY, method).options else [{}]
        for f in factors:
            for variant in variants:
                lr = method_preset(TOY, method).lr * f
                name = f"{method}-{lr:g}" + "".join(f"-{k}{v:g}" for k, v in variant.items())
                runs = []
                for seed in range(train_seeds):  # one run keeps the folder names of single-run sweeps
                    run = out / "runs" / (name if train_seeds == 1 else f"{name}-seed{seed}")
                    r, _ = _learn(pipe, judge, model_dir, folder, subject, method, run, steps, seeds, lr,
                                  seed=seed, drift=0, adapter_options=variant, **options)
                    runs.append(r)
                    log(f"{run.name}: subject {r['subject']:.3f}, prompt {r['prompt']:.3f}")
                rows.append({"method": method, "lr": lr, "options": variant, **summarise(runs)})
    best = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["subject"] + r["prompt"]) for m in methods}
    lines = ["| method | lr | options | subject | own prompt | prompt |", "|---|---:|---|---:|---:|---:|",
             f"| base | – | – | {base['subject']:.3f} | {base['instance']:.3f} | {base['prompt']:.3f} |"]
    lines += [f"| {r['method']} | {r['lr']:g}{' (best)' if best[r['method']] is r else ''} | "
              f"{', '.join(f'{k}={v:g}' for k, v in r['options'].items()) or '–'} | {mean_sd(r, 'subject')} | "
              f"{mean_sd(r, 'instance')} | {mean_sd(r, 'prompt')} |" for r in rows]
    best = {m: {"lr": r["lr"], "options": r["options"]} for m, r in best.items()}
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.json").write_text(json.dumps({"subject": subject, "steps": steps, "seeds": seeds, "recipe": recipe,
                                                "overrides": overrides or {},
                                                "train_seeds": train_seeds, "base": base, "best": best, "runs": rows},
                                               indent=1) + "\n")
    return best


def mean_sd(cell: dict, key: str) -> str:
    """A summarised cell's ``key`` as "mean ± sd" (the mean alone for a single run)."""
    return f"{cell[key]:.3f}" + (f" ± {cell[key + '_sd']:.3f}" if len(cell.get("runs", [])) > 1 else "")


def results_table(results: dict, rows: list[str], subjects: list[str] | None = None) -> str:
    """Markdown: per method the trainable parameters, step time, subject fidelity per subject on the
    recontext prompts, the same on drawings judged large (``score``; "–" in benches from before it),
    on the training prompt ("own prompt"), prompt fidelity and drift (shape words kept), as mean ± sd
    over training seeds where there were several."""
    subjects = subjects or list(SUBJECTS)
    head = ("| method | trainable | step ms | " + " | ".join(f"subject: {s}" for s in subjects)
            + " | subject (mean) | " + " | ".join(f"on large: {s}" for s in subjects) + " | "
            + " | ".join(f"own prompt: {s}" for s in subjects) + " | "
            + " | ".join(f"prompt: {s}" for s in subjects) + " | "
            + " | ".join(f"drift: {s}" for s in subjects) + " |")
    lines = [head, "|---|" + "---:|" * (3 + 5 * len(subjects))]
    for row in rows:
        r = [results[f"{row}/{s}"] for s in subjects]
        trainable = f"{r[0]['trainable']:,}" if "trainable" in r[0] else "–"
        step = f"{np.mean([x['step_ms'] for x in r]):.0f}" if "step_ms" in r[0] else "–"
        lines.append(f"| {row} | {trainable} | {step} | {' | '.join(mean_sd(x, 'subject') for x in r)} | "
                     f"{np.mean([x['subject'] for x in r]):.3f} | "
                     f"{' | '.join(mean_sd(x, 'subject_large') if 'subject_large' in x else '–' for x in r)} | "
                     f"{' | '.join(mean_sd(x, 'instance') for x in r)} | "
                     f"{' | '.join(mean_sd(x, 'prompt') for x in r)} | "
                     f"{' | '.join(mean_sd(x, 'drift') if 'drift' in x else '–' for x in r)} |")
    return "\n".join(lines)
