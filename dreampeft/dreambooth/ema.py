"""An exponential moving average of the adapter weights (``--use_ema``).

Only adapter parameters are averaged (the frozen model never changes), in float32, after every
optimizer step. The decay warms up as diffusers' ``EMAModel`` does, min(decay, (1 + t)/(10 + t))
for update t = 0, 1, ..., so the first steps are not dominated by the initialisation. The average is a pure
function of the parameter trajectory; saved in each checkpoint, it resumes bit for bit.
Validation and the final files use it by swapping its values into the layers (``swapped``).
"""

from __future__ import annotations

import contextlib

import torch

from .. import inject


class AdapterEMA:
    def __init__(self, models: dict, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = adapter_tensors(models, torch.float32)

    def current_decay(self) -> float:
        """The decay of the next update: 0.1 for the first, as diffusers' EMAModel."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, models: dict) -> None:
        weight = 1.0 - self.current_decay()
        self.updates += 1
        for name, m in models.items():
            for s, p in zip(self.shadow[name], inject.adapter_parameters(m)):
                s.lerp_(p.detach().float(), weight)

    def swapped(self, models: dict):
        """The layers hold the averaged weights inside the block, their own again after it."""
        return swapped(models, self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        shapes = {n: [tuple(t.shape) for t in ts] for n, ts in self.shadow.items()}
        if {n: [tuple(t.shape) for t in ts] for n, ts in state["shadow"].items()} != shapes:
            raise ValueError("the checkpoint's EMA does not match the adapters")
        self.updates = int(state["updates"])
        self.shadow = {n: [t.to(s.device) for t, s in zip(ts, self.shadow[n])] for n, ts in state["shadow"].items()}


def adapter_tensors(models: dict, dtype: torch.dtype | None = None) -> dict:
    """A copy of each model's adapter parameters (``inject.adapter_parameters`` order), for ``swapped``."""
    return {name: [p.detach().to(dtype or p.dtype, copy=True) for p in inject.adapter_parameters(m)]
            for name, m in models.items()}


@contextlib.contextmanager
def swapped(models: dict, tensors: dict):
    """Inside the block each model's adapter parameters hold ``tensors[name]`` (in
    ``inject.adapter_parameters`` order); their own values again after it."""
    saved = adapter_tensors(models)
    with torch.no_grad():
        for name, m in models.items():
            for p, s in zip(inject.adapter_parameters(m), tensors[name]):
                p.copy_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, m in models.items():
                for p, s in zip(inject.adapter_parameters(m), saved[name]):
                    p.copy_(s)
