"""A procedural world of captioned 64×64 images, deterministic from a seed.

One object (a shape in a colour, at a size and position) on a plain or patterned background:

    >>> scene = sample_scene(random.Random(0)); scene.caption()
    'a small red triangle in the top left corner on a gray background'
    >>> image = render(scene)                                  # PIL 64×64 RGB

Captions leave out some attributes at random (the model then learns their marginals), so short
prompts like "a blue circle" work too. ``SUBJECTS`` are objects the toy base model never sees —
a new shape and a new surface pattern — for the DreamBooth benchmark (``python -m dreampeft.toy
bench``). Shapes are drawn at 4× and downsampled, so edges are anti-aliased the same way always.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 50, 180), "orange": (245, 130, 20), "white": (245, 245, 245),
           "gray": (128, 128, 128), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
PLAIN = ("white", "gray", "black", "blue", "green", "yellow")
PATTERNS = ("striped", "checkered", "dotted")
BACKGROUNDS = PLAIN + PATTERNS
POSITIONS = {"center": (0.5, 0.5), "top left": (0.27, 0.27), "top right": (0.73, 0.27),
             "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73)}
SIZES = {"small": 0.22, "large": 0.42}  # object diameter as a share of the image side
# Objects the base model never sees: a new shape, and a known shape with a new surface pattern.
SUBJECTS = {"star": ("star", "orange"), "striped_ball": ("circle", "red_white_stripes")}
# Another one for choosing learning rates (``python -m dreampeft.toy sweep``): tuning on the subjects
# that are reported would flatter the methods tuned hardest.
TUNING_SUBJECTS = {"cross": ("cross", "purple")}  # not a recontext background colour
ALL_SUBJECTS = {**SUBJECTS, **TUNING_SUBJECTS}
OBJECTS = SHAPES + tuple(ALL_SUBJECTS)  # the judge's object classes
STRIPE_COLOURS = OBJECT_COLOURS + ("white",)  # for ``striped`` objects (the VAE's training set only)


@dataclass(frozen=True)
class Scene:
    shape: str  # one of SHAPES, or an ALL_SUBJECTS key
    colour: str  # a COLOURS key (a subject's own surface for ALL_SUBJECTS)
    size: str
    position: str
    background: str
    jitter: tuple[float, float] = (0.0, 0.0)  # offset in image shares, for variety
    angle: float = 0.0  # degrees
    mention: tuple[str, ...] = ("size", "position", "background")  # attributes the caption names
    # the object's diameter × this: only the judge's training draws objects off the two sizes (toy
    # models draw dots smaller than "small", which a judge that never saw one read as the star)
    scale: float = 1.0

    def caption(self, name: str | None = None) -> str:
        """English caption; ``name`` replaces "colour shape" (e.g. "sks object" for a subject)."""
        words = ["a"]
        if "size" in self.mention:
            words.append(self.size)
        words.append(name or f"{self.colour} {self.shape}")
        if "position" in self.mention:
            words.append(position_phrase(self.position))
        if "background" in self.mention:
            words.append(f"on a {self.background} background")
        return " ".join(words)


def position_phrase(position: str) -> str:
    """How captions name a position: "in the center", "in the top left corner"."""
    return "in the center" if position == "center" else f"in the {position} corner"


ATTRIBUTES = ("size", "position", "background")  # what a caption can name besides the object


def instance_caption(scene: Scene, name: str = "sks object", mention: tuple[str, ...] = ATTRIBUTES) -> str:
    """A subject image's caption naming what it shows besides the subject (kohya-style captions; by
    default size, position and background), e.g. "a large sks object in the center on a white background"."""
    return replace(scene, mention=tuple(mention)).caption(name)


def instance_tags(scene: Scene, name: str = "sks object", mention: tuple[str, ...] = ATTRIBUTES) -> str:
    """``instance_caption`` as kohya's comma-separated tags, the subject first: "a sks object, large,
    in the center, on a white background" (what ``--caption_tag_dropout_rate`` drops parts of)."""
    words = {"size": scene.size, "position": position_phrase(scene.position),
             "background": f"on a {scene.background} background"}
    return ", ".join([f"a {name}", *(words[a] for a in ATTRIBUTES if a in mention)])


def sample_scene(rng: random.Random, subject: str | None = None, mention_p: float = 0.7) -> Scene:
    """A random scene of the base world, or one showing ``subject`` (an ALL_SUBJECTS key)."""
    shape, colour = (subject, ALL_SUBJECTS[subject][1]) if subject else (rng.choice(SHAPES), rng.choice(OBJECT_COLOURS))
    background = rng.choice([b for b in BACKGROUNDS if b != colour])
    mention = tuple(a for a in ("size", "position", "background") if rng.random() < mention_p)
    return Scene(shape, colour, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), background,
                 (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)), rng.uniform(-12, 12), mention)


def asked(prompt: str) -> dict[str, str]:
    """The size, position and background a prompt asks for, in the captions' words ("a small sks
    object in the top left corner on a green background" → all three); what it does not name is absent."""
    found = {}
    words = re.findall(r"[a-z]+", prompt.lower())
    found.update({"size": w for w in words if w in SIZES})
    for position in POSITIONS:
        if position_phrase(position) in prompt.lower():
            found["position"] = position
    background = re.search(r"on an? ([a-z]+) background", prompt.lower())
    if background and background.group(1) in BACKGROUNDS:
        found["background"] = background.group(1)
    return found


