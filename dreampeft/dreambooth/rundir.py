"""A run owns its ``--output_dir``: a lock, checks at start, and a final save that is atomic as a whole.

* **Lock**: ``.dreampeft.lock`` held with ``flock`` for the life of the process; a second trainer on
  the folder stops at once (the kernel drops the lock when a process dies, even by ``kill -9``).
* **Start**: the folder is created and written to before any model loads. A finished run
  (``dreampeft_adapter.safetensors``) or checkpoints of an unfinished one are refused unless the
  run resumes, or ``--overwrite_output_dir`` removes the old run's files first.
* **Final save**: every final file is written into ``.final.tmp/``; the commit moves the old
  outputs into ``.previous.tmp/``, then the new ones in (the native adapter last), then drops the
  old. ``recover`` (run at every start) rolls an interrupted commit back to the old run, or forward
  when the new adapter had arrived: the folder never keeps a mix of two runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from ..state import MANIFEST_NAME, WEIGHTS_NAME
from .checkpoint import list_checkpoints
from .data import DreamBoothError

LOCK_NAME = ".dreampeft.lock"
STAGE, PREVIOUS, MOVED = ".final.tmp", ".previous.tmp", ".all-moved"
# What a finished run leaves besides checkpoints and validation images (the native adapter last).
FINAL_OUTPUTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
                 "pytorch_lora_weights_kohya_diff.safetensors",
                 "export_report.json", "dreambooth_config.json", "README.md", "peft", "merged",
                 "training_weights", "fidelity.png", MANIFEST_NAME, WEIGHTS_NAME)
# Keys a resumed run may change; any other difference from the checkpoint's config stops the resume.
RESUME_MAY_CHANGE = {"max_train_steps", "num_train_epochs", "validation_prompt", "num_validation_images",
                     "validation_steps", "inference_steps", "checkpointing_steps", "checkpoints_total_limit",
                     "resume_from_checkpoint", "events", "output_dir", "export_rank", "export_energy",
                     "extra_exports", "overwrite_output_dir", "instance_data_dir", "class_data_dir",
                     "report_to", "mask_dir", "dino_model", "clip_model"}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def claim(out: Path, overwrite: bool, resuming: bool):
    """Create, lock and check ``out``; returns the open lock file (keep it for the whole run)."""
    if out.exists() and not out.is_dir():
        raise DreamBoothError(f"--output_dir {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK_NAME, "a+")
    except OSError as exc:
        raise DreamBoothError(f"--output_dir {out}: cannot write there ({exc.strerror}); "
                              "choose a folder you can write to") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise DreamBoothError(f"--output_dir {out}: another training run (pid {holder}) is using this "
                              "folder; wait for it to finish or choose another --output_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    recover(out)
    finished = (out / WEIGHTS_NAME).exists()
    checkpoints = list_checkpoints(out)
    if overwrite:
        for name in (*FINAL_OUTPUTS, "validation", "logs", "eval", "fidelity.csv"):
            _remove(out / name)
        for _, path in checkpoints:
            _remove(path)
    elif not resuming and (finished or checkpoints):
        what = "a finished run" if finished else f"checkpoints of an unfinished run ({checkpoints[-1][1].name})"
        raise DreamBoothError(f"--output_dir {out} already holds {what}; pass --overwrite_output_dir to "
                              "replace it, --resume_from_checkpoint latest to continue it, or choose "
                              "another folder")
    return lock


def check_resume_config(checkpoint: Path, current: dict) -> None:
    """Stop a resume whose options differ from the checkpoint's in what shapes the training."""
    path = checkpoint / "dreambooth_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DreamBoothError(f"{path}: cannot read the checkpoint's options ({exc}); the checkpoint "
                              "is damaged: resume from an earlier one or start over") from None
    diffs = [f"--{k} {saved.get(k)!r} → {current.get(k)!r}" for k in sorted(saved.keys() | current.keys())
             if k not in RESUME_MAY_CHANGE and saved.get(k) != current.get(k)]
    if diffs:
        raise DreamBoothError(f"--resume_from_checkpoint {checkpoint}: the run was started with other "
                              f"options ({'; '.join(diffs)}); resume with the same options, or start a "
                              "new run with --overwrite_output_dir")


def stage(out: Path) -> Path:
    folder = out / STAGE
    _remove(folder)
    folder.mkdir()
    return folder


def commit(out: Path) -> None:
    """Replace the old final outputs by the staged ones; see the module docstring."""
    staged, previous = out / STAGE, out / PREVIOUS
    _remove(previous)
    previous.mkdir()
    for name in FINAL_OUTPUTS:
        if (out / name).exists():
            os.replace(out / name, previous / name)
    (previous / MOVED).touch()
    for name in sorted(os.listdir(staged), key=lambda n: n == WEIGHTS_NAME):
        os.replace(staged / name, out / name)
    staged.rmdir()
    shutil.rmtree(previous)


def recover(out: Path) -> None:
    """Finish or undo a commit that a crash interrupted (and drop an unfinished stage)."""
    staged, previous = out / STAGE, out / PREVIOUS
    if previous.exists():
        if staged.exists() and (staged / WEIGHTS_NAME).exists():  # the new run never arrived: roll back
            if (previous / MOVED).exists():
                for name in FINAL_OUTPUTS:
                    _remove(out / name)
            for name in os.listdir(previous):
                if name != MOVED:
                    os.replace(previous / name, out / name)
        _remove(previous)
    _remove(staged)
