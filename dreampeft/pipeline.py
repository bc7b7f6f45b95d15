"""Any dreampeft adapter (all four methods) in a diffusers pipeline, from a run folder or file.

    dp.load_into_pipeline(pipe, "my_run/", scale=0.8)   # UNet and any trained text encoders
    dp.set_pipeline_scale(pipe, 0.5); dp.fuse(pipe); dp.unfuse(pipe); dp.unload(pipe)

One dreampeft adapter per pipeline at a time (blending several is planned).
"""

from __future__ import annotations

from pathlib import Path

from .inject import adapter_layers, merge_adapters, remove_adapters, set_adapter_scale, unmerge_adapters
from .state import AdapterFileError, load_adapter, read_manifest

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _adapted(pipe) -> dict:
    return {c: getattr(pipe, c) for c in COMPONENTS
            if getattr(pipe, c, None) is not None and adapter_layers(getattr(pipe, c))}


def load_into_pipeline(pipe, path: str | Path, scale: float = 1.0) -> dict:
    """Load a native dreampeft adapter into ``pipe``'s components; returns its manifest."""
    manifest = read_manifest(path)[1]
    wanted = list(manifest["components"])
    missing = [c for c in wanted if getattr(pipe, c, None) is None]
    if missing:
        raise AdapterFileError(f"{path} adapts {missing}, which {type(pipe).__name__} does not have")
    if _adapted(pipe):
        raise ValueError("this pipeline already carries a dreampeft adapter; call dp.unload(pipe) first")
    load_adapter({c: getattr(pipe, c) for c in wanted}, path)
    set_pipeline_scale(pipe, scale)
    return manifest


def set_pipeline_scale(pipe, scale: float) -> None:
    for model in _adapted(pipe).values():
        set_adapter_scale(model, scale)


def fuse(pipe) -> None:
    """Fold ΔW into the weights (faster inference); ``unfuse`` restores them."""
    for model in _adapted(pipe).values():
        merge_adapters(model)


def unfuse(pipe) -> None:
    for model in _adapted(pipe).values():
        unmerge_adapters(model)


def unload(pipe) -> None:
    """Remove the adapter and restore the plain Linear layers with their original weights."""
    for model in _adapted(pipe).values():
        remove_adapters(model, merge=False)
