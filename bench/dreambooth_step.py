"""DreamBooth training steps per second and peak memory, per method, on SDXL-architecture UNets.

    python bench/dreambooth_step.py [--steps 10] [--out bench/results/dreambooth_step_cpu.md]
    python bench/dreambooth_step.py --options [--steps 20]   # each trainer option's step cost, LoRA

With ``--options`` the rows are one method (LoRA) on the medium UNet at 64 px with each trainer
option on (masked loss, caption dropout, EMA, aspect buckets, a text-encoder fraction), interleaved
round-robin in one process so that machine noise falls on every row alike.

Each (model size, resolution, method) runs in its own process (so peak memory is its own), as
the real trainer's ``train_step`` after two warm-up steps, batch 1, frozen text encoders with
cached embeddings and latents. Peak memory is the process's max RSS on CPU, the CUDA allocator's
peak on GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
METHODS = {"lora": {"r": 8}, "lora_dash": {"r": 8, "warmup_steps": 1, "n_directions": 8},
           "fourierft": {"n_frequency": 1000, "scaling": 150.0}, "mora": {"r": 8, "mora_type": 6}}
CASES = [("tiny", 64), ("tiny", 128), ("medium", 64), ("medium", 128)]


def child(size: str, res: int, method: str, steps: int, workdir: Path) -> dict:
    from dreampeft.dreambooth import DreamBoothConfig
    from dreampeft.dreambooth.train import make_accelerator, setup, train_step
    from dreampeft.tiny import ASSETS, save_tiny_sdxl
    from dreampeft.utils import quiet_libraries

    quiet_libraries()
    model = workdir / f"sdxl-{size}"
    if not (model / "model_index.json").exists():
        save_tiny_sdxl(model, seed=0, size=size)
    opts = dict(METHODS[method])
    if method == "fourierft":  # n may not exceed the smallest adapted layer (32x32 = 1024 here)
        opts["n_frequency"] = min(opts["n_frequency"], 1000)
    cfg = DreamBoothConfig(pretrained_model_name_or_path=str(model), instance_data_dir=str(ASSETS / "subject"),
                           instance_prompt="a photo of sks toy", output_dir=str(workdir / "out"),
                           adapter=method, adapter_options=opts, resolution=res, center_crop=True,
                           max_train_steps=steps + 2)
    run = setup(cfg, make_accelerator(cfg))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        t0 = time.perf_counter()
        train_step(run, step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step == 0 and method == "lora_dash":
            from dreampeft.adapters import launch_dash
            launch_dash(run.acc.unwrap_model(run.trained["unet"]))  # time the dash phase
    from dreampeft.dreambooth.finish import peak_memory_mb

    peak = peak_memory_mb(run.device)
    unet = run.acc.unwrap_model(run.trained["unet"])
    from dreampeft import trainable_parameter_count
    return {"steps_per_s": 1 / statistics.median(times[2:]), "max_s": max(times[2:]), "peak_mib": peak,
            "trainable": trainable_parameter_count(unet),
            "unet_params": sum(p.numel() for p in unet.parameters()) - trainable_parameter_count(unet)}


OPTIONS = {"plain": {}, "masked loss": {"masked_loss": True}, "caption dropout 0.1": {"caption_dropout_rate": 0.1},
           "EMA": {"use_ema": True}, "aspect buckets (3 sizes)": {"aspect_buckets": True},
           "text encoders, frac 0.5": {"train_text_encoder": True, "train_text_encoder_frac": 0.5}}


def _option_data(workdir: Path) -> tuple[Path, Path]:
    from PIL import Image, ImageDraw

    data, masks = workdir / "data", workdir / "masks"
    for folder in (data, masks):
        folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate([(64, 64), (96, 64), (64, 96), (72, 72)]):  # three aspect ratios
        im = Image.new("RGB", (w, h), (40, 70, 160))
        ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(220, 40, 40))
        im.save(data / f"img{i}.png")
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
        mask.save(masks / f"img{i}.png")
    return data, masks


def option_costs(steps: int, workdir: Path) -> dict:
    """Median s/step of each OPTIONS row (LoRA r8, medium UNet, 64 px), measured round-robin."""
    from dreampeft.dreambooth import DreamBoothConfig
    from dreampeft.dreambooth.train import make_accelerator, setup, train_step
    from dreampeft.tiny import save_tiny_sdxl
    from dreampeft.utils import quiet_libraries

    quiet_libraries()
    model = save_tiny_sdxl(workdir / "sdxl-medium", seed=0, size="medium")
    data, masks = _option_data(workdir)
    runs = {}
    for name, opts in OPTIONS.items():
        opts = {**opts, **({"mask_dir": str(masks)} if opts.get("masked_loss") else {})}
        cfg = DreamBoothConfig(pretrained_model_name_or_path=str(model), instance_data_dir=str(data),
                               instance_prompt="a photo of sks toy", output_dir=str(workdir / name), resolution=64,
                               adapter_options={"r": 8}, max_train_steps=steps + 2,
                               aspect_buckets=opts.pop("aspect_buckets", False), **opts)
        runs[name] = setup(cfg, make_accelerator(cfg))
    times = {name: [] for name in runs}
    for step in range(steps + 2):
        for name, run in runs.items():
            t0 = time.perf_counter()
            train_step(run, step)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def write_option_costs(steps: int, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        costs = option_costs(steps, Path(tmp))
    lines = [f"# Trainer options: LoRA r8 step on the medium SDXL-architecture UNet, 64 px, {steps} steps "
             f"round-robin, torch {torch.__version__}, {torch.get_num_threads()} threads", "",
             "| option | ms/step | × plain |", "|---|---:|---:|"]
    lines += [f"| {n} | {1000 * t:.1f} | {t / costs['plain']:.2f} |" for n, t in costs.items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nwritten to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--options", action="store_true", help="each trainer option's step cost instead")
    parser.add_argument("--child", nargs=4, metavar=("SIZE", "RES", "METHOD", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, res, method, workdir = args.child
        print(json.dumps(child(size, int(res), method, args.steps, Path(workdir))))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.options:
        return write_option_costs(args.steps, Path(args.out or f"bench/results/dreambooth_options_{device}.md"))
    out = Path(args.out or f"bench/results/dreambooth_step_{device}.md")
    lines = [f"# DreamBooth step, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"median of {args.steps} steps, batch 1", "",
             "| UNet | px | method | trainable | steps/s | × lora | slowest step s | peak MiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for size, res in CASES:
            results = {}
            for method in METHODS:
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--child", size, str(res), method, tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            for method, r in results.items():
                lines.append(f"| {size} ({r['unet_params'] / 1e6:.1f}M) | {res} | {method} | {r['trainable']:,} | "
                             f"{r['steps_per_s']:.2f} | {r['steps_per_s'] / results['lora']['steps_per_s']:.2f} | "
                             f"{r['max_s']:.2f} | {r['peak_mib']:.0f} |")
            print("\n".join(lines[-len(results):]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
