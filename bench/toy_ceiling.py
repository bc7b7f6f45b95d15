"""The ceiling of the toy subject benchmark: fine-tune the *whole* toy UNet on a subject's 5
instance images and see whether even that draws the subject — and at how many steps.

    python bench/toy_ceiling.py [--subject star] [--steps 500,1000,2000] [--params all|attentions|resnets]
                                [--prior 5 [--class_captions world|object|plain] [--class_dir DIR]] [--captions]
                                [--images 4] [--class_images 48] [--drift_captions 60]

No adapter reaches further than full fine-tuning, so this separates "the toy cannot learn the
subject in this budget" from "this adapter cannot". Frozen text encoders (the UNet sees "a sks
object" through the base's encoders), v-prediction MSE on the base's own schedule, AdamW at
1e-4, batch = all 5 instance images (VAE means), ``--seed`` 0. Judged like the bench: subject fidelity on
8 images of the instance prompt itself and on the recontext prompts (4 images each, ``--images``), and prompt
fidelity, and **drift**: how often 60 full world captions ("a red circle ...") still get their shape
(``evaluate.prompt_following``'s object accuracy; the shipped base's 0.93, the first toy's 0.55), so
that a subject drawn for every prompt is not read as composition. On this 2-core CPU a step of the
first toy was ~0.09 s (~3 min for 2,000 steps); the shipped toy's UNet is 2× wide and ~3× dearer.
``--prior N`` adds N class images drawn by the base to every step at weight 1: the bench's full world
captions, "a object ..." naming some of size, corner and background (``--class_captions object``),
or DreamBooth's bare class prompt "a object" (``plain``); ``--captions`` captions the instance images
kohya-style. Measured: class captions that name the recontext prompts' backgrounds keep the whole
UNet from drawing the star in them; the bare class prompt does not (README,
``bench/results/toy_subject_probes.md``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dreampeft.toy import TOY_MODEL  # noqa: E402
from dreampeft.toy.bench import DRIFT_CAPTIONS, INSTANCE_PROMPT, _load, generations, score  # noqa: E402
from dreampeft.toy.evaluate import _pixels, generate, prompt_following  # noqa: E402
from dreampeft.toy.recipe import CLASS_CAPTIONS, CLASS_IMAGES, write_class_images  # noqa: E402
from dreampeft.toyworld import ALL_SUBJECTS, instance_caption, render, subject_scenes  # noqa: E402
from dreampeft.utils import image_grid  # noqa: E402

PARAMS = {"all": "", "attentions": "attentions", "resnets": "resnets|conv_in"}  # name filters
# conv_in rides with the resnets: on this CPU build, training convolutions whose input needs no
# gradient while conv_in is frozen segfaulted (torch 2.13 CPU, oneDNN) — noted, not chased.


def _encoded(pipe, images: list, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VAE means, prompt embeddings and pooled embeddings of captioned images (frozen encoders)."""
    with torch.no_grad():
        latents = pipe.vae.encode(_pixels(images)).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    return latents, embeds, pooled


