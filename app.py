#!/usr/bin/env python
"""The dreampeft app: upload subject images, train LoRA / LoRA-Dash / FourierFT / MoRA, generate
side by side with the base model, and compare subject-fidelity scores.

    python app.py                                   # http://127.0.0.1:7860, the offline toy model
    python app.py --model stabilityai/stable-diffusion-xl-base-1.0 --port 8080

It binds 127.0.0.1 unless --host says otherwise. Runs, uploads and downloads go to --work_dir.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from dreampeft.app import TOY, App
    from dreampeft.app.forms import MAX_FILE_MB
    from dreampeft.eval import DEFAULT_CLIP, DEFAULT_DINO
    from dreampeft.utils import quiet_libraries

    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to your network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--model", default=TOY, help="base model preselected in the UI: hub id or SDXL folder")
    p.add_argument("--work_dir", default="dreampeft-app", help="runs, uploads and downloads go here")
    p.add_argument("--dino_model", default=DEFAULT_DINO, help="DINO for the scores (hub id or folder)")
    p.add_argument("--clip_model", default=DEFAULT_CLIP, help="CLIP for the scores (hub id or folder)")
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app works offline
    quiet_libraries()
    app = App(args.work_dir, model=args.model, dino_model=args.dino_model, clip_model=args.clip_model)
    # Uploads over the app's per-image limit are refused by the server itself, before they reach a
    # handler; Gradio's cache of uploads and outputs is swept hourly; only app.public_dir is served.
    app.public_dir.mkdir(parents=True, exist_ok=True)
    app.blocks(delete_cache=(3600, 3600)).queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, allowed_paths=[str(app.public_dir)],
        max_file_size=f"{MAX_FILE_MB}mb", ssr_mode=False, show_error=True, footer_links=[])
    return 0


if __name__ == "__main__":
    sys.exit(main())
