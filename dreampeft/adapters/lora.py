"""LoRA (Hu et al. 2021) with HuggingFace PEFT's semantics; docs/METHODS.md §1.

ΔW = s · B A with s = alpha / r (alpha / sqrt(r) with rslora). A is kaiming-uniform(a=√5),
B is zero, so the adapted model equals the base model at step 0.

On a ``nn.Conv2d`` (kohya's LoCon, PEFT's Conv2d LoRA) A is a convolution with the base kernel,
stride and padding into r channels, B a 1×1 convolution back: ΔW = s · B A over the flattened
(in·kh·kw) axis. kohya gives 3×3 kernels their own rank and alpha (``conv_dim``/``conv_alpha``);
1×1 convolutions take the linear layers' rank, as there.
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
class LowRankConfig(AdapterConfig):
    """The options every B·A method shares (LoRA, LoRA-Dash, DoRA)."""

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
        return self.scale_for(self.r, self.alpha)

    def scale_for(self, r: int, alpha: float | None) -> float:
        alpha = r if alpha is None else alpha
        return alpha / (math.sqrt(r) if self.rslora else r)


@dataclass
class LoRAConfig(LowRankConfig):
    """LoRA: the low-rank options plus kohya's separate rank and alpha for 3×3 convolutions."""

    method = "lora"

    conv_r: int | None = option(None, "rank on 3x3 convolutions, e.g. the resnets (kohya's conv_dim; "
                                "default: --rank)", cli="--conv_rank")
    conv_alpha: float | None = option(None, "alpha on 3x3 convolutions (kohya's conv_alpha; default: "
                                      "--lora_alpha without --conv_rank, else the conv rank: scale 1)",
                                      cli="--conv_alpha")

    def validate(self) -> None:
        super().validate()
        require(self.conv_r is None or self.conv_r >= 1, f"conv_r must be >= 1 (got {self.conv_r}); "
                "pass --conv_rank 4 or larger, or leave it out to use --rank")
        require(self.conv_alpha is None or self.conv_alpha > 0, f"conv_alpha must be > 0 (got {self.conv_alpha})")

    def rank_and_scaling(self, kernel: tuple[int, ...] = ()) -> tuple[int, float]:
        """(rank, scale) of a layer with this kernel (``()`` for a Linear, (1, 1) for a 1×1 conv)."""
        if not any(k > 1 for k in kernel):
            return self.r, self.scaling
        if self.conv_r is None:
            return self.r, self.scale_for(self.r, self.conv_alpha if self.conv_alpha is not None else self.alpha)
        return self.conv_r, self.scale_for(self.conv_r, self.conv_alpha)


class LoRAMixin:
    """The two low-rank factors and their fused forward, shared by LoRA, LoRA-Dash and DoRA."""

    def init_lora(self, r: int, dropout: float, scaling: float) -> None:
        # On a convolution the factors have PEFT's Conv2d shapes: A (r, in, kh, kw), B (out, r, 1, 1);
        # kaiming's fan-in is then in·kh·kw, as for PEFT's conv lora_A.
        kernel = tuple(self.base_layer.weight.shape[2:])
        self.lora_A = nn.Parameter(self.new_tensor(r, self.in_features, *kernel))
        self.lora_B = nn.Parameter(self.new_tensor(self.out_features, r, *(1,) * len(kernel)).zero_())
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def lora_delta(self) -> torch.Tensor:
        dw = self.lora_B.float().flatten(1) @ self.lora_A.float().flatten(1)
        return self.scaling * dw.view(self.base_layer.weight.shape)

    def down_proj(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """``x`` into k channels by ``down`` ((k, fan_in), or its kernel form): a matmul on a Linear,
        on a convolution a convolution with the base's kernel size, stride, padding and dilation."""
        if not self.is_conv:
            return F.linear(x, down)
        base = self.base_layer
        kernel = down.view(down.shape[0], -1, *base.kernel_size)
        return F.conv2d(x, kernel, None, base.stride, base.padding, base.dilation)

    def up_proj(self, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """k channels back to d_out by ``up`` ((d_out, k), or (d_out, k, 1, 1)): a 1×1 convolution on a
        convolution."""
        return F.conv2d(h, up.view(up.shape[0], up.shape[1], 1, 1)) if self.is_conv else F.linear(h, up)

    def factored_forward(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.up_proj(self.down_proj(x, down), up)

    def lora_down(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        # The scale multiplies the r-wide intermediate, the cheapest place for it.
        h = self.down_proj(self.dropout(x), self.lora_A)
        return h * scale if scale != 1.0 else h


@register_method
class LoRALayer(LoRAMixin, AdapterLayer):
    config_cls = LoRAConfig
    peft_writer = "lora"
    base_types = (nn.Linear, nn.Conv2d)

    def exact_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) as matrices; a convolution's down is over the flattened (in·kh·kw) axis."""
        return self.lora_B.float().flatten(1) * self.scaling, self.lora_A.float().flatten(1)

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, config: LoRAConfig):
        super().__init__(base_layer, config)
        r, scaling = config.rank_and_scaling(tuple(base_layer.weight.shape[2:]))
        self.init_lora(r, config.dropout, scaling)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_delta()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(self.lora_down(x, self.scaling), self.lora_B)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if result.dtype != self.lora_B.dtype or self.is_conv:
            return super().adapted_forward(x)
        # Same dtype: fold the add into the second GEMM (addmm's beta=1) instead of a
        # separate elementwise pass over the (tokens, d_out) output.
        h = self.lora_down(x, self.scaling * self.scale)
        out = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]),
                          self.lora_B.t())
        return out.view(result.shape)
