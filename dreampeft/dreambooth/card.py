"""The model card (README.md) written into a run's output folder."""

from __future__ import annotations

import json
from pathlib import Path

from .config import DreamBoothConfig


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _training_lines(cfg: DreamBoothConfig, buckets: list) -> list[str]:
    lines = []
    if len(buckets) > 1:
        lines.append("- Aspect buckets: " + ", ".join(f"{w}×{h}" for w, h in buckets))
    if cfg.masked_loss:
        lines.append(f"- Masked loss ({'masks from ' + cfg.mask_dir if cfg.mask_dir else 'alpha channels'}; "
                     f"background weight {cfg.mask_background_weight})")
    if cfg.caption_dropout_rate:
        lines.append(f"- Caption dropout {cfg.caption_dropout_rate}")
    if cfg.caption_tag_dropout_rate or cfg.shuffle_caption:
        done = [f"tag dropout {cfg.caption_tag_dropout_rate}"] if cfg.caption_tag_dropout_rate else []
        done += ["shuffled"] if cfg.shuffle_caption else []
        lines.append(f"- Caption tags after the first {cfg.keep_tokens}: {', '.join(done)}")
    if cfg.repeats > 1:
        lines.append(f"- Each image {cfg.repeats}× per epoch")
    if cfg.train_text_encoder and cfg.train_text_encoder_frac < 1:
        lines.append(f"- Text-encoder adapters trained for the first {cfg.train_text_encoder_frac:.0%} of the steps")
    if cfg.use_ema:
        lines.append(f"- Weights: exponential moving average (decay {cfg.ema_decay}); the optimizer's own "
                     "weights are in `training_weights/`")
    return lines


def _fidelity_lines(rows: list[dict], exported: tuple | None) -> list[str]:
    if not rows:
        return []
    step, why = exported or (None, "")
    lines = ["## Fidelity along training", "",
             f"The files hold the weights of **step {step}**: {why}.", "", "![](fidelity.png)", "",
             "| step | subject | prompt | drift | score |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['step']}{' ★' if r['step'] == step else ''} | {r['subject']:.3f} | {r['prompt']:.3f} | "
              f"{r['drift']:.3f} | {r['score']:+.3f} |" for r in rows]
    seconds = sum(r["seconds"] for r in rows)
    return lines + ["", f"{len(rows)} evaluations took {seconds:.1f} s in all ({seconds / len(rows):.1f} s each).",
                    ""]


def write_model_card(out: Path, cfg: DreamBoothConfig, trainable: int, steps: int, report: dict,
                     images: list[str], run_dir: Path | None = None, buckets: list | None = None,
                     fidelity: list | None = None, exported: tuple | None = None) -> Path:
    """``out/README.md``; image links are relative to ``run_dir`` (default ``out``), where the card
    will finally live."""
    run_dir = run_dir or out
    files = sorted(p for p in out.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    errors = "\n".join(
        f"| {c} | {r['method']} | {'exact' if r['exact'] else 'truncated SVD'} | {', '.join(map(str, r['ranks']))} "
        f"| {r['overall_rel_error']:.4f} | {1 - r['overall_rel_error'] ** 2:.1%} | {r['max_layer_rel_error']:.4f} |"
        for c, r in report["components"].items())
    lossy = any(not r["exact"] for r in report["components"].values())
    options = json.dumps(cfg.adapter_config("unet").to_dict(), indent=2)
    # The hub's front matter for LoRA repositories, so the card is indexed like diffusers' and
    # kohya's (JSON strings are valid YAML scalars, so prompts with quotes or colons stay intact).
    tags = ["text-to-image", "diffusers", "lora", "dreambooth", "dreampeft", cfg.adapter,
            "stable-diffusion-xl", "template:sd-lora"]
    front = ["---", f"base_model: {json.dumps(cfg.pretrained_model_name_or_path)}", "library_name: diffusers",
             f"instance_prompt: {json.dumps(cfg.instance_prompt)}", "tags:", *[f"- {t}" for t in tags], "---", ""]
    lines = [
        *front,
        f"# {cfg.adapter} adapter for {cfg.pretrained_model_name_or_path}", "",
        f"DreamBooth with dreampeft: **{cfg.adapter}**, {steps} steps, {trainable:,} trainable parameters"
        f"{' (UNet and both text encoders)' if cfg.train_text_encoder else ' (UNet)'}.", "",
        f"- Trigger prompt: `{cfg.instance_prompt}`",
        f"- Base model: `{cfg.pretrained_model_name_or_path}`",
        f"- Resolution {cfg.resolution}, learning rate {cfg.learning_rate}, seed {cfg.seed}"
        + (f", prior preservation with `{cfg.class_prompt}`" if cfg.with_prior_preservation else ""),
        *_training_lines(cfg, buckets or []), "",
        *_fidelity_lines(fidelity or [], exported),
        "## Files", "", *[f"- `{p.name}` ({_size(p)})" for p in files], "",
        "## Export to the diffusers LoRA format", "",
        "| component | method | export | ranks | overall rel. error | energy kept | worst layer |",
        "|---|---|---|---|---:|---:|---:|", errors, "",
        *(["The diffusers file keeps the share of ‖ΔW‖² above; exact for every method: the native file "
           "(`dp.load_into_pipeline`), `python -m dreampeft.export THIS_FOLDER --to merged` and, for "
           "A1111/ComfyUI, `--to kohya_diff` (whole weight differences, the size of the adapted weights).",
           ""] if lossy else []),
        "## How to load", "", "```python",
        "import torch",
        "from diffusers import StableDiffusionXLPipeline",
        f"pipe = StableDiffusionXLPipeline.from_pretrained({cfg.pretrained_model_name_or_path!r},",
        "                                                 torch_dtype=torch.float32)  # float16 on a GPU",
        "pipe.load_lora_weights('THIS_FOLDER')          # diffusers (pytorch_lora_weights.safetensors)",
        "# or, exact for every method:",
        "import dreampeft as dp",
        "dp.load_into_pipeline(pipe, 'THIS_FOLDER', scale=1.0)",
        "```", "",
        "A1111 / ComfyUI: `python -m dreampeft.export THIS_FOLDER --to kohya --out .` "
        "(or train with `--extra_exports kohya`); exact for every method, larger: `--to kohya_diff`. "
        "A full checkpoint with the update fused in:",
        "`python -m dreampeft.export THIS_FOLDER --to merged --out merged/`.", "",
        "## Method options", "", "```json", options, "```", "",
        *(["## Validation images", "", *[f"![]({Path(i).relative_to(run_dir)})" for i in images], ""] if images else []),
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
