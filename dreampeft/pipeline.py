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
from safetensors import safe_open
from torch import nn

from .adapters import AdapterLayer, config_from_dict, get_method
from .inject import _set_submodule, adapter_layers, merge_adapters, remove_adapters, unmerge_adapters
from .state import AdapterFileError, check_fits, load_adapter, read_manifest

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DEFAULT_NAME = "default"


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


def _names(pipe) -> list[str]:
    return getattr(pipe, "_dreampeft_adapters", [])


def _adapted(pipe) -> dict:
    return {c: getattr(pipe, c) for c in COMPONENTS
            if getattr(pipe, c, None) is not None and adapter_layers(getattr(pipe, c))}


def _layers_of(pipe, name: str) -> list[AdapterLayer]:
    """The adapter layers of adapter ``name`` in every component."""
    single = len(_names(pipe)) == 1
    return [layer for model in _adapted(pipe).values() for full, layer in adapter_layers(model).items()
            if single or full.endswith(f".adapters.{name}")]


def load_into_pipeline(pipe, path: str | Path, adapter_name: str | None = None, scale: float = 1.0) -> dict:
    """Load a native dreampeft adapter into ``pipe``'s components; returns its manifest."""
    manifest = read_manifest(path)[1]
    wanted = list(manifest["components"])
    missing = [c for c in wanted if getattr(pipe, c, None) is None]
    if missing:
        raise AdapterFileError(f"{path} adapts {missing}, which {type(pipe).__name__} does not have")
    name = adapter_name or DEFAULT_NAME
    if _adapted(pipe) and not _names(pipe):
        raise ValueError("this pipeline carries adapters not loaded by load_into_pipeline; "
                         "call dp.unload(pipe) first")
    if name in _names(pipe):
        raise ValueError(f"an adapter named {name!r} is loaded already; pick another adapter_name "
                         f"or dp.unload(pipe, {name!r}) first")
    if not _names(pipe):
        load_adapter({c: getattr(pipe, c) for c in wanted}, path)
    else:
        _to_blends(pipe, _names(pipe)[0])
        for comp in wanted:
            _load_member(getattr(pipe, comp), comp, manifest["components"][comp], path, name)
    pipe._dreampeft_adapters = _names(pipe) + [name]
    for layer in _layers_of(pipe, name):
        layer.set_scale(scale)
    return manifest


def _to_blends(pipe, first: str) -> None:
    """Turn single-adapter layers into blends holding that adapter under ``first``."""
    for model in _adapted(pipe).values():
        for full, layer in adapter_layers(model).items():
            if ".adapters." not in full:
                blend = AdapterBlend(layer.base_layer)
                blend.adapters[first] = layer
                _set_submodule(model, full, blend)


@torch.no_grad()
def _load_member(model: nn.Module, comp: str, entry: dict, path, name: str) -> None:
    check_fits(comp, model, entry, path, existing_ok=True)
    configs = [config_from_dict(c) for c in entry["configs"]]
    new = {t: (model.get_submodule(t), configs[info["config"]]) for t, info in entry["targets"].items()}
    weights = read_manifest(path)[0]
    with safe_open(weights, framework="pt") as f:
        for target, (module, cfg) in new.items():
            blend = module if isinstance(module, AdapterBlend) else AdapterBlend(module)
            layer = get_method(cfg.method)(blend.base_layer, cfg)
            for key, dest in layer.adapter_state().items():
                dest.copy_(f.get_tensor(f"{comp}/{target}.{key}").to(dest.device, dest.dtype))
            blend.adapters[name] = layer
            if blend is not module:
                _set_submodule(model, target, blend)


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
    names = [adapter_name] if adapter_name else list(_names(pipe))
    for name in names:
        if name not in _names(pipe):
            raise ValueError(f"no adapter named {name!r} is loaded (loaded: {_names(pipe)})")
    for model in _adapted(pipe).values():
        for full, module in list(model.named_modules()):
            if isinstance(module, AdapterBlend):
                for name in names:
                    if name in module.adapters:
                        module.adapters[name].unmerge()
                        del module.adapters[name]
                if not module.adapters:
                    _set_submodule(model, full, module.base_layer)
        if len(names) == len(_names(pipe)):
            remove_adapters(model, merge=False)
    pipe._dreampeft_adapters = [n for n in _names(pipe) if n not in names]
