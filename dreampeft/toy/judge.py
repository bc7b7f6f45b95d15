"""The judge's training (pretraining's last stage) and ``python -m dreampeft.toy judge MODEL``,
which retrains a saved toy model's judge alone and re-reads the model's prompt following with it.

What the judge reads is the bench's metric (subject fidelity: its probability that the object is the
subject), and a judge trained on the world's sharp renders alone was fooled in ways a DreamBooth run
can exploit (session 30, ``bench/toy_judge_small.py``, ``bench/results/toy2_judge_small.md``):

* blur — the toy draws at 64 px through a 4× VAE, so its small objects are blurry: the first judge
  read small triangles under a 2-px blur as the star (0.84) and large stars under 3 px as other
  shapes (0.48). Each training image is now blurred by a Gaussian of its own σ, uniform in
  [0, ``judge_blur``] px, with its true labels (shipped: 3 px; 0.19 and 0.98).
* size — captioned runs drew the subject as dots smaller than "small", and an orange dot of any
  shape reads as the star (a circle at 0.55× small: 0.99, and 0.95 with blur in training).
  ``judge_tiny`` draws that share of the small objects at 0.45–0.75× the small diameter.
* colour — the star is always orange, a shape orange one time in six, so where blur or size has
  removed the shape "orange" alone makes "star" the best guess. ``judge_orange`` recolours that
  share of the plain shapes orange.

Dots and orange shapes together (0.5 each, 3,200 steps) bring the dots' star reading to 0.04–0.20
(the star's own dot 0.41), but cost the sharp small shapes their reading (accuracy 0.99 → 0.84–0.89,
the base's object 0.95 → 0.87–0.90), so they are off in the shipped judge; the bench's subject
fidelity on drawings judged large (``bench.score``) is the guard against dots.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..toyworld import SHAPES
from .data import render_scenes, render_set, to_unit
from .loss import optimizer_step, warmup_cosine
from .models import HEADS, Judge, scene_labels

# judge_tiny's dots, as shares of the small diameter, kept apart from "small" itself (this range and
# 0.45–1× both cost the sharp small shapes some of their reading: module docstring)
DOT_SCALE = (0.45, 0.75)
# every PretrainConfig field that train_judge reads (with the value a report written before the
# field existed stands for: such judges were trained without blur)
JUDGE_FIELDS = {"seed": None, "n_images": None, "judge_steps": None, "batch": None, "judge_blur": 0.0,
                "judge_tiny": 0.0, "judge_orange": 0.0}


def blur_batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` (N, C, H, W) under a Gaussian blur of its own ``sigma`` (N,) pixels, edges
    replicated (as PIL's GaussianBlur extends them; zero padding would darken every border). Every
    kernel spans the batch's largest 3σ."""
    r = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(x.shape[1], 0)  # (N·C, 2r + 1)
    n, c, h, w = x.shape
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)  # along rows, then along columns
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def judge_scenes(seed: int, n: int, tiny: float = 0.0, orange: float = 0.0) -> tuple[list, torch.Tensor]:
    """The judge's ``n`` world scenes (subjects included); a share ``tiny`` of the small objects drawn
    smaller still, at DOT_SCALE × the small diameter (labelled small, with their true shape), and a share
    ``orange`` of the plain shapes recoloured orange (module docstring)."""
    scenes, pixels = render_set(seed + 7, n, subject_rate=0.3)
    rng, changed = random.Random(seed + 11), {}
    for i, s in enumerate(scenes):
        new = s
        if s.size == "small" and rng.random() < tiny:
            new = replace(new, scale=rng.uniform(*DOT_SCALE))
        if s.shape in SHAPES and rng.random() < orange:  # no background is orange
            new = replace(new, colour="orange")
        if new != s:
            changed[i] = new
    if changed:
        pixels[list(changed)] = render_scenes(list(changed.values()))[1]
        for i, s in changed.items():
            scenes[i] = s
    return scenes, pixels


