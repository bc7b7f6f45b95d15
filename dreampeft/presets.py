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
    # The toy, from `python -m dreampeft.toy sweep` (recipe `prior`, BENCH_STEPS, one training run per
    # setting, 2 images per prompt) on the held-out tuning subject, the purple cross (base: subject
    # 0.000, prompt 0.786), best subject + prompt fidelity per method, rates × 0.5/1/2/4:
    # lora 2e-3 0.154/0.857; lora_dash 2e-3 0.157/0.857; dora 2e-3 0.214/0.857; mora 4e-3 0.076/0.786;
    # fourierft 5e-4 with n 500 0.148/0.929 (n 1000 at 2.5e-4: 0.179/0.857). Neighbouring settings
    # differ by about as much as one run's noise (lora 4e-3: 0.005/0.857, 8e-3: 0.199/0.714); the
    # whole table is in README. An earlier sweep on the star had picked the same rates for LoRA and
    # MoRA and 2.5e-4 (n 1000) for FourierFT.
    TOY: {
        "lora": MethodPreset(2e-3, {"r": 4}),
        "lora_dash": MethodPreset(2e-3, {"r": 4, "warmup_steps": 100, "n_directions": 4}),
        # Zeros, not the paper's gaussian start: on the toy's 64×64 layers n = 1000 coefficients at
        # scaling 150 start ΔW at ~11× the weight itself (‖ΔW‖ ≈ scaling·√(n/2)/√(d_out·d_in)), so
        # training began from a wrecked model (prompt fidelity 0.2 whatever the rate).
        # (with zeros and Adam, scaling and the rate move ΔW alike, so n is the option swept)
        "fourierft": MethodPreset(5e-4, {"n_frequency": 500, "scaling": 150.0, "init": "zeros"}),
        "mora": MethodPreset(4e-3, {"r": 4, "mora_type": 6}),
        "dora": MethodPreset(2e-3, {"r": 4}),  # LoRA's rank
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
