"""Our LoRA computes what PEFT's LoRA computes, given the same factors."""

from __future__ import annotations

import pytest
import torch

import dreampeft as dp

from .cases import build, example_input


@pytest.mark.parametrize("rslora", [False, True])
@torch.no_grad()
def test_lora_matches_peft(rslora):
    peft = pytest.importorskip("peft")
    ours, theirs = build("unet"), build("unet")
    dp.inject_adapters(ours, dp.LoRAConfig(r=4, alpha=8, rslora=rslora))
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=list(dp.UNET_ATTENTION)),
        theirs)
    g = torch.Generator().manual_seed(0)
    for name, layer in dp.adapter_layers(ours).items():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
        other = theirs.get_submodule(name)
        other.lora_A["default"].weight.copy_(layer.lora_A)
        other.lora_B["default"].weight.copy_(layer.lora_B)
        assert other.scaling["default"] == pytest.approx(layer.scaling)
    inputs = example_input("unet")
    torch.testing.assert_close(ours(**inputs).sample, theirs(**inputs).sample, rtol=1e-5, atol=1e-5)
