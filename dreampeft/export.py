"""Export adapters as LoRA files that other tools load.

Every method's update is written as LoRA factors ΔW = up @ down:
  * LoRA: up = (alpha/r)·B, down = A (exact);
  * LoRA-Dash: the rank r+s form [s·B | U]·[A ; diag(δ)·Vh] (exact);
  * FourierFT, MoRA: ΔW is high-rank; a truncated SVD at a fixed ``rank`` or at the smallest
    rank keeping ``energy`` of Σσ², with the relative Frobenius error reported per layer and
    overall and stored in the file's metadata.
Each layer is written with alpha = its rank (scale 1: the scale lives in ``up``); per-layer ranks
go to ``rank_pattern``/``alpha_pattern`` of the metadata diffusers reads, so it never assumes
alpha == rank wrongly (DEVELOPERS.md trap) and varying ranks load too. The kohya/A1111/ComfyUI
files are written by ``export_kohya.py`` from the same factors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapters import AdapterLayer
from .inject import adapter_layers
from .state import atomic_write

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class LayerExport:
    up: torch.Tensor  # (d_out, k)
    down: torch.Tensor  # (k, d_in); a convolution's d_in is in·kh·kw
    rel_error: float  # ||ΔW - up·down||_F / ||ΔW||_F
    norm: float  # ||ΔW||_F
    magnitude: torch.Tensor | None = None  # DoRA: up·down is the direction update, m rescales rows
    # (in PEFT's stored shape: (1, out, 1, 1) on a convolution)
    kernel: tuple[int, ...] = ()  # a convolution's (kh, kw)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) on the CPU in the layer's own shapes: a convolution's are (k, in, kh, kw) and
        (out, k, 1, 1), a convolution into k channels then a 1×1 back — how PEFT's Conv2d LoRA and
        kohya's LoCon store them."""
        down, up = self.down.cpu(), self.up.cpu()
        if not self.kernel:
            return down, up
        return down.reshape(down.shape[0], -1, *self.kernel), up.reshape(*up.shape, *(1,) * len(self.kernel))


@torch.no_grad()
def lora_factors(layer: AdapterLayer, rank: int | None = None, energy: float | None = None,
                 dora: bool = True) -> LayerExport:
    """LoRA factors of a layer's ΔW (at scale 1): exact where the method is low-rank, DoRA's own
    factors and magnitude where the format has DoRA (``dora``), else SVD. A convolution's ΔW is
    factorised as the matrix (out, in·kh·kw)."""
    export = _matrix_factors(layer, rank, energy, dora)
    export.kernel = tuple(layer.base_layer.weight.shape[2:])
    return export


