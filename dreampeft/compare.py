"""Compare methods on one subject: same images, seed and step budget; same prompts and seeds.

    python -m dreampeft.compare [--pretrained_model_name_or_path M] --instance_data_dir dog/ \\
        --instance_prompt "a photo of sks dog" --subject "sks dog" --methods lora,lora_dash,fourierft,mora \\
        --max_train_steps 500 --out compare/

Writes ``compare/<method>/`` (each run), ``compare/images/<row>/`` (generations with their
prompts), ``grid.png`` (rows: base model and each method; columns: prompts), ``results.json`` and
``results.md`` (trainable parameters, file size, train time, peak memory, DINO, CLIP-I, CLIP-T,
and on the toy model its judge's DINO-style similarity, which works offline). With ``--eval_steps N``
each run also measures fidelity along training: ``fidelity.png`` (each method's curves, its chosen
step starred), ``pareto.png`` (subject vs prompt fidelity over every evaluation, one colour per
method) and, in the tables, each method at its own best step and at the common last step.
Peak memory is the CUDA allocator's peak per method on GPU; on CPU it is the process's max RSS so
far, which only grows, so read it as an upper bound there.
Prompts: ``--prompts "a,b"``, or the 25 DreamBooth prompts for ``--subject`` (``--live`` for pets).
``--scale S`` generates with every adapter at strength S (the LoRA weight of A1111/ComfyUI; on the toy
LoRA at 0.5 kept the star with 0.95× the base's prompt fidelity where 1 kept 0.81×: README).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from .adapters import METHODS, ConfigError
from .dreambooth import DreamBoothConfig, DreamBoothError, train
from .dreambooth.data import scan_folder
from .eval import DEFAULT_CLIP, DEFAULT_DINO, EvalError, FidelityScorer, evaluation_prompts
from .pipeline import check_scale, load_into_pipeline, unload
from .presets import RESOLUTION, method_preset, parse_methods, preset_of
from .toy import TOY_MODEL
from .toy.evaluate import find_judge, is_toy, judge_object_agreement, judge_similarity
from .utils import image_grid, quiet_libraries



def generate(pipe, prompts: list[str], folder: Path, cfg: DreamBoothConfig, steps: int) -> list[Image.Image]:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, prompt in enumerate(prompts):  # the same seed per column, for every row
        image = pipe(prompt, num_inference_steps=steps, height=cfg.resolution, width=cfg.resolution,
                     generator=torch.Generator().manual_seed(cfg.seed + i)).images[0]
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(prompt + "\n")
        images.append(image)
    return images


def compare(base: DreamBoothConfig, methods: list[str], prompts: list[str], out: Path,
            lrs: dict[str, float], scorer: FidelityScorer | None, steps: int, scale: float = 1.0) -> dict:
    from .dreambooth.models import build_pipeline, load_parts

    real = [e.image for e in scan_folder(base.instance_data_dir, base.instance_prompt, "--instance_data_dir")]
    results = {"base": {}}
    for method in methods:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        # the model's preset: on the toy, its measured rates and FourierFT's zeros start, not SDXL's
        spec = method_preset(preset_of(base.pretrained_model_name_or_path), method)
        cfg = DreamBoothConfig(**{**base.to_dict(), "adapter": method, "adapter_options": dict(spec.options),
                                  "learning_rate": lrs.get(method, spec.lr), "overwrite_output_dir": True,
                                  "output_dir": str(out / method), "events": str(out / method / "events.jsonl")})
        (out / method / "events.jsonl").unlink(missing_ok=True)
        t0 = time.perf_counter()
        result = train(cfg)
        results[method] = {"trainable": result.trainable, "train_s": time.perf_counter() - t0,
                           "peak_mib": result.peak_memory_mb, "file_kib": result.adapter.stat().st_size / 1024,
                           **_along_training(result)}
    pipe = build_pipeline(base, load_parts(base))
    rows = {"base": generate(pipe, prompts, out / "images" / "base", base, steps)}
    for method in methods:
        load_into_pipeline(pipe, out / method, scale=scale)
        rows[method] = generate(pipe, prompts, out / "images" / method, base, steps)
        unload(pipe)
    image_grid(list(rows.values())).save(out / "grid.png")
    judge = find_judge(base.pretrained_model_name_or_path)
    for row, images in rows.items():
        entry = results.setdefault(row, {})
        if scorer is not None:
            entry.update({k: v for k, v in scorer.score(real, images, prompts).items()
                          if k in ("dino", "clip_i", "clip_t")})
        if judge is not None:
            entry["toy_judge"] = judge_similarity(judge, real, images)
            entry["toy_object"] = judge_object_agreement(judge, real, images)
    return results


def _along_training(result) -> dict:
    if not result.fidelity:
        return {}
    best = next(r for r in result.fidelity if r["step"] == result.exported_step)
    last = result.fidelity[-1]
    return {"fidelity": result.fidelity, "best_step": result.exported_step, "best_subject": best["subject"],
            "best_prompt": best["prompt"], "last_subject": last["subject"], "last_prompt": last["prompt"]}


def fidelity_plots(results: dict, out: Path) -> list[Path]:
    """``fidelity.png`` and ``pareto.png`` over the methods that measured fidelity along training."""
    from .dreambooth.plots import fidelity_plot, pareto_plot

    runs = {m: r["fidelity"] for m, r in results.items() if r.get("fidelity")}
    if not runs:
        return []
    chosen = {m: results[m]["best_step"] for m in runs}
    return [fidelity_plot(runs, out / "fidelity.png", chosen), pareto_plot(runs, out / "pareto.png", chosen)]


def write_tables(results: dict, out: Path, prompts: list[str], scale: float = 1.0) -> str:
    (out / "results.json").write_text(json.dumps({"prompts": prompts, "scale": scale, "results": results},
                                                 indent=1) + "\n")
    cols = [("trainable", "{:,}"), ("file_kib", "{:.1f}"), ("train_s", "{:.1f}"), ("peak_mib", "{:.0f}"),
            ("dino", "{:.4f}"), ("clip_i", "{:.4f}"), ("clip_t", "{:.4f}"), ("toy_judge", "{:.4f}"),
            ("toy_object", "{:.4f}"), ("best_step", "{}"), ("best_subject", "{:.3f}"), ("best_prompt", "{:.3f}"),
            ("last_subject", "{:.3f}"), ("last_prompt", "{:.3f}")]
    lines = ["| method | trainable | file KiB | train s | peak MiB | DINO | CLIP-I | CLIP-T | toy judge | toy object | best step "
             "| subject (best) | prompt (best) | subject (last) | prompt (last) |", "|---|" + "---:|" * len(cols)]
    for row, r in results.items():
        lines.append(f"| {row} | " + " | ".join(fmt.format(r[k]) if k in r else "–" for k, fmt in cols) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    return table


def _scorer(args) -> FidelityScorer | None:
    """DINO/CLIP; offline on the toy model, its judge alone scores (with a note saying so)."""
    try:
        return FidelityScorer(args.dino_model, args.clip_model)
    except EvalError as exc:
        if not is_toy(args.pretrained_model_name_or_path):
            raise
        print(f"note: DINO/CLIP unavailable ({exc}); scoring with the toy judge only", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dreampeft.compare", description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default=str(TOY_MODEL),
                   help="SDXL hub id or folder (default: the offline toy model, scored by its judge too)")
    p.add_argument("--instance_data_dir", required=True)
    p.add_argument("--instance_prompt", required=True)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated registered methods")
    p.add_argument("--learning_rates", default="", help="per method, e.g. lora=1e-4,fourierft=5e-2 "
                   "(default: the model's preset in dreampeft.presets)")
    p.add_argument("--max_train_steps", type=int, default=500)
    p.add_argument("--resolution", type=int, help="default: the model's preset (64 on the toy, else 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", help="comma-separated prompts (default: the DreamBooth prompts for --subject)")
    p.add_argument("--subject", help="e.g. 'sks dog': selects the 25 DreamBooth evaluation prompts")
    p.add_argument("--live", action="store_true", help="use the live-subject prompt list")
    p.add_argument("--inference_steps", type=int, default=25)
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength when generating, -4 to 4 "
                   "(the LoRA weight; 1 = as trained, 0 = the base)")
    p.add_argument("--eval_steps", type=int, default=0, help="measure fidelity every N steps of each run "
                   "(curves, Pareto plot, best step per method; 0: off)")
    p.add_argument("--dino_model", default=DEFAULT_DINO)
    p.add_argument("--clip_model", default=DEFAULT_CLIP)
    p.add_argument("--no_metrics", action="store_true", help="skip DINO/CLIP scoring")
    p.add_argument("--out", default="compare")
    args = p.parse_args(argv)
    quiet_libraries()
    try:
        prompts = ([s.strip() for s in args.prompts.split(",") if s.strip()] if args.prompts
                   else evaluation_prompts(args.subject, args.live) if args.subject else None)
        if not prompts:
            raise ConfigError("give --prompts or --subject (for the DreamBooth prompts)")
        check_scale(args.scale, "--scale")
        methods = parse_methods(args.methods)
        try:
            lrs = {k: float(v) for k, v in (kv.split("=") for kv in args.learning_rates.split(",") if kv)}
        except ValueError:
            raise ConfigError(f"--learning_rates {args.learning_rates!r}: write method=rate pairs, e.g. "
                              "lora=1e-4,fourierft=1e-2") from None
        parse_methods(",".join(lrs) or ",".join(METHODS), "--learning_rates")
        base = DreamBoothConfig(
            pretrained_model_name_or_path=args.pretrained_model_name_or_path,
            instance_data_dir=args.instance_data_dir, instance_prompt=args.instance_prompt,
            max_train_steps=args.max_train_steps, seed=args.seed, eval_steps=args.eval_steps,
            dino_model=args.dino_model, clip_model=args.clip_model, inference_steps=args.inference_steps,
            resolution=args.resolution or RESOLUTION[preset_of(args.pretrained_model_name_or_path)])
        scorer = None if args.no_metrics else _scorer(args)
        out = Path(args.out)
        results = compare(base, methods, prompts, out, lrs, scorer, args.inference_steps, args.scale)
    except (ConfigError, DreamBoothError, EvalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(write_tables(results, out, prompts, args.scale))
    for plot in fidelity_plots(results, out):
        print(f"{plot.stem} → {plot}")
    print(f"grid (rows: base, {', '.join(methods)}{f'; adapters at ×{args.scale:g}' if args.scale != 1 else ''}) "
          f"→ {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
