"""Experiment trackers (``--report_to tensorboard|wandb``) through accelerate.

Logs go under ``OUTPUT_DIR/logs``. Per optimizer step: loss, learning rate, gradient norm (before
clipping) and step time; per validation: the images. W&B runs without an account in offline mode
(``WANDB_MODE=offline``; ``wandb sync`` uploads later). Only the main process writes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .data import DreamBoothError

def accelerator_kwargs(cfg) -> dict:
    """``log_with``/``project_dir`` for the Accelerator; a tracker whose package is missing is an
    error before any model loads."""
    if cfg.report_to == "none":
        return {}
    package = cfg.report_to  # each tracker's package has the tracker's name
    if importlib.util.find_spec(package) is None:
        raise DreamBoothError(f"--report_to {cfg.report_to}: the {package} package is not installed; "
                              f"pip install {package}, or pass --report_to none")
    return {"log_with": cfg.report_to, "project_dir": str(Path(cfg.output_dir) / "logs")}


def _scalar(value):
    # TensorBoard's hparams take numbers, strings and booleans only
    if value is None or isinstance(value, (bool, int, float, str)):
        return "None" if value is None else value
    return json.dumps(value)


class Trackers:
    def __init__(self, cfg, acc):
        self.acc, self.kind = acc, cfg.report_to
        self.on = self.kind != "none" and acc.is_main_process
        if self.kind != "none":  # every process calls it; accelerate starts trackers on the main one
            acc.init_trackers("dreampeft", config={k: _scalar(v) for k, v in cfg.to_dict().items()})

    def log(self, values: dict, step: int) -> None:
        if self.on:
            self.acc.log(values, step=step)

    def images(self, paths: list[str], step: int, prompt: str) -> None:
        if not self.on or not paths:
            return
        import numpy as np
        from PIL import Image

        if self.kind == "tensorboard":
            arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
            self.acc.get_tracker("tensorboard").writer.add_images("validation", arrays, step, dataformats="NHWC")
        else:
            import wandb

            self.acc.get_tracker("wandb").log(
                {"validation": [wandb.Image(p, caption=prompt) for p in paths]}, step=step)

    def end(self) -> None:
        if self.kind != "none":
            self.acc.end_training()
