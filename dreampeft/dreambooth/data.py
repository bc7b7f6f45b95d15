"""Subject and class images: loading, captions and loss masks.

Folder rules: every file with an image extension must open (a broken one stops the run with its
name, and so does one under 32 px a side or over 64 megapixels); ``NAME.txt`` beside ``NAME.png``
is that image's caption; any other file is ignored and listed once in a warning. EXIF orientation
is applied; RGBA/LA/palette images are composited on white, grayscale and CMYK are converted to
RGB, and 16-bit and float images are scaled to 8 bits.

Masks (``--masked_loss``): ``--mask_dir/NAME.png`` beside each instance image name, or else
the image's own alpha channel; white is subject. A mask of another size, unreadable or all black
stops the run with its name.
"""

from __future__ import annotations

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


def _open(path: Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            problem = size_problem(*im.size)  # from the header, before decoding a bomb
            if problem is None:
                im = ImageOps.exif_transpose(im)
                im.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DreamBoothError(f"{path}: cannot read this {what} ({exc}); fix or remove the file") from None
    if problem is not None:
        raise DreamBoothError(f"{path}: {problem}")
    return im


def alpha_of(im: Image.Image) -> Image.Image | None:
    """The alpha channel (L) of an image that has one, else None."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    return None


def read_image(path: Path) -> tuple[Image.Image, Image.Image | None]:
    """(8-bit RGB composited on white, the alpha channel or None)."""
    im = _open(path, "image")
    return to_8bit_rgb(im), alpha_of(im)


def load_image(path: Path) -> Image.Image:
    return read_image(path)[0]


def load_mask(path: Path, size: tuple[int, int], image: Path) -> Image.Image:
    """A loss mask (L, white = subject) that must match its image's size and hold some subject."""
    mask = to_8bit_rgb(_open(path, "mask")).convert("L")
    if mask.size != size:
        raise DreamBoothError(f"{path}: the mask is {mask.width}×{mask.height} but {image.name} is "
                              f"{size[0]}×{size[1]}; save the mask at the image's size")
    return _check_mask(mask, path)


def _check_mask(mask: Image.Image, path: Path) -> Image.Image:
    if mask.getextrema()[1] == 0:
        raise DreamBoothError(f"{path}: the mask is all black (no subject): white marks the subject "
                              "whose pixels the loss keeps; fix the mask or remove the image")
    return mask


@dataclass
class Example:
    path: Path
    prompt: str
    image: Image.Image
    mask: Image.Image | None = None  # L, white = subject (masked loss); None weighs every pixel
    alpha: Image.Image | None = None  # the file's own alpha channel, a mask source


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
        image, alpha = read_image(p)
        examples.append(Example(p, text or prompt, image, alpha=alpha))
    return examples


def attach_masks(examples: list[Example], mask_dir: str | None) -> list[Path]:
    """Give each example its loss mask: ``mask_dir/NAME.png`` if given, else the image's alpha.
    Returns the images left without a mask (they weigh every pixel); none found at all is an error."""
    missing = []
    for ex in examples:
        if mask_dir is not None:
            path = Path(mask_dir) / (ex.path.stem + ".png")
            ex.mask = load_mask(path, ex.image.size, ex.path) if path.exists() else None
        else:
            ex.mask = _check_mask(ex.alpha, ex.path) if ex.alpha is not None else None
        if ex.mask is None:
            missing.append(ex.path)
    if len(missing) == len(examples):
        where = (f"no NAME.png in --mask_dir {mask_dir} matches an image name" if mask_dir is not None
                 else "no instance image has an alpha channel")
        raise DreamBoothError(f"--masked_loss: {where}; give masks with --mask_dir DIR (NAME.png, white = "
                              "subject) or transparent PNGs")
    return missing
