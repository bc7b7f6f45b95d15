"""The adapter contract: one base class wraps a frozen ``nn.Linear`` (or, for methods that say so,
an ``nn.Conv2d``); methods add ΔW.

A method implements two things:
  * ``delta_weight()``: the dense update ΔW (float32, shape of the base weight);
  * ``adapter_forward(x)``: ``x @ ΔW^T`` computed the cheap way (never through a dense ΔW
    unless that *is* the cheap way).
Everything else (merge, unmerge, disable, the user scale, what is saved) is derived here once,
so every method behaves the same and the property tests run over all of them. On a convolution
ΔW has the kernel's shape (out, in, kh, kw) and ``adapter_forward`` is a convolution with the base
layer's stride, padding and dilation (kohya's LoCon; PEFT's Conv2d LoRA).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import UNET_RESNET_CONVS, AdapterConfig, ConfigError, expand_target_sets

METHODS: dict[str, type["AdapterLayer"]] = {}


def register_method(layer_cls: type["AdapterLayer"]) -> type["AdapterLayer"]:
    """Class decorator: make a method available by its config's ``method`` name."""
    name = layer_cls.config_cls.method
    if not name or name in METHODS:
        raise RuntimeError(f"method name {name!r} is empty or registered twice")
    METHODS[name] = layer_cls
    return layer_cls


def get_method(name: str) -> type["AdapterLayer"]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown adapter method {name!r}; choose one of {sorted(METHODS)}") from None


def conv_methods() -> list[str]:
    """The registered methods that adapt convolutions (kohya's LoCon layers)."""
    return [name for name, cls in METHODS.items() if nn.Conv2d in cls.base_types]


def conv_methods_text(conj: str = "or") -> str:
    """``conv_methods`` for messages: "lora, lora_dash or dora"."""
    names = conv_methods()
    return f"{', '.join(names[:-1])} {conj} {names[-1]}" if len(names) > 1 else names[0]


def conv_targets(targets: list[str]) -> list[str]:
    """The suffixes among ``targets`` (named sets expanded) that name the UNet's convolutions."""
    return [t for t in expand_target_sets(targets) if t in UNET_RESNET_CONVS]


def layer_kinds(layer_cls: type["AdapterLayer"]) -> str:
    """What a method adapts, for messages: "nn.Linear or nn.Conv2d"."""
    return " or ".join(f"nn.{t.__name__}" for t in layer_cls.base_types)


def config_from_dict(data: dict) -> AdapterConfig:
    if "method" not in data:
        raise ConfigError(f"adapter config has no 'method' key; expected one of {sorted(METHODS)}")
    return get_method(data["method"]).config_cls.from_dict(data)


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus a trainable update ΔW.

    Trainable tensors and saved buffers are created in float32 on the base weight's device,
    whatever the base dtype, so bf16/fp16 bases train their adapters in full precision.
    """

    config_cls: ClassVar[type[AdapterConfig]]
    default_lr: ClassVar[float] = 1e-4  # suggested learning rate when no preset names one
    peft_writer: ClassVar[str | None] = None  # its writer in export.PEFT_WRITERS, if PEFT has the method
    base_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)  # the layers the method adapts

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, config: AdapterConfig):
        super().__init__()
        check_base(type(self), base_layer)
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}")
        self.base_layer = base_layer
        self.config = config
        base_layer.requires_grad_(False)
        self.scale = 1.0  # user-facing strength multiplier on ΔW (1.0 = as trained)
        self.enabled = True
        self.merged_scale: float | None = None  # scale folded into base_layer.weight, if merged

    # -- what a method implements ---------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ ΔW^T`` for ``x`` in the adapter dtype (float32 unless cast by the user)."""
        raise NotImplementedError

    # -- derived behaviour -----------------------------------------------------------------
    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    @property
    def in_features(self) -> int:  # a convolution's input channels
        return self.base_layer.in_channels if self.is_conv else self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels if self.is_conv else self.base_layer.out_features

    @property
    def fan_in(self) -> int:
        """ΔW's columns as a matrix: in_features, or in·kh·kw for a convolution."""
        return self.base_layer.weight[0].numel()

    @property
    def weight(self) -> torch.Tensor:  # code that inspects attn.to_q.weight keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return self.merged_scale is not None

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(p for n, p in self.named_parameters() if not n.startswith("base_layer.")).dtype

    def new_tensor(self, *shape: int) -> torch.Tensor:
        """An empty float32 tensor on the base weight's device, for parameters and buffers."""
        return torch.empty(*shape, dtype=torch.float32, device=self.base_layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged or self.scale == 0:
            return self.base_layer(x)
        return self.adapted_forward(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + scale · x ΔW^T``; a method may override this with a fused fast path."""
        result = self.base_layer(x)
        delta = self.adapter_forward(x.to(self.adapter_dtype))
        if self.scale != 1.0:
            delta = delta * self.scale
        return result + delta.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scale · ΔW`` into the base weight (sum taken in float32, then cast)."""
        if self.merged:
            return
        w = self.base_layer.weight
        w.copy_(w.float() + self.scale * self.delta_weight().to(w.device))
        self.merged_scale = self.scale

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_(w.float() - self.merged_scale * self.delta_weight().to(w.device))
        self.merged_scale = None

    def set_scale(self, scale: float) -> None:
        if self.merged and scale != self.merged_scale:
            raise RuntimeError("unmerge the adapter before changing its scale")
        self.scale = float(scale)

    def exact_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up, down) with ΔW = up @ down exactly (at scale 1), for methods that are a LoRA;
        None for high-rank updates, which exports approximate with a truncated SVD."""
        return None

    def dora_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(up, down, magnitude) for a weight-decomposed method written in DoRA's own format
        (W' = m ⊙ (W0 + up·down)/‖W0 + up·down‖_row); None for every other method."""
        return None

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor and persistent buffer of the adapter (not the base layer)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    def trainable_count(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("base_layer."))

    def extra_repr(self) -> str:
        return f"method={self.config.method}, in={self.in_features}, out={self.out_features}"


def check_base(layer_cls: type[AdapterLayer], base_layer: nn.Module) -> None:
    """Raise unless ``layer_cls`` adapts this kind of layer (a plain convolution, for conv methods)."""
    method = layer_cls.config_cls.method
    if not isinstance(base_layer, layer_cls.base_types):
        hint = (f"; convolutions (the resnets target set) take --adapter {conv_methods_text()}"
                if isinstance(base_layer, nn.Conv2d) else "")
        raise TypeError(f"{method} adapts {layer_kinds(layer_cls)} layers, not {type(base_layer).__name__}{hint}")
    if isinstance(base_layer, nn.Conv2d) and (base_layer.groups != 1 or base_layer.padding_mode != "zeros"):
        raise TypeError(f"{method} adapts plain convolutions (groups=1, zero padding); this one has "
                        f"groups={base_layer.groups}, padding_mode={base_layer.padding_mode!r}")


def reference_forward(layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """Reference output ``base(x) + x @ ΔW^T`` (a convolution with W0 + ΔW, for a Conv2d base) in
    float32 (used by tests and benchmarks)."""
    base = layer.base_layer
    w = base.weight.float() + layer.scale * layer.delta_weight()
    b = None if base.bias is None else base.bias.float()
    if layer.is_conv:
        return F.conv2d(x.float(), w, b, base.stride, base.padding, base.dilation)
    return F.linear(x.float(), w, b)
