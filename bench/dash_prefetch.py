"""LoRA-Dash's launch step in the real trainer, with and without ``--dash_svd_prefetch``, in one run.

    python bench/dash_prefetch.py --model /tmp/sdxl-full [--warmup 30] [--resolution 256]
                                  [--where memory|disk] [--out bench/results/dash_prefetch_cpu.md]

Runs ``train_dreambooth.py`` twice on the same model and subject (LoRA-Dash r4 s8, batch 1, fp32,
gradient checkpointing, launch after ``--warmup`` optimizer steps, 2 steps after it), once with
the SVDs taken at the launch (``--no-dash_svd_prefetch``) and once decomposed in a background
thread during the warm-up, held in memory or in a fresh ``--dash_svd_cache`` folder (``--where``;
SDXL's 7.1 GB of U and Vᵀ do not fit beside a full-size fp32 run in 24 GB). From each run's events:
the launch's seconds, the median warm-up step (steps 2…warmup; the thread competes with them on a
CPU), how many SVDs the thread had done, the wall time, and whether both runs end with the same
adapter bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_trainer(model: str, out: Path, warmup: int, res: int, extra: list[str]) -> dict:
    from dreampeft.dreambooth.events import read_events

    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path", model,
           "--instance_data_dir", str(ROOT / "assets/subject"), "--instance_prompt", "a photo of sks toy",
           "--output_dir", str(out), "--events", str(out / "events.jsonl"), "--adapter", "lora_dash",
           "--rank", "4", "--dash_directions", "8", "--dash_warmup_steps", str(warmup),
           "--max_train_steps", str(warmup + 2), "--resolution", str(res), "--center_crop",
           "--gradient_checkpointing", "--learning_rate", "1e-4", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    steps = [e for e in read_events(out / "events.jsonl") if e["event"] == "step"]
    launch = next(e for e in steps if "dash_launched" in e)
    return {"wall_s": wall, "launch_s": launch["dash_launch_seconds"], "layers": launch["dash_launched"],
            "prefetched": launch["dash_svd_prefetched"], "max_step_s": max(e["seconds"] for e in steps[1:]),
            "warm_step_s": statistics.median(e["seconds"] for e in steps[1:warmup])}


def same_adapter(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = (load_file(p / "dreampeft_adapter.safetensors") for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an SDXL folder (python -m dreampeft.tiny sdxl OUT --size full)")
    p.add_argument("--warmup", type=int, default=30, help="optimizer steps before the launch")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--where", choices=("memory", "disk"), default="disk",
                   help="where the prefetched SVDs wait: host memory, or a fresh --dash_svd_cache folder")
    p.add_argument("--out", default=str(ROOT / "bench/results/dash_prefetch_cpu.md"))
    args = p.parse_args(argv)
    if args.warmup < 3:
        p.error(f"--warmup must be at least 3 (a median of warm-up steps; got {args.warmup})")
    with tempfile.TemporaryDirectory(prefix="dash-prefetch-") as tmp:
        work = Path(tmp)
        prefetch = ["--dash_svd_cache", str(work / "svd")] if args.where == "disk" else []
        rows = {"at the launch (`--no-dash_svd_prefetch`)": run_trainer(args.model, work / "off", args.warmup,
                                                                        args.resolution, ["--no-dash_svd_prefetch"]),
                f"prefetched during the warm-up ({args.where})": run_trainer(args.model, work / "on", args.warmup,
                                                                            args.resolution, prefetch)}
        same = same_adapter(work / "off", work / "on")
    first = next(iter(rows.values()))
    lines = [f"LoRA-Dash launch in the trainer: {args.model}, {first['layers']} adapted weights, {args.resolution} px, "
             f"fp32, gradient checkpointing, launch after {args.warmup} steps; one run each, one after the other", "",
             "| SVDs taken | launch s | SVDs done by the thread | median warm-up step s | slowest step s | wall s |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['launch_s']:.1f} | {r['prefetched']} / {r['layers']} | {r['warm_step_s']:.2f} | "
              f"{r['max_step_s']:.2f} | {r['wall_s']:.0f} |" for name, r in rows.items()]
    lines += ["", f"Same adapter bit for bit: {same}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
