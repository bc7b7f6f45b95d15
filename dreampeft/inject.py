"""Find target layers (Linear; Conv2d for LoRA, LoRA-Dash and DoRA), wrap them in adapters, and operate on all
adapters of a model."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .adapters import AdapterConfig, AdapterLayer, get_method
from .adapters.base import conv_methods_text, layer_kinds


def _matches(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(name == e or name.endswith("." + e) or re.fullmatch(e, name) for e in exclude)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Qualified names of the modules ``config`` targets; raises if none, or if the method cannot
    adapt one (every method adapts ``nn.Linear``; LoRA, LoRA-Dash and DoRA ``nn.Conv2d`` too)."""
    layer_cls = get_method(config.method)
    regex = re.compile(config.target_regex) if config.target_regex else None
    names, wrong_type = [], []
    for name, module in model.named_modules():
        if not name or isinstance(module, AdapterLayer) or ".base_layer" in name:
            continue
        hit = _matches(name, config.target_modules) or (regex is not None and regex.fullmatch(name))
        if not hit or _excluded(name, config.exclude_modules):
            continue
        (names if isinstance(module, layer_cls.base_types) else wrong_type).append((name, type(module).__name__))
    kinds = layer_kinds(layer_cls)
    if wrong_type:
        listed = ", ".join(f"{n} ({t})" for n, t in wrong_type[:5])
        conv = (f" (convolutions take --adapter {conv_methods_text()})"
                if any(t == "Conv2d" for _, t in wrong_type) else "")
        raise TypeError(f"{config.method} adapts {kinds} layers, but these match too: {listed}{conv}; "
                        f"narrow target_modules/target_regex or add them to exclude_modules")
    if not names:
        patterns = list(config.target_modules) + ([f"re:{config.target_regex}"] if regex else [])
        sample = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"no {kinds} module of {type(model).__name__} matches {patterns}; "
                         f"Linear names look like: {sample}")
    return [n for n, _ in names]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_adapters(model: nn.Module, config: AdapterConfig, names: list[str] | None = None) -> list[str]:
    """Wrap every targeted layer (or exactly ``names``) in the config's adapter layer.

    Freezes the whole model and leaves only adapter tensors trainable. Returns the qualified
    names of the wrapped layers, in model order. All or nothing: every layer is built before the
    model changes, so a layer the method refuses leaves the model as it was.
    """
    layer_cls = get_method(config.method)
    if names is None:
        names = find_targets(model, config)
    existing = adapter_layers(model)
    clash = [n for n in names if n in existing]
    if clash:
        raise ValueError(f"{clash[0]} already has an adapter; call remove_adapters(model) first")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    built = {}
    try:
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"model has no module named {name!r}") from None
            built[name] = layer_cls(module, config)  # raises if the method cannot adapt this layer
            built[name].train(module.training)  # a new module starts in train mode; take the model's
    except Exception:
        for p, flag in flags:  # each constructor froze its base layer
            p.requires_grad_(flag)
        raise
    for name, layer in built.items():
        _set_submodule(model, name, layer)
    mark_only_adapters_trainable(model)
    return list(names)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def mark_only_adapters_trainable(model: nn.Module) -> None:
    model.requires_grad_(False)
    for layer in adapter_layers(model).values():
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                p.requires_grad_(True)


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for layer in adapter_layers(model).values():
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                yield p


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(layer.trainable_count() for layer in adapter_layers(model).values())


def merge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapter_layers(model).values():
        layer.unmerge()


def set_adapter_scale(model: nn.Module, scale: float) -> None:
    for layer in adapter_layers(model).values():
        layer.set_scale(scale)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model: ``with dp.disable_adapters(unet): ...``."""
    layers = adapter_layers(model).values()
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.enabled = state


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Eval mode for the duration (adapter dropout off, deterministic outputs); afterwards every
    submodule gets back exactly the mode it had."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


@torch.no_grad()
def remove_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the plain layers back, optionally with ΔW merged into them."""
    for name, layer in adapter_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    return model


def _with_weight(base: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A copy of ``base`` (same class and hyper-parameters: a conv keeps its stride and padding)
    holding ``weight`` and sharing ``base``'s bias; ``base`` itself is untouched."""
    plain = copy.copy(base)
    plain._parameters = {**base._parameters, "weight": nn.Parameter(weight, requires_grad=False)}
    return plain


@contextlib.contextmanager
@torch.no_grad()
def merged_copies(*models: nn.Module):
    """Inside the block every adapter layer is replaced by a plain Linear/Conv2d holding a new tensor
    W0 + scale·ΔW (summed in float32, then cast, as ``merge`` does); on exit the adapter layers go
    back untouched. For writing a merged model from the one in memory without changing it (``merge``
    then ``unmerge`` would leave rounding in W0); costs one copy of the adapted weights meanwhile."""
    swapped = []
    try:
        for model in models:
            for name, layer in adapter_layers(model).items():
                w = layer.base_layer.weight
                if layer.enabled and not layer.merged and layer.scale != 0:  # else W0 already is the weight
                    w = (w.float() + layer.scale * layer.delta_weight()).to(w.dtype)
                _set_submodule(model, name, _with_weight(layer.base_layer, w))
                swapped.append((model, name, layer))
        yield
    finally:
        for model, name, layer in swapped:
            _set_submodule(model, name, layer)
