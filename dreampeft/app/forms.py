"""What the app's forms accept: uploaded subject images, and method options generated from the
adapter config dataclasses (a new field in a method's config appears in the app unchanged)."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..adapters import METHODS, AdapterConfig, ConfigError
from ..dreambooth.data import IMAGE_EXTENSIONS, DreamBoothError, load_image, size_problem

IMAGE_SUFFIXES = tuple(sorted(IMAGE_EXTENSIONS))
MAX_IMAGES = 50
MAX_FILE_MB = 25


class UploadError(ValueError):
    """Uploaded files that cannot be a subject set; the message names the file and the fix."""


def check_uploads(paths: list[str] | None) -> list[Path]:
    """Validate uploaded subject images: type, count, size, readable, big enough."""
    paths = [Path(p) for p in paths or []]
    if not paths:
        raise UploadError("upload 1 to 50 images of your subject (3–5 varied photos work best)")
    if len(paths) > MAX_IMAGES:
        raise UploadError(f"{len(paths)} files uploaded; use at most {MAX_IMAGES} subject images")
    for p in paths:
        name = p.name
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise UploadError(f"{name}: not an image type this app reads; use {', '.join(IMAGE_SUFFIXES)}")
        size_mb = p.stat().st_size / 2**20
        if size_mb > MAX_FILE_MB:
            raise UploadError(f"{name}: {size_mb:.0f} MB is over the {MAX_FILE_MB} MB limit; downscale it")
        try:
            with Image.open(p) as im:
                problem = size_problem(*im.size)
                if problem is None:
                    im.verify()
            if problem is None:
                load_image(p)  # the trainer's own reader: what passes here trains
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError, DreamBoothError) as exc:
            raise UploadError(f"{name}: cannot be read as an image ({exc.__class__.__name__}); "
                              "re-save it as PNG or JPEG") from None
        if problem is not None:
            raise UploadError(f"{name}: {problem}")
    return paths


def stage_uploads(paths: list[Path], root: Path) -> Path:
    """Copy the uploads into a folder named by their content, so the same set is one folder."""
    digest = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        digest.update(p.name.encode() + b"\0" + p.read_bytes())
    folder = root / digest.hexdigest()[:12]
    if not folder.exists():
        tmp = folder.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, p in enumerate(paths):
            shutil.copy(p, tmp / f"{i:02d}-{p.name}")
        tmp.rename(folder)
    return folder


@dataclass(frozen=True)
class OptionSpec:
    """One method option as a form control: its kind picks the widget."""
    method: str
    name: str
    kind: str  # "int" | "float" | "bool" | "choice" | "text"
    default: Any
    help: str
    choices: tuple = ()
    optional: bool = False  # None is allowed (blank number → the method's default rule)
    many: bool = False  # a choice that names a comma-separated list (the field is a list)


def field_specs(cls, owner: str, names: list[str] | None = None, skip: set = frozenset()) -> list[OptionSpec]:
    """Form controls for the fields of a config dataclass (``names`` in that order, or all)."""
    hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    specs = []
    for name in names or [n for n in fields if n not in skip]:
        f, hint, optional = fields[name], hints[name], False
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint, optional = args[0], True
        if typing.get_origin(hint) is typing.Literal:
            kind, choices = "choice", typing.get_args(hint)
        else:
            kind, choices = {bool: "bool", int: "int", float: "float", str: "text"}[hint], ()
        specs.append(OptionSpec(owner, f.name, kind, f.default, f.metadata.get("help", ""), choices, optional))
    return specs


def option_specs(methods: list[str] | None = None) -> list[OptionSpec]:
    """Every option of ``methods`` (default: all, registry order), in that order, except targeting
    (the app trains the standard attention targets)."""
    skip = {f.name for f in dataclasses.fields(AdapterConfig)}
    return [s for m in methods or list(METHODS) for s in field_specs(METHODS[m].config_cls, m, skip=skip)]


# The trainer options the app offers (each a DreamBoothConfig field; masks come from the images'
# alpha channels, as the app has no mask upload; class images go to a folder the app keeps per base
# model, class prompt and resolution — ``prior_options``).
RUN_OPTIONS = ["aspect_buckets", "random_flip", "repeats", "masked_loss", "mask_background_weight",
               "caption_dropout_rate", "use_ema", "ema_decay", "train_text_encoder", "train_text_encoder_frac",
               "snr_gamma", "gradient_accumulation_steps",
               "with_prior_preservation", "class_prompt", "num_class_images", "prior_loss_weight"]
RUN = "run"  # the owner of trainer options in OptionSpec.method


# The UNet layers a run adapts: DreamBooth's attention, kohya's transformer blocks, or those and the
# resnets' convolutions (kohya's LoCon; LoRA, LoRA-Dash and DoRA: the trainer refuses it for the others).
UNET_LAYERS = ("attention", "transformer", "transformer,resnets")


# Where the app's help differs from the CLI's (the app fills in what the CLI asks for).
APP_HELP = {
    "with_prior_preservation": "DreamBooth's class-prior loss: the base model draws class images first "
                               "(kept per base model, class prompt and resolution; later runs reuse them), and "
                               "training keeps drawing them, so the class does not drift to your subject",
    "class_prompt": "what the class images show, e.g. 'a photo of a dog' (blank: the instance prompt "
                    "without its identifier)",
}


def run_option_specs() -> list[OptionSpec]:
    from ..dreambooth import DreamBoothConfig

    specs = [dataclasses.replace(s, help=APP_HELP.get(s.name, s.help))
             for s in field_specs(DreamBoothConfig, RUN, RUN_OPTIONS)]
    layers = OptionSpec(RUN, "unet_target_modules", "choice", UNET_LAYERS[0],
                        "UNet layers to adapt: attention (diffusers' default), transformer (kohya's: every linear "
                        "of the transformer blocks), transformer,resnets (kohya's LoCon: the convolutions too; "
                        "LoRA, LoRA-Dash and DoRA only)", UNET_LAYERS, many=True)
    return [*specs, layers]


def prior_options(options: dict, class_root: Path, model: str, instance_prompt: str, resolution: int) -> dict:
    """``options`` with prior preservation's class prompt and folder filled in: the prompt typed, or
    the instance prompt without its identifier; the folder named by base model, class prompt and
    resolution under ``class_root``, so every run that would draw the same class images shares them
    (the trainer generates only the missing ones, each written whole)."""
    from ..dreambooth.fidelity import class_prompt_of, subject_phrase

    if not options.get("with_prior_preservation"):
        if options.get("class_prompt"):
            raise ConfigError("class_prompt is used only with prior preservation: tick "
                              "with_prior_preservation, or clear the class prompt")
        return options
    klass = options.get("class_prompt")
    if not klass:
        if len(subject_phrase(instance_prompt).split()) < 2:
            raise ConfigError(f"prior preservation: the instance prompt {instance_prompt!r} names no class after "
                              "its identifier; write the class prompt (e.g. 'a photo of a dog')")
        klass = class_prompt_of(instance_prompt)
    key = hashlib.sha256(f"{model}\0{klass}\0{resolution}".encode()).hexdigest()[:12]
    return {**options, "class_prompt": klass, "class_data_dir": str(class_root / key)}


TRISTATE = {"auto": None, "on": True, "off": False}  # an optional bool: None means "decide from the data"


def options_from_values(specs: list[OptionSpec], values: list, method: str) -> dict:
    """Form values (in ``specs`` order) → ``adapter_options`` for ``method``; blanks keep defaults."""
    options = {}
    for spec, value in zip(specs, values):
        if spec.method != method or value is None or value == "":
            continue
        if spec.kind == "bool" and spec.optional:
            value = TRISTATE[value] if value in TRISTATE else bool(value)
        elif spec.kind in ("int", "float"):
            value = _number(spec, value)
            if value is None:
                continue
        elif spec.kind == "choice":
            value = value.split(",") if spec.many else type(spec.choices[0])(value)
        elif spec.kind == "text":
            value = str(value).strip()
            if not value:  # blank: the default (None: the trainer's or the app's rule)
                continue
        if value != spec.default:
            options[spec.name] = value
    return options


def _number(spec: OptionSpec, value) -> int | float | None:
    """A number field's value; an optional one is a text box (``ui.App._control``: Gradio's number
    box turns blank into 0 once it is shown, which would train with alpha 0 or --snr_gamma 0), so
    blank text is None — the default rule — and anything else must read as a number."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{spec.name}: {value!r} is not a number; leave it blank for the default") from None
    if spec.kind == "int":
        if value != int(value):
            raise ConfigError(f"{spec.name}: {value:g} is not a whole number")
        return int(value)
    return float(value)

