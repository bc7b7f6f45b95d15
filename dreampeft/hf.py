"""transformers integration: LoRA-Dash's launch as a TrainerCallback."""

from __future__ import annotations

from transformers import TrainerCallback

from .adapters.lora_dash import dash_step


class DashCallback(TrainerCallback):
    """Launches LoRA-Dash layers once ``state.global_step`` (optimizer steps) reaches warmup."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            dash_step(model, state.global_step)
        return control
