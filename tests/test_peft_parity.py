"""Our LoRA computes what PEFT's LoRA computes, given the same factors."""

from __future__ import annotations

import pytest
import torch

import dreampeft as dp

from .cases import build, example_input


KERNEL_3X3 = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]


@pytest.mark.parametrize("rslora, locon", [(False, False), (True, False), (False, True), (True, True)])
@torch.no_grad()
def test_lora_matches_peft(rslora, locon):
    """Attention layers, or kohya's LoCon set (transformer blocks and resnets) with the 3×3
    convolutions at their own rank and alpha — peft's Conv2d LoRA with a rank/alpha pattern."""
    peft = pytest.importorskip("peft")
    ours, theirs = build("unet"), build("unet")
    targets = list(dp.UNET_TRANSFORMER + dp.UNET_RESNETS) if locon else list(dp.UNET_ATTENTION)
    # scales that are powers of two either way (8/16, 8/√16): ours scales the r-wide intermediate,
    # peft the output, and only an exact scale makes the order immaterial to the last bit
    conv = {"conv_r": 16, "conv_alpha": 8.0} if locon else {}
    dp.inject_adapters(ours, dp.LoRAConfig(r=4, alpha=8, rslora=rslora, target_modules=targets, **conv))
    patterns = {k: 16 for k in KERNEL_3X3} if locon else {}
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=targets, rank_pattern=patterns,
                        alpha_pattern={k: 8.0 for k in patterns}), theirs)
    g = torch.Generator().manual_seed(0)
    layers = dp.adapter_layers(ours)
    assert any(layer.is_conv for layer in layers.values()) == locon
    for name, layer in layers.items():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
        other = theirs.get_submodule(name)
        other.lora_A["default"].weight.copy_(layer.lora_A)
        other.lora_B["default"].weight.copy_(layer.lora_B)
        assert other.scaling["default"] == pytest.approx(layer.scaling)
    inputs = example_input("unet")
    torch.testing.assert_close(ours(**inputs).sample, theirs(**inputs).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout, locon", [(0.0, False), (0.3, False), (0.0, True), (0.3, True)])
def test_dora_matches_peft_outputs_and_gradients(dropout, locon):
    """PEFT's DoRA given the same A, B and magnitude: same outputs (train mode with dropout, eval),
    same gradients (‖W0 + sBA‖ detached in both), and merging keeps the output — on attention, and
    on kohya's LoCon set, where the 3×3 convolutions have their own rank and alpha and PEFT's
    DoraConv2dLayer normalises each output channel over (in, kh, kw)."""
    peft = pytest.importorskip("peft")
    ours, theirs = build("unet"), build("unet")
    targets = list(dp.UNET_TRANSFORMER + dp.UNET_RESNETS) if locon else list(dp.UNET_ATTENTION)
    conv = {"conv_r": 16, "conv_alpha": 8.0} if locon else {}
    dp.inject_adapters(ours, dp.DoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=targets, **conv))
    patterns = {k: 16 for k in KERNEL_3X3} if locon else {}
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, target_modules=targets, rank_pattern=patterns,
        alpha_pattern={k: 8.0 for k in patterns}), theirs)
    assert any(layer.is_conv for layer in dp.adapter_layers(ours).values()) == locon
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in dp.adapter_layers(ours).items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))
            other = theirs.get_submodule(name)
            other.lora_A["default"].weight.copy_(layer.lora_A)
            other.lora_B["default"].weight.copy_(layer.lora_B)
            other.lora_magnitude_vector["default"].weight.copy_(layer.peft_magnitude())
    inputs = example_input("unet")
    for model in (ours, theirs):
        model.train()
    torch.manual_seed(1)  # the same dropout masks: both draw one mask per layer, in the same order
    a = ours(**inputs).sample
    torch.manual_seed(1)
    b = theirs(**inputs).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.pow(2).mean().backward()
    b.pow(2).mean().backward()
    for name, layer in dp.adapter_layers(ours).items():
        other = theirs.get_submodule(name)
        torch.testing.assert_close(layer.magnitude.grad, other.lora_magnitude_vector["default"].weight.grad.flatten(),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_A.grad, other.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        expected = theirs(**inputs).sample
        torch.testing.assert_close(ours(**inputs).sample, expected, rtol=1e-5, atol=1e-5)
        dp.merge_adapters(ours)
        torch.testing.assert_close(ours(**inputs).sample, expected, rtol=1e-4, atol=1e-5)
