"""kohya / A1111 / ComfyUI files: the LoRA factors of ``export.factorize`` under SDXL's original SGM
module names (``lora_unet_input_blocks_…``), and whole weight differences (``.diff``) under the same
names."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from .export import factorize
from .inject import adapter_layers
from .state import atomic_write

KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


class UNetLayout(NamedTuple):
    """What SGM's block numbering depends on: layers per block, and which up blocks have attention
    (an SGM output block holds [resnet, attention?, upsampler], so the upsampler's index is 1 or 2)."""

    layers_per_block: int = 2
    attention_up_blocks: frozenset = frozenset({0, 1})  # SDXL's


# diffusers' names inside a resnet → SGM's (ResBlock: in_layers = [norm, act, conv], out_layers =
# [norm, act, dropout, conv], emb_layers = [act, linear]), as diffusers' kohya converter reads them
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}


def sgm_name(name: str, layout: UNetLayout) -> str:
    """diffusers UNet module name → the original SGM/LDM name that A1111 and ComfyUI key by."""
    parts, step = name.split("."), layout.layers_per_block + 1
    inner = {"attentions": "1", "resnets": "0"}

    def rest(at: int) -> list[str]:  # the path inside the attention or resnet at parts[at - 2]
        tail = ".".join(parts[at:])
        return [_SGM_RESNET.get(tail, tail)] if parts[at - 2] == "resnets" else parts[at:]

    if parts[0] == "down_blocks" and parts[2] in inner:
        return ".".join(["input_blocks", str(int(parts[1]) * step + int(parts[3]) + 1), inner[parts[2]], *rest(4)])
    if parts[0] == "down_blocks" and parts[2:4] == ["downsamplers", "0"]:
        return ".".join(["input_blocks", str((int(parts[1]) + 1) * step), "0", "op", *parts[5:]])
    if parts[0] == "up_blocks" and parts[2] in inner:
        return ".".join(["output_blocks", str(int(parts[1]) * step + int(parts[3])), inner[parts[2]], *rest(4)])
    if parts[0] == "up_blocks" and parts[2:4] == ["upsamplers", "0"]:
        index = "2" if int(parts[1]) in layout.attention_up_blocks else "1"
        return ".".join(["output_blocks", str(int(parts[1]) * step + step - 1), index, *parts[4:]])
    if parts[0] == "mid_block" and parts[1] in inner:  # middle_block = [resnet 0, attention, resnet 1]
        index = "1" if parts[1] == "attentions" else str(2 * int(parts[2]))
        return ".".join(["middle_block", index, *rest(3)])
    raise ValueError(f"{name}: only layers inside the UNet's blocks have an SGM name for kohya export")


def unet_layout(model) -> UNetLayout:
    """The UNet's SGM layout (block numbering); text encoders: unused."""
    config = getattr(model, "config", None)
    ups = getattr(model, "up_blocks", None) or []
    return UNetLayout(getattr(config, "layers_per_block", 2),
                      frozenset(i for i, b in enumerate(ups) if getattr(b, "attentions", None) is not None))


def kohya_key(component: str, name: str, layout: UNetLayout) -> str:
    if component == "unet":
        name = sgm_name(name, layout)
    elif not name.startswith("text_model."):  # transformers 5 dropped the wrapper kohya names keep
        name = "text_model." + name
    return f"{KOHYA_PREFIX[component]}_{name.replace('.', '_')}"


def export_kohya(models: dict, out_dir: str | Path, rank: int | None = None,
                 energy: float | None = None, weight_name: str = KOHYA_WEIGHTS,
                 factors: dict | None = None) -> Path:
    """``lora_unet_…/lora_te1_…/lora_te2_…`` with ``.lora_down/.lora_up/.alpha`` (alpha = rank).
    DoRA goes through the truncated SVD of its ΔW here (no DoRA keys written)."""
    if factors is None or any(e.magnitude is not None for ex in factors.values() for e in ex.values()):
        factors = factorize(models, rank if rank or energy else 32, energy, dora=False)
    tensors = {}
    for comp, exports in factors.items():
        layout = unet_layout(models[comp])
        for name, e in exports.items():
            key = kohya_key(comp, name, layout)
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = e.weights()
            tensors[f"{key}.alpha"] = torch.tensor(float(e.down.shape[0]))
    if not tensors:
        raise ValueError("no adapters to export; inject or load adapters first")
    path = Path(out_dir) / weight_name
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    return path


KOHYA_DIFF_WEIGHTS = "pytorch_lora_weights_kohya_diff.safetensors"


@torch.no_grad()
def export_kohya_diff(models: dict, out_dir: str | Path, dtype: torch.dtype = torch.float16,
                      weight_name: str = KOHYA_DIFF_WEIGHTS) -> Path:
    """Whole weight differences under kohya's names, ``{key}.diff`` = scale·ΔW, which ComfyUI's
    LoRA loader (and A1111's ``network_full``) add to the weight as they are: exact for every
    method up to ``dtype`` — FourierFT's and MoRA's updates are high-rank, so their LoRA files
    are not — at the size of the adapted weights (SDXL's 560 UNet attention layers: 955 M weights,
    1.9 GB in fp16)."""
    tensors = {}
    for comp, model in models.items():
        layout = unet_layout(model)
        for name, layer in adapter_layers(model).items():
            tensors[f"{kohya_key(comp, name, layout)}.diff"] = (layer.scale * layer.delta_weight()).to(dtype).cpu()
    if not tensors:
        raise ValueError("no adapters to export; inject or load adapters first")
    path = Path(out_dir) / weight_name
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "dreampeft_kind": "diff"}))
    return path
