"""Any dreampeft adapter (all four methods) in a diffusers pipeline, from a run folder or file.

    dp.load_into_pipeline(pipe, "dog_run/", adapter_name="dog", scale=0.8)
    dp.load_into_pipeline(pipe, "style_run/", adapter_name="style")   # a second one: blended
    dp.set_adapters(pipe, ["dog", "style"], [1.0, 0.6])
    dp.fuse(pipe); dp.unfuse(pipe); dp.unload(pipe, "style"); dp.unload(pipe)

One adapter is held by the adapter layers themselves (fast paths included). A second named
adapter turns each target into an ``AdapterBlend``: per-adapter layers sharing the one frozen
Linear, whose outputs are added with each layer's own scale (its blend weight). Fusing folds
every member's scale·ΔW into the shared weight, exactly as a single adapter does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adapters import AdapterLayer, ConfigError
from .inject import _set_submodule, adapter_layers, merge_adapters, remove_adapters, unmerge_adapters
from .state import AdapterFileError, build_layers, check_fits, open_adapter

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DEFAULT_NAME = "default"
MAX_SCALE = 4  # the strengths the app and compare accept: beyond ±4 an adapter only saturates the model


def check_scale(scale: float, name: str = "adapter scale") -> None:
    """Refuse an adapter strength outside ±MAX_SCALE, naming the field or flag (``name``)."""
    if not -MAX_SCALE <= float(scale) <= MAX_SCALE:
        raise ConfigError(f"{name} must be between -{MAX_SCALE} and {MAX_SCALE} (got {scale})")


class AdapterBlend(nn.Module):
    """Several named adapters on one frozen Linear: base(x) + Σ scale_i · x ΔW_iᵀ."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for layer in self.adapters.values():
            if layer.enabled and not layer.merged and layer.scale != 0:
                delta = layer.adapter_forward(x.to(layer.adapter_dtype)) * layer.scale
                out = out + delta.to(out.dtype)
        return out


def registry(pipe) -> dict[str, dict[str, dict[str, AdapterLayer]]]:
    """The pipeline's loaded adapters, in load order: name → component → target → layer. The one
    record of which layer belongs to which adapter (a layer's place in the model says nothing)."""
    if not isinstance(getattr(pipe, "_dreampeft_registry", None), dict):
        pipe._dreampeft_registry = {}
    return pipe._dreampeft_registry


def _names(pipe) -> list[str]:
    return list(registry(pipe))


def _adapted(pipe) -> dict:
    return {c: getattr(pipe, c) for c in COMPONENTS
            if getattr(pipe, c, None) is not None and adapter_layers(getattr(pipe, c))}


def _layers_of(pipe, name: str) -> list[AdapterLayer]:
    """The adapter layers of adapter ``name`` in every component."""
    return [layer for layers in registry(pipe)[name].values() for layer in layers.values()]


def load_into_pipeline(pipe, path: str | Path, adapter_name: str | None = None, scale: float = 1.0) -> dict:
    """Load a native dreampeft adapter into ``pipe``'s components; returns its manifest.

    All or nothing: the file is read and checked whole and the new layers are built aside; the
    pipeline changes only when every one is ready. Loaded adapters are frozen, in eval mode."""
    af = open_adapter(path)
    wanted = list(af.manifest["components"])
    missing = [c for c in wanted if getattr(pipe, c, None) is None]
    if missing:
        raise AdapterFileError(f"{af.weights} adapts {missing}, which {type(pipe).__name__} does not have")
    name = adapter_name or DEFAULT_NAME
    if _adapted(pipe) and not _names(pipe):
        raise ValueError("this pipeline carries adapters not loaded by load_into_pipeline; "
                         "call dp.unload(pipe) first")
    if name in _names(pipe):
        raise ValueError(f"an adapter named {name!r} is loaded already; pick another adapter_name "
                         f"or dp.unload(pipe, {name!r}) first")
    built = {}
    for comp in wanted:
        model = getattr(pipe, comp)
        check_fits(comp, model, af.entry(comp), af.weights, existing_ok=True)
        built[comp] = build_layers(af, comp, model)
    first = _names(pipe)[0] if _names(pipe) else None
    for comp, layers in built.items():  # nothing below can fail: commit
        model = getattr(pipe, comp)
        for target, layer in layers.items():
            layer.requires_grad_(False)
            layer.eval()
            layer.set_scale(scale)
            module = model.get_submodule(target)
            if first is None:
                _set_submodule(model, target, layer)
                continue
            if not isinstance(module, AdapterBlend):
                blend = AdapterBlend(getattr(module, "base_layer", module))
                if isinstance(module, AdapterLayer):
                    blend.adapters[first] = module
                _set_submodule(model, target, blend)
                module = blend
            module.adapters[name] = layer
    registry(pipe)[name] = built
    return af.manifest


def set_adapters(pipe, names: list[str], weights: list[float] | None = None) -> None:
    """Activate ``names`` with ``weights`` (default 1.0); every other loaded adapter gets 0."""
    weights = weights or [1.0] * len(names)
    unknown = sorted(set(names) - set(_names(pipe)))
    if unknown or len(weights) != len(names):
        raise ValueError(f"unknown adapter(s) {unknown} (loaded: {_names(pipe)}) or weights/names mismatch")
    chosen = dict(zip(names, weights))
    for name in _names(pipe):
        for layer in _layers_of(pipe, name):
            layer.set_scale(chosen.get(name, 0.0))


def set_pipeline_scale(pipe, scale: float) -> None:
    """Set the scale of every loaded adapter."""
    set_adapters(pipe, _names(pipe), [scale] * len(_names(pipe)))


def fuse(pipe) -> None:
    """Fold ΔW into the weights (faster inference); ``unfuse`` restores them."""
    for model in _adapted(pipe).values():
        merge_adapters(model)


def unfuse(pipe) -> None:
    for model in _adapted(pipe).values():
        unmerge_adapters(model)


def unload(pipe, adapter_name: str | None = None) -> None:
    """Remove one adapter (or all) and restore the plain Linear layers' original weights."""
    names = [adapter_name] if adapter_name else _names(pipe)
    for name in names:
        if name not in _names(pipe):
            raise ValueError(f"no adapter named {name!r} is loaded (loaded: {_names(pipe)})")
    for name in names:
        for comp, layers in registry(pipe).pop(name).items():
            model = getattr(pipe, comp)
            for target, layer in layers.items():
                layer.unmerge()
                module = model.get_submodule(target)
                if isinstance(module, AdapterBlend):
                    module.adapters.pop(name)
                    if module.adapters:
                        continue
                _set_submodule(model, target, layer.base_layer)
    if adapter_name is None:  # and adapters put there by other code (inject_adapters, load_adapter)
        for model in _adapted(pipe).values():
            remove_adapters(model, merge=False)
