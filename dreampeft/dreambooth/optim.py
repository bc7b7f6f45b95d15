"""The optimizers a run can use; the optional ones say which package to install."""

from __future__ import annotations

import torch

from .data import DreamBoothError


def _adam_kwargs(cfg) -> dict:
    return {"betas": (cfg.adam_beta1, cfg.adam_beta2), "weight_decay": cfg.adam_weight_decay,
            "eps": cfg.adam_epsilon}


def _adamw(cfg, groups):
    return torch.optim.AdamW(groups, **_adam_kwargs(cfg))


def _adamw8bit(cfg, groups):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise DreamBoothError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes; "
                              "CUDA only); or use --optimizer adamw") from None
    return bnb.optim.AdamW8bit(groups, **_adam_kwargs(cfg))


def _prodigy(cfg, groups):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise DreamBoothError("--optimizer prodigy needs prodigyopt (pip install prodigyopt); "
                              "or use --optimizer adamw") from None
    return Prodigy(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay)


OPTIMIZERS = {"adamw": _adamw, "adamw8bit": _adamw8bit, "prodigy": _prodigy}
