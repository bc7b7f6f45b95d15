"""Structured progress: one JSON object per line (start, step, validation, checkpoint, done, error).

The CLI renders the same information as a tqdm bar; the app tails the file to show live progress.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class EventLog:
    def __init__(self, path: str | Path | None, enabled: bool = True):
        self._file = None
        if path and enabled:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1, encoding="utf-8")

    def emit(self, event: str, **fields) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: str | Path) -> list[dict]:
    """All events in ``path``. Only the last line may be incomplete (a writer mid-line); a damaged
    line before it means the file is not an event log, and raises naming the line."""
    out = []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON event line; is this a dreampeft --events file?") from None
        if not isinstance(event, dict) or "event" not in event:
            raise ValueError(f"{path}:{number}: not a dreampeft event (no 'event' key)")
        out.append(event)
    return out


def open_events(path: str | Path | None, enabled: bool) -> EventLog:
    """The run's event log (``--events``); a path that cannot be written is said so, by its flag."""
    from .data import DreamBoothError

    try:
        return EventLog(path, enabled=enabled)
    except OSError as exc:
        raise DreamBoothError(f"--events {path}: cannot write it ({exc.strerror}); give a file "
                              "path in a folder you can write to") from None
