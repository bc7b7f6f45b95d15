"""dp.load_into_pipeline: every method from a run folder, scale, fuse/unfuse, unload."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

import dreampeft as dp

from .test_export import COMPONENTS, _adapted, _pipe, _text_out
from .test_dreambooth import unet_output


@pytest.mark.parametrize("method", ["lora", "lora_dash", "fourierft", "mora", "dora"])
def test_load_scale_fuse_unload(method, tiny_sdxl, tmp_path):
    ours = _adapted(tiny_sdxl, method)
    dp.save_adapter({c: getattr(ours, c) for c in COMPONENTS}, tmp_path)
    pipe = _pipe(tiny_sdxl)
    base = unet_output(pipe)
    dp.load_into_pipeline(pipe, tmp_path)
    full = unet_output(pipe)
    torch.testing.assert_close(full, unet_output(ours), rtol=0, atol=0)
    torch.testing.assert_close(_text_out(pipe, "text_encoder_2"), _text_out(ours, "text_encoder_2"), rtol=0, atol=0)
    dp.set_pipeline_scale(pipe, 0.0)
    torch.testing.assert_close(unet_output(pipe), base, rtol=0, atol=0)
    dp.set_pipeline_scale(pipe, 1.0)
    dp.fuse(pipe)
    torch.testing.assert_close(unet_output(pipe), full, rtol=1e-4, atol=1e-5)
    dp.unfuse(pipe)
    with pytest.raises(ValueError, match="an adapter named 'default' is loaded already"):
        dp.load_into_pipeline(pipe, tmp_path)
    layers = [weakref.ref(layer) for m in COMPONENTS for layer in dp.adapter_layers(getattr(pipe, m)).values()]
    dp.unload(pipe)
    assert not dp.adapter_layers(pipe.unet)
    torch.testing.assert_close(unet_output(pipe), base, rtol=1e-5, atol=1e-6)
    gc.collect()  # nothing keeps unloaded layers (and FourierFT's cached fused weights) alive
    assert layers and all(ref() is None for ref in layers)


def test_bad_files_give_clear_errors(tiny_sdxl, medium_sdxl, tmp_path):
    other = _adapted(medium_sdxl, "lora")  # trained on another base: other shapes and names
    dp.save_adapter({"unet": other.unet}, tmp_path / "medium")
    pipe = _pipe(tiny_sdxl)
    with pytest.raises(dp.AdapterFileError, match="does not fit unet .*another base model"):
        dp.load_into_pipeline(pipe, tmp_path / "medium")
    assert not dp.adapter_layers(pipe.unet)  # nothing half-loaded
    ours = _adapted(tiny_sdxl, "lora")
    dp.save_adapter({"unet": ours.unet}, tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "dreampeft_adapter.json").read_text())
    manifest["components"]["unet"]["configs"][0]["method"] = "vera"
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "run" / "dreampeft_adapter.safetensors")
    save_file(tensors, tmp_path / "run" / "dreampeft_adapter.safetensors",
              metadata={"format": "pt", "dreampeft-adapter": json.dumps(manifest)})
    with pytest.raises(dp.AdapterFileError, match="dreampeft_adapter.safetensors: .*unknown adapter method 'vera'; choose one of"):
        dp.load_into_pipeline(pipe, tmp_path / "run")


@torch.no_grad()
def _reference(path, runs: dict, weights: dict):
    """The blended model computed by hand: W0 + Σ w_i ΔW_i merged into a fresh pipeline."""
    ref = _pipe(path)
    for name, pipe in runs.items():
        for comp in COMPONENTS:
            for full, layer in dp.adapter_layers(getattr(pipe, comp)).items():
                target = getattr(ref, comp).get_submodule(full)
                target.weight += weights[name] * layer.delta_weight()
    return ref


def test_two_adapters_blend_with_weights(tiny_sdxl, tmp_path):
    runs = {"subject": _adapted(tiny_sdxl, "lora_dash"), "style": _adapted(tiny_sdxl, "fourierft")}
    for name, p in runs.items():
        dp.save_adapter({c: getattr(p, c) for c in COMPONENTS}, tmp_path / name)
    pipe = _pipe(tiny_sdxl)
    base = unet_output(pipe)
    dp.load_into_pipeline(pipe, tmp_path / "subject", adapter_name="subject")
    dp.load_into_pipeline(pipe, tmp_path / "style", adapter_name="style", scale=0.5)
    ref = _reference(tiny_sdxl, runs, {"subject": 1.0, "style": 0.5})
    torch.testing.assert_close(unet_output(pipe), unet_output(ref), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_text_out(pipe, "text_encoder"), _text_out(ref, "text_encoder"), rtol=1e-4, atol=1e-5)
    dp.set_adapters(pipe, ["style"], [1.0])  # subject off
    ref = _reference(tiny_sdxl, runs, {"subject": 0.0, "style": 1.0})
    torch.testing.assert_close(unet_output(pipe), unet_output(ref), rtol=1e-4, atol=1e-5)
    dp.set_adapters(pipe, ["subject", "style"], [0.7, 0.3])
    blended = unet_output(pipe)
    dp.fuse(pipe)
    torch.testing.assert_close(unet_output(pipe), blended, rtol=1e-4, atol=1e-5)
    dp.unfuse(pipe)
    dp.unload(pipe, "style")
    ref = _reference(tiny_sdxl, runs, {"subject": 0.7, "style": 0.0})
    torch.testing.assert_close(unet_output(pipe), unet_output(ref), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown adapter"):
        dp.set_adapters(pipe, ["style"])
    layers = [weakref.ref(layer) for m in COMPONENTS for layer in dp.adapter_layers(getattr(pipe, m)).values()]
    dp.unload(pipe)
    assert not dp.adapter_layers(pipe.unet)
    torch.testing.assert_close(unet_output(pipe), base, rtol=1e-5, atol=1e-6)
    gc.collect()  # nothing keeps unloaded layers (and FourierFT's cached fused weights) alive
    assert layers and all(ref() is None for ref in layers)
