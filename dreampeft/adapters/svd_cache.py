"""The SVD of a frozen weight, kept on disk under a hash of its bytes (LoRA-Dash's launch).

LoRA-Dash ranks *every* singular direction of W0 at its launch, so it needs W0's full SVD: at
SDXL's size 560 of them, 275 s on a 2-core CPU. W0 is frozen, so the SVD of the same
bytes is the same factorisation in every run on that base: ``--dash_svd_cache DIR`` stores
U, σ, Vᵀ per weight (float32, what the launch computes) and the next run's launch reads them
instead (8.8 s for SDXL's UNet: ``bench/dash_launch.py``). The key is a BLAKE2b hash of the
weight's bytes, shape and dtype, so another base, a changed weight or a merged adapter never hits
a stale entry. Cost: U and V in float32, about twice the adapted weights (7.1 GB for SDXL's UNet
attention); files are written atomically.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def weight_key(w: torch.Tensor) -> str:
    """Hex digest of ``w``'s values (bytes), shape and dtype."""
    host = w.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{tuple(host.shape)}{host.dtype}".encode())
    h.update(memoryview(host.view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


def frozen_svd(w0: torch.Tensor, cache: str | Path | None = None) -> tuple[torch.Tensor, ...]:
    """``torch.linalg.svd(w0, full_matrices=False)``; with ``cache``, read from there when the same
    weight was decomposed before, else computed and written there."""
    if cache is None:
        return torch.linalg.svd(w0, full_matrices=False)
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = Path(cache) / f"{weight_key(w0)}.safetensors"
    k = min(w0.shape)
    if path.exists():
        try:
            t = load_file(path, device=str(w0.device))
            if t["U"].shape == (w0.shape[0], k) and t["Vh"].shape == (k, w0.shape[1]) and t["S"].shape == (k,):
                return t["U"], t["S"], t["Vh"]
        except (SafetensorError, KeyError, OSError):
            pass  # unreadable (e.g. truncated by hand): computed again and replaced
    U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"U": U.contiguous().cpu(), "S": S.contiguous().cpu(), "Vh": Vh.contiguous().cpu()}, tmp)
    os.replace(tmp, path)
    return U, S, Vh