def _matrix_factors(layer: AdapterLayer, rank: int | None, energy: float | None, dora: bool) -> LayerExport:
    parts = layer.dora_parts() if dora else None
    if parts is not None:
        up, down, magnitude = parts
        return LayerExport(up, down, 0.0, float(layer.delta_weight().norm()), magnitude)
    exact = layer.exact_factors()
    if exact is not None:
        up, down = exact
        return LayerExport(up.clone(), down.clone(), 0.0, float((up @ down).norm()))
    dw = layer.delta_weight().float().flatten(1)
    if rank is not None and energy is None and LOWRANK_OVERSAMPLE * rank <= min(dw.shape):
        return _lowrank(dw, rank)
    U, S, Vh = torch.linalg.svd(dw, full_matrices=False)
    total = float(S.pow(2).sum())
    if total == 0.0:
        k = 1
    elif rank is not None:
        k = min(rank, S.numel())
    else:
        kept = torch.cumsum(S.pow(2), 0) / total
        k = min(int(torch.searchsorted(kept, torch.tensor(energy or 0.9, dtype=kept.dtype))) + 1, S.numel())
    rest = float(S[k:].pow(2).sum())
    err = math.sqrt(rest / total) if total > 0 else 0.0
    return LayerExport((U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous(), err, math.sqrt(total))


# A rank-k export of a large layer needs its top k singular vectors only: a randomised SVD
# (Halko et al. 2011) with k + 10 probes and 4 power iterations gets them in a fraction of the full
# SVD's time (SDXL's 1280×1280 layers at rank 32: see bench/export_speed.py). Its residual is then
# measured exactly, ‖ΔW − up·down‖_F, so the reported error never relies on the approximation.
LOWRANK_OVERSAMPLE = 4  # use it when the rank is at most a quarter of the smaller side


def _lowrank(dw: torch.Tensor, rank: int) -> LayerExport:
    gen_state = torch.random.get_rng_state()  # the probes must not move the caller's random stream
    torch.manual_seed(0)
    try:
        U, S, V = torch.svd_lowrank(dw, q=min(rank + 10, min(dw.shape)), niter=4)
    finally:
        torch.random.set_rng_state(gen_state)
    up, down = (U[:, :rank] * S[:rank]).contiguous(), V[:, :rank].T.contiguous()
    total = float(dw.norm())
    err = float((dw - up @ down).norm()) / total if total > 0 else 0.0
    return LayerExport(up, down, err, total)


def factorize(models: dict, rank: int | None = None, energy: float | None = None, dora: bool = True) -> dict:
    """{component: {layer name: LayerExport}}: computed once, shared by the LoRA-file writers
    (the SVD of FourierFT/MoRA layers is the expensive part of an export). ``dora=False`` gives
    DoRA layers as an SVD of their ΔW, for formats without DoRA."""
    if rank is not None and energy is not None:
        raise ValueError("give an export rank or an energy threshold, not both")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    return {comp: {name: lora_factors(layer, rank, energy, dora) for name, layer in adapter_layers(model).items()}
            for comp, model in models.items() if adapter_layers(model)}


def export_diffusers(models: dict, out_dir: str | Path, rank: int | None = None,
                     energy: float | None = None, weight_name: str = DIFFUSERS_WEIGHTS,
                     factors: dict | None = None) -> dict:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` for ``load_lora_weights``.

    ``models`` maps diffusers component names ("unet", "text_encoder", "text_encoder_2") to models
    carrying adapters; ``factors`` (from ``factorize``) skips recomputing them. Returns the report
    (method, ranks, errors) that is also stored in the file.
    """
    factors = factors if factors is not None else factorize(models, rank, energy)
    tensors, meta, report = {}, {}, {"format": "diffusers-lora", "components": {}}
    for comp, exports in factors.items():
        layers = adapter_layers(models[comp])
        if comp != "unet" and any(e.magnitude is not None for e in exports.values()):
            # diffusers reads DoRA's magnitudes for the UNet (tested exact), but its text-encoder
            # path drops them (they load re-initialised): text encoders get the SVD of ΔW instead.
            exports = {n: lora_factors(layers[n], rank if rank or energy else 32, energy, dora=False)
                       for n in exports}
        for name, e in exports.items():
            tensors[f"{comp}.{name}.lora_A.weight"], tensors[f"{comp}.{name}.lora_B.weight"] = e.weights()
            if e.magnitude is not None:  # PEFT's key, which load_lora_weights reads (use_dora)
                tensors[f"{comp}.{name}.lora_magnitude_vector"] = e.magnitude.cpu()
        dora = any(e.magnitude is not None for e in exports.values())
        ranks = {name: e.down.shape[0] for name, e in exports.items()}
        base_rank = max(set(ranks.values()), key=list(ranks.values()).count)
        varying = {n: r for n, r in ranks.items() if r != base_rank}
        meta[comp] = {"r": base_rank, "lora_alpha": base_rank, "target_modules": sorted(exports),
                      "rank_pattern": varying, "alpha_pattern": dict(varying), "lora_dropout": 0.0,
                      "init_lora_weights": True, "use_dora": dora, "bias": "none"}
        err2 = sum((e.rel_error * e.norm) ** 2 for e in exports.values())
        norm2 = sum(e.norm ** 2 for e in exports.values())
        method = next(iter(layers.values())).config.method
        report["components"][comp] = {
            "method": method, "exact": all(e.rel_error == 0.0 and (l.exact_factors() is not None or e.magnitude is not None)
                                           for l, e in zip(layers.values(), exports.values())),
            "rank": base_rank, "ranks": sorted(set(ranks.values())),
            "overall_rel_error": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0,
            "max_layer_rel_error": max(e.rel_error for e in exports.values()),
            "layer_rel_error": {n: round(e.rel_error, 6) for n, e in exports.items()}}
    if not tensors:
        raise ValueError("no adapters to export; inject or load adapters first")
    packed = {f"{comp}.{k}": v for comp, m in meta.items() for k, v in m.items()}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True),
              "dreampeft_export": json.dumps(report, sort_keys=True)}
    path = Path(out_dir) / weight_name
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return report


# -- PEFT ------------------------------------------------------------------------------------
def _lora_config(r: int, alpha: float, rslora: bool = False, dropout: float = 0.0, **extra) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": dropout, **extra}


def _raw_lora(layers: dict) -> dict:
    return {f"base_model.model.{n}.lora_{ab}.weight": getattr(l, f"lora_{ab}").detach().float().cpu()
            for n, l in layers.items() for ab in "AB"}


def _peft_lora(layers: dict) -> tuple[dict, dict]:
    """Plain LoRA as its raw A, B and alpha: exact, and still trainable in peft. Layers of another
    rank or scale (3×3 convolutions under ``conv_r``/``conv_alpha``) go to peft's rank and alpha
    patterns, keyed by their full module names."""
    cfg = next(iter(layers.values())).config
    ranks, alphas = {}, {}
    for n, layer in layers.items():
        r = layer.lora_A.shape[0]
        if (r, layer.scaling) != (cfg.r, cfg.scaling):
            ranks[n], alphas[n] = r, layer.scaling * (math.sqrt(r) if cfg.rslora else r)
    config = _lora_config(cfg.r, cfg.alpha or cfg.r, cfg.rslora, cfg.dropout, rank_pattern=ranks, alpha_pattern=alphas)
    return config, _raw_lora(layers)


def _peft_lora_factors(layers: dict) -> tuple[dict, dict]:
    """A method that is exactly a LoRA of another rank (LoRA-Dash: r+s), as those factors."""
    exports = {n: lora_factors(l) for n, l in layers.items()}
    rank = next(iter(exports.values())).down.shape[0]
    tensors = {}
    for n, e in exports.items():
        tensors[f"base_model.model.{n}.lora_A.weight"], tensors[f"base_model.model.{n}.lora_B.weight"] = e.weights()
    return _lora_config(rank, rank), tensors


def _peft_dora(layers: dict) -> tuple[dict, dict]:
    """DoRA as PEFT stores it: LoRA's raw A, B and alpha with use_dora, plus each magnitude."""
    config, tensors = _peft_lora(layers)
    tensors.update({f"base_model.model.{n}.lora_magnitude_vector": l.peft_magnitude().cpu()
                    for n, l in layers.items()})
    return {**config, "use_dora": True}, tensors


def _peft_fourierft(layers: dict) -> tuple[dict, dict]:
    from .adapters.fourierft import frequency_entries

    cfg = next(iter(layers.values())).config
    for name, layer in layers.items():  # peft regenerates the entries from the seed: check they agree
        expected = frequency_entries(layer.out_features, layer.in_features, cfg.n_frequency, cfg.seed)
        if not torch.equal(layer.indices.cpu(), expected):
            raise ValueError(f"{name}: frequency entries differ from seed {cfg.seed}'s; PEFT cannot "
                             "represent them (use the native or diffusers export)")
    config = {"peft_type": "FOURIERFT", "n_frequency": cfg.n_frequency, "scaling": cfg.scaling,
              "random_loc_seed": cfg.seed, "init_weights": cfg.init == "zeros"}
    tensors = {f"base_model.model.{n}.fourierft_spectrum": l.spectrum.detach().float().cpu()
               for n, l in layers.items()}
    return config, tensors


# by each method's ``peft_writer``
PEFT_WRITERS = {"lora": _peft_lora, "lora_factors": _peft_lora_factors, "dora": _peft_dora,
                "fourierft": _peft_fourierft}


def export_peft(models: dict, out_dir: str | Path, base_model: str | None = None) -> list[Path]:
    """One PEFT adapter folder per component (``out_dir/<component>/adapter_config.json`` and
    ``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained``."""
    written = []
    for comp, model in models.items():
        layers = adapter_layers(model)
        if not layers:
            continue
        first = next(iter(layers.values()))
        if first.peft_writer not in PEFT_WRITERS:
            method = first.config.method
            raise ValueError(f"PEFT has no {method} adapter; export {method} to the diffusers format "
                             f"(truncated SVD) or keep the native file")
        config, tensors = PEFT_WRITERS[first.peft_writer](layers)
        config.update({"target_modules": sorted(layers), "task_type": None, "bias": "none",
                       "base_model_name_or_path": base_model, "inference_mode": True})
        folder = Path(out_dir) / comp
        atomic_write(folder / "adapter_model.safetensors",
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write(folder / "adapter_config.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
        written.append(folder)
    return written


# -- merged pipeline and the command line ---------------------------------------------------
def _check_empty(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"--out {out_dir} exists and is not an empty folder; choose a new folder")


def save_merged(pipe, components: dict, out_dir: str | Path, scale: float = 1.0) -> Path:
    """Merge the adapters into ``pipe`` for good (removing them) and write it."""
    from .inject import remove_adapters, set_adapter_scale

    out_dir = Path(out_dir)
    _check_empty(out_dir)
    for model in components.values():
        set_adapter_scale(model, scale)
        remove_adapters(model, merge=True)
    return _save_pipeline(pipe, out_dir)


def save_merged_copy(pipe, components: dict, out_dir: str | Path) -> Path:
    """Write ``pipe`` with ΔW fused in while its models keep their adapters, unchanged
    (``inject.merged_copies``): the trainer's merged export, from the models in memory instead of
    a second pipeline loaded from disk (the weights keep the precision they were trained in)."""
    from .inject import merged_copies

    out_dir = Path(out_dir)
    _check_empty(out_dir)
    with merged_copies(*components.values()):
        return _save_pipeline(pipe, out_dir)


def _save_pipeline(pipe, out_dir: Path) -> Path:
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")  # a full disk leaves no half pipeline behind
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _load_components(base_model: str, adapter: str | Path):
    """(pipeline, {component: model with the adapter loaded}); a single-file base reads the configs
    the run used (saved in the manifest)."""
    from .single_file import load_pipeline
    from .state import load_adapter, read_manifest

    manifest = read_manifest(adapter)[1]
    pipe = load_pipeline(base_model, manifest.get("single_file_config"), torch_dtype=torch.float32)  # fp16 too
    components = {c: getattr(pipe, c) for c in manifest["components"]}
    load_adapter(components, adapter)
    return pipe, components


def main(argv: list[str] | None = None) -> int:
    """``python -m dreampeft.export``: see ``dreampeft.export_cli``."""
    from .export_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
