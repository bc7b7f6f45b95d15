"""LoRA-Dash (Si et al., ICLR 2025); docs/METHODS.md §2.

Plain LoRA until the launch (after ``warmup_steps`` optimizer steps). The launch picks, per
layer, the ``n_directions`` singular directions u_i v_iᵀ of the frozen W0 whose coordinate in the
LoRA update changes most relative to σ_i, and from then on a learnable scalar δ_i per direction
adds U_s diag(δ) V_sᵀ. Deliberate differences from the official code (all in docs/METHODS.md):
optimizer steps are counted (not forward calls); directions fill preallocated buffers in place
(the official code swaps Parameter objects, which breaks DDP/FSDP and the optimizer);
``dash_active`` and the directions are saved, so a reloaded adapter resumes in its phase; the
change rate divides by σ + eps.

Forward: the whole update as one rank r+s LoRA, up = [s·B | U], down = [A ; diag(δ)·Vh] (the
scales go on these small factors), so x is read once and the output written once. Before the
launch U and Vh are zero, so the dash term contributes nothing (and δ gets zero gradient)
without a data-dependent branch, which would force a device sync on GPU.

On a convolution (kohya's LoCon layers) W0 and ΔW are read as (out, in·kh·kw) matrices: the
directions are W0's singular vectors in that form, Vh a convolution with the base kernel into s
channels and U a 1×1 convolution back, as the LoRA factors are (lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, register_method
from .config import option, require
from .lora import LoRAMixin, LowRankConfig
from .svd_cache import frozen_svd

EPS = 1e-8


@dataclass
class LoRADashConfig(LowRankConfig):
    method = "lora_dash"

    warmup_steps: int = option(100, "optimizer steps of plain LoRA before the launch",
                               cli="--dash_warmup_steps")
    n_directions: int = option(8, "task-specific directions given a learnable scale at launch",
                               cli="--dash_directions")

    def validate(self) -> None:
        super().validate()
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        require(self.n_directions >= 1, f"n_directions must be >= 1 (got {self.n_directions})")


@register_method
class LoRADashLayer(LoRAMixin, AdapterLayer):
    config_cls = LoRADashConfig
    peft_writer = "lora_factors"  # exported as its exact rank r+s LoRA
    base_types = (nn.Linear, nn.Conv2d)

    def exact_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = self.low_rank_factors(1.0)
        return up.float(), down.float()

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, config: LoRADashConfig):
        super().__init__(base_layer, config)
        s = config.n_directions
        require(s <= min(self.fan_in, self.out_features),
                f"n_directions={s} exceeds the rank bound of a {self.out_features}x"
                f"{self.fan_in} layer; lower it or exclude this layer")
        self.init_lora(config.r, config.dropout, config.scaling)
        self.dash_delta = nn.Parameter(self.new_tensor(s).zero_())
        self.register_buffer("dash_U", self.new_tensor(self.out_features, s).zero_())
        self.register_buffer("dash_Vh", self.new_tensor(s, self.fan_in).zero_())
        self.register_buffer("dash_active", torch.zeros((), dtype=torch.bool, device=self.dash_U.device))

    def dash_delta_weight(self) -> torch.Tensor:
        return (self.dash_U @ (self.dash_delta[:, None] * self.dash_Vh)).view(self.base_layer.weight.shape)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_delta() + self.dash_delta_weight()

    def low_rank_factors(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with scale·ΔW = up @ down: the rank r+s LoRA form, for forward and export.
        The scales are applied to the small factors, never to activations."""
        s = self.scaling * scale
        lora_B, lora_A = self.lora_B.flatten(1), self.lora_A.flatten(1)  # a convolution's as matrices
        lora_up = lora_B if s == 1.0 else lora_B * s
        delta = self.dash_delta if scale == 1.0 else self.dash_delta * scale
        # .to: a model cast after injection (model.to(bf16)) casts these buffers too
        up = torch.cat([lora_up, self.dash_U.to(lora_up.dtype)], dim=1)
        down = torch.cat([lora_A, self.dash_Vh.to(lora_A.dtype) * delta[:, None]])
        return up, down

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # dropout belongs to the LoRA branch only, so the branches stay separate here
        if self.is_conv:
            lora = self.up_proj(self.lora_down(x, self.scaling), self.lora_B)
            return lora + self.factored_forward(x, self.dash_Vh.to(x.dtype) * self.dash_delta[:, None],
                                                self.dash_U.to(x.dtype))
        dash = F.linear(x, self.dash_Vh.to(x.dtype)) * self.dash_delta
        return (F.linear(self.lora_down(x, self.scaling), self.lora_B)
                + F.linear(dash, self.dash_U.to(x.dtype)))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if result.dtype != self.lora_B.dtype or not isinstance(self.dropout, nn.Identity):
            return super().adapted_forward(x)
        up, down = self.low_rank_factors(self.scale)
        if self.is_conv:  # one kernel into r+s channels, one 1×1 back
            return result + self.factored_forward(x, down, up)
        # One GEMM reads x once, one GEMM-add writes the output once (5 ops in all).
        h = F.linear(x.reshape(-1, self.in_features), down)
        return torch.addmm(result.reshape(-1, self.out_features), h, up.t()).view(result.shape)

    @torch.no_grad()
    def launch(self, svd_cache: str | Path | None = None, svd: tuple | None = None) -> bool:
        """Select the directions now (docs/METHODS.md §2, Launch). Returns False if already launched.
        ``svd_cache``: a folder where W0's SVD is looked up and kept (``svd_cache.frozen_svd``);
        ``svd``: W0's (U, σ, Vᵀ) computed beforehand (``svd_prefetch.SVDPrefetch``)."""
        if bool(self.dash_active):
            return False
        w0 = self.base_layer.weight.float().flatten(1)  # a convolution's as (out, in·kh·kw)
        if self.merged:
            w0 = w0 - self.merged_scale * self.delta_weight().flatten(1)
        use = svd is not None and not self.merged
        U, sigma, Vh = (t.to(w0.device) for t in svd) if use else frozen_svd(w0, svd_cache)
        # diag(Uᵀ ΔW V) with ΔW = s·B A, without forming ΔW: (Uᵀ s·B) row i · (A V) column i
        coords = ((U.T @ self.lora_B.float().flatten(1)) * self.scaling
                  * (Vh @ self.lora_A.float().flatten(1).T)).sum(-1)
        rate = coords.abs() / (sigma + EPS)
        idx = torch.topk(rate, self.config.n_directions).indices
        self.dash_U.copy_(U[:, idx])
        self.dash_Vh.copy_(Vh[idx])
        self.dash_active.fill_(True)
        return True


