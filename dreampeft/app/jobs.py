"""Training jobs for the app: each is ``python -m dreampeft.dreambooth --config cfg.json`` in its
own process, one at a time, the rest queued in order.

A separate process keeps the UI responsive, lets Stop end a run at once (the process group gets
SIGTERM, then SIGKILL), and frees all training memory when a run ends. Progress is read from the
run's JSON-lines event file, the same one the CLI writes with ``--events``.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..dreambooth import DreamBoothConfig
from ..dreambooth.events import read_events

STATES = ("queued", "running", "done", "failed", "stopped")


@dataclass
class Job:
    id: int
    cfg: DreamBoothConfig
    state: str = "queued"
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None

    @property
    def method(self) -> str:
        return self.cfg.adapter

    @property
    def label(self) -> str:
        """How the page names the run everywhere: "lora (run 1)"."""
        return f"{self.method} (run {self.id})"

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def events_path(self) -> Path:
        return Path(self.cfg.events)

    @property
    def log_path(self) -> Path:
        return self.output_dir / "train.log"

    def events(self) -> list[dict]:
        return read_events(self.events_path) if self.events_path.exists() else []

    def progress(self) -> dict:
        """step, total, loss, ETA (s), validation images as (path, step), fidelity evaluations, the
        step the exports hold, the class images made so far (done, total) while prior preservation
        prepares, and the error, if any."""
        info = {"id": self.id, "method": self.method, "state": self.state, "step": 0, "total": None,
                "loss": None, "eta_s": None, "images": [], "error": None, "evals": [], "exported_step": None,
                "exported_reason": "", "class_images": None}
        steps = []
        for e in self.events():
            if e["event"] == "start":
                info["total"], first = e["total_steps"], e
            elif e["event"] == "step":
                steps.append(e)
            elif e["event"] == "class_images":
                info["class_images"] = (e["done"], e["total"])
            elif e["event"] == "validation":  # the final one is logged too, before "done"
                info["images"] += [(path, e["step"]) for path in e["images"]]
            elif e["event"] == "eval":
                info["evals"].append(e)
            elif e["event"] == "done":
                info["exported_step"] = e.get("exported_step")
                info["exported_reason"] = e.get("exported_reason", "")
            elif e["event"] == "error":
                info["error"] = e["message"]
        if steps:
            info["step"], info["loss"] = steps[-1]["step"], steps[-1]["loss"]
            if self.state == "running" and info["total"]:
                # rate over the steps seen so far, from the start event (setup time excluded)
                per_step = (steps[-1]["time"] - first["time"]) / max(1, steps[-1]["step"] - first["start_step"])
                info["eta_s"] = per_step * (info["total"] - info["step"])
        if self.state == "failed" and not info["error"]:
            info["error"] = self._last_error_line()
        return info

    def _last_error_line(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        errors = [ln for ln in lines if ln.startswith("error:")] or lines[-1:]
        return errors[-1].removeprefix("error:").strip() if errors else f"exit status {self.returncode}"


class JobQueue:
    """Runs submitted jobs one after another on a worker thread."""

    def __init__(self, python: str = sys.executable, poll_s: float = 0.2):
        self.jobs: list[Job] = []
        self._python, self._poll_s = python, poll_s
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._worker, daemon=True, name="dreampeft-jobs").start()

    def submit(self, cfg: DreamBoothConfig) -> Job:
        """Queue a run; its config is saved beside its outputs and passed to the child by file."""
        if not cfg.events:
            raise ValueError("a queued job needs cfg.events (the app reads progress from it)")
        with self._lock:
            job = Job(next(self._ids), cfg)
            self.jobs.append(job)
        self._wake.set()
        return job

    def stop_all(self) -> int:
        """Cancel queued jobs and stop the running one; returns how many were affected."""
        with self._lock:
            hit = [j for j in self.jobs if j.state in ("queued", "running")]
            for job in hit:
                if job.state == "queued":
                    job.state, job.ended = "stopped", time.time()
                elif job.process is not None:
                    job.state = "stopped"
                    _terminate(job.process)
        return len(hit)

    def busy(self) -> bool:
        return any(j.state in ("queued", "running") for j in self.jobs)

    def wait(self, timeout: float) -> bool:
        """Block until no job is queued or running (tests, scripts); False on timeout."""
        end = time.time() + timeout
        while self.busy() and time.time() < end:
            time.sleep(self._poll_s)
        return not self.busy()

    def _next(self) -> Job | None:
        with self._lock:
            job = next((j for j in self.jobs if j.state == "queued"), None)
            if job is not None:
                job.output_dir.mkdir(parents=True, exist_ok=True)
                config = job.output_dir / "app_config.json"
                job.cfg.save(config)
                job.events_path.unlink(missing_ok=True)
                with open(job.log_path, "w") as log:
                    job.process = subprocess.Popen(
                        [self._python, "-m", "dreampeft.dreambooth", "--config", str(config)],
                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
                job.state, job.started = "running", time.time()
            return job

    def _worker(self) -> None:
        while True:
            job = self._next()
            if job is None:
                self._wake.wait()
                self._wake.clear()
                continue
            code = job.process.wait()
            with self._lock:
                job.returncode, job.ended = code, time.time()
                if job.state == "running":
                    job.state = "done" if code == 0 else "failed"


def _terminate(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the run's process group (accelerate may have children), SIGKILL after a grace."""
    def kill(sig):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    kill(signal.SIGTERM)
    threading.Timer(grace_s, lambda: process.poll() is None and kill(signal.SIGKILL)).start()
