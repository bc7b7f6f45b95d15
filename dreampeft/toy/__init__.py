"""The toy SDXL: a small SDXL-architecture model trained in this project on ``dreampeft.toyworld``,
shipped in ``assets/toy_sdxl`` (fp16), so personalisation can be seen and measured offline."""

from ..tiny import ASSETS

TOY_MODEL = ASSETS / "toy_sdxl"