def fine_tune(pipe, subject: str, steps: list[int], params: str, lr: float = 1e-4, prior: int = 0,
              class_dir: Path | None = None, class_captions: str = "world", captions: bool = False, seed: int = 0,
              images: int = 4, class_images: int = CLASS_IMAGES, log=print):
    """Yield (step, 2 × ``images`` images of the instance prompt, (recontext prompts, ``images`` images
    of each)) at each of ``steps``. ``prior``: that many class images from ``class_dir`` (``class_images``
    drawn there once by ``recipe.write_class_images``, captioned as ``CLASS_CAPTIONS[class_captions]``
    says) join every batch at weight 1, as the trainer's prior preservation does.
    ``captions``: each instance image is captioned with what it shows besides the subject
    (``instance_caption``), not "a sks object"."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)  # the noise, timesteps and class picks of every step
    sched = DDPMScheduler.from_config(pipe.scheduler.config)  # the base's betas: zero terminal SNR
    scenes = subject_scenes(subject, 5)
    batch = _encoded(pipe, [render(s) for s in scenes], [instance_caption(s) if captions else INSTANCE_PROMPT for s in scenes])
    if prior:
        folder = write_class_images(pipe, class_dir, n=class_images, **CLASS_CAPTIONS[class_captions])
        shots = sorted(folder.glob("class-*.png"))
        klass = _encoded(pipe, [Image.open(f) for f in shots], [f.with_suffix(".txt").read_text().strip() for f in shots])
    unet = pipe.unet.train().requires_grad_(False)
    trained = [p for name, p in unet.named_parameters() if re.search(PARAMS[params], name)]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(1, max(steps) + 1):
        loss = _loss(unet, sched, *batch)
        if prior:
            pick = torch.randperm(len(klass[0]))[:prior]
            loss = loss + _loss(unet, sched, *(x[pick] for x in klass))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in steps:
            unet.eval()
            log(f"step {step}: {time.perf_counter() - t0:.0f} s")
            yield step, generate(pipe, [INSTANCE_PROMPT] * 2 * images, seed=0), generations(pipe, images)
            unet.train()


def _loss(unet, sched, latents, embeds, pooled) -> torch.Tensor:
    n = len(latents)
    noise, t = torch.randn_like(latents), torch.randint(0, sched.config.num_train_timesteps, (n,))
    cond = {"text_embeds": pooled.expand(n, -1), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).expand(n, -1)}
    pred = unet(sched.add_noise(latents, noise, t), t, embeds.expand(n, -1, -1), added_cond_kwargs=cond).sample
    return torch.nn.functional.mse_loss(pred, sched.get_velocity(latents, noise, t))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(TOY_MODEL))
    ap.add_argument("--subject", default="star", choices=sorted(ALL_SUBJECTS))
    ap.add_argument("--steps", default="500,1000,2000", help="comma-separated steps at which to judge")
    ap.add_argument("--params", default="all", choices=list(PARAMS), help="which UNet parameters train")
    ap.add_argument("--prior", type=int, default=0, help="class images per step (prior preservation; 0: none)")
    ap.add_argument("--class_dir", default=None, help="where the base's class images are drawn once "
                    "(default toy_ceiling_class[_object|_plain])")
    ap.add_argument("--class_captions", default="world", choices=list(CLASS_CAPTIONS),
                    help="class images of full world captions (the bench's), of 'a object ...' naming some "
                    "attributes, or of the bare 'a object' (DreamBooth's class prompt)")
    ap.add_argument("--captions", action="store_true", help="caption each instance image with its size, "
                    "corner and background (kohya-style), not 'a sks object'")
    ap.add_argument("--seed", type=int, default=0, help="training seed (one run's figures swing by ±0.2: "
                    "compare runs over several)")
    ap.add_argument("--grid", default=None, help="save the last step's images here (PNG)")
    ap.add_argument("--images", type=int, default=4, help="images per recontext prompt (twice as many of the "
                    "instance prompt) at each judged step")
    ap.add_argument("--class_images", type=int, default=CLASS_IMAGES, help="class images drawn for --prior")
    ap.add_argument("--drift_captions", type=int, default=DRIFT_CAPTIONS, help="world captions per drift reading")
    args = ap.parse_args(argv)
    for flag in ("images", "class_images", "drift_captions"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    steps = sorted(int(s) for s in args.steps.split(","))
    kind = args.class_captions
    class_dir = Path(args.class_dir or "toy_ceiling_class" + ("" if kind == "world" else f"_{kind}"))
    pipe, judge = _load(args.model)
    print(f"| {args.subject}, {args.params} | step | subject: instance prompt | subject: recontext | prompt | drift: object |")
    print("|---|---:|---:|---:|---:|---:|")
    along = fine_tune(pipe, args.subject, steps, args.params, prior=args.prior, class_dir=class_dir, class_captions=kind,
                      captions=args.captions, seed=args.seed, images=args.images, class_images=args.class_images,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    for step, own, (prompts, drawn) in along:
        a, b = score(judge, own, [INSTANCE_PROMPT] * len(own), args.subject), score(judge, drawn, prompts, args.subject)
        world = prompt_following(pipe, judge, n=args.drift_captions)["object"]
        print(f"| | {step} | {a['subject']:.3f} | {b['subject']:.3f} | {b['prompt']:.3f} | {world:.3f} |", flush=True)
        if args.grid and step == steps[-1]:
            image_grid([own, drawn[::args.images]]).save(args.grid)


if __name__ == "__main__":
    main()
