"""transformers integration: LoRA-Dash's launch as a TrainerCallback."""

from __future__ import annotations

from transformers import TrainerCallback

from .adapters.lora_dash import dash_step
from .adapters.svd_prefetch import SVDPrefetch


class DashCallback(TrainerCallback):
    """Launches LoRA-Dash layers once ``state.global_step`` (optimizer steps) reaches warmup.
    ``svd_cache``: a folder that keeps W0's SVDs for the next run on the same base; ``prefetch``:
    decompose W0 in a background thread from the start of training (``svd_prefetch``), so the
    launch step does not stall."""

    def __init__(self, svd_cache: str | None = None, prefetch: bool = True):
        self.svd_cache, self.prefetch = svd_cache, prefetch
        self._prefetch: SVDPrefetch | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.prefetch and model is not None:
            self._prefetch = SVDPrefetch.start([model], self.svd_cache, state.max_steps or None)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            dash_step(model, state.global_step, self.svd_cache, self._prefetch)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None
        return control
