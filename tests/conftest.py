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

# The longest files first (`make test` runs them with --no-loadscope-reorder; seconds of one worker,
# session 26: ~225, 180, 115, 95, 90, 60, 55, 45), so that the two workers never end on one long
# file while the other idles — xdist's own order, most tests first, put the toy's files last.
LONGEST_FIRST = ["test_toy.py", "test_toy_cli.py", "test_bench.py", "test_app_browser.py", "test_robustness.py",
                 "test_app.py", "test_toy_pretrain.py", "test_toy_recipes.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


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
