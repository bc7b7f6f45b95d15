"""dreampeft: DreamBooth personalisation with LoRA, LoRA-Dash, FourierFT and MoRA adapters.

    import dreampeft as dp
    cfg = dp.LoRAConfig(r=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    names = dp.inject_adapters(unet, cfg)
"""

__version__ = "0.1.0"

import os as _os

import torch as _torch

# Denormal floats stall CPU training: LoRA DreamBooth on the toy SDXL went from 0.33 s to ~10 s per
# step after ~30 steps (the tiny gradients of a zero-initialised B reach Adam's state). Flushing
# them to zero changes nothing that matters in fp32 training. The flag is per thread and worker
# threads copy it when they start, so it is set here, before torch starts its pool; opt out with
# DREAMPEFT_KEEP_DENORMALS=1.
if _os.environ.get("DREAMPEFT_KEEP_DENORMALS") != "1":
    _torch.set_flush_denormal(True)

from .adapters import (CLIP_ATTENTION, METHODS, UNET_ATTENTION, UNET_RESNETS, UNET_TARGET_SETS, UNET_TRANSFORMER,
                       AdapterConfig, AdapterLayer, ConfigError, DoRAConfig, FourierFTConfig, LoRAConfig, LoRADashConfig, MoRAConfig,
                       config_from_dict, dash_step, get_method, is_dash_active, launch_dash)
from .inject import (adapter_layers, adapter_parameters, disable_adapters, find_targets,
                     inject_adapters, mark_only_adapters_trainable, merge_adapters,
                     remove_adapters, set_adapter_scale, trainable_parameter_count,
                     unmerge_adapters)
from .export import export_diffusers
from .pipeline import fuse, load_into_pipeline, set_adapters, set_pipeline_scale, unfuse, unload
from .state import AdapterFileError, load_adapter, read_manifest, save_adapter

__all__ = [
    "__version__", "CLIP_ATTENTION", "METHODS", "UNET_ATTENTION", "UNET_TRANSFORMER", "UNET_RESNETS", "UNET_TARGET_SETS",
    "AdapterConfig", "AdapterLayer",
    "ConfigError", "LoRAConfig", "LoRADashConfig", "FourierFTConfig", "MoRAConfig", "DoRAConfig", "dash_step",
    "is_dash_active", "launch_dash", "DashCallback", "config_from_dict", "get_method", "adapter_layers",
    "adapter_parameters", "disable_adapters", "find_targets", "inject_adapters",
    "mark_only_adapters_trainable", "merge_adapters", "remove_adapters", "set_adapter_scale",
    "trainable_parameter_count", "unmerge_adapters", "AdapterFileError", "load_adapter",
    "read_manifest", "save_adapter", "export_diffusers", "fuse", "load_into_pipeline",
    "set_adapters", "set_pipeline_scale", "unfuse", "unload",
]


def __getattr__(name):  # DashCallback imports transformers' Trainer machinery: only on demand
    if name == "DashCallback":
        from .hf import DashCallback

        return DashCallback
    raise AttributeError(f"module 'dreampeft' has no attribute {name!r}")
