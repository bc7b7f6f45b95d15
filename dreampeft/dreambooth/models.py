"""Loading the SDXL components and encoding prompts the way SDXL was trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DreamBoothConfig
from .data import DreamBoothError


@dataclass
class SDXLParts:
    tokenizers: list
    text_encoders: list  # [CLIPTextModel, CLIPTextModelWithProjection]
    vae: object
    unet: object
    noise_scheduler: object  # DDPM, for training
    force_zeros_for_empty_prompt: bool = True  # SDXL base's unconditional is zero embeddings
    pixel_stride: int = 8  # a view's sides must be multiples of this (VAE factor × UNet downsampling)
    inference_scheduler: object = None  # a single file's; folders and hub ids read theirs when sampling


def _load(cls, path: str, flag: str, loader: str = "from_pretrained", **kw):
    try:
        return getattr(cls, loader)(path, **kw)
    except (OSError, ValueError, EnvironmentError) as exc:
        hint = ("it is not a local folder, and the hub could not be reached or has no such model"
                if not Path(path).exists() else "the folder is not a complete SDXL pipeline")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DreamBoothError(f"{flag} {path}: cannot load {kw.get('subfolder', 'model')} ({hint}: "
                              f"{first})") from None


def load_parts(cfg: DreamBoothConfig) -> SDXLParts:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from ..single_file import is_single_file

    path, flag, rev = cfg.pretrained_model_name_or_path, "--pretrained_model_name_or_path", cfg.revision
    if is_single_file(path):
        return _load_single_file(cfg)
    local = Path(path)
    if (path.startswith((".", "/", "~")) or local.exists()) and not (local / "model_index.json").exists():
        what = "does not exist" if not local.exists() else "has no model_index.json"
        raise DreamBoothError(f"{flag} {path}: {what}; pass an SDXL pipeline folder or a hub id "
                              "(offline demo: python -m dreampeft.tiny sdxl DIR)")
    tokenizers = [_load(AutoTokenizer, path, flag, subfolder=s, revision=rev) for s in ("tokenizer", "tokenizer_2")]
    encoders = [_load(CLIPTextModel, path, flag, subfolder="text_encoder", revision=rev),
                _load(CLIPTextModelWithProjection, path, flag, subfolder="text_encoder_2", revision=rev)]
    if cfg.pretrained_vae_model_name_or_path:
        vae = _load(AutoencoderKL, cfg.pretrained_vae_model_name_or_path, "--pretrained_vae_model_name_or_path")
    else:
        vae = _load(AutoencoderKL, path, flag, subfolder="vae", revision=rev)
    unet = _load(UNet2DConditionModel, path, flag, subfolder="unet", revision=rev)
    scheduler = _load(DDPMScheduler, path, flag, subfolder="scheduler", revision=rev)
    index = _load(StableDiffusionXLPipeline, path, flag, revision=rev, loader="load_config")
    return _finish(SDXLParts(tokenizers, encoders, vae, unet, scheduler,
                             bool(index.get("force_zeros_for_empty_prompt", True))))


def _load_single_file(cfg: DreamBoothConfig) -> SDXLParts:
    from diffusers import AutoencoderKL, DDPMScheduler

    from ..single_file import load_single_file

    path, flag = cfg.pretrained_model_name_or_path, "--pretrained_model_name_or_path"
    if not Path(path).is_file():
        raise DreamBoothError(f"{flag} {path}: no such file; pass an SDXL .safetensors file, a pipeline folder "
                              "or a hub id")
    try:
        pipe = load_single_file(path, cfg.single_file_config)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DreamBoothError(f"{flag} {path}: cannot load it as a single-file SDXL model with the configs of "
                              f"--single_file_config {cfg.single_file_config or '(SDXL base)'} ({first})") from None
    vae = (_load(AutoencoderKL, cfg.pretrained_vae_model_name_or_path, "--pretrained_vae_model_name_or_path")
           if cfg.pretrained_vae_model_name_or_path else pipe.vae)
    return _finish(SDXLParts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], vae,
                             pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config),
                             bool(pipe.config.force_zeros_for_empty_prompt), inference_scheduler=pipe.scheduler))


def _finish(parts: SDXLParts) -> SDXLParts:
    vae, unet = parts.vae, parts.unet
    parts.pixel_stride = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)
    for m in (*parts.text_encoders, vae, unet):
        # Set, not assumed: transformers 5 loads a folder saved in fp16 as fp16 (diffusers as fp32),
        # and a mixed pipeline stops with a dtype mismatch. The run casts later as it asks.
        m.to(torch.float32).requires_grad_(False).eval()
        with torch.no_grad():  # own, aligned storage: a weight memory-mapped at an odd offset takes
            for p in m.parameters():  # other matmul kernels, and a file and a folder would differ in the last bit
                p.data = p.data.clone()
    return parts


def tokenize(parts: SDXLParts, prompts: list[str]) -> list[torch.Tensor]:
    return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in parts.tokenizers]


def encode_prompts(text_encoders: list, token_ids: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: penultimate hidden states of both encoders side by side, and the second
    encoder's projected pooled embedding (as diffusers' SDXL training script)."""
    hidden = []
    for encoder, ids in zip(text_encoders, token_ids):
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out.text_embeds


def build_pipeline(cfg: DreamBoothConfig, parts: SDXLParts, unet=None, text_encoders=None):
    """An SDXL pipeline on the training components (only the scheduler is read from disk)."""
    from diffusers import StableDiffusionXLPipeline

    te = text_encoders or parts.text_encoders
    if parts.inference_scheduler is not None:  # a single file: no folder to read the scheduler from
        pipe = StableDiffusionXLPipeline(
            vae=parts.vae, unet=unet or parts.unet, text_encoder=te[0], text_encoder_2=te[1],
            tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1], scheduler=parts.inference_scheduler,
            force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionXLPipeline.from_pretrained(
        cfg.pretrained_model_name_or_path, revision=cfg.revision, vae=parts.vae,
        unet=unet or parts.unet, text_encoder=te[0], text_encoder_2=te[1],
        tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1])
    pipe.set_progress_bar_config(disable=True)
    return pipe
