#!/usr/bin/env python
"""DreamBooth for SDXL with LoRA, LoRA-Dash, FourierFT or MoRA adapters.

    python train_dreambooth.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" --adapter lora_dash \
        --rank 8 --max_train_steps 500 --output_dir dog-lora-dash
    accelerate launch train_dreambooth.py ...     # N processes, unchanged
    python train_dreambooth.py --help             # every option

Bad input (missing folder, unreadable image, unknown model, flags that do not fit) prints one
line starting with "error:" and exits with status 2. ``python -m dreampeft.dreambooth`` is the same.
"""

import sys

from dreampeft.dreambooth.cli import main

if __name__ == "__main__":
    sys.exit(main())
