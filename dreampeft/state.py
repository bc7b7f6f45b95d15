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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapters import AdapterConfig, AdapterLayer, ConfigError, config_from_dict, get_method
from .inject import _set_submodule, adapter_layers, mark_only_adapters_trainable

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
            targets[name] = {"shape": list(layer.base_layer.weight.shape),  # (out, in[, kh, kw])
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
    if not weights.is_file():
        raise AdapterFileError(f"adapter file {weights} does not exist")
    try:
        with safe_open(weights, framework="pt") as f:
            text = (f.metadata() or {}).get(FORMAT)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise AdapterFileError(f"{weights} is not a readable safetensors file ({exc}); "
                               "it may be truncated: re-export or re-download it") from None
    source = weights
    if text is None and manifest_path.is_file():
        text, source = manifest_path.read_text(errors="replace"), manifest_path
    if text is None:
        raise AdapterFileError(f"{weights} carries no dreampeft manifest; for plain LoRA files use "
                               "dreampeft.pipeline or diffusers' load_lora_weights")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{source}: the dreampeft manifest is not valid JSON ({exc}); "
                               "re-export the adapter") from None
    version = manifest.get("format_version", 0) if isinstance(manifest, dict) else 0
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(f"{weights} has format version {version!r}; "
                               f"this dreampeft reads up to {FORMAT_VERSION}: upgrade dreampeft")
    _check_manifest(manifest, source)
    return weights, manifest


def _check_manifest(manifest, source: Path) -> None:
    """The structure every loader relies on: components → configs (parsed later) and targets."""
    def bad(why: str):
        raise AdapterFileError(f"{source}: damaged dreampeft manifest ({why}); re-export the adapter")

    if not isinstance(manifest, dict) or not isinstance(manifest.get("components"), dict) \
            or not manifest["components"]:
        bad("no components")
    for comp, entry in manifest["components"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("configs"), list) \
                or not isinstance(entry.get("targets"), dict) or not entry["targets"]:
            bad(f"component {comp!r} lacks configs or targets")
        for name, info in entry["targets"].items():
            shape, index = (info.get("shape"), info.get("config")) if isinstance(info, dict) else (None, None)
            if not (isinstance(shape, list) and len(shape) in (2, 4) and all(isinstance(d, int) and d > 0 for d in shape)
                    and isinstance(index, int) and 0 <= index < len(entry["configs"])):
                bad(f"target {comp}/{name} has no valid shape and config index")


@dataclass
class AdapterFile:
    """A native adapter file read whole and checked: manifest, parsed configs, finite tensors."""

    weights: Path
    manifest: dict
    configs: dict[str, list[AdapterConfig]]  # component → configs, indexed by targets' "config"
    tensors: dict[str, torch.Tensor]  # "{component}/{target}.{tensor name}" → tensor

    def entry(self, comp: str) -> dict:
        return self.manifest["components"][comp]

    def config_of(self, comp: str, target: str) -> AdapterConfig:
        return self.configs[comp][self.entry(comp)["targets"][target]["config"]]


def open_adapter(path: str | Path) -> AdapterFile:
    """Read and validate everything in an adapter file before any model is touched."""
    weights, manifest = read_manifest(path)
    configs = {}
    for comp, entry in manifest["components"].items():
        try:
            configs[comp] = [config_from_dict(c) for c in entry["configs"]]
        except (ConfigError, TypeError, AttributeError) as exc:
            raise AdapterFileError(f"{weights}: saved config of {comp!r} is invalid ({exc}); "
                                   "was it written by a newer dreampeft?") from None
    try:
        with safe_open(weights, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise AdapterFileError(f"{weights}: cannot read its tensors ({exc}); the file is damaged: "
                               "re-export or re-download it") from None
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"{weights}: tensor {key} holds NaN or inf values; the run that "
                                   "wrote it diverged: retrain with a lower learning rate")
    return AdapterFile(weights, manifest, configs, tensors)


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
        base = getattr(module, "base_layer", module)  # an adapter layer or blend wraps the layer
        kind = nn.Linear if len(info["shape"]) == 2 else nn.Conv2d
        if not isinstance(base, kind):
            problems.append(f"{name} is {type(base).__name__}, not {kind.__name__}")
        elif list(base.weight.shape) != info["shape"]:
            problems.append(f"{name} is {'x'.join(map(str, base.weight.shape))}, file has "
                            f"{'x'.join(map(str, info['shape']))}")
    if existing and set(existing) != set(entry["targets"]):
        problems.append(f"model already has adapters on {len(existing)} other layers")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterFileError(f"{source} does not fit {comp} ({type(model).__name__}): "
                               + "; ".join(problems[:3]) + more + ". Was it trained on another base model?")


