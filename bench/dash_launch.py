"""LoRA-Dash's launch at SDXL's real size: without and with ``--dash_svd_cache``, in one run.

    python bench/dash_launch.py [--out bench/results/dash_launch_cpu.md] [--cache DIR] [--model DIR]

The launch needs the full SVD of every adapted W0 (560 UNet attention weights). The same W0's SVD
is the same in every run on that base, so ``--dash_svd_cache`` stores it: the first run computes
and writes it (cold), the next ones read it (warm). This bench builds SDXL base's UNet (random
weights from a seed; the SVD's cost does not depend on the values), injects LoRA-Dash as the
trainer does, and times the three launches on fresh injections, checking that the selected
directions are bit-identical.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fresh_dash(unet):
    import dreampeft as dp
    from dreampeft.adapters import UNET_ATTENTION

    if dp.adapter_layers(unet):
        dp.remove_adapters(unet)
    torch.manual_seed(1)  # the same A in every injection
    dp.inject_adapters(unet, dp.LoRADashConfig(r=4, n_directions=8, target_modules=list(UNET_ATTENTION)))
    with torch.no_grad():  # a LoRA update to rank against (B starts at zero)
        g = torch.Generator().manual_seed(0)
        for layer in dp.adapter_layers(unet).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 1e-3)
    return unet


def timed_launch(unet, cache) -> tuple[float, dict]:
    import dreampeft as dp

    fresh_dash(unet)
    t0 = time.perf_counter()
    launched = dp.launch_dash(unet, cache)
    seconds = time.perf_counter() - t0
    layers = dp.adapter_layers(unet)
    return seconds, {"n": len(launched), "dirs": {k: (m.dash_U.clone(), m.dash_Vh.clone()) for k, m in layers.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench/results/dash_launch_cpu.md"))
    p.add_argument("--cache", default=None, help="cache folder (default: a temporary one, removed after)")
    p.add_argument("--model", default=None, help="an SDXL pipeline folder whose UNet to use instead "
                   "(the test suite's tiny one)")
    args = p.parse_args(argv)
    from diffusers import UNet2DConditionModel

    from dreampeft.single_file import SDXL_BASE_CONFIGS

    torch.manual_seed(0)
    unet = (UNet2DConditionModel.from_pretrained(args.model, subfolder="unet") if args.model else
            UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE_CONFIGS / "unet")))
    unet.requires_grad_(False)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="dash-svd-"))
    rows = {}
    for name, where in (("no cache", None), ("cache, first run (SVD + write)", cache),
                        ("cache, next run (read)", cache)):
        rows[name] = timed_launch(unet, where)
        print(f"{name}: {rows[name][0]:.1f} s, {rows[name][1]['n']} layers", flush=True)
    ref = rows["no cache"][1]["dirs"]
    same = all(torch.equal(a, b) for r in rows.values() for k, pair in r[1]["dirs"].items()
               for a, b in zip(pair, ref[k]))
    size_mb = sum(f.stat().st_size for f in cache.glob("*.safetensors")) / 1e6
    lines = [f"LoRA-Dash launch, {args.model or 'SDXL base'} UNet ({sum(p.numel() for p in unet.parameters()) / 1e9:.3f} B parameters), "
             f"{rows['no cache'][1]['n']} adapted weights, torch {torch.__version__}, {torch.get_num_threads()} threads",
             "", "| launch | seconds |", "|---|---:|"]
    lines += [f"| {name} | {s:.1f} |" for name, (s, _) in rows.items()]
    lines += ["", f"Directions bit-identical in all three: {same}. Cache on disk: {size_mb:,.0f} MB."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.cache:
        shutil.rmtree(cache)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
