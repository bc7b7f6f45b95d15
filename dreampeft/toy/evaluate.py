"""Reading toy-model images with the judge: prompt following, subject fidelity, sample grids."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..toyworld import OBJECT_COLOURS, PLAIN, SHAPES, asked, sample_scene
from ..utils import image_grid
from .models import HEADS, Judge

GUIDANCE, STEPS = 5.0, 20


def is_toy(model: str | Path) -> bool:
    """A toy model folder (``python -m dreampeft.toy pretrain`` output): it carries a judge."""
    return (Path(model) / "judge.safetensors").exists()


def find_judge(model: str | Path) -> Judge | None:
    """The judge of a toy model folder; None for any other model (a hub id, another folder)."""
    return load_judge(model) if is_toy(model) else None


def load_judge(model_dir: str | Path) -> Judge:
    from safetensors.torch import load_file

    path = Path(model_dir) / "judge.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no judge here; the toy model folder from "
                                "`python -m dreampeft.toy pretrain OUT` has one")
    judge = Judge()
    judge.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return judge.eval().requires_grad_(False)


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = STEPS, guidance: float = GUIDANCE,
             batch: int = 32) -> list:
    """One 64×64 image per prompt; image i uses seed + i whatever the batching."""
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                       generator=gens).images
    return images


def _pixels(images: list) -> torch.Tensor:
    """PIL images → (N, 3, H, W) in [-1, 1], the judge's input."""
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1


@torch.no_grad()
def judge_images(judge: Judge, images: list) -> dict[str, torch.Tensor]:
    """Class probabilities per head for 64×64 PIL images."""
    return {h: logits.softmax(-1) for h, logits in judge(_pixels(images)).items()}


def attribute_hits(probs: dict[str, torch.Tensor], wanted: list[dict[str, str]]) -> list[bool]:
    """Per image ``i`` and attribute it asks for (``wanted[i]``: head → class), whether the judge's
    reading (``probs``, from ``judge_images``) is that class."""
    return [HEADS[h][int(probs[h][i].argmax())] == w for i, asks in enumerate(wanted) for h, w in asks.items()]


def judge_prompt(judge: Judge, images: list, prompt: str) -> float | None:
    """Prompt fidelity of ``images`` (any size) for ``prompt``: the share of the size, corner and
    background it names (``toyworld.asked``) that the judge reads; None when it names none."""
    wanted = asked(prompt)
    if not wanted:
        return None
    return float(np.mean(attribute_hits(judge_images(judge, [_square64(im) for im in images]), [wanted] * len(images))))


def prompt_following(pipe, judge: Judge, n: int = 60, seed: int = 123) -> dict[str, float]:
    """Share of generations whose object, colour, background, position and size the judge reads
    as the prompt asked (every attribute named in every prompt)."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng, mention_p=1.0) for _ in range(n)]
    probs = judge_images(judge, generate(pipe, [s.caption() for s in scenes], seed))
    wanted = {"object": [s.shape for s in scenes], "colour": [s.colour for s in scenes],
              "background": [s.background for s in scenes], "position": [s.position for s in scenes],
              "size": [s.size for s in scenes]}
    return {h: round(float(np.mean([HEADS[h][i] == w for i, w in zip(probs[h].argmax(-1).tolist(), wanted[h])])), 3)
            for h in HEADS}


def sample_grid(pipe, seed: int = 0):
    """Rows: the base shapes; columns: the object colours, each on a different plain background."""
    rows = []
    for r, shape in enumerate(SHAPES):
        prompts = [f"a {colour} {shape} on a {[b for b in PLAIN if b != colour][(r + c) % 5]} background"
                   for c, colour in enumerate(OBJECT_COLOURS)]
        rows.append(generate(pipe, prompts, seed))
    return image_grid(rows)


def _square64(image):
    from PIL import Image

    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((64, 64), Image.LANCZOS)


@torch.no_grad()
def judge_similarity(judge: Judge, real: list, generated: list) -> float:
    """DINO's protocol with the judge's features: mean pairwise cosine similarity between generated
    and real images (any size; centre-cropped and resized to 64 px)."""
    from ..eval import mean_pairwise_cosine

    def embed(images):
        return judge.embed(_pixels([_square64(im) for im in images]))

    return mean_pairwise_cosine(embed(generated), embed(real))


@torch.no_grad()
def judge_object_agreement(judge: Judge, real: list, generated: list) -> float:
    """The chance that the judge reads the same object in a generated image as in a real one,
    Σ_c p_gen(c)·p_real(c) over all pairs: subject fidelity that looks at the object only. On the
    toy's own subjects (p_real nearly one-hot) it is the bench's subject fidelity; ``judge_similarity``
    compares whole images, so a kept background scores as much as a drawn subject."""
    def objects(images):
        return judge_images(judge, [_square64(im) for im in images])["object"]

    return float((objects(generated).mean(0) * objects(real).mean(0)).sum())

