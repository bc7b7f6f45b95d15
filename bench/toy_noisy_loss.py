"""Where a toy UNet's v-prediction error lies at each noise level: in the layout (means over
pool × pool latent pixels) or in the detail (what those means average away).

    python bench/toy_noisy_loss.py [--model DIR] [--n 128] [--pool 4]

On the first ``n`` scenes of the pretraining set (seed 0, unnamed positions as the model's
``pretrain_report.json`` says), latents drawn as pretraining draws them, prompts encoded by the
model's own encoders: per timestep, the mean square per latent pixel of the v target and of the
model's error, each in full and of the pooled means, and the pooled share of the error. It asks
what the SNR floor's weight at the noisiest steps pays for: a small share there says most of that
loss is detail the caption hardly predicts (``dreampeft.toy.loss.floored_v_loss``). The last
column is the share of the error that is detail inside blocks the object touches: what
``--floor_detail background`` leaves out of the floor; the rest of the detail (patterns, the VAE's
sampled noise) it keeps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dreampeft.dreambooth.models import encode_prompts  # noqa: E402
from dreampeft.toy import TOY_MODEL  # noqa: E402
from dreampeft.toy.bench import _load  # noqa: E402
from dreampeft.toy.loss import block_detail, untouched_blocks  # noqa: E402
from dreampeft.toy.data import latent_object_masks, render_set  # noqa: E402
from dreampeft.toy.pretrain import TIME_IDS, encode_latents, tokenize_captions, toy_scheduler  # noqa: E402

TIMESTEPS = (0, 200, 400, 600, 700, 800, 900, 999)


@torch.no_grad()
def error_by_timestep(pipe, n: int, pool: int, unnamed: str = "any", batch: int = 64) -> list[dict]:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scenes, pixels = render_set(0, n, unnamed_position=unnamed)
    mean, std = (x * pipe.vae.config.scaling_factor for x in encode_latents(pipe.vae, pixels))
    on_object = 1 - untouched_blocks(latent_object_masks(scenes), pool)
    gen = torch.Generator().manual_seed(1)
    z0 = mean + std * torch.randn(mean.shape, generator=gen)
    ids, index = tokenize_captions([pipe.tokenizer, pipe.tokenizer_2], [s.caption() for s in scenes])
    sched = DDPMScheduler.from_config(toy_scheduler().config)
    ms = lambda x: x.pow(2).mean().item()  # noqa: E731
    starts = range(0, n, batch)  # the prompts encoded once, not once per timestep
    prompts = [encode_prompts([pipe.text_encoder, pipe.text_encoder_2], [x[index[i:i + batch]] for x in ids], "cpu")
               for i in starts]
    rows = []
    for t in TIMESTEPS:
        sums = torch.zeros(5)
        for i, (h, p) in zip(starts, prompts):
            z = z0[i:i + batch]
            noise, tt = torch.randn(z.shape, generator=gen), torch.full((len(z),), t)
            cond = {"text_embeds": p, "time_ids": torch.tensor([TIME_IDS], dtype=torch.float32).expand(len(z), -1)}
            target = sched.get_velocity(z, noise, tt)
            err = pipe.unet(sched.add_noise(z, noise, tt), tt, h, added_cond_kwargs=cond).sample - target
            coarse, detail = block_detail(err, pool)
            parts = (target, F.avg_pool2d(target, pool), err, coarse, detail * on_object[i:i + batch])
            sums += torch.tensor([ms(x) * len(z) for x in parts])
        target, target_pooled, err, err_pooled, err_object = (sums / n).tolist()
        rows.append({"t": t, "snr": round(compute_snr(sched, torch.tensor([t])).item(), 3),
                     "target": target, "target_pooled": target_pooled, "error": err, "error_pooled": err_pooled,
                     "pooled_share": err_pooled / err, "object_detail_share": err_object / err})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(TOY_MODEL))
    ap.add_argument("--n", type=int, default=128, help="scenes (the pretraining set's first n)")
    ap.add_argument("--pool", type=int, default=4, choices=(2, 4, 8, 16), help="side of the pooled blocks")
    args = ap.parse_args(argv)
    report = Path(args.model) / "pretrain_report.json"
    unnamed = json.loads(report.read_text()).get("unnamed_position", "any") if report.exists() else "any"
    pipe, _ = _load(args.model)
    print(f"{args.model}: {args.n} scenes, unnamed positions {unnamed}, pooled over {args.pool} × {args.pool}\n")
    print("| t | snr | target | target, pooled | error | error, pooled | pooled share of the error "
          "| the object's detail's share |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in error_by_timestep(pipe, args.n, args.pool, unnamed):
        print(f"| {r['t']} | {r['snr']:g} | {r['target']:.4f} | {r['target_pooled']:.4f} | {r['error']:.4f} "
              f"| {r['error_pooled']:.4f} | {r['pooled_share']:.2f} | {r['object_detail_share']:.2f} |")


if __name__ == "__main__":
    main()
