"""Pretraining's step time in float32 and under bf16 autocast (``pretrain --mixed_precision bf16``),
measured side by side in one run on this CPU.

    python bench/toy_pretrain_precision.py [--steps 10] [--width 2]

Times ``train_unet`` (the shipped recipe's loss: SNR floor 0.1, 4×4 pool, background detail, object
weight 10; UNet of ``--width`` with both text encoders, batch 64) on the first scenes of the
pretraining set, each row after one warm-up call of the same length: float32; bf16 autocast alone
(attention through the CPU flash kernel); bf16 as ``pretrain.autocast`` runs it (attention through
the math kernel). The VAE is left in float32: bf16 saved it nothing (0.35 against 0.37 s a step of
32). bf16 pays only where the CPU has AVX-512 BF16 or AMX (``lscpu | grep bf16``); elsewhere it is
emulated and slower.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dreampeft.tiny import build_tiny_sdxl  # noqa: E402
from dreampeft.toy import TOY_MODEL, pretrain  # noqa: E402
from dreampeft.toy.data import latent_object_masks, render_set  # noqa: E402
from dreampeft.toy.models import build_toy_unet  # noqa: E402
from dreampeft.toy.pretrain import (PretrainConfig, _load_vae, encode_latents, tokenize_captions,  # noqa: E402
                                    train_unet)


@contextmanager
def autocast_flash(mixed_precision: str):
    """bf16 autocast with PyTorch's default attention kernel (flash, on a CPU)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
        yield


def timed(fn, steps: int) -> float:
    fn(steps)  # warm-up: oneDNN picks its kernels on the first calls
    t = time.perf_counter()
    fn(steps)
    return (time.perf_counter() - t) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--width", type=int, default=2)
    args = ap.parse_args(argv)
    scenes, pixels = render_set(0, 512, unnamed_position="center")
    mean, std = encode_latents(_load_vae(str(TOY_MODEL)), pixels)
    pipe = build_tiny_sdxl(0)
    text = tokenize_captions([pipe.tokenizer, pipe.tokenizer_2], [s.caption() for s in scenes])
    masks = latent_object_masks(scenes).half()
    base = PretrainConfig(snr_floor=0.1, floor_pool=4, floor_detail="background", object_weight=10,
                          unnamed_position="center", unet_width=args.width)
    shipped = pretrain.autocast
    rows = {}
    for name, precision, context in (("float32", "no", shipped), ("bf16, flash attention", "bf16", autocast_flash),
                                     ("bf16, math attention (--mixed_precision bf16)", "bf16", shipped)):
        def unet(steps, c=replace(base, mixed_precision=precision)):
            start = [build_toy_unet(0, width=args.width), pipe.text_encoder, pipe.text_encoder_2]
            train_unet((mean, std), text, start, replace(c, unet_steps=steps), lambda *_: None, masks=masks)

        pretrain.autocast = context
        try:
            rows[name] = timed(unet, args.steps)
        finally:
            pretrain.autocast = shipped
    print(f"{torch.get_num_threads()} threads, UNet width {args.width}, batch 64, {args.steps} steps a row")
    print("| precision | s a step | × float32 |\n|---|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.3f} | {seconds / rows['float32']:.2f} |")


if __name__ == "__main__":
    main()
