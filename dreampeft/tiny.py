"""Tiny, randomly initialised models with the real architectures, built offline from a seed.

They are saved in the same folder layout as a hub model, so tests and the demo exercise the real
loading code (``from_pretrained`` on a local folder):

    python -m dreampeft.tiny sdxl DIR [--seed N]     # StableDiffusionXLPipeline folder
    python -m dreampeft.tiny llama DIR [--seed N]    # LlamaForCausalLM + byte-level tokenizer
    python -m dreampeft.tiny vit DIR [--seed N]      # ViTForImageClassification + image processor

The SDXL model keeps every structural feature the trainer depends on: a UNet with ``text_time``
added conditioning (pooled text embedding + six micro-conditioning numbers), cross-attention
blocks in down, mid and up paths, the two CLIP text encoders (the second with projection), a
VAE and an Euler scheduler. Sizes are chosen so a 64x64 image takes well under a second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLIP_TOKENIZER_DIR = ASSETS / "clip_tokenizer"

# Sizes of the tiny SDXL. cross_attention_dim = hidden(te1) + hidden(te2), as in SDXL (768+1280).
TE1_HIDDEN, TE2_HIDDEN, TE2_PROJ, TIME_DIM = 32, 32, 32, 8


def _clip_config(hidden: int, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
        hidden_act="gelu", bos_token_id=912, eos_token_id=913, pad_token_id=913,
    )


# UNet sizes: "tiny" for tests (16 attention modules), "medium" for benchmarks: SDXL's layout
# (no attention at the first level, 1 then 2 transformer layers deeper) at 1/10 of its widths.
UNET_SIZES = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2)),
    "medium": dict(block_out_channels=(32, 64, 128), layers_per_block=2, attention_head_dim=(2, 4, 8),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 1, 2)),
}


def build_tiny_sdxl(seed: int = 0, size: str = "tiny", te2_hidden: int = TE2_HIDDEN):
    """A StableDiffusionXLPipeline with random weights, deterministic from ``seed``. (``te2_hidden``
    other than the first encoder's width makes the two encoders tell apart as SDXL's do.)"""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8, use_linear_projection=True,
        **UNET_SIZES[size],
        cross_attention_dim=TE1_HIDDEN + te2_hidden,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + TE2_PROJ,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(_clip_config(TE1_HIDDEN))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(te2_hidden, TE2_PROJ))
    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )


def build_full_sdxl(seed: int = 0, device: str | torch.device | None = None):
    """SDXL base's architecture at its real size (the configs shipped in ``configs/sdxl_base``:
    UNet 2.57 B parameters, both CLIP encoders, the VAE) with random weights from ``seed``. The
    encoders' vocabulary is matched to the bundled tokenizer (914 ids instead of 49,408: the real
    vocabulary is not shipped). ``device="meta"`` builds the structure without memory."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .single_file import SDXL_BASE_CONFIGS as cfgs

    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))

    def encoder_config(name: str):
        config = CLIPTextConfig.from_pretrained(cfgs / name)
        config.vocab_size = len(tokenizer)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        return config

    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfgs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfgs / "vae"))
        text_encoder = CLIPTextModel(encoder_config("text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(encoder_config("text_encoder_2"))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR)), unet=unet,
        scheduler=EulerDiscreteScheduler.from_pretrained(cfgs, subfolder="scheduler"))


def save_tiny_sdxl(out_dir: str | Path, seed: int = 0, size: str = "tiny", te2_hidden: int = TE2_HIDDEN) -> Path:
    """The tiny or medium SDXL in fp32, or (``size="full"``) SDXL base's real size in fp16."""
    out = Path(out_dir)
    if size == "full":
        build_full_sdxl(seed).to(torch.float16).save_pretrained(out)
        return out
    build_tiny_sdxl(seed, size, te2_hidden).save_pretrained(out)
    return out


def _byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials): every string round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .tiny_tokenizer import bytes_to_unicode

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + list(bytes_to_unicode().values()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>",
    )


def build_tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2):
    """A LlamaForCausalLM with a byte-level vocabulary (260 tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=260, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config), _byte_tokenizer()


def build_tiny_vit(seed: int = 0, num_labels: int = 3, image_size: int = 32):
    """A ViTForImageClassification on ``image_size`` px images with 8 px patches."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=num_labels,
        id2label={i: f"class_{i}" for i in range(num_labels)},
        label2id={f"class_{i}": i for i in range(num_labels)},
    )
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    return ViTForImageClassification(config), processor


def build_tiny_dino(seed: int = 0, image_size: int = 32):
    """A ViTModel + image processor in the layout of facebook/dino-vits16 (CLS token features)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64)
    return ViTModel(config), ViTImageProcessor(size={"height": image_size, "width": image_size})


def build_tiny_clip(seed: int = 0, image_size: int = 32):
    """A CLIPModel + CLIPProcessor (bundled tokenizer) in the layout of openai/clip-vit-base-patch32."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    torch.manual_seed(seed)
    text = _clip_config(32).to_dict()
    vision = CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=CLIPTextConfig(**text).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=16)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR)))
    return CLIPModel(config), processor


def save_pair(model_and_proc, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    for part in model_and_proc:
        part.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreampeft.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["sdxl", "llama", "vit", "dino", "clip"])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=[*sorted(UNET_SIZES), "full"], default="tiny",
                        help="SDXL size: tiny, medium, or full (SDXL base's architecture, 2.57 B-parameter "
                             "UNet, random weights, fp16 on disk: ~6.5 GB, needs ~16 GB of RAM to build)")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} exists and is not empty; choose a new folder or delete it first")
    if args.kind == "sdxl":
        save_tiny_sdxl(out, args.seed, args.size)
    elif args.kind == "llama":
        save_pair(build_tiny_llama(args.seed), out)
    else:
        builders = {"vit": build_tiny_vit, "dino": build_tiny_dino, "clip": build_tiny_clip}
        save_pair(builders[args.kind](args.seed), out)
    print(f"saved {'full-size' if args.size == 'full' else 'tiny'} {args.kind} (seed {args.seed}) to {out}")


if __name__ == "__main__":
    main()