def _launch(due: list[tuple[str, "LoRADashLayer"]], svd_cache: str | Path | None, prefetch) -> list[str]:
    if len(due) > 16:  # one full SVD of W0 per layer: minutes at SDXL's size, so show them passing
        from tqdm.auto import tqdm

        how = "prefetched" if prefetch else "cached" if svd_cache else "SVD of each W0"
        due = tqdm(due, desc=f"LoRA-Dash launch ({how})", leave=False)
    return [n for n, m in due if m.launch(svd_cache, prefetch.take(m) if prefetch else None)]


def launch_dash(model: nn.Module, svd_cache: str | Path | None = None, prefetch=None) -> list[str]:
    """Launch every LoRA-Dash layer of ``model`` that has not launched; returns their names."""
    return _launch([(n, m) for n, m in model.named_modules()
                    if isinstance(m, LoRADashLayer) and not bool(m.dash_active)], svd_cache, prefetch)


def dash_step(model: nn.Module, completed_steps: int, svd_cache: str | Path | None = None,
              prefetch=None) -> list[str]:
    """Call once after every optimizer step with the number of optimizer steps done so far.

    Launches each layer whose ``warmup_steps`` have been reached (steps 0…t-1 are plain LoRA);
    idempotent, so resuming from a checkpoint never launches twice. ``svd_cache``: see
    ``svd_cache.frozen_svd`` (the same base's W0 decomposed once for every run); ``prefetch``: an
    ``svd_prefetch.SVDPrefetch`` started with the run, whose SVDs the launch takes.
    """
    return _launch([(n, m) for n, m in model.named_modules() if isinstance(m, LoRADashLayer)
                    and completed_steps >= m.config.warmup_steps and not bool(m.dash_active)],
                   svd_cache, prefetch)


def is_dash_active(model: nn.Module) -> bool:
    layers = [m for m in model.modules() if isinstance(m, LoRADashLayer)]
    return bool(layers) and all(bool(m.dash_active) for m in layers)

