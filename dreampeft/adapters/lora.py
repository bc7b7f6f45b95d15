"""LoRA (Hu et al. 2021) with HuggingFace PEFT's semantics; docs/METHODS.md §1.

ΔW = s · B A with s = alpha / r (alpha / sqrt(r) with rslora). A is kaiming-uniform(a=√5),
B is zero, so the adapted model equals the base model at step 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, register_method
from .config import AdapterConfig, option, require


@dataclass
class LoRAConfig(AdapterConfig):
    method = "lora"

    r: int = option(4, "rank of the update", cli="--rank")
    alpha: float | None = option(None, "scale numerator: ΔW = alpha/r · B A (default: alpha = r)",
                                 cli="--lora_alpha")
    dropout: float = option(0.0, "dropout on the adapter branch's input", cli="--lora_dropout")
    rslora: bool = option(False, "rank-stabilised scale alpha/sqrt(r)", cli="--use_rslora")

    def validate(self) -> None:
        require(self.r >= 1, f"r must be >= 1 (got {self.r}); pass --rank 4 or larger")
        require(self.alpha is None or self.alpha > 0, f"alpha must be > 0 (got {self.alpha})")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1) (got {self.dropout})")

    @property
    def scaling(self) -> float:
        alpha = self.r if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRAMixin:
    """The two low-rank factors and their fused forward, shared by LoRA and LoRA-Dash."""

    def init_lora(self, r: int, dropout: float, scaling: float) -> None:
        self.lora_A = nn.Parameter(self.new_tensor(r, self.in_features))
        self.lora_B = nn.Parameter(self.new_tensor(self.out_features, r).zero_())
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def lora_delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def lora_down(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        # The scale multiplies the r-wide intermediate, the cheapest place for it.
        h = F.linear(self.dropout(x), self.lora_A)
        return h * scale if scale != 1.0 else h


@register_method
class LoRALayer(LoRAMixin, AdapterLayer):
    config_cls = LoRAConfig
    peft_writer = "lora"

    def exact_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B.float() * self.scaling, self.lora_A.float()

    def __init__(self, base_layer: nn.Linear, config: LoRAConfig):
        super().__init__(base_layer, config)
        self.init_lora(config.r, config.dropout, config.scaling)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_delta()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.lora_down(x, self.scaling), self.lora_B)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if result.dtype != self.lora_B.dtype:
            return super().adapted_forward(x)
        # Same dtype: fold the add into the second GEMM (addmm's beta=1) instead of a
        # separate elementwise pass over the (tokens, d_out) output.
        h = self.lora_down(x, self.scaling * self.scale)
        out = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]),
                          self.lora_B.t())
        return out.view(result.shape)