def check_tensors(af: AdapterFile, comp: str, layers: dict[str, AdapterLayer]) -> None:
    """Every tensor ``layers`` need is in the file with its shape, and the file holds no others."""
    wanted = {f"{comp}/{n}.{k}": t for n, layer in layers.items() for k, t in layer.adapter_state().items()}
    absent = sorted(set(wanted) - set(af.tensors))
    if absent:
        raise AdapterFileError(f"{af.weights} lacks {len(absent)} tensor(s), e.g. {absent[0]}; "
                               "the file is incomplete or from another dreampeft version")
    extra = sorted(k for k in af.tensors if k.startswith(comp + "/") and k not in wanted)
    if extra:
        raise AdapterFileError(f"{af.weights} has unexpected tensor(s), e.g. {extra[0]}")
    for key, dest in wanted.items():
        if af.tensors[key].shape != dest.shape:
            raise AdapterFileError(f"{af.weights}: {key} has shape {tuple(af.tensors[key].shape)}, "
                                   f"expected {tuple(dest.shape)}")


def check_same_config(af: AdapterFile, comp: str, layers: dict[str, AdapterLayer]) -> None:
    """Loading into existing layers is refused when the file was made with other options (another
    alpha or scaling would silently apply the wrong scale)."""
    for name, layer in layers.items():
        saved, have = af.config_of(comp, name).to_dict(), layer.config.to_dict()
        if saved != have:
            diff = ", ".join(f"{k} {have.get(k)!r} vs file {saved.get(k)!r}"
                             for k in sorted(saved.keys() | have.keys()) if saved.get(k) != have.get(k))
            raise AdapterFileError(f"{af.weights} was saved with other {comp} adapter options than the "
                                   f"layers present ({name}: {diff}); load it into a fresh model")


@torch.no_grad()
def build_layers(af: AdapterFile, comp: str, model: nn.Module) -> dict[str, AdapterLayer]:
    """New adapter layers for ``comp``'s targets, filled from the file, not yet in the model.

    Built on each target's frozen Linear (inside an adapter or blend if one is there); the model
    itself is not changed, so a later failure leaves it as it was.
    """
    layers = {}
    for name in af.entry(comp)["targets"]:
        module = model.get_submodule(name)
        base = getattr(module, "base_layer", module)
        flags = [p.requires_grad for p in base.parameters()]
        cfg = af.config_of(comp, name)
        layers[name] = get_method(cfg.method)(base, cfg)
        for p, flag in zip(base.parameters(), flags):  # the constructor freezes it; not yet
            p.requires_grad_(flag)
        layers[name].train(module.training)
    check_tensors(af, comp, layers)
    for name, layer in layers.items():
        fill(af, comp, name, layer)
    return layers


@torch.no_grad()
def fill(af: AdapterFile, comp: str, name: str, layer: AdapterLayer) -> None:
    # In place: optimizers and DDP keep references to these exact tensors.
    for key, dest in layer.adapter_state().items():
        dest.copy_(af.tensors[f"{comp}/{name}.{key}"].to(dest.device, dest.dtype))


def load_adapter(models: nn.Module | Mapping[str, nn.Module], path: str | Path) -> dict:
    """Load the saved adapters onto ``models``: into the adapters present (a resume), or as new
    layers. All or nothing: everything is read and checked first, and the models change only when
    every component is ready."""
    af = open_adapter(path)
    saved = af.manifest["components"]
    components = _components(models)
    if isinstance(models, nn.Module):
        if len(saved) != 1:
            raise AdapterFileError(f"{af.weights} holds components {sorted(saved)}; pass a dict of models")
        components = {next(iter(saved)): models}
    missing = sorted(set(components) - set(saved))
    if missing:
        raise AdapterFileError(f"{af.weights} has no adapter for {missing}; it holds {sorted(saved)}")
    ready = {}
    for comp, model in components.items():
        check_fits(comp, model, saved[comp], af.weights)
        present = adapter_layers(model)
        if present:
            check_same_config(af, comp, present)
            check_tensors(af, comp, present)
            ready[comp] = (present, False)
        else:
            ready[comp] = (build_layers(af, comp, model), True)
    for comp, (layers, new) in ready.items():  # nothing below can fail on a checked file
        model = components[comp]
        for name, layer in layers.items():
            if new:
                _set_submodule(model, name, layer)
            else:
                fill(af, comp, name, layer)
        if new:
            mark_only_adapters_trainable(model)
    return af.manifest
