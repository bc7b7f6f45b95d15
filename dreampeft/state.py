"""Native save/load: one safetensors file whose metadata carries the full structure.

The manifest (method configs with their seeds, target names and shapes, format version) is
stored in the safetensors header *and* beside it as readable JSON, so a file alone is enough to
rebuild the adapters on a fresh model. Loading checks every target and shape before touching
the model: it either loads everything or raises, never a silent partial load.

Tensor keys are ``{component}/{module name}.{tensor name}``; a bare model is component "model",
a pipeline's parts are passed as a dict (``{"unet": unet, "text_encoder": te}``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters import config_from_dict
from .inject import adapter_layers, inject_adapters

FORMAT = "dreampeft-adapter"
FORMAT_VERSION = 1
WEIGHTS_NAME = "dreampeft_adapter.safetensors"
MANIFEST_NAME = "dreampeft_adapter.json"


class AdapterFileError(ValueError):
    """The adapter file is missing, damaged, or does not fit the model; says which and why."""


def _components(models: nn.Module | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    return {"model": models} if isinstance(models, nn.Module) else dict(models)


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / WEIGHTS_NAME, path / MANIFEST_NAME


def build_manifest(components: dict[str, nn.Module]) -> dict:
    out = {"format": FORMAT, "format_version": FORMAT_VERSION, "components": {}}
    for comp, model in components.items():
        configs, targets = [], {}
        for name, layer in adapter_layers(model).items():
            cfg = layer.config.to_dict()
            if cfg not in configs:
                configs.append(cfg)
            targets[name] = {"shape": [layer.out_features, layer.in_features],
                             "config": configs.index(cfg)}
        if not targets:
            raise ValueError(f"component {comp!r} has no adapters to save; call inject_adapters first")
        out["components"][comp] = {"configs": configs, "targets": targets}
    return out


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_adapter(models: nn.Module | Mapping[str, nn.Module], path: str | Path,
                 extra_metadata: dict | None = None) -> Path:
    """Save every adapter's tensors and structure. ``path``: a folder or a ``.safetensors`` file."""
    from . import __version__

    components = _components(models)
    manifest = build_manifest(components)
    manifest["dreampeft_version"] = __version__
    manifest.update(extra_metadata or {})
    tensors = {}
    for comp, model in components.items():
        for name, layer in adapter_layers(model).items():
            for key, t in layer.adapter_state().items():
                tensors[f"{comp}/{name}.{key}"] = t.detach().to("cpu").contiguous()
    weights, manifest_path = _paths(path)
    text = json.dumps(manifest, indent=1, sort_keys=True)
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", FORMAT: text}))
    atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(text + "\n"))
    return weights


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    weights, manifest_path = _paths(path)
    if Path(path).is_dir() and not weights.exists():
        raise AdapterFileError(f"{path} holds no {WEIGHTS_NAME}; pass a dreampeft output folder or file")
    if not weights.exists():
        raise AdapterFileError(f"adapter file {weights} does not exist")
    try:
        with safe_open(weights, framework="pt") as f:
            text = (f.metadata() or {}).get(FORMAT)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise AdapterFileError(f"{weights} is not a readable safetensors file ({exc}); "
                               "it may be truncated: re-export or re-download it") from None
    if text is None and manifest_path.exists():
        text = manifest_path.read_text()
    if text is None:
        raise AdapterFileError(f"{weights} carries no dreampeft manifest; for plain LoRA files use "
                               "dreampeft.pipeline or diffusers' load_lora_weights")
    manifest = json.loads(text)
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterFileError(f"{weights} has format version {manifest['format_version']}; "
                               f"this dreampeft reads up to {FORMAT_VERSION}: upgrade dreampeft")
    return weights, manifest


def check_fits(comp: str, model: nn.Module, entry: dict, source: Path, existing_ok: bool = False) -> None:
    """Raise unless every saved target exists with its shape (and, unless ``existing_ok``, the
    model carries no adapters elsewhere)."""
    existing = {} if existing_ok else adapter_layers(model)
    problems = []
    for name, info in entry["targets"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"no module {name}")
            continue
        base = getattr(module, "base_layer", module)  # an adapter layer or blend wraps the Linear
        if not isinstance(base, nn.Linear):
            problems.append(f"{name} is {type(base).__name__}, not Linear")
        elif [base.out_features, base.in_features] != info["shape"]:
            problems.append(f"{name} is {base.out_features}x{base.in_features}, file has "
                            f"{info['shape'][0]}x{info['shape'][1]}")
    if existing and set(existing) != set(entry["targets"]):
        problems.append(f"model already has adapters on {len(existing)} other layers")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterFileError(f"{source} does not fit {comp} ({type(model).__name__}): "
                               + "; ".join(problems[:3]) + more + ". Was it trained on another base model?")


def load_adapter(models: nn.Module | Mapping[str, nn.Module], path: str | Path) -> dict:
    """Rebuild the saved adapters on ``models`` (injecting them if absent) and load their tensors."""
    weights, manifest = read_manifest(path)
    saved = manifest["components"]
    components = _components(models)
    if isinstance(models, nn.Module):
        if len(saved) != 1:
            raise AdapterFileError(f"{weights} holds components {sorted(saved)}; pass a dict of models")
        components = {next(iter(saved)): models}
    missing = sorted(set(components) - set(saved))
    if missing:
        raise AdapterFileError(f"{weights} has no adapter for {missing}; it holds {sorted(saved)}")
    for comp, model in components.items():
        check_fits(comp, model, saved[comp], weights)
    with safe_open(weights, framework="pt") as f:
        file_keys = set(f.keys())
        for comp, model in components.items():
            entry = saved[comp]
            if not adapter_layers(model):
                configs = [config_from_dict(c) for c in entry["configs"]]
                for i, cfg in enumerate(configs):
                    names = [n for n, t in entry["targets"].items() if t["config"] == i]
                    inject_adapters(model, cfg, names=names)
            _load_tensors(comp, model, f, file_keys, weights)
    return manifest


@torch.no_grad()
def _load_tensors(comp: str, model: nn.Module, f, file_keys: set[str], source: Path) -> None:
    layers = adapter_layers(model)
    wanted = {f"{comp}/{n}.{k}": t for n, layer in layers.items() for k, t in layer.adapter_state().items()}
    absent = sorted(set(wanted) - file_keys)
    if absent:
        raise AdapterFileError(f"{source} lacks {len(absent)} tensor(s), e.g. {absent[0]}; "
                               "the file is incomplete or from another dreampeft version")
    extra = sorted(k for k in file_keys if k.startswith(comp + "/") and k not in wanted)
    if extra:
        raise AdapterFileError(f"{source} has unexpected tensor(s), e.g. {extra[0]}")
    for key, dest in wanted.items():
        src = f.get_tensor(key)
        if src.shape != dest.shape:
            raise AdapterFileError(f"{source}: {key} has shape {tuple(src.shape)}, expected {tuple(dest.shape)}")
        # In place: optimizers and DDP keep references to these exact tensors.
        dest.copy_(src.to(dest.device, dest.dtype))
