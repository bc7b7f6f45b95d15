#!/usr/bin/env python
"""DreamBooth for SDXL with LoRA, LoRA-Dash, FourierFT or MoRA adapters.

    python train_dreambooth.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" --adapter lora_dash \
        --rank 8 --max_train_steps 500 --output_dir dog-lora-dash
    accelerate launch train_dreambooth.py ...     # N processes, unchanged
    python train_dreambooth.py --help             # every option

Bad input (missing folder, unreadable image, unknown model, flags that do not fit) prints one
line starting with "error:" and exits with status 2.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from dreampeft.adapters import ConfigError
    from dreampeft.dreambooth import DreamBoothError, parse_config, train
    from dreampeft.state import AdapterFileError
    from dreampeft.utils import quiet_libraries

    quiet_libraries()
    try:
        out = train(parse_config(argv))
    except (ConfigError, DreamBoothError, AdapterFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"adapters saved in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
