"""Prior preservation: make sure ``num_class_images`` class images exist, generating the missing
ones with the *base* pipeline (before any adapter is injected), as DreamBooth prescribes."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import DreamBoothConfig
from .data import IMAGE_EXTENSIONS


def existing_class_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


@torch.no_grad()
def generate_class_images(cfg: DreamBoothConfig, pipe, device) -> int:
    """Generate the missing class images into ``cfg.class_data_dir``; returns how many were made."""
    folder = Path(cfg.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = len(existing_class_images(folder))
    missing = max(0, cfg.num_class_images - have)
    pipe.to(device)
    made = 0
    while made < missing:
        n = min(cfg.sample_batch_size, missing - made)
        g = torch.Generator().manual_seed(cfg.seed + have + made)
        images = pipe([cfg.class_prompt] * n, num_inference_steps=cfg.inference_steps,
                      height=cfg.resolution, width=cfg.resolution, generator=g).images
        for i, image in enumerate(images):
            image.save(folder / f"class-{have + made + i:05d}.png")
        made += n
    return made
