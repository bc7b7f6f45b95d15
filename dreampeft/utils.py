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
