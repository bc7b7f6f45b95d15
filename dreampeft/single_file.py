"""SDXL as one ``.safetensors`` file in the SGM layout (what community fine-tunes ship).

Reading goes through diffusers' ``from_single_file``; the component configs come from a folder or
hub id (``--single_file_config``), by default SDXL base's configs shipped in ``configs/sdxl_base``
(JSON, no weights). Tokenizers are not in such files: they load from that folder when it has them,
else from SDXL base on the hub (cached after the first time).

Writing (``python -m dreampeft.single_file PIPELINE_DIR OUT.safetensors``) is the inverse of
diffusers' converters, key for key: UNet under ``model.diffusion_model.``, VAE under
``first_stage_model.``, CLIP ViT-L under ``conditioner.embedders.0.transformer.`` and OpenCLIP
ViT-bigG (fused q/k/v, transposed projection) under ``conditioner.embedders.1.model.``. The tests
write the tiny SDXL this way and check that it loads back bit for bit.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

SDXL_BASE_CONFIGS = Path(__file__).resolve().parent / "configs" / "sdxl_base"
SDXL_HUB = "stabilityai/stable-diffusion-xl-base-1.0"
UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, CLIP_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."

_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def is_single_file(path: str | Path) -> bool:
    return str(path).endswith(".safetensors") and not Path(path).is_dir()


def _unet_key(key: str, per_block: int, attention_up: list[bool]) -> str:
    module, _, leaf = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    resnet = lambda rest: next((rest.replace(a, b, 1) for a, b in _RESNET if rest.startswith(a)), rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * (per_block + 1) + j
        return f"input_blocks.{i}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (per_block + 1) + per_block}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * (per_block + 1) + j  # an up block has one layer more than a down block
        return f"output_blocks.{i}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        return f"output_blocks.{b * (per_block + 1) + per_block}.{2 if attention_up[b] else 1}.conv.{m[2]}"
    raise KeyError(f"no SGM name for UNet key {key}")


def _vae_key(key: str, n_blocks: int) -> tuple[str, bool]:
    """(SGM name, whether it is an attention matrix stored as a 1×1 convolution)."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}", False
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}", False
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", False
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key):
        name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
        return f"{m[1]}.mid.attn_1.{name}.{m[3]}", name != "norm" and m[3] == "weight"
    return key, False  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _open_clip(sd: dict) -> dict:
    out, layers = {}, {}
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            layers.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            rest = (m[2].replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
                    .replace("mlp.fc2", "mlp.c_proj").replace("self_attn.out_proj", "attn.out_proj"))
            out[f"transformer.resblocks.{m[1]}.{rest}"] = value
    for (i, leaf), qkv in layers.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def to_sgm(pipe) -> dict[str, torch.Tensor]:
    """The state dict of an SDXL pipeline's four models in the SGM single-file layout."""
    unet, vae = pipe.unet, pipe.vae
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise ValueError("the SGM layout needs one layers_per_block for every UNet block")
    attention_up = ["CrossAttn" in t for t in unet.config.up_block_types]
    sd = {UNET + _unet_key(k, per_block, attention_up): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        name, conv = _vae_key(k, len(vae.config.block_out_channels))
        sd[VAE + name] = v[:, :, None, None] if conv else v
    # transformers 5 names CLIPTextModel's weights without the "text_model." the SGM layout has
    sd.update({CLIP_L + ("" if k.startswith("text_model.") else "text_model.") + k: v
               for k, v in pipe.text_encoder.state_dict().items() if "position_ids" not in k})
    sd.update({CLIP_G + k: v for k, v in _open_clip(pipe.text_encoder_2.state_dict()).items()})
    return {k: v.detach().contiguous() for k, v in sd.items()}


def write_single_file(pipeline_dir: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from .state import atomic_write

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir, torch_dtype=torch.float32)
    sd = to_sgm(pipe)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    out = Path(out)
    atomic_write(out, lambda tmp: save_file(sd, tmp, metadata={"format": "pt", "modelspec.architecture":
                                                                "stable-diffusion-xl-v1-base"}))
    return out


def load_pipeline(model: str | Path, single_file_config: str | None = None, torch_dtype=torch.float32):
    """An SDXL pipeline from a folder, a hub id or one SGM-layout file."""
    from diffusers import StableDiffusionXLPipeline

    if is_single_file(model):
        return load_single_file(model, single_file_config, torch_dtype)
    return StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch_dtype)


def load_single_file(path: str | Path, config: str | None = None, torch_dtype=torch.float32):
    """An SDXL pipeline from one SGM-layout file, its configs from ``config`` (default: SDXL base's)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import AutoTokenizer

    config = str(config or SDXL_BASE_CONFIGS)
    source = config if (Path(config) / "tokenizer").is_dir() or not Path(config).exists() else SDXL_HUB
    tokenizers = {name: AutoTokenizer.from_pretrained(source, subfolder=name) for name in ("tokenizer", "tokenizer_2")}
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=config, torch_dtype=torch_dtype, **tokenizers)
    _check_loaded(pipe, path)
    return pipe


def _check_loaded(pipe, path) -> None:
    """from_single_file leaves weights it found no key for uninitialised (on the meta device), and
    tells the two text encoders apart by width only: check both, so a bad load stops here."""
    from safetensors import safe_open

    if pipe.text_encoder.config.hidden_size == pipe.text_encoder_2.config.hidden_size:
        raise ValueError(f"{path}: both text encoders are {pipe.text_encoder.config.hidden_size} wide, so "
                         "diffusers' single-file reader cannot tell them apart; save the model as a folder")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        empty = [k for k, v in getattr(pipe, name).state_dict().items() if v.is_meta]
        if empty:
            raise ValueError(f"{path}: no weights for {name} ({', '.join(empty[:3])}…): not an SDXL file in "
                             "the SGM layout, or --single_file_config describes another model")
    with safe_open(str(path), "pt") as f:
        key = CLIP_G + "token_embedding.weight"
        if key in f.keys():
            loaded = pipe.text_encoder_2.get_input_embeddings().weight
            if not torch.equal(f.get_tensor(key).to(loaded.dtype), loaded.detach()):
                raise ValueError(f"{path}: diffusers read the wrong weights into text_encoder_2 (both text "
                                 "encoders have the same width, so it cannot tell them apart)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreampeft.single_file",
                                     description="Write an SDXL pipeline folder as one SGM-layout .safetensors file.")
    parser.add_argument("pipeline_dir")
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument("--fp16", action="store_true", help="store float16 (as community files do)")
    args = parser.parse_args(argv)
    print(write_single_file(args.pipeline_dir, args.out, torch.float16 if args.fp16 else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
