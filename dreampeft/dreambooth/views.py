"""What the UNet sees of each image: aspect buckets, per-step augmentation, and the batch order.

Randomness is a pure function of (seed, micro-batch, rank): which images a micro-batch holds,
their crops and flips. A resumed run therefore draws exactly what the uninterrupted run drew.

Aspect buckets follow SDXL's training (Podell et al. 2023, §2.3): a fixed set of sizes of about
``resolution``² pixels; each image goes to the bucket nearest its aspect ratio, is resized to cover
it and cropped, and its micro-conditioning is its own original size, crop and the bucket's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from .data import generator

# SDXL's sizes at 1024² (width, height), landscape and portrait; scaled to other resolutions.
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640))


def bucket_sizes(resolution: int, quantum: int) -> list[tuple[int, int]]:
    """SDXL's bucket set scaled to ``resolution``² pixels; sides are multiples of ``quantum`` (the
    model's pixel stride) and of 64·resolution/1024, so at 1024 these are SDXL's own sizes."""
    q = quantum * max(1, math.ceil(64 * resolution / 1024 / quantum))
    sizes = []
    for w, h in SDXL_BUCKETS:
        sw, sh = (max(q, math.floor(s * resolution / 1024 / q + 0.5) * q) for s in (w, h))
        for size in ((sw, sh), (sh, sw)):
            if size not in sizes:
                sizes.append(size)
    return sizes


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The size whose aspect ratio is nearest the image's (in log ratio; ties: the first listed)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - ratio))


def bucket_groups(cfg, sizes: list[tuple[int, int]], stride: int) -> dict[tuple[int, int], list[int]]:
    """Bucket size → indices of the images (given by their sizes) trained at it. With buckets off
    (or --aspect_buckets unset and every image square) one square bucket at --resolution."""
    square = all(w == h for w, h in sizes)
    on = cfg.aspect_buckets if cfg.aspect_buckets is not None else not (square or cfg.center_crop)
    if not on:
        return {(cfg.resolution, cfg.resolution): list(range(len(sizes)))}
    choices, groups = bucket_sizes(cfg.resolution, stride), {}
    for i, (w, h) in enumerate(sizes):
        groups.setdefault(nearest_bucket(w, h, choices), []).append(i)
    return groups


@dataclass
class View:
    """One augmented view: pixels in [-1, 1] (3, h, w), SDXL's six conditioning numbers, and the
    loss mask (1, h, w) in [0, 1] when the image has one."""

    pixels: torch.Tensor
    time_ids: torch.Tensor
    key: tuple | None  # identifies the view when it is deterministic (cacheable), else None
    mask: torch.Tensor | None = None


def _tensor(img: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.array(img, dtype=np.float32))
    return a.permute(2, 0, 1) if a.ndim == 3 else a[None]


def augment(image: Image.Image, size: int | tuple[int, int], center_crop: bool, flip: bool,
            g: torch.Generator, mask: Image.Image | None = None) -> View:
    """Resize to cover ``size`` (an int is a square), maybe flip, crop; the mask follows each move.

    The conditioning is (original h, w, crop top, crop left, target h, target w), each image its own.
    """
    tw, th = (size, size) if isinstance(size, int) else size
    orig_h, orig_w = image.height, image.width
    scale = max(tw / orig_w, th / orig_h)
    w, h = max(tw, round(orig_w * scale)), max(th, round(orig_h * scale))
    layers = [image.resize((w, h), Image.Resampling.BILINEAR)]
    if mask is not None:
        layers.append(mask.resize((w, h), Image.Resampling.BILINEAR))
    if flip:
        layers = [ImageOps.mirror(x) for x in layers]
    if center_crop:
        top, left = round((h - th) / 2), round((w - tw) / 2)
    else:
        top = int(torch.randint(0, h - th + 1, (1,), generator=g))
        left = int(torch.randint(0, w - tw + 1, (1,), generator=g))
    layers = [x.crop((left, top, left + tw, top + th)) for x in layers]
    pixels = _tensor(layers[0]) / 127.5 - 1.0
    time_ids = torch.tensor([orig_h, orig_w, top, left, th, tw], dtype=torch.float32)
    deterministic = center_crop or (h == th and w == tw)
    # square views keep the key they always had, so cached latents (and results) are unchanged
    key = (int(flip), top, left) + (() if tw == th else (tw, th))
    return View(pixels, time_ids, key if deterministic else None,
                _tensor(layers[1]) / 255.0 if mask is not None else None)


@dataclass
class MicroBatch:
    size: tuple[int, int]  # (width, height) of every view in it
    pairs: list[tuple[int, int | None]]  # (instance index, class index or None)


class BatchPlan:
    """Which instance (and class) images each micro-batch of each process holds, and at what size.

    ``groups`` maps each bucket size to its instance indices. With one group the stream of instance
    positions is the concatenation of per-epoch permutations drawn from the seed (``repeats`` copies
    of each image per epoch), and micro-batch m of rank p takes positions m·G + p·B … + B-1 with
    G = B·world. With several, each epoch permutes every bucket, cuts it into micro-batches of B
    (the last one filled from the bucket's start, so one size per micro-batch) and shuffles those;
    micro-batch m of rank p is the (m·world + p)-th of that stream. Class images go with their
    micro-batch and are rendered at its size.
    """

    def __init__(self, groups: dict[tuple[int, int], list[int]], n_class: int, batch_size: int,
                 world: int, seed: int, repeats: int = 1):
        self.groups = {size: list(ix) for size, ix in sorted(groups.items()) if ix}
        self.n = sum(len(ix) for ix in self.groups.values()) * repeats
        self.n_class, self.b, self.world, self.seed, self.repeats = n_class, batch_size, world, seed, repeats
        self._perms: dict[int, list] = {}
        if len(self.groups) > 1:
            self.chunks_per_epoch = sum(math.ceil(len(ix) * repeats / batch_size) for ix in self.groups.values())

    @property
    def micro_batches_per_epoch(self) -> int:
        if len(self.groups) == 1:
            return math.ceil(self.n / (self.b * self.world))
        return math.ceil(self.chunks_per_epoch / self.world)

    def _epoch(self, epoch: int) -> list:
        if epoch not in self._perms:
            if len(self.groups) == 1:
                (items,) = self.groups.values()
                perm = torch.randperm(self.n, generator=generator(self.seed, 7, epoch)).tolist()
                self._perms[epoch] = [items[i % len(items)] for i in perm]
            else:
                self._perms[epoch] = self._bucket_chunks(epoch)
        return self._perms[epoch]

    def _bucket_chunks(self, epoch: int) -> list:
        chunks = []
        for gi, (size, items) in enumerate(self.groups.items()):
            pool = items * self.repeats
            perm = torch.randperm(len(pool), generator=generator(self.seed, 7, epoch, gi)).tolist()
            order = [pool[i] for i in perm]
            for s in range(0, len(order), self.b):
                chunks.append((size, [order[(s + j) % len(order)] for j in range(self.b)]))
        shuffle = torch.randperm(len(chunks), generator=generator(self.seed, 8, epoch)).tolist()
        return [chunks[i] for i in shuffle]

    def micro_batch(self, m: int, rank: int) -> MicroBatch:
        if len(self.groups) == 1:
            start = m * self.b * self.world + rank * self.b
            items = [self._epoch(p // self.n)[p % self.n] for p in range(start, start + self.b)]
            size, positions = next(iter(self.groups)), range(start, start + self.b)
        else:
            index = m * self.world + rank
            size, items = self._epoch(index // self.chunks_per_epoch)[index % self.chunks_per_epoch]
            positions = range(index * self.b, (index + 1) * self.b)
        return MicroBatch(size, [(i, p % self.n_class if self.n_class else None)
                                 for i, p in zip(items, positions)])
