"""SDXL at 1024 px on a GPU: every method's step time and peak CUDA memory, against the goals.

    python -m dreampeft.tiny sdxl /data/sdxl-full --size full     # or a real SDXL folder
    python bench/gpu_sdxl.py --model /data/sdxl-full [--steps 5] [--methods lora,fourierft,...]

``bench/sdxl_scale.py`` with the defaults of a GPU run: 1024 px, bf16 base with fp32 adapters,
gradient checkpointing, 8-bit AdamW when bitsandbytes is installed (else AdamW), no exports; the
peak is ``torch.cuda.max_memory_allocated``. Goals (issue 18): LoRA ≤ 16 GB (the figure in
diffusers' DreamBooth-LoRA SDXL README) and every method ≤ 18 GB; the table ends with the verdict.
Without a GPU the same path runs on the CPU (peak = max RSS): the test suite runs it on the tiny
SDXL at 64 px as a smoke test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdxl_scale import main as scale_main  # noqa: E402

GOALS_GIB = {"lora": 16.0}  # every other method: DEFAULT_GOAL_GIB
DEFAULT_GOAL_GIB = 18.0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    optimizer = "adamw8bit" if importlib.util.find_spec("bitsandbytes") and torch.cuda.is_available() else "adamw"
    for flag, value in (("--resolution", "1024"), ("--mixed_precision", "bf16"), ("--optimizer", optimizer)):
        if flag not in argv:
            argv += [flag, value]
    if "--no_exports" not in argv:
        argv.append("--no_exports")
    done = scale_main(argv, name="gpu_sdxl")
    if not torch.cuda.is_available():
        return 0
    def goal(run: str) -> float:  # "lora (again)" is LoRA's second run
        return GOALS_GIB.get(run.split()[0], DEFAULT_GOAL_GIB)

    verdict = [f"- {m}: {r['peak_mib'] / 1024:.1f} GiB, goal ≤ {goal(m):.0f} GiB: "
               f"{'met' if r['peak_mib'] / 1024 <= goal(m) else 'MISSED'}" for m, r in done["results"].items()]
    with open(done["out"], "a") as f:
        f.write("\n" + "\n".join(verdict) + "\n")
    print("\n".join(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
