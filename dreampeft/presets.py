"""One home for per-model, per-method defaults: resolution, learning rate and method options.

Two presets: ``sdxl`` (real SDXL checkpoints) and ``toy`` (the 64 px models this project builds:
the toy SDXL in ``assets/toy_sdxl`` and the tiny random SDXL). The CLI's suggestions, the app's
preset fields, ``python -m dreampeft.compare``, the demo and the toy benches all read them here.
A method without an entry takes its own ``default_lr`` and its config's defaults, so a newly
registered method works everywhere at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .adapters import METHODS, ConfigError, get_method

SDXL, TOY = "sdxl", "toy"
RESOLUTION = {SDXL: 1024, TOY: 64}


@dataclass(frozen=True)
class MethodPreset:
    lr: float
    options: dict = field(default_factory=dict)  # fields of the method's config dataclass


_PRESETS: dict[str, dict[str, MethodPreset]] = {
    # SDXL. No fidelity sweep on SDXL exists (no weights or GPU where this was written); each entry
    # says where it comes from. Rates: diffusers' documented SDXL DreamBooth LoRA recipe (1e-4).
    SDXL: {
        "lora": MethodPreset(1e-4, {"r": 4}),  # diffusers' train_dreambooth_lora_sdxl defaults
        "lora_dash": MethodPreset(1e-4, {"r": 4, "warmup_steps": 100, "n_directions": 8}),  # paper's s = 8
        "dora": MethodPreset(1e-4, {"r": 4}),  # LoRA's recipe; the DoRA paper trains at LoRA's rates
        "mora": MethodPreset(1e-4, {"r": 4, "mora_type": 6}),  # type 6 (rotation): recommended for small r (METHODS.md §4)
        # Zeros, not the paper's gaussian start: with n = 1000 at scaling 150 the gaussian spectrum puts
        # ‖ΔW‖_F at 5.27 (640×640), 2.59 (1280×1280), 3.07 (640×2048), 2.01 (1280×2048) before any step
        # (computed at SDXL's attention shapes) — 0.07–0.3× ‖W‖ of SDXL's weights — so step 0 would not be
        # the base model; on the toy the same start wrecked it (prompt fidelity 0.2 whatever the rate).
        # Rate: FourierFT's paper range (1e-2..3e-1 for its spectrum), its lowest.
        "fourierft": MethodPreset(1e-2, {"n_frequency": 1000, "scaling": 150.0, "init": "zeros"}),
    },
    # The toy, from `python -m dreampeft.toy sweep` on the star at BENCH_STEPS (2 seeds; subject /
    # prompt fidelity): lora 1e-3 0.24/0.50, 2e-3 0.43/0.43; mora 2e-3 0.27/0.36, 4e-3 0.34/0.43;
    # fourierft 2.5e-5 0.09/0.64, 1e-4 0.05/0.64, 2.5e-4 0.14/0.50, 5e-4 0.07/0.29, 2.5e-3 0.12/0.14.
    # FourierFT's 2.5e-4 is not the subject + prompt maximum (2.5e-5, which leaves the base nearly as
    # it was); it is the rate at which it learns anything of the star.
    TOY: {
        "lora": MethodPreset(2e-3, {"r": 4}),
        "lora_dash": MethodPreset(2e-3, {"r": 4, "warmup_steps": 100, "n_directions": 4}),
        # Zeros, not the paper's gaussian start: on the toy's 64×64 layers n = 1000 coefficients at
        # scaling 150 start ΔW at ~11× the weight itself (‖ΔW‖ ≈ scaling·√(n/2)/√(d_out·d_in)), so
        # training began from a wrecked model (prompt fidelity 0.2 whatever the rate).
        "fourierft": MethodPreset(2.5e-4, {"n_frequency": 1000, "scaling": 150.0, "init": "zeros"}),
        "mora": MethodPreset(4e-3, {"r": 4, "mora_type": 6}),
        "dora": MethodPreset(2e-3, {"r": 4}),  # LoRA's rate and rank; not swept on the toy yet
    },
}


def method_preset(preset: str, method: str) -> MethodPreset:
    """Learning rate and options of ``method`` under ``preset`` (raises for an unknown method)."""
    layer_cls = get_method(method)
    return _PRESETS[preset].get(method) or MethodPreset(layer_cls.default_lr)


def learning_rates(preset: str) -> dict[str, float]:
    """Every registered method's suggested rate, in registration order."""
    return {m: method_preset(preset, m).lr for m in METHODS}


def preset_of(model: str | Path) -> str:
    """``toy`` for a toy model folder (it carries its judge), else ``sdxl``."""
    from .toy.evaluate import is_toy

    return TOY if is_toy(model) else SDXL


def parse_methods(text: str, flag: str = "--methods") -> list[str]:
    """``"lora,mora"`` → registered method names, or a ConfigError listing the registry."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ConfigError(f"{flag}: unknown {unknown or 'nothing given'}; choose from {', '.join(METHODS)}")
    return methods
