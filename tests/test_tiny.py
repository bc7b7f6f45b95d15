"""The offline tiny models load through the ordinary from_pretrained and run."""

from __future__ import annotations

import subprocess
import sys

import torch

from dreampeft import tiny
from dreampeft.tiny_tokenizer import write_clip_tokenizer


def test_bundled_tokenizer_is_reproducible(tmp_path):
    write_clip_tokenizer(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (tiny.CLIP_TOKENIZER_DIR / name).read_text(), name


def test_sdxl_cli_folder_generates_with_from_pretrained(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "sdxl"
    subprocess.run([sys.executable, "-m", "dreampeft.tiny", "sdxl", str(out), "--seed", "3"], check=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    img = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)
    # deterministic from the seed: the same seed rebuilds identical weights
    again = tiny.build_tiny_sdxl(seed=3)
    for (k, a), b in zip(pipe.unet.state_dict().items(), again.unet.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(tiny.build_tiny_sdxl(seed=4).unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_llama_and_vit_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoTokenizer

    tiny.main(["llama", str(tmp_path / "llama")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(tmp_path / "llama")
    ids = tok("key 3f2a-9c → value", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "key 3f2a-9c → value"
    assert model(ids).logits.shape == (1, ids.shape[1], 260)
    tiny.main(["vit", str(tmp_path / "vit")])
    vit = AutoModelForImageClassification.from_pretrained(tmp_path / "vit")
    assert vit(torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)
