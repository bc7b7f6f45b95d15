"""The low-rank export at SDXL's real layer shapes: full SVD against the randomised one, same ΔW.

    python bench/export_speed.py [--rank 32] [--layers 40] [--out bench/results/export_speed_cpu.md]

The 560 attention projections of SDXL's UNet (shapes from the shipped base config, built on the
meta device), a random full-rank ΔW per shape (the hardest case for a randomised SVD: a flat
spectrum; FourierFT's and MoRA's updates are full-rank too). ``--layers`` of them are timed each
way, in the UNet's proportions, and the time of all 560 is extrapolated; the relative error of both
is exact (‖ΔW − up·down‖_F / ‖ΔW‖_F).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def attention_shapes() -> collections.Counter:
    from diffusers import UNet2DConditionModel

    from dreampeft.single_file import SDXL_BASE_CONFIGS

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE_CONFIGS / "unet"))
    return collections.Counter(tuple(m.weight.shape) for n, m in unet.named_modules()
                               if isinstance(m, torch.nn.Linear) and ".attn" in n and ".to_" in n)


def main() -> None:
    from dreampeft.export import _lowrank

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--out", default="bench/results/export_speed_cpu.md")
    args = parser.parse_args()
    shapes = attention_shapes()
    total = sum(shapes.values())
    rows, full_s, low_s = [], 0.0, 0.0
    for shape, count in sorted(shapes.items()):
        n = max(1, round(args.layers * count / total))
        g = torch.Generator().manual_seed(0)
        times, errs = {"full": 0.0, "lowrank": 0.0}, {"full": [], "lowrank": []}
        for _ in range(n):
            dw = torch.randn(shape, generator=g)
            t0 = time.perf_counter()
            U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
            up, down = U[:, :args.rank] * S[:args.rank], Vh[:args.rank]
            times["full"] += time.perf_counter() - t0
            errs["full"].append(float((dw - up @ down).norm() / dw.norm()))
            t0 = time.perf_counter()
            e = _lowrank(dw, args.rank)
            times["lowrank"] += time.perf_counter() - t0
            errs["lowrank"].append(e.rel_error)
        per = {k: v / n for k, v in times.items()}
        full_s, low_s = full_s + per["full"] * count, low_s + per["lowrank"] * count
        rows.append(f"| {shape[0]}×{shape[1]} | {count} | {1000 * per['full']:.0f} | {1000 * per['lowrank']:.0f} | "
                    f"{sum(errs['full']) / n:.4f} | {sum(errs['lowrank']) / n:.4f} |")
    lines = [f"# Rank-{args.rank} export at SDXL's attention shapes, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads ({args.layers} layers timed, extrapolated to {total})", "",
             "| shape (out×in) | layers | full SVD ms | randomised ms | rel. error, full | rel. error, randomised |",
             "|---|---:|---:|---:|---:|---:|", *rows, "",
             f"All {total} layers: full SVD {full_s:.0f} s, randomised {low_s:.0f} s ({full_s / low_s:.1f}× faster)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
