"""Single-file SDXL models (the SGM layout of community fine-tunes): the project's writer is the
exact inverse of diffusers' reader, the trainer trains on such a file exactly as on the folder,
and the shipped SDXL base configs describe the real architecture."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dreampeft.single_file import SDXL_BASE_CONFIGS, load_single_file, write_single_file
from dreampeft.tiny import save_tiny_sdxl

from .test_dreambooth import _adapter_tensors, base_args, instance_dir, train_dreambooth  # noqa: F401


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    """The tiny SDXL (text encoders of different widths, as SDXL's) as a folder and as one file."""
    root = tmp_path_factory.mktemp("single")
    folder = save_tiny_sdxl(root / "tiny", seed=0, te2_hidden=48)
    return folder, write_single_file(folder, root / "tiny.safetensors")


@pytest.mark.parametrize("size", ["tiny", "medium"])
def test_written_file_loads_back_bit_for_bit(size, sdxl_pair, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    folder, path = sdxl_pair
    if size == "medium":  # SDXL's three-level layout, two layers per block
        folder = save_tiny_sdxl(tmp_path / "m", seed=1, size="medium", te2_hidden=48)
        path = write_single_file(folder, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight", "conditioner.embedders.1.model.text_projection",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"):
        assert key in keys, key
    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe = load_single_file(path, config=str(folder))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ref, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys(), name
        unequal = [k for k in a if not torch.equal(a[k], b[k])]
        assert not unequal, (name, unequal[:3])


def test_training_on_the_file_equals_training_on_the_folder(sdxl_pair, instance_dir, tmp_path):
    folder, path = sdxl_pair
    flags = ["--rank", "2", "--max_train_steps", "2", "--validation_prompt", "a sks toy", "--inference_steps", "2",
             "--num_validation_images", "1", "--extra_exports", "merged"]
    assert train_dreambooth.main(base_args(folder, instance_dir, tmp_path / "a", *flags)) == 0
    assert train_dreambooth.main(base_args(path, instance_dir, tmp_path / "b", *flags,
                                           "--single_file_config", str(folder))) == 0
    a, b = _adapter_tensors(tmp_path / "a"), _adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "b" / "dreampeft_adapter.json").read_text())
    assert manifest["single_file_config"] == str(folder)  # the export CLI finds the configs again
    assert (tmp_path / "b" / "merged" / "unet").is_dir()


def test_bad_single_files_give_one_line(sdxl_pair, instance_dir, tmp_path, capsys):
    folder, _ = sdxl_pair
    same = save_tiny_sdxl(tmp_path / "same", seed=0)  # both encoders 32 wide
    cases = [(write_single_file(same, tmp_path / "same.safetensors"), str(same), "cannot tell them apart"),
             (tmp_path / "missing.safetensors", str(folder), "no such file")]
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    cases.append((tmp_path / "junk.safetensors", str(folder), "cannot load it as a single-file SDXL model"))
    for path, config, message in cases:
        code = train_dreambooth.main(base_args(path, instance_dir, tmp_path / "out", "--single_file_config", config))
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err


def test_shipped_configs_are_sdxl_base(tmp_path):
    """Built on the meta device from the shipped JSON: SDXL base's published sizes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_BASE_CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SDXL_BASE_CONFIGS / "vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIGS / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIGS / "text_encoder_2"))
    assert count(unet) == 2_567_463_684 and count(vae) == 83_653_863
    assert count(te1) == 123_060_480 and count(te2) == 694_659_840
    attention = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and re.search(r"attn[12]\.to_", n)]
    assert len(attention) == 560  # 70 transformer blocks × 2 attentions × (q, k, v, out)


def test_full_size_builder_is_sdxl_base_with_the_bundled_vocabulary():
    """``python -m dreampeft.tiny sdxl OUT --size full``, built on the meta device (the real build
    takes ~16 GB of RAM): SDXL base's UNet and VAE exactly, encoders matched to the tokenizer."""
    from dreampeft.tiny import build_full_sdxl

    pipe = build_full_sdxl(device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(pipe.unet) == 2_567_463_684 and count(pipe.vae) == 83_653_863
    for enc, hidden in ((pipe.text_encoder, 768), (pipe.text_encoder_2, 1280)):
        assert enc.get_input_embeddings().weight.shape == (len(pipe.tokenizer), hidden)
        assert enc.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.text_encoder_2.config.num_hidden_layers == 32 and pipe.unet.config.cross_attention_dim == 2048
