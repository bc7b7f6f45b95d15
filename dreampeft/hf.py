"""transformers integration: LoRA-Dash's launch as a TrainerCallback."""

from __future__ import annotations

from transformers import TrainerCallback

from .adapters.lora_dash import dash_step


class DashCallback(TrainerCallback):
    """Launches LoRA-Dash layers once ``state.global_step`` (optimizer steps) reaches warmup;
    ``svd_cache``: a folder that keeps W0's SVDs for the next run on the same base."""

    def __init__(self, svd_cache: str | None = None):
        self.svd_cache = svd_cache

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            dash_step(model, state.global_step, self.svd_cache)
        return control
