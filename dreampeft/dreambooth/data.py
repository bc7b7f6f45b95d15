"""Subject and class images: loading, captions, per-step augmentation, batch order.

Folder rules: every file with an image extension must open (a broken one stops the run with its
name, and so does one under 32 px a side or over 64 megapixels); ``NAME.txt`` beside ``NAME.png``
is that image's caption; any other file is ignored and listed once in a warning. EXIF orientation
is applied; RGBA/LA/palette images are composited on white, grayscale and CMYK are converted to
RGB, and 16-bit and float images are scaled to 8 bits.

Randomness is a pure function of (seed, micro-batch, rank): which images a micro-batch holds,
their crops and flips. A resumed run therefore draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DreamBoothError(ValueError):
    """Bad input to a DreamBooth run; the message names the file or flag and what to do."""


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (seed, step, rank, ...), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


MIN_SIDE = 32  # smaller is no photo of a subject (and SDXL's VAE needs a few latent pixels)
MAX_PIXELS = 64 * 2**20  # 64 megapixels (8192²); larger is no photo a subject needs, or a bomb


def size_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused (trainer, eval and the app share the rule), or None."""
    if min(width, height) < MIN_SIDE:
        return f"{width}×{height} is too small; use images at least {MIN_SIDE} px on each side"
    if width * height > MAX_PIXELS:
        return (f"{width}×{height} is {width * height / 2**20:.0f} megapixels, over the "
                f"{MAX_PIXELS // 2**20} MP limit (or a decompression bomb); downscale it")
    return None


def to_8bit_rgb(im: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. 16-bit and float images are scaled, not clipped (PIL's own
    convert turns a 16-bit grayscale into solid white and a [0, 1] float image into black)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        top = a.max(initial=0.0)
        if im.mode == "F":  # float images are [0, 1] by convention; brighter ones are normalised
            full = max(1.0, top)
        else:  # 16-bit range; 32-bit integer images beyond it are normalised to their maximum
            full = 65535.0 if top <= 65535 else top
        im = Image.fromarray(np.clip(np.rint(a / full * 255), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            problem = size_problem(*im.size)  # from the header, before decoding a bomb
            if problem is None:
                im = ImageOps.exif_transpose(im)
                im.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DreamBoothError(f"{path}: cannot read this image ({exc}); fix or remove the file") from None
    if problem is not None:
        raise DreamBoothError(f"{path}: {problem}")
    return to_8bit_rgb(im)


@dataclass
class Example:
    path: Path
    prompt: str
    image: Image.Image


def scan_folder(folder: str | Path, prompt: str, flag: str) -> list[Example]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DreamBoothError(f"{flag} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    stems = {p.stem for p in images}
    ignored = [p.name for p in files
               if p not in images and not (p.suffix.lower() == ".txt" and p.stem in stems)]
    if ignored:
        warnings.warn(f"{flag} {folder}: ignoring {len(ignored)} non-image file(s): "
                      f"{', '.join(ignored[:5])}{' …' if len(ignored) > 5 else ''}", stacklevel=2)
    if not images:
        raise DreamBoothError(f"{flag} {folder}: no images found (looked for "
                              f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    examples = []
    for p in images:
        caption = p.with_suffix(".txt")
        try:
            text = caption.read_text(encoding="utf-8").strip() if caption.exists() else ""
        except (UnicodeDecodeError, OSError) as exc:
            raise DreamBoothError(f"{caption}: cannot read this caption ({type(exc).__name__}); save it as "
                                  "UTF-8 text or remove it") from None
        examples.append(Example(p, text or prompt, load_image(p)))
    return examples


@dataclass
class View:
    """One augmented view: pixels in [-1, 1] (3, res, res) and SDXL's six conditioning numbers."""

    pixels: torch.Tensor
    time_ids: torch.Tensor
    key: tuple | None  # identifies the view when it is deterministic (cacheable), else None


def augment(image: Image.Image, resolution: int, center_crop: bool, flip: bool,
            g: torch.Generator) -> View:
    """Resize the short side to ``resolution``, maybe flip, crop; as diffusers' SDXL script does.

    The conditioning is (original h, w, crop top, crop left, target h, target w), each image its own.
    """
    orig_h, orig_w = image.height, image.width
    scale = resolution / min(orig_h, orig_w)
    w, h = max(resolution, round(orig_w * scale)), max(resolution, round(orig_h * scale))
    img = image.resize((w, h), Image.Resampling.BILINEAR)
    if flip:
        img = ImageOps.mirror(img)
    if center_crop:
        top, left = round((h - resolution) / 2), round((w - resolution) / 2)
    else:
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=g))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=g))
    img = img.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    time_ids = torch.tensor([orig_h, orig_w, top, left, resolution, resolution], dtype=torch.float32)
    deterministic = center_crop or (h == resolution and w == resolution)
    return View(pixels, time_ids, (int(flip), top, left) if deterministic else None)


class BatchPlan:
    """Which instance (and class) images each micro-batch of each process holds.

    The stream of instance positions is the concatenation of per-epoch permutations drawn from
    the seed; micro-batch m of rank p takes positions m·G + p·B … + B-1 with G = B·world.
    """

    def __init__(self, n_instance: int, n_class: int, batch_size: int, world: int, seed: int):
        self.n, self.n_class, self.b, self.world, self.seed = n_instance, n_class, batch_size, world, seed
        self._perms: dict[int, list[int]] = {}

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(self.n / (self.b * self.world))

    def _item(self, position: int) -> int:
        epoch = position // self.n
        if epoch not in self._perms:
            self._perms[epoch] = torch.randperm(self.n, generator=generator(self.seed, 7, epoch)).tolist()
        return self._perms[epoch][position % self.n]

    def micro_batch(self, m: int, rank: int) -> list[tuple[int, int | None]]:
        """[(instance index, class index or None)] for micro-batch ``m`` on ``rank``."""
        start = m * self.b * self.world + rank * self.b
        return [(self._item(p), p % self.n_class if self.n_class else None)
                for p in range(start, start + self.b)]
