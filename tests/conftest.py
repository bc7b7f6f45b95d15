"""Session fixtures: the tiny SDXL folders the end-to-end tests load with from_pretrained."""

from __future__ import annotations

import os

import pytest
import torch

from dreampeft.tiny import save_tiny_sdxl

# `make test` runs two pytest-xdist workers on a 2-core machine: one thread each (and in the CLI
# runs they start, through the environment), or four threads fight over two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def medium_sdxl(tmp_path_factory):
    """SDXL's 3-level layout with layers_per_block=2, at 1/10 of its widths."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "medium-sdxl", seed=0, size="medium")


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    """Tiny random DINO and CLIP folders for the fidelity metrics."""
    from dreampeft.tiny import build_tiny_clip, build_tiny_dino, save_pair

    root = tmp_path_factory.mktemp("eval-models")
    return save_pair(build_tiny_dino(), root / "dino"), save_pair(build_tiny_clip(), root / "clip")
