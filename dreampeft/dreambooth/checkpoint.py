"""Resumable checkpoints: adapter tensors + optimizer/scheduler state + step, written atomically.

A checkpoint is a folder ``checkpoint-N`` written as ``.checkpoint-N.tmp`` and renamed only when
complete, so an interrupted save never leaves a half checkpoint that ``latest`` would pick. Only
adapter tensors are stored (the frozen model is not copied: an SDXL checkpoint stays megabytes).
Random draws are functions of (seed, step), so no RNG state is needed to resume exactly.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from ..state import AdapterFileError, load_adapter, save_adapter
from .data import DreamBoothError

STATE_NAME = "trainer_state.pt"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir()
             if (m := _PATTERN.match(p.name)) and (p / STATE_NAME).exists()]
    return sorted(found)


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest complete checkpoint's path (what an error message points the user to)."""
    found = list_checkpoints(out_dir)
    return str(found[-1][1]) if found else None


def save_checkpoint(out_dir: Path, step: int, models: dict, optimizer, lr_scheduler, scaler,
                    config_json: str, limit: int | None, extra_state: dict | None = None) -> Path:
    final, tmp = out_dir / f"checkpoint-{step}", out_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(models, tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, "extra": extra_state or {}}
    torch.save(state, tmp / STATE_NAME)
    (tmp / "dreambooth_config.json").write_text(config_json)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if limit is not None:
        for _, old in list_checkpoints(out_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(out_dir: Path, spec: str) -> Path | None:
    if spec == "latest":
        found = list_checkpoints(out_dir)
        return found[-1][1] if found else None
    path = Path(spec)
    if not (path / STATE_NAME).exists():
        raise DreamBoothError(f"--resume_from_checkpoint {spec}: not a checkpoint folder "
                              f"(no {STATE_NAME}); use 'latest' or a checkpoint-N folder")
    return path


def load_checkpoint(path: Path, models: dict, optimizer, lr_scheduler, scaler) -> tuple[int, dict]:
    """Restores the adapters, optimizer and schedule in place; returns (step, extra state)."""
    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
        load_adapter(models, path)  # in place: the optimizer keeps its parameter references
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    except AdapterFileError:
        raise
    except Exception as exc:  # truncated, edited or from another optimizer: torch raises many types
        raise DreamBoothError(f"{path / STATE_NAME}: cannot restore the training state "
                              f"({type(exc).__name__}); resume from an earlier checkpoint-N, or start "
                              "over with --overwrite_output_dir") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"]), state.get("extra") or {}
