"""W0's SVDs computed in a background thread while LoRA-Dash warms up (docs/METHODS.md §2, Launch).

The launch ranks every singular direction of every adapted W0, so it needs their full SVDs: at
SDXL's size 560 of them, 145–190 s on a 2-core CPU, all in the launch step. W0 is frozen, so its
SVD does not depend on when it is taken: ``SVDPrefetch`` starts a daemon thread with the run and
decomposes the weights one by one during the warm-up (torch releases the GIL inside the SVD, so
training goes on meanwhile). The launch takes each result as it asks for it: a finished one at
once, the one in progress when it finishes, and one the thread has not reached it decomposes
itself, so nothing is computed twice.

Every prefetched SVD is taken on the CPU, also for a model on a GPU: the GPU keeps training while
otherwise idle CPU cores work, and which of the two threads took a layer cannot change its bits,
so a run is reproducible. On a CPU-only machine that is the launch's own computation, and the
directions are bit-identical to a launch without prefetching (tested); on a GPU they are the CPU's
float32 SVD instead of cuSOLVER's (equally exact, not the same bits). Where results wait: in
``svd_cache`` when one is given (on disk), else in host memory — U and Vᵀ in float32, about twice
the adapted weights (SDXL's UNet attention: 7.1 GB); ``start`` declines, saying so, when that would
take more than half the memory available.

What it buys depends on the machine: on a GPU machine the launch's stall leaves the run; on a
2-core CPU the same CPU time moves into the warm-up steps (`bench/results/dash_prefetch_cpu.md`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .svd_cache import frozen_svd

ON_DISK = object()  # the thread's result is in svd_cache: the launch reads it there


def held_bytes(layers: list[nn.Module]) -> int:
    """Host memory that U, σ and Vᵀ of every layer's W0 take in float32."""
    total = 0
    for m in layers:
        d_out, d_in = m.base_layer.weight.flatten(1).shape  # a convolution's as (out, in·kh·kw)
        total += 4 * min(d_out, d_in) * (d_out + d_in + 1)
    return total


class SVDPrefetch:
    """Decomposes each layer's frozen W0 in a background thread, in the order the launch asks."""

    def __init__(self, layers: list[nn.Module], svd_cache: str | Path | None = None):
        self.svd_cache = svd_cache
        self.seconds: float | None = None  # the thread's wall time, once every layer is done
        self.completed = 0  # layers decomposed by the thread
        self._pending = list(layers)
        self._done: dict[nn.Module, object] = {}
        self._busy: nn.Module | None = None
        self._stopped = False
        # MKL keeps its thread count per thread, and a new thread starts from the process default:
        # after torch.set_num_threads(n) the thread's SVDs differed from the launch's in the last bits
        self._num_threads = torch.get_num_threads()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="lora-dash-svd", daemon=True)

    @classmethod
    def start(cls, models: Iterable[nn.Module], svd_cache: str | Path | None = None,
              steps: int | None = None) -> SVDPrefetch | None:
        """Start on every LoRA-Dash layer of ``models`` that will launch within the run's ``steps``
        optimizer steps (all, if None); None when there is none, or when holding the results in
        memory would take more than half of what is available."""
        import psutil

        from .lora_dash import LoRADashLayer

        layers = [m for model in models for m in model.modules()
                  if isinstance(m, LoRADashLayer) and not bool(m.dash_active) and not m.merged
                  and (steps is None or m.config.warmup_steps <= steps)]
        if not layers:
            return None
        need, free = held_bytes(layers), psutil.virtual_memory().available
        if svd_cache is None and need > free / 2:
            print(f"note: LoRA-Dash's SVDs are not prefetched: held in memory they need {need / 1e9:.1f} GB "
                  f"and {free / 1e9:.1f} GB is available; --dash_svd_cache DIR keeps them on disk instead",
                  file=sys.stderr)
            return None
        prefetch = cls(layers, svd_cache)
        prefetch._thread.start()
        return prefetch

    def _decompose(self, layer: nn.Module, by_thread: bool = False):
        if layer.merged:  # the launch subtracts the merged update first: its own business
            return None
        U, S, Vh = frozen_svd(layer.base_layer.weight.detach().float().flatten(1).cpu(), self.svd_cache)
        return ON_DISK if by_thread and self.svd_cache is not None else (U, S, Vh)

    def _run(self) -> None:
        t0 = time.perf_counter()
        torch.set_num_threads(self._num_threads)
        while True:
            with self._cond:
                if self._stopped or not self._pending:
                    if not self._pending:
                        self.seconds = time.perf_counter() - t0
                    return
                layer = self._busy = self._pending.pop(0)
            try:
                result = self._decompose(layer, by_thread=True)
            except Exception:  # noqa: BLE001 - the launch decomposes it again and raises there
                result = None
            with self._cond:
                self.completed += result is not None
                self._done[layer] = result
                self._busy = None
                self._cond.notify_all()

    def take(self, layer: nn.Module) -> tuple | None:
        """The layer's (U, σ, Vᵀ) on the CPU: the thread's (waiting while it computes it), or
        decomposed here if the thread has not reached it. None only after ``close`` (or for a
        merged layer): the launch then decomposes W0 where it lives."""
        with self._cond:
            mine = layer in self._pending
            if mine:
                self._pending.remove(layer)
            while self._busy is layer:
                self._cond.wait()
            result = None if mine else self._done.pop(layer, None)
        if mine:
            result = self._decompose(layer)
        if result is ON_DISK:  # read back from svd_cache (the same bytes the thread wrote)
            result = self._decompose(layer)
        return result

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread: every layer decomposed, or stopped by ``close``."""
        self._thread.join(timeout)

    def __enter__(self) -> SVDPrefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop after the SVD in progress and drop what is held (the run ended or was stopped)."""
        with self._cond:
            self._stopped = True
            self._pending.clear()
            self._done.clear()