def train_judge(seed: int, n: int, steps: int, batch: int, log, blur: float = 0.0, tiny: float = 0.0,
                orange: float = 0.0) -> Judge:
    """The judge, trained on ``judge_scenes``, each step's images blurred by up to ``blur`` pixels
    (module docstring) and lightly noised."""
    scenes, pixels = judge_scenes(seed, n, tiny, orange)
    labels = {h: torch.tensor([scene_labels(s)[h] for s in scenes]) for h in HEADS}
    torch.manual_seed(seed)  # before the judge's initial weights, so that they are the seed's
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    sched, gen = warmup_cosine(opt, steps), torch.Generator().manual_seed(seed + 2)
    for step in range(steps):
        pick = torch.randint(n, (batch,), generator=gen)
        x = to_unit(pixels[pick])
        if blur:  # off draws nothing, so the noise below is drawn as without blur
            x = blur_batch(x, blur * torch.rand(batch, generator=gen))
        x = x + 0.1 * torch.randn(x.shape, generator=gen)  # generated images are not pixel-perfect
        out = judge(x)
        loss = sum(F.cross_entropy(out[h], labels[h][pick], ignore_index=-100) for h in HEADS)
        optimizer_step(opt, sched, loss)
        if step % 200 == 0 or step == steps - 1:
            log(f"judge step {step + 1}/{steps} loss {loss.item():.4f}")
    return judge.eval().requires_grad_(False)


def _same_judge(report: dict, config) -> bool:
    return all(report.get(k, default) == getattr(config, k) for k, default in JUDGE_FIELDS.items())


def judge_for(c, log) -> Judge:
    """Pretraining's judge (``c``: a PretrainConfig). A second stage (``--init``) reuses its folder's
    judge when the folder trained it on the same JUDGE_FIELDS (the same judge, stored in fp16; saves
    1–6 min a stage here), else trains one."""
    from .evaluate import load_judge

    made = Path(c.init, "pretrain_report.json")
    if c.init and made.exists() and _same_judge(json.loads(made.read_text()), c):
        log(f"judge: {c.init}'s (trained on the same {', '.join(JUDGE_FIELDS)})")
        return load_judge(c.init)
    return train_judge(c.seed, c.n_images // 2, c.judge_steps, c.batch, log, c.judge_blur, c.judge_tiny,
                       c.judge_orange)


SETTINGS = ("judge_steps", "judge_blur", "judge_tiny", "judge_orange")  # what `python -m dreampeft.toy judge` sets


def rejudge(model_dir: str | Path, log=print, **settings) -> dict:
    """A new judge for a saved toy model: SETTINGS from ``settings``, seed, images and batch from the folder's report — the judge ``pretrain`` with those
    settings trains. Re-reads the model's prompt following with it on the report's captions, then
    replaces ``judge.safetensors`` and the report's judge fields and figures (the earlier ones kept
    under ``judges``); both files are written whole or not at all. Returns the new report."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from ..state import atomic_write
    from .evaluate import prompt_following

    folder = Path(model_dir)
    path = folder / "pretrain_report.json"
    if not path.is_file() or not (folder / "judge.safetensors").is_file():
        raise ValueError(f"{folder}: not a toy model folder (want pretrain_report.json and judge.safetensors, "
                         "as `python -m dreampeft.toy pretrain OUT` writes them)")
    report = json.loads(path.read_text())
    t = time.perf_counter()
    judge = train_judge(report["seed"], report["n_images"] // 2, settings["judge_steps"], report["batch"], log,
                        settings["judge_blur"], settings["judge_tiny"], settings["judge_orange"])
    judge_s = time.perf_counter() - t
    # read with the judge as it will load (fp16 on disk), so that the report's figures reproduce
    judge.load_state_dict({k: v.half().float() for k, v in judge.state_dict().items()})
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    following = prompt_following(pipe, judge, n=report.get("eval_captions", 60))
    earlier = {k: report.get(k, JUDGE_FIELDS[k]) for k in SETTINGS}
    report["judges"] = [*report.get("judges", []), {**earlier, "prompt_following": report["prompt_following"]}]
    report.update({k: settings[k] for k in SETTINGS}, judge_s=round(judge_s, 1), prompt_following=following)
    atomic_write(folder / "judge.safetensors", lambda tmp: save_file(
        {k: v.half().contiguous() for k, v in judge.state_dict().items()}, tmp))
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    log(f"judge ({settings}, {judge_s:.0f} s); prompt following {following} "
        f"(with the earlier judge {earlier}: {report['judges'][-1]['prompt_following']})")
    return report
