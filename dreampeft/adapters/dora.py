"""DoRA (Liu et al., ICML 2024, arXiv 2402.09353) with HuggingFace PEFT's semantics; docs/METHODS.md §6.

Weight-decomposed LoRA: the adapted weight is W' = m ⊙ V / ‖V‖_row with V = W0 + s·B A, a learned
magnitude m per output row (initialised to ‖W0‖_row, so W' = W0 at step 0) and LoRA's direction
update. As in the paper (§4.3) and PEFT, ‖V‖ is treated as a constant in backward (detached).

Forward, as PEFT computes it (dropout on the adapter input, for the base part too):
    y = W0 x + b + (m/‖V‖ − 1) ⊙ W0 x' + (m/‖V‖) ⊙ s·B A x',   x' = dropout(x)
so ΔW = (m/‖V‖)[:, None] · V − W0. The update depends on W0 itself, so merging keeps the ΔW it
added and unmerging subtracts that same tensor (recomputing it from a merged W0 would be wrong).
ΔW is full rank in general, so it is exported in DoRA's own format (A, s·B, m: ``dora_parts``) where
the format has one (PEFT; diffusers' UNet), else as the truncated SVD of ΔW.

On a ``nn.Conv2d`` (PEFT's ``DoraConv2dLayer``; LyCORIS' LoCon with ``dora_wd``) the factors are
LoRA's conv factors and the norm is taken per output channel over (in, kh, kw): the kernel as the
matrix (out, in·kh·kw), so every formula above holds on that view. Rank and alpha for 3×3 kernels
follow ``--conv_rank``/``--conv_alpha`` as for LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, register_method
from .lora import LoRAConfig, LoRAMixin


@dataclass
class DoRAConfig(LoRAConfig):
    """LoRA's options (conv rank and alpha included): DoRA only adds the magnitude."""

    method = "dora"


@register_method
class DoRALayer(LoRAMixin, AdapterLayer):
    config_cls = DoRAConfig
    peft_writer = "dora"  # PEFT's LoRA with use_dora=True and lora_magnitude_vector
    base_types = (nn.Linear, nn.Conv2d)

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, config: DoRAConfig):
        super().__init__(base_layer, config)
        r, scaling = config.rank_and_scaling(tuple(base_layer.weight.shape[2:]))
        self.init_lora(r, config.dropout, scaling)
        with torch.no_grad():  # B = 0, so ‖W0 + s·B A‖ = ‖W0‖: the adapted layer starts as the base
            self.magnitude = nn.Parameter(self.weight_norm())
        self._merged_delta: torch.Tensor | None = None

    def dora_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.lora_B.float().flatten(1) * self.scaling, self.lora_A.float().flatten(1).clone(),
                self.peft_magnitude())

    def peft_magnitude(self) -> torch.Tensor:
        """m as PEFT stores ``lora_magnitude_vector``: (out,), or (1, out, 1, 1) on a convolution
        (PEFT keeps the kernel norm's keepdim shape, transposed)."""
        m = self.magnitude.detach().float().clone()
        return m.view(1, -1, 1, 1) if self.is_conv else m

    def direction(self) -> torch.Tensor:
        """V = W0 + s·B A in float32, before its rows are normalised."""
        return self.base_layer.weight.float() + self.lora_delta()

    @torch.no_grad()  # the paper's §4.3: ‖V‖ is a constant in backward, so no graph is built for it
    def weight_norm(self) -> torch.Tensor:
        """‖V‖ per output row without forming V: ‖V_i‖² = ‖W0_i‖² + 2s·⟨W0_i, (BA)_i⟩ + s²·‖(BA)_i‖²,
        with ⟨W0_i, (BA)_i⟩ = B_i·(W0 Aᵀ)_i and ‖(BA)_i‖² = B_i (A Aᵀ) B_iᵀ. Two reads of W0 and no
        weight-sized temporary, where forming V wrote three (s·BA, V, and V's saved copy): at SDXL's
        size that was 1.5× LoRA's layer time at 64 tokens and 8 GB more peak memory (freed
        weight-sized blocks the allocator kept). At B = 0 it is exactly ‖W0‖ (√(x²) = x in binary
        floating point, away from underflow), so the layer starts as the base bit for bit."""
        w0 = self.base_layer.weight.float().flatten(1)  # a kernel as the matrix (out, in·kh·kw)
        a, b, s = self.lora_A.float().flatten(1), self.lora_B.float().flatten(1), self.scaling
        square = torch.linalg.vector_norm(w0, dim=1).square()
        square += (2 * s) * (b * F.linear(w0, a)).sum(1) + (s * s) * ((b @ (a @ a.T)) * b).sum(1)
        return square.clamp_min_(0).sqrt_()

    def _per_out(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector shaped to broadcast over outputs: the last axis of a Linear's,
        the channel axis (dim 1) of a convolution's feature map."""
        return v.view(-1, 1, 1) if self.is_conv else v

    def delta_weight(self) -> torch.Tensor:
        if self._merged_delta is not None:  # W0 holds the merge: ΔW is the one that was added
            return self._merged_delta
        v = self.direction()
        mag = self.magnitude / v.flatten(1).norm(dim=1)
        return mag.view(-1, *(1,) * (v.dim() - 1)) * v - self.base_layer.weight.float()

    def _base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W0ᵀ without the bias (a convolution with the base's stride, padding and dilation)."""
        base = self.base_layer
        w = base.weight.to(x.dtype)
        return F.conv2d(x, w, None, base.stride, base.padding, base.dilation) if self.is_conv else F.linear(x, w)

    def _delta_out(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        """x ΔWᵀ in float32; ``base_out`` is x W0ᵀ when the caller has it (no dropout)."""
        xd = self.dropout(x.to(self.lora_A.dtype))
        if base_out is None or not isinstance(self.dropout, nn.Identity):
            base_out = self._base_matmul(xd)
        mag = self._per_out(self.magnitude / self.weight_norm())
        lora = self.up_proj(self.down_proj(xd, self.lora_A) * self.scaling, self.lora_B)  # xd had its dropout
        return (mag - 1) * base_out.float() + mag * lora

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._delta_out(x, None)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # One base matmul serves both the output and DoRA's rescaling of x W0ᵀ (the output less the
        # bias, as PEFT takes it): at init the delta is exactly 0, so the layer is the base bit for bit.
        result = self.base_layer(x)
        bias = self.base_layer.bias
        delta = self._delta_out(x, result if bias is None else result - self._per_out(bias))
        if self.scale != 1.0:
            delta = delta * self.scale
        return result + delta.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        delta = self.delta_weight()
        w = self.base_layer.weight
        w.copy_(w.float() + self.scale * delta)
        self._merged_delta, self.merged_scale = delta, self.scale

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_(w.float() - self.merged_scale * self._merged_delta)
        self._merged_delta, self.merged_scale = None, None
