"""Subject images in every common form, captions, augmentation drawn per step, batch order."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dreampeft.dreambooth.data import DreamBoothError, generator, load_image, scan_folder
from dreampeft.dreambooth.views import BatchPlan, augment


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("L", "PNG"),
                                      ("CMYK", "JPEG"), ("I;16", "PNG"), ("1", "PNG")])
def test_every_image_mode_becomes_rgb(mode, fmt, tmp_path):
    img = Image.new("RGB", (40, 32), (200, 30, 30)).convert(mode)
    out = load_image(_save(img, tmp_path / f"x.{fmt.lower()}", format=fmt))
    assert out.mode == "RGB" and out.size == (40, 32)


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    assert load_image(_save(img, tmp_path / "t.png")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 32))  # white stripe on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = load_image(_save(img, tmp_path / "r.jpg", exif=exif.tobytes(), quality=95))
    assert out.size == (32, 60)
    assert sum(out.getpixel((5, 1))) > 600 and sum(out.getpixel((5, 56))) < 100  # stripe now on top


def test_folder_rules(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "B.JPG")
    (tmp_path / "a.txt").write_text("a photo of sks dog on the moon\n")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".DS_Store").write_text("hidden, ignored silently")
    with pytest.warns(UserWarning, match=r"ignoring 1 non-image file\(s\): notes.md"):
        examples = scan_folder(tmp_path, "a photo of sks dog", "--instance_data_dir")
    assert [(e.path.name, e.prompt) for e in examples] == [
        ("B.JPG", "a photo of sks dog"), ("a.png", "a photo of sks dog on the moon")]


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DreamBoothError, match=r"bad.jpg: cannot read this image"):
        scan_folder(tmp_path, "p", "--instance_data_dir")


def test_augmentation_is_drawn_per_step_and_conditioning_follows_it():
    img = Image.new("RGB", (96, 64))
    views = [augment(img, 32, center_crop=False, flip=False, g=generator(0, step)) for step in range(12)]
    lefts = {int(v.time_ids[3]) for v in views}
    assert len(lefts) > 3, "random crop did not move between steps"
    for v in views:  # original size, crop top-left in resized coordinates, target size
        assert v.time_ids[:3].tolist() == [64, 96, 0] and v.time_ids[4:].tolist() == [32, 32]
        assert v.key is None  # random crops are never cached
    again = augment(img, 32, center_crop=False, flip=False, g=generator(0, 5))
    assert torch.equal(again.pixels, views[5].pixels)  # the same step draws the same view
    centre = augment(img, 32, center_crop=True, flip=True, g=generator(0, 0))
    assert centre.key == (1, 0, 8) and centre.time_ids.tolist() == [64, 96, 0, 8, 32, 32]
    small = augment(Image.new("RGB", (40, 20)), 32, False, False, generator(0))
    assert small.time_ids[:2].tolist() == [20, 40]  # each image keeps its own original size


def test_batch_plan_covers_each_epoch_and_splits_ranks():
    plan = BatchPlan({(64, 64): list(range(5))}, n_class=3, batch_size=2, world=2, seed=1)
    assert plan.micro_batches_per_epoch == 2
    seen = [i for m in range(5) for rank in range(2) for i, _ in plan.micro_batch(m, rank).pairs]
    for epoch in range(4):  # the stream is a sequence of permutations of the 5 images
        assert sorted(seen[epoch * 5:(epoch + 1) * 5]) == list(range(5))
    a, b = plan.micro_batch(0, 0).pairs, plan.micro_batch(0, 1).pairs
    assert {i for i, _ in a}.isdisjoint({i for i, _ in b})
    assert all(c is not None and 0 <= c < 3 for _, c in a + b)
    order = lambda seed: [i for m in range(5) for i, _ in BatchPlan({(8, 8): list(range(5))}, 0, 1, 1, seed).micro_batch(m, 0).pairs]
    assert order(1) == order(1) and order(1) != order(2)  # the seed decides the order
