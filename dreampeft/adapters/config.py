"""Typed, validated adapter configs shared by every method.

Every method's config is a dataclass deriving from ``AdapterConfig``. Field types are checked
against the annotations on construction, unknown keys are rejected by ``from_dict`` with the list
of valid ones, and each field carries a ``help`` string in its metadata: the CLI and the Gradio
app are generated from these fields, so a new option appears everywhere by adding one field.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
# Every linear layer of SDXL's transformer blocks: attention, the feed-forward and the projections
# in and out of each block — kohya sd-scripts' default LoRA targets (all of Transformer2DModel's
# linears). On the toy a new shape needs them: attention alone cannot learn the star (README).
UNET_TRANSFORMER = UNET_ATTENTION + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
# Every layer of the resnets and of the down/upsamplers — what kohya's conv LoRA ("LoCon", its
# conv_dim) adds to the transformer set: the 3×3 convolutions, the 1×1 shortcuts and each resnet's
# time-embedding projection. LoRA, LoRA-Dash and DoRA adapt convolutions (``base.conv_methods``).
UNET_RESNETS = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
UNET_RESNET_CONVS = tuple(t for t in UNET_RESNETS if t != "time_emb_proj")  # the nn.Conv2d among them
UNET_TARGET_SETS = {"attention": UNET_ATTENTION, "transformer": UNET_TRANSFORMER, "resnets": UNET_RESNETS}


def expand_target_sets(targets: list[str]) -> list[str]:
    """Target lists may name a set of UNET_TARGET_SETS ("transformer"); each becomes its suffixes
    (duplicates dropped, order kept) so what is saved beside the weights is the modules adapted."""
    expanded = [suffix for t in targets for suffix in UNET_TARGET_SETS.get(t, (t,))]
    return list(dict.fromkeys(expanded))


def option(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its help text (shown by the CLI and the app)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """An invalid configuration value; the message says what to change."""


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_fields(obj: Any) -> None:
    """Check every dataclass field of ``obj`` against its annotation; coerce int→float, tuple→list."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if not _type_ok(value, hint):
            raise ConfigError(
                f"{type(obj).__name__}.{f.name} = {value!r} is not a valid {_hint_name(hint)}"
            )
        if _float_only(hint) and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, float(value))
        if isinstance(value, tuple):
            setattr(obj, f.name, list(value))


def _float_only(hint: Any) -> bool:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else (hint,)
    return float in args and int not in args


def _hint_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "choice among " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple) and typing.get_args(hint):
        return "list of " + _hint_name(typing.get_args(hint)[0])
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class AdapterConfig:
    """Where to put adapters; subclasses add the method's own options."""

    method: ClassVar[str] = ""

    target_modules: list[str] = option(
        list(UNET_ATTENTION),
        "module-name suffixes to adapt (e.g. to_q, to_out.0); a module matches when its qualified "
        "name equals a suffix or ends with '.' + suffix",
    )
    target_regex: str | None = option(
        None, "regular expression over qualified module names (full match); used in addition to "
        "target_modules")
    exclude_modules: list[str] = option(
        [], "module-name suffixes or regexes (full match) to leave untouched even when targeted")

    def __post_init__(self) -> None:
        check_fields(self)
        require(bool(self.target_modules) or self.target_regex is not None,
                f"{type(self).__name__}: give target_modules or target_regex; nothing to adapt")
        require(all(t.strip() for t in self.target_modules),
                f"{type(self).__name__}.target_modules has an empty name: {self.target_modules!r}")
        for pattern in [self.target_regex] if self.target_regex else []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"target_regex {pattern!r} is not a valid regex: {exc}") from None
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise ConfigError with what to change."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} option(s) {unknown}; valid: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)