def world_sample(seed: int, index: int, subject_rate: float = 0.0) -> Scene:
    """Scene ``index`` of the world with this seed: the same on every machine and run."""
    rng = random.Random(seed * 1_000_003 + index)
    subject = rng.choice(list(ALL_SUBJECTS)) if rng.random() < subject_rate else None
    return sample_scene(rng, subject)


def _background(draw: ImageDraw.ImageDraw, name: str, side: int) -> None:
    if name in COLOURS:
        draw.rectangle([0, 0, side, side], fill=COLOURS[name])
        return
    light, dark = (200, 200, 200), (90, 90, 90)
    draw.rectangle([0, 0, side, side], fill=light)
    cell = side // 8
    for i in range(8):
        for j in range(8):
            x, y = i * cell, j * cell
            if name == "striped" and i % 2 == 0:
                draw.rectangle([x, 0, x + cell - 1, side], fill=dark)
            elif name == "checkered" and (i + j) % 2 == 0:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=dark)
            elif name == "dotted":
                r = cell // 4
                draw.ellipse([x + cell // 2 - r, y + cell // 2 - r, x + cell // 2 + r, y + cell // 2 + r], fill=dark)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r) for k in range(4)]
    elif shape == "diamond":
        pts = [(k * math.pi / 2, r) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r) for k in range(3)]
    elif shape == "cross":  # a plus sign, arms 0.6 r wide: 12 corners
        w = 0.3 * r
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w),
                   (-w, w), (-w, r)]
        pts = [(math.atan2(y, x), math.hypot(x, y)) for x, y in corners]
    else:  # star: five points, inner radius 0.45 r
        pts = [(-math.pi / 2 + k * math.pi / 5, r if k % 2 == 0 else 0.45 * r) for k in range(10)]
    a = math.radians(angle)
    return [(cx + rad * math.cos(t + a), cy + rad * math.sin(t + a)) for t, rad in pts]


def _geometry(scene: Scene, side: int) -> tuple[str, float, float, float]:
    """(base shape, centre x, centre y, radius) in pixels of a ``side``-pixel canvas."""
    px, py = POSITIONS[scene.position]
    shape = ALL_SUBJECTS[scene.shape][0] if scene.shape in ALL_SUBJECTS else scene.shape
    return shape, (px + scene.jitter[0]) * side, (py + scene.jitter[1]) * side, SIZES[scene.size] * scene.scale * side / 2


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, side: int, fill) -> None:
    shape, cx, cy, r = _geometry(scene, side)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, scene.angle), fill=fill)


def striped(scene: Scene, rng: random.Random) -> Scene:
    """``scene`` with its object in diagonal bands of two random colours. The toy VAE also trains on
    such objects, as SDXL's VAE has seen every kind of surface: trained on the base world alone it
    decoded the striped-ball subject as a plain blob. The UNet and text encoders never see them."""
    ink, paper = rng.sample(STRIPE_COLOURS, 2)
    return replace(scene, colour=f"{ink}_{paper}_stripes")


def render(scene: Scene) -> Image.Image:
    side = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (side, side))
    _background(ImageDraw.Draw(image), scene.background, side)
    if scene.colour.endswith("_stripes"):  # "A_B_stripes": diagonal bands of A on B, clipped to the shape
        ink, paper, _ = scene.colour.split("_")
        _, _, _, r = _geometry(scene, side)
        stripes = Image.new("RGB", (side, side), COLOURS[paper])
        sd = ImageDraw.Draw(stripes)
        band = max(2, int(r / 2))  # 4 bands across: ~1 latent pixel each on a small ball (4× VAE)
        for k in range(-side, 2 * side, 2 * band):
            sd.polygon([(k, 0), (k + band, 0), (k + band - side, side), (k - side, side)], fill=COLOURS[ink])
        image.paste(stripes, (0, 0), object_mask(scene, side))
    else:
        _draw_shape(ImageDraw.Draw(image), scene, side, COLOURS[scene.colour])
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def object_mask(scene: Scene, side: int = SIZE) -> Image.Image:
    """The object's silhouette (L mode, 255 inside) at ``side`` pixels, anti-aliased like ``render``."""
    big = SIZE * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(mask), scene, big, 255)
    return mask if side == big else mask.resize((side, side), Image.LANCZOS)


def subject_scenes(subject: str, n: int, seed: int = 0) -> list[Scene]:
    """``n`` instance scenes of ``subject`` with varied positions, sizes and backgrounds — none of
    the backgrounds the benchmark's recontext prompts ask for (INSTANCE_BACKGROUNDS)."""
    rng = random.Random(f"{subject}-{seed}")
    scenes = []
    for i in range(n):
        s = sample_scene(rng, subject)
        scenes.append(replace(s, background=INSTANCE_BACKGROUNDS[i % len(INSTANCE_BACKGROUNDS)],
                              position=list(POSITIONS)[i % len(POSITIONS)]))
    return scenes


INSTANCE_BACKGROUNDS = ("white", "gray", "blue", "striped")
