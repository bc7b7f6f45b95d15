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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, register_method
from .lora import LoRAMixin, LowRankConfig


@dataclass
class DoRAConfig(LowRankConfig):
    method = "dora"


@register_method
class DoRALayer(LoRAMixin, AdapterLayer):
    config_cls = DoRAConfig
    peft_writer = "dora"  # PEFT's LoRA with use_dora=True and lora_magnitude_vector

    def __init__(self, base_layer: nn.Linear, config: DoRAConfig):
        super().__init__(base_layer, config)
        self.init_lora(config.r, config.dropout, config.scaling)
        with torch.no_grad():  # B = 0, so ‖W0 + s·B A‖ = ‖W0‖: the adapted layer starts as the base
            self.magnitude = nn.Parameter(self.weight_norm())
        self._merged_delta: torch.Tensor | None = None

    def dora_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.lora_B.float() * self.scaling).clone(), self.lora_A.float().clone(), self.magnitude.float().clone()

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
        w0 = self.base_layer.weight.float()
        a, b, s = self.lora_A.float(), self.lora_B.float(), self.scaling
        square = torch.linalg.vector_norm(w0, dim=1).square()
        square += (2 * s) * (b * F.linear(w0, a)).sum(1) + (s * s) * ((b @ (a @ a.T)) * b).sum(1)
        return square.clamp_min_(0).sqrt_()

    def _mag(self) -> torch.Tensor:
        return self.magnitude / self.weight_norm()

    def delta_weight(self) -> torch.Tensor:
        if self._merged_delta is not None:  # W0 holds the merge: ΔW is the one that was added
            return self._merged_delta
        v = self.direction()
        return (self.magnitude / v.norm(dim=1))[:, None] * v - self.base_layer.weight.float()

    def _delta_out(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        """x ΔWᵀ in float32; ``base_out`` is x W0ᵀ when the caller has it (no dropout)."""
        xd = self.dropout(x.to(self.lora_A.dtype))
        if base_out is None or not isinstance(self.dropout, nn.Identity):
            base_out = F.linear(xd, self.base_layer.weight.to(xd.dtype))
        mag = self._mag()
        lora = F.linear(F.linear(xd, self.lora_A) * self.scaling, self.lora_B)  # xd has had its dropout
        return (mag - 1) * base_out.float() + mag * lora

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._delta_out(x, None)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # One base matmul serves both the base output and DoRA's rescaling of it.
        bias = self.base_layer.bias
        base_out = F.linear(x, self.base_layer.weight)
        delta = self._delta_out(x, base_out)
        if self.scale != 1.0:
            delta = delta * self.scale
        out = base_out + delta.to(base_out.dtype)
        return out if bias is None else out + bias

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
