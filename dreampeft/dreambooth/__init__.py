"""DreamBooth for SDXL with any dreampeft adapter: ``train(DreamBoothConfig(...))`` or the CLI
``train_dreambooth.py``."""

from .cli import build_parser, parse_config
from .config import DreamBoothConfig
from .data import DreamBoothError
from .train import train

__all__ = ["DreamBoothConfig", "DreamBoothError", "build_parser", "parse_config", "train"]
