"""Prior preservation: make sure ``num_class_images`` class images exist, generating the missing
ones with the *base* pipeline (before any adapter is injected), as DreamBooth prescribes.

Each image is written whole (temporary file, then rename): a run stopped mid-generation leaves only
complete images, and the next run with the same folder generates just the rest.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..state import atomic_write
from .config import DreamBoothConfig
from .data import IMAGE_EXTENSIONS


def existing_class_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


@torch.no_grad()
def generate_class_images(cfg: DreamBoothConfig, pipe, device, progress=None) -> int:
    """Generate the missing class images into ``cfg.class_data_dir``; returns how many were made.
    ``progress(done, total)`` is called after each batch (the app shows it while a run prepares)."""
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
            atomic_write(folder / f"class-{have + made + i:05d}.png", partial(image.save, format="PNG"))
        made += n
        if progress is not None:
            progress(made, missing)
    return made
