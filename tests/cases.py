"""The test table: tiny models × adapter methods, and helpers to drive them.

A new method joins every property test by adding one row to METHOD_CASES
(test_every_method_has_a_case fails until it does).
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

import dreampeft as dp

# Configs with identity initialisation, so "identity at init" holds for all. Keys are
# "method" or "method-variant"; every registered method needs at least one row.
METHOD_CASES = {
    "lora": lambda targets: dp.LoRAConfig(r=3, alpha=6.0, target_modules=targets),
    "lora_dash": lambda targets: dp.LoRADashConfig(r=3, alpha=6.0, n_directions=4,
                                                   target_modules=targets),
    "fourierft": lambda targets: dp.FourierFTConfig(n_frequency=200, scaling=50.0, init="zeros",
                                                    target_modules=targets),
    "mora": lambda targets: dp.MoRAConfig(r=3, mora_type=6, target_modules=targets),
    "mora-type1": lambda targets: dp.MoRAConfig(r=3, mora_type=1, target_modules=targets),
    "dora": lambda targets: dp.DoRAConfig(r=3, alpha=6.0, target_modules=targets),
}


class MLP(nn.Module):
    """Odd, non-divisible shapes: wide (24→40), tall (40→17), with and without bias."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 17, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@functools.cache
def _tiny_pipe():
    from dreampeft.tiny import build_tiny_sdxl

    return build_tiny_sdxl(seed=0)


def build(model: str) -> nn.Module:
    torch.manual_seed(0)
    if model == "mlp":
        return MLP()
    pipe = _tiny_pipe()
    part = {"unet": pipe.unet, "clip": pipe.text_encoder, "clip2": pipe.text_encoder_2}[model.split("-")[0]]
    return copy.deepcopy(part).eval()


MODEL_TARGETS = {
    "mlp": ["up", "down"],
    "unet": list(dp.UNET_ATTENTION),
    "unet-resnets": list(dp.UNET_TRANSFORMER + dp.UNET_RESNETS),  # kohya's LoCon: convolutions too
    "clip": list(dp.CLIP_ATTENTION),
    "clip2": list(dp.CLIP_ATTENTION),
}


def example_input(model: str, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    f = functools.partial(torch.randn, generator=g, dtype=dtype)
    if model == "mlp":
        return {"x": f(5, 24)}
    if model.startswith("unet"):
        return {
            "sample": f(2, 4, 8, 8),
            "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": f(2, 7, 64),
            "added_cond_kwargs": {"text_embeds": f(2, 32),
                                  "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2).to(dtype)},
        }
    return {"input_ids": torch.randint(0, 900, (2, 9), generator=g)}


def run(model_name: str, model: nn.Module, seed: int = 1) -> torch.Tensor:
    inputs = example_input(model_name, seed)
    if model_name == "mlp":
        return model(inputs["x"])
    out = model(**inputs)
    return out.sample if model_name.startswith("unet") else out[0]


def adapts_convs(method: str) -> bool:
    return nn.Conv2d in dp.get_method(method.split("-")[0]).base_types


def layer_input(layer, seed: int = 0) -> torch.Tensor:
    """A batch for one adapter layer: tokens for a Linear, a feature map for a convolution."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, layer.in_features, 6, 6) if layer.is_conv else (3, 5, layer.in_features)
    return torch.randn(shape, generator=g)


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every trainable adapter tensor non-trivial values, so ΔW ≠ 0 in the checks.

    LoRA-Dash layers are launched afterwards, so their dash term is active too.
    """
    g = torch.Generator().manual_seed(seed)
    for p in dp.adapter_parameters(model):
        p.copy_(torch.randn(p.shape, generator=g) * std)
    dp.launch_dash(model)
