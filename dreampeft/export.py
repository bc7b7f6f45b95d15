"""Export adapters as LoRA files that other tools load.

Every method's update is written as LoRA factors ΔW = up @ down:
  * LoRA: up = (alpha/r)·B, down = A (exact);
  * LoRA-Dash: the rank r+s form [s·B | U]·[A ; diag(δ)·Vh] (exact);
  * FourierFT, MoRA: ΔW is high-rank; a truncated SVD at a fixed ``rank`` or at the smallest
    rank keeping ``energy`` of Σσ², with the relative Frobenius error reported per layer and
    overall and stored in the file's metadata.
Each layer is written with alpha = its rank (scale 1: the scale lives in ``up``); per-layer ranks
go to ``rank_pattern``/``alpha_pattern`` of the metadata diffusers reads, so it never assumes
alpha == rank wrongly (DEVELOPERS.md trap) and varying ranks load too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapters import AdapterLayer, LoRADashLayer, LoRALayer
from .inject import adapter_layers
from .state import atomic_write

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
EXACT = (LoRALayer, LoRADashLayer)


@dataclass
class LayerExport:
    up: torch.Tensor  # (d_out, k)
    down: torch.Tensor  # (k, d_in)
    rel_error: float  # ||ΔW - up·down||_F / ||ΔW||_F
    norm: float  # ||ΔW||_F


@torch.no_grad()
def lora_factors(layer: AdapterLayer, rank: int | None = None, energy: float | None = None) -> LayerExport:
    """LoRA factors of a layer's ΔW (at scale 1): exact where the method is low-rank, else SVD."""
    if isinstance(layer, LoRADashLayer):
        up, down = layer.low_rank_factors(1.0)
        dw = up @ down
        return LayerExport(up.float().clone(), down.float().clone(), 0.0, float(dw.norm()))
    if isinstance(layer, LoRALayer):
        up, down = layer.lora_B.float() * layer.scaling, layer.lora_A.float()
        return LayerExport(up.clone(), down.clone(), 0.0, float((up @ down).norm()))
    dw = layer.delta_weight().float()
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


def export_diffusers(models: dict, out_dir: str | Path, rank: int | None = None,
                     energy: float | None = None, weight_name: str = DIFFUSERS_WEIGHTS) -> dict:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` for ``load_lora_weights``.

    ``models`` maps diffusers component names ("unet", "text_encoder", "text_encoder_2") to models
    carrying adapters. Returns the report (method, ranks, errors) that is also stored in the file.
    """
    if rank is not None and energy is not None:
        raise ValueError("give an export rank or an energy threshold, not both")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    tensors, meta, report = {}, {}, {"format": "diffusers-lora", "components": {}}
    for comp, model in models.items():
        layers = adapter_layers(model)
        if not layers:
            continue
        exports = {name: lora_factors(layer, rank, energy) for name, layer in layers.items()}
        for name, e in exports.items():
            tensors[f"{comp}.{name}.lora_A.weight"] = e.down.cpu()
            tensors[f"{comp}.{name}.lora_B.weight"] = e.up.cpu()
        ranks = {name: e.down.shape[0] for name, e in exports.items()}
        base_rank = max(set(ranks.values()), key=list(ranks.values()).count)
        varying = {n: r for n, r in ranks.items() if r != base_rank}
        meta[comp] = {"r": base_rank, "lora_alpha": base_rank, "target_modules": sorted(exports),
                      "rank_pattern": varying, "alpha_pattern": dict(varying), "lora_dropout": 0.0,
                      "init_lora_weights": True, "use_dora": False, "bias": "none"}
        err2 = sum((e.rel_error * e.norm) ** 2 for e in exports.values())
        norm2 = sum(e.norm ** 2 for e in exports.values())
        method = next(iter(layers.values())).config.method
        report["components"][comp] = {
            "method": method, "exact": all(isinstance(l, EXACT) for l in layers.values()),
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
