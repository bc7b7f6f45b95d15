"""The metadata A1111, ComfyUI and LoRA browsers read from a kohya-format file.

kohya sd-scripts writes ``ss_*`` keys (training settings, trigger words as tag frequencies) and the
Stability AI model spec (``modelspec.*``: architecture, title, resolution); A1111 shows them in its
metadata viewer and Civitai reads the trigger words from ``ss_tag_frequency``. ``sshs_model_hash``
is the SHA-256 of the tensor bytes (everything after the safetensors header), as kohya computes it,
so it stays the same whatever the metadata says.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
from collections import Counter
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..state import atomic_write


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """kohya's tags: each caption split at commas, stripped, counted."""
    return dict(Counter(t.strip() for c in captions for t in c.split(",") if t.strip()))


def kohya_metadata(run) -> dict[str, str]:
    """``ss_*`` and ``modelspec.*`` entries (all strings, as safetensors metadata must be)."""
    cfg = run.cfg
    rank = cfg.adapter_options.get("r", 4)
    folder = f"{cfg.repeats}_{Path(cfg.instance_data_dir).name}"  # kohya's "N_name" dataset folder
    res = f"{cfg.resolution}x{cfg.resolution}"
    meta = {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": cfg.pretrained_model_name_or_path,
        "ss_network_module": f"dreampeft.{cfg.adapter}",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(cfg.adapter_options.get("alpha") or rank),
        "ss_network_args": json.dumps(cfg.adapter_options, sort_keys=True),
        "ss_output_name": Path(cfg.output_dir).name,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_enable_bucket": str(len(run.buckets) > 1 or bool(cfg.aspect_buckets)),
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(s)} for i, s in enumerate(run.buckets)}}),
        "ss_num_train_images": str(len(run.instance) * cfg.repeats),
        "ss_num_reg_images": str(len(run.klass)),
        "ss_max_train_steps": str(run.total_steps),
        "ss_steps": str(run.total_steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.learning_rate) if cfg.train_text_encoder else "0",
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_optimizer": cfg.optimizer,
        "ss_batch_size_per_device": str(cfg.train_batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": str(cfg.seed),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_min_snr_gamma": str(cfg.snr_gamma),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_caption_dropout_rate": str(cfg.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": str(cfg.caption_tag_dropout_rate),
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_masked_loss": str(cfg.masked_loss),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_dataset_dirs": json.dumps({folder: {"n_repeats": cfg.repeats, "img_count": len(run.instance)}}),
        "ss_tag_frequency": json.dumps({folder: tag_frequency([ex.prompt for ex in run.instance])}),
        "ss_training_comment": f"dreampeft {cfg.adapter}; trigger: {cfg.instance_prompt}",
        "ss_training_finished_at": str(datetime.datetime.now(datetime.timezone.utc).timestamp()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": f"{Path(cfg.output_dir).name} ({cfg.adapter})",
        "modelspec.resolution": res,
        "modelspec.trigger_phrase": cfg.instance_prompt,
        "modelspec.date": datetime.date.today().isoformat(),
    }
    if cfg.use_ema:
        meta["ss_ema_decay"] = str(cfg.ema_decay)
    return meta


def tensor_hash(path: Path) -> str:
    """SHA-256 of the bytes after the safetensors header (kohya's ``sshs_model_hash``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Rewrite ``path`` with ``metadata`` added to its header (and the tensor hash), atomically."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        merged = {**(f.metadata() or {}), **metadata}
    merged["sshs_model_hash"] = tensor_hash(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=merged))
