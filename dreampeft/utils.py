"""Small shared helpers."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Hide per-component loading bars and notices of diffusers/transformers (e.g. the
    "requires torchvision" fallback notice): our own progress bar and table are the output."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def image_grid(rows, cell: int = 96):
    """Rows of PIL images → one image, each cell resized to ``cell`` px (nearest, to stay crisp)."""
    from PIL import Image

    out = Image.new("RGB", (cell * max(len(r) for r in rows), cell * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            out.paste(img.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, r * cell))
    return out


def model_load_error(flag: str, model: str, exc: BaseException) -> str:
    """One line for a model that ``from_pretrained`` could not load: local folder or hub id."""
    from pathlib import Path

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = ("the folder is not a complete model" if Path(model).exists()
             else "it is not a local folder, and the hub could not be reached or has no such model")
    return f"{flag} {model}: cannot load it ({where}: {first})"


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (seconds, not the hub client's minute of retries)."""
    import os
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(hub.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def loadable(name: str) -> bool:
    """A local folder, a hub id in the local cache, or a hub id while the hub answers."""
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache

    if Path(name).exists():
        return True
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return True
    except ValueError:  # not a valid repo id either
        return False
    return hub_reachable()
