"""Offline demo (`make demo`): DreamBooth with every adapter method on a tiny SDXL, end to end.

For each method: train on the bundled subject images (``assets/subject``) through the real
trainer, reload the saved adapter into a fresh ``StableDiffusionXLPipeline.from_pretrained`` of
the model folder, generate with fixed seeds, then write an image grid (rows: base model and each
method; columns: prompts) and print a summary table. No download: the tiny SDXL is built locally.

The tiny model has random weights, so its images are noise: the demo shows that the whole path
runs (train → save → reload → generate) and what each method costs, not subject fidelity.

    python -m dreampeft.demo [--out demo_out] [--steps 30] [--methods lora,mora]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

import dreampeft as dp
from dreampeft.dreambooth import DreamBoothConfig, train
from dreampeft.dreambooth.events import read_events
from dreampeft.tiny import ASSETS, save_tiny_sdxl
from dreampeft.utils import image_grid, quiet_libraries

SUBJECT = ASSETS / "subject"
PROMPTS = ["a photo of sks toy", "a sks toy on a green background"]
# Per-method settings for a 30-step demo; FourierFT needs a far larger learning rate (METHODS.md).
DEMO_METHODS = {
    "lora": {"options": {"r": 4}, "lr": 1e-3},
    "lora_dash": {"options": {"r": 4, "warmup_steps": 10, "n_directions": 4}, "lr": 1e-3},
    "fourierft": {"options": {"n_frequency": 500, "scaling": 50.0}, "lr": 5e-2},
    "mora": {"options": {"r": 4, "mora_type": 6}, "lr": 1e-3},
}


def generate(pipe, prompts: list[str]) -> list[Image.Image]:
    return [pipe(p, num_inference_steps=8, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0] for p in prompts]


def run_method(method: str, model_dir: Path, out: Path, steps: int) -> dict:
    spec = DEMO_METHODS[method]
    cfg = DreamBoothConfig(
        pretrained_model_name_or_path=str(model_dir), instance_data_dir=str(SUBJECT),
        instance_prompt=PROMPTS[0], output_dir=str(out / method), adapter=method,
        adapter_options=spec["options"], learning_rate=spec["lr"], resolution=64,
        random_flip=True, max_train_steps=steps, seed=0, events=str(out / method / "events.jsonl"))
    (out / method / "events.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    losses = [e["loss"] for e in read_events(out / method / "events.jsonl") if e["event"] == "step"]
    first = read_events(out / method / "events.jsonl")[0]
    return {"method": method, "trainable": first["trainable"], "seconds": seconds,
            "file_kb": (out / method / "dreampeft_adapter.safetensors").stat().st_size / 1024,
            "loss_first": sum(losses[:5]) / 5, "loss_last": sum(losses[-5:]) / 5}


def main(argv: list[str] | None = None) -> None:
    from diffusers import StableDiffusionXLPipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per method")
    parser.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated methods")
    args = parser.parse_args(argv)
    quiet_libraries()
    out, methods = Path(args.out), [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(DEMO_METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(DEMO_METHODS)}")
    model_dir = out / "tiny-sdxl"
    if not (model_dir / "model_index.json").exists():
        save_tiny_sdxl(model_dir, seed=0)
    base = StableDiffusionXLPipeline.from_pretrained(model_dir)
    base.set_progress_bar_config(disable=True)
    rows, table = [generate(base, PROMPTS)], []
    for method in methods:
        table.append(run_method(method, model_dir, out, args.steps))
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)  # fresh, from disk
        pipe.set_progress_bar_config(disable=True)
        dp.load_adapter({"unet": pipe.unet}, out / method)
        rows.append(generate(pipe, PROMPTS))
    image_grid(rows).save(out / "grid.png")
    print(f"\n{'method':<10} {'trainable':>9} {'file KB':>8} {'loss first5':>11} {'last5':>7} {'train s':>7}")
    for r in table:
        print(f"{r['method']:<10} {r['trainable']:>9,} {r['file_kb']:>8.1f} {r['loss_first']:>11.4f} "
              f"{r['loss_last']:>7.4f} {r['seconds']:>7.1f}")
    print(f"\ngrid (rows: base, {', '.join(methods)}; columns: {PROMPTS}) → {out / 'grid.png'}")
    print("adapters, configs, events: " + ", ".join(str(out / m) for m in methods))


if __name__ == "__main__":
    main()
