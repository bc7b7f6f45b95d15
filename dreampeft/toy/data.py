"""The scenes the toy SDXL is pretrained on, rendered from the toy world, and their object masks
(the VAE's and the UNet's loss weights)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ..toyworld import object_mask, render, striped, world_sample


def render_set(seed: int, n: int, subject_rate: float = 0.0, unnamed_position: str = "any"):
    """``n`` world scenes; with ``unnamed_position`` a POSITIONS key, the scenes whose captions name
    no position show the object there (as photos mostly centre their subject)."""
    scenes = [world_sample(seed, i, subject_rate) for i in range(n)]
    if unnamed_position != "any":
        scenes = [s if "position" in s.mention else replace(s, position=unnamed_position) for s in scenes]
    return render_scenes(scenes)


def render_scenes(scenes: list) -> tuple[list, torch.Tensor]:
    pixels = torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes])).permute(0, 3, 1, 2)
    return scenes, pixels  # uint8 (n, 3, 64, 64)


def vae_set(scenes: list, pixels: torch.Tensor, seed: int, share: float) -> tuple[list, torch.Tensor]:
    """The UNet's scenes plus ``share`` × as many objects in two-colour stripes (``toyworld.striped``):
    a VAE that never saw a striped object decoded the striped-ball subject as a plain blob."""
    rng, n = random.Random(seed + 3), round(share * len(scenes))
    if n == 0:
        return scenes, pixels
    extra, extra_pixels = render_scenes([striped(world_sample(seed + 3, i), rng) for i in range(n)])
    return scenes + extra, torch.cat([pixels, extra_pixels])


def object_masks(scenes) -> torch.Tensor:
    """(n, 1, 64, 64) uint8: 255 on the object and a 2-pixel rim around it (the edges are what tells
    a square from a diamond); the VAE's loss weights are made from it a batch at a time."""
    masks = torch.from_numpy(np.stack([np.asarray(object_mask(s)) for s in scenes]))[:, None]
    return F.max_pool2d(masks.float(), 5, stride=1, padding=2).to(torch.uint8)


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1


def latent_object_masks(scenes) -> torch.Tensor:
    """(n, 1, 16, 16): the object's coverage in [0, 1] of each latent pixel (the VAE downsamples 4×)."""
    return F.avg_pool2d(object_masks(scenes).float() / 255, 4)
