"""Offline demo: every registered adapter method on a tiny SDXL, end to end, in about a minute.

For each method: inject into the UNet attention layers, fit a few denoising steps on one
synthetic subject image, save the native adapter, reload it into a *fresh* pipeline loaded from
disk, check that the reloaded and merged outputs agree, generate an image, and print a table.
Everything is built locally (no download): ``python -m dreampeft.demo [--out DIR] [--steps N]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import dreampeft as dp
from dreampeft.tiny import save_tiny_sdxl
from dreampeft.utils import quiet_libraries

PROMPT = "a photo of sks toy"
DEMO_CONFIGS = {"lora": lambda: dp.LoRAConfig(r=4)}


def subject_image(size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (40, 70, 160))
    ImageDraw.Draw(img).ellipse((14, 14, size - 14, size - 14), fill=(220, 40, 40))
    return img


def load_pipe(model_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode(pipe, image: Image.Image):
    pixels = torch.from_numpy(np.array(image)).float().permute(2, 0, 1)[None] / 127.5 - 1
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    time_ids = torch.tensor([[image.height, image.width, 0, 0, image.height, image.width]]).float()
    return latents, embeds, {"text_embeds": pooled, "time_ids": time_ids}


def fit(pipe, method: str, steps: int, lr: float) -> tuple[list[float], float]:
    unet = pipe.unet
    dp.inject_adapters(unet, DEMO_CONFIGS[method]())
    latents, embeds, added = encode(pipe, subject_image())
    opt = torch.optim.AdamW(list(dp.adapter_parameters(unet)), lr=lr)
    sched, g, losses, t0 = pipe.scheduler, torch.Generator().manual_seed(0), [], time.perf_counter()
    unet.train()
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g)
        noisy = sched.add_noise(latents, noise, t)  # epsilon prediction, as SDXL
        pred = unet(noisy, t, embeds, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    unet.eval()
    return losses, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    quiet_libraries()
    out = Path(args.out)
    model_dir = out / "tiny-sdxl"
    if not (model_dir / "model_index.json").exists():
        save_tiny_sdxl(model_dir, seed=0)
    rows = []
    for method in dp.METHODS:
        if method not in DEMO_CONFIGS:
            continue
        pipe = load_pipe(model_dir)
        losses, secs = fit(pipe, method, args.steps, lr=1e-3)
        saved = dp.save_adapter({"unet": pipe.unet}, out / method)
        fresh = load_pipe(model_dir)
        dp.load_adapter({"unet": fresh.unet}, out / method)
        gen = lambda p: p(PROMPT, num_inference_steps=4, height=64, width=64, output_type="pt",
                          generator=torch.Generator().manual_seed(0)).images
        reloaded = gen(fresh)
        dp.merge_adapters(fresh.unet)
        err = (gen(fresh) - reloaded).abs().max().item()
        image = fresh.numpy_to_pil(reloaded.permute(0, 2, 3, 1).numpy())[0]
        image.save(out / method / "sample.png")
        rows.append((method, dp.trainable_parameter_count(pipe.unet), saved.stat().st_size,
                     sum(losses[:5]) / 5, sum(losses[-5:]) / 5, secs, err))
    print(f"\n{'method':<10} {'trainable':>9} {'file KB':>8} {'loss first5':>11} {'last5':>7} "
          f"{'train s':>7} {'merge err':>9}")
    for m, n, size, l0, l1, s, e in rows:
        print(f"{m:<10} {n:>9,} {size / 1024:>8.1f} {l0:>11.4f} {l1:>7.4f} {s:>7.1f} {e:>9.1e}")
    print(f"\nadapters, configs and samples in {out}/<method>/")


if __name__ == "__main__":
    main()
