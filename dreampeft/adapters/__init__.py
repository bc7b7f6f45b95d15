"""Adapter methods on one contract. Importing this package registers every method."""

from .base import METHODS, AdapterLayer, config_from_dict, get_method, reference_forward, register_method
from .config import CLIP_ATTENTION, UNET_ATTENTION, UNET_RESNETS, UNET_TARGET_SETS, UNET_TRANSFORMER, AdapterConfig, ConfigError
# Registration order is the order the CLI, the app and the comparisons list methods: the baseline first.
from .lora import LoRAConfig, LoRALayer  # isort: skip
from .lora_dash import LoRADashConfig, LoRADashLayer, dash_step, is_dash_active, launch_dash  # isort: skip
from .fourierft import FourierFTConfig, FourierFTLayer  # isort: skip
from .mora import MoRAConfig, MoRALayer  # isort: skip
from .dora import DoRAConfig, DoRALayer  # isort: skip

__all__ = [
    "METHODS", "AdapterLayer", "AdapterConfig", "ConfigError", "config_from_dict", "get_method",
    "reference_forward", "register_method", "CLIP_ATTENTION", "UNET_ATTENTION",
    "UNET_TRANSFORMER", "UNET_RESNETS", "UNET_TARGET_SETS",
    "LoRAConfig", "LoRALayer", "LoRADashConfig", "LoRADashLayer", "dash_step", "is_dash_active",
    "launch_dash", "FourierFTConfig", "FourierFTLayer", "MoRAConfig", "MoRALayer", "DoRAConfig", "DoRALayer",
]
